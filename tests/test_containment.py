"""Nothing a call starts survives any death, no call stalls the others, and every wait is
bounded: a SIGKILLed fork server or caller, a thousand orphans, a stopped server; and
exceptions that come back as themselves (deep, recursive, from lambdas)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import psutil
import pytest

import asyncproc
from asyncproc import ChildCrashed, Isolated
from asyncproc._isolated import server as _server
from asyncproc._proc import cgroup as _cgroup

from _children import (
    add,
    assert_gone,
    hang,
    raise_deep,
    raise_on_sigusr1,
    recurse_forever,
    runner,
    setsid_children_then_crash,
    start_pair_then_hang,
)

pytestmark = pytest.mark.anyio


async def _wait_for(path: Path) -> str:
    # Written, not only created: the writer opens the file before it writes (read between
    # the two, it is empty).
    with anyio.fail_after(30):
        while not path.exists() or not path.read_text():
            await anyio.sleep(0.01)
    return path.read_text()


def _wait_all_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    """Wait until none of ``pids`` exists; reap those re-parented to this (subreaper) test
    process as they come. The ones still running after ``timeout``."""
    deadline = time.monotonic() + timeout
    left = list(pids)
    while True:
        for pid in left:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        left = [pid for pid in left if psutil.pid_exists(pid)]
        if not left or time.monotonic() > deadline:
            return [pid for pid in left if _running(pid)]
        time.sleep(0.02)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- break 1: the fork server is SIGKILLed while calls run ------------------------------------


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
async def test_sigkilled_server_takes_every_calls_tree_with_it(method: str, tmp_path: Path) -> None:
    from asyncproc._isolated.link import link

    pidfile = tmp_path / "pids"
    server: list[int] = []

    async def kill_server_once_started() -> None:
        await _wait_for(pidfile)
        assert link.pid is not None
        server.append(link.pid)
        server.extend(p.pid for p in psutil.Process(link.pid).children())
        os.kill(link.pid, signal.SIGKILL)

    async with anyio.create_task_group() as tg:
        tg.start_soon(kill_server_once_started)
        with pytest.raises(ChildCrashed, match="fork server died"):
            await runner(method).call(start_pair_then_hang, str(pidfile))
    pids = [int(p) for p in pidfile.read_text().split()]
    kept, escaped = pids
    assert not _running(kept)  # ended before the caller heard of the crash
    if _cgroup.available():
        assert not _running(escaped)
    else:  # the fallback reaches the worker's group, not the escaped
        os.kill(escaped, signal.SIGKILL)
    assert_gone(server[0])  # and the dead server reaped
    # Its workers died with it (parent-death signal); init would reap them, but this test
    # process is a subreaper: they are ours, as are the ended grandchildren.
    assert _wait_all_gone(pids + server[1:]) == []
    assert await runner(method).call(add, 1) == 1  # a new server


# -- break 2: "fork" and the caller is SIGKILLed ----------------------------------------------

FORK_CALLER = """
import sys, anyio, asyncproc
sys.path.insert(0, sys.argv[3])
from _children import start_pair_then_hang
anyio.run(asyncproc.Isolated(timeout=60, start_method="fork").call, start_pair_then_hang, sys.argv[1], backend=sys.argv[2])
"""


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_fork_workers_tree_dies_with_a_sigkilled_caller(tmp_path: Path, backend: str) -> None:
    pidfile = tmp_path / "pids"
    tests = str(Path(__file__).parent)
    caller = subprocess.Popen([sys.executable, "-c", FORK_CALLER, str(pidfile), backend, tests])
    deadline = time.monotonic() + 30
    while not pidfile.exists():
        assert time.monotonic() < deadline and caller.poll() is None
        time.sleep(0.02)
    helpers = [p.pid for p in psutil.Process(caller.pid).children()]  # the worker, the guardian
    caller.kill()
    caller.wait()
    pids = [int(p) for p in pidfile.read_text().split()]
    assert _wait_all_gone(pids + helpers) == [], "a fork worker's grandchild survived its SIGKILLed caller"


# -- break 4: one call's orphans never stall the others ---------------------------------------


async def test_hundreds_of_orphans_of_a_crash_do_not_stall_other_calls(tmp_path: Path) -> None:
    # The fork server's side alone: "spawn" workers' orphans take the same path.
    pidfile = tmp_path / "pids"
    latencies: list[float] = []
    crashed = anyio.Event()

    async def trivial_calls() -> None:
        while not crashed.is_set():
            started = time.monotonic()
            assert await runner("forkserver").call(add, 1) == 1
            latencies.append(time.monotonic() - started)

    async with anyio.create_task_group() as tg:
        tg.start_soon(trivial_calls)
        with pytest.raises(ChildCrashed):
            await runner("forkserver").call(setsid_children_then_crash, 200, str(pidfile))
        crashed.set()
    pids = [int(p) for p in pidfile.read_text().split()]
    assert len(pids) == 200
    assert not any(map(_running, pids))  # gone before the caller heard of the crash
    assert _wait_all_gone(pids) == []
    # A generous bound, not a measurement (benchmarks/bench_containment.py measures):
    # on main, calls waited seconds behind per-orphan scans of /proc.
    assert max(latencies) < 2.0, sorted(latencies)[-5:]


# -- break 5: a stopped server never stretches a call past timeout + grace + kill bound -------

_KILL_BOUND_S = 2.0


async def test_timeout_with_a_stopped_server_is_bounded() -> None:
    from asyncproc._isolated.link import link

    assert await asyncproc.safe_call(add, 1) == 1  # a server, with workers in reserve
    assert link.pid is not None
    os.kill(link.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await Isolated(timeout=1, grace=3).call(hang)
        took = time.monotonic() - started
    finally:
        os.kill(link.pid, signal.SIGCONT)
    assert took < 1 + 3 + _KILL_BOUND_S + 1.0  # main: 1 + 3 + 2 + 2


async def test_exception_with_a_stopped_server_comes_without_extra_wait(tmp_path: Path) -> None:
    from asyncproc._isolated.link import link

    pidfile = tmp_path / "pid"
    took: list[float] = []

    async def stop_server_then_let_it_raise() -> None:
        worker = int(await _wait_for(pidfile))
        assert link.pid is not None
        os.kill(link.pid, signal.SIGSTOP)
        os.kill(worker, signal.SIGUSR1)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_server_then_let_it_raise)
            started = time.monotonic()
            with pytest.raises(ValueError, match="SIGUSR1"):
                await Isolated(timeout=2, grace=1).call(raise_on_sigusr1, str(pidfile))
            took.append(time.monotonic() - started)
    finally:
        if link.pid is not None:
            os.kill(link.pid, signal.SIGCONT)
    # With a cgroup the worker's end is seen without the server; without one the wait is
    # bounded by the call's own timeout + grace + kill bound. Main waited 9 s.
    assert took[0] < (2.0 if _cgroup.available() else 2 + 1 + _KILL_BOUND_S + 1.0)


# -- exceptions keep their type ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["forkserver", "fork"])
async def test_deep_and_recursion_errors_keep_their_type(method: str) -> None:
    with pytest.raises(ValueError, match="deep down"):
        await runner(method).call(raise_deep, 330)
    with pytest.raises(RecursionError):
        await runner(method).call(recurse_forever)


LAMBDA_MAIN = """
import asyncproc, faulthandler, sys, ctypes
def crash():
    ctypes.string_at(0)
