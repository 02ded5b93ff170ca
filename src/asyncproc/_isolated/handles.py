"""The caller's grip on one isolated call's worker, one kind per start method, and how
each is started: by the fork server ("forkserver", "spawn") or forked by the caller
itself ("fork"). Each handle offers the same operations: next message, signal the tree,
wait until it is gone, how it exited.
"""

from __future__ import annotations

import _socket
import itertools
import logging
import math
import os
import pickle
import signal
import sys
import threading
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import psutil

from .._exceptions import ServerLost
from .._proc import cgroup as _cgroup
from .._proc import proctree as _proctree
from .._proc.proctree import KILL_BOUND_S
from . import protocol as _protocol
from . import worker as _worker
from .link import link

log = logging.getLogger("asyncproc")

# After answering, a worker only flushes and ends what it started (itself bounded); the
# wait for that is also bounded by the call's own timeout.
EXIT_BOUND_S = 5.0


@dataclass
class Exit:
    pid: int | None
    exitcode: int | None
    fault_log: str = ""
    note: str = ""  # when the status is unknown: why
    never_started: bool = False  # the fork server died before any worker got the call


# -- worker handles: one per start method, same four operations ---------------------------

# Every call in flight. A forked child of the caller (ours or the user's) closes its copies
# of their sockets: the server takes end-of-stream on a call's ctl to mean "the caller is
# done", which a copy in some child would postpone. (The workers, not their sockets: a
# bare _socket.socket takes no weak reference.)
_IN_FLIGHT: weakref.WeakSet[Worker] = weakref.WeakSet()


def _close_in_flight_copies() -> None:
    for worker in list(_IN_FLIGHT):
        worker.close_sockets()


os.register_at_fork(after_in_child=_close_in_flight_copies)


async def _recv(sock: _socket.socket, wait_first: bool = False) -> _protocol.Message | None:
    """The next message on a non-blocking socket; None at end-of-stream. ``wait_first``
    when nothing can be there yet (the call was just sent): no read that fails first."""
    if wait_first:
        await anyio.wait_readable(sock)
    while True:
        try:
            return _protocol.recv(sock)
        except BlockingIOError:
            await anyio.wait_readable(sock)
        except ConnectionResetError:
            return None


class Worker:
    """The caller's grip on one worker."""

    pid: int | None = None

    def __init__(self, data: _socket.socket):
        self.data = data  # non-blocking
        self.ended = False  # end-of-stream seen on data
        _IN_FLIGHT.add(self)

    async def next_message(self, first: bool = False) -> _protocol.Message | None:
        """The worker's next message, or None at end-of-stream (it is gone). ``first``:
        the call was just sent, so no answer can be there yet."""
        msg = await _recv(self.data, wait_first=first)
        self.ended = msg is None
        return msg

    async def wait_gone(self) -> None:
        """Until the worker and its tree are gone (the caller bounds the wait)."""
        while await self.next_message() is not None:
            pass

    def signal(self, sig: int) -> None:
        raise NotImplementedError

    async def exit_status(self) -> Exit:
        """After end-of-stream: how it ended. Everything it started is gone by now."""
        raise NotImplementedError

    def release(self) -> None:
        """The answer is in; let the worker finish on its own."""
        self.close()

    def close(self) -> None:
        self.close_sockets()

    def close_sockets(self) -> None:
        """Close this call's sockets (also, in a forked child of the caller, its copies)."""
        self.data.close()


class ServerWorker(Worker):
    """A worker forked by the fork server, which reaps it and reports on ``ctl``.

    Once the server has told us the worker's cgroup (HELLO), we can end and watch the
    worker's tree ourselves: a stopped, busy or dead server then delays nothing."""

    def __init__(self, data: _socket.socket, ctl: _socket.socket, cgroup_root: str | None, server_pid: int | None):
        super().__init__(data)  # both non-blocking already (the link made them so)
        self.ctl = ctl
        self.cgroup_root = cgroup_root
        self.server_pid = server_pid
        self.cgroup: str | None = None
        self.exited: _protocol.Message | None = None
        self.server_gone = False  # end-of-stream on ctl

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

    async def exit_status(self) -> Exit:
        if self.ended:  # the server queued EXITED before ending the stream, or died
            with anyio.move_on_after(KILL_BOUND_S):
                while self.exited is None and not self.server_gone:
                    self._on_ctl(await _recv(self.ctl))
        else:  # gone by its cgroup: the server's report may still be on its way
            self._read_ctl_now()
        self.close()
        exited = self.exited
        if exited is None:
            if self.pid is None:
                if self.server_gone:  # its server is dying: the retry must not ask it again
                    await link.await_death(self.server_pid, KILL_BOUND_S)
                return Exit(None, None, never_started=True)
            if not self.server_gone:
                return Exit(self.pid, None, note=f"the asyncproc fork server did not report on worker {self.pid} in time")
            await self._end_orphaned_tree()
            return Exit(self.pid, None, note=f"the asyncproc fork server died while worker {self.pid} served this call")
        head, _, fault = bytes(exited.body).partition(b"\n")
        pid, code, *flags = head.split()
        if b"unstarted" in flags:  # the worker died before reading the call: it never ran
            return Exit(None, None, never_started=True)
        return Exit(int(pid), int(code), fault.decode(errors="replace"))

    async def _end_orphaned_tree(self) -> None:
        """The server died (SIGKILL) while our worker ran: the worker died with it, but what
        it started lives on, orphaned. With its cgroup, all of it ends at once; without,
        its process group (setsid escapees are out of reach: see the README)."""
        assert self.pid is not None
        if self.cgroup is not None:
            members = _cgroup.procs(self.cgroup)
            _cgroup.kill(self.cgroup)
            await _cgroup.wait_empty_async(self.cgroup, KILL_BOUND_S)
            _proctree.Adopted(among=members).step(None)  # re-parented to us if we are a subreaper
        else:
            # The group id stays reserved while any member lives, so these are the
            # worker's group (or, with the group empty, nothing).
            group = _proctree.group_members(self.pid)
            _proctree.signal_tree(None, group, signal.SIGKILL)
            with anyio.move_on_after(KILL_BOUND_S):
                await _proctree.Adopted.left_by(self.pid, group).reap_when_exited()
        link.check_server()  # reap the dead server, remove its cgroups

    def release(self) -> None:
        # The worker ends its tree and exits on its own once it has answered, and the server
        # ends whatever is left when it has: closing ctl now (the caller is done: end it)
        # would only wake the server once more per call, on the value's way back. The link
        # closes it once the server has reported the exit (or at the latest later on).
        self.data.close()
        link.finished(self.ctl)

    def close_sockets(self) -> None:
        self.data.close()
        self.ctl.close()


