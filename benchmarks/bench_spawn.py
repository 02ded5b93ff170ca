"""Median cost of spawn + wait of /bin/true: asyncproc's handler (unbound, and NUMA-bound)
vs ``anyio.open_process`` vs plain ``subprocess.run`` vs a ``preexec_fn`` binding, on
asyncio, uvloop and trio, from a small parent and from one with 1 GB resident.

    .venv/bin/python benchmarks/bench_spawn.py [--runs 200] [--big-mb 1024]

Each (backend, parent size) runs in a fresh interpreter, so one measurement's memory and
threads do not leak into the next.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

TRUE = "/bin/true"
BACKENDS = ("asyncio", "uvloop", "trio")
WAYS = ("handler", "handler+numa", "anyio.open_process", "subprocess.run", "popen+preexec_fn")


async def _handler_once() -> None:
    from asyncproc import get_subprocess_handler

    handler = get_subprocess_handler(TRUE, [], None, None, None, 0)
    await handler.spawn()
    await handler.wait()


async def _handler_bound_once() -> None:
    from asyncproc import NumaOptions, get_subprocess_handler

    # Local rank 0 of 2 in exclusive mode: a real binding (a CPU subset) on any machine
    # with two CPUs or more.
    handler = get_subprocess_handler(TRUE, [], {"LOCAL_WORLD_SIZE": "2"}, None, None, 0, NumaOptions("exclusive"))
    await handler.spawn()
    await handler.wait()


async def _preexec_bound_once() -> None:
    # The naive way to bind before exec: a preexec_fn, which disables CPython's vfork path.
    proc = subprocess.Popen([TRUE], preexec_fn=lambda: os.sched_setaffinity(0, {0}))
    proc.wait()


async def _anyio_once() -> None:
    import anyio

    async with await anyio.open_process([TRUE]) as process:
        await process.wait()


async def _run_once() -> None:
    subprocess.run([TRUE], check=True)  # blocks the loop: the floor, not a recommendation


_ONCE: dict[str, Callable[[], Awaitable[None]]] = {
    "handler": _handler_once,
    "handler+numa": _handler_bound_once,
    "anyio.open_process": _anyio_once,
    "subprocess.run": _run_once,
    "popen+preexec_fn": _preexec_bound_once,
}


async def _measure(runs: int) -> dict[str, float]:
    """Interleaved (one of each way per round), so load from elsewhere hits all alike."""
    for once in _ONCE.values():
        for _ in range(5):  # warm up: imports, the guardian, trio's thread cache
            await once()
    samples: dict[str, list[float]] = {way: [] for way in _ONCE}
    for _ in range(runs):
        for way, once in _ONCE.items():
            start = time.perf_counter()
            await once()
            samples[way].append(time.perf_counter() - start)
    return {way: statistics.median(s) * 1000 for way, s in samples.items()}


def _worker(backend: str, big_mb: int, runs: int) -> None:
    import anyio

    ballast = bytearray(big_mb * 1024 * 1024)
    for i in range(0, len(ballast), 4096):  # touch every page: resident, not just reserved
        ballast[i] = 1
    name, options = ("trio", {}) if backend == "trio" else ("asyncio", {"use_uvloop": backend == "uvloop"})
    print(json.dumps(anyio.run(_measure, runs, backend=name, backend_options=options)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--big-mb", type=int, default=1024)
    parser.add_argument("--worker", nargs=2, metavar=("BACKEND", "MB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker[0], int(args.worker[1]), args.runs)
        return
    print(f"spawn + wait of {TRUE}, median of {args.runs} (ms)")
    print("  open/handler = anyio.open_process / handler (higher: the handler is faster)")
    print("  bound/unbound = handler+numa / handler (issue 4's target: at most 1.25 from a 1 GB parent)")
    print(f"{'backend':8} {'parent RSS':>10} | " + " | ".join(f"{w:>18}" for w in WAYS) + " | open/handler | bound/unbound")
    for backend in BACKENDS:
        for mb in (0, args.big_mb):
            out = subprocess.run(
                [sys.executable, __file__, "--runs", str(args.runs), "--worker", backend, str(mb)],
                capture_output=True, text=True, check=True,
            ).stdout
            m = json.loads(out.strip().splitlines()[-1])
            ratio = m["anyio.open_process"] / m["handler"]
            bound = m["handler+numa"] / m["handler"]
            cells = " | ".join(f"{m[w]:18.2f}" for w in WAYS)
            print(f"{backend:8} {f'+{mb} MB':>10} | {cells} | {ratio:11.1f}x | {bound:12.2f}x")


if __name__ == "__main__":
    main()
