"""Children die with their parent, on every backend: the parent side of the guardian.

Why not ``PR_SET_PDEATHSIG``: it fires when the *thread* that forked the child exits, and
trio spawns on worker threads that exit after 10 s idle (a child was SIGKILLed 10 s after
start while its parent lived); setting it needs a ``preexec_fn``, which disables CPython's
vfork fast path (37 ms instead of 0.6 ms per spawn at 1 GB resident).

Instead, one tiny guardian process per parent (``guardian_main.py``, named
``asyncproc-srv``), started lazily on the first registration. The parent keeps the only
write end of a *lifeline* pipe whose read end is the guardian's stdin; the kernel closes it
whatever way the parent dies, SIGKILL included. Each spawned child is registered (pid and
start time) and unregistered once reaped; on EOF the guardian SIGKILLs what is still
registered, with descendants, group and session, and exits. At interpreter exit the parent
closes the lifeline itself and reaps the guardian, so it is never left behind: children the
program leaked die then, as they would have with the program.

Cgroups (``_proc.cgroup``) and a launcher's temporary folder are registered too: the guardian
kills and removes the cgroups, then removes the folders.

A guardian that dies (someone SIGKILLs it) is noticed at once by a watcher thread blocked
on its pidfd, which starts a new one already told the whole registry: children are never
killed because their guardian was, and run unguarded only for the few milliseconds that
takes.

The write end is close-on-exec and closed in ``fork()``-ed children, so no descendant keeps
the lifeline open after the parent is gone.
"""

from __future__ import annotations

import atexit
import logging
import os
import select
import subprocess
import sys
import threading
from pathlib import Path

from .._proc import cgroup as _cgroup
from .._proc import procfs as _procfs
from .._proc import proctree as _proctree
from . import guardian_main as _guardian_main

__all__ = ["register", "unregister", "register_cgroup", "register_folder", "unregister_folder",
           "unregister_cgroup", "register_marker",
           "guardian_pid", "shutdown"]

log = logging.getLogger("asyncproc")

# The script and the stdlib-only core modules it loads by path (it runs outside the package).
_COMMAND = [str(Path(m.__file__ or "").resolve()) for m in (_guardian_main, _procfs, _cgroup)]
_EXIT_BOUND_S = 2.0  # at interpreter exit, how long the guardian may take to sweep and exit

_lock = threading.RLock()  # handlers may spawn from several threads / event loops
_proc: subprocess.Popen[bytes] | None = None
_lifeline: int | None = None  # the write end; only this process holds it
_starting_read: int | None = None  # the guardian's end, ours only while it starts
_registered: dict[int, int] = {}  # pid -> start time, replayed to a restarted guardian
_extra: dict[bytes, None] = {}  # cgroup and folder lines (an ordered set), replayed too
_PIPE_CAPACITY = 65536  # Linux's default: a registry smaller than this is written before start
_warned = False


def register(pid: int) -> None:
    """Have ``pid`` (our unreaped child) killed if this process dies before reaping it."""
    stat = _procfs.read_stat(pid)
    if stat is None:  # pragma: no cover - an unreaped child always has a /proc entry
        return
    with _lock:
        _registered[pid] = stat.starttime
        _send(f"+{pid} {stat.starttime}\n".encode())


def unregister(pid: int) -> None:
    """``pid`` was reaped: it is no longer ours to kill."""
    with _lock:
        if _registered.pop(pid, None) is not None:
            _send(f"-{pid}\n".encode())


def register_cgroup(path: str) -> None:
    """Have everything in cgroup ``path`` killed, and the cgroup removed, when we die."""
    _add(b"C" + os.fsencode(path).hex().encode())


def unregister_cgroup(path: str) -> None:
    """We removed cgroup ``path`` ourselves."""
    _remove(b"C", b"c", path)


def register_folder(path: str) -> None:
    """Have folder ``path`` removed when we die (after every registered process is dead)."""
    _add(b"D" + os.fsencode(path).hex().encode())


def register_marker(entry: str) -> None:
    """Have every process whose environment holds ``entry`` (``NAME=VALUE``) killed when we
    die: how the descendants of our children are found where there are no cgroups."""
    _add(b"E" + entry.encode().hex().encode())


def unregister_folder(path: str) -> None:
    """We removed ``path`` ourselves."""
    _remove(b"D", b"d", path)


def _remove(added: bytes, removed: bytes, path: str) -> None:
    encoded = os.fsencode(path).hex().encode()
    with _lock:
        if _extra.pop(added + encoded, False) is not False:
            _send(removed + encoded + b"\n")


def _add(line: bytes) -> None:
    with _lock:
        if line not in _extra:
            _extra[line] = None
            _send(line + b"\n")


def guardian_pid() -> int | None:
    """The running guardian's pid (for tests and diagnostics), or None."""
    with _lock:
        return _proc.pid if _proc is not None and _proc.poll() is None else None


