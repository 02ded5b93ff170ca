"""One cgroup v2 per started tree, where this process may create them.

Why: a process group and a descendant walk both miss a process that double-forked and
called ``setsid()`` once its parent is gone (it is re-parented to init or a subreaper). A
cgroup keeps every descendant whatever it does, and writing ``1`` to its ``cgroup.kill``
(kernel 5.14+) SIGKILLs all of them at once, forks in flight and fork bombs included.

Layout: one *base* cgroup per process, ``<v2 mount><our own cgroup>/asyncproc-<pid>-<start>``,
holding one leaf per started tree. The base is handed to the guardian, which kills and
removes it when we die; we remove it ourselves at exit.

``available()`` is False (and every caller falls back to process-group and /proc scans)
when: no cgroup v2 hierarchy is mounted, the kernel has no ``cgroup.kill``, we may not
create a cgroup (not root, no delegated subtree), or ``ASYNCPROC_NO_CGROUP=1``. The v2
mount is found in /proc/self/mountinfo (``/sys/fs/cgroup`` on a unified host,
``/sys/fs/cgroup/unified`` on a hybrid one), never assumed.
"""

from __future__ import annotations

import atexit
import errno
import os
import select
import threading
import time

__all__ = ["mount", "available", "base", "create", "attach", "procs", "kill", "remove", "wait_empty", "remove_tree"]

_DISABLE_ENV = "ASYNCPROC_NO_CGROUP"
_lock = threading.Lock()
_base: str | None = None
_checked = False


def mount() -> str | None:
    """Where the cgroup v2 hierarchy is mounted, from /proc/self/mountinfo."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                # ... mount-point ... - fstype source options
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    return left.split(" ")[4].replace("\\040", " ")
    except OSError:
        pass
    return None


def _own_path() -> str | None:
    """Our own cgroup in the v2 hierarchy (the ``0::`` line of /proc/self/cgroup)."""
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].rstrip("\n")
    except OSError:
        pass
    return None


def _make_base() -> str | None:
    if os.environ.get(_DISABLE_ENV, "") not in ("", "0"):
        return None
    root, own = mount(), _own_path()
    if root is None or own is None:
        return None
    parent = os.path.join(root, own.lstrip("/"))
    with open("/proc/self/stat", "rb") as f:
        start = f.read().rsplit(b")", 1)[1].split()[19].decode()
    path = os.path.join(parent, f"asyncproc-{os.getpid()}-{start}")
    try:
        os.mkdir(path)
    except FileExistsError:
        pass
    except OSError:
        return None  # not root and no delegated subtree
    # (The root cgroup never has the file: look in ours.)
    if not os.path.exists(os.path.join(path, "cgroup.kill")):
        os.rmdir(path)
        return None  # kernel < 5.14: no atomic kill, the scans are as good
    atexit.register(_remove_base)
    return path


def base() -> str | None:
    """This process's base cgroup, created on first use; None when cgroups are unavailable."""
    global _base, _checked
    with _lock:
        if not _checked:
            _checked = True
            _base = _make_base()
        return _base


def available() -> bool:
    return base() is not None


def create(name: str) -> str | None:
    """A new leaf cgroup ``name`` under the base; None when cgroups are unavailable."""
    root = base()
    if root is None:
        return None
    path = os.path.join(root, name)
    try:
        os.mkdir(path)
    except FileExistsError:
        pass
    except OSError:
        return None
    return path


def attach(path: str, pid: int) -> bool:
    """Move ``pid`` into the cgroup; False if it is gone (or the kernel refused)."""
    try:
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(pid))
    except OSError:
        return False
    return True


def procs(path: str) -> list[int]:
    """The living processes in the cgroup and its children (zombies are not listed)."""
    found: list[int] = []
    for folder, _, _ in os.walk(path):
        try:
            with open(os.path.join(folder, "cgroup.procs")) as f:
                found += map(int, f.read().split())
        except OSError:
            pass
    return found


def kill(path: str) -> None:
    """SIGKILL every process in the cgroup and below, atomically (forks in flight too)."""
    try:
        with open(os.path.join(path, "cgroup.kill"), "w") as f:
            f.write("1")
    except OSError:
        pass


def populated(path: str) -> bool:
    try:
        with open(os.path.join(path, "cgroup.events")) as f:
            return "populated 1" in f.read()
    except OSError:
        return False


def wait_empty(path: str, timeout: float) -> bool:
    """Block up to ``timeout`` until no process is left in the cgroup (event-driven: the
    kernel wakes a poll on ``cgroup.events`` when it changes); True when empty."""
    deadline = time.monotonic() + timeout
    try:
        fd = os.open(os.path.join(path, "cgroup.events"), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI | select.POLLERR)
        while True:
            os.lseek(fd, 0, os.SEEK_SET)
            if b"populated 0" in os.read(fd, 4096):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            poller.poll(remaining * 1000)
    finally:
        os.close(fd)


def remove(path: str) -> bool:
    """Remove an empty cgroup; False (it stays) while a process is still in it."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno in (errno.EBUSY, errno.ENOTEMPTY):
            return False
        raise
    return True


def remove_tree(path: str) -> bool:
    """Remove a cgroup and its children, deepest first (cgroupfs has only rmdir)."""
    ok = True
    for folder, _, _ in sorted(os.walk(path), key=lambda entry: -entry[0].count("/")):
        ok = remove(folder) and ok
    return ok


def _remove_base() -> None:
    """At exit: what the guardian has not removed yet (it kills it first when it runs)."""
    if _base is not None and os.getpid() == _owner_pid:
        kill(_base)
        wait_empty(_base, 2.0)
        remove_tree(_base)


_owner_pid = os.getpid()


def _forget_in_child() -> None:
    """A forked child makes its own base (its own pid) if it starts trees itself."""
    global _base, _checked, _lock, _owner_pid
    _base, _checked, _lock, _owner_pid = None, False, threading.Lock(), os.getpid()


os.register_at_fork(after_in_child=_forget_in_child)
