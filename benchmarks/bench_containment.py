"""Containment of isolated calls: what survives a death, and what one call's mess costs the others.

    .venv/bin/python benchmarks/bench_containment.py [--orphans 1000] [--calls 20] [--json PATH]

Runs against whichever asyncproc it imports (``PYTHONPATH=/path/to/other/src`` measures
another checkout the same way), on asyncio, and prints one table:

* ``orphans``: one call forks N children that each ``setsid()`` and wait, then the call
  crashes (``os._exit``). Meanwhile 4 tasks make trivial calls back to back. Reported: how
  long after the crash the caller got ``ChildCrashed``, the p50/p99/max latency of the
  unrelated calls in flight at any time from the crash to 0.5 s after its outcome (and, for
  comparison, the same calls in the same run before the crash), and how many of the N were
  still alive.
* ``server exit``: a caller that exits (``os._exit``) 0.3 s after such a call crashed: how
  long its fork server outlives it, and how many orphans survive.
* ``server SIGKILL``: ``--calls`` calls each start a grandchild in their group and one in a
  session of their own, then the fork server is SIGKILLed: grandchildren alive afterwards.
* ``fork caller SIGKILL``: a caller running ``--calls`` "fork" calls like those is
  SIGKILLed: grandchildren alive afterwards.
* ``stopped server``: with the fork server stopped (SIGSTOP), ``Isolated(timeout=1,
  grace=1)``: a hanging call's TimeoutError, and a call whose worker raised, in seconds.

Targets (issue 8): unrelated p99 < 50 ms during a 1,000-orphan crash, 0 survivors everywhere,
stopped-server waits <= timeout + grace + 2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import anyio
import psutil

import asyncproc
from asyncproc._isolated.link import link

# What the calls run is what the tests run (workers import these by reference: sys.path
# reaches them).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _children import raise_on_sigusr1  # noqa: E402
from _children import setsid_children_then_crash as children_then_crash  # noqa: E402
from _children import start_pair_then_hang as pair_then_hang  # noqa: E402

CALL = asyncproc.Isolated(timeout=120)


def alive(pids: list[int]) -> int:
    """How many of ``pids`` still run (zombies reaped when ours, else not counted)."""
    reap(pids)
    count = 0
    for pid in pids:
        try:
            count += psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            pass
    return count


def settle_then_count(pids: list[int], wait_s: float = 3.0) -> int:
    time.sleep(wait_s)  # a benchmark, not a test: give stragglers their chance to die
    return alive(pids)


def kill_leftovers(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    time.sleep(0.2)
    reap(pids)


def reap(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def wait_for(path: Path, timeout: float = 300) -> None:
    with anyio.fail_after(timeout):
        while not path.exists():
            await anyio.sleep(0.005)


# -- scenarios --------------------------------------------------------------------------


async def orphans(n: int, tmp: Path) -> dict[str, object]:
    pidfile = tmp / "orphans"
    samples: list[tuple[float, float]] = []  # (start, latency)
    stop = anyio.Event()

    async def trivial() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                await CALL.call(len, "")
            except TimeoutError:
                pass  # counted at its full latency
            samples.append((started, time.monotonic() - started))

    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(trivial)
        await anyio.sleep(2.0)  # the "before" sample
        calm_end = time.monotonic()
        outcome: list[float] = []
        timed_out: list[bool] = []

        async def crashing() -> None:
            try:
                await CALL.call(children_then_crash, n, str(pidfile))
            except (asyncproc.ChildCrashed, TimeoutError) as exc:
                outcome.append(time.monotonic())
                timed_out.append(isinstance(exc, TimeoutError))

        tg.start_soon(crashing)
        await wait_for(pidfile)
        crashed_at = time.monotonic()
        while not outcome:
            await anyio.sleep(0.005)
        await anyio.sleep(0.5)
        stop.set()
    # Every call that was in flight at some point of the window, whenever it started.
    window = [lat for start, lat in samples if start + lat >= crashed_at and start <= outcome[0] + 0.5]
    calm = [lat for start, lat in samples if start < calm_end]
    pids = [int(p) for p in pidfile.read_text().split()]
    left = settle_then_count(pids)
    kill_leftovers(pids)
    return {
        "crash_to_outcome_s": outcome[0] - crashed_at,
        "outcome": "TimeoutError" if timed_out[0] else "ChildCrashed",
        "calm_p50_ms": 1000 * statistics.median(calm),
        "calm_p99_ms": 1000 * pct(calm, 0.99),
        "during_calls": len(window),
        "during_p50_ms": 1000 * statistics.median(window) if window else float("nan"),
        "during_p99_ms": 1000 * pct(window, 0.99),
        "during_max_ms": 1000 * max(window, default=float("nan")),
        "orphans_alive": left,
    }


SERVER_EXIT = """
import os, sys, anyio, asyncproc
sys.path.insert(0, sys.argv[3])
from bench_containment import children_then_crash
from asyncproc._isolated.link import link
async def main():
    await asyncproc.safe_call(len, "")
    print(link.pid, flush=True)
    async with anyio.create_task_group() as tg:
        tg.start_soon(asyncproc.Isolated(timeout=300).call, children_then_crash, int(sys.argv[2]), sys.argv[1])
        while not os.path.exists(sys.argv[1]):
            await anyio.sleep(0.005)
        await anyio.sleep(0.3)  # the server is ending the orphans now
        os._exit(0)  # no atexit: the server must notice by itself
