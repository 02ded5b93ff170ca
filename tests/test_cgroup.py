"""The cgroup v2 helpers: a whole tree (setsid escapees and a fork bomb included) ends
with one cgroup.kill, and nothing is left in the cgroup file system."""

from __future__ import annotations

import os
import signal
import time

import pytest

from asyncproc._proc import cgroup as _cgroup
from asyncproc._proc import proctree as _proctree

needs_cgroup = pytest.mark.skipif(not _cgroup.available(), reason="no writable cgroup v2 here (not root, not delegated)")


def _ours() -> set[str]:
    base = _cgroup._find_base()
    assert base is not None
    return {n for n in os.listdir(base) if n.startswith(f"asyncproc-{os.getpid()}-")}


def _start_tree(path: str, ready_w: int, bomb: bool) -> int:
    """A child in ``path`` that starts an in-group and a setsid grandchild (or a fork
    bomb), writes a byte when they run, and sleeps."""
    pid = os.fork()
    if pid == 0:
        try:
            _cgroup.attach(path)
            for escape in (False, True):
                if os.fork() == 0:
                    if escape:
                        os.setsid()
                    while bomb:
                        try:
                            os.fork()
                        except OSError:  # EAGAIN: keep trying
                            pass
                    time.sleep(60)
                    os._exit(0)
            os.write(ready_w, b"x")
            time.sleep(60)
        finally:
            os._exit(0)
    return pid


@needs_cgroup
@pytest.mark.parametrize("bomb", [False, True], ids=["tree", "fork-bomb"])
def test_kill_ends_every_process_and_remove_leaves_nothing(bomb: bool) -> None:
    before = _ours()
    path = _cgroup.create(f"test{bomb}")
    assert path is not None and os.path.isdir(path)
    ready_r, ready_w = os.pipe()
    pid = _start_tree(path, ready_w, bomb)
    try:
        assert os.read(ready_r, 1) == b"x"
        assert _cgroup.populated(path)
        assert pid in _cgroup.procs(path)
        _cgroup.kill(path)
        assert _cgroup.wait_empty(path, 10.0)
        assert _cgroup.remove(path)
        assert not os.path.exists(path)
        assert _ours() == before
    finally:
        os.close(ready_r)
        os.close(ready_w)
        os.kill(pid, signal.SIGKILL) if not _proctree.has_exited(pid) else None
        os.waitpid(pid, 0)
        _proctree.Adopted().step(None)  # the test process is a subreaper: orphans are ours
        _cgroup.kill(path)
        _cgroup.remove(path)


@needs_cgroup
def test_nested_cgroups_are_killed_and_removed_with_their_parent() -> None:
    parent = _cgroup.create("nest")
    assert parent is not None
    child = _cgroup.create("w1", parent=parent)
    assert child == os.path.join(parent, "w1")
    assert _cgroup.remove(parent)
    assert not os.path.exists(parent)


@needs_cgroup
def test_stale_cgroup_of_a_dead_owner_is_swept() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)  # a pid that names no process now
    base = _cgroup._find_base()
    assert base is not None
    stale = os.path.join(base, f"asyncproc-{pid}-left")
    os.mkdir(stale)
    try:
        assert _cgroup.sweep_stale() >= 1
        assert not os.path.exists(stale)
    finally:
        if os.path.exists(stale):
            os.rmdir(stale)


def test_available_is_a_cached_boolean_and_base_is_a_v2_directory() -> None:
    assert _cgroup.available() in (True, False)
    if _cgroup.available():
        base = _cgroup._find_base()  # where our cgroups go: our own cgroup v2 directory
        assert base is not None and os.path.exists(os.path.join(base, "cgroup.procs"))
    else:
        assert _cgroup.create("x") is None