try:
    asyncproc.safe_call_sync(lambda: 1 / 0)
except ZeroDivisionError as exc:
    import traceback
    print("".join(traceback.format_exception(exc)))
try:
    asyncproc.safe_call_sync(crash)
except asyncproc.ChildCrashed as exc:
    print(exc)
"""


def test_lambda_and_main_function_show_their_file_and_line(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(LAMBDA_MAIN)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "<dynamic-code>" not in out.stdout
    assert f'File "{script}", line 6, in <lambda>' in out.stdout  # the child's traceback
    assert "asyncproc.safe_call_sync(lambda: 1 / 0)" in out.stdout  # with its source line
    assert f'File "{script}", line 4 in crash' in out.stdout  # the crash stack


async def test_unpicklable_argument_is_named() -> None:
    import threading

    with pytest.raises(TypeError, match=r"kwargs\['b'\] \(lock\).*start_method=\"fork\""):
        await runner("forkserver").call(add, 1, b=threading.Lock())
    with pytest.raises(TypeError, match=r"args\[1\] \(lock\)"):
        await runner("spawn").call(add, 1, threading.Lock())
    assert await runner("fork").call(lambda lock: lock.acquire(), threading.Lock()) is True


SLOW_START = """
import os, sys, anyio, asyncproc
async def main():
    try:
        await asyncproc.Isolated(timeout=1, start_method="spawn").call(len, "")
    except TimeoutError as exc:
        print(exc)
anyio.run(main)
"""

# Spawned workers hang at start-up (before reading their call) until released.
SITECUSTOMIZE = """
import os, time
with open("/proc/self/cmdline", "rb") as f:
    worker = b"spawn_main" in f.read()
deadline = time.monotonic() + 30
while worker and not os.path.exists(os.environ["SLOW_START_RELEASE"]) and time.monotonic() < deadline:
    time.sleep(0.01)
"""


def test_spawn_timeout_before_the_function_started_says_so(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    release = tmp_path / "release"
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "SLOW_START_RELEASE": str(release)}
    try:
        out = subprocess.run([sys.executable, "-c", SLOW_START], env=env, capture_output=True, text=True, timeout=60)
    finally:
        release.write_text("")
    assert "did not start within 1 s" in out.stdout and "new interpreter" in out.stdout, out.stdout + out.stderr


# -- no cgroup left behind --------------------------------------------------------------------


@pytest.mark.skipif(not _cgroup.available(), reason="no writable cgroup v2 here")
def test_calls_leave_no_cgroup_behind(tmp_path: Path) -> None:
    # Sync (one backend): the cgroups are the fork server's and the "fork" path's business.
    from asyncproc._isolated.link import link

    async def calls() -> None:
        for method in ("forkserver", "spawn", "fork"):
            with pytest.raises(ChildCrashed):
                await runner(method).call(setsid_children_then_crash, 5, str(tmp_path / method))
            assert await runner(method).call(add, 2) == 2
        for i in range(3 * _server.SPARE_CGROUPS_MAX):  # more calls than cgroups may stay
            assert await runner("forkserver").call(abs, -i) == i  # a builtin: no import per call

    base = _cgroup._find_base()
    assert base is not None
    anyio.run(calls)
    assert link.cgroup is not None and link.pid is not None
    # While the server lives: one cgroup per idle worker, and the few empty ones it keeps to
    # reuse, none per call. Those kept number SPARE_CGROUPS_MAX at most, and as many at most
    # wait for their caller to close ctl (which it does once it has read the server's report).
    idle = {p.pid for p in psutil.Process(link.pid).children()}
    assert len([n for n in os.listdir(link.cgroup) if n.isdigit()]) <= len(idle) + 2 * _server.SPARE_CGROUPS_MAX
    link.stop()
    assert [n for n in os.listdir(base) if n.startswith(f"asyncproc-{os.getpid()}-")] == []
