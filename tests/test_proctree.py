"""Process-tree rules: the group and escaped descendants are signalled, waits are bounded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from asyncproc import _proctree

pytestmark = pytest.mark.anyio

TREE = textwrap.dedent(
    """
    import subprocess, sys, time
    inside = subprocess.Popen(["sleep", "60"])
    escaped = subprocess.Popen(["sleep", "60"], start_new_session=True)
    open(sys.argv[1], "w").write(f"{inside.pid} {escaped.pid}")
    if sys.argv[2] == "ignore":
        import signal
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(60)
    """
)


def start_tree(tmp_path: Path, mode: str = "") -> tuple[subprocess.Popen[bytes], list[int]]:
    pidfile = tmp_path / "pids"
    proc = subprocess.Popen([sys.executable, "-c", TREE, str(pidfile), mode], start_new_session=True)
    deadline = time.monotonic() + 20
    while not pidfile.exists() or len(pidfile.read_text().split()) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return proc, [int(p) for p in pidfile.read_text().split()]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("mode", ["", "ignore"])
def test_kill_tree_sync_ends_group_and_escaped_and_reaps(tmp_path: Path, mode: str) -> None:
    proc, (inside, escaped) = start_tree(tmp_path, mode)
    started = time.monotonic()
    code = _proctree.kill_tree_sync(proc.pid, grace=0.5)
    assert time.monotonic() - started < 5
    assert code == (-signal.SIGKILL if mode else -signal.SIGTERM)
    proc.returncode = code  # reaped by kill_tree_sync, not by Popen
    _proctree_reap_adopted([inside, escaped])
    assert gone(inside) and gone(escaped)


def _proctree_reap_adopted(pids: list[int]) -> None:
    # The test process is a subreaper: orphans come to it, so it reaps them (init would).
    for pid in pids:
        try:
            psutil.Process(pid).wait(5)
        except psutil.NoSuchProcess:
            pass


def test_signal_tree_on_vanished_processes_is_silent() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    _proctree.signal_tree(proc.pid, [], signal.SIGKILL)  # group gone: no error


def test_reap_and_exitcode() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"])
    fd = _proctree.pidfd_open(proc.pid)
    assert fd is not None
    try:
        assert _proctree.wait_fds([fd], 10) == {fd}
    finally:
        os.close(fd)
    assert _proctree.reap(proc.pid) == -signal.SIGKILL
    proc.returncode = -9
    assert _proctree.reap(proc.pid) is None  # already reaped: not an error


def test_wait_fds_is_bounded() -> None:
    r, w = os.pipe()
    try:
        started = time.monotonic()
        assert _proctree.wait_fds([r], 0.2) == set()
        assert 0.15 < time.monotonic() - started < 2
    finally:
        os.close(r)
        os.close(w)


async def test_wait_exit_is_event_driven(anyio_backend: object) -> None:
    import anyio

    proc = subprocess.Popen(["sleep", "0.3"])
    fd = _proctree.pidfd_open(proc.pid)
    try:
        with anyio.fail_after(10):
            await _proctree.wait_exit(proc.pid, fd)
    finally:
        if fd is not None:
            os.close(fd)
    assert _proctree.reap(proc.pid) == 0
    proc.returncode = 0