def _state() -> bytes:
    """Everything registered, as protocol lines: what a new guardian must be told."""
    return b"".join([*(f"+{pid} {start}\n".encode() for pid, start in _registered.items()),
                     *(line + b"\n" for line in _extra)])


def _send(message: bytes) -> None:
    """Write one protocol line (the caller has updated the registry and holds the lock);
    start or restart the guardian, told the whole registry, when there is none.

    Lines are far below PIPE_BUF, so each write is atomic; the guardian drains the pipe
    in a tight loop, so the 64 KiB pipe buffer never fills in practice.
    """
    if _lifeline is None:
        if _registered or _extra:  # nothing to guard: no guardian needed (yet)
            _start()
        return
    try:
        os.write(_lifeline, message)
    except BrokenPipeError:
        # Someone killed the guardian (and its watcher has not restarted it yet).
        log.warning("asyncproc guardian (pid %s) died; starting a new one", _proc.pid if _proc else "?")
        _drop()
        _start()


def _start() -> bool:
    """Start a guardian told the whole registry; False (and one warning) when it cannot be
    started."""
    global _proc, _lifeline, _starting_read, _warned
    read_end, write_end = os.pipe()  # both close-on-exec; Popen dup2s read_end onto 0
    # Known before Popen: a fork() from another thread meanwhile closes both in its child,
    # which would otherwise hold the lifeline open after we die.
    _lifeline, _starting_read = write_end, read_end
    state = _state()
    # Written before it exists: once its pid can be seen, it already holds the registry,
    # so a SIGKILL of this process right after a restart still ends every child.
    early = len(state) < _PIPE_CAPACITY
    try:
        if early:
            os.write(write_end, state)
        _proc = subprocess.Popen(
            [sys.executable, "-I", "-S", *_COMMAND],
            stdin=read_end,
            stdout=subprocess.DEVNULL,
            # Its own session: Ctrl-C or a kill of our process group must not reach it
            # before it has done its job.
            start_new_session=True,
        )
    except BaseException as exc:
        os.close(write_end)
        _lifeline = None
        if not isinstance(exc, OSError):
            raise
        if not _warned:
            log.warning("cannot start the asyncproc guardian (%s): children will not die with this process", exc)
            _warned = True
        return False
    finally:
        os.close(read_end)
        _starting_read = None
    if not early:
        os.write(write_end, state)
    _watch(_proc)
    return True


def _watch(proc: subprocess.Popen[bytes]) -> None:
    """Notice the guardian's death at once (someone SIGKILLed it): start another, told the
    whole registry, so our children never run unguarded for longer than that takes."""
    pidfd = _proctree.pidfd_open(proc.pid)
    if pidfd is None:  # pragma: no cover - kernels before 5.3: noticed at the next write
        return

    def watch() -> None:
        try:
            poller = select.poll()  # not select(): the fd number may be above 1024
            poller.register(pidfd, select.POLLIN)
            poller.poll()
        finally:
            os.close(pidfd)
        with _lock:
            if _proc is not proc:  # shut down or replaced meanwhile: nothing to do
                return
            log.warning("asyncproc guardian (pid %d) died; starting a new one", proc.pid)
            _drop()
            if _registered or _extra:
                _start()

    threading.Thread(target=watch, name="asyncproc-guardian-watch", daemon=True).start()


def _drop() -> None:
    """Forget the current guardian after closing our end of its lifeline."""
    global _proc, _lifeline
    if _lifeline is not None:
        os.close(_lifeline)
        _lifeline = None
    if _proc is not None:
        _proc.poll()  # reap it if it already exited
        _proc = None


def shutdown(timeout: float = _EXIT_BOUND_S) -> None:
    """Close the lifeline and reap the guardian (it kills still-registered children first).

    Runs at interpreter exit; bounded, since a guardian stuck in the kernel must not keep
    the program from exiting.
    """
    global _proc, _lifeline
    with _lock:
        proc, _proc = _proc, None
        if _lifeline is not None:
            os.close(_lifeline)
            _lifeline = None
        _registered.clear()
        _extra.clear()
        if proc is None:
            return
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("asyncproc guardian (pid %d) did not exit within %.1f s", proc.pid, timeout)


def _forget_in_child() -> None:
    """After ``fork()``: the lifeline and the guardian belong to the parent, not to us.

    The child must not hold the write end (the guardian would never see EOF while the
    child lives), and it starts its own guardian for its own children if it needs one.
    """
    global _proc, _lifeline, _starting_read, _lock
    _lock = threading.RLock()  # another thread may have held it at fork time
    for fd in (_lifeline, _starting_read):  # the read end only while a guardian starts
        if fd is not None:
            os.close(fd)
    _lifeline = _starting_read = None
    if _proc is not None:
        _proc.returncode = 0  # not our child: keep Popen from waiting on it or warning
        _proc = None
    _registered.clear()
    _extra.clear()


os.register_at_fork(after_in_child=_forget_in_child)
atexit.register(shutdown)
