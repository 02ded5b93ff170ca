"""Every error asyncproc raises, and nothing else.

The tree::

    AsyncprocError(message, pid=, exitcode=)   base of all library errors
     ├── ChildCrashed                          the child died without answering
     │    │                                    (signal, abort, os._exit, sys.exit, killed);
     │    │                                    .signal, .fault_log (child's Python stack)
     │    └── MemoryLimitExceeded              ... because it went over memory_limit;
     │                                         also a builtin MemoryError
     ├── NumaBindingError                      a NUMA binding cannot be made or applied;
     │                                         also a builtin ValueError
     │                                         (public as ``asyncproc.numa.NumaBindingError``)
     ├── RemoteError                           the child's exception or return value could
     │                                         not be carried back; .type_name, .traceback_text
     ├── LaunchFailed                          a local rank of ``start_processes`` failed
     │                                         (``LaunchResult.check()``); .result
     ├── ConfigError                           an ``asyncproc up`` file cannot be used; also a
     │                                         builtin ValueError
     └── SupervisorGaveUp                      a ``Supervisor``'s children failed more often
                                               than its intensity allows; .child, and
                                               __cause__ = that child's last failure

What is *not* here, on purpose: a call that runs past its timeout raises the builtin
``TimeoutError``; a call whose caller is cancelled sees the cancellation unchanged; bad
arguments raise ``TypeError``/``ValueError`` before any process starts; an exception raised
by the called function is re-raised as itself. ``ServerLost`` (a call that reached no
worker) is internal: the call is retried once, then it is a plain ``AsyncprocError``.
"""

from __future__ import annotations

import signal as _signal
from typing import Any

__all__ = [
    "AsyncprocError",
    "ConfigError",
    "ChildCrashed",
    "LaunchFailed",
    "MemoryLimitExceeded",
    "NumaBindingError",
    "RemoteError",
    "SupervisorGaveUp",
    "describe_exitcode",
]


def _signal_or_none(exitcode: int | None) -> _signal.Signals | None:
    if exitcode is None or exitcode >= 0:
        return None
    try:
        return _signal.Signals(-exitcode)
    except ValueError:
        return None


def describe_exitcode(exitcode: int | None) -> str:
    """``"killed by SIGSEGV (signal 11)"`` / ``"exited with code 3"``, as a user reads it."""
    if exitcode is None:
        return "ended with an unknown status"
    sig = _signal_or_none(exitcode)
    if sig is not None:
        return f"was killed by {sig.name} (signal {sig.value})"
    if exitcode < 0:
        return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


class AsyncprocError(Exception):
    """Base of every asyncproc error; carries the process it is about, like psutil's.

    ``pid`` and ``exitcode`` (``Popen.returncode`` style: negative for a signal) are None
    when unknown. Catch this to catch every error asyncproc itself raises.
    """

    __module__ = "asyncproc"  # shown and pickled as the name users import (and below)

    def __init__(self, message: str = "", *, pid: int | None = None, exitcode: int | None = None):
        super().__init__(message)
        self.pid = pid
        self.exitcode = exitcode

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only attributes are not in .args: rebuild from __dict__ so that an
        # asyncproc error raised inside a child (nested calls) crosses back intact.
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(cls: type[AsyncprocError], args: tuple[Any, ...], state: dict[str, Any]) -> AsyncprocError:
    # Not cls.__new__: for MemoryLimitExceeded the MRO finds MemoryError.__new__, which
    # CPython refuses for a subclass whose first base is not a MemoryError.
    err = BaseException.__new__(cls)
    Exception.__init__(err, *args)
    err.__dict__.update(state)
    return err


class ChildCrashed(AsyncprocError):
    """The child died before it answered.

    ``exitcode`` follows ``Popen.returncode``: negative means killed by that signal, and
    ``signal`` is then the ``signal.Signals`` member. ``fault_log`` holds what faulthandler
    wrote in the child when a fatal signal hit it: the Python stack of every thread.
    """

    __module__ = "asyncproc"

    def __init__(
        self,
        message: str | None = None,
        *,
        pid: int | None,
        exitcode: int | None,
        fault_log: str = "",
    ):
        self.signal = _signal_or_none(exitcode)
        self.fault_log = fault_log
        if message is None:
            message = f"child process {pid} {describe_exitcode(exitcode)} before it returned"
            if fault_log.strip():
                message += "\n\nPython stack of the child when it crashed:\n" + fault_log.rstrip()
        super().__init__(message, pid=pid, exitcode=exitcode)


class MemoryLimitExceeded(ChildCrashed, MemoryError):
    """The child went over ``Isolated(memory_limit=...)``; catchable as ``MemoryError`` too.

    The message names the limit and carries the child's traceback when it had one.
    """

    __module__ = "asyncproc"


class RemoteError(AsyncprocError):
    """The child's exception or return value could not be carried back by pickle.

    ``type_name`` is the qualified name of the type, ``traceback_text`` the child's
    formatted traceback (empty for an unpicklable return value).
    """

    __module__ = "asyncproc"

    def __init__(
        self,
        message: str,
        *,
        type_name: str,
        traceback_text: str = "",
        pid: int | None = None,
        exitcode: int | None = None,
    ):
        self.type_name = type_name
        self.traceback_text = traceback_text
        full = message
        if traceback_text:
            full += "\n\nTraceback in the child:\n" + traceback_text.rstrip()
        super().__init__(full, pid=pid, exitcode=exitcode)


class NumaBindingError(AsyncprocError, ValueError):
    """A NUMA binding cannot be made: the topology cannot be read, the mode cannot be
    satisfied on this machine, or the kernel refused to apply it.

    Also a ``ValueError``. Raised unless ``NumaOptions.should_fall_back_if_binding_fails``,
    which logs it to the ``asyncproc.numa`` logger and runs unbound instead.
    """

    __module__ = "asyncproc.numa"  # where users import it from


class LaunchFailed(AsyncprocError):
    """A launch of local ranks did not succeed: a rank failed, or a signal stopped them.

    Raised by ``LaunchResult.check()``; the message is the launch summary (the rank, its
    exit code or signal, its log file, its recorded error); ``result`` is the
    ``LaunchResult``; ``pid``/``exitcode`` are those of the first rank that failed.
    """

    __module__ = "asyncproc"

    def __init__(self, message: str, *, result: Any, pid: int | None = None, exitcode: int | None = None):
        self.result = result
        super().__init__(message, pid=pid, exitcode=exitcode)


class SupervisorGaveUp(AsyncprocError):
    """A supervisor's children failed more often than ``max_restarts`` within
    ``max_seconds``: it stopped them all. ``child`` is the id of the child that failed
    last; ``__cause__`` is that failure (the Task's or Call's exception, or a
    ``ChildCrashed`` for a Command)."""

    __module__ = "asyncproc"

    def __init__(self, message: str, *, child: str, pid: int | None = None, exitcode: int | None = None):
        self.child = child
        super().__init__(message, pid=pid, exitcode=exitcode)


class ConfigError(AsyncprocError, ValueError):
    """The file cannot be used; the message says where and what was expected."""


class ServerLost(AsyncprocError):
    """Internal, never raised to users: the fork server died before our call reached a
    worker, so it never ran and is safe to retry."""

    def __init__(self) -> None:
        super().__init__("the asyncproc fork server died before the call reached a worker (its stderr may say why)")
