"""Isolated calls against the floor of their own design, measured in one run.

    .venv/bin/python benchmarks/bench_floor.py [--calls 300] [--quick] [--json PATH]

The floor is a minimal pre-forking server built here (stdlib only, no event loop, no
safety): every call is served by a process forked ahead of demand that serves that one
call and exits, as asyncproc's fork server does. asyncproc's default start method must
stay within 1.5x of it for sequential calls (from a small caller and from one holding
1 GB), and within 2x with one CPU-bound process running beside.

Every scenario interleaves its methods: rounds of ``calls / rounds`` sequential calls per
method, the order rotating each round, so load from elsewhere on this (shared, 2-core)
machine hits every method alike and the ratios mean something even when the absolute
numbers do not. The function is ``abs(-7)``: the numbers are the machinery's.

Scenarios (each caller size in a fresh interpreter, with a touched ``bytearray`` of that
size really resident):

* ``sequential``: back-to-back calls; also torch's approach (a fork ``Pool(1)`` per call)
  and ``anyio.to_process`` (a reused worker, no isolation) for their ratios;
* ``cpu-bound beside``: the same while a busy-looping process takes one core;
* ``spaced 20 ms``: one call every 20 ms, what an application that calls now and then sees;
* ``throughput @16``: 16 concurrent callers (threads for the floor, tasks for asyncproc).
"""

from __future__ import annotations

import argparse
import array
import json
import multiprocessing
import os
import pickle
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

FUNC, ARG, EXPECT = abs, -7, 7
CALL_TIMEOUT_S = 10.0
SETTLE_S = 0.02  # between slots: the last worker's exit is not billed to the next method
SPACING_S = 0.020
TARGETS = {"sequential": 1.5, "cpu-bound beside": 2.0}

# -- the floor ------------------------------------------------------------------------------

# Forks one spare per request; a spare takes one call on its socket, answers and exits.
# Started with -I -S: the least a Python server can hold (every page is copied per call).
_FLOOR_SERVER = r"""
import array, os, pickle, socket, sys
chan = socket.socket(fileno=int(sys.argv[1]))

def fork_spare():
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    if os.fork() == 0:
        chan.close()
        mine.close()
        request = theirs.recv(65536)
        if request:
            func, args = pickle.loads(request)
            theirs.send(pickle.dumps(func(*args)))
        os._exit(0)
    theirs.close()
    chan.sendmsg([b"w"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [mine.fileno()]))])
    mine.close()

for _ in range(int(sys.argv[2])):
    fork_spare()
def requests():
    try:
        while chan.recv(1):
            yield
    except ConnectionResetError:  # the client closed with spares it never took
        pass

for _ in requests():
    fork_spare()
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass
"""


class Floor:
    """Client of the minimal server; thread-safe (each message arrives whole)."""

    def __init__(self, ahead: int = 2):
        self.chan, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [sys.executable, "-I", "-S", "-c", _FLOOR_SERVER, str(theirs.fileno()), str(ahead)]
        self.proc = subprocess.Popen(argv, pass_fds=[theirs.fileno()])
        theirs.close()

    def call(self, func: Callable[..., Any], *args: Any) -> Any:
        _, ancillary, _, _ = self.chan.recvmsg(1, socket.CMSG_SPACE(4))
        fds = array.array("i")
        fds.frombytes(ancillary[0][2][:4])
        self.chan.send(b"n")
        with socket.socket(fileno=fds[0]) as worker:
            worker.send(pickle.dumps((func, args)))
            return pickle.loads(worker.recv(65536))

    def close(self) -> None:
        self.chan.close()  # end-of-stream: the server exits; its idle spares read EOF and exit
        self.proc.wait(CALL_TIMEOUT_S)


# -- methods: each makes n sequential calls in one slot, returning seconds per call ---------


def _check(value: Any) -> None:
    if value != EXPECT:
        raise AssertionError(f"expected {EXPECT!r}, got {value!r}")


def _timed_sync(call: Callable[[], Any], n: int, spacing: float) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        _check(call())
        out.append(time.perf_counter() - start)
        if spacing:
            time.sleep(spacing)
    return out


def _timed_async(backend: str, make: Callable[[], Callable[[], Any]], n: int, spacing: float, warmup: int = 2) -> list[float]:
    import anyio

    async def main() -> list[float]:
        call = make()
        for _ in range(warmup):  # per event loop: anyio's worker pool lives with its loop
            _check(await call())
        out = []
        for _ in range(n):
            start = time.perf_counter()
            with anyio.fail_after(CALL_TIMEOUT_S):
                _check(await call())
            out.append(time.perf_counter() - start)
            if spacing:
                await anyio.sleep(spacing)
        return out

    return anyio.run(main, backend=backend)


