"""The caller's side of the fork server: start it lazily, share it, restart it, stop it.

One server per caller process, shared by every thread and event loop in it: requests are
single SEQPACKET messages, which the kernel delivers whole even when threads send at once,
so the only lock guards starting and restarting.
"""

from __future__ import annotations

import _socket
import atexit
import collections
import logging
import os
import pickle
import select
import sys
import threading
import time
from collections.abc import Iterable

import anyio

from .._proc import cgroup as _cgroup
from .._proc import proctree as _proctree
from . import protocol as _protocol
from . import server as _server
from .server import encode_preload
from .worker import spawn_python

__all__ = ["ServerLink", "link"]

log = logging.getLogger("asyncproc")

_STOP_BOUND_S = 2.0
# Workers already forked for this caller and waiting for a call: a call is then a single
# message to a process that is up, where going through the server would put a wake-up
# and a fork on the critical path. From the environment when a server starts (_start), not
# at import. Refilled in batches, once five sixths are used: the server forks a batch back
# to back, and every page it writes between two forks is copied again after the next (see
# _server): per call, 175 pages copied in the server one at a time, 108 in twos, 85 in
# threes; and a batch is one wake-up of the server. Twelve, refilled by ten: 100 us less
# server CPU per call than six refilled by three, and nothing more past that (measured,
# benchmarks/bench_floor.py's machine); an idle worker holds some 0.8 MB of its own. The
# two left leave the first of a batch the time of two calls to get ready (its cgroup
# attach can wait milliseconds for an RCU grace period).
_RESERVE_ENV, _RESERVE_DEFAULT = "ASYNCPROC_RESERVE", 12
# A finished call's ctl waits for the server's report (then closing it wakes nobody) this
# long at most, or this many at most; then it is closed anyway ("the caller is done").
_FINISHED_BOUND_S, _FINISHED_MAX = 0.5, 64
# Finished calls' ctl are looked at together, not at every call: when the reserve is
# refilled (just before: the server then finds their cgroups free for the new workers; it
# keeps at most 16 reported calls' cgroups waiting for their callers), after a "spawn" call,
# once this many wait, or once the oldest has waited _FINISHED_BOUND_S. A report comes some
# 2 to 15 calls after its call's value (measured): a look at every call mostly found none.
_FINISHED_SWEEP = 16
_PRELOAD_ENV = "ASYNCPROC_PRELOAD"


