"""The fork server: a lean process that keeps spare workers forked ahead of demand.

Started lazily by the first "forkserver" call as ``python -c`` (so the caller's
``__main__`` is never imported), with one SEQPACKET channel to the caller on fd 3. Per
call the caller sends SPAWN with two fresh descriptors: ``ctl`` (server <-> caller) and
``data`` (worker <-> caller). The server hands ``data`` to a spare and keeps its own copy.

When the worker exits the server (1) SIGKILLs the rest of the worker's process group while
the unreaped worker still reserves the group id, (2) kills any process it adopted (workers
are subreapers, so an orphan reaching the server can only come from a dead worker's tree),
(3) reaps, (4) sends EXITED with the status and faulthandler's output on ``ctl``, and only
then (5) shuts ``data`` down. The caller waits on ``data`` alone: at end-of-stream it knows
EXITED is already queued on ``ctl`` and that everything is gone.

The channel is also the lifeline: at its end-of-stream (the caller exited or was killed)
the server ends every worker's tree and exits. Spares die with the server
(PR_SET_PDEATHSIG; the server is single-threaded, so "parent thread" means the server).
"""

from __future__ import annotations

import gc
import importlib
import os
import pickle
import resource
import selectors
import signal
import socket
import sys

from . import _proctree, _protocol, _worker

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class _Spare:
    __slots__ = ("pid", "ctl", "fault_fd")

    def __init__(self, pid: int, ctl: socket.socket, fault_fd: int):
        self.pid = pid
        self.ctl = ctl  # the spare waits on its end for ASSIGN
        self.fault_fd = fault_fd


class _Job:
    __slots__ = ("pid", "ctl", "data", "fault_fd")

    def __init__(self, pid: int, ctl: socket.socket, data: socket.socket, fault_fd: int):
        self.pid = pid
        self.ctl = ctl  # to the caller
        self.data = data  # our copy of the worker's data socket; shut down at the end
        self.fault_fd = fault_fd


