"""Children die with their parent: a real parent process spawns through a handler and is
SIGKILLed (or exits); its child and grandchild must go, on every backend.

The test process is a child subreaper, so the orphans come to us: we reap them here.
``test_slow_*`` waits 11 s: marked ``slow``, run by CI, deselect locally with ``-m "not slow"``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from asyncproc._subprocess import guardian as _guardian

from _helpers import gone, wait_gone_and_reap

BACKENDS = ("asyncio", "uvloop", "trio")

# The parent: spawns a child through a handler; the child starts a grandchild and says so
# on a pipe the parent reads. It prints "child PID", "grandchild PID", "guardian PID",
# "ready", then waits (or exits).
PARENT = textwrap.dedent(
    """
    import os, sys, anyio, subprocess
    from asyncproc import get_subprocess_handler
    from asyncproc._subprocess import guardian as _guardian

    backend, wait_s, fork_sibling = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "fork"
    CHILD = (
        "import subprocess, sys, time; p = subprocess.Popen(['sleep', '60']);"
        "print('grandchild', p.pid, flush=True); time.sleep(60)"
    )

    async def main():
        read_end, write_end = os.pipe()
        handler = get_subprocess_handler(sys.executable, ["-c", CHILD], {}, write_end, None, 0)
        await handler.spawn()
        os.close(write_end)
        print("child", handler.pid, flush=True)
        with os.fdopen(read_end) as child_out:  # until the grandchild runs
            print(child_out.readline().strip(), flush=True)
        if fork_sibling and os.fork() == 0:  # holds no lifeline: must not keep the guardian waiting
            os.execv("/bin/sleep", ["sleep", "30"])
        print("guardian", _guardian.guardian_pid(), flush=True)
        print("ready", flush=True)
        await anyio.sleep(wait_s)

    name, options = ("trio", {}) if backend == "trio" else ("asyncio", {"use_uvloop": backend == "uvloop"})
    anyio.run(main, backend=name, backend_options=options)
    """
)


def start_parent(backend: str, wait_s: float, fork_sibling: bool = False) -> tuple[subprocess.Popen[str], dict[str, int]]:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, backend, str(wait_s), "fork" if fork_sibling else "-"],
        stdout=subprocess.PIPE, text=True,
    )
    assert parent.stdout is not None
    pids: dict[str, int] = {}
    ready = False
    for line in parent.stdout:  # until every line is in, in whatever order they came
        if line.strip() == "ready":
            ready = True
        else:
            key, pid = line.split()
            pids[key] = int(pid)
        if ready and len(pids) == 3:
            break
    assert ready and set(pids) == {"child", "grandchild", "guardian"}, pids
    return parent, pids


def kill_parent_and_check(parent: subprocess.Popen[str], pids: dict[str, int]) -> None:
    parent.kill()
    parent.wait()
    assert parent.stdout is not None
    parent.stdout.close()
    alive = wait_gone_and_reap([pids["child"], pids["grandchild"]], timeout=2.0)
    assert not alive, f"survived their parent: {alive}"
    assert not wait_gone_and_reap([pids["guardian"]], timeout=2.0), "the guardian outlived its parent"


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkilled_parent_takes_child_and_grandchild_along(backend: str) -> None:
    parent, pids = start_parent(backend, wait_s=60)
    kill_parent_and_check(parent, pids)


@pytest.mark.slow
def test_slow_die_with_parent_after_trio_spawn_thread_would_have_exited() -> None:
    """PR_SET_PDEATHSIG would fire when trio's spawn thread exits after 10 s idle (killing
    the child too early) and never when the parent dies later. We wait past that on all
    three backends at once (one 11 s wait for the lot), check nothing died early, then
    SIGKILL each parent."""
    parents = [start_parent(backend, wait_s=60) for backend in BACKENDS]
    time.sleep(11)
    for _, pids in parents:
        assert not gone(pids["child"]) and not gone(pids["grandchild"]), "killed while the parent lived"
    for parent, pids in parents:
        kill_parent_and_check(parent, pids)


def test_forked_sibling_does_not_hold_the_lifeline() -> None:
    parent, pids = start_parent("asyncio", wait_s=60, fork_sibling=True)
    # The forked sibling (it may not have exec'd "sleep" yet): the child that is neither.
    sibling = [p.pid for p in psutil.Process(parent.pid).children() if p.pid not in (pids["child"], pids["guardian"])]
    try:
        kill_parent_and_check(parent, pids)
    finally:
        for pid in sibling:
            os.kill(pid, signal.SIGKILL)
        wait_gone_and_reap(sibling, timeout=2.0)


def test_interpreter_exit_ends_leaked_children_and_the_guardian() -> None:
    parent, pids = start_parent("trio", wait_s=0)  # returns without closing the handler
    assert parent.wait(timeout=10) == 0
    assert parent.stdout is not None
    parent.stdout.close()
    assert not wait_gone_and_reap(list(pids.values()), timeout=2.0)


def test_guardian_is_named_and_restarted_when_killed() -> None:
    child = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        _guardian.register(child.pid)
        first = _guardian.guardian_pid()
        assert first is not None
        with open(f"/proc/{first}/comm") as f:
            assert f.read().strip() in ("asyncproc-srv", os.path.basename(sys.executable)[:15])
        os.kill(first, signal.SIGKILL)
        assert wait_gone_and_reap([first], timeout=2.0) == []
        _guardian.unregister(child.pid)  # finds the guardian gone, starts another
        _guardian.register(child.pid)
        second = _guardian.guardian_pid()
        assert second not in (None, first)
    finally:
        _guardian.unregister(child.pid)
        child.kill()
        child.wait()


# Another thread's fork() while the guardian starts, made deterministic: the fork happens
# inside the guardian's Popen call. The forked process lives on for 10 s; the child must
# still die with the parent, not when that process exits.
FORK_DURING_START = textwrap.dedent(
    """
    import os, subprocess, sys, time, anyio
    from asyncproc._subprocess import guardian as _guardian
    from asyncproc import get_subprocess_handler

    class ForkingPopen(subprocess.Popen):
        def __init__(self, *args, **kwargs):
            if os.fork() == 0:
                time.sleep(10)
                os._exit(0)
            super().__init__(*args, **kwargs)

    _guardian.subprocess.Popen = ForkingPopen

    async def main():
        handler = get_subprocess_handler("sleep", ["60"], {}, None, None, 0)
        await handler.spawn()
        print(handler.pid, _guardian.guardian_pid(), flush=True)
        await anyio.sleep(60)

    anyio.run(main)
    """
)


def test_a_fork_while_the_guardian_starts_does_not_hold_the_lifeline() -> None:
    parent = subprocess.Popen([sys.executable, "-c", FORK_DURING_START], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child, guardian = map(int, parent.stdout.readline().split())
    forked = [p.pid for p in psutil.Process(parent.pid).children() if p.pid not in (child, guardian)]
    try:
        kill_parent_and_check(parent, {"child": child, "grandchild": child, "guardian": guardian})
    finally:
        for pid in forked:
            os.kill(pid, signal.SIGKILL)
        wait_gone_and_reap(forked, timeout=2.0)
