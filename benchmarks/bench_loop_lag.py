"""How long asyncproc blocks the event loop while many handlers spawn and stop at once.

N handlers (default 300) are started concurrently; each child starts a grandchild in its
own session (so ending it needs more than a process-group kill), says "ready", and waits;
then all N are killed concurrently (SIGTERM, which they obey). A heartbeat task sleeps
1 ms in a loop: the worst gap beyond that is the longest time anything held the loop.

    .venv/bin/python benchmarks/bench_loop_lag.py [--handlers 300] [--rounds 2]
    ASYNCPROC_NO_CGROUP=1 .venv/bin/python benchmarks/bench_loop_lag.py   # the scans fallback

Prints per backend: worst and p99 heartbeat lag, the slowest single spawn() and kill(),
and the wall time of each phase. Each backend runs in a fresh interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

BACKENDS = ("asyncio", "uvloop", "trio")

# A shell, not Python: 300 interpreters booting on 2 cores would starve the loop thread
# of CPU, which is not what this measures.
CHILD = "setsid sleep 120 & echo ready; exec sleep 120"


async def _measure(count: int, rounds: int) -> dict[str, float]:
    import anyio

    from asyncproc import get_subprocess_handler

    lags: list[float] = []
    spawns: list[float] = []
    kills: list[float] = []
    stop = anyio.Event()

    async def heartbeat() -> None:
        while not stop.is_set():
            before = time.perf_counter()
            await anyio.sleep(0.001)
            lags.append(time.perf_counter() - before - 0.001)

    async def one(handler: object, ready: list[int]) -> None:
        started = time.perf_counter()
        await handler.spawn()  # type: ignore[attr-defined]
        spawns.append(time.perf_counter() - started)
        ready.append(1)

    async def end(handler: object) -> None:
        started = time.perf_counter()
        await handler.kill(grace=5)  # type: ignore[attr-defined]
        kills.append(time.perf_counter() - started)
        handler.close()  # type: ignore[attr-defined]

    def make() -> tuple[list[int], list[Any]]:
        read_fds, handlers = [], []
        for i in range(count):
            r, w = os.pipe()
            read_fds.append(r)
            handlers.append(get_subprocess_handler("/bin/sh", ["-c", CHILD], {}, w, None, i))
        return read_fds, handlers

    warm = get_subprocess_handler("/bin/true", [], {}, None, None, 0)  # first-use imports
    async with warm:
        pass
    phases: dict[str, float] = {}
    async with anyio.create_task_group() as tg:
        tg.start_soon(heartbeat)
        for _ in range(rounds):
            # Made off the loop: the benchmark's own work is not what it measures.
            read_fds, handlers = await anyio.to_thread.run_sync(make)
            ready: list[int] = []
            t0 = time.perf_counter()
            async with anyio.create_task_group() as spawners:
                for handler in handlers:
                    spawners.start_soon(one, handler, ready)
            for handler in handlers:
                os.close(handler._stdout_target)  # type: ignore[attr-defined]
            phases["spawn_s"] = max(phases.get("spawn_s", 0), time.perf_counter() - t0)
            for fd in read_fds:  # every child has started its grandchild
                await anyio.wait_readable(fd)
                os.read(fd, 100)
                os.close(fd)
            t0 = time.perf_counter()
            async with anyio.create_task_group() as killers:
                for handler in handlers:
                    killers.start_soon(end, handler)
            phases["kill_s"] = max(phases.get("kill_s", 0), time.perf_counter() - t0)
        stop.set()
    lags.sort()
    return {
        "lag_max_ms": lags[-1] * 1000,
        "lag_p99_ms": lags[int(len(lags) * 0.99)] * 1000,
        "spawn_max_ms": max(spawns) * 1000,
        "kill_max_ms": max(kills) * 1000,
        "kill_median_ms": statistics.median(kills) * 1000,
        **phases,
    }


def _child(backend: str, count: int, rounds: int) -> None:
    import anyio

    name, options = ("trio", {}) if backend == "trio" else ("asyncio", {"use_uvloop": backend == "uvloop"})
    result = anyio.run(_measure, count, rounds, backend=name, backend_options=options)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--handlers", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.handlers, args.rounds)
        return
    print(f"{args.handlers} handlers spawned then killed at once, {args.rounds} rounds "
          f"(cgroups {'off' if os.environ.get('ASYNCPROC_NO_CGROUP') else 'if available'})")
    print(f"{'backend':8} {'lag max':>9} {'lag p99':>9} {'spawn max':>10} {'kill max':>9} {'kill med':>9} "
          f"{'spawn all':>10} {'kill all':>9}")
    for backend in args.backends.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", backend, "--handlers", str(args.handlers),
                              "--rounds", str(args.rounds)], capture_output=True, text=True, timeout=600)
        if out.returncode:
            print(f"{backend:8} failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{backend:8} {r['lag_max_ms']:7.1f}ms {r['lag_p99_ms']:7.1f}ms {r['spawn_max_ms']:8.1f}ms "
              f"{r['kill_max_ms']:7.1f}ms {r['kill_median_ms']:7.1f}ms {r['spawn_s']:9.2f}s {r['kill_s']:8.2f}s")


if __name__ == "__main__":
    main()