class Server:
    def __init__(self, channel: socket.socket, spares: int):
        self.channel = channel
        self.target_spares = spares
        self.spares: list[_Spare] = []
        self.jobs: dict[int, _Job] = {}
        self.by_ctl: dict[int, _Job] = {}
        self.selector = selectors.DefaultSelector()
        self.pid = os.getpid()
        wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wake_r = wake_r
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wake-up fd fires
        self.selector.register(channel, selectors.EVENT_READ, self._on_request)
        self.selector.register(wake_r, selectors.EVENT_READ, self._on_sigchld)

    # -- spares ---------------------------------------------------------------------------

    def _fork_spare(self) -> _Spare:
        # Objects that exist now move to the permanent generation: a collection in the
        # worker then never touches (and so never copies) the pages the server shares.
        gc.freeze()
        ours, theirs = _protocol.seqpacket_pair()
        fault_fd = os.memfd_create("asyncproc-fault", os.MFD_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # the spare
            try:
                self._become_spare(theirs.fileno(), fault_fd)
                _worker.spare_main(theirs, fault_fd, self.pid)
            finally:
                os._exit(70)
        theirs.close()
        return _Spare(pid, ours, fault_fd)

    def _become_spare(self, keep_sock: int, keep_fault: int) -> None:
        # Drop every descriptor of the server: the caller's lifeline, other calls' sockets,
        # other spares' fault logs. A worker must hold nothing but its own.
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if _worker_nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, _worker_nofile)
        low, high = sorted((keep_sock, keep_fault))
        os.closerange(3, low)
        os.closerange(low + 1, high)
        os.closerange(high + 1, 1 << 20)

    def _refill(self) -> None:
        while len(self.spares) < self.target_spares:
            self.spares.append(self._fork_spare())

    def _retire_spares(self) -> None:
        for spare in self.spares:
            spare.ctl.close()  # end-of-stream: the spare exits by itself
            os.close(spare.fault_fd)
        self.spares.clear()

    # -- requests -------------------------------------------------------------------------

    def _on_request(self) -> None:
        try:
            msg = _protocol.recv(self.channel)
        except (ConnectionResetError, BrokenPipeError):
            msg = None
        except OSError as exc:  # e.g. descriptors dropped (EMFILE): that request is lost, not us
            _complain("could not receive a request", exc)
            return
        if msg is None:
            raise SystemExit(0)  # lifeline cut: the caller is gone
        if msg.tag == _protocol.SPAWN:
            try:
                kind = bytes(msg.body)
                self._start_job(msg.fds, fresh=kind[:1] == _protocol.FRESH, binding=kind[1:])
            except Exception as exc:  # fork or memfd failed (EAGAIN, EMFILE, ENOMEM)
                # Closing its sockets unanswered tells that caller its call never started.
                for fd in msg.fds:
                    _close_quietly(fd)
                _complain("could not start a worker", exc)
        elif msg.tag == _protocol.PRELOAD:
            self._preload(*_decode_preload(bytes(msg.body)))
        else:  # pragma: no cover - a protocol bug, not a user error
            for fd in msg.fds:
                os.close(fd)

    def _start_job(self, fds: list[int], fresh: bool = False, binding: bytes = b"") -> None:
        ctl = socket.socket(fileno=fds[0])
        ctl.setblocking(False)  # a stale readiness event must never block the server
        data = socket.socket(fileno=fds[1])
        if _hung_up(ctl):  # the caller gave up while this request waited: fork nothing
            ctl.close()
            data.close()
            return
        if fresh:
            self._start_fresh(ctl, data, pickle.loads(binding) if binding else None)
            return
        spare = self.spares.pop(0) if self.spares else self._fork_spare()
        try:
            # Before ASSIGN: once the worker may have the call, the caller must know it, so
            # that it never retries a call that may have run (should we die from here on).
            _protocol.send(ctl, _protocol.HELLO, str(spare.pid).encode())
        except OSError:
            pass
        try:
            _protocol.send(spare.ctl, _protocol.ASSIGN, b"", [data.fileno()])
        except OSError:
            pass  # the spare died idle: the SIGCHLD path reports it as this call's crash
        spare.ctl.close()
        self._register(_Job(spare.pid, ctl, data, spare.fault_fd))
        self._refill()  # off the critical path: the call is already on its way

    def _start_fresh(self, ctl: socket.socket, data: socket.socket, binding: Any) -> None:
        """"spawn": a new interpreter, but ours, so it gets every guarantee a forked worker
        has (we are its subreaper, its lifeline and its reaper). It reads the call itself.
        A NUMA binding is set on our (only) thread around the spawn: the child has it from
        its first instruction, and posix_spawn keeps its vfork path."""
        fault_fd = os.memfd_create("asyncproc-fault", os.MFD_CLOEXEC)
        try:
            code = f"from {_worker.__name__} import spawn_main; spawn_main()"
            fds = {3: data.fileno(), 4: fault_fd}
            if binding is None:
                pid = _worker.spawn_python(code, [str(self.pid)], fds)
            else:
                with binding.on_this_thread():
                    pid = _worker.spawn_python(code, [str(self.pid)], fds)
        except BaseException:
            os.close(fault_fd)
            raise
        self._register(_Job(pid, ctl, data, fault_fd))
        try:
            _protocol.send(ctl, _protocol.HELLO, str(pid).encode())
        except OSError:
            pass

    def _register(self, job: _Job) -> None:
        self.jobs[job.pid] = job
        self.by_ctl[job.ctl.fileno()] = job
        self.selector.register(job.ctl, selectors.EVENT_READ, lambda: self._on_ctl(job))

    def _on_ctl(self, job: _Job) -> None:
        try:
            msg = _protocol.recv(job.ctl)
        except BlockingIOError:
            return
        except OSError:
            msg = None
        # End-of-stream means the caller stopped caring (it has its value, or it was
        # cancelled, or it died): nothing of the call may live on.
        sig = signal.SIGTERM if msg is not None and msg.tag == _protocol.TERM else signal.SIGKILL
        if msg is None:
            self.selector.unregister(job.ctl)
        if job.pid not in self.jobs:
            return
        if sig == signal.SIGKILL:
            # No tree walk (a scan of all of /proc): the worker is a subreaper, so once it
            # is dead whatever escaped its group is re-parented to us, and _end_adopted
            # finds it from our own children list.
            _proctree.signal_tree(job.pid, (), sig)
        else:  # a graceful stop must reach the escaped too, while they can still be found
            _proctree.signal_tree(job.pid, _proctree.descendants(job.pid), sig)

    def _preload(self, names: list[str], path: list[str]) -> None:
        # The caller's sys.path: the module it means is the one it would import itself.
        sys.path[:] = path
        fresh = [n for n in names if n and n not in sys.modules]
        for name in fresh:
            try:
                importlib.import_module(name)
            except (Exception, SystemExit) as exc:  # a bad preload must not take the server down
                print(f"asyncproc: could not preload {name!r}: {exc!r}", file=sys.stderr)
        if fresh:
            # Spares forked before the import would import it again on every call.
            self._retire_spares()
            self._refill()

    # -- exits ----------------------------------------------------------------------------

    def _on_sigchld(self) -> None:
        try:
            while os.read(self.wake_r, 512):
                pass
        except BlockingIOError:
            pass
        self._reap_all()

    def _reap_all(self) -> None:
        while True:
            try:
                # WNOWAIT: look without reaping, so the group id stays reserved while we
                # signal the rest of the group.
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None:
                return
            job = self.jobs.pop(info.si_pid, None)
            if job is not None:
                self._finish_job(job, info)
            else:
                self._forget_spare(info.si_pid)
                os.waitpid(info.si_pid, 0)  # already exited: returns at once

    def _forget_spare(self, pid: int) -> None:
        for spare in self.spares:
            if spare.pid == pid:
                self.spares.remove(spare)
                spare.ctl.close()
                os.close(spare.fault_fd)
                return

    def _finish_job(self, job: _Job, info: os.waitid_result) -> None:
        _proctree.signal_tree(job.pid, (), signal.SIGKILL)
        self._end_adopted(also_known=job.pid)
        os.waitpid(job.pid, 0)
        exitcode = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
        fault_log = _protocol.read_text(job.fault_fd) if exitcode != 0 else ""
        os.close(job.fault_fd)
        try:
            body = f"{job.pid} {exitcode}\n".encode() + fault_log.encode(errors="replace")
            _protocol.send(job.ctl, _protocol.EXITED, body)
        except OSError:
            pass  # the caller already left
        try:
            job.data.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        job.data.close()
        self.by_ctl.pop(job.ctl.fileno(), None)
        if job.ctl.fileno() in self.selector.get_map():
            self.selector.unregister(job.ctl)
        job.ctl.close()

    def _end_adopted(self, also_known: int = 0) -> None:
        """Kill every child we did not fork: orphans of a dead worker's tree."""
        known = {*self.jobs, *(s.pid for s in self.spares), also_known}
        children = _proctree.own_children()
        if children is None:  # pragma: no cover - kernels without CONFIG_PROC_CHILDREN
            children = [p.pid for p in _proctree.descendants(self.pid) if p.ppid() == self.pid]
        adopted = [pid for pid in children if pid not in known]
        if not adopted:
            return
        tree = [t for pid in adopted for t in _proctree.process_and_descendants(pid)]
        _proctree.signal_tree(None, tree, signal.SIGKILL)
        _proctree.wait_gone(tree, 2.0)
        for proc in tree:
            try:
                os.waitpid(proc.pid, os.WNOHANG)  # ours once their parents died
            except ChildProcessError:
                pass

    # -- life -----------------------------------------------------------------------------

    def serve_forever(self) -> None:
        self._refill()
        try:
            while True:
                for key, _ in self.selector.select():
                    # A handler earlier in this batch may have closed this one's socket
                    # (a worker's exit finishes its call); its event is stale.
                    if self.selector.get_map().get(key.fd) is key:
                        try:
                            key.data()
                        except (SystemExit, KeyboardInterrupt):
                            raise
                        except Exception as exc:  # one call's trouble must not end every call
                            _complain("unexpected error", exc)
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        self._retire_spares()
        for job in list(self.jobs.values()):
            tree = [*_proctree.process_and_descendants(job.pid)]
            _proctree.signal_tree(job.pid, tree, signal.SIGKILL)
        self._end_adopted()
        deadline_fds = [fd for fd in (_proctree.pidfd_open(pid) for pid in self.jobs) if fd is not None]
        _proctree.wait_fds(deadline_fds, 2.0)
        for fd in deadline_fds:
            os.close(fd)
        self._reap_all()


