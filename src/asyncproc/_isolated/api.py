"""Isolated calls, the public part: ``safe_call``, ``Isolated``, ``safe_call_sync``, ``preload``.

A call is one fresh process that no other call touches. The caller waits on one data
socket: the answer, or end-of-stream when the worker is gone (see ``server`` for why
end-of-stream means "gone and cleaned up"). Timeouts and cancellation end the worker's
whole tree with SIGTERM, ``grace``, SIGKILL, each wait bounded, before the caller sees the
outcome.

How a worker is started and held: ``handles``; what its answer means: ``outcome``.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import logging
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from .._exceptions import AsyncprocError, ServerLost
from .._validate import check_choice, check_count, check_instance, check_seconds
from . import worker as _worker
from .handles import STARTERS, Worker, describe
from .link import link
from .outcome import call_read, is_closed, outcome, stop

if TYPE_CHECKING:
    from ..numa import Binding, NumaOptions

__all__ = ["Isolated", "preload", "safe_call", "safe_call_sync", "START_METHODS"]

log = logging.getLogger("asyncproc")

T = TypeVar("T")

START_METHODS = ("forkserver", "fork", "spawn")
_ATTEMPTS = 3  # of a call whose fork server died before any worker got it


# Set by a supervisor's Call child, in its own task: told the worker once the call has one
# (the supervisor reads the worker's pid from it for ChildStatus and its events).
worker_started: contextvars.ContextVar[Callable[[Worker], None] | None] = contextvars.ContextVar(
    "asyncproc_worker_started", default=None
)


# -- the public API -----------------------------------------------------------------------


def _check_numa(options: NumaOptions | None, local_rank_id: int | None) -> None:
    """Both or neither; checked at construction (the binding itself is worked out later)."""
    if options is None:
        if local_rank_id is not None:
            raise ValueError(f"local_rank_id picks a NUMA binding and needs numa_options too; got local_rank_id={local_rank_id!r} and numa_options=None")
        return
    if local_rank_id is None:
        raise ValueError(f"numa_options needs local_rank_id (which local rank to bind), got numa_options={options!r} and local_rank_id=None")
    from ..numa import NumaOptions

    check_instance("numa_options", options, NumaOptions)


def _numa_binding(options: NumaOptions | None, local_rank_id: int | None, local_world_size: int | None) -> Binding | None:
    """The binding each call's child gets, worked out once, before any process starts."""
    if options is None or local_rank_id is None:
        return None
    from ..numa import binding_for

    return binding_for(options, local_rank_id, local_world_size)


def _check_callable(func: object, where: str) -> None:
    if not callable(func):
        raise TypeError(f"{where} needs a callable as its first argument, got {type(func).__name__} {func!r:.80}")
    if inspect.iscoroutinefunction(func):
        raise TypeError(f"{where} runs synchronous functions; {func!r:.80} is an async def")


