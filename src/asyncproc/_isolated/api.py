"""Isolated calls: ``safe_call``, ``Isolated``, ``safe_call_sync``.

A call is one fresh process that no other call touches. The caller waits on one data
socket: the answer, or end-of-stream when the worker is gone (see ``server`` for why
end-of-stream means "gone and cleaned up"). Timeouts and cancellation end the worker's
whole tree with SIGTERM, ``grace``, SIGKILL, each wait bounded, before the caller sees the
outcome.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import itertools
import logging
import math
import os
import pickle
import signal
import socket
import sys
import threading
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import psutil

from .._exceptions import AsyncprocError, ChildCrashed, MemoryLimitExceeded, RemoteError
from .._proc import cgroup as _cgroup
from .._proc import proctree as _proctree
from .._validate import check_choice, check_count, check_instance, check_seconds
from . import protocol as _protocol
from . import server as _server
from . import worker as _worker
from .link import link

if TYPE_CHECKING:
    from ..numa import Binding, NumaOptions

__all__ = ["Isolated", "preload", "safe_call", "safe_call_sync", "START_METHODS"]

log = logging.getLogger("asyncproc")

T = TypeVar("T")

START_METHODS = ("forkserver", "fork", "spawn")
# After SIGKILL a process normally vanishes in microseconds; one in uninterruptible
# sleep may take forever, and we will not hang with it.
_KILL_BOUND_S = 2.0
# After answering, a worker only flushes and ends what it started (itself bounded); the
# wait for that is also bounded by the call's own timeout.
_EXIT_BOUND_S = 5.0


@dataclass
class _Exit:
    pid: int | None
    exitcode: int | None
    fault_log: str = ""
    note: str = ""  # when the status is unknown: why
    never_started: bool = False  # the fork server died before any worker got the call


# Set by a supervisor's Call child, in its own task: told the worker once the call has one
# (the supervisor reads the worker's pid from it for ChildStatus and its events).
worker_started: contextvars.ContextVar[Callable[[_Worker], None] | None] = contextvars.ContextVar(
    "asyncproc_worker_started", default=None
)


class _ServerLost(AsyncprocError):
    """The fork server died before our call reached a worker: it never ran; retry it."""

    def __init__(self) -> None:
        super().__init__("the asyncproc fork server died before the call reached a worker (its stderr may say why)")


# -- worker handles: one per start method, same four operations ---------------------------

# The caller's ends of every call in flight. A forked child of the caller (ours or the
# user's) closes its copies: the server takes end-of-stream on a call's ctl to mean "the
# caller is done", which a copy in some child would postpone.
_IN_FLIGHT: weakref.WeakSet[socket.socket] = weakref.WeakSet()


def _close_in_flight_copies() -> None:
    for sock in list(_IN_FLIGHT):
        sock.close()


os.register_at_fork(after_in_child=_close_in_flight_copies)


async def _recv(sock: socket.socket) -> _protocol.Message | None:
    """The next message on a non-blocking socket; None at end-of-stream."""
    while True:
        try:
            return _protocol.recv(sock)
        except BlockingIOError:
            await anyio.wait_readable(sock)
        except ConnectionResetError:
            return None


class _Worker:
    """The caller's grip on one worker."""

    pid: int | None = None

    def __init__(self, data: socket.socket):
        data.setblocking(False)
        self.data = data
        self.ended = False  # end-of-stream seen on data
        _IN_FLIGHT.add(data)

    async def next_message(self) -> _protocol.Message | None:
        """The worker's next message, or None at end-of-stream (it is gone)."""
        msg = await _recv(self.data)
        self.ended = msg is None
        return msg

    async def wait_gone(self) -> None:
        """Until the worker and its tree are gone (the caller bounds the wait)."""
        while await self.next_message() is not None:
            pass

    def signal(self, sig: int) -> None:
        raise NotImplementedError

    async def exit_status(self) -> _Exit:
        """After end-of-stream: how it ended. Everything it started is gone by now."""
        raise NotImplementedError

    def release(self) -> None:
        """The answer is in; let the worker finish on its own."""
        self.close()

    def close(self) -> None:
        self.data.close()