# ASCII unit/record separators: never in a module name or a path, and allowed in argv
# (the first preloads travel there), unlike NUL.
_UNIT, _RECORD = "\x1f", "\x1e"


def encode_preload(names: list[str], path: list[str]) -> bytes:
    return (_UNIT.join(names) + _RECORD + _UNIT.join(path)).encode()


def _decode_preload(body: bytes) -> tuple[list[str], list[str]]:
    names, _, path = body.decode().partition(_RECORD)
    return [n for n in names.split(_UNIT) if n], path.split(_UNIT)


def _hung_up(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _complain(what: str, exc: BaseException) -> None:
    print(f"asyncproc fork server (pid {os.getpid()}): {what}: {exc!r}", file=sys.stderr)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _raise_fd_limit() -> None:
    # Three descriptors per call in flight: the default soft limit (often 1024) would
    # cap concurrency far below what the hard limit allows. Workers get the usual one back.
    global _worker_nofile
    _worker_nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (_worker_nofile[1], _worker_nofile[1]))


_worker_nofile: tuple[int, int] | None = None


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    """``python -c 'from asyncproc._server import main; main()' SPARES PRELOAD``; fd 3 is the channel."""
    try:
        os.setsid()  # Ctrl-C at the terminal is the caller's to handle, not ours
    except PermissionError:  # already a session leader (posix_spawn setsid=True)
        pass
    _proctree.set_comm("asyncproc-srv")
    _proctree.make_subreaper()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGHUP):  # stopped from outside: end every call's tree first
        signal.signal(sig, _exit_on_signal)
    _raise_fd_limit()
    channel = socket.socket(fileno=3)
    server = Server(channel, spares=int(sys.argv[1]))
    if len(sys.argv) > 2 and sys.argv[2]:
        server._preload(*_decode_preload(sys.argv[2].encode()))
    try:
        server.serve_forever()
    except SystemExit:
        pass
    os._exit(0)
