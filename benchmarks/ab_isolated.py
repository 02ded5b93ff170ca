"""Two (or more) versions of asyncproc's isolated calls, interleaved in one caller process.

    .venv/bin/python benchmarks/ab_isolated.py asyncio|trio ROUNDS CALLS NAME=SRC [NAME=SRC ...]

Each ``SRC`` is a folder holding an ``asyncproc`` package (``src`` of a checkout, or of
``git archive REV src | tar -x -C DIR``). Each is imported under its own name, with its own
fork server, and the versions take turns: rounds of ``CALLS`` sequential calls of
``abs(-i)``, the order rotating. On a shared machine, load then hits every version alike:
the differences mean something even when the absolute numbers do not. Per version: the
median latency, and CPU per call of the caller's thread, of its fork server and of the
workers the server reaped. Environment: ``MB=1024`` makes the caller hold that much,
``BUSY=1`` runs a CPU-bound process beside, ``SPACE=0.02`` spaces the calls.
"""

from __future__ import annotations

import importlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from types import ModuleType
from typing import Any

HZ = os.sysconf("SC_CLK_TCK")


def _load(name: str, src: str, where: str) -> tuple[ModuleType, Any]:
    package = f"ap_{name}"
    shutil.copytree(os.path.join(src, "asyncproc"), os.path.join(where, package),
                    ignore=shutil.ignore_patterns("__pycache__"))
    # Each version's server gets cgroups of its own names (the names come from the pid).
    link_py = os.path.join(where, package, "_isolated", "link.py")
    with open(link_py) as f:
        text = f.read()
    with open(link_py, "w") as f:
        f.write(text.replace('_cgroup.create(f"srv{self._starts}")', '_cgroup.create(f"srv{self._starts}' + name + '")'))
    return importlib.import_module(package), importlib.import_module(f"{package}._isolated.link").link


def _cpu(pid: int) -> tuple[float, float]:
    """(own, reaped children's) CPU seconds of ``pid``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) / HZ for x in fields[11:15])
    return utime + stime, cutime + cstime


def _slot(backend: str, module: ModuleType, calls: int, space: float) -> tuple[list[float], float]:
    import anyio

    async def main() -> tuple[list[float], float]:
        isolated = module.Isolated(timeout=10)
        for _ in range(2):
            await isolated.call(abs, -1)
        out = []
        cpu = time.thread_time()
        for i in range(calls):
            start = time.perf_counter()
            assert await isolated.call(abs, -i) == i
            out.append(time.perf_counter() - start)
            if space:
                await anyio.sleep(space)
        return out, time.thread_time() - cpu

    if backend == "uvloop":
        return anyio.run(main, backend="asyncio", backend_options={"use_uvloop": True})
    return anyio.run(main, backend=backend)


def main() -> None:
    if len(sys.argv) < 5:
        sys.exit(__doc__)
    backend, rounds, calls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    ballast = bytearray(int(os.environ.get("MB", "0")) * 2**20)
    for i in range(0, len(ballast), 4096):  # touched: resident
        ballast[i] = 1
    space = float(os.environ.get("SPACE", "0"))
    where = tempfile.mkdtemp(prefix="asyncproc-ab-")
    sys.path.insert(0, where)
    try:
        versions = [(name, *_load(name, src, where)) for name, src in (a.split("=", 1) for a in sys.argv[4:])]
        for _, module, _ in versions:
            _slot(backend, module, 5, 0.0)  # servers up, reserves filled
        busy = subprocess.Popen([sys.executable, "-I", "-S", "-c", "while True: pass"]) if os.environ.get("BUSY") else None
        results: dict[str, dict[str, Any]] = {name: {"lat": [], "caller": 0.0, "server": 0.0, "workers": 0.0} for name, _, _ in versions}
        try:
            for r in range(rounds):
                k = r % len(versions)
                for name, module, link in versions[k:] + versions[:k]:
                    time.sleep(0.02)  # the last slot's worker exits are not billed to this one
                    before = _cpu(link.pid)
                    lat, cpu = _slot(backend, module, calls, space)
                    time.sleep(0.02)
                    after = _cpu(link.pid)
                    res = results[name]
                    res["lat"] += lat
                    res["caller"] += cpu
                    res["server"] += after[0] - before[0]
                    res["workers"] += after[1] - before[1]
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
        n = rounds * calls
        print(f"{backend}, caller +{len(ballast) >> 20} MB, busy beside: {busy is not None}, spaced {space} s; "
              f"{rounds} rounds x {calls} calls; load average {os.getloadavg()[0]:.2f}")
        for name, res in results.items():
            print(f"  {name:10} median {statistics.median(res['lat']) * 1e3:6.3f} ms | CPU per call: caller {res['caller'] / n * 1e6:4.0f} us, "
                  f"server {res['server'] / n * 1e6:4.0f} us, workers {res['workers'] / n * 1e6:5.0f} us")
    finally:
        shutil.rmtree(where, ignore_errors=True)


if __name__ == "__main__":
    main()
