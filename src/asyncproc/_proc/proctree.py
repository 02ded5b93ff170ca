"""Finding, signalling, awaiting and reaping a process and everything it started.

Shared by every part of asyncproc that ends processes. The rules it encodes:

* A process group outlives its leader while members remain, and the leader's pid stays
  reserved (so cannot be reused) until the leader is reaped. So ``killpg`` is safe while
  the leader is alive or a zombie we have not reaped yet: signal first, reap last.
* A descendant that called ``setsid()`` left the group; only a walk of the process tree
  (psutil) finds it, and only while its ancestors are alive: take the snapshot before
  killing anyone.
* No wait is unbounded: a process in uninterruptible sleep ignores SIGKILL until the
  kernel lets go, and we must not hang with it.
"""

from __future__ import annotations

import _signal as signal  # not signal (enum) nor ctypes at import: the fork server stays lean
import _thread
import functools
import os
import select
import time

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (and re) at run time

if TYPE_CHECKING:  # imported where used: the fork server and its workers stay lean
    import ctypes
    from collections.abc import Callable, Container, Iterable

    import psutil

    from .procfs import Stat

__all__ = [
    "KILL_BOUND_S",
    "Adopted",
    "libc",
    "libc_function",
    "pidfds_of",
    "descendants",
    "exitcode_of",
    "make_subreaper",
    "pidfd_open",
    "reap",
    "set_comm",
    "set_parent_death_signal",
    "signal_tree",
    "process_and_descendants",
    "trees_of",
    "shared_scan",
    "family_of",
    "wait_fds",
    "has_exited",
    "own_children",
    "children_of",
    "group_members",
    "wait_exit",
    "wait_gone",
    "wait_pids",
]

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_PR_SET_CHILD_SUBREAPER = 36

# After SIGKILL a process normally vanishes in microseconds; one in uninterruptible sleep
# may take forever, and no wait of ours may hang with it: every wait after a SIGKILL is
# bounded by this.
KILL_BOUND_S = 2.0

_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    """The C library (errno kept for ctypes.get_errno), loaded once per process."""
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def libc_function(name: str) -> Callable[[tuple[int | bytes, ...]], int] | None:
    """The C library's function ``name`` as ``f(args_tuple) -> int``, or None (not CPython,
    or no such symbol). Through _ctypes' undocumented ``dlsym``/``call_function`` (in
    CPython since 2.5; pinned in tests/test_dependencies.py): the ctypes package would add
    its modules to the fork server, and its usual call path (the CDLL lookup, argument
    objects, the errno swap) copies some 40 pages per call in a freshly forked worker,
    this about 10. Ints go as C ints, sign-extended to full registers (what unsigned long
    parameters read for small values); bytes as a pointer to their NUL-terminated buffer."""
    try:
        import _ctypes

        address = int(_ctypes.dlsym(_ctypes.dlopen(None, os.RTLD_NOW), name))  # type: ignore[arg-type]  # None: the program
        call_function = _ctypes.call_function
    except (ImportError, OSError, AttributeError):
        return None
    # A partial, not a lambda: no Python frame per call (a worker runs it unspecialized).
    return functools.partial(call_function, address)


_prctl_call: Callable[[tuple[int | bytes, ...]], int] | None = None


def prctl_function() -> Callable[[tuple[int | bytes, ...]], int] | None:
    """``prctl`` as ``f(args_tuple) -> int`` (libc_function), bound once per process."""
    global _prctl_call
    if _prctl_call is None:
        _prctl_call = libc_function("prctl")
    return _prctl_call


