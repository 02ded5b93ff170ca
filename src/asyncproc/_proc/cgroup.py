"""cgroup v2 helpers: one cgroup per process tree, ended atomically with ``cgroup.kill``.

Why a cgroup: a process that calls ``setsid()`` leaves its group, and once its parent dies
nothing in /proc links it to the tree it came from; a fork bomb can outrun any scan. Every
process in a cgroup stays in it (children are born there) until moved, and writing ``1`` to
``cgroup.kill`` (Linux >= 5.14) SIGKILLs all of them at once, descendant cgroups included,
with no race against forks.

Usable only where the kernel lets us: cgroup v2 mounted (found in /proc/self/mountinfo,
never assumed: ``/sys/fs/cgroup`` on a unified host, ``/sys/fs/cgroup/unified`` on a hybrid
one), our own cgroup writable (root, or a subtree delegated to our user), ``cgroup.kill``
present, and ``ASYNCPROC_NO_CGROUP`` unset or empty. ``available()`` probes all of that once; callers fall back to process scans when
it is False. No controller is ever enabled: the cgroups only group, so creating one costs
a mkdir (~60 us) and the "no internal processes" rule never applies.

Layout: ``<our cgroup>/asyncproc-<owner pid>-<name>``, nested as the caller likes. The owner
pid in the name lets a later process remove what a SIGKILLed one left (``sweep_stale``).

Typical use::

    path = _cgroup.create("w123")            # None when unavailable
    _cgroup.attach(path, pid)                # before pid starts anything
    ...
    _cgroup.kill(path)                       # everything in it (and below) gets SIGKILL
    _cgroup.wait_empty(path, 2.0)
    _cgroup.remove(path)
"""

from __future__ import annotations

import _signal  # not signal, which imports enum: the fork server stays lean
import errno
import itertools
import os
import select
import time

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing: the fork server stays lean
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "available",
    "create",
    "attach",
    "kill",
    "signal",
    "procs",
    "populated",
    "wait_empty",
    "wait_empty_async",
    "remove",
    "sweep_stale",
]

_PREFIX = "asyncproc-"
_counter = itertools.count()
_probed: bool | None = None
_base: str | None = None
_probe_pid = 0  # a forked child probes again: its own cgroup may differ


