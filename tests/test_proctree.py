"""Process-tree rules: the group and escaped descendants are signalled, waits are bounded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from asyncproc._proc import proctree as _proctree

pytestmark = pytest.mark.anyio


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


def _voluntary_switches() -> int:
    """How often this thread has gone to sleep in the kernel (blocked) so far."""
    with open("/proc/thread-self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))


@pytest.mark.parametrize("with_pidfd", [True, False], ids=["pidfd", "no-pidfd"])
async def test_wait_exit_is_event_driven(anyio_backend: object, with_pidfd: bool) -> None:
    import anyio

    proc = subprocess.Popen(["sleep", "60"])
    fd = _proctree.pidfd_open(proc.pid) if with_pidfd else None  # None: as on kernels < 5.3
    try:
        # Waiting on a pidfd sleeps in the kernel until the exit (a few wake-ups in all);
        # a loop that sleeps 5 ms and checks would wake about 100 times in 0.5 s.
        before = _voluntary_switches()
        with anyio.move_on_after(0.5):
            await _proctree.wait_exit(proc.pid, fd)
        assert _voluntary_switches() - before < 20
        assert proc.poll() is None  # it did not return early either
        proc.kill()
        with anyio.fail_after(10):
            await _proctree.wait_exit(proc.pid, fd)
    finally:
        if fd is not None:
            os.close(fd)
    assert _proctree.reap(proc.pid) == -signal.SIGKILL
    proc.returncode = -signal.SIGKILL


# A chain of orphans-to-be: a child that starts a setsid session, double-forks and exits;
# its child and grandchild are re-parented to the nearest subreaper, one level at a time
# as each dies. The middle one ignores SIGTERM (a graceful stop must escalate). ``chain()``
# returns its caller's pid and the pids of the two that live on.
CHAIN = """
import os, signal, sys

def chain():
    r, w = os.pipe()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            if os.fork() == 0:
                os.write(w, b"%d " % os.getpid())
                signal.pause()
            os.write(w, b"%d " % os.getpid())
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.pause()
        os._exit(0)
    pids = b""
    while pids.count(b" ") < 2:
        pids += os.read(r, 64)
    os.close(r)
    os.close(w)
    return os.getpid(), [int(pid) for pid in pids.split()]
"""

# A subreaper leaves the chain, ends it with the one orphan reaper as ``sys.argv[1]``
# says, and prints the chain's pids and the children it still has.
ORPHANS = CHAIN + """
from asyncproc._proc import proctree as p

p.make_subreaper()
_, orphans = chain()
mode = sys.argv[1]
adopted = p.Adopted()
if mode == "end":
    adopted.end(10.0)
elif mode == "steps":  # single non-blocking steps, one reap each, as the fork server takes them
    steps = 0
    while left := adopted.step(batch=1):
        steps += 1
        p.wait_pids(left, 10.0)
    assert steps >= 3, steps  # a level per round: the chain cannot all end in one
else:
    import anyio

    anyio.run(adopted.end_async, signal.SIGTERM, 0.5, backend=mode)
print(*orphans, "|", p.own_children())
"""


@pytest.mark.parametrize("mode", ["end", "steps", "asyncio", "trio"])
def test_the_orphan_reaper_ends_and_reaps_a_double_forked_setsid_chain(mode: str) -> None:
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", ORPHANS, mode], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    orphans, left = out.stdout.split("|")
    assert left.strip() == "[]", "an orphan was left unreaped"
    for pid in map(int, orphans.split()):
        assert not os.path.exists(f"/proc/{pid}"), f"orphan {pid} outlived the reaper"
    assert time.monotonic() - started < 20  # at once, not at a bound


# The isolated-call users of the reaper: a call returns and leaves the chain. The worker
# (a subreaper) ends and reaps it before it exits; a worker the fork server ended first
# leaves it to the server, which does the same. Without cgroups, so no cgroup kill does
# the work instead. Prints the chain's pids still there (as processes or zombies) once the
# worker has exited and the server, if any, has stopped.
WORKER_CHAIN = CHAIN + """
import anyio, asyncproc
from asyncproc._isolated.link import link
from asyncproc._proc import proctree as p

p.make_subreaper()
worker, pids = anyio.run(asyncproc.Isolated(start_method=sys.argv[1], timeout=30).call, chain)
p.wait_pids([worker], 30.0)  # its reaper runs after it answered, before it exits
link.stop()  # the server ends and reaps what it adopted before it exits
print([pid for pid in pids if os.path.exists(f"/proc/{pid}")])
"""


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_an_isolated_call_leaves_no_part_of_a_setsid_chain(method: str) -> None:
    env = {**os.environ, "ASYNCPROC_NO_CGROUP": "1"}
    out = subprocess.run([sys.executable, "-c", WORKER_CHAIN, method], capture_output=True, text=True, timeout=90, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", "part of the chain was left behind"


def test_own_children_is_not_confused_by_threads_that_end() -> None:
    # A thread that ends between the listing of /proc/self/task and the read of its
    # children file is no sign that the kernel lists none (seen when anyio.run returned on
    # asyncio, its worker threads ending meanwhile): the answer stays a list.
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            t = threading.Thread(target=int)
            t.start()
            t.join()

    churner = threading.Thread(target=churn)
    churner.start()
    try:
        answers = [_proctree.own_children() for _ in range(3000)]
    finally:
        stop.set()
        churner.join()
    assert None not in answers