def _prctl(option: int, arg: int | bytes) -> None:
    # Not the ctypes package (its classes would add some 300 KB to the fork server, which
    # every fork copies the page tables of) unless a call fails: then again, for errno.
    call = prctl_function()
    if call is not None and call((option, arg, 0, 0, 0)) == 0:
        return
    import ctypes

    c_arg = ctypes.c_char_p(arg) if isinstance(arg, bytes) else ctypes.c_ulong(arg)
    if libc().prctl(option, c_arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def set_parent_death_signal(sig: int) -> None:
    """Have the kernel send ``sig`` to us when the *thread* that forked us exits."""
    _prctl(_PR_SET_PDEATHSIG, sig)


def make_subreaper() -> None:
    """Orphaned descendants are re-parented to us instead of init, so we can find them."""
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def set_comm(name: str) -> None:
    """Set the name ``ps`` and ``/proc/PID/comm`` show (15 bytes at most)."""
    # PR_SET_NAME: one syscall, where writing /proc/self/comm takes three.
    _prctl(_PR_SET_NAME, name.encode()[:15])


def exitcode_of(wait_status: int) -> int:
    """A ``waitpid`` status as ``Popen.returncode``: negative for a signal."""
    return os.waitstatus_to_exitcode(wait_status)


def pidfd_open(pid: int) -> int | None:
    """A pidfd (readable once ``pid`` has exited), or None where the kernel has none."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def reap(pid: int) -> int | None:
    """Reap our child ``pid`` if it has exited: its returncode, else None."""
    try:
        got, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return exitcode_of(status) if got == pid else None


def descendants(pid: int) -> list[psutil.Process]:
    """Every live descendant of ``pid`` (children first); [] if ``pid`` is gone."""
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


def trees_of(pids: Iterable[int]) -> list[psutil.Process]:
    """Each of ``pids`` that lives and all their living descendants, from ONE scan of /proc
    (a scan per process costs tens of milliseconds each with hundreds of processes)."""
    import psutil

    table = shared_scan()
    children: dict[int, list[int]] = {}
    for pid, stat in table.items():
        children.setdefault(stat.ppid, []).append(pid)
    found: list[psutil.Process] = []
    seen: set[int] = set()
    pending = [pid for pid in pids if pid in table]
    while pending:
        pid = pending.pop()
        if pid in seen or table[pid].zombie:
            continue
        seen.add(pid)
        try:
            found.append(psutil.Process(pid))
        except psutil.Error:
            continue
        pending += children.get(pid, ())
    return found


_scan_lock = _thread.allocate_lock()
_latest_scan: tuple[float, dict[int, Stat]] | None = None


def shared_scan() -> dict[int, Stat]:
    """Every process's stat, from a scan of /proc that began after this call did.

    Concurrent callers (300 handlers stopping at once, on worker threads) share scans: a
    caller that finds a scan started after it asked takes that one, so a burst costs two
    scans, not one per caller (each takes tens of milliseconds with hundreds of processes).
    """
    global _latest_scan
    from .procfs import scan

    asked = time.monotonic()
    with _scan_lock:
        if _latest_scan is not None and _latest_scan[0] >= asked:
            return _latest_scan[1]
        started = time.monotonic()
        table = scan()
        _latest_scan = (started, table)
        return table


def family_of(pid: int, starttime: int, table: dict[int, Stat]) -> list[psutil.Process]:
    """What belongs to our child ``pid`` besides itself, from one /proc ``table``: its
    descendants and the members of the group or session it leads (see
    ``procfs.family``: after ``pid`` is reaped, only while its group id is ours)."""
    import psutil

    from .procfs import family

    found = []
    for member in family({pid: starttime}, table):
        if member != pid:
            try:
                found.append(psutil.Process(member))
            except psutil.Error:
                pass
    return found


def process_and_descendants(pid: int) -> list[psutil.Process]:
    """``pid`` itself and every live descendant; [] if it is gone."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return [proc, *proc.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


def signal_tree(pgid: int | None, procs: Iterable[psutil.Process], sig: int) -> None:
    """Signal a process group and every process of a snapshot; vanished ones are fine."""
    if pgid is not None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    procs = list(procs)
    if not procs:
        # No psutil import for a group alone: the fork server signals a worker's group on
        # every call, and each module it holds is copied into and torn down with every worker.
        return
    import psutil

    for proc in procs:
        try:
            # psutil checks the create time first, so a recycled pid is never hit.
            proc.send_signal(sig)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass


def wait_fds(fds: Iterable[int], timeout: float) -> set[int]:
    """Block up to ``timeout`` until each fd is readable; the set of those that are."""
    pending = set(fds)
    ready: set[int] = set()
    deadline = time.monotonic() + timeout
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        poller = select.poll()
        for fd in pending:
            poller.register(fd, select.POLLIN)
        try:
            events = poller.poll(remaining * 1000)
        except InterruptedError:  # pragma: no cover - PEP 475 retries for us
            continue
        for fd, _ in events:
            ready.add(fd)
            pending.discard(fd)
    return ready


def pidfds_of(procs: Iterable[psutil.Process]) -> tuple[dict[int, psutil.Process], list[psutil.Process]]:
    """pidfds of the processes of a snapshot that are still those processes, and those
    still running that have none (a kernel without pidfds).

    Checked after pidfd_open (``procfs.pidfd_if``), by psutil's create time: the pid may
    have been recycled since the snapshot. Zombies stay: they may be ours to reap.
    """
    from functools import partial

    from .procfs import pidfd_if

    fds: dict[int, psutil.Process] = {}
    unwatched: list[psutil.Process] = []
    for proc in procs:
        fd = pidfd_if(proc.pid, partial(_running, proc))
        if fd is not None:
            fds[fd] = proc
        elif _running(proc) and not _zombie(proc):
            unwatched.append(proc)
    return fds, unwatched


def _running(proc: psutil.Process) -> bool:
    """Still the process of the snapshot (psutil compares the create time), zombie or not."""
    import psutil

    try:
        return proc.is_running()
    except psutil.Error:
        return False


def _zombie(proc: psutil.Process) -> bool:
    import psutil

    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True



def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait (event-driven, on pidfds) up to ``timeout`` for ``procs`` to exit; the living."""
    fds, alive = pidfds_of(procs)
    try:
        ready = wait_fds(fds, timeout)
        alive += [p for fd, p in fds.items() if fd not in ready]
    finally:
        for fd in fds:
            os.close(fd)
    return alive


async def wait_exit(pid: int, pidfd: int | None) -> None:
    """Until ``pid`` (our child) has exited, not reaped (the caller reaps); event-driven.

    On its pidfd; without one (kernel < 5.3), a worker thread blocks in waitid(WNOWAIT),
    which reports the exit without reaping. Abandoned on cancel; that thread returns by
    itself when the child exits.
    """
    import anyio

    if pidfd is not None:
        await anyio.wait_readable(pidfd)
        return
    await anyio.to_thread.run_sync(_block_until_exited, pid, abandon_on_cancel=True)


def _block_until_exited(pid: int) -> None:
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    except ChildProcessError:  # reaped already: nothing left to wait for
        pass


def has_exited(pid: int) -> bool:
    """Whether our child ``pid`` has exited, without reaping it."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True



def group_members(pgid: int) -> list[psutil.Process]:
    """Every live process of group ``pgid``: one pass over /proc with a getpgid() each
    (a syscall, no file read)."""
    import psutil

    members = []
    for name in os.listdir("/proc"):
        if name.isdigit() and _pgid_of(int(name)) == pgid:
            try:
                members.append(psutil.Process(int(name)))
            except psutil.Error:
                pass
    return members


def children_of(pid: int) -> list[int]:
    """``pid``'s direct children, from /proc (no scan of every process); [] when gone."""
    try:
        return _task_children(str(pid))
    except OSError:
        return []


def _task_children(pid: str) -> list[int]:
    # Raw os calls, no file objects: the fork server and every worker run this once per
    # call, and in a freshly forked process each object touched is a copy-on-write fault.
    pids: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fd = os.open(f"/proc/{pid}/task/{tid}/children", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            # A thread that ended since the listing (asyncio.run's executor shutdown
            # thread, say: its task directory is gone too) has no children to list. The
            # file missing from a live thread says the kernel lists none (no
            # CONFIG_PROC_CHILDREN).
            if os.path.exists(f"/proc/{pid}/task/{tid}"):
                raise
            continue
        text = b""
        try:
            while chunk := os.read(fd, 65536):
                text += chunk
        finally:
            os.close(fd)
        pids += map(int, text.split())
    return pids



def own_children() -> list[int] | None:
    """This process's direct children, from /proc (cheap: no scan of every process);
    None where the kernel does not list them (CONFIG_PROC_CHILDREN)."""
    try:
        return _task_children("self")
    except FileNotFoundError:
        return None



def _pgid_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


class Adopted:
    """The one orphan reaper: ends and reaps what was re-parented to us (we are a child
    subreaper) that we did not start ourselves: the leftovers of a dead child's tree.

    Found from our own children list (one read, never a scan of /proc) or, on the caller
    side where other children belong to their handlers, among the pids given. Each is
    signalled by pid, and that is safe: the pid of a child we have not reaped cannot be
    reused. A killed orphan's own children are re-parented to us when it dies: the next
    round finds them, so rounds go on until none is left.

    ``step`` is one bounded round that never blocks (the fork server takes one between
    requests); ``end`` drives rounds to the end, blocking (a worker), and ``end_async``
    awaits them (the launcher), each within a bound. ``left_by`` + ``reap_when_exited``
    reap what a dead worker left (the isolated caller); ``reap_pidfds`` what a handler's
    tree left, by pidfd.
    """

    __slots__ = ("keep", "among", "signalled")

    def __init__(self, keep: Container[int] = (), among: Iterable[int] | None = None) -> None:
        self.keep = keep  # our own children (a live view: the fork server's jobs): never touched
        self.among = None if among is None else list(among)  # None: every child not kept
        self.signalled: dict[int, int] = {}  # pid -> the signal sent it, until it is reaped

    @classmethod
    def left_by(cls, leader: int, snapshot: Iterable[psutil.Process]) -> Adopted:
        """What the death of ``leader`` (our exited, *unreaped* child) re-parented to us:
        the members of its group among our children, and those of ``snapshot`` (they had
        left the group). ``leader`` is kept: reaped last by the caller, its pid reserves
        the group id meanwhile. Only when we are a subreaper: otherwise init adopts them,
        and none is ours to reap."""
        members = [pid for pid in own_children() or () if pid != leader and _pgid_of(pid) == leader]
        return cls(keep=(leader,), among={*members, *(p.pid for p in snapshot)})

    def found(self) -> list[int]:
        """Those of ours now: living, or exited and not reaped yet."""
        if self.among is not None:
            return [pid for pid in self.among if pid not in self.keep]
        children = own_children()
        if children is None:  # pragma: no cover - kernels without CONFIG_PROC_CHILDREN
            me = os.getpid()
            children = [p.pid for p in descendants(me) if p.ppid() == me]
        return [pid for pid in children if pid not in self.keep]

    def reap(self, pid: int) -> bool:
        """Reap ``pid`` if it has exited; whether it is done with (reaped, or not ours)."""
        try:
            done = os.waitpid(pid, os.WNOHANG)[0] == pid
        except ChildProcessError:  # not our child (any more): its parent reaps it
            done = True
        if done:
            self.signalled.pop(pid, None)
        return done

    def step(self, sig: int | None = signal.SIGKILL, batch: int = 1 << 30) -> list[int]:
        """One round that never blocks: reap (``batch`` at most: the kernel takes a while
        to release each) those that have exited, send ``sig`` once to each other one
        (None: signal nobody); those left, unreaped."""
        left: list[int] = []
        for pid in self.found():
            if sig is not None and self.signalled.get(pid) != sig:
                self.signalled[pid] = sig
                _kill_quietly(pid, sig)
            elif batch > 0:  # signalled before: it may be a zombie by now
                batch -= 1
                if self.reap(pid):
                    continue
            left.append(pid)
        return left

    def end(self, bound: float) -> None:
        """SIGKILL and reap every one, and those their deaths hand us, blocking up to
        ``bound`` seconds."""
        deadline = time.monotonic() + bound
        while left := self.step(signal.SIGKILL):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            # ``left`` are our unreaped children: only a kernel without pidfds (< 5.3) has
            # none to watch, and there we can but poll, bounded.
            if not wait_pids(left, remaining):  # pragma: no cover
                time.sleep(min(remaining, 0.005))

    @staticmethod
    def reap_pidfds(fds: Iterable[int]) -> None:
        """Reap those of ``fds`` (pidfds of a tree snapshot) that have exited and were
        re-parented to us; other parents reap their own. By pidfd (P_PIDFD): exactly
        those processes, never a recycled pid that may now be another handler's child."""
        for fd in fds:
            try:
                os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)
            except ChildProcessError:  # not ours to reap
                pass

    async def reap_when_exited(self) -> None:
        """Wait for each one to exit (they were signalled: on its pidfd; the caller bounds
        the wait) and reap it."""
        import anyio

        for pid in self.found():
            fd = pidfd_open(pid)
            if fd is not None:
                try:
                    await anyio.wait_readable(fd)
                finally:
                    os.close(fd)
            self.reap(pid)

    async def end_async(self, sig: int | None, grace: float) -> None:
        """Send ``sig`` to each one's whole tree (None: they are signalled already), wait
        up to ``grace`` seconds, then SIGKILL what is left, and reap; rounds bounded.

        Trees, from one /proc scan on a worker thread: a graceful signal to an orphan does
        not reach its descendants, which must get the chance to stop cleanly too.
        """
        import anyio

        for _ in range(_ADOPTED_ROUNDS):
            found = self.step(None)  # reaps those that have exited
            tree = await anyio.to_thread.run_sync(trees_of, found) if found else []
            if not tree:
                return
            for each, bound in ((sig, grace), (signal.SIGKILL, KILL_BOUND_S)):
                if each is not None:
                    signal_tree(None, tree, each)
                tree = await anyio.to_thread.run_sync(wait_gone, tree, bound)
                if not tree:
                    break
        self.step(None)


# A killed orphan's own descendants are re-parented to us in turn: that many rounds at most.
_ADOPTED_ROUNDS = 3


def _kill_quietly(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_pids(pids: Iterable[int], timeout: float) -> bool:
    """Until each of ``pids`` has exited (on pidfds: woken by the exits, not a timer),
    ``timeout`` at most; one already gone counts as exited. Whether any could be watched
    (False too where the kernel has no pidfds)."""
    fds = [fd for fd in map(pidfd_open, pids) if fd is not None]
    try:
        wait_fds(fds, timeout)
    finally:
        for fd in fds:
            os.close(fd)
    return bool(fds)
