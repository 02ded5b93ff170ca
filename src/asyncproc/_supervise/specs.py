"""What a supervisor supervises: child specs (``Command``, ``Task``, ``Call``), ``Backoff``,
and what it reports (``ChildStatus``, ``Event``).

Specs are plain, immutable descriptions, checked when built: a bad spec raises
``TypeError``/``ValueError`` naming the argument before any process starts. Running them is
``supervisor``'s job.
"""

from __future__ import annotations

import inspect
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union, cast

from .._validate import (
    check_args,
    check_choice,
    check_count,
    check_env,
    check_instance,
    check_number,
    check_path,
    check_seconds,
    check_text,
)

if TYPE_CHECKING:
    from .._isolated.api import Isolated
    from ..numa import NumaOptions

__all__ = ["Backoff", "Call", "ChildStatus", "Command", "Event", "Task", "RESTART_TYPES", "EVENT_KINDS", "STATES"]

RESTART_TYPES = ("permanent", "transient", "temporary")
STATES = ("running", "backoff", "stopped", "ended")
EVENT_KINDS = ("started", "exited", "restarting", "stopped", "memory_exceeded", "gave_up")

StrPath = Union[str, "os.PathLike[str]"]


def check_id(value: object) -> str:
    return check_text("a child's id", value)


@dataclass(frozen=True)
class Backoff:
    """Jittered exponential delay before a child's k-th consecutive restart:
    ``min(max, initial * factor ** (k - 1))`` scaled by a random factor in
    ``[1 - jitter, 1 + jitter]``; k goes back to 0 once the child has run ``reset_after``
    seconds. ``Backoff(initial=0)`` restarts at once."""

    initial: float = 0.1
    factor: float = 2.0
    max: float = 30.0
    jitter: float = 0.1
    reset_after: float = 60.0

    def __post_init__(self) -> None:
        check_seconds("Backoff initial", self.initial)
        check_number("Backoff factor", self.factor, minimum=1)
        check_seconds("Backoff max", self.max)
        check_number("Backoff jitter", self.jitter, minimum=0, maximum=1)
        check_seconds("Backoff reset_after", self.reset_after, allow_inf=True)

    def delay(self, k: int) -> float:
        """The delay before the k-th consecutive restart (k >= 1), jitter included."""
        if self.initial == 0:
            return 0.0
        try:
            base = min(self.max, self.initial * self.factor ** (k - 1))
        except OverflowError:  # factor ** k past float range: the cap applies
            base = self.max
        if self.jitter:
            base *= random.uniform(1 - self.jitter, 1 + self.jitter)
        return base


class _Spec:
    """What every child spec has: an id, a restart type, a shutdown bound."""

    id: str
    restart: str
    shutdown: float

    def _set_common(self, id: object, restart: object, shutdown: object) -> str:
        """Checks and sets what every spec has; returns the prefix that names this child in
        the messages of its other checks ("Command 'web': ")."""
        self.id = check_id(id)
        where = f"{type(self).__name__} {self.id!r}: "
        self.restart = check_choice(f"{where}restart", restart, RESTART_TYPES)
        self.shutdown = float(check_seconds(f"{where}shutdown", shutdown, allow_inf=True))
        return where

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.id!r}, restart={self.restart!r})"


