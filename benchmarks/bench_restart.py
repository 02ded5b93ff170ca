"""How long an elastic restart of ``asyncproc run`` takes: from a rank's failing exit to the
first instruction of the next attempt's ranks, against the floor of starting that Python
program at all (``Popen`` to its first instruction).

    .venv/bin/python benchmarks/bench_restart.py [--nproc 2] [--restarts 20] [--backend asyncio]

Where torch is importable by the interpreter running this, torchrun (``python -m
torch.distributed.run``) is measured the same way, in the same run.

Every rank writes ``time.monotonic()`` (one clock for every process on Linux) when it
starts; rank 1 writes it again just before it fails. The other ranks sleep, so each restart
also pays for stopping them (SIGTERM, which ends them at once, and reaping).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RANK = """
import os, sys, time
t = time.monotonic()
attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
rank = os.environ["RANK"]
with open(sys.argv[1], "a") as f:
    f.write(f"start {attempt} {rank} {t}\\n")
    if rank == "1" and attempt < int(os.environ["TORCHELASTIC_MAX_RESTARTS"]):
        f.write(f"fail {attempt} {rank} {time.monotonic()}\\n")
        f.close()
        sys.exit(1)
if attempt < int(os.environ["TORCHELASTIC_MAX_RESTARTS"]):
    time.sleep(60)
"""


def restart_gaps(launcher: list[str], nproc: int, restarts: int) -> list[float]:
    """Seconds from each failure to the last rank of the next attempt starting."""
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "times"
        script = Path(tmp) / "rank.py"  # a .py, which both launchers run as `python -u`
        script.write_text(RANK)
        subprocess.run(
            [*launcher, f"--nproc-per-node={nproc}", f"--max-restarts={restarts}", str(script), str(record)],
            check=True, capture_output=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        )
        fails: dict[int, float] = {}
        starts: dict[int, list[float]] = {}
        for line in record.read_text().splitlines():
            kind, attempt, _, t = line.split()
            if kind == "fail":
                fails[int(attempt)] = float(t)
            else:
                starts.setdefault(int(attempt), []).append(float(t))
    return [max(starts[a + 1]) - fails[a] for a in sorted(fails)]


def python_start_floor(runs: int) -> list[float]:
    """Seconds from Popen to the first instruction of ``python -c``: the part of a restart
    that no launcher can avoid."""
    found = []
    for _ in range(runs):
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-c", "import time; print(time.monotonic())"],
                             capture_output=True, text=True, check=True)
        found.append(float(out.stdout) - t0)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--restarts", type=int, default=20)
    parser.add_argument("--backend", default="asyncio", choices=("asyncio", "uvloop", "trio"))
    args = parser.parse_args()
    launchers = {f"asyncproc run ({args.backend})": [sys.executable, "-m", "asyncproc", "run", "--backend", args.backend]}
    if importlib.util.find_spec("torch") is not None:
        launchers["torchrun"] = [sys.executable, "-m", "torch.distributed.run"]
    floor_ms = statistics.median(python_start_floor(args.restarts)) * 1e3
    print(f"{args.nproc} ranks, {args.restarts} restarts; floor (Popen -> first instruction of python): {floor_ms:.1f} ms")
    for name, launcher in launchers.items():
        gaps = restart_gaps(launcher, args.nproc, args.restarts)
        gap_ms = statistics.median(gaps) * 1e3
        print(f"  {name:24} failure -> next attempt's ranks all running: median {gap_ms:7.1f} ms "
              f"(min {min(gaps) * 1e3:.1f}, max {max(gaps) * 1e3:.1f}), {gap_ms / floor_ms:.1f}x the floor")


if __name__ == "__main__":
    main()
