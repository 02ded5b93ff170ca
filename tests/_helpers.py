"""Checks on processes the tests share: is it alive, is it gone, wait until it is.

One place, so that "gone" means the same thing in every test: a zombie has exited (it is
gone for ``gone``), but ``assert_gone`` also wants it reaped (no zombie left behind).
"""

from __future__ import annotations

import psutil
import pytest

from asyncproc._proc import proctree as _proctree


def alive(pid: int) -> bool:
    """Running: it exists and has not exited (a zombie is not alive)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def gone(pid: int) -> bool:
    """Exited: no such process, or a zombie not reaped yet."""
    return not alive(pid)


def assert_gone(pid: int) -> None:
    """Neither running nor an unreaped zombie."""
    try:
        status = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return
    pytest.fail(f"process {pid} is still there: {status}")


def wait_gone_and_reap(pids: list[int], timeout: float) -> list[int]:
    """Wait up to ``timeout`` (on pidfds: woken by the exits, not by a timer) for ``pids``
    to exit, reap those that are our children (the test process is a subreaper, so
    orphans come to it); the pids still alive."""
    _proctree.wait_pids(pids, timeout)
    _proctree.Adopted(among=pids).step(None)
    return [pid for pid in pids if alive(pid)]