def _v2_mount() -> tuple[str, str] | None:
    """(mount point, root of the mount inside the hierarchy) of the cgroup2 file system."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    fields = left.split()
                    return _unescape(fields[4]), _unescape(fields[3])
    except OSError:
        return None
    return None


def _unescape(path: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        path = path.replace(code, char)
    return path


def _own_cgroup() -> str | None:
    """Our cgroup v2 path ("0::/x/y" in /proc/self/cgroup), relative to the hierarchy."""
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].rstrip("\n")
    except OSError:
        return None
    return None


def _find_base() -> str | None:
    mount = _v2_mount()
    own = _own_cgroup()
    if mount is None or own is None or own.endswith(" (deleted)"):
        return None
    point, root = mount
    if root != "/":  # the mount shows a subtree only: our path must lie inside it
        if own != root and not own.startswith(root.rstrip("/") + "/"):
            return None
        own = own[len(root.rstrip("/")) :] or "/"
    path = os.path.normpath(point + "/" + own.lstrip("/"))
    return path if os.path.isdir(path) else None


def available() -> bool:
    """Whether this process can create a cgroup, move a process into it and kill it.

    Probed once per process (a mkdir, a move of nothing, an rmdir): a directory we can
    create but not write ``cgroup.procs`` of (an undelegated tree) is no use.
    """
    global _probed, _base, _probe_pid
    if _probed is not None and _probe_pid == os.getpid():
        return _probed
    _probe_pid = os.getpid()
    _probed = False
    if os.environ.get("ASYNCPROC_NO_CGROUP"):  # to use (or test) the fallback by choice
        return False
    _base = _find_base()
    if _base is None or not os.access(os.path.join(_base, "cgroup.procs"), os.W_OK):
        return False
    probe = os.path.join(_base, f"{_PREFIX}{os.getpid()}-probe{next(_counter)}")
    try:
        os.mkdir(probe)
    except OSError:
        return False
    try:
        _probed = all(os.access(os.path.join(probe, f), os.W_OK) for f in ("cgroup.procs", "cgroup.kill"))
    finally:
        _rmdir_quietly(probe)
    if _probed:
        sweep_stale()
    return _probed


def create(name: str, parent: str | None = None) -> str | None:
    """A new, empty cgroup (its path), or None when cgroups are unavailable or it failed.

    Under ``parent`` (a path this module returned) if given, else directly under our own
    cgroup, named ``asyncproc-<our pid>-<name>`` so that a stale one can be traced to its
    owner. ``name`` must be unique among its siblings.
    """
    if not available():
        return None
    assert _base is not None
    path = os.path.join(parent, name) if parent is not None else os.path.join(_base, f"{_PREFIX}{os.getpid()}-{name}")
    try:
        os.mkdir(path)
    except FileExistsError:  # a leftover of a previous process of ours with the same pid
        kill(path)
        wait_empty(path, 1.0)
        if not remove(path):
            return None
        try:
            os.mkdir(path)
        except OSError:
            return None
    except OSError:
        return None
    return path


def attach(path: str, pid: int = 0) -> None:
    """Move ``pid`` (0: the calling process) into ``path``. Its future children are born
    there; children it already has stay where they are."""
    _write(os.path.join(path, "cgroup.procs"), str(pid).encode())


def kill(path: str) -> None:
    """SIGKILL every process in ``path`` and its descendant cgroups, atomically (forks
    racing with it included). Quiet when it no longer exists."""
    try:
        _write(os.path.join(path, "cgroup.kill"), b"1")
    except FileNotFoundError:
        return
    except OSError as exc:  # pragma: no cover - only kernels without cgroup.kill, which the probe rules out
        if exc.errno not in (errno.ENOENT, errno.ENODEV):
            raise
        for pid in procs(path):
            try:
                os.kill(pid, _signal.SIGKILL)
            except ProcessLookupError:
                pass


def signal(path: str, sig: int) -> None:
    """Send ``sig`` to every process in ``path`` and below (not atomic: for a graceful
    SIGTERM before ``kill``). No scan of /proc: the cgroup lists its members."""
    for pid in procs(path, recursive=True):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def procs(path: str, recursive: bool = False) -> list[int]:
    """Pids in ``path`` (and its descendant cgroups if ``recursive``); [] once it is gone."""
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            pids = [int(p) for p in f.read().split()]
        if recursive:
            for entry in os.scandir(path):
                if entry.is_dir(follow_symlinks=False):
                    pids += procs(entry.path, recursive=True)
    except (FileNotFoundError, ProcessLookupError):
        return []
    except OSError as exc:
        if exc.errno != errno.ENODEV:
            raise
        return []  # removed while we read it: its files answer ENODEV until they go
    return pids


def populated(path: str) -> bool:
    """Whether any live process is in ``path`` or below (zombies do not count)."""
    try:
        events = _read(os.path.join(path, "cgroup.events"))
    except FileNotFoundError:
        return False
    except OSError as exc:
        if exc.errno != errno.ENODEV:
            raise
        return False  # removed while we read it (seen under fork-server SIGKILLs in the soak)
    for line in events.splitlines():
        if line.startswith(b"populated "):
            return line.split()[1] != b"0"
    return False


def wait_empty(path: str, timeout: float) -> bool:
    """Block up to ``timeout`` seconds until nothing lives in ``path``; whether it is empty.

    Event-driven: the kernel flags ``cgroup.events`` (POLLPRI) when "populated" changes.
    """
    deadline = time.monotonic() + timeout
    try:
        fd = os.open(os.path.join(path, "cgroup.events"), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI)
        while populated(path):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            poller.poll(min(remaining, 0.1) * 1000)  # 0.1: a change between read and poll
        return True
    finally:
        os.close(fd)


def remove(path: str) -> bool:
    """Remove ``path`` and its descendant cgroups (deepest first); False if some are still
    populated (kill and wait first) and so were left."""
    try:
        os.rmdir(path)  # the usual case, one syscall: no cgroup below, nothing in it
        return True
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
    ok = True
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return True
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            ok = remove(entry.path) and ok
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        ok = False
    return ok


# Raw os calls, no file objects: the fork server runs these for every call, and every
# object it touches between two forks is a page copied (about 4 us each here).
def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _read(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def sweep_stale() -> int:
    """Kill and remove the cgroups of asyncproc processes that are gone (SIGKILLed, say,
    before they could remove their own); how many were removed. Cheap: one listdir."""
    if _base is None:
        return 0
    removed = 0
    try:
        names = os.listdir(_base)
    except OSError:
        return 0
    for name in names:
        if not name.startswith(_PREFIX):
            continue
        owner = name[len(_PREFIX) :].split("-", 1)[0]
        if not owner.isdigit() or _alive(int(owner)):
            continue
        path = os.path.join(_base, name)
        kill(path)
        if wait_empty(path, 1.0) and remove(path):
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _rmdir_quietly(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass


async def wait_empty_async(path: str, timeout: float) -> bool:
    """``wait_empty`` for an event loop (any anyio backend): sleeps on an inotify
    descriptor, which the kernel makes readable when ``cgroup.events`` changes."""
    import anyio

    if not populated(path):
        return True
    fd = _watch(os.path.join(path, "cgroup.events"))
    try:
        with anyio.move_on_after(timeout):
            while populated(path):
                if fd is None:  # pragma: no cover - no inotify: short sleeps, still bounded
                    await anyio.sleep(0.005)
                    continue
                await anyio.wait_readable(fd)
                _drain(fd)
        return not populated(path)
    finally:
        if fd is not None:
            os.close(fd)


_IN_NONBLOCK, _IN_CLOEXEC, _IN_MODIFY = 0o4000, 0o2000000, 0x2


_libc: Any = None


def _watch(path: str) -> int | None:
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
    libc = _libc
    fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
    if fd < 0:
        return None
    if libc.inotify_add_watch(fd, os.fsencode(path), _IN_MODIFY) < 0:
        os.close(fd)
        return None
    return int(fd)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
