"""Supervision trees: ``Supervisor``, OTP's supervisor for processes, isolated calls and tasks.

How it works (all on anyio, the same code on asyncio, uvloop and trio):

* The supervisor lives in the caller's task: ``async with sup`` opens a task group in which
  each running child has one *runner* task, which awaits its end on an event (a Command's
  pidfd through ``SubprocessHandler.wait``, a Call's socket through ``Isolated.call``, a
  Task's return) and reports it. A Command is spawned by the task that decides to start it,
  so a restart costs no task switch before its ``Popen``. Nothing polls, except the
  memory check (RSS has no event without cgroups): one pass over the trees of the Commands
  that have a ``memory_limit``, once a second, only while such a Command runs.
* Every decision (restart, strategy, intensity, give-up) and every dynamic call
  (``start_child`` ...) runs under one lock, so children are started and stopped in order
  and no two decisions interleave. A backoff delay is waited *outside* the lock, in a
  *plan* task that then starts its children under the lock; a later decision that takes
  over a child waiting in a plan cancels that plan and adopts its children.
* The body of ``async with`` runs in a cancel scope of ours: when the supervisor gives up
  it stops every child and cancels the body, and ``__aexit__`` raises ``SupervisorGaveUp``
  instead of the cancellation. The body's own exceptions pass through unchanged (never
  wrapped in an exception group: the runners never raise into the task group).
* Events go to each ``events()`` reader through a bounded buffer that drops the oldest
  event when full: a slow reader never slows supervision, and it is told what it lost.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import logging
import math
import os
import signal
import socket
import time
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Union

import anyio
import anyio.abc

from .._exceptions import ChildCrashed, MemoryLimitExceeded, SupervisorGaveUp, describe_exitcode
from .._validate import check_choice, check_count, check_instance, check_seconds
from .specs import Backoff, Call, ChildStatus, Command, Event, Task, check_id

if TYPE_CHECKING:
    from .._subprocess.handler import SubprocessHandler

__all__ = ["Supervisor", "EventStream"]

log = logging.getLogger("asyncproc")

STRATEGIES = ("one_for_one", "one_for_all", "rest_for_one")
MEMORY_CHECK_S = 1.0  # RSS has no event: how often the trees of limited Commands are measured
EVENT_BUFFER = 1000  # events kept for a reader that does not keep up; the oldest go first

ChildSpec = Union[Command, Task, Call, "Supervisor"]


@dataclass
class _End:
    """How a run ended, as the supervisor judges it."""

    failed: bool
    pid: int | None = None
    exitcode: int | None = None
    error: BaseException | None = None


# -- runs: one start-to-end of a child ------------------------------------------------------


class _Run:
    """One run of a child. ``launch`` starts it (``main`` then runs in a runner task of
    the supervisor's task group) and returns once it runs; ``main`` returns how it ended;
    ``stop`` ends it (bounded) as the supervisor's own doing, which is never a failure."""

    _pid: int | None = None

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.stopping = False  # the supervisor ends it: its end is not reported as "exited"
        self.started = False
        self.done = anyio.Event()  # main has returned, or it never started
        self.start_error: BaseException | None = None

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def exitcode(self) -> int | None:
        return None

    async def launch(self, tg: anyio.abc.TaskGroup, runner: Callable[[], Coroutine[Any, Any, None]]) -> None:
        raise NotImplementedError

    async def main(self) -> _End:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    def finished(self) -> None:
        self.done.set()

    async def _until_done(self) -> None:
        """Wait for ``main`` to return; a child that takes longer than its shutdown bound
        (a Task that ignores cancellation) is named in the log, then still awaited: it
        lives in our task group and cannot be abandoned."""
        with anyio.move_on_after(self.spec.shutdown + 1.0):
            await self.done.wait()
            return
        log.warning("asyncproc: %r did not end within %.1f s of being stopped; still waiting for it", self.spec, self.spec.shutdown)
        await self.done.wait()


class _InLoopRun(_Run):
    """A child that runs in its runner task (a Task, a Call, a nested supervisor): started
    when that task gets to it, stopped by cancelling it."""

    def __init__(self, spec: Any) -> None:
        super().__init__(spec)
        self.settled = anyio.Event()  # started, or ended without starting
        self.scope = anyio.CancelScope()

    def mark_started(self) -> None:
        self.started = True
        self.settled.set()

    def finished(self) -> None:
        self.settled.set()
        self.done.set()

    async def launch(self, tg: anyio.abc.TaskGroup, runner: Callable[[], Coroutine[Any, Any, None]]) -> None:
        tg.start_soon(runner)
        await self.settled.wait()

    async def stop(self) -> None:
        self.stopping = True
        self.scope.cancel()
        await self._until_done()


class _CommandRun(_Run):
    spec: Command

    def __init__(self, spec: Command) -> None:
        super().__init__(spec)
        self.handler: SubprocessHandler | None = None
        self.memory_error: MemoryLimitExceeded | None = None

    @property
    def pid(self) -> int | None:
        # The handler knows it as soon as Popen returned, before its spawn() does.
        return self.handler.pid if self.handler is not None else None

    @property
    def exitcode(self) -> int | None:
        return self.handler.returncode if self.handler is not None else None

    async def launch(self, tg: anyio.abc.TaskGroup, runner: Callable[[], Coroutine[Any, Any, None]]) -> None:
        # Spawned here, in the deciding task: a restart costs no task switch before the
        # spawn (Popen is synchronous anyway); the runner task only awaits the end.
        try:
            await self._spawn()
        except Exception as exc:
            self.start_error = exc
            self.done.set()
            return
        except BaseException:
            # Cancelled around a spawn that may have happened: nothing may be left running.
            if self.handler is not None and self.handler.proc is not None:
                with anyio.CancelScope(shield=True):
                    await self.handler.kill(signal.SIGTERM, grace=self.spec.shutdown)
                self.handler.close()
            self.done.set()
            raise
        self.started = True
        tg.start_soon(runner)

    async def _spawn(self) -> None:
        from .._subprocess.handler import SubprocessHandler

        spec = self.spec
        out, err = _open_append(spec.stdout), None
        try:
            err = _open_append(spec.stderr)
            self.handler = SubprocessHandler(
                spec.argv[0], spec.argv[1:], spec.env, out, err,
                spec.local_rank_id or 0, spec.numa_options, cwd=spec.cwd, local_world_size=spec.local_world_size,
            )
            await self.handler.spawn()
        finally:
            for fd in (out, err):
                if fd is not None:
                    os.close(fd)  # the child has its own copies

    async def main(self) -> _End:
        handler = self.handler
        assert handler is not None
        try:
            code = await handler.wait()
        finally:
            # The leader is gone (or we are being torn down): members of its group may
            # live on, and go before any replacement starts (a port they hold, a file
            # they write). Checked first with one killpg(0): most exits leave none.
            if not self.stopping and (handler.returncode is None or _group_exists(handler.pid)):
                with anyio.CancelScope(shield=True):
                    await handler.kill(signal.SIGTERM, grace=self.spec.shutdown)
                handler.close()  # reaped, it holds nothing more; after a kill, release all
        spec = self.spec
        if self.memory_error is not None:
            self.memory_error.exitcode = code
            return _End(True, self.pid, code, self.memory_error)
        if code == 0:
            return _End(False, self.pid, 0)
        crashed = ChildCrashed(f"command {spec.id!r} (pid {self.pid}) {describe_exitcode(code)}", pid=self.pid, exitcode=code)
        return _End(True, self.pid, code, crashed)

    async def stop(self) -> None:
        self.stopping = True
        if self.handler is not None:
            await self.handler.kill(signal.SIGTERM, grace=self.spec.shutdown)
            self.handler.close()
        await self._until_done()

    async def stop_for_memory(self) -> None:
        """Over its memory limit: stopped as at shutdown, and its end is a failure."""
        if self.handler is not None and self.handler.returncode is None:
            await self.handler.kill(signal.SIGTERM, grace=self.spec.shutdown)


def _group_exists(pgid: int | None) -> bool:
    from .._subprocess.handler import _group_exists as exists

    return pgid is not None and exists(pgid)


class _TaskRun(_InLoopRun):
    spec: Task

    async def main(self) -> _End:
        with self.scope:
            self.mark_started()
            try:
                await self.spec.async_fn(*self.spec.args)
            except Exception as exc:
                return _End(not self.stopping, error=None if self.stopping else exc)
            return _End(False)
        return _End(False)  # cancelled by stop()


class _CallRun(_InLoopRun):
    spec: Call

    def __init__(self, spec: Call) -> None:
        super().__init__(spec)
        # Stopping a call is cancelling it: Isolated then gives the process SIGTERM, waits
        # its ``grace``, then SIGKILLs. The spec's ``shutdown`` is that grace.
        self.isolated = copy.copy(spec.isolated)
        self.isolated.grace = spec.shutdown
        self.worker: Any = None

    @property
    def pid(self) -> int | None:
        worker = self.worker
        if worker is None:
            return None
        if worker.pid is None:
            # A fork-server worker: the server names it in a HELLO message, first on the
            # call's control socket. Peeked, not read: Isolated reads it when the call ends.
            worker.pid = _peek_hello(worker.ctl)
        return worker.pid

    def _on_worker(self, worker: Any) -> None:
        self.worker = worker
        self.mark_started()

    async def main(self) -> _End:
        from .._isolated.api import worker_started

        worker_started.set(self._on_worker)  # this task's context only
        with self.scope:
            try:
                await self.isolated.call(self.spec.func, *self.spec.args)
            except Exception as exc:
                if self.stopping:
                    return _End(False)
                if not self.started:
                    raise  # it never ran: a start error
                return _End(True, getattr(exc, "pid", None) or self.pid, getattr(exc, "exitcode", None), exc)
            return _End(False, self.pid)
        return _End(False)

    async def stop(self) -> None:
        self.stopping = True
        self.scope.cancel()
        # Bounded by Isolated itself: grace, then SIGKILL and a bounded wait.
        await self.done.wait()


def _peek_hello(ctl: Any) -> int | None:
    from .._isolated import protocol as _protocol

    try:
        head = ctl.recv(64, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:
        return None
    if head[:1] != _protocol.HELLO:
        return None
    try:
        return int(head[2:].split(maxsplit=1)[0])  # "PID" or "PID CGROUP-LEAF"
    except (ValueError, IndexError):
        return None


class _SupervisorRun(_InLoopRun):
    spec: Supervisor

    async def main(self) -> _End:
        with self.scope:
            try:
                async with self.spec:
                    self.mark_started()
                    await self.spec.wait()
            except SupervisorGaveUp as exc:
                return _End(not self.stopping, error=exc)
            return _End(False)
        return _End(False)

    async def _until_done(self) -> None:
        # Bounded by the nested supervisor's own children's shutdown bounds.
        await self.done.wait()


def _make_run(spec: ChildSpec) -> _Run:
    if isinstance(spec, Command):
        return _CommandRun(spec)
    if isinstance(spec, Task):
        return _TaskRun(spec)
    if isinstance(spec, Call):
        return _CallRun(spec)
    return _SupervisorRun(spec)


def _open_append(path: Any) -> int | None:
    """A log file opened for appending: a restarted command's output follows the last run's."""
    if path is None or os.fspath(path) == "":
        return None
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o666)


# -- the supervisor's view of a child -------------------------------------------------------


class _Plan:
    """Children to (re)start in order once a backoff delay has passed."""

    def __init__(self, children: list[_Child], delay: float) -> None:
        self.children = children
        self.delay = delay
        self.scope = anyio.CancelScope()
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self.scope.cancel()


class _Child:
    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.id: str = spec.id
        self.state = "stopped"  # until first started
        self.restarts = 0
        self.consecutive = 0  # k of the backoff: restarts since it last ran reset_after seconds
        self.run: _Run | None = None
        self.plan: _Plan | None = None
        self.started_at = 0.0

    @property
    def pid(self) -> int | None:
        return self.run.pid if self.run is not None and self.state == "running" else None

    def leave_plan(self) -> None:
        if self.plan is not None:
            self.plan.children.remove(self)
            self.plan = None


# -- events ----------------------------------------------------------------------------------


class EventStream:
    """What ``Supervisor.events()`` returns: an async iterator of ``Event``.

    Its buffer holds ``buffer`` events; when the reader falls that far behind, the oldest
    are dropped (supervision never waits for a reader). ``dropped`` counts them, and the
    reader's next read logs a warning saying how many it lost. The stream ends when the
    supervisor exits (``async with`` is left), after the reader has had every buffered event.
    """

    def __init__(self, buffer: int) -> None:
        self._buffer: collections.deque[Event] = collections.deque()
        self._maxlen = buffer
        self._wakeup: anyio.Event | None = None
        self._closed = False
        self._unreported = 0
        self.dropped = 0

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        while not self._buffer:
            if self._closed:
                raise StopAsyncIteration
            self._wakeup = anyio.Event()
            await self._wakeup.wait()
        self._report_dropped()
        return self._buffer.popleft()

    def _take_pending(self) -> list[Event]:
        """Every event buffered now, without waiting (the iteration goes on after them).
        For ``asyncproc up``'s view: it reads ``status()`` for its table, and must first
        print every event that ``status()`` already reflects, or the two disagree."""
        pending = list(self._buffer)
        self._buffer.clear()
        if pending:  # after taking them: the warning may reach a log handler that reads us again
            self._report_dropped()
        return pending

    def _report_dropped(self) -> None:
        unreported, self._unreported = self._unreported, 0
        if unreported:
            log.warning("asyncproc: an events() reader fell behind: %d event(s) dropped (%d in all)", unreported, self.dropped)

    def put(self, event: Event) -> None:
        if len(self._buffer) >= self._maxlen:
            self._buffer.popleft()
            self.dropped += 1
            self._unreported += 1
        self._buffer.append(event)
        self._wake()

    def close(self) -> None:
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()


# -- the supervisor --------------------------------------------------------------------------


class Supervisor:
    """Starts children in order, restarts them by their restart type and the strategy,
    gives up past ``max_restarts`` restarts within ``max_seconds``, stops them in reverse
    order. See the README's "Supervision" section."""

    __module__ = "asyncproc"  # re-exported there: shown and pickled as asyncproc.Supervisor
    id: str
    restart = "permanent"  # as the child of another supervisor
    shutdown = math.inf  # as a child: stopping it stops its children, each bounded

    def __init__(
        self,
        children: Iterable[ChildSpec] = (),
        *,
        strategy: str = "one_for_one",
        max_restarts: int = 3,
        max_seconds: float = 5.0,
        backoff: Backoff | None = None,
        id: str = "supervisor",
    ) -> None:
        if isinstance(children, (str, bytes)) or not isinstance(children, Iterable):
            raise TypeError(f"children must be an iterable of child specs, got {children!r}")
        specs = list(children)
        seen: set[str] = set()
        for spec in specs:
            _check_spec(spec)
            if spec.id in seen:
                raise ValueError(f"duplicate child id {spec.id!r}: ids must be unique within a supervisor")
            seen.add(spec.id)
        check_choice("strategy", strategy, STRATEGIES)
        check_count("max_restarts", max_restarts)
        check_seconds("max_seconds", max_seconds, positive=True, allow_inf=True)
        backoff = check_instance("backoff", backoff, Backoff, allow_none=True) or Backoff()
        self.id = check_id(id)
        self.strategy = strategy
        self.max_restarts = max_restarts
        self.max_seconds = float(max_seconds)
        self.backoff = backoff
        self._specs: list[ChildSpec] = specs
        self._children: list[_Child] = [_Child(s) for s in specs]
        self._streams: weakref.WeakSet[EventStream] = weakref.WeakSet()
        self._active = False
        self._closing = False  # stopping everything: no child may start any more
        self._gave_up: SupervisorGaveUp | None = None
        self._restart_times: collections.deque[float] = collections.deque()
        self._lock: anyio.Lock | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._body: anyio.CancelScope | None = None
        self._changed: anyio.Event | None = None
        self._monitoring = False

    def __repr__(self) -> str:
        return f"Supervisor({self.id!r}, strategy={self.strategy!r}, children={[c.id for c in self._children]!r})"

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Supervisor:
        if self._active:
            raise RuntimeError(f"{self!r} is already running; a supervisor runs once at a time")
        self._active = True
        self._closing = False
        # Afresh on every start (a nested supervisor restarted by its parent, as in OTP).
        self._children = [_Child(s) for s in self._specs]
        self._gave_up = None
        self._restart_times.clear()
        # No checkpoint when free: a restart takes it once, and a yield there costs a turn
        # of the event loop (its fairness is not needed: every holder is bounded).
        self._lock = anyio.Lock(fast_acquire=True)
        self._changed = None
        self._body = anyio.CancelScope()
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        try:
            async with self._lock:
                for child in list(self._children):
                    error = await self._start(child)
                    if error is not None:
                        raise error
        except BaseException:
            await self._close()
            raise
        self._body.__enter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        assert self._body is not None
        # Ours to swallow only when we cancelled the body (giving up); then we raise instead.
        swallowed = self._body.__exit__(exc_type, exc, tb)
        await self._close()
        if self._gave_up is not None and (swallowed or exc_type is None):
            raise self._gave_up
        return swallowed

    async def _close(self) -> None:
        """Stop every child in reverse order (shielded: bounded), end the runners and the
        event streams. Runs in the task that entered, outside any scope of its own, since
        it exits the task group's cancel scope."""
        assert self._lock is not None and self._tg is not None
        self._closing = True
        try:
            with anyio.CancelScope(shield=True):
                async with self._lock:
                    await self._stop_all()
            self._tg.cancel_scope.cancel()  # what is left: runners of stopped children, timers
            await self._tg.__aexit__(None, None, None)
        finally:
            self._active = False
            self._notify()
            for stream in list(self._streams):
                stream.close()

    async def wait(self) -> None:
        """Until no child is left to run (each ended, or was stopped); raises
        ``SupervisorGaveUp`` if the supervisor gave up."""
        while True:
            if self._gave_up is not None:
                raise self._gave_up
            if not self._active or not any(c.state in ("running", "backoff") for c in self._children):
                return
            if self._changed is None:
                self._changed = anyio.Event()
            await self._changed.wait()

    # -- what a user reads -------------------------------------------------------------------

    def status(self) -> list[ChildStatus]:
        """One ``ChildStatus`` per child, in start order."""
        return [ChildStatus(c.id, c.state, c.pid, c.restarts) for c in self._children]

    def events(self, *, buffer: int = EVENT_BUFFER) -> EventStream:
        """Events from now on (``async for event in sup.events()``); see ``EventStream``."""
        check_count("buffer", buffer, minimum=1)
        stream = EventStream(buffer)
        self._streams.add(stream)
        return stream

    # -- dynamic children --------------------------------------------------------------------

    async def start_child(self, spec: ChildSpec) -> None:
        """Add ``spec`` after the others and start it; ``ValueError`` if its id is taken.
        If it cannot start, its error is raised and it is not added."""
        _check_spec(spec)
        async with self._running_lock():
            if any(c.id == spec.id for c in self._children):
                raise ValueError(f"{self!r} already has a child {spec.id!r}")
            child = _Child(spec)
            self._children.append(child)
            error = await self._start(child)
            if error is not None:
                self._children.remove(child)
                raise error

    async def stop_child(self, id: str, *, forget: bool = True) -> None:
        """Stop child ``id`` (not a failure) and forget it; ``KeyError`` if unknown.
        With ``forget=False`` it stays listed, state "stopped", until ``restart_child``."""
        async with self._running_lock():
            child = self._find(id)
            await self._stop(child)
            if forget:
                self._children.remove(child)
            self._notify()

    async def restart_child(self, id: str) -> None:
        """Stop child ``id`` if it runs, and start it again at once (a stopped or ended child
        is started); not counted toward intensity. ``KeyError`` if unknown."""
        async with self._running_lock():
            child = self._find(id)
            await self._stop(child)
            child.restarts += 1
            error = await self._start(child)
            if error is not None:
                child.state = "stopped"
                self._notify()
                raise error

    @contextlib.asynccontextmanager
    async def _running_lock(self) -> AsyncIterator[None]:
        if not self._active or self._lock is None:
            raise RuntimeError(f"{self!r} is not running (use it in 'async with')")
        async with self._lock:
            if not self._active or self._closing or self._gave_up is not None:
                raise RuntimeError(f"{self!r} is no longer running")
            yield

    def _find(self, id: str) -> _Child:
        for child in self._children:
            if child.id == id:
                return child
        raise KeyError(id)

    # -- starting and stopping (under the lock) ----------------------------------------------

    async def _start(self, child: _Child) -> BaseException | None:
        """Start one child and return once it runs; its start error, if any."""
        assert self._tg is not None
        child.leave_plan()
        child.started_at = time.monotonic()
        run = _make_run(child.spec)
        child.run = run
        # Running from now on, for status(): a spawn may wait for the spawning thread, and
        # the child may be running (and seen running by others) before that wait is over.
        child.state = "running"
        await run.launch(self._tg, functools.partial(self._runner, child, run))
        if not run.started:
            child.run = None
            child.state = "stopped"
            return run.start_error or RuntimeError(f"child {child.id!r} ended before it started")
        child.state = "running"
        self._emit("started", child, pid=run.pid)
        if isinstance(child.spec, Command) and child.spec.memory_limit is not None:
            self._ensure_memory_monitor()
        return None

    async def _stop(self, child: _Child) -> None:
        """Stop one child as the supervisor's doing (never a failure); bounded."""
        child.leave_plan()
        run = child.run
        if run is None:
            if child.state == "backoff":
                child.state = "stopped"
            return
        await run.stop()
        child.run = None
        child.state = "stopped"
        self._emit("stopped", child, pid=run.pid, exitcode=run.exitcode)

    async def _stop_all(self) -> None:
        for child in reversed(self._children):
            if child.plan is not None:
                child.plan.cancel()
            await self._stop(child)

    async def _runner(self, child: _Child, run: _Run) -> None:
        from .._isolated.api import worker_started

        # Tasks inherit the context of the task that started them: a Call's hook must not
        # reach a child that happened to be (re)started from a Call's runner.
        worker_started.set(None)
        end: _End | None = None
        try:
            end = await run.main()
        except Exception as exc:  # never into the task group: it would wrap the caller's errors
            if run.started:
                end = _End(True, run.pid, run.exitcode, exc)
            else:
                run.start_error = exc
        finally:
            run.finished()
        if end is not None and not run.stopping:
            async with self._lock_():
                if child.run is run and not run.stopping and not self._closing:
                    await self._handle([(child, end)])

    def _lock_(self) -> anyio.Lock:
        assert self._lock is not None
        return self._lock

    # -- decisions (under the lock) ----------------------------------------------------------

    async def _handle(self, ends: list[tuple[_Child, _End]]) -> None:
        """Judge each end; a restart that fails to start is one more end to judge."""
        while ends and self._gave_up is None:
            child, end = ends.pop(0)
            ends += await self._decide(child, end)

    async def _decide(self, child: _Child, end: _End) -> list[tuple[_Child, _End]]:
        uptime = time.monotonic() - child.started_at
        child.run = None
        self._emit("exited", child, pid=end.pid, exitcode=end.exitcode, error=end.error)
        restart = child.spec.restart
        if restart == "temporary" or (restart == "transient" and not end.failed):
            child.state = "ended"
            self._notify()
            return []
        if self._over_intensity():
            await self._give_up(child, end)
            return []
        child.consecutive = 1 if uptime >= self.backoff.reset_after else child.consecutive + 1
        delay = self.backoff.delay(child.consecutive)
        self._emit("restarting", child, pid=end.pid, exitcode=end.exitcode, error=end.error, delay=delay, restarts=child.restarts + 1)
        group = self._group(child)
        members = [c for c in group if c is child or (c.spec.restart != "temporary" and c.state != "stopped")]
        for other in reversed(group):
            if other is not child:
                await self._stop(other)
        plan = self._plan(members, delay)
        if delay == 0:
            return await self._start_plan(plan)
        assert self._tg is not None
        self._tg.start_soon(self._start_later, plan)
        return []

    def _over_intensity(self) -> bool:
        """Record a restart; True if it would make more than max_restarts in max_seconds."""
        now = time.monotonic()
        while self._restart_times and now - self._restart_times[0] > self.max_seconds:
            self._restart_times.popleft()
        if len(self._restart_times) >= self.max_restarts:
            return True
        self._restart_times.append(now)
        return False

    def _group(self, child: _Child) -> list[_Child]:
        if self.strategy == "one_for_all":
            return list(self._children)
        if self.strategy == "rest_for_one":
            return self._children[self._children.index(child):]
        return [child]

    def _plan(self, members: list[_Child], delay: float) -> _Plan:
        """A plan for ``members``, adopting the children of plans it overlaps."""
        adopted = set(members)
        for member in members:
            old = member.plan
            if old is not None:
                old.cancel()
                adopted.update(old.children)
        ordered = [c for c in self._children if c in adopted]
        plan = _Plan(ordered, delay)
        for child in ordered:
            child.plan = plan
            child.state = "backoff"
        self._notify()
        return plan

    async def _start_plan(self, plan: _Plan) -> list[tuple[_Child, _End]]:
        failures = []
        for child in list(plan.children):
            child.restarts += 1
            error = await self._start(child)
            if error is not None:
                failures.append((child, _End(True, error=error)))
        plan.children.clear()
        return failures

    async def _start_later(self, plan: _Plan) -> None:
        with plan.scope:
            await anyio.sleep(plan.delay)
        if plan.cancelled:
            return
        async with self._lock_():
            if plan.cancelled or self._gave_up is not None or self._closing:
                return
            await self._handle(await self._start_plan(plan))

    async def _give_up(self, child: _Child, end: _End) -> None:
        # A permanent child that ended normally too often has no failure to point to.
        error = end.error if end.failed else None
        last = f"last failure: {_first_line(error)}" if error is not None else f"it last {_describe_end(end)}"
        gave_up = SupervisorGaveUp(
            f"supervisor {self.id!r} gave up: restarting child {child.id!r} would make {self.max_restarts + 1} "
            f"restarts within {self.max_seconds:g} s (max_restarts={self.max_restarts}); {last}",
            child=child.id, pid=end.pid, exitcode=end.exitcode,
        )
        gave_up.__cause__ = error
        child.state = "ended"
        self._emit("gave_up", child, pid=end.pid, exitcode=end.exitcode, error=error)
        await self._stop_all()
        child.state = "ended"
        self._gave_up = gave_up
        if self._body is not None:
            self._body.cancel()
        self._notify()

    # -- memory limits -----------------------------------------------------------------------

    def _ensure_memory_monitor(self) -> None:
        if not self._monitoring:
            assert self._tg is not None
            self._monitoring = True
            self._tg.start_soon(self._memory_monitor, name=f"asyncproc supervisor {self.id!r} memory check")

    async def _memory_monitor(self) -> None:
        try:
            while True:
                await anyio.sleep(MEMORY_CHECK_S)
                limited = [
                    (c, c.run) for c in self._children
                    if c.state == "running" and isinstance(c.run, _CommandRun) and c.run.pid is not None
                    and c.spec.memory_limit is not None  # type: ignore[union-attr]
                ]
                if not limited:
                    return
                pids = [run.pid for _, run in limited if run.pid is not None]
                sizes = await anyio.to_thread.run_sync(_tree_rss, pids)
                for (child, run), rss in zip(limited, sizes):
                    assert isinstance(run, _CommandRun)
                    self._check_memory(child, run, rss)
        finally:
            self._monitoring = False

    def _check_memory(self, child: _Child, run: _CommandRun, rss: int) -> None:
        limit = run.spec.memory_limit
        if limit is None or rss <= limit or child.run is not run or run.stopping or run.memory_error is not None:
            return
        run.memory_error = MemoryLimitExceeded(
            f"command {child.id!r} (pid {run.pid}) went over its memory limit: {rss} bytes resident in its "
            f"process tree, limit {limit}", pid=run.pid, exitcode=None,
        )
        self._emit("memory_exceeded", child, pid=run.pid, error=run.memory_error)
        assert self._tg is not None
        self._tg.start_soon(run.stop_for_memory)

    # -- events ------------------------------------------------------------------------------

    def _notify(self) -> None:
        # Created by a waiter, not here: most changes have nobody waiting for them.
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def _emit(self, kind: str, child: _Child, *, restarts: int | None = None, **fields: Any) -> None:
        event = Event(kind, child.id, time.time(), restarts=child.restarts if restarts is None else restarts, **fields)
        level = _LEVELS[kind]
        if kind == "exited" and event.error is None and not event.exitcode:
            level = logging.INFO
        if log.isEnabledFor(level):
            log.log(level, "supervisor %r: child %r %s", self.id, child.id, _describe(event, self))
        for stream in list(self._streams):
            stream.put(event)
        if kind in ("exited", "stopped", "started"):
            self._notify()


_LEVELS = {
    "started": logging.INFO,
    "stopped": logging.INFO,
    "exited": logging.WARNING,
    "restarting": logging.WARNING,
    "memory_exceeded": logging.WARNING,
    "gave_up": logging.ERROR,
}


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _describe_end(end: _End) -> str:
    return describe_exitcode(end.exitcode) if end.exitcode is not None else "ended"


def _describe(event: Event, sup: Supervisor) -> str:
    pid = f" (pid {event.pid})" if event.pid is not None else ""
    if event.kind == "started":
        return f"started{pid}"
    if event.kind == "stopped":
        code = f", {describe_exitcode(event.exitcode)}" if event.exitcode is not None else ""
        return f"stopped{pid}{code}"
    if event.kind == "exited":
        if event.error is not None and not isinstance(event.error, ChildCrashed):
            return f"failed{pid}: {_first_line(event.error)}"
        if event.exitcode is not None:
            return f"{describe_exitcode(event.exitcode)}{pid}"
        return f"ended{pid}" if event.error is None else f"failed{pid}: {_first_line(event.error)}"
    if event.kind == "restarting":
        return f"restarting in {event.delay:.3g} s (restart {event.restarts})"
    if event.kind == "memory_exceeded":
        return f"went over its memory limit{pid}; stopping it: {event.error}"
    return (f"would be restarted {sup.max_restarts + 1} times within {sup.max_seconds:g} s "
            f"(max_restarts={sup.max_restarts}): giving up, stopping every child")


def _check_spec(spec: object) -> None:
    if not isinstance(spec, (Command, Task, Call, Supervisor)):
        raise TypeError(f"a child spec must be an asyncproc Command, Task, Call or Supervisor, got {spec!r}")


# -- resident memory of process trees ----------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _tree_rss(pids: Sequence[int]) -> list[int]:
    """Resident bytes of each pid's process tree, in one pass. Walks the trees through
    /proc/PID/task/TID/children (cost ~ the trees' size, not the machine's process count);
    psutil where the kernel has no such file."""
    return [sum(_rss(p) for p in _tree(pid)) for pid in pids]


def _tree(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        kids = _children(p)
        if kids is None:  # no CONFIG_PROC_CHILDREN: psutil scans /proc
            from .._proc import proctree as _proctree

            return [pid, *(c.pid for c in _proctree.descendants(pid))]
        todo += kids
    return found


_HAS_CHILDREN_FILE = os.path.exists(f"/proc/self/task/{os.getpid()}/children")


def _children(pid: int) -> list[int] | None:
    if not _HAS_CHILDREN_FILE:
        return None
    try:
        # A child is listed under the thread that forked it. procfs counts the threads in
        # the link count of the task folder (2 + threads): a single-threaded process, the
        # usual case, needs no listing.
        if os.stat(f"/proc/{pid}/task").st_nlink <= 3:
            tids: list[str] | list[int] = [pid]
        else:
            tids = os.listdir(f"/proc/{pid}/task")
    except OSError:  # it exited meanwhile
        return []
    kids: list[int] = []
    for tid in tids:
        kids += map(int, _read(f"/proc/{pid}/task/{tid}/children").split())
    return kids


def _read(path: str) -> bytes:
    """A small /proc file, raw (no text layer: this runs for every limited tree each second)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        return os.read(fd, 65536)
    except OSError:
        return b""
    finally:
        os.close(fd)


def _rss(pid: int) -> int:
    fields = _read(f"/proc/{pid}/statm").split()
    return int(fields[1]) * _PAGE if len(fields) > 1 else 0
