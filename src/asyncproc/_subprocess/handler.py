"""Subprocess handlers: torch.distributed.elastic's ``SubprocessHandler``, async.

How a child is started and awaited -- the same code on asyncio, uvloop and trio:

* ``subprocess.Popen(..., start_new_session=True)`` is called synchronously on asyncproc's
  one long-lived spawning thread (``spawner``), never on the event loop's thread. It takes
  CPython's vfork path (no ``preexec_fn``), about 1 ms whatever the parent weighs. We do
  *not* go through ``anyio.open_process``: on uvloop it spawns through libuv, which always
  forks (40 ms per spawn at 1 GB resident), and on trio it runs Popen on a short-lived
  worker thread. See benchmarks/bench_spawn.py for the numbers. A NUMA binding set on the
  spawning thread around the one spawn is inherited by the child from its first instruction.
* Where asyncproc may create cgroups (``_proc.cgroup``), the child is moved into a cgroup of its
  own right after the spawn: ending the tree is then ``cgroup.kill``, which reaches a
  descendant that double-forked and called ``setsid()``, and finding the tree reads
  ``cgroup.procs`` instead of scanning /proc. Elsewhere the tree is the process group plus a
  /proc scan, made on a worker thread so the event loop never waits for it.
* Exit is awaited on a pidfd with ``anyio.wait_readable`` (an event, never a sleep loop) and
  the child is reaped with ``waitpid(WNOHANG)``; we set ``popen.returncode`` ourselves so
  Popen never reaps it a second time. Kernels without pidfd (< 5.3) wait in a worker thread
  with ``waitid(WNOWAIT)``, which does not reap, so reaping stays in one place.

Those two functions, ``_popen`` and ``_until_exited``, are the only places that touch the
OS process API; no backend-specific code exists anywhere else.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import signal
import subprocess
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import IO, Any, TypeVar, Union

import anyio
import psutil
from anyio.lowlevel import RunVar

from .._proc import cgroup as _cgroup
from .._proc import proctree as _proctree
from .._proc.procfs import read_stat
from .._validate import check_args, check_count, check_env, check_path, check_redirect, check_seconds, check_signal
from . import guardian as _guardian
from . import spawner as _spawner

__all__ = ["SubprocessHandler", "get_subprocess_handler", "DEFAULT_GRACE_S", "KILL_BOUND_S"]

log = logging.getLogger("asyncproc")

DEFAULT_GRACE_S = 5.0  # SIGTERM -> SIGKILL, as trio.run_process
KILL_BOUND_S = _proctree.KILL_BOUND_S  # after SIGKILL; only a process in uninterruptible sleep takes longer

StrPath = Union[str, "os.PathLike[str]"]
# A file path (truncated), None/"" to inherit, or -- for callers that pipe -- an open fd.
Redirect = Union[StrPath, int, None]
_T = TypeVar("_T")
_Table = dict[int, Any]  # pid -> _proc.procfs.Stat


class SubprocessHandler:
    """One child process: its own session and process group, its log files, its reaping.

    Constructed unstarted; ``await spawn()`` (or ``async with``) starts it. The command is
    ``(entrypoint, *map(str, args))``; its environment is ``os.environ`` overlaid by ``env``
    (None removes a variable); ``stdout``/``stderr`` are file paths (truncated), None or
    ``""`` to inherit, or an open file descriptor. Arguments are checked here:
    ``TypeError``/``ValueError`` naming the argument. The child dies with this process,
    however it dies (a guardian process kills it).
    """

    def __init__(
        self,
        entrypoint: StrPath,
        args: Sequence[object],
        env: Mapping[str, str | None] | None,
        stdout: Redirect,
        stderr: Redirect,
        local_rank_id: int,
        numa_options: Any = None,
        *,
        local_world_size: int | None = None,
        cwd: StrPath | None = None,
    ) -> None:
        # Checked here, not at spawn: the error then points at the line that made the handler.
        check_path("entrypoint", entrypoint)
        args = check_args("args", args, numbers=True)
        check_env("env", env)
        check_redirect("stdout", stdout)
        check_redirect("stderr", stderr)
        check_count("local_rank_id", local_rank_id)
        check_count("local_world_size", local_world_size, minimum=1, allow_none=True)
        self.args: tuple[str, ...] = (os.fspath(entrypoint), *map(str, args))
        self.env = _merged_env(env)
        self.local_rank_id = local_rank_id
        self.numa_options = _numa_options(numa_options)
        self.local_world_size = local_world_size
        self.cwd = cwd
        self._stdout_target = stdout
        self._stderr_target = stderr
        self._stdout: IO[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._pidfd: int | None = None
        self._pidfd_closer: weakref.finalize[Any, SubprocessHandler] | None = None
        self._wait_lock: anyio.Lock | None = None
        self._cgroup: str | None = None  # this child's own cgroup, while it has one
        self._cgroup_closer: weakref.finalize[Any, SubprocessHandler] | None = None
        self._starttime = 0  # of the child, in clock ticks after boot: with the pid, unique

    # -- what a user reads --------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The child's pid; None until spawned."""
        return self.proc.pid if self.proc is not None else None

    @property
    def returncode(self) -> int | None:
        """None while running; the exit code, negative when a signal killed it."""
        return self.proc.returncode if self.proc is not None else None

    def __repr__(self) -> str:
        state = "not started" if self.proc is None else f"pid={self.pid} returncode={self.returncode}"
        return f"<SubprocessHandler rank={self.local_rank_id} {self.args[0]!r} {state}>"

    # -- lifecycle ------------------------------------------------------------------------

    async def spawn(self) -> None:
        """Start the child; ``FileNotFoundError`` if the entrypoint is missing."""
        if self.proc is not None:
            raise RuntimeError(f"{self!r} was already spawned; a handler runs one process")
        self._wait_lock = anyio.Lock()
        await _spawner.run(self._spawn_here)

    def _spawn_here(self) -> None:
        """The spawn itself, on the spawning thread (see the module's docstring)."""
        # Everything slow comes first (the cgroup probe, which may clean up a SIGKILLed
        # process's cgroups; the guardian's start): after Popen, only what must follow it,
        # so spawn() returns before the child can have done much (said anything, say).
        leaf = _HANDLERS.new_leaf(f"h{next(_LEAF_NAMES)}")
        # Everything that can fail from here to Popen is in the try: a failure must remove
        # the cgroup just made (no child will ever be in it, so nothing else would).
        try:
            self._stdout = _open_log(self._stdout_target)
            self._stderr = _open_log(self._stderr_target)
            env = self.env if leaf is not None else {**self.env, **_marker()}
            with self._numa_binding():
                self.proc = _popen(self.args, env, self._redirect(self._stdout, self._stdout_target),
                                   self._redirect(self._stderr, self._stderr_target), self.cwd)
        except BaseException:
            self._close_logs()
            if leaf is not None:
                _HANDLERS.drop_leaf(leaf)
            raise
        self._cgroup = _contain(leaf, self.proc.pid) if leaf is not None else None
        if self._cgroup is not None:  # dropped with its cgroup still there: removed later
            self._cgroup_closer = weakref.finalize(self, _HANDLERS.abandon, self._cgroup)
            self._cgroup_closer.atexit = False  # at exit, the whole cgroup goes anyway
        stat = read_stat(self.proc.pid)
        self._starttime = stat.starttime if stat is not None else 0
        _guardian.register(self.proc.pid)
        self._pidfd = _proctree.pidfd_open(self.proc.pid)
        if self._pidfd is not None:
            # A dropped handler must not leak its pidfd; calling the finalizer closes it
            # exactly once, so a later close never hits a recycled fd number.
            self._pidfd_closer = weakref.finalize(self, os.close, self._pidfd)

    async def wait(self) -> int:
        """Wait for the child to exit, reap it, and return its exit code."""
        proc = self._started()
        assert self._wait_lock is not None
        # One waiter at a time on the pidfd (two tasks may not wait on one fd); the others
        # queue here and find the returncode set when they get in.
        async with self._wait_lock:
            while proc.returncode is None:
                await _until_exited(proc.pid, self._pidfd)
                self._try_reap()
            self._release()  # also when the user reaped it with ``proc.wait()``
        return proc.returncode

    async def kill(self, sig: int = signal.SIGTERM, grace: float = DEFAULT_GRACE_S) -> int | None:
        """Signal the whole tree, SIGKILL what is left after ``grace`` seconds, reap.

        The tree is the child's process group plus every descendant found *before*
        signalling (one that called ``setsid()`` left the group, and once its parent dies
        it can no longer be found). Returns the exit code; None only if the child outlived
        SIGKILL by ``KILL_BOUND_S`` (uninterruptible sleep), which is logged.
        """
        check_signal("sig", sig)
        check_seconds("grace", grace)
        self._started()
        tree = await _off_loop(self._snapshot_and_signal, sig, await self._table())
        try:
            left = await self._wait_gone(tree, grace)
        except BaseException:
            # Cancelled during the grace: stopping waiting must not leave the child running.
            with anyio.CancelScope(shield=True):
                await self._kill_now(await _off_loop(self._left, tree, await self._table()))
            raise
        # The leader may be gone while members of its group live on (a SIGTERM-ignoring
        # background child): anything still there after the grace gets SIGKILL.
        if left or self.returncode is None:
            await self._kill_now(left)
        self._drop_cgroup()
        return self.returncode

    async def _kill_now(self, tree: list[psutil.Process]) -> None:
        """SIGKILL the group and ``tree``, then reap; shielded, as it is bounded."""
        tree = await _off_loop(self._sigkill, tree)
        with anyio.CancelScope(shield=True):
            left = await self._wait_gone(tree, KILL_BOUND_S)
        if left or self.returncode is None:
            log.warning(
                "%r: %d process(es) still alive %.1f s after SIGKILL (uninterruptible sleep?): %s",
                self, len(left) + (self.returncode is None), KILL_BOUND_S, [p.pid for p in left],
            )

    def signal_tree(self, sig: int) -> None:
        """Send ``sig`` to the group and the tree now, without waiting (a ``kill`` in
        progress sees the effect); used by the launcher's second SIGINT."""
        self._started()
        self._signal(sig, self._snapshot())

    def close(self, death_sig: int | None = None) -> None:
        """Torch's ``close``: signal the process group (SIGTERM by default), close the log
        files. Synchronous and non-blocking; reaps the child if it has already exited."""
        check_signal("death_sig", death_sig, allow_none=True)
        if self.proc is not None:
            self._signal(death_sig or signal.SIGTERM, [])
            assert self._wait_lock is not None
            # A task blocked in wait() owns the pidfd and will reap; never close it under it.
            if not self._wait_lock.locked():
                self._try_reap()
            self._drop_cgroup()
            if self._cgroup is not None:  # something still runs in it (or we were signalled)
                _HANDLERS.abandon(self._cgroup)
        self._close_logs()

    async def __aenter__(self) -> SubprocessHandler:
        await self.spawn()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # On any exit, cancellation included: the clean-up is bounded, so shielding is safe.
        with anyio.CancelScope(shield=True):
            try:
                await self.kill()
            finally:
                self.close()

    # -- internals --------------------------------------------------------------------------

    def _started(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise RuntimeError(f"{self!r}: call `await handler.spawn()` first")
        return self.proc

    @contextlib.contextmanager
    def _numa_binding(self) -> Iterator[None]:
        """Bind the spawning thread (so the child inherits it before exec) when asked."""
        if self.numa_options is None:
            yield
            return
        from .. import numa  # lazily: the NUMA module is optional for everything else

        binding = numa.binding_for(self.numa_options, self.local_rank_id, self.local_world_size)
        if binding is None:
            yield
            return
        with binding.on_this_thread():
            yield

    @staticmethod
    def _redirect(opened: IO[bytes] | None, target: Redirect) -> int | IO[bytes] | None:
        return target if isinstance(target, int) else opened

    def _try_reap(self) -> None:
        """Reap without blocking; on success close the pidfd and release the guardian."""
        proc = self._started()
        if proc.returncode is not None:  # reaped already, perhaps by ``proc.wait()``
            self._release()
            return
        try:
            pid, status = os.waitpid(proc.pid, os.WNOHANG)
        except ChildProcessError:
            # Someone else (a waitpid(-1) SIGCHLD handler) reaped it: the code is lost.
            log.warning("%r was reaped by someone else; its exit code is unknown (255)", self)
            pid, status = proc.pid, 255 << 8
        if pid != proc.pid:
            return
        proc.returncode = _proctree.exitcode_of(status)
        self._release()

    def _release(self) -> None:
        """Once reaped: close our pidfd; the guardian has nothing of ours to kill."""
        if self._pidfd_closer is not None:
            self._pidfd_closer()
        self._pidfd = self._pidfd_closer = None
        _guardian.unregister(self._started().pid)
        self._drop_cgroup()

    def _drop_cgroup(self) -> None:
        """Remove our cgroup once nothing runs in it; while something does, it stays (and
        the guardian, or our exit, kills it)."""
        if self._cgroup is not None and _HANDLERS.drop_leaf(self._cgroup):
            self._cgroup = None
            if self._cgroup_closer is not None:
                self._cgroup_closer.detach()

    async def _table(self) -> _Table | None:
        """The /proc table the fallback needs (None with a cgroup), shared with every
        handler of this event loop that asks at the same time."""
        if self._cgroup is not None or self._nothing_to_find():
            return None
        return await _per_loop(_SCANNER, _Scanner).table()

    def _nothing_to_find(self) -> bool:
        """Reaped, and its group is empty or no longer ours: no scan can find anything."""
        pid = self._started().pid
        return self.returncode is not None and (self._own_group() is None or not _group_exists(pid))

    def _snapshot_and_signal(self, sig: int, table: _Table | None) -> list[psutil.Process]:
        tree = self._snapshot(table)
        self._signal(sig, tree)
        return tree

    def _sigkill(self, tree: list[psutil.Process]) -> list[psutil.Process]:
        """SIGKILL, and what to wait for: with a cgroup, ``cgroup.kill`` also hit what was
        forked since ``tree`` was taken, so those are read and awaited too."""
        self._signal(signal.SIGKILL, tree)
        return _unique([*tree, *self._snapshot()]) if self._cgroup is not None else tree

    def _own_group(self) -> int | None:
        """Our process group id if it is safe to signal it, else None.

        Until we reap the leader its pid cannot be reused, so the group is ours. After
        that, the group id stays reserved while members live; if no process now has our
        pid, a group with that id can only be our leftovers.
        """
        pid = self._started().pid
        if self.returncode is None or read_stat(pid) is None:
            return pid
        return None

    def _snapshot(self, table: _Table | None = None) -> list[psutil.Process]:
        """Processes to end besides the group: the descendants, plus, once the leader has
        exited (zombie or reaped), the members its group and session left behind."""
        pid = self._started().pid
        if self._cgroup is not None:
            return _cgroup_members(self._cgroup, pid)
        if self._nothing_to_find():
            return []
        # A zombie or reaped leader has no children left: its group's and session's
        # members were re-parented, and are found by their group and session ids.
        return _proctree.family_of(pid, self._starttime, table or _proctree.shared_scan())

    def _left(self, tree: list[psutil.Process], table: _Table | None = None) -> list[psutil.Process]:
        """What is still alive: of ``tree``, and of a fresh snapshot (unique by pid)."""
        living = {p.pid: p for p in tree if _is_alive(p)}
        for proc in self._snapshot(table):
            living.setdefault(proc.pid, proc)
        return list(living.values())

    def _signal(self, sig: int, tree: list[psutil.Process]) -> None:
        _proctree.signal_tree(self._own_group(), tree, sig)
        if sig == signal.SIGKILL and self._cgroup is not None:
            _cgroup.kill(self._cgroup)

    async def _wait_gone(self, tree: list[psutil.Process], timeout: float) -> list[psutil.Process]:
        """Wait up to ``timeout`` for the child (reaped) and ``tree`` to end; what is left
        (recomputed: once the leader is reaped, its group's leftovers are found by scan)."""
        fds = await _off_loop(_pidfds, tree)
        try:
            with anyio.move_on_after(timeout):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self.wait)
                    for fd in fds:
                        tg.start_soon(_until_readable, fd)
            # Only now: a process's children are re-parented when it exits, so once the
            # whole tree has exited every orphan has reached its final parent.
            _proctree.Adopted.reap_pidfds(fds)
        finally:
            for fd in fds:
                os.close(fd)
        return await _off_loop(self._left, tree, await self._table())

    def _close_logs(self) -> None:
        for f in (self._stdout, self._stderr):
            if f is not None:
                f.close()
        self._stdout = self._stderr = None