def _env_count(name: str, default: int) -> int:
    """``$name`` as a count (at least 1), read when first needed (when the server starts),
    not at import: a bad value then fails the first call with a message that names it."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return max(1, int(text))
    except ValueError:
        raise ValueError(f"${name} must be a whole number (at least 1), got {text!r}") from None


def _env_preloads() -> list[str]:
    return [m for m in os.environ.get(_PRELOAD_ENV, "").split(",") if m]


async def _room_on(chan: _socket.socket | None) -> None:
    """Until ``chan`` can take a message. Only reached while the server is behind (stalled
    or stopped); anyio lets one task at a time wait on a descriptor, so the others (every
    thread and event loop shares this channel) check again every 10 ms."""
    if chan is None:
        return
    try:
        await anyio.wait_writable(chan)
    except anyio.BusyResourceError:
        await anyio.sleep(0.01)


class ServerLink:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._chan: _socket.socket | None = None
        self._pid: int | None = None
        self._pidfd: int | None = None
        self._cgroup: str | None = None  # the server's workers each get a cgroup below it
        self._starts = 0
        self._env: dict[bytes, bytes] = {}
        self._context: tuple[tuple[str, ...], str, dict[bytes, bytes]] | None = None  # what the server has
        self._preloads = _env_preloads()
        self._reserve_size = _RESERVE_DEFAULT  # from the environment when the server starts
        self._reserve: collections.deque[tuple[_socket.socket, _socket.socket]] = collections.deque()
        self._finished: collections.deque[tuple[_socket.socket, float]] = collections.deque()

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def cgroup(self) -> str | None:
        return self._cgroup

    @property
    def preloads(self) -> tuple[str, ...]:
        return tuple(self._preloads)

    def env_if_changed(self) -> dict[str, str] | None:
        """The caller's environment when it differs from the one the server has."""
        data = getattr(os.environ, "_data", None)
        if data is not None and data == self._env:
            return None
        return dict(os.environ)

    def _start(self) -> None:
        self._reserve_size = _env_count(_RESERVE_ENV, _RESERVE_DEFAULT)
        ours, theirs = _protocol.seqpacket_pair()
        code = f"from {_server.__name__} import main; main()"
        # Ours, not the server's: should it die, we can still end every worker's tree at once.
        self._starts += 1
        self._cgroup = _cgroup.create(f"srv{self._starts}")
        try:
            preload = encode_preload(self._preloads, sys.path).decode() if self._preloads else ""
            self._pid = spawn_python(code, [preload, self._cgroup or ""], {3: theirs.fileno()})
        except BaseException:
            self._end_cgroup()
            raise
        finally:
            theirs.close()
        self._pidfd = _proctree.pidfd_open(self._pid)
        # Non-blocking: a stalled server (a long preload, a stopped process) must never
        # freeze the caller's event loop in sendmsg; callers wait for room instead.
        ours.setblocking(False)
        self._chan = ours
        self._env = dict(getattr(os.environ, "_data", {}))
        # First on the fresh (empty) channel, so before any request: whatever happens to
        # the server, each worker it forks has the caller's context.
        context = self._context_now()
        _protocol.send(ours, _protocol.CONTEXT, self._context_message(context))
        self._context = context

    def _context_now(self) -> tuple[tuple[str, ...], str, dict[bytes, bytes]]:
        data = getattr(os.environ, "_data", None)
        return tuple(sys.path), os.getcwd(), dict(data) if data is not None else {}

    def _context_message(self, context: tuple[tuple[str, ...], str, dict[bytes, bytes]]) -> bytes:
        path, cwd, env = context
        changed = env != self._env  # the environment the server has
        self._env = env
        return pickle.dumps((path, cwd, dict(os.environ) if changed else None))

    async def sync_context(self) -> None:
        """Have the server, and so each worker it forks from now on, take the caller's
        sys.path, cwd and environment when they changed since the last call: the worker
        imports and opens what the caller would, and a call carries no context. Workers
        forked before (the reserve) are dropped. Called before ``take``."""
        data = getattr(os.environ, "_data", {})
        old = self._context
        if old is not None and old[0] == tuple(sys.path) and old[1] == os.getcwd() and old[2] == data:
            return
        context = self._context_now()
        body = self._context_message(context)
        while True:
            try:
                self._send(_protocol.CONTEXT, body, [])  # (re)starts the server as needed
                break
            except BlockingIOError:
                await _room_on(self._chan)
        self._context = context
        self._drop_reserve()  # after the message: what a racing refill asked for is dropped too

    def _send(self, tag: bytes, body: bytes, fds: list[int]) -> None:
        """Send to the server, (re)starting it as needed; BlockingIOError when it is full."""
        with self._lock:
            for attempt in (1, 2):
                if self._chan is None:
                    self._start()
                assert self._chan is not None
                try:
                    _protocol.send(self._chan, tag, body, fds)
                    return
                except (BrokenPipeError, ConnectionResetError):
                    if attempt == 2:
                        raise
                    log.warning("asyncproc: the fork server (pid %s) died; starting a new one", self._pid)
                    self._stop_locked()

    def _request(self, kind: bytes = _protocol.FORKED, count: int = 1) -> list[tuple[_socket.socket, _socket.socket]]:
        """Ask the server for ``count`` workers in one message (one wake-up of the server,
        one system call); each will wait on its returned ``data`` for a call."""
        ours: list[tuple[_socket.socket, _socket.socket]] = []
        theirs: list[_socket.socket] = []
        fds: list[int] = []  # the server takes (ctl, data) pairs
        try:
            for _ in range(count):
                data, data_far = _protocol.seqpacket_pair()
                theirs.append(data_far)
                try:
                    # Non-blocking at both ends: the server makes its end so anyway.
                    ctl, ctl_far = _protocol.seqpacket_pair(nonblocking=True)
                except BaseException:
                    data.close()
                    raise
                theirs.append(ctl_far)
                fds += (ctl_far.fileno(), data_far.fileno())
                ours.append((data, ctl))
                # Here, ahead of the call, not when it starts: a system call less on its way.
                # (Not the far end: the worker waits for its call on it.)
                data.setblocking(False)
            self._send(_protocol.SPAWN, kind, fds)
        except BaseException:
            for pair in ours:
                for sock in pair:
                    sock.close()
            raise
        finally:
            for sock in theirs:
                sock.close()
        return ours

    async def take(self, kind: bytes = _protocol.FORKED) -> tuple[_socket.socket, _socket.socket]:
        """A worker waiting for a call: ``(data, ctl)``; a forked one from the reserve when
        it has one, a fresh interpreter (``_protocol.FRESH``) always on request."""
        if kind == _protocol.FORKED and self._reserve:  # FRESH requests may carry more
            try:
                # One that died idle (killed, or its server died) refuses the call: see
                # worker_died_idle. Not looked at here: a system call less per call.
                return self._reserve.popleft()
            except IndexError:  # another thread took the last one
                pass
        while True:
            try:
                return self._request(kind)[0]
            except BlockingIOError:  # the server is behind: wait for room, never block
                await _room_on(self._chan)

    def after_call_sent(self, refill: bool = True) -> None:
        """A call is on its way: its worker runs it now, on another CPU, while its caller
        would only wait. Close finished calls' ctl, refill the reserve. Never raises."""
        try:
            due = refill and self._refill_due()
            self._close_finished(sweep=due or not refill)
            if due:
                self.top_up()
        except Exception as exc:  # refilling the reserve must never fail a call
            log.debug("asyncproc: could not refill the worker reserve: %r", exc)

    def finished(self, ctl: _socket.socket) -> None:
        """A call has its value; its ``ctl`` is closed once the server's report (EXITED) is
        in: the server is not woken by that end-of-stream (it looks for it when it wants
        the call's cgroup again), where closing at once would wake it to end a worker that
        ends by itself."""
        self._finished.append((ctl, time.monotonic()))

    def _close_finished(self, sweep: bool) -> None:
        finished = self._finished
        if not finished:
            return
        if not sweep and len(finished) < _FINISHED_SWEEP:
            try:
                if finished[0][1] >= time.monotonic() - _FINISHED_BOUND_S:
                    return
            except IndexError:  # another thread swept meanwhile
                return
        poller = select.poll()  # one system call for all of them
        waiting = []
        while finished:  # popped one at a time: other threads may sweep at once
            try:
                waiting.append(finished.popleft())
            except IndexError:
                break
        for ctl, _ in waiting:
            poller.register(ctl, select.POLLIN)
        ready = {fd for fd, _ in poller.poll(0)}
        late = time.monotonic() - _FINISHED_BOUND_S
        for i, (ctl, since) in enumerate(waiting):
            # The report comes after the worker's HELLO, which a call that got its value never read.
            if (ctl.fileno() in ready and _protocol.read_until(ctl, _protocol.EXITED)) or since < late or len(waiting) - i > _FINISHED_MAX:
                ctl.close()
            else:
                finished.append((ctl, since))

    def _close_all_finished(self) -> None:
        while self._finished:
            try:
                self._finished.popleft()[0].close()
            except IndexError:
                break

    def _refill_due(self) -> bool:
        """Refilled once five sixths are used (see _RESERVE_ENV)."""
        return len(self._reserve) <= self._reserve_size // 6

    def top_up(self) -> None:
        """Refill the reserve; called after a call is on its way, off its critical path.
        Gives up quietly when the server is behind: the next call asks for itself."""
        missing = self._reserve_size - len(self._reserve)
        if not self._refill_due() or missing <= 0:
            return
        try:
            self._reserve.extend(self._request(count=min(missing, _protocol.SPAWN_BATCH_MAX)))
        except BlockingIOError:
            pass

    def worker_died_idle(self) -> None:
        """A reserved worker refused its call: its server is likely ending (it shuts every
        worker's socket first). Its siblings would too: ask the server afresh, which
        restarts it if it is gone."""
        self._drop_reserve()
        self.check_server()

    def _drop_reserve(self) -> None:
        while self._reserve:
            for sock in self._reserve.popleft():
                sock.close()  # the server sees end-of-stream and ends the idle worker

    def preload(self, modules: Iterable[str]) -> None:
        """Have the server import ``modules`` so that no call pays for importing them."""
        names = [m for m in modules if m not in self._preloads]
        if not names:
            return
        self._preloads += names
        self._drop_reserve()  # forked before the import: each would import them again
        self._context = None  # the preload sets the server's sys.path: the next call syncs again
        if self._chan is None:
            return  # the server will import them when it starts
        deadline = time.monotonic() + _STOP_BOUND_S
        while True:
            try:
                self._send(_protocol.PRELOAD, encode_preload(names, sys.path), [])
                return
            except BlockingIOError:
                if time.monotonic() > deadline or self._chan is None:
                    raise TimeoutError("asyncproc: the fork server is not reading requests") from None
                select.select([], [self._chan], [], 0.1)  # until there is room again

    def _stop_locked(self) -> None:
        self._drop_reserve()
        self._close_all_finished()
        chan, pid, fd = self._chan, self._pid, self._pidfd
        self._chan = self._pid = self._pidfd = None
        if chan is not None:
            chan.close()  # end-of-stream on the lifeline: the server ends its workers and exits
        if pid is not None:
            try:
                if fd is not None:
                    _proctree.wait_fds([fd], _STOP_BOUND_S)
            finally:
                if fd is not None:
                    os.close(fd)
            if _proctree.reap(pid) is None:
                log.warning("asyncproc: the fork server (pid %s) did not exit within %.0f s", pid, _STOP_BOUND_S)
        self._end_cgroup()

    def _end_cgroup(self) -> None:
        """Whatever the server left (it was SIGKILLed, say) dies; the cgroups go."""
        cgroup, self._cgroup = self._cgroup, None
        if cgroup is not None:
            members = _cgroup.procs(cgroup, recursive=True)
            _cgroup.kill(cgroup)
            _cgroup.wait_empty(cgroup, _STOP_BOUND_S)
            _proctree.Adopted(among=members).step(None)  # re-parented to us if we are a subreaper
            _cgroup.remove(cgroup)

    def server_stopped(self) -> bool:
        """Whether the server is stopped (SIGSTOP, a debugger): state T or t in /proc."""
        pid = self._pid
        if pid is None:
            return True
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rpartition(b")")[2].split()[0]
        except (OSError, IndexError):
            return True
        return state in (b"T", b"t")

    def check_server(self) -> bool:
        """Whether the server is still running; if it died, reap it (a zombie otherwise,
        for the rest of our life), end what it left, and start afresh on the next call."""
        with self._lock:
            if self._pidfd is None or not select.select([self._pidfd], [], [], 0)[0]:
                return self._chan is not None
            log.warning("asyncproc: the fork server (pid %s) died; a new one starts with the next call", self._pid)
            self._stop_locked()
            return False

    async def await_death(self, pid: int | None, bound: float) -> None:
        """A call's worker vanished with no word from server ``pid``, its ctl closed: the
        server is dying. A SIGKILL closes its sockets a moment before its exit shows on the
        pidfd, and a request sent in that moment is lost too; so wait for that exit (at
        most ``bound``), then reap it, and the retry starts a new server."""
        with self._lock:
            if pid is None or pid != self._pid or self._pidfd is None:
                return  # already replaced
            fd = os.dup(self._pidfd)  # ours: another task may stop the link meanwhile
        try:
            with anyio.move_on_after(bound):
                await _proctree.wait_exit(pid, fd)
        finally:
            os.close(fd)
        self.check_server()

    def stop(self) -> None:
        with self._lock:
            self._stop_locked()

    def reset(self) -> None:
        """Back to how a fresh process starts: no server (stopped and reaped), and only the
        preloads ``$ASYNCPROC_PRELOAD`` asks for; the environment is read again on the next
        start. For tests, so that one test's preloads never reach the next."""
        with self._lock:
            self._stop_locked()
            self._preloads = _env_preloads()

    def forget_after_fork(self) -> None:
        """In a forked child: the server belongs to the parent; never talk to it or wait on it."""
        for pair in self._reserve:
            for sock in pair:
                sock.close()
        self._reserve.clear()
        self._close_all_finished()  # copies: the parent's calls
        if self._chan is not None:
            self._chan.close()
        if self._pidfd is not None:
            os.close(self._pidfd)
        self._chan = self._pid = self._pidfd = None
        self._cgroup = None
        self._lock = threading.Lock()


link = ServerLink()
atexit.register(link.stop)
os.register_at_fork(after_in_child=link.forget_after_fork)
