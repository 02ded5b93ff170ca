"""The supervisor's restart latency and its cost at scale, on asyncio, uvloop and trio.

    .venv/bin/python benchmarks/bench_supervisor.py [--restarts 200] [--children 1000] [--idle 5]

Restart latency: a tiny program (C, compiled here with ``cc``; ``python3 -S`` if there is
no compiler) writes CLOCK_MONOTONIC at its first instruction and again just before it
exits. Run as a permanent ``Command`` with ``Backoff(initial=0)``, each replacement's first
timestamp minus its predecessor's last is one restart: the pidfd wake-up, reaping, the
decision, logging (to a NullHandler), the spawn, the exec. The floor does the least that
can do the same in one event loop: ``Popen`` + a pidfd wait, in a loop, same program; and
a loop of ``SubprocessHandler`` spawn + wait shows what a Command costs before supervision
(its guardian registration, which makes it die with us, mostly).

Scale: ``--children`` idle ``sleep`` Commands under one supervisor: time to start them all
(in order, each after the previous runs), the supervisor's CPU use per second while they
idle (no memory limit; then with a limit on each, which adds one /proc pass a second),
its RSS, and the time to stop them all (reverse order, one after another).

Each backend runs in a fresh interpreter. 1,000 children need about 1,000 pidfds: the
soft RLIMIT_NOFILE is raised to the hard limit if it is lower than 4 per child.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

BACKENDS = ("asyncio", "uvloop", "trio")
ROUND = 20  # restarts per method per round

C_SOURCE = r"""
#include <stdio.h>
#include <time.h>
#include <unistd.h>
static long long now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1000000000LL + t.tv_nsec; }
int main(void) {
    long long first = now();
    char line[64];
    int n = snprintf(line, sizeof line, "%lld %lld\n", first, now());
    return write(1, line, n) == n ? 0 : 1;
}
"""
PY_SOURCE = "import os,time;a=time.monotonic_ns();os.write(1,f'{a} {time.monotonic_ns()}\\n'.encode())"


def stamp_program(workdir: Path) -> list[str]:
    """argv of the timestamping program: compiled C, else a lean Python."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc:
        src, exe = workdir / "stamp.c", workdir / "stamp"
        src.write_text(C_SOURCE)
        if subprocess.run([cc, "-O2", "-static", "-o", str(exe), str(src)], capture_output=True).returncode == 0:
            return [str(exe)]
        if subprocess.run([cc, "-O2", "-o", str(exe), str(src)], capture_output=True).returncode == 0:
            return [str(exe)]
    return [sys.executable, "-S", "-I", "-c", PY_SOURCE]


def gaps(path: Path) -> list[float]:
    """Microseconds from each run's exit stamp to the next run's first stamp."""
    stamps = [tuple(map(int, line.split())) for line in path.read_text().splitlines() if line.strip()]
    return [(b[0] - a[1]) / 1000 for a, b in zip(stamps, stamps[1:])]


# Each way runs n + 1 processes and returns the n gaps between them (microseconds) and its
# CPU time from the first process's start to the last one's (setup and teardown excluded).
Result = tuple[list[float], float]


async def supervised_restarts(argv: list[str], n: int, out: Path) -> Result:
    """A permanent Command restarted n times; the supervisor then gives up by itself
    (max_restarts=n), so no reader of events wakes up per restart."""
    import asyncproc

    sup = asyncproc.Supervisor(
        [asyncproc.Command("stamp", argv, stdout=out)],
        max_restarts=n, max_seconds=3600.0, backoff=asyncproc.Backoff(initial=0),
    )
    try:
        async with sup:
            cpu = time.process_time()  # the first run has started
            await sup.wait()
    except asyncproc.SupervisorGaveUp:
        cpu = time.process_time() - cpu
    return gaps(out)[:n], cpu


async def floor_restarts(argv: list[str], n: int, out: Path) -> Result:
    import anyio

    with open(out, "ab") as f:
        cpu = time.process_time()
        for _ in range(n + 1):
            proc = subprocess.Popen(argv, stdout=f, start_new_session=True)
            fd = os.pidfd_open(proc.pid)
            try:
                await anyio.wait_readable(fd)
            finally:
                os.close(fd)
            proc.wait()
        cpu = time.process_time() - cpu
    return gaps(out)[:n], cpu


async def handler_restarts(argv: list[str], n: int, out: Path) -> Result:
    """A loop of SubprocessHandler spawn + wait: what a Command costs without supervision
    (the guardian registration that makes it die with us included)."""
    from asyncproc import SubprocessHandler

    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        cpu = time.process_time()
        for _ in range(n + 1):
            handler = SubprocessHandler(argv[0], argv[1:], None, fd, None, 0)
            await handler.spawn()
            await handler.wait()
        cpu = time.process_time() - cpu
    finally:
        os.close(fd)
    return gaps(out)[:n], cpu


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of ours, reaping included
    return usage.ru_utime + usage.ru_stime