anyio.run(main)
"""


def server_exit(n: int, tmp: Path) -> dict[str, object]:
    pidfile = tmp / "exit-orphans"
    caller = subprocess.Popen([sys.executable, "-c", SERVER_EXIT, str(pidfile), str(n), str(Path(__file__).parent)], stdout=subprocess.PIPE, text=True)
    out, _ = caller.communicate(timeout=600)
    exited = time.monotonic()
    server = int(out.split()[0])
    while alive([server]) and time.monotonic() - exited < 120:
        time.sleep(0.01)
    outlived = time.monotonic() - exited
    pids = [int(p) for p in pidfile.read_text().split()]
    left = settle_then_count(pids)
    kill_leftovers(pids)
    return {"server_outlived_caller_s": outlived, "orphans_alive": left}


async def server_sigkill(calls: int, tmp: Path) -> dict[str, object]:
    files = [tmp / f"pair{i}" for i in range(calls)]
    await CALL.call(len, "")
    async with anyio.create_task_group() as tg:
        for f in files:
            tg.start_soon(_expect_crash, f)
        for f in files:
            await wait_for(f)
        assert link.pid is not None
        os.kill(link.pid, signal.SIGKILL)
    pids = [int(p) for f in files for p in f.read_text().split()]
    left = settle_then_count(pids)
    kill_leftovers(pids)
    return {"grandchildren": len(pids), "alive": left}


async def _expect_crash(pidfile: Path) -> None:
    try:
        await CALL.call(pair_then_hang, str(pidfile))
    except asyncproc.ChildCrashed:
        pass


FORK_CALLER = """
import sys, anyio, asyncproc
sys.path.insert(0, sys.argv[2])
from bench_containment import pair_then_hang
async def main():
    async with anyio.create_task_group() as tg:
        for i in range(int(sys.argv[3])):
            tg.start_soon(asyncproc.Isolated(timeout=120, start_method="fork").call, pair_then_hang, f"{sys.argv[1]}/fork{i}")
anyio.run(main)
"""


def fork_caller_sigkill(calls: int, tmp: Path) -> dict[str, object]:
    caller = subprocess.Popen([sys.executable, "-c", FORK_CALLER, str(tmp), str(Path(__file__).parent), str(calls)])
    files = [tmp / f"fork{i}" for i in range(calls)]
    deadline = time.monotonic() + 300
    while not all(f.exists() for f in files) and time.monotonic() < deadline:
        time.sleep(0.02)
    helpers = [p.pid for p in psutil.Process(caller.pid).children(recursive=True)]
    caller.kill()
    caller.wait()
    pids = [int(p) for f in files for p in f.read_text().split()]
    left = settle_then_count(pids)
    kill_leftovers(pids + helpers)
    return {"grandchildren": len(pids), "alive": left}


async def stopped_server(tmp: Path) -> dict[str, object]:
    await CALL.call(len, "")  # a server with workers in reserve
    await anyio.sleep(0.5)  # ... once it has served the requests that refill it
    assert link.pid is not None
    server = link.pid
    os.kill(server, signal.SIGSTOP)
    try:
        started = time.monotonic()
        try:
            await asyncproc.Isolated(timeout=1, grace=1).call(time.sleep, 60)
        except TimeoutError:
            pass
        hang_s = time.monotonic() - started
    finally:
        os.kill(server, signal.SIGCONT)
    await CALL.call(len, "")
    pidfile = tmp / "raiser"
    took: list[float] = []

    async def stop_then_release() -> None:
        await wait_for(pidfile)
        os.kill(server_now(), signal.SIGSTOP)
        os.kill(int(pidfile.read_text()), signal.SIGUSR1)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_then_release)
            started = time.monotonic()
            try:
                await asyncproc.Isolated(timeout=1, grace=1).call(raise_on_sigusr1, str(pidfile))
            except ValueError:
                pass
            took.append(time.monotonic() - started)
    finally:
        os.kill(server_now(), signal.SIGCONT)
    return {"timeout_s": hang_s, "raised_s": took[0]}


def server_now() -> int:
    assert link.pid is not None
    return link.pid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--orphans", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--json", type=Path)
    opts = parser.parse_args()
    try:
        from asyncproc._proc import cgroup as _cgroup

        cgroup = "yes" if _cgroup.available() else "no"
    except ImportError:
        cgroup = "no (no _cgroup module)"
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        results["orphans"] = anyio.run(orphans, opts.orphans, tmp)
        results["server exit"] = server_exit(opts.orphans, tmp)
        results["server SIGKILL"] = anyio.run(server_sigkill, opts.calls, tmp)
        results["fork caller SIGKILL"] = fork_caller_sigkill(opts.calls, tmp)
        results["stopped server"] = anyio.run(stopped_server, tmp)
    print(f"asyncproc from {os.path.dirname(asyncproc.__file__)}; cgroup v2 per call: {cgroup}")
    print(f"{'scenario':<22} measurement")
    for name, values in results.items():
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        print(f"{name:<22} {textwrap.shorten(shown, 200)}")
    if opts.json:
        opts.json.write_text(json.dumps({"cgroup": cgroup, **results}, indent=2))


if __name__ == "__main__":
    main()
