"""Prototype (not used by asyncproc): would clone3(CLONE_INTO_CGROUP) beat what a forked
worker does now, fork() and then moving itself into its cgroup (a write to cgroup.procs)?

    .venv/bin/python benchmarks/proto_clone_into_cgroup.py      # root, writable cgroup v2

Per fork-to-reap cycle of a child that only exits: the children's CPU (mean) and the wall
time (median). Measured here (2 cores, kernel 6.18, load ~5): fork + attach 460 us CPU and
660 us wall; clone3 into the cgroup 570 us and 825 us. No saving, so the fork server keeps
os.fork (which also runs glibc's and libraries' at-fork handlers that a raw clone3 skips).
"""

from __future__ import annotations

import ctypes
import os
import resource
import statistics
import time

from asyncproc._proc import cgroup as _cgroup

_SYS_CLONE3, _CLONE_INTO_CGROUP, _SIGCHLD = 435, 0x200000000, 17
_libc = ctypes.CDLL(None, use_errno=True)


class _CloneArgs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("flags", "pidfd", "child_tid", "parent_tid", "exit_signal",
                                                     "stack", "stack_size", "tls", "set_tid", "set_tid_size", "cgroup")]


def _clone_into(cgroup_fd: int) -> int:
    args = _CloneArgs(flags=_CLONE_INTO_CGROUP, exit_signal=_SIGCHLD, cgroup=cgroup_fd)
    ctypes.pythonapi.PyOS_BeforeFork()
    pid = _libc.syscall(_SYS_CLONE3, ctypes.byref(args), ctypes.sizeof(args))
    if pid == 0:
        ctypes.pythonapi.PyOS_AfterFork_Child()
    else:
        ctypes.pythonapi.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(ctypes.get_errno(), "clone3")
    return int(pid)


def _cycle(path: str, mode: str) -> None:
    if mode == "fork + attach":
        procs = os.path.join(path, "cgroup.procs").encode()
        pid = os.fork()
        if pid == 0:
            fd = os.open(procs, os.O_WRONLY)
            os.write(fd, b"0")
            os._exit(0)
    else:
        dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        pid = _clone_into(dir_fd)
        if pid == 0:
            os._exit(0)
        os.close(dir_fd)
    os.waitpid(pid, 0)


def _run(root: str, mode: str, n: int) -> None:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    walls = []
    for i in range(n):
        path = os.path.join(root, f"c{i}")
        os.mkdir(path)
        started = time.perf_counter()
        _cycle(path, mode)
        walls.append(time.perf_counter() - started)
        os.rmdir(path)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / n
    print(f"{mode:16} children's CPU {cpu * 1e6:6.0f} us   fork-to-reap {statistics.median(walls) * 1e6:6.0f} us")


def main() -> None:
    root = _cgroup.create("clone-proto")
    if root is None:
        raise SystemExit("needs a writable cgroup v2 (root)")
    try:
        for _ in range(2):
            for mode in ("fork + attach", "clone3 into it"):
                _run(root, mode, 300)
    finally:
        _cgroup.remove(root)


if __name__ == "__main__":
    main()