async def scale(n: int, idle: float, memory_limit: int | None) -> dict[str, float]:
    import anyio
    import psutil

    import asyncproc

    children = [asyncproc.Command(f"sleep-{i}", ["sleep", "3600"], memory_limit=memory_limit, shutdown=5.0) for i in range(n)]
    sup = asyncproc.Supervisor(children)
    t0 = time.perf_counter()
    await sup.__aenter__()
    try:
        started = time.perf_counter() - t0
        assert all(s.state == "running" for s in sup.status())
        await anyio.sleep(1.5)  # let the first memory pass (if any) happen before measuring
        cpu0, wall0 = cpu_seconds(), time.perf_counter()
        await anyio.sleep(idle)
        cpu = (cpu_seconds() - cpu0) / (time.perf_counter() - wall0)
        rss = psutil.Process().memory_info().rss
    finally:
        t1 = time.perf_counter()
        await sup.__aexit__(None, None, None)
    stopped = time.perf_counter() - t1
    return {"start_s": started, "cpu_pct": cpu * 100, "rss_mb": rss / 2**20, "stop_s": stopped}


async def measure(args: argparse.Namespace) -> dict[str, object]:
    import psutil

    logging.getLogger("asyncproc").addHandler(logging.NullHandler())
    logging.getLogger("asyncproc").propagate = False
    result: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        argv = stamp_program(workdir)
        result["program"] = "C" if len(argv) == 1 else "python -S"
        await handler_restarts(argv, 20, workdir / "warm")  # the guardian, page cache
        # Interleaved in rounds, so that load from elsewhere (this VM is shared) hits the
        # three alike; each round's gaps are its runs' consecutive exits and starts.
        ways: dict[str, Callable[[list[str], int, Path], Awaitable[Result]]] = {
            "floor_us": floor_restarts, "handler_us": handler_restarts, "restart_us": supervised_restarts,
        }
        samples: dict[str, list[float]] = {key: [] for key in ways}
        cpu = dict.fromkeys(ways, 0.0)
        rounds = max(1, args.restarts // ROUND)
        for i in range(rounds):
            for key, way in ways.items():
                gaps_us, cpu_s = await way(argv, ROUND, workdir / f"{key}-{i}")
                samples[key] += gaps_us
                cpu[key] += cpu_s
        for key, gaps_us in samples.items():
            result[key] = statistics.median(gaps_us)
            # Our CPU per restart (all our threads): what the load on a busy machine multiplies.
            result[key.replace("_us", "_cpu_us")] = cpu[key] / (rounds * ROUND) * 1e6
    result["rss_base_mb"] = psutil.Process().memory_info().rss / 2**20
    if args.children:
        result["plain"] = await scale(args.children, args.idle, None)
        result["limited"] = await scale(args.children, args.idle, 1 << 40)
    return result


def raise_fd_limit(children: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * children + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard) if hard != resource.RLIM_INFINITY else want, hard))


def worker(args: argparse.Namespace) -> None:
    import anyio

    raise_fd_limit(args.children)
    backend = args.worker
    name, options = ("trio", {}) if backend == "trio" else ("asyncio", {"use_uvloop": backend == "uvloop"})
    print(json.dumps(anyio.run(measure, args, backend=name, backend_options=options)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--restarts", type=int, default=200)
    parser.add_argument("--children", type=int, default=1000)
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle measured")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    rows = []
    for backend in args.backends.split(","):
        cmd = [sys.executable, __file__, "--worker", backend, "--restarts", str(args.restarts),
               "--children", str(args.children), "--idle", str(args.idle)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append((backend, json.loads(out.strip().splitlines()[-1])))
    program = rows[0][1]["program"]
    print(f"restart latency: exit -> replacement's first instruction ({program} program), median of {args.restarts}"
          f" (rounds of {ROUND}, interleaved)")
    print("  (cpu: this process's CPU time per restart, all threads; the wall-clock gaps move with the")
    print("   machine's load, the CPU much less)")
    print(f"{'backend':8} | {'supervisor us (cpu)':>19} | {'Popen+pidfd floor us (cpu)':>26} | {'ratio':>6} | "
          f"{'handler spawn+wait us (cpu)':>27} | {'ratio':>6}")
    for backend, r in rows:
        sup, floor, handler = (f"{r[k + '_us']:.0f} ({r[k + '_cpu_us']:.0f})" for k in ("restart", "floor", "handler"))
        print(f"{backend:8} | {sup:>19} | {floor:>26} | {r['restart_us'] / r['floor_us']:5.2f}x | "
              f"{handler:>27} | {r['restart_us'] / r['handler_us']:5.2f}x")
    if args.children:
        base = ", ".join(f"{b} {r['rss_base_mb']:.0f} MB" for b, r in rows)
        print(f"\n{args.children} idle `sleep` Commands under one supervisor (RSS before starting them: {base})")
        print(f"{'backend':8} | {'memory_limit':>12} | {'start all (s)':>13} | {'idle CPU (% of a core)':>22} | "
              f"{'RSS (MB)':>8} | {'stop all (s)':>12}")
        for backend, r in rows:
            for label, key in (("none", "plain"), ("on each", "limited")):
                s = r[key]
                print(f"{backend:8} | {label:>12} | {s['start_s']:13.2f} | {s['cpu_pct']:22.2f} | "
                      f"{s['rss_mb']:8.0f} | {s['stop_s']:12.2f}")


if __name__ == "__main__":
    main()