def get_subprocess_handler(
    entrypoint: StrPath,
    args: Sequence[object],
    env: Mapping[str, str | None] | None,
    stdout: Redirect,
    stderr: Redirect,
    local_rank_id: int,
    numa_options: Any = None,
    local_world_size: int | None = None,
) -> SubprocessHandler:
    """Torch's factory: an unstarted ``SubprocessHandler``. ``numa_options`` may be torch's
    own; ``local_world_size`` tells the NUMA binding how many local ranks share the node."""
    return SubprocessHandler(
        entrypoint, args, env, stdout, stderr, local_rank_id, numa_options, local_world_size=local_world_size
    )


def _numa_options(options: Any) -> Any:
    """Ours, or torch's NumaOptions converted (a bad value raises here, before spawn)."""
    if options is None:
        return None
    from .. import numa  # lazily: the NUMA module is optional for everything else

    return numa.as_numa_options(options, "numa_options")


def _merged_env(env: Mapping[str, str | None] | None) -> dict[str, str]:
    """``os.environ`` overlaid by ``env`` (checked by ``check_env``): None removes a variable."""
    merged = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


def _open_log(target: Redirect) -> IO[bytes] | None:
    """Open a log path for writing (truncated); None for inherit or a caller's fd."""
    if target is None or isinstance(target, int) or os.fspath(target) == "":
        return None
    return open(target, "wb")


