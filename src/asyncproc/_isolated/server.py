"""The fork server: a lean process that forks workers ahead of demand.

Started lazily by the first "forkserver" call as ``python -c`` (so the caller's
``__main__`` is never imported), with one SEQPACKET channel to the caller on fd 3. Per
call the caller sends SPAWN with two fresh descriptors: ``ctl`` (server <-> caller) and
``data`` (worker <-> caller), or a pair per worker when it asks for a batch. The server
forks a worker that inherits both and keeps its own copy of ``data``. The caller asks
ahead of demand (it keeps a reserve of workers that wait for a call), so the fork is off
the call's critical path, and a call wakes no process but its worker: there is no idle
spare to hand the call to first.

The worker sends HELLO with its pid on ``ctl`` before it reads a call: a caller that got
no HELLO knows its call never ran and can retry it, should the server die.

The caller's context (sys.path, cwd, environment) reaches the server in CONTEXT when it
changes; the server makes it its own, so the workers it forks inherit it and a call
carries none.

Every call costs a fork and an exit here, so the server is kept lean: C modules only on its
path (each page it holds is a page-table entry every fork copies and every exit drops),
freed memory handed back after imports, forks back to back with nothing written between
them, and each worker's cgroup reused by a later worker once nobody can name it (see
_keep_spare).

When the worker exits the server (1) SIGKILLs the rest of the worker's process group while
the unreaped worker still reserves the group id, and the worker's cgroup when it has live
members (an empty one is kept for reuse), (2) kills any process it adopted (workers are subreapers, so an orphan reaching the server
can only come from a dead worker's tree), (3) reaps, and lets the call *drain*: only once
its cgroup is empty (or, without one, no adopted process is left; or the kill bound has
passed) does it (4) send EXITED with the status and faulthandler's output on ``ctl``, and
then (5) shut ``data`` down. The caller waits on ``data`` alone: at end-of-stream it knows
EXITED is already queued on ``ctl`` and that everything is gone. Draining is a state, not
a wait: the loop keeps serving other calls meanwhile, and each round costs one read of our
own children list (no scan of /proc), so one call's thousand orphans never delay the others.

Signals (SIGTERM, SIGHUP, SIGCHLD) only write a byte to a wake-up pipe and set a flag; the
loop acts on them. A handler that raised would land in whatever code runs at that moment
(logging's after-fork hook, say) and could be swallowed there.

The channel is also the lifeline: at its end-of-stream (the caller exited or was killed)
the server ends every worker's tree and exits. Workers die with the server
(PR_SET_PDEATHSIG; the server is single-threaded, so "parent thread" means the server).
"""

from __future__ import annotations

# C modules only (_pickle, not pickle; _socket, not socket; _signal, not signal; epoll,
# not selectors): their pure-Python wrappers pull in re, enum, functools and collections,
# some 2 MB whose page tables every fork copies and every worker's exit tears down again
# (measured: 40 us more per fork, 50 us more per worker exit).
import _pickle
import _signal
import _socket
import faulthandler
import gc
import importlib
import itertools
import os
import resource
import select
import sys
import time

from .._proc import cgroup as _cgroup
from .._proc import proctree as _proctree
from . import protocol as _protocol
from . import worker as _worker

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, NoReturn


# After SIGKILL a process normally vanishes in microseconds; one in uninterruptible sleep
# may take forever: past this, a call is reported even if some of its tree lingers.
_KILL_BOUND_S = 2.0
_REAP_BATCH = 32  # zombies reaped between two looks at requests (~10 ms here)
# Empty cgroups kept for reuse, at most (more are removed): a burst of concurrent calls
# must not leave one per call behind.
SPARE_CGROUPS_MAX = 16