class _ServerWorker(_Worker):
    """A worker forked by the fork server, which reaps it and reports on ``ctl``.

    Once the server has told us the worker's cgroup (HELLO), we can end and watch the
    worker's tree ourselves: a stopped, busy or dead server then delays nothing."""

    def __init__(self, data: socket.socket, ctl: socket.socket, cgroup_root: str | None):
        super().__init__(data)
        ctl.setblocking(False)
        self.ctl = ctl
        self.cgroup_root = cgroup_root
        self.cgroup: str | None = None
        self.exited: _protocol.Message | None = None
        self.server_gone = False  # end-of-stream on ctl
        _IN_FLIGHT.add(ctl)

    def _on_ctl(self, msg: _protocol.Message | None) -> None:
        if msg is None:
            self.server_gone = True
        elif msg.tag == _protocol.HELLO:
            pid, _, leaf = bytes(msg.body).decode().partition(" ")
            self.pid = int(pid)
            if leaf and self.cgroup_root is not None:
                self.cgroup = os.path.join(self.cgroup_root, leaf)
        elif msg.tag == _protocol.EXITED:
            self.exited = msg

    def _read_ctl_now(self) -> None:
        """What the server has sent so far, without waiting."""
        while self.exited is None and not self.server_gone:
            try:
                msg = _protocol.recv(self.ctl)
            except BlockingIOError:
                return
            except OSError:
                msg = None
            self._on_ctl(msg)

    def signal(self, sig: int) -> None:
        try:
            _protocol.send(self.ctl, _protocol.TERM if sig == signal.SIGTERM else _protocol.KILL)
        except OSError:
            pass  # the server already closed: the worker is gone
        # Ourselves too, through its cgroup: a stopped or busy server would take its time.
        self._read_ctl_now()
        if self.cgroup is not None and self.exited is None:
            if sig == signal.SIGKILL:
                _cgroup.kill(self.cgroup)
            else:
                _cgroup.signal(self.cgroup, sig)

    async def wait_gone(self) -> None:
        """End-of-stream on data: the server saw the tree end and reaped it. Or, when the
        server is stopped (SIGSTOP: it would reap nothing until resumed), the worker's
        cgroup found empty: nothing of the call runs any more."""
        self._read_ctl_now()
        if self.cgroup is None or self.ended:
            await super().wait_gone()
            return
        cgroup = self.cgroup

        async def until_empty_with_server_stopped() -> None:
            await _cgroup.wait_empty_async(cgroup, math.inf)
            while not link.server_stopped():  # running: its report is on its way
                await anyio.sleep(0.05)  # a rare state to leave (SIGSTOP): a slow check is fine

        async with anyio.create_task_group() as tg:

            async def first(wait: Callable[[], Awaitable[object]]) -> None:
                await wait()
                tg.cancel_scope.cancel()

            tg.start_soon(first, super().wait_gone)
            tg.start_soon(first, until_empty_with_server_stopped)

    async def exit_status(self) -> _Exit:
        if self.ended:  # the server queued EXITED before ending the stream, or died
            with anyio.move_on_after(_KILL_BOUND_S):
                while self.exited is None and not self.server_gone:
                    self._on_ctl(await _recv(self.ctl))
        else:  # gone by its cgroup: the server's report may still be on its way
            self._read_ctl_now()
        self.close()
        exited = self.exited
        if exited is None:
            if self.pid is None:
                return _Exit(None, None, never_started=True)
            if not self.server_gone:
                return _Exit(self.pid, None, note=f"the asyncproc fork server did not report on worker {self.pid} in time")
            await self._end_orphaned_tree()
            return _Exit(self.pid, None, note=f"the asyncproc fork server died while worker {self.pid} served this call")
        head, _, fault = bytes(exited.body).partition(b"\n")
        pid, code, *flags = head.split()
        if b"unstarted" in flags:  # the worker died before reading the call: it never ran
            return _Exit(None, None, never_started=True)
        return _Exit(int(pid), int(code), fault.decode(errors="replace"))

    async def _end_orphaned_tree(self) -> None:
        """The server died (SIGKILL) while our worker ran: the worker died with it, but what
        it started lives on, orphaned. With its cgroup, all of it ends at once; without,
        its process group (setsid escapees are out of reach: see the README)."""
        assert self.pid is not None
        if self.cgroup is not None:
            members = _cgroup.procs(self.cgroup)
            _cgroup.kill(self.cgroup)
            await _cgroup.wait_empty_async(self.cgroup, _KILL_BOUND_S)
            _proctree.reap_each(members)  # re-parented to us if we are a subreaper
        else:
            # The group id stays reserved while any member lives, so these are the
            # worker's group (or, with the group empty, nothing).
            group = _proctree.group_members(self.pid)
            _proctree.signal_tree(None, group, signal.SIGKILL)
            with anyio.move_on_after(_KILL_BOUND_S):
                await _proctree.reap_adopted(self.pid, group)
        link.check_server()  # reap the dead server, remove its cgroups

    def release(self) -> None:
        # Refill the reserve only now, and only after a value: a request sent while the call
        # runs would wake the server (and its fork) on the CPU the worker needs, and after
        # any other outcome the server may be the trouble (the next call asks for itself).
        try:
            link.top_up()
        except Exception as exc:  # refilling the reserve must never fail a call
            log.debug("asyncproc: could not refill the worker reserve: %r", exc)
        # Closing ctl tells the server the caller is done: it ends whatever is left. After
        # the refill: the server then wakes once for both.
        self.close()

    def close(self) -> None:
        self.data.close()
        self.ctl.close()