class _HandlersCgroup:
    """This process's cgroup holding its handlers' cgroups: made with the first, registered
    with the guardian (which kills and removes it, all our handlers' trees, if we die), and
    removed with the last, so none is left between uses or after us.

    A handler closed or dropped while something still ran in its cgroup *abandons* it: it
    is removed later, at the next spawn or removal, once empty.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()  # the spawning thread adds, the loop's thread removes
        self.owner = 0
        self.path: str | None = None
        self.live: set[str] = set()
        self.abandoned: set[str] = set()

    def new_leaf(self, name: str) -> str | None:
        with self.lock:
            if self.owner != os.getpid():  # a forked child: the cgroup is its parent's
                self.owner, self.path, self.live, self.abandoned = os.getpid(), None, set(), set()
            self._sweep()
            if self.path is None and _cgroup.available():
                self.path = _cgroup.create("handlers")
                if self.path is not None:
                    _guardian.register_cgroup(self.path)
            leaf = _cgroup.create(name, parent=self.path) if self.path is not None else None
            if leaf is not None:
                self.live.add(leaf)
            return leaf

    def drop_leaf(self, leaf: str) -> bool:
        """Remove an empty handler's cgroup (False while something runs in it), and ours
        with the last."""
        with self.lock:
            if self.owner != os.getpid() or not _cgroup.remove(leaf):
                return False
            self.live.discard(leaf)
            self.abandoned.discard(leaf)
            self._sweep()
            return True

    def abandon(self, leaf: str) -> None:
        with self.lock:
            if leaf in self.live:
                self.abandoned.add(leaf)
                self._sweep()

    def _sweep(self) -> None:
        for leaf in list(self.abandoned):
            if _cgroup.remove(leaf):
                self.live.discard(leaf)
                self.abandoned.discard(leaf)
        if not self.live and self.path is not None:
            with contextlib.suppress(OSError):  # EBUSY: never recursive, only if it holds nothing
                os.rmdir(self.path)
                _guardian.unregister_cgroup(self.path)
                self.path = None

    def end_at_exit(self) -> None:
        """As the guardian would: what our handlers left running dies with us."""
        if self.owner == os.getpid() and self.path is not None:
            _cgroup.kill(self.path)
            _cgroup.wait_empty(self.path, KILL_BOUND_S)
            _cgroup.remove(self.path)


_HANDLERS = _HandlersCgroup()
atexit.register(_HANDLERS.end_at_exit)
_marker_lock = threading.Lock()


MARKER_VAR = "ASYNCPROC_GUARDED"
_markers: dict[int, dict[str, str]] = {}  # our pid -> the entry (a forked child has its own)


def _marker() -> dict[str, str]:
    """Where there are no cgroups: an environment entry naming this process (pid and start
    time), given to every child and inherited by what it starts. The guardian kills every
    process that carries it when we die: a double-forked ``setsid()`` helper too, unless it
    cleared its environment."""
    pid = os.getpid()
    with _marker_lock:
        if pid not in _markers:
            stat = read_stat(pid)
            _markers.clear()
            _markers[pid] = {MARKER_VAR: f"{pid}-{stat.starttime if stat is not None else 0}"}
            _guardian.register_marker(f"{MARKER_VAR}={_markers[pid][MARKER_VAR]}")
        return _markers[pid]


_LEAF_NAMES = itertools.count()


def _contain(path: str, pid: int) -> str | None:
    """Move our new child ``pid`` into cgroup ``path``, with what it already started (it
    has exec'd: it may have forked before we got here); None if the kernel refused.
    """
    try:
        _cgroup.attach(path, pid)
    except OSError:  # refused (or gone already): the scans will do, as without cgroups
        _HANDLERS.drop_leaf(path)
        return None
    pending = _proctree.children_of(pid)
    while pending:
        current = pending.pop()
        with contextlib.suppress(OSError):  # it exited meanwhile
            _cgroup.attach(path, current)
        pending += _proctree.children_of(current)
    return path


def _cgroup_members(path: str, leader: int) -> list[psutil.Process]:
    """The living processes in cgroup ``path`` (and below: a child of ours that runs
    asyncproc nests its own) but the leader; read, never scanned."""
    found = []
    for folder, _, _ in os.walk(path):
        try:
            pids = _cgroup.procs(folder)
        except OSError:  # ENODEV: removed while we read it
            continue
        for pid in pids:
            if pid != leader:
                with contextlib.suppress(psutil.Error):
                    found.append(psutil.Process(pid))
    return found


async def _off_loop(fn: Callable[..., _T], *args: Any) -> _T:
    """``fn(*args)`` on a worker thread: what a kill does per process (a read of /proc or of
    a cgroup, a pidfd, a signal) is cheap, but 300 kills started at once run theirs in one
    turn of the loop, which held it 150 ms; a /proc scan alone takes tens of milliseconds
    with hundreds of processes. Shielded: it is bounded, and its result (pidfds) must not be
    lost to a cancellation."""
    with anyio.CancelScope(shield=True):
        result = await anyio.to_thread.run_sync(fn, *args, limiter=_limiter())
    return result


class _Round:
    def __init__(self) -> None:
        self.done = anyio.Event()
        self.table: _Table | None = None


class _Scanner:
    """One /proc scan for every handler of an event loop that needs one at the same time:
    300 handlers stopping at once cost two scans (each tens of milliseconds), not 600.

    A caller joins the round that has not started yet, or opens it and leads it: waits for
    the round in progress (taken maybe before the caller's processes changed), then scans.
    """

    def __init__(self) -> None:
        self._next: _Round | None = None
        self._running: _Round | None = None

    async def table(self) -> _Table:
        if self._next is not None:
            joined = self._next
            await joined.done.wait()
            return joined.table if joined.table is not None else await _off_loop(_proctree.shared_scan)
        led = self._next = _Round()
        table: _Table = {}
        with anyio.CancelScope(shield=True):  # followers wait on us: bounded, never abandoned
            try:
                if self._running is not None:
                    await self._running.done.wait()
                self._next, self._running = None, led
                table = await _off_loop(_proctree.shared_scan)
                led.table = table
            finally:
                if self._next is led:
                    self._next = None
                if self._running is led:
                    self._running = None
                led.done.set()
        return table


_SCANNER: RunVar[_Scanner] = RunVar("asyncproc_scanner")
_LIMITER: RunVar[anyio.CapacityLimiter] = RunVar("asyncproc_handler_threads")
_THREADS = 4  # more only adds contention for the GIL, which the loop thread needs too


def _limiter() -> anyio.CapacityLimiter:
    return _per_loop(_LIMITER, lambda: anyio.CapacityLimiter(_THREADS))


def _per_loop(var: RunVar[_T], make: Callable[[], _T]) -> _T:
    """``var``'s value in this event loop, made on first use."""
    try:
        return var.get()
    except LookupError:
        value = make()
        var.set(value)
        return value


def _unique(procs: list[psutil.Process]) -> list[psutil.Process]:
    return list({proc.pid: proc for proc in procs}.values())


def _popen(args: tuple[str, ...], env: dict[str, str], stdout: Any, stderr: Any, cwd: StrPath | None = None) -> subprocess.Popen[bytes]:
    """Start the child on this thread, through CPython's vfork path (no preexec_fn)."""
    return subprocess.Popen(args, env=env, stdout=stdout, stderr=stderr, start_new_session=True, cwd=cwd)


async def _until_exited(pid: int, pidfd: int | None) -> None:
    """Return once our child ``pid`` has exited (not reaped: the caller reaps)."""
    await _proctree.wait_exit(pid, pidfd)


def _pidfds(procs: list[psutil.Process]) -> list[int]:
    """pidfds of the processes of a snapshot that are still those processes."""
    return list(_proctree.pidfds_of(procs)[0])


def _is_alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _group_exists(pgid: int) -> bool:
    """Whether process group ``pgid`` has a member; cheap, so most exits skip the scan.
    (A session member that left the group is then not looked for: it was in the
    descendant snapshot taken while the leader lived.)"""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _until_readable(fd: int) -> None:
    await anyio.wait_readable(fd)


# Shown, pickled and documented under the name users import it by (asyncproc.X).
SubprocessHandler.__module__ = get_subprocess_handler.__module__ = "asyncproc"