class _Job:
    __slots__ = ("pid", "ctl", "data", "fault_fd", "cgroup", "exitcode", "unstarted", "deadline", "spare", "caller_done",
                 "start")

    def __init__(self, pid: int, ctl: _socket.socket, data: _socket.socket, fault_fd: int, cgroup: str | None):
        self.pid = pid
        self.ctl = ctl  # to the caller
        self.data = data  # our copy of the worker's data socket; shut down at the end
        self.fault_fd = fault_fd
        self.cgroup = cgroup
        self.exitcode = 0
        self.unstarted = False  # the worker died with the call unread: safe to retry
        self.spare: str | None = None  # its cgroup, found empty: another worker's once the caller lets go
        self.caller_done = False  # end-of-stream on ctl: the caller holds the cgroup's name no more
        self.start: _worker.ForkedStart | None = None  # what a forked worker needs at start-up
        self.deadline = 0.0  # while draining: report by then, whatever is left


class Server:
    def __init__(self, channel: _socket.socket, cgroup_root: str | None = None):
        self.channel = channel
        self.jobs: dict[int, _Job] = {}
        self.draining: list[_Job] = []
        self.by_ctl: dict[int, _Job] = {}
        self.poller = select.epoll()
        self.handlers: dict[int, Callable[[], None]] = {}  # by descriptor, what its readiness calls
        self.pid = os.getpid()
        # Created for us by the caller, who kills it whole if we die; a cgroup per worker below.
        self.cgroup_root = cgroup_root
        self.cgroup_names = itertools.count()
        self.retired_cgroups: list[str | None] = []
        # Empty cgroups no caller can name any more, for the next workers: a mkdir and an
        # rmdir less per call. Never one whose caller could still kill it by name (on a
        # timeout, or should we die): see _keep_spare.
        self.spare_cgroups: list[str] = []
        self.awaiting: list[_Job] = []  # reported, cgroup spare, waiting for the caller to let go
        self.adopted = _proctree.Adopted(keep=self.jobs)  # orphans of dead workers' trees
        self.reap_pending = False  # the last reaping stopped at its batch size
        wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wake_r = wake_r
        _signal.set_wakeup_fd(self.wake_w)  # before the handlers: no signal can come unseen
        for sig in (_signal.SIGCHLD, _signal.SIGTERM, _signal.SIGHUP):
            _signal.signal(sig, _note_signal)
        self._watch(channel.fileno(), self._on_request)
        self._watch(wake_r, self._on_signal)
        _worker.bind_libc()  # for every worker's start-up
        _worker.close_serving_in_forks()  # here, once, not in every worker

    @property
    def stop_signal(self) -> int:
        return _stopped_by[0]

    def _watch(self, fd: int, handler: Callable[[], None]) -> None:
        self.poller.register(fd, select.EPOLLIN)
        self.handlers[fd] = handler

    def _unwatch(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            self.poller.unregister(fd)

    # -- workers --------------------------------------------------------------------------

    def _new_cgroup(self) -> str | None:
        if self.cgroup_root is None:
            return None
        if not self.spare_cgroups and self.awaiting:
            self._collect_spares()
        if self.spare_cgroups:
            return self.spare_cgroups.pop()
        return _cgroup.create(str(next(self.cgroup_names)), parent=self.cgroup_root)

    def _prepare_job(self, ctl: _socket.socket, data: _socket.socket) -> _Job:
        fault_fd = os.memfd_create("asyncproc-fault", os.MFD_CLOEXEC)
        try:
            cgroup = self._new_cgroup()  # the worker attaches itself before it reads the call
        except BaseException:
            os.close(fault_fd)
            raise
        job = _Job(0, ctl, data, fault_fd, cgroup)
        job.start = _worker.forked_start(ctl, data, self.pid, cgroup, fault_fd, _FAULT_FD, _worker_nofile)
        return job

    def _run_worker(self, job: _Job) -> NoReturn:
        """In the child of a fork: become the job's worker, serve its call, exit."""
        try:
            start = job.start
            assert start is not None
            _forked_from_server(start)
        finally:
            os._exit(70)

    # -- requests -------------------------------------------------------------------------

    def _on_request(self) -> None:
        # Every queued request first, then their forks back to back: each fork shares all our
        # pages again, and a page written between two forks is copied again after the next
        # (about 4 us a page here). The caller asks for its reserve in batches.
        forks: list[tuple[_socket.socket, _socket.socket]] = []
        try:
            while True:
                self._take_request(forks)
                if not select.select([self.channel], (), (), 0)[0]:
                    break
        finally:
            self._fork_workers(forks)

    def _take_request(self, forks: list[tuple[_socket.socket, _socket.socket]]) -> None:
        try:
            msg = _protocol.recv(self.channel, _protocol.SERVER_MAX_FDS)
        except (ConnectionResetError, BrokenPipeError):
            msg = None
        except OSError as exc:  # e.g. descriptors dropped (EMFILE): that request is lost, not us
            _complain("could not receive a request", exc)
            return
        if msg is None:
            raise SystemExit(0)  # lifeline cut: the caller is gone (raised in the loop, not a handler)
        if msg.tag == _protocol.SPAWN:
            self._take_spawn(bytes(msg.body), msg.fds, forks)
        elif msg.tag == _protocol.PRELOAD:
            self._preload(*_decode_preload(bytes(msg.body)))
        elif msg.tag == _protocol.CONTEXT:
            _take_context(bytes(msg.body))
        else:  # pragma: no cover - a protocol bug, not a user error
            for fd in msg.fds:
                os.close(fd)

    def _take_spawn(self, kind: bytes, fds: list[int], forks: list[tuple[_socket.socket, _socket.socket]]) -> None:
        """A worker per (ctl, data) pair in ``fds`` (the caller's reserve asks for a batch
        at once). A pair we cannot serve is closed unanswered, which tells its caller that
        its call never started; the other pairs are served all the same."""
        fresh = kind[:1] == _protocol.FRESH
        pairs = []
        for i in range(0, len(fds), 2):
            try:
                pairs.append(_adopt_pair(fds[i : i + 2]))
            except Exception as exc:  # not a pair of sockets: a protocol bug, or EMFILE
                _complain("could not start a worker", exc)
        gave_up = _hung_up([ctl for ctl, _ in pairs])  # while this request waited: fork nothing
        for ctl, data in pairs:
            if ctl.fileno() in gave_up:
                ctl.close()
                data.close()
                continue
            try:
                self._start_job(ctl, data, forks, fresh=fresh, binding=kind[1:])
            except Exception as exc:  # spawn or memfd failed (EAGAIN, EMFILE, ENOMEM)
                ctl.close()
                data.close()
                _complain("could not start a worker", exc)

    def _start_job(
        self,
        ctl: _socket.socket,
        data: _socket.socket,
        forks: list[tuple[_socket.socket, _socket.socket]],
        fresh: bool = False,
        binding: bytes = b"",
    ) -> None:
        ctl.setblocking(False)  # a stale readiness event must never block the server
        if fresh:
            self._start_fresh(ctl, data, _pickle.loads(binding) if binding else None)
            return
        forks.append((ctl, data))

    def _fork_workers(self, forks: list[tuple[_socket.socket, _socket.socket]]) -> None:
        # Every worker's needs first, then the forks back to back, then the bookkeeping:
        # each fork shares all our pages again, and a page written between two forks is
        # copied again after the next. (With each fork followed by its own bookkeeping,
        # some 70 pages were copied per fork.)
        ready: list[_Job] = []
        for ctl, data in forks:
            try:
                ready.append(self._prepare_job(ctl, data))
            except Exception as exc:  # memfd failed (EMFILE, ENOMEM)
                ctl.close()  # unanswered: that caller knows its call never started
                data.close()
                _complain("could not start a worker", exc)
        forked = self._fork_batch(ready)
        for job in ready[forked:]:
            os.close(job.fault_fd)
            _remove_cgroup(job.cgroup)
            job.ctl.close()  # unanswered: that caller knows its call never started
            job.data.close()
        for job in ready[:forked]:
            self._register(job)

    def _fork_worker(self, ctl: _socket.socket, data: _socket.socket) -> _Job:
        """One worker, forked now; the caller registers it."""
        job = self._prepare_job(ctl, data)
        if not self._fork_batch([job]):
            os.close(job.fault_fd)
            _remove_cgroup(job.cgroup)
            raise OSError("asyncproc: could not fork a worker")
        return job

    def _fork_batch(self, jobs: list[_Job]) -> int:
        """Fork the jobs' workers back to back, nothing allocated in between; how many
        were forked (a failed fork ends the batch: the rest are not started)."""
        # Objects that exist now move to the permanent generation: a collection in a
        # worker then never touches (and so never copies) the pages we share.
        gc.freeze()
        _worker.warm_lookups()
        forked = 0
        try:
            for job in jobs:
                job.pid = os.fork()
                if job.pid == 0:
                    self._run_worker(job)
                forked += 1
        except Exception as exc:  # EAGAIN, ENOMEM
            _complain("could not start a worker", exc)
        return forked

    def _start_fresh(self, ctl: _socket.socket, data: _socket.socket, binding: Any) -> None:
        """"spawn": a new interpreter, but ours, so it gets every guarantee a forked worker
        has (we are its subreaper, its lifeline and its reaper). It reads the call itself.
        A NUMA binding is set on our (only) thread around the spawn: the child has it from
        its first instruction, and posix_spawn keeps its vfork path."""
        fault_fd = os.memfd_create("asyncproc-fault", os.MFD_CLOEXEC)
        cgroup = self._new_cgroup()  # the child attaches itself before it runs anything
        try:
            code = f"from {_worker.__name__} import spawn_main; spawn_main()"
            fds = {3: data.fileno(), 4: fault_fd}
            argv = [str(self.pid), cgroup or ""]
            if binding is None:
                pid = _worker.spawn_python(code, argv, fds)
            else:
                with binding.on_this_thread():
                    pid = _worker.spawn_python(code, argv, fds)
        except BaseException:
            os.close(fault_fd)
            _remove_cgroup(cgroup)
            raise
        self._register(_Job(pid, ctl, data, fault_fd, cgroup))
        try:
            _protocol.send(ctl, _protocol.HELLO, _worker.hello(pid, cgroup))
        except OSError:
            pass

    def _register(self, job: _Job) -> None:
        self.jobs[job.pid] = job
        self.by_ctl[job.ctl.fileno()] = job
        self._watch(job.ctl.fileno(), lambda: self._on_ctl(job))

    def _on_ctl(self, job: _Job) -> None:
        try:
            msg = _protocol.recv(job.ctl)
        except BlockingIOError:
            return
        except OSError:
            msg = None
        # End-of-stream means the caller stopped caring (it has its value, or it was
        # cancelled, or it died): nothing of the call may live on.
        sig = _signal.SIGTERM if msg is not None and msg.tag == _protocol.TERM else _signal.SIGKILL
        if msg is None:
            self._unwatch(job.ctl.fileno())
            job.caller_done = True  # before the report (after it ctl is not watched)
            self._keep_spare(job)
        if job.pid not in self.jobs:
            return
        if sig == _signal.SIGKILL:
            # No tree walk (a scan of all of /proc): the worker is a subreaper, so once it
            # is dead whatever escaped its group is re-parented to us, and self.adopted
            # finds it from our own children list.
            _proctree.signal_tree(job.pid, (), sig)
            if job.cgroup is not None:
                _cgroup.kill(job.cgroup)
        elif job.cgroup is not None:  # the cgroup lists the whole tree: no scan of /proc
            _proctree.signal_tree(job.pid, (), sig)
            _cgroup.signal(job.cgroup, sig)
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
            _release_free_memory()

    # -- exits ----------------------------------------------------------------------------

    def _on_signal(self) -> None:
        _drain_pipe(self.wake_r)
        if self.stop_signal:
            raise SystemExit(128 + self.stop_signal)  # in the loop: shutdown() ends every tree
        self._reap_all(_REAP_BATCH)

    def _reap_all(self, batch: int = 1 << 30) -> None:
        """Reap what has exited, ``batch`` at most: a thousand orphans take the kernel a
        few hundred ms to release, and the loop serves requests between batches."""
        self.reap_pending = False
        for _ in range(batch):
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
                self.adopted.reap(info.si_pid)  # an orphan; already exited: returns at once
        else:
            self.reap_pending = True  # back to select() with no wait, then on

    def _finish_job(self, job: _Job, info: os.waitid_result) -> None:
        # The worker is dead but unreaped: its pid still reserves its group id.
        _proctree.signal_tree(job.pid, (), _signal.SIGKILL)
        if job.cgroup is not None:
            if not _cgroup.populated(job.cgroup):
                # Nothing alive in it (a zombie does not count): nothing of the call runs,
                # and nothing can be born there any more. No kill, no look later; the
                # cgroup serves another worker once the caller lets go of its name.
                job.spare, job.cgroup = job.cgroup, None
                self._keep_spare(job)
            else:
                _cgroup.kill(job.cgroup)
        job.exitcode = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
        # Killed (by us, at shutdown, or by the OOM killer) before it read its call: the call
        # never ran and is safe to retry. One that exited by itself failed to start: a crash.
        job.unstarted = job.exitcode == -_signal.SIGKILL and (_call_unread(job.data) or _still_idle(job.pid))
        os.waitpid(job.pid, 0)
        job.deadline = time.monotonic() + _KILL_BOUND_S
        self.draining.append(job)

    def _drain(self) -> float | None:
        """Report the draining calls whose trees are gone (or out of time); the seconds
        until the next deadline, or None when nothing drains."""
        if not self.draining:
            return None
        # In this order: a cgroup found empty holds no live process, but its last ones may
        # still be on their way to becoming our zombies; after the reaping, our children
        # list shows each that is not reaped yet. "Gone" means reaped too.
        draining, self.draining = self.draining, []
        empty = [j.cgroup is None or not _cgroup.populated(j.cgroup) for j in draining]
        # A worker that died since this round began is reaped here and starts draining now:
        # its emptiness was not looked at above, so it waits for the next round (at once,
        # below). Judged with the others, it would be dropped unreported, and its caller
        # would hear nothing until its own timeout.
        self._reap_all(_REAP_BATCH)
        started = self.draining
        # SIGKILLs each orphan once (cgroup.kill did already; workers are subreapers, so an
        # orphan reaching us comes from a dead worker's tree); with zombies to reap, later.
        adopted = self.reap_pending or bool(self.adopted.step(batch=_REAP_BATCH))
        now = time.monotonic()
        waiting = []
        for job, job_empty in zip(draining, empty, strict=True):
            if (job_empty and not adopted) or now >= job.deadline:
                self._report(job)
            else:
                waiting.append(job)
        self.draining = waiting + started
        if started:
            return 0.0
        return min((j.deadline for j in waiting), default=now) - now if waiting else None

    def _keep_spare(self, job: _Job) -> None:
        """Reuse the job's empty cgroup once its worker is reaped (so nothing of the call can
        enter it again) and its caller has closed ctl: a caller ends a worker's tree by the
        cgroup's name (HELLO told it) on a timeout or when we die, and must never reach a
        later call's worker that way. A caller closes ctl only once it is done with the
        call; a fork of it closes its copy at once (api's _IN_FLIGHT)."""
        if job.spare is not None and job.caller_done:
            if len(self.spare_cgroups) < SPARE_CGROUPS_MAX or not _removed(job.spare):
                self.spare_cgroups.append(job.spare)
            job.spare = None

    def _collect_spares(self) -> None:
        """The cgroups of reported calls whose callers have closed ctl since: one poll."""
        poller = select.poll()
        for job in self.awaiting:
            poller.register(job.ctl, select.POLLIN)
        readable = {fd for fd, _ in poller.poll(0)}
        waiting = []
        for job in self.awaiting:
            if job.ctl.fileno() in readable and _protocol.read_until(job.ctl, None):
                job.caller_done = True
                self._keep_spare(job)
                job.ctl.close()
            else:
                waiting.append(job)
        self.awaiting = waiting

    def _give_up_spare(self, job: _Job) -> None:
        job.ctl.close()
        if job.spare is not None and not _removed(job.spare):  # pragma: no cover - an empty cgroup
            self.retired_cgroups.append(job.spare)
        job.spare = None

    def _report(self, job: _Job) -> None:
        fault_log = _protocol.read_text(job.fault_fd) if job.exitcode != 0 else ""
        os.close(job.fault_fd)
        try:
            head = f"{job.pid} {job.exitcode}{' unstarted' if job.unstarted else ''}\n"
            _protocol.send(job.ctl, _protocol.EXITED, head.encode() + fault_log.encode(errors="replace"))
        except OSError:
            pass  # the caller already left
        try:
            job.data.shutdown(_socket.SHUT_RDWR)
        except OSError:
            pass
        job.data.close()
        self.by_ctl.pop(job.ctl.fileno(), None)
        self._unwatch(job.ctl.fileno())
        if job.spare is None or job.caller_done:
            job.ctl.close()
        else:
            # ctl stays open for the caller's end-of-stream, which frees the cgroup. Not
            # watched: a caller may close it only once it has read this report, and being
            # woken for that alone would cost every call a wake-up. Looked at when a
            # cgroup is wanted (_collect_spares).
            self.awaiting.append(job)
            if len(self.awaiting) > SPARE_CGROUPS_MAX:  # callers that keep theirs open
                self._give_up_spare(self.awaiting.pop(0))
        if job.cgroup is not None and not _cgroup.remove(job.cgroup):
            self.retired_cgroups.append(job.cgroup)  # something in uninterruptible sleep

    def _remove_retired_cgroups(self) -> None:
        self.retired_cgroups = [c for c in self.retired_cgroups if c is not None and not _cgroup.remove(c)]

    # -- life -----------------------------------------------------------------------------

    def serve_forever(self) -> None:
        timeout: float | None = None
        try:
            while True:
                ready = [(fd, self.handlers.get(fd)) for fd, _ in self.poller.poll(-1 if timeout is None else timeout)]
                for fd, handler in ready:
                    # A handler earlier in this batch may have closed this one's socket
                    # (a worker's exit finishes its call), its number maybe reused since:
                    # the event is stale unless the same registration still holds.
                    if handler is not None and self.handlers.get(fd) is handler:
                        try:
                            handler()
                        except (SystemExit, KeyboardInterrupt):
                            raise
                        except Exception as exc:  # one call's trouble must not end every call
                            _complain("unexpected error", exc)
                if self.stop_signal:  # its wake-up byte may still be on its way
                    raise SystemExit(128 + self.stop_signal)
                if self.reap_pending:
                    self._reap_all(_REAP_BATCH)
                timeout = self._drain()
                if self.reap_pending:
                    timeout = 0.0
                if self.retired_cgroups:  # in uninterruptible sleep when we tried
                    self._remove_retired_cgroups()
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """Every call's tree ends, and every caller hears how its call ended (the ones
        whose worker never read its call hear so: they are retried on a new server)."""
        _signal.signal(_signal.SIGTERM, _signal.SIG_IGN)  # a second SIGTERM must not cut this short
        # First: the caller's next request then fails at once (it starts a new server)
        # instead of waiting in a queue nobody reads; the queued ones are dropped unanswered,
        # which tells their callers that those calls never started.
        self.channel.close()
        ours = list(self.jobs)  # our unreaped children: safe to signal
        if self.cgroup_root is not None:
            _cgroup.kill(self.cgroup_root)  # every worker and its tree, at once
        else:  # one scan of /proc for all of them, not one per call
            _proctree.signal_tree(None, _proctree.descendants(self.pid), _signal.SIGKILL)
        for pid in ours:
            _proctree.signal_tree(pid, (), _signal.SIGKILL)  # its group (workers lead theirs)
            _kill_quietly(pid)
        deadline = time.monotonic() + _KILL_BOUND_S
        fds = [fd for fd in map(_proctree.pidfd_open, ours) if fd is not None]
        try:
            _proctree.wait_fds(fds, _KILL_BOUND_S)
        finally:
            for fd in fds:
                os.close(fd)
        self._reap_all()
        while time.monotonic() < deadline:
            populated = self.cgroup_root is not None and _cgroup.populated(self.cgroup_root)
            if not self.adopted.step() and not populated:
                break
            _proctree.wait_fds([self.wake_r], 0.01)  # SIGCHLD: the next one died
            _drain_pipe(self.wake_r)
            self._reap_all()
        _proctree.Adopted().step(None)  # every exited child, before the reports: each means "reaped"
        while self.draining:  # a round may start some draining: each is reported
            for job in self.draining:
                job.deadline = 0.0
            self._drain()
        if self.cgroup_root is not None:
            _cgroup.remove(self.cgroup_root)


_stopped_by = [0]  # the signal that asks us to stop, once one has


def _note_signal(signum: int, frame: object) -> None:
    # Never raise here: this runs between any two bytecodes of the server. A function, not
    # a bound method: a worker resetting its handlers then frees nothing (no pages copied).
    if signum != _signal.SIGCHLD:
        _stopped_by[0] = signum


# ASCII unit/record separators: never in a module name or a path, and allowed in argv
# (the first preloads travel there), unlike NUL.
_UNIT, _RECORD = "\x1f", "\x1e"


def encode_preload(names: list[str], path: list[str]) -> bytes:
    return (_UNIT.join(names) + _RECORD + _UNIT.join(path)).encode()


def _decode_preload(body: bytes) -> tuple[list[str], list[str]]:
    names, _, path = body.decode().partition(_RECORD)
    return [n for n in names.split(_UNIT) if n], path.split(_UNIT)


def _take_context(body: bytes) -> None:
    """The caller's sys.path, cwd and environment (None: unchanged), made ours before we
    fork more workers: each inherits them, and a call carries none (nothing to decode or
    apply per call). A cwd we cannot enter is each later call's error, as it would be
    the worker's had it tried."""
    path, cwd, env = _pickle.loads(body)
    sys.path[:] = path
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
    try:
        os.chdir(cwd)
        _worker.context_error = None
    except OSError as exc:
        _worker.context_error = exc


def _release_free_memory() -> None:
    """Give the memory that imports used and freed back to the kernel: every page we hold is
    a page-table entry each fork copies and each worker's exit drops. Compiling a module
    with no .pyc (PYTHONDONTWRITEBYTECODE, a read-only tree) leaves some 1.7 MB of such
    holes in the heap; malloc_trim returns about half of it (the rest shares pages with
    live objects). Once per import, never per call."""
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim((0,))


_malloc_trim = _proctree.libc_function("malloc_trim")  # glibc only


def _call_unread(data: _socket.socket) -> bool:
    """After the worker died: whether its call still sits unread in its socket (so it never
    ran, and the caller may safely retry it). Shut down first: a call the caller sends
    from now on fails at its end instead of joining the queue we look at."""
    try:
        data.shutdown(_socket.SHUT_RD)
        return bool(data.recv(1, _socket.MSG_PEEK | _socket.MSG_DONTWAIT))
    except OSError:
        return False


def _still_idle(pid: int) -> bool:
    """After the worker died, before it is reaped (we look with WNOWAIT): whether it still
    had its idle name. A worker takes the running name as soon as its call is in, before
    any of it runs, so a worker that died idle never ran its call, even one it took: a
    SIGKILL that reaches a worker blocked in recvmsg as the call arrives lets the kernel
    hand it the call, and the worker never returns to user space."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f.read().rstrip(b"\n") == _worker.IDLE_NAME
    except OSError:
        return False


def _removed(cgroup: str) -> bool:
    """Whether ``cgroup`` could be removed at once: the usual end of a call, one rmdir where
    kill, a look at cgroup.events and then the rmdir took three times as long."""
    try:
        os.rmdir(cgroup)
    except FileNotFoundError:
        return True
    except OSError:  # EBUSY: something of the call lives on in it (or in a cgroup below)
        return False
    return True


def _remove_cgroup(cgroup: str | None) -> None:
    if cgroup is not None:
        _cgroup.kill(cgroup)
        _cgroup.remove(cgroup)


def _adopt_pair(fds: list[int]) -> tuple[_socket.socket, _socket.socket]:
    """A request's (ctl, data) descriptors as sockets, ours to close from now on. On
    failure none is left open (and none is closed twice: a socket closes its own)."""
    socks: list[_socket.socket] = []
    try:
        if len(fds) != 2:
            raise ValueError(f"a SPAWN request's descriptors come in pairs, one was left over: {fds}")
        for fd in fds:
            # Family and type named: two getsockopt() less each (getsockname still checks it).
            socks.append(_socket.socket(_socket.AF_UNIX, _socket.SOCK_SEQPACKET, 0, fd))  # ENOTSOCK: not a socket
    except BaseException:
        for sock in socks:
            sock.close()
        for fd in fds[len(socks) :]:
            _close_quietly(fd)
        raise
    return socks[0], socks[1]


def _hung_up(socks: list[_socket.socket]) -> set[int]:
    """The descriptors among ``socks`` whose peer has closed: one poll for them all."""
    # poll first: on the usual path (nothing queued) no BlockingIOError is built. (Not
    # select(): with a thousand calls in flight descriptors pass FD_SETSIZE.)
    poller = select.poll()
    by_fd = {}
    for sock in socks:
        poller.register(sock, select.POLLIN)
        by_fd[sock.fileno()] = sock
    gone = set()
    for fd, _ in poller.poll(0):
        try:
            if by_fd[fd].recv(1, _socket.MSG_PEEK | _socket.MSG_DONTWAIT) == b"":
                gone.add(fd)
        except BlockingIOError:
            pass
        except OSError:
            gone.add(fd)
    return gone


def _complain(what: str, exc: BaseException) -> None:
    print(f"asyncproc fork server (pid {os.getpid()}): {what}: {exc!r}", file=sys.stderr)


def _drain_pipe(fd: int) -> None:
    # One byte per signal: a full read means there may be more. (No read that ends in
    # BlockingIOError on every exit: each exception built here is pages copied.)
    try:
        while len(os.read(fd, 4096)) == 4096:
            pass
    except BlockingIOError:
        pass


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, _signal.SIGKILL)
    except ProcessLookupError:
        pass


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _raise_fd_limit() -> None:
    # Three descriptors per call in flight: the default soft limit (often 1024) would
    # cap concurrency far below what the hard limit allows. Workers get the usual one back.
    global _worker_nofile
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:  # nothing to raise, nothing for a worker to restore (a call saved)
        return
    _worker_nofile = (soft, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


_worker_nofile: tuple[int, int] | None = None
_forked_from_server = _worker.forked_from_server  # a global: no lookup in the child (see worker.py)
_FAULT_FD = -1  # where faulthandler writes: a copy of our stderr, a worker's own log in it


def main() -> None:
    """``python -c 'from asyncproc._isolated.server import main; main()' PRELOAD CGROUP``; fd 3 is the channel."""
    try:
        os.setsid()  # Ctrl-C at the terminal is the caller's to handle, not ours
    except PermissionError:  # already a session leader (posix_spawn setsid=True)
        pass
    _proctree.set_comm("asyncproc-srv")
    _proctree.make_subreaper()
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
    _raise_fd_limit()
    global _FAULT_FD
    _FAULT_FD = os.dup(2)
    faulthandler.enable(file=_FAULT_FD, all_threads=True)  # for us, and inherited by workers
    channel = _socket.socket(fileno=3)
    # Stopped from outside (SIGTERM, SIGHUP): Server turns that into an event of its loop,
    # which ends every call's tree first.
    server = Server(channel, cgroup_root=(sys.argv[2] if len(sys.argv) > 2 else "") or None)
    if len(sys.argv) > 1 and sys.argv[1]:
        server._preload(*_decode_preload(sys.argv[1].encode()))
    _release_free_memory()
    try:
        server.serve_forever()
    except SystemExit:
        pass
    os._exit(0)