class _OwnWorker(_Worker):
    """A worker that is our own child ("fork" and "spawn"): we signal and reap it."""

    pid: int  # always known: we forked or spawned it ourselves

    def __init__(self, data: socket.socket, pid: int, fault_fd: int, cgroup: str | None, guarded: bool):
        super().__init__(data)
        self.pid = pid
        self.fault_fd = fault_fd
        self.pidfd = _proctree.pidfd_open(pid)
        self.cgroup = cgroup
        self.guarded = guarded  # registered with the guardian: unregister once reaped
        self.reaped = False
        self.tree: list[psutil.Process] = []  # every descendant seen while signalling
        self.members: set[int] = set()  # every pid seen in its cgroup while signalling

    def _kill_cgroup(self, cgroup: str) -> None:
        # Who was in it: those re-parented to us (if we are a subreaper) are ours to reap.
        self.members.update(_cgroup.procs(cgroup))
        _cgroup.kill(cgroup)

    def signal(self, sig: int) -> None:
        if self.reaped:  # until we reap it, its pid and group id cannot be reused
            return
        if self.cgroup is not None:  # the whole tree, without a scan of /proc
            _proctree.signal_tree(self.pid, (), sig)
            if sig == signal.SIGKILL:
                self._kill_cgroup(self.cgroup)
            else:
                self.members.update(_cgroup.procs(self.cgroup))
                _cgroup.signal(self.cgroup, sig)
            return
        known = {p.pid for p in self.tree}
        self.tree += [p for p in _proctree.descendants(self.pid) if p.pid not in known]
        _proctree.signal_tree(self.pid, self.tree, sig)

    async def _wait_exited(self, bound: float) -> None:
        with anyio.move_on_after(bound):
            await _proctree.wait_exit(self.pid, self.pidfd)

    async def exit_status(self) -> _Exit:
        await self._wait_exited(_EXIT_BOUND_S)
        if not _proctree.has_exited(self.pid):
            self.signal(signal.SIGKILL)
            await self._wait_exited(_KILL_BOUND_S)
        # Until the leader is reaped its pid, the group id, cannot be reused: end the group,
        # then reap what its death re-parented to us (if we are a subreaper), leader last.
        _proctree.signal_tree(self.pid, self.tree, signal.SIGKILL)
        with anyio.move_on_after(_KILL_BOUND_S):
            if self.cgroup is not None:
                self._kill_cgroup(self.cgroup)
                await _cgroup.wait_empty_async(self.cgroup, _KILL_BOUND_S)
                _proctree.reap_each(self.members - {self.pid})
            await _proctree.reap_adopted(self.pid, self.tree)
        if self.cgroup is not None and _cgroup.remove(self.cgroup):
            self.cgroup = None
        code = _proctree.reap(self.pid)
        if code is None:
            log.warning("asyncproc: child %s did not exit after SIGKILL (uninterruptible sleep?); giving up on it", self.pid)
        else:
            self.reaped = True
            if self.guarded:
                from .._subprocess import guardian as _guardian

                _guardian.unregister(self.pid)
        fault = _protocol.read_text(self.fault_fd) if code else ""
        self.close()
        return _Exit(self.pid, code, fault)

    async def finish(self) -> None:
        await self.exit_status()

    def close(self) -> None:
        self.data.close()
        for fd in (self.fault_fd, self.pidfd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self.fault_fd = self.pidfd = -1


_LOOP_FILES = tuple(
    f'File "{os.path.abspath(module.__file__ or "")}"' for module in (_worker, _server)
) + ('File "<string>"',)


def _user_frames(fault_log: str) -> str:
    """faulthandler's dump without the frames of asyncproc's own worker loop under the
    user's function: the user debugs their code, not ours."""
    return "\n".join(
        line
        for line in fault_log.splitlines()
        if not line.lstrip().startswith(_LOOP_FILES)
    )


# Imported by a worker only for some calls, but then at a cost (63 ms and 9 ms here) far
# above a whole call's: the first such call has the fork server import it, once. Neither
# starts threads, so the server stays safe to fork; callers that never need them keep the
# leaner server (every page it holds costs every call).
_BY_VALUE_MARK = b"cloudpickle"  # in the pickle of a lambda, closure or __main__ function


def _learn_needs(call: bytes) -> None:
    if "cloudpickle" not in link.preloads and _BY_VALUE_MARK in call[:65536]:
        link.preload(["cloudpickle"])


async def _start_forkserver(spec: _worker.CallSpec, job: _worker.Job) -> _Worker:
    return await _start_via_server(spec, job, _protocol.FORKED)


async def _start_spawn(spec: _worker.CallSpec, job: _worker.Job) -> _Worker:
    # Started by the fork server, not by us: it is a subreaper and holds a lifeline, so a
    # fresh interpreter gets every guarantee a forked worker has. The binding goes with
    # the request: the server sets it on its thread around the spawn (before exec).
    binding = pickle.dumps(spec.binding) if spec.binding is not None else b""
    return await _start_via_server(spec, job, _protocol.FRESH + binding)


async def _start_via_server(spec: _worker.CallSpec, job: _worker.Job, kind: bytes) -> _Worker:
    # A forked worker has the caller's context from the server (sync_context); a fresh
    # interpreter has not the caller's sys.path: its call carries the context.
    if kind[:1] == _protocol.FRESH:
        spec = _with_context(spec, env=link.env_if_changed())  # a cwd gone raises here, as itself
    try:
        call = _worker.encode_call(spec, job)
    except Exception as exc:
        raise _unpicklable_call(job, exc) from exc
    _learn_needs(call)
    await link.sync_context()
    for _ in range(3):
        data, ctl = await link.take(kind)
        cgroup_root = link.cgroup  # of the server that gave us this worker
        try:
            _protocol.send(data, _protocol.CALL, call)
        except (BrokenPipeError, ConnectionResetError):
            data.close()  # the reserved worker died idle; the call never reached it
            ctl.close()
            link.worker_died_idle()
            continue
        return _ServerWorker(data, ctl, cgroup_root)
    raise _ServerLost


def _unpicklable_call(job: _worker.Job, exc: Exception) -> TypeError:
    """Which part of the call could not be pickled, and what to do about it."""
    func, args, kwargs = job
    parts = [("the function", func), *((f"args[{i}]", a) for i, a in enumerate(args))]
    parts += [(f"kwargs[{k!r}]", v) for k, v in kwargs.items()]
    what, reason = "the call", f"{type(exc).__name__}: {exc}"
    for name, value in parts:
        try:
            _worker.by_value_dumps(value)
        except Exception as part_exc:
            what, reason = f"{name} ({type(value).__name__})", f"{type(part_exc).__name__}: {part_exc}"
            break
    return TypeError(
        f"{what} of {_describe(func)} cannot be pickled ({reason}); \"forkserver\" and \"spawn\" "
        f"calls send it to the child by pickle: use start_method=\"fork\" to let the child inherit it"
    )


def _track_dynamic_classes(func: Callable[..., Any], depth: int = 3) -> None:
    """Give the classes ``func`` can reach their cloudpickle tracker ids *before* forking.

    cloudpickle maps a class pickled by value back to the original when it returns to the
    process that first sent it, by a tracker id. A "fork" child never received ``func`` by
    pickle; without this, an exception class defined in a function would come back as a
    look-alike that ``except LocalError`` does not catch. The child inherits the registry.
    """
    from cloudpickle import cloudpickle as cp

    code = getattr(func, "__code__", None)
    if code is None or depth == 0:
        return
    names = set(code.co_names)
    reachable = [g for n, g in getattr(func, "__globals__", {}).items() if n in names]
    for cell in getattr(func, "__closure__", None) or ():
        try:
            reachable.append(cell.cell_contents)
        except ValueError:  # an empty cell
            pass
    for obj in reachable:
        if isinstance(obj, type):
            try:
                if not cp._should_pickle_by_reference(obj):
                    cp._get_or_create_tracker_id(obj)
            except Exception:  # private API: losing it only loses identity of local classes
                return
        elif callable(obj):
            _track_dynamic_classes(obj, depth - 1)


# Held from socketpair() to closing the worker's end after fork(): a "fork" call from
# another thread would otherwise fork a child holding this call's worker end, and this call
# would not see end-of-stream when its own worker dies, only when that sibling exits.
_FORK_LOCK = threading.Lock()
_FORK_NAMES = itertools.count()


async def _start_fork(spec: _worker.CallSpec, job: _worker.Job) -> _Worker:
    _track_dynamic_classes(job[0])
    parent = os.getpid()
    for stream in (sys.stdout, sys.stderr):  # or the child would print our buffer again
        try:
            stream.flush()
        except Exception:
            pass
    from .._subprocess import guardian as _guardian

    cgroup = _cgroup.create(f"fork{next(_FORK_NAMES)}")
    with _FORK_LOCK:
        data, data_far = _protocol.seqpacket_pair()
        fault_fd = os.memfd_create("asyncproc-fault", os.MFD_CLOEXEC)
        try:
            pid = os.fork()
        except BaseException:  # EAGAIN/ENOMEM: nothing started, nothing may leak
            for sock in (data, data_far):
                sock.close()
            os.close(fault_fd)
            if cgroup is not None:
                _cgroup.remove(cgroup)
            raise
        if pid == 0:
            data.close()
            _worker.forked_main(data_far, fault_fd, parent, job, spec, cgroup)
        data_far.close()
    # The guardian ends a "fork" worker's whole tree if we die (SIGKILL included): then
    # the worker must have no parent-death signal, which would kill it first and orphan
    # its tree, out of the guardian's sight. It waits for our go to learn which it is.
    _guardian.register(pid)
    guarded = _guardian.guardian_pid() is not None
    try:
        _protocol.send(data, _protocol.CALL, _worker.GUARDED if guarded else b"")  # go
    except OSError:
        pass  # it died already: its end-of-stream tells the caller
    return _OwnWorker(data, pid, fault_fd, cgroup, guarded)


_STARTERS: dict[str, Callable[[_worker.CallSpec, _worker.Job], Awaitable[_Worker]]] = {
    "forkserver": _start_forkserver,
    "fork": _start_fork,
    "spawn": _start_spawn,
}


def _with_context(spec: _worker.CallSpec, env: dict[str, str] | None) -> _worker.CallSpec:
    # The worker imports by-reference functions the way the caller would, from where the
    # caller is now, not from where the server happened to start.
    return _worker.CallSpec(spec.memory_limit, spec.binding, tuple(sys.path), os.getcwd(), env)


# -- outcomes -----------------------------------------------------------------------------


async def _stop(worker: _Worker, grace: float) -> _Exit:
    """SIGTERM the tree, wait ``grace``, SIGKILL, wait a bounded time; then the status.

    Never raises: it runs while a timeout or a cancellation is on its way to the caller,
    and an error here must neither replace that outcome nor skip the SIGKILL.
    """
    try:
        return await _stop_or_raise(worker, grace)
    except Exception as exc:
        log.warning("asyncproc: error while stopping child %s: %r; killing it", worker.pid, exc)
        try:
            worker.signal(signal.SIGKILL)
        finally:
            worker.close()
        return _Exit(worker.pid, None)


async def _stop_or_raise(worker: _Worker, grace: float) -> _Exit:
    # grace, then the kill bound: the only waits (exit_status no longer waits once the
    # kill bound has passed), whatever state the fork server is in.
    worker.signal(signal.SIGTERM)
    with anyio.move_on_after(grace) as graceful:
        await worker.wait_gone()
    if graceful.cancelled_caught:
        worker.signal(signal.SIGKILL)
        with anyio.move_on_after(_KILL_BOUND_S):
            await worker.wait_gone()
    return await worker.exit_status()


async def _finish(worker: _Worker, deadline: float, grace: float) -> _Exit:
    """After an answer that is not a value: wait for the worker to end (it is already
    ending) until the call's own deadline, then stop it as a timeout would; the status."""
    with anyio.move_on_after(min(_EXIT_BOUND_S, max(0.0, deadline - anyio.current_time()))) as waited:
        await worker.wait_gone()
    if waited.cancelled_caught:
        return await _stop(worker, grace)
    return await worker.exit_status()


def _loads_exception(body: bytes | memoryview) -> tuple[BaseException, int]:
    type_name, message, text, data, pid = pickle.loads(body)
    if data is not None:
        try:
            exc = pickle.loads(data)
            if isinstance(exc, BaseException):
                if hasattr(exc, "add_note"):
                    exc.add_note(f"(raised in asyncproc child process {pid})")
                return exc, pid
        except Exception as exc:
            text += f"\n(the exception could not be rebuilt in the caller: {type(exc).__name__}: {exc})"
    return RemoteError(f"{type_name}: {message}", type_name=type_name, traceback_text=text, pid=pid), pid


def _loads_value(body: bytes | memoryview, pid: int | None) -> Any:
    try:
        return pickle.loads(body)
    except Exception as exc:
        raise RemoteError(
            f"the child's return value could not be unpickled in the caller: {type(exc).__name__}: {exc}",
            type_name=type(exc).__name__,
            pid=pid,
        ) from None


async def _outcome(worker: _Worker, msg: _protocol.Message | None, deadline: float, grace: float) -> Any:
    if msg is not None and msg.tag == _protocol.VALUE:
        value = _loads_value(msg.body, worker.pid)
        if isinstance(worker, _OwnWorker):
            await worker.finish()
        else:
            worker.release()
        return value
    with anyio.CancelScope(shield=True):
        end = await _finish(worker, deadline, grace) if msg is not None else await worker.exit_status()
    if msg is None and end.never_started:
        raise _ServerLost
    if msg is None:
        message = f"{end.note}; its outcome is unknown" if end.note else None
        raise ChildCrashed(message, pid=end.pid, exitcode=end.exitcode, fault_log=_user_frames(end.fault_log))
    if msg.tag == _protocol.RAISED:
        if isinstance(worker, _ServerWorker) and "tblib.pickling_support" not in link.preloads:
            link.preload(["tblib.pickling_support"])  # how workers pickle tracebacks
        exc, _ = _loads_exception(msg.body)
        raise exc
    if msg.tag == _protocol.MEMORY:
        limit, text, pid = pickle.loads(msg.body)
        message = f"child process {pid} went over its memory limit of {limit} bytes (MemoryError)"
        if text:
            message += "\n\nTraceback in the child:\n" + text.rstrip()
        raise MemoryLimitExceeded(message, pid=pid, exitcode=end.exitcode)
    if msg.tag == _protocol.UNPICKLABLE:
        type_name, reason = pickle.loads(msg.body)
        raise RemoteError(
            f"the child returned a {type_name}, which cannot be pickled ({reason})",
            type_name=type_name,
            pid=end.pid,
            exitcode=end.exitcode,
        )
    raise RuntimeError(f"asyncproc: unexpected message {msg.tag!r} from a worker")  # pragma: no cover


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
        try:
            return await self._call_once(func, args, kwargs)
        except _ServerLost:
            # Safe to retry: no worker ever received the call. The link restarts the server.
            # Raised as a plain AsyncprocError if it happens again.
            log.warning("asyncproc: the fork server died before starting a call; retrying on a new one")
            try:
                return await self._call_once(func, args, kwargs)
            except _ServerLost as again:
                raise AsyncprocError(str(again)) from None

    async def _call_once(self, func: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        worker: _Worker | None = None
        msg = None
        deadline = anyio.current_time() + (math.inf if self.timeout is None else self.timeout)
        try:
            # The timeout covers the whole call, waiting for a busy fork server included.
            with anyio.CancelScope(deadline=deadline) as scope:
                worker = await _STARTERS[self.start_method](self._spec, (func, args, kwargs))
                if (hook := worker_started.get()) is not None:
                    hook(worker)
                msg = await worker.next_message()
            if scope.cancelled_caught:
                started = worker is not None and _call_read(worker)
                if worker is not None:
                    with anyio.CancelScope(shield=True):
                        await _stop(worker, self.grace)
                raise TimeoutError(self._timeout_message(func, worker, started))
            assert worker is not None
            return await _outcome(worker, msg, deadline, self.grace)
        except BaseException:
            if worker is not None and not _is_closed(worker):  # cancelled from outside while waiting
                with anyio.CancelScope(shield=True):
                    await _stop(worker, self.grace)
            raise

    def _timeout_message(self, func: Callable[..., Any], worker: _Worker | None, started: bool) -> str:
        name = _describe(func)
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


def _call_read(worker: _Worker) -> bool:
    """Whether the worker has read what we sent it (the call, or a "fork" worker's go):
    a Unix socket counts sent bytes against the sender until the receiver reads them."""
    import array
    import fcntl
    import termios

    unread = array.array("i", [0])
    try:
        fcntl.ioctl(worker.data.fileno(), termios.TIOCOUTQ, unread)
    except OSError:
        return True  # cannot tell: say the usual
    return unread[0] == 0


def _is_closed(worker: _Worker) -> bool:
    return worker.data.fileno() == -1


def _describe(func: Callable[..., Any]) -> str:
    return getattr(func, "__qualname__", None) or repr(func)


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