class Isolated:
    """Runs a function in a fresh child process per call; see the README for outcomes.

    ``timeout`` (seconds, or None for no limit) covers the whole call; past it the child's
    tree gets SIGTERM, ``grace`` seconds, then SIGKILL, and the caller gets TimeoutError.
    ``memory_limit`` (bytes) caps how much data memory the call may allocate on top of
    what its process starts with (RLIMIT_DATA).
    ``numa_options`` with ``local_rank_id`` (and ``local_world_size``, by default
    ``$LOCAL_WORLD_SIZE``) bind each child's CPUs and memory as that local rank's (see
    ``asyncproc.numa``): a "spawn" interpreter from its first instruction, a forked child
    before the function's first.
    """

    def __init__(
        self,
        *,
        timeout: float | None = 5.0,
        grace: float = 1.0,
        start_method: str = "forkserver",
        memory_limit: int | None = None,
        numa_options: NumaOptions | None = None,
        local_rank_id: int | None = None,
        local_world_size: int | None = None,
    ):
        check_seconds("timeout", timeout, allow_none=True, allow_inf=True)  # inf: no limit, as None
        check_seconds("grace", grace)
        check_choice("start_method", start_method, START_METHODS)
        check_count("memory_limit", memory_limit, minimum=1, allow_none=True)  # bytes
        check_count("local_rank_id", local_rank_id, allow_none=True)
        check_count("local_world_size", local_world_size, minimum=1, allow_none=True)
        _check_numa(numa_options, local_rank_id)
        self.timeout = timeout
        self.grace = grace
        self.start_method = start_method
        self.memory_limit = memory_limit
        self.numa_options = numa_options
        self.local_rank_id = local_rank_id
        self.local_world_size = local_world_size

    @functools.cached_property
    def _spec(self) -> _worker.CallSpec:
        # Worked out on the first call, not in __init__, which does no I/O: the binding
        # reads /sys, and preloading talks to the fork server.
        binding = _numa_binding(self.numa_options, self.local_rank_id, self.local_world_size)
        if binding is not None and self.start_method != "fork":
            link.preload(["asyncproc.numa"])  # or every bound worker imports it to unpickle
        return _worker.CallSpec(memory_limit=self.memory_limit, binding=binding)

    def __repr__(self) -> str:
        numa = f", numa_options={self.numa_options!r}, local_rank_id={self.local_rank_id!r}" if self.numa_options else ""
        return (
            f"Isolated(timeout={self.timeout!r}, grace={self.grace!r}, "
            f"start_method={self.start_method!r}, memory_limit={self.memory_limit!r}{numa})"
        )

    async def call(self, func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``func(*args, **kwargs)`` in a new child process; its value or its exception.

        Raises what ``safe_call`` raises (see there), with this runner's options.
        """
        _check_callable(func, "Isolated.call()")
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                return await self._call_once(func, args, kwargs)
            except ServerLost as lost:
                # Safe to retry: no worker ever received the call; the link has reaped the
                # dead server and the next attempt starts a new one. A few attempts, not
                # one: a server SIGKILLed again (the OOM killer, a test) must not fail a
                # call that never ran, and one that dies at every start must not loop.
                if attempt == _ATTEMPTS:
                    raise AsyncprocError(f"{lost} ({_ATTEMPTS} times in a row)") from None
                log.warning("asyncproc: a call never started (its worker or the fork server died first); retrying it")
        raise AssertionError("unreachable")  # pragma: no cover

    async def _call_once(self, func: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        worker: Worker | None = None
        msg = None
        deadline = anyio.current_time() + (math.inf if self.timeout is None else self.timeout)
        try:
            # The timeout covers the whole call, waiting for a busy fork server included.
            with anyio.CancelScope(deadline=deadline) as scope:
                worker = await STARTERS[self.start_method](self._spec, (func, args, kwargs))
                if (hook := worker_started.get()) is not None:
                    hook(worker)
                msg = await worker.next_message(first=True)
            if scope.cancelled_caught:
                started = worker is not None and call_read(worker)
                if worker is not None:
                    with anyio.CancelScope(shield=True):
                        await stop(worker, self.grace)
                raise TimeoutError(self._timeout_message(func, worker, started))
            assert worker is not None
            return await outcome(worker, msg, deadline, self.grace)
        except BaseException:
            if worker is not None and not is_closed(worker):  # cancelled from outside while waiting
                with anyio.CancelScope(shield=True):
                    await stop(worker, self.grace)
            raise

    def _timeout_message(self, func: Callable[..., Any], worker: Worker | None, started: bool) -> str:
        name = describe(func)
        if started:
            return f"{name} did not return within {self.timeout} s; its process was stopped"
        if worker is None:
            return f"{name} did not start within {self.timeout} s: the asyncproc fork server was too busy (or stopped) to start its process"
        why = "a new interpreter was still starting up" if self.start_method == "spawn" else "its process had not yet read the call"
        return f"{name} did not start within {self.timeout} s ({why}); it never ran, and its process was stopped"

    def __call__(self, func: Callable[..., T]) -> Callable[..., Awaitable[T]]:
        """Decorator: a sync ``def`` becomes an ``async def`` that runs isolated."""
        _check_callable(func, "@Isolated(...)")

        @functools.wraps(func)
        async def isolated(*args: Any, **kwargs: Any) -> T:
            return await self.call(func, *args, **kwargs)

        return isolated


_default = Isolated()


async def safe_call(func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run ``func(*args, **kwargs)`` in a fresh child process and return its value.

    Uses ``Isolated()``'s defaults: ``timeout=5.0`` seconds for the whole call, ``grace=1.0``
    second between SIGTERM and SIGKILL when it must be stopped, ``start_method="forkserver"``.
    For other options use ``await asyncproc.Isolated(timeout=..., ...).call(func, ...)``.
    ``func`` may be a lambda, a closure or a function defined in ``__main__``.

    Raises, in the caller, once the child and everything it started are gone and reaped:

    * the exception ``func`` raised, as itself, with the child's traceback attached;
    * ``TimeoutError`` when the call runs past the timeout (the child's tree is stopped);
    * ``asyncproc.ChildCrashed`` when the child dies without answering (a segfault,
      ``os._exit``, ``sys.exit``, a signal): ``.exitcode``, ``.signal``, ``.fault_log``;
    * ``asyncproc.MemoryLimitExceeded`` (only with a ``memory_limit``);
    * ``asyncproc.RemoteError`` when the exception or value cannot be pickled back;
    * ``TypeError`` at once, starting nothing, when ``func`` is not a callable or is an
      ``async def``, or its arguments cannot be pickled.

    Cancelling the caller stops the child's tree and lets the cancellation through.
    """
    return await _default.call(func, *args, **kwargs)


def preload(*modules: str) -> None:
    """Import ``modules`` in the fork server, so no "forkserver" call imports them again.

    A function that needs numpy then costs, from its first call on, about what a trivial
    function costs. Spares forked before the import are retired: no call is served by a
    worker without them. Also: ``ASYNCPROC_PRELOAD=numpy,mypkg.model`` in the environment.
    Importing happens in the server, in the background; a module that fails to import is
    reported on stderr and skipped. Preload only modules that start no threads at import:
    a server with threads cannot fork safely.
    """
    for name in modules:
        if not isinstance(name, str) or not all(part.isidentifier() for part in name.split(".")):
            raise ValueError(f"preload() takes module names such as 'numpy' or 'pkg.mod', got {name!r}")
    link.preload(modules)


def safe_call_sync(func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``safe_call`` for code with no event loop: runs one on asyncio for the call.

    Same defaults (5 s timeout), value and exceptions as ``safe_call``. Raises
    ``RuntimeError`` when called inside a running event loop: use ``await safe_call`` there.
    """
    _check_callable(func, "safe_call_sync()")
    import sniffio

    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return anyio.run(functools.partial(_default.call, func, *args, **kwargs))
    raise RuntimeError(f"safe_call_sync() was called inside a running {library} event loop; use 'await asyncproc.safe_call(...)' there")


# Shown, pickled and documented under the name users import it by (asyncproc.X).
Isolated.__module__ = preload.__module__ = safe_call.__module__ = safe_call_sync.__module__ = "asyncproc"