class Command(_Spec):
    """A program, run as a ``SubprocessHandler``: its own session and process group, its
    whole tree signalled on stop, killed if the supervising process dies (the guardian).

    ``argv`` is the command line (``argv[0]`` looked up on ``PATH``); ``env`` overlays
    ``os.environ`` (a None value removes a variable); ``stdout``/``stderr`` are file paths,
    appended to across restarts (None: inherit). ``memory_limit`` (bytes) caps the resident
    memory of the whole process tree, checked about once a second.
    """

    def __init__(
        self,
        id: str,
        argv: Sequence[StrPath],
        *,
        env: Mapping[str, str | None] | None = None,
        cwd: StrPath | None = None,
        stdout: StrPath | None = None,
        stderr: StrPath | None = None,
        restart: str = "permanent",
        shutdown: float = 5.0,
        memory_limit: int | None = None,
        numa_options: NumaOptions | None = None,
        local_rank_id: int | None = None,
        local_world_size: int | None = None,
    ) -> None:
        where = self._set_common(id, restart, shutdown)
        args = cast("tuple[StrPath, ...]", check_args(f"{where}argv", argv, command=True))
        check_env(f"{where}env", env)
        for name, path in (("cwd", cwd), ("stdout", stdout), ("stderr", stderr)):
            check_path(f"{where}{name}", path, allow_none=True)
        check_count(f"{where}memory_limit", memory_limit, minimum=1, allow_none=True)  # bytes
        check_count(f"{where}local_rank_id", local_rank_id, allow_none=True)
        if numa_options is not None and local_rank_id is None:
            raise ValueError(f"{where}numa_options needs local_rank_id (which local rank to bind)")
        # Beyond API.md: how many local ranks share the node (asyncproc up's replicas); None:
        # $LOCAL_WORLD_SIZE or one per NUMA node, as SubprocessHandler reads it.
        check_count(f"{where}local_world_size", local_world_size, minimum=(local_rank_id or 0) + 1, allow_none=True)
        self.argv: tuple[str, ...] = tuple(os.fspath(a) for a in args)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.stdout = stdout
        self.stderr = stderr
        self.memory_limit = memory_limit
        self.numa_options = numa_options
        self.local_rank_id = local_rank_id
        self.local_world_size = local_world_size

    def __repr__(self) -> str:
        return f"Command({self.id!r}, {list(self.argv)!r}, restart={self.restart!r})"


class Task(_Spec):
    """An ``async def`` run in the supervisor's event loop: ``await async_fn(*args)``.
    Stopping it cancels it; it has ``shutdown`` seconds to finish."""

    def __init__(self, id: str, async_fn: Callable[..., Any], *args: Any, restart: str = "permanent", shutdown: float = 5.0) -> None:
        where = self._set_common(id, restart, shutdown)
        if not callable(async_fn):
            raise TypeError(f"{where}async_fn must be an async function, got {async_fn!r}")
        if not _is_async_function(async_fn):
            raise TypeError(f"{where}async_fn must be an async def (a coroutine function), got {async_fn!r}")
        self.async_fn = async_fn
        self.args = args


class Call(_Spec):
    """A function run in its own process by ``isolated.call(func, *args)`` (default
    ``Isolated(timeout=None)``: no time limit). Stopping it gives its process SIGTERM, then
    SIGKILL after ``shutdown`` seconds."""

    def __init__(
        self,
        id: str,
        func: Callable[..., Any],
        *args: Any,
        restart: str = "permanent",
        shutdown: float = 5.0,
        isolated: Isolated | None = None,
    ) -> None:
        from .._isolated.api import Isolated

        where = self._set_common(id, restart, shutdown)
        if not callable(func):
            raise TypeError(f"{where}func must be callable, got {func!r}")
        if _is_async_function(func):
            raise TypeError(f"{where}func runs in another process and must be a plain def, got the async {func!r}")
        isolated = check_instance(f"{where}isolated", isolated, Isolated, allow_none=True) or Isolated(timeout=None)
        self.func = func
        self.args = args
        self.isolated = isolated


def _is_async_function(fn: object) -> bool:
    while hasattr(fn, "func") and not inspect.isfunction(fn):  # functools.partial
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))  # noqa: B004 - the method itself


@dataclass(frozen=True)
class ChildStatus:
    """One child as ``Supervisor.status()`` sees it."""

    id: str
    state: str  # "running" | "backoff" | "stopped" | "ended"
    pid: int | None  # None for a Task or a supervisor, or when not running
    restarts: int  # how many times it was restarted


@dataclass(frozen=True)
class Event:
    """Something that happened to a child (``kind`` in ``EVENT_KINDS``)."""

    kind: str
    child: str
    time: float  # time.time() when it happened
    pid: int | None = None
    exitcode: int | None = None  # negative = killed by that signal
    error: BaseException | None = None
    restarts: int = 0
    delay: float | None = None  # for "restarting": seconds until the restart


# Re-exported by the package: shown, pickled and documented as asyncproc.X. Set after the
# classes are made (dataclass resolves its string annotations in the defining module).
for _public in (Backoff, Command, Task, Call, ChildStatus, Event):
    _public.__module__ = "asyncproc"
del _public