def _asyncproc_call() -> Callable[[], Any]:
    import asyncproc

    isolated = asyncproc.Isolated(timeout=CALL_TIMEOUT_S)
    return lambda: isolated.call(FUNC, ARG)


def _anyio_call() -> Callable[[], Any]:
    import anyio.to_process

    return lambda: anyio.to_process.run_sync(FUNC, ARG)


def _torch_call() -> Any:
    """torch.onnx's original safe_call: a fork ``Pool(1)`` per call."""
    with multiprocessing.get_context("fork").Pool(1) as pool:
        return pool.apply_async(FUNC, (ARG,)).get(CALL_TIMEOUT_S)


class Methods:
    def __init__(self) -> None:
        self.floor = Floor()

    def slot(self, name: str, n: int, spacing: float = 0.0) -> list[float]:
        if name == "floor":
            return _timed_sync(lambda: self.floor.call(FUNC, ARG), n, spacing)
        if name == "asyncproc asyncio":
            return _timed_async("asyncio", _asyncproc_call, n, spacing)
        if name == "asyncproc trio":
            return _timed_async("trio", _asyncproc_call, n, spacing)
        if name == "anyio.to_process":
            return _timed_async("asyncio", _anyio_call, n, spacing)
        if name == "torch Pool(1)":
            return _timed_sync(_torch_call, n, spacing)
        raise ValueError(name)

    def burst(self, name: str, callers: int, per_caller: int) -> float:
        """Calls per second with ``callers`` concurrent callers."""
        start = time.perf_counter()
        if name == "floor":
            threads = [threading.Thread(target=_timed_sync, args=(lambda: self.floor.call(FUNC, ARG), per_caller, 0.0))
                       for _ in range(callers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        else:
            _burst_async("trio" if name.endswith("trio") else "asyncio", callers, per_caller)
        return callers * per_caller / (time.perf_counter() - start)

    def close(self) -> None:
        self.floor.close()


def _burst_async(backend: str, callers: int, per_caller: int) -> None:
    import anyio

    async def main() -> None:
        call = _asyncproc_call()

        async def caller() -> None:
            for _ in range(per_caller):
                with anyio.fail_after(CALL_TIMEOUT_S):
                    _check(await call())

        async with anyio.create_task_group() as tg:
            for _ in range(callers):
                tg.start_soon(caller)

    anyio.run(main, backend=backend)


# -- one caller size, in its own interpreter -------------------------------------------------

OURS = ["asyncproc asyncio", "asyncproc trio"]


def _interleaved(methods: Methods, names: list[str], rounds: int, per_round: dict[str, int], spacing: float = 0.0) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            time.sleep(SETTLE_S)
            samples[name] += methods.slot(name, per_round.get(name, per_round["*"]), spacing)
    return samples


def _busy_process() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-I", "-S", "-c", "while True: pass"])


def _progress(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _size_run(mb: int, calls: int, rounds: int, callers: int, per_caller: int, reps: int) -> dict[str, Any]:
    ballast = bytearray(mb * 2**20)
    for i in range(0, len(ballast), 4096):  # touched: resident, not just reserved
        ballast[i] = 1
    per = max(1, calls // rounds)
    methods = Methods()
    out: dict[str, Any] = {"mb": mb}
    try:
        for name in ["floor", *OURS, "anyio.to_process"]:  # start servers and pools, untimed
            methods.slot(name, 3)
        _progress(f"+{mb} MB: sequential")
        torch_per = max(2, per // (6 if mb == 0 else 30))
        out["sequential"] = _interleaved(
            methods, ["floor", *OURS, "anyio.to_process", "torch Pool(1)"], rounds, {"*": per, "torch Pool(1)": torch_per}
        )
        if mb == 0:
            _progress("cpu-bound beside")
            busy = _busy_process()
            try:
                out["cpu-bound beside"] = _interleaved(methods, ["floor", *OURS], rounds, {"*": per})
            finally:
                busy.kill()
                busy.wait()
            _progress("spaced 20 ms")
            spaced_rounds = max(1, rounds // 3)
            out["spaced 20 ms"] = _interleaved(methods, ["floor", *OURS], spaced_rounds, {"*": max(1, calls // spaced_rounds)}, SPACING_S)
            _progress(f"throughput @{callers}")
            tp: dict[str, list[float]] = {name: [] for name in ["floor", *OURS]}
            for name in tp:
                methods.burst(name, callers, 1)  # untimed: let the reserve and spares grow
            for rep in range(reps):
                names = list(tp)
                for name in names[rep % 3:] + names[:rep % 3]:
                    time.sleep(SETTLE_S * 5)
                    tp[name].append(methods.burst(name, callers, per_caller))
            out["throughput"] = tp
    finally:
        methods.close()
    del ballast
    return out


# -- the parent: tables and targets ----------------------------------------------------------


def _ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def _report(sizes: list[dict[str, Any]], callers: int) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []
    print(f"\n{'scenario':34} {'floor ms':>9} {'asyncio ms':>11} {'x floor':>8} {'trio ms':>9} {'x floor':>8}  target")
    for size in sizes:
        for scenario in ("sequential", "cpu-bound beside", "spaced 20 ms"):
            if scenario not in size:
                continue
            s = size[scenario]
            floor = _ms(s["floor"])
            row = f"{scenario + ' +' + str(size['mb']) + ' MB':34} {floor:9.3f}"
            verdicts = []
            for name in OURS:
                ratio = _ms(s[name]) / floor
                row += f" {_ms(s[name]):10.3f} {ratio:7.2f}x"
                target = TARGETS.get(scenario)
                if target is not None:
                    ok = ratio <= target
                    verdicts.append("PASS" if ok else "FAIL")
                    checks.append({"what": f"{scenario} +{size['mb']} MB {name} / floor", "value": ratio, "target": target, "ok": ok})
            target = TARGETS.get(scenario)
            print(row + (f"  <= {target}x {' '.join(verdicts)}" if target else "  (reported)"))
    for size in sizes:
        if "throughput" in size:
            tp = {name: statistics.median(v) for name, v in size["throughput"].items()}
            print(f"\nthroughput, {callers} concurrent callers (calls/s, median of {len(size['throughput']['floor'])}): "
                  + ", ".join(f"{name} {v:.0f} ({v / tp['floor']:.2f}x floor)" for name, v in tp.items()))
    print("\npeers (sequential, medians; ratio = peer / asyncproc asyncio):")
    for size in sizes:
        s = size["sequential"]
        ours = _ms(s["asyncproc asyncio"])
        for name in ("torch Pool(1)", "anyio.to_process"):
            print(f"  +{size['mb']:<5} MB  {name:18} {_ms(s[name]):8.3f} ms  {_ms(s[name]) / ours:6.2f}x")
    return checks


def _source() -> str:
    import asyncproc

    where = os.path.dirname(asyncproc.__file__)
    try:
        rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=where, capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        rev = ""
    return f"{where} ({rev or 'not a git checkout'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300, help="sequential calls per method and scenario (default 300)")
    parser.add_argument("--rss-mb", default="0,1024", help="comma-separated extra resident MB of the caller")
    parser.add_argument("--quick", action="store_true", help="60 calls, one throughput run")
    parser.add_argument("--json", metavar="PATH", help="write raw per-call seconds here")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        out = _size_run(args.worker, *map(int, args.plan.split(",")))
        sys.stdout.write("\n" + json.dumps(out) + "\n")
        return
    calls = 60 if args.quick else args.calls
    callers, per_caller, reps = 16, (2 if args.quick else 8), (1 if args.quick else 3)
    plan = f"{calls},{10 if calls >= 100 else 3},{callers},{per_caller},{reps}"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{len(os.sched_getaffinity(0))} CPUs, Python {sys.version.split()[0]}, load average {load}; "
          f"{calls} calls per method and scenario, interleaved in rounds")
    print(f"asyncproc from {_source()}")
    sizes = []
    for mb in (int(x) for x in args.rss_mb.split(",") if x.strip()):
        print(f"... caller +{mb} MB", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", str(mb), "--plan", plan],
                              stdout=subprocess.PIPE, text=True, timeout=900)
        if proc.returncode != 0:
            print(f"caller +{mb} MB: the run failed (exit {proc.returncode})")
            continue
        sizes.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    checks = _report(sizes, callers)
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("targets: " + ("all PASS" if checks and all(c["ok"] for c in checks) else
                         ", ".join(f"{c['what']} {c['value']:.2f}x > {c['target']}x FAIL" for c in checks if not c["ok"]) or "none measured"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"sizes": sizes, "checks": checks}, f)


if __name__ == "__main__":
    main()