class OwnWorker(Worker):
    """A worker that is our own child ("fork" and "spawn"): we signal and reap it."""

    pid: int  # always known: we forked or spawned it ourselves

    def __init__(self, data: _socket.socket, pid: int, fault_fd: int, cgroup: str | None, guarded: bool):
        data.setblocking(False)
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

    async def exit_status(self) -> Exit:
        await self._wait_exited(EXIT_BOUND_S)
        if not _proctree.has_exited(self.pid):
            self.signal(signal.SIGKILL)
            await self._wait_exited(KILL_BOUND_S)
        # Until the leader is reaped its pid, the group id, cannot be reused: end the group,
        # then reap what its death re-parented to us (if we are a subreaper), leader last.
        _proctree.signal_tree(self.pid, self.tree, signal.SIGKILL)
        with anyio.move_on_after(KILL_BOUND_S):
            if self.cgroup is not None:
                self._kill_cgroup(self.cgroup)
                await _cgroup.wait_empty_async(self.cgroup, KILL_BOUND_S)
                _proctree.Adopted(keep=(self.pid,), among=self.members).step(None)
            await _proctree.Adopted.left_by(self.pid, self.tree).reap_when_exited()
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
        return Exit(self.pid, code, fault)

    async def finish(self) -> None:
        await self.exit_status()

    def close(self) -> None:
        self.data.close()
        for fd in (self.fault_fd, self.pidfd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self.fault_fd = self.pidfd = -1


# Imported by a worker only for some calls, but then at a cost (63 ms and 9 ms here) far
# above a whole call's: the first such call has the fork server import it, once. Neither
# starts threads, so the server stays safe to fork; callers that never need them keep the
# leaner server (every page it holds costs every call).
_BY_VALUE_MARK = b"cloudpickle"  # in the pickle of a lambda, closure or __main__ function


def _learn_needs(call: bytes) -> None:
    if "cloudpickle" not in link.preloads and _BY_VALUE_MARK in call[:65536]:
        link.preload(["cloudpickle"])


async def _start_forkserver(spec: _worker.CallSpec, job: _worker.Job) -> Worker:
    return await _start_via_server(spec, job, _protocol.FORKED)


async def _start_spawn(spec: _worker.CallSpec, job: _worker.Job) -> Worker:
    # Started by the fork server, not by us: it is a subreaper and holds a lifeline, so a
    # fresh interpreter gets every guarantee a forked worker has. The binding goes with
    # the request: the server sets it on its thread around the spawn (before exec).
    binding = pickle.dumps(spec.binding) if spec.binding is not None else b""
    return await _start_via_server(spec, job, _protocol.FRESH + binding)


async def _start_via_server(spec: _worker.CallSpec, job: _worker.Job, kind: bytes) -> Worker:
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
        cgroup_root, server_pid = link.cgroup, link.pid  # of the server that gave us this worker
        try:
            _protocol.send(data, _protocol.CALL, call)
        except (BrokenPipeError, ConnectionResetError):
            data.close()  # the reserved worker died idle; the call never reached it
            ctl.close()
            link.worker_died_idle()
            continue
        worker = ServerWorker(data, ctl, cgroup_root, server_pid)
        # While the worker runs the call: off its critical path (the caller would only wait).
        # The reserve is of forked workers: a "spawn" call keeps none idle for itself.
        link.after_call_sent(refill=kind == _protocol.FORKED)
        return worker
    raise ServerLost


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
        f"{what} of {describe(func)} cannot be pickled ({reason}); \"forkserver\" and \"spawn\" "
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


async def _start_fork(spec: _worker.CallSpec, job: _worker.Job) -> Worker:
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
    return OwnWorker(data, pid, fault_fd, cgroup, guarded)


STARTERS: dict[str, Callable[[_worker.CallSpec, _worker.Job], Awaitable[Worker]]] = {
    "forkserver": _start_forkserver,
    "fork": _start_fork,
    "spawn": _start_spawn,
}


def _with_context(spec: _worker.CallSpec, env: dict[str, str] | None) -> _worker.CallSpec:
    # The worker imports by-reference functions the way the caller would, from where the
    # caller is now, not from where the server happened to start.
    return _worker.CallSpec(spec.memory_limit, spec.binding, tuple(sys.path), os.getcwd(), env)


def describe(func: Callable[..., Any]) -> str:
    return getattr(func, "__qualname__", None) or repr(func)
