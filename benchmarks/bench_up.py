"""How soon ``asyncproc up`` acts on a memory limit, and how soon it restarts a crash.

    .venv/bin/python benchmarks/bench_up.py [--samples 20] [--backend asyncio]

Both times are taken by the program itself, on CLOCK_MONOTONIC (one clock for every
process), so neither the console nor ``up``'s own output is in the measure:

* memory: the program touches 3x its ``memory_limit`` and prints the time it is over the
  limit; its SIGTERM handler prints the time the stop reached it. The difference is what
  PM2 documents as up to 30 s (its memory worker runs every 30 s).
* restart: the program prints the time just before ``exit 1``; its replacement prints the
  time at its start (``Backoff(initial=0)``: no deliberate delay). This includes the exit,
  the reaping, the decision, a new interpreter's start (``python -S``: the floor of the
  program itself, measured alone and printed beside it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOG = """
import signal, sys, time
def stopped(*_):
    print("term", time.monotonic(), flush=True); sys.exit(0)
signal.signal(signal.SIGTERM, stopped)
data = bytearray(3 * 32 << 20)
for i in range(0, len(data), 4096): data[i] = 1  # touch every page: resident now
print("over", time.monotonic(), flush=True)
time.sleep(600)
"""
CRASH = "import time, sys; print('start', time.monotonic(), flush=True); print('end', time.monotonic(), flush=True); sys.exit(1)"


def _file(folder: Path) -> Path:
    py = json.dumps([sys.executable, "-S", "-u", "-c"])[:-1]
    text = f"""
[supervisor]
max_restarts = 100000
max_seconds = 1
backoff = {{ initial = 0 }}

[programs.hog]
command = {py}, {json.dumps(HOG)}]
memory_limit = "32 MiB"
shutdown = 5

[programs.crash]
command = {py}, {json.dumps(CRASH)}]
"""
    path = folder / "asyncproc.toml"
    path.write_text(text)
    return path


def _collect(file: Path, samples: int, backend: str) -> tuple[list[float], list[float]]:
    up = subprocess.Popen([sys.executable, "-m", "asyncproc", "up", str(file), "--no-live", "--backend", backend,
                           "--socket", str(file.parent / "up.sock")], stdout=subprocess.PIPE, text=True)
    memory: list[float] = []
    restart: list[float] = []
    over: float | None = None
    end: float | None = None
    assert up.stdout is not None
    try:
        for line in up.stdout:
            m = re.match(r"\[(hog|crash)\] (\w+) ([\d.]+)", line)
            if not m:
                continue
            name, what, t = m.group(1), m.group(2), float(m.group(3))
            if name == "hog":
                if what == "over":
                    over = t
                elif over is not None:
                    memory.append(t - over)
                    over = None
            elif what == "end":
                end = t
            elif end is not None:
                restart.append(t - end)
                end = None
            if len(memory) >= samples and len(restart) >= samples:
                break
    finally:
        up.terminate()
        up.wait(60)
    return memory, restart


def _python_floor(n: int) -> list[float]:
    """A bare ``python -S`` start, as the restart's floor."""
    out = []
    for _ in range(n):
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-S", "-c", "pass"], check=True)
        out.append(time.monotonic() - t0)
    return out


def _ms(values: list[float]) -> str:
    values = sorted(values)
    p90 = values[int(0.9 * (len(values) - 1))]
    return f"median {statistics.median(values) * 1e3:7.1f} ms   p90 {p90 * 1e3:7.1f} ms   max {values[-1] * 1e3:7.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--backend", choices=("asyncio", "uvloop", "trio"), default="asyncio")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        memory, restart = _collect(_file(Path(folder)), args.samples, args.backend)
    floor = _python_floor(args.samples)
    print(f"asyncproc up ({args.backend}), {args.samples} samples each, on {os.cpu_count()} CPUs")
    print(f"  over memory_limit -> SIGTERM reaches it : {_ms(memory)}")
    print(f"  exit 1 -> replacement's first line       : {_ms(restart)}")
    print(f"  floor: a bare `python -S` start, alone  : {_ms(floor)}")
    print(f"  restart / floor (medians)                : {statistics.median(restart) / statistics.median(floor):.2f}x")
    print("  PM2 documents its memory check as every 30 s; supervisord has none of its own")


if __name__ == "__main__":
    main()
