"""Cost of one isolated call of a trivial function: asyncproc's ``Isolated(...).call`` (each
start method) and ``safe_call_sync`` against the ways people do it today, from a small caller
and from one with 1 GB of extra resident memory; then throughput with 16 concurrent callers.

    .venv/bin/python benchmarks/bench_isolated.py [--calls 200] [--rss-mb 0,1024]
                                                  [--concurrency 16] [--quick] [--json PATH]

The function is ``operator.add(1, 2)``: a builtin that pickles by reference, so every method
(fork, spawn, pools that pickle the function) can run it with no import path set-up, and the
numbers are the cost of the machinery, not of the function.

Each caller size runs in a fresh interpreter that holds a touched ``bytearray`` of that size
(really resident, nothing left over from another size) and measures every method there,
interleaved: ``rounds`` rounds of ``calls / rounds`` sequential calls per method, the order of
methods rotating every round, so load from elsewhere on the machine hits all methods alike.
Every method is warmed up first (asyncproc's fork server, anyio's and trio-parallel's
workers, loky's executor). Latency = median (and p90) of the per-call times.

Throughput: ``--concurrency`` callers at once (asyncio tasks, trio tasks for trio-parallel,
threads for the blocking APIs, ``asyncio.wrap_future`` for pebble and loky futures), each
making a few calls; calls per second over the whole burst, median of the repetitions. The
pools keep their default size (one worker per CPU), as a user gets them.

Asyncproc and anyio.to_process run on asyncio; trio-parallel on trio (in its own thread).
The targets of the issue are checked for asyncproc's default start method.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import multiprocessing
import operator
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from asyncproc._proc import proctree as _proctree

FUNC = operator.add
ARGS = (1, 2)
EXPECT = 3
CALL_TIMEOUT = 10.0  # per call, for every method: a hung call fails the method, not the run
ROUNDS = 10
WARMUP_CALLS = 5
# Pause between one method's slot and the next: a process forked from a 1 GB caller goes
# on freeing its page tables after it answered, on the other CPU; let that finish rather
# than bill it to whichever method comes next.
SETTLE_S = 0.05
SETTLE_BURST_S = 0.25
SIZE_TIMEOUT_S = 900  # one caller size, all methods: a bound for a wedged benchmark


def _check(value: Any) -> None:
    if value != EXPECT:
        raise AssertionError(f"expected {EXPECT!r}, got {value!r}")


def _in_plain_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn`` in a new thread that has no event loop and no copied context (so
    ``trio.run`` and ``anyio.run`` work there) and wait for it without blocking the loop."""
    import anyio

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc

    thread = threading.Thread(target=target, name="bench-plain", daemon=True)
    thread.start()

    async def wait() -> Any:
        await anyio.to_thread.run_sync(thread.join)
        if "error" in box:
            raise box["error"]
        return box["value"]

    return wait()


# -- methods ------------------------------------------------------------------------------


class Method:
    """One way of making the call. ``round`` returns per-call seconds; ``burst`` makes
    ``callers * per_caller`` calls from ``callers`` concurrent callers."""

    name = "?"
    warmup = WARMUP_CALLS

    async def setup(self) -> None:
        for _ in range(self.warmup):
            await self.call()

    async def call(self) -> None:
        raise NotImplementedError

    async def round(self, n: int) -> list[float]:
        out = []
        for _ in range(n):
            start = time.perf_counter()
            await self.call()
            out.append(time.perf_counter() - start)
        return out

    async def burst(self, callers: int, per_caller: int) -> None:
        import anyio

        async def caller() -> None:
            for _ in range(per_caller):
                await self.call()

        async with anyio.create_task_group() as tg:
            for _ in range(callers):
                tg.start_soon(caller)

    async def teardown(self) -> None:
        pass


class AsyncprocMethod(Method):
    def __init__(self, start_method: str):
        self.start_method = start_method
        self.name = f"asyncproc {start_method}"
        if start_method == "spawn":
            self.warmup = 2

    async def setup(self) -> None:
        import asyncproc

        self.isolated = asyncproc.Isolated(start_method=self.start_method, timeout=CALL_TIMEOUT)
        await super().setup()

    async def call(self) -> None:
        _check(await self.isolated.call(FUNC, *ARGS))


class SafeCallSyncMethod(Method):
    """``asyncproc.safe_call_sync`` from code with no event loop (a plain thread here: it
    refuses to run inside a loop). Each call starts and ends an asyncio loop of its own."""

    name = "asyncproc safe_call_sync"

    @staticmethod
    def _calls(n: int) -> list[float]:
        import asyncproc

        out = []
        for _ in range(n):
            start = time.perf_counter()
            _check(asyncproc.safe_call_sync(FUNC, *ARGS))
            out.append(time.perf_counter() - start)
        return out

    async def setup(self) -> None:
        await _in_plain_thread(self._calls, self.warmup)

    async def round(self, n: int) -> list[float]:
        return await _in_plain_thread(self._calls, n)

    async def burst(self, callers: int, per_caller: int) -> None:
        threads_done: list[BaseException] = []

        def many() -> None:
            errors: list[BaseException] = []

            def one() -> None:
                try:
                    self._calls(per_caller)
                except BaseException as exc:  # noqa: BLE001
                    errors.append(exc)

            threads = [threading.Thread(target=one, daemon=True) for _ in range(callers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            threads_done.extend(errors)

        await _in_plain_thread(many)
        if threads_done:
            raise threads_done[0]


def _torch_safe_call(func: Callable[..., Any], *args: Any) -> Any:
    """torch.onnx's original safe_call: a fork ``Pool(1)`` per call."""
    with multiprocessing.get_context("fork").Pool(1) as pool:
        return pool.apply_async(func, args).get(CALL_TIMEOUT)


def _process_target(conn: Any, func: Callable[..., Any], args: tuple[Any, ...]) -> None:
    try:
        conn.send(func(*args))
    finally:
        conn.close()


def _process_call(func: Callable[..., Any], *args: Any) -> Any:
    """A fork ``multiprocessing.Process`` per call, the result through a Pipe."""
    ctx = multiprocessing.get_context("fork")
    reader, writer = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_process_target, args=(writer, func, args), daemon=True)
    try:
        proc.start()
        writer.close()
        if not reader.poll(CALL_TIMEOUT):
            raise TimeoutError("mp.Process call timed out")
        return reader.recv()
    finally:
        reader.close()
        proc.join(CALL_TIMEOUT)
        if proc.is_alive():
            proc.kill()
            proc.join()


class BlockingMethod(Method):
    """A blocking API: sequential calls block the loop (nothing else runs there); concurrent
    callers are threads."""

    def __init__(self, name: str, fn: Callable[..., Any]):
        self.name = name
        self.fn = fn

    async def call(self) -> None:
        _check(self.fn(FUNC, *ARGS))

    async def burst(self, callers: int, per_caller: int) -> None:
        import anyio

        limiter = anyio.CapacityLimiter(callers)

        def calls() -> None:
            for _ in range(per_caller):
                _check(self.fn(FUNC, *ARGS))

        async with anyio.create_task_group() as tg:
            for _ in range(callers):
                tg.start_soon(lambda: anyio.to_thread.run_sync(calls, limiter=limiter))


class FutureMethod(Method):
    """An API that returns a ``concurrent.futures.Future``: sequential calls wait on
    ``result()``; concurrent callers await ``asyncio.wrap_future``."""

    def submit(self) -> Any:
        raise NotImplementedError

    async def call(self) -> None:
        _check(self.submit().result(CALL_TIMEOUT))

    async def burst(self, callers: int, per_caller: int) -> None:
        import asyncio

        import anyio

        async def caller() -> None:
            for _ in range(per_caller):
                with anyio.fail_after(CALL_TIMEOUT):
                    _check(await asyncio.wrap_future(self.submit()))

        async with anyio.create_task_group() as tg:
            for _ in range(callers):
                tg.start_soon(caller)


class PebbleMethod(FutureMethod):
    name = "pebble concurrent.process"

    async def setup(self) -> None:
        from pebble import concurrent

        self.fn = concurrent.process(timeout=CALL_TIMEOUT, mp_context=multiprocessing.get_context("fork"))(FUNC)
        await super().setup()

    def submit(self) -> Any:
        return self.fn(*ARGS)


class LokyMethod(FutureMethod):
    name = "loky (reused executor)"

    async def setup(self) -> None:
        import loky

        self.executor = loky.get_reusable_executor()
        await super().setup()

    def submit(self) -> Any:
        return self.executor.submit(FUNC, *ARGS)

    async def teardown(self) -> None:
        self.executor.shutdown(wait=True, kill_workers=True)


class AnyioToProcessMethod(Method):
    name = "anyio.to_process"

    async def call(self) -> None:
        import anyio
        import anyio.to_process

        with anyio.fail_after(CALL_TIMEOUT):
            _check(await anyio.to_process.run_sync(FUNC, *ARGS))


class TrioParallelMethod(Method):
    """trio_parallel needs trio: each round is one ``trio.run`` in a plain thread (the
    default worker cache outlives ``trio.run``; the per-call times are taken inside)."""

    name = "trio_parallel"

    @staticmethod
    def _calls(n: int) -> list[float]:
        import trio
        import trio_parallel

        async def main() -> list[float]:
            out = []
            for _ in range(n):
                start = time.perf_counter()
                with trio.fail_after(CALL_TIMEOUT):
                    _check(await trio_parallel.run_sync(FUNC, *ARGS))
                out.append(time.perf_counter() - start)
            return out

        return trio.run(main)

    @staticmethod
    def _burst(callers: int, per_caller: int) -> None:
        import trio
        import trio_parallel

        async def caller() -> None:
            for _ in range(per_caller):
                with trio.fail_after(CALL_TIMEOUT):
                    _check(await trio_parallel.run_sync(FUNC, *ARGS))

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                for _ in range(callers):
                    nursery.start_soon(caller)

        trio.run(main)

    async def setup(self) -> None:
        await _in_plain_thread(self._calls, self.warmup)

    async def round(self, n: int) -> list[float]:
        return await _in_plain_thread(self._calls, n)

    async def burst(self, callers: int, per_caller: int) -> None:
        await _in_plain_thread(self._burst, callers, per_caller)


def _methods() -> list[Method]:
    return [
        AsyncprocMethod("forkserver"),
        AsyncprocMethod("fork"),
        AsyncprocMethod("spawn"),
        SafeCallSyncMethod(),
        BlockingMethod("torch: fork Pool(1) per call", _torch_safe_call),
        BlockingMethod("mp.Process per call (fork)", _process_call),
        PebbleMethod(),
        AnyioToProcessMethod(),
        TrioParallelMethod(),
        LokyMethod(),
    ]


# -- one caller size (runs in its own interpreter) ----------------------------------------


def _err(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _progress(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


async def _measure(
    mb: int, rounds: int, per_round: int, callers: int, per_caller: int, reps: int, only: list[str]
) -> dict[str, Any]:
    import anyio

    methods = [m for m in _methods() if not only or any(o in m.name for o in only)]
    res: dict[str, dict[str, Any]] = {
        m.name: {"samples_s": [], "error": None, "throughput": [], "throughput_error": None} for m in methods
    }
    for m in methods:
        try:
            await m.setup()
        except Exception as exc:  # noqa: BLE001 - reported as n/a
            res[m.name]["error"] = f"setup: {_err(exc)}"
    live = [m for m in methods if res[m.name]["error"] is None]

    for r in range(rounds):
        _progress(f"+{mb} MB: latency round {r + 1}/{rounds}")
        k = r % max(1, len(live))
        for m in live[k:] + live[:k]:
            if res[m.name]["error"] is not None:
                continue
            await anyio.sleep(SETTLE_S)
            try:
                res[m.name]["samples_s"] += await m.round(per_round)
            except Exception as exc:  # noqa: BLE001
                res[m.name]["error"] = f"round {r + 1}: {_err(exc)}"

    if reps > 0 and callers > 0:
        live = [m for m in live if res[m.name]["error"] is None]
        for m in live:  # untimed: let each pool grow to the size the burst uses
            try:
                await m.burst(callers, 1)
            except Exception as exc:  # noqa: BLE001
                res[m.name]["throughput_error"] = f"warm-up: {_err(exc)}"
        for rep in range(reps):
            _progress(f"+{mb} MB: throughput {rep + 1}/{reps}")
            k = rep % max(1, len(live))
            for m in live[k:] + live[:k]:
                if res[m.name]["throughput_error"] is not None:
                    continue
                await anyio.sleep(SETTLE_BURST_S)
                try:
                    start = time.perf_counter()
                    await m.burst(callers, per_caller)
                    res[m.name]["throughput"].append(callers * per_caller / (time.perf_counter() - start))
                except Exception as exc:  # noqa: BLE001
                    res[m.name]["throughput_error"] = f"run {rep + 1}: {_err(exc)}"

    for m in methods:
        try:
            await m.teardown()
        except Exception as exc:  # noqa: BLE001
            _progress(f"{m.name}: teardown failed: {_err(exc)}")
    return res


def _size_worker(mb: int, rounds: int, per_round: int, callers: int, per_caller: int, reps: int, only: list[str]) -> None:
    import anyio

    ballast = bytearray(mb * 1024 * 1024)
    for i in range(0, len(ballast), 4096):  # touch every page: resident, not just reserved
        ballast[i] = 1
    rss = _rss_mb()
    try:
        import asyncproc

        default = asyncproc.Isolated().start_method
    except Exception:  # noqa: BLE001
        default = "forkserver"
    res = anyio.run(_measure, mb, rounds, per_round, callers, per_caller, reps, only, backend="asyncio")
    out = {"mb": mb, "rss_mb": rss, "default_start_method": default, "methods": res}
    sys.stdout.write("\n" + json.dumps(out) + "\n")
    sys.stdout.flush()
    del ballast


# -- the parent: one interpreter per size, tables, targets --------------------------------


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except Exception:  # noqa: BLE001
        return "missing"


def _machine() -> dict[str, Any]:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=here, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except Exception:  # noqa: BLE001
        rev = ""
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "loadavg": os.getloadavg(),
        "git": rev,
        "versions": {d: _version(d) for d in ("asyncproc", "anyio", "trio", "trio-parallel", "pebble", "loky", "cloudpickle")},
    }


def _become_subreaper() -> bool:
    """Orphans of the size runs are reparented to us, so we can see and end leftovers."""
    try:
        _proctree.make_subreaper()
        return True
    except OSError:
        return False


def _leftovers(bound_s: float = 5.0) -> list[str]:
    """Processes still under us after a size run ended (there should be none)."""
    import psutil

    deadline = time.monotonic() + bound_s
    me = psutil.Process()
    while True:
        _proctree.Adopted().step(None)
        kids = [p for p in me.children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
        if not kids or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    found = []
    for p in kids:
        try:
            found.append(f"{p.pid} {' '.join(p.cmdline())[:100]}")
            p.send_signal(signal.SIGKILL)
        except Exception:  # noqa: BLE001
            pass
    _proctree.Adopted().step(None)
    return found


def _stats(samples: list[float]) -> tuple[float, float]:
    ms = [s * 1000 for s in samples]
    p90 = statistics.quantiles(ms, n=10)[-1] if len(ms) >= 2 else ms[0]
    return statistics.median(ms), p90


def _table(size: dict[str, Any], calls: int, rounds: int, per_round: int, callers: int, per_caller: int, reps: int) -> None:
    methods = size["methods"]
    ref_name = "asyncproc forkserver"
    ref = methods.get(ref_name, {})
    ref_med = _stats(ref["samples_s"])[0] if ref.get("samples_s") and not ref.get("error") else None
    print()
    print(
        f"caller +{size['mb']} MB extra resident (RSS {size['rss_mb']:.0f} MB): {FUNC.__module__}.{FUNC.__name__}{ARGS}, "
        f"{rounds} rounds x {per_round} sequential calls per method, interleaved"
    )
    tp_head = f"calls/s @{callers}"
    print(f"  {'method':30} {'median ms':>10} {'p90 ms':>9} {'/ forkserver':>13} {tp_head:>15}")
    print("  " + "-" * 81)
    for name, m in methods.items():
        if m["error"]:
            print(f"  {name:30} n/a ({m['error']})")
            continue
        med, p90 = _stats(m["samples_s"])
        ratio = f"{med / ref_med:12.1f}x" if ref_med else f"{'n/a':>13}"
        if m["throughput"]:
            tp = f"{statistics.median(m['throughput']):15.0f}"
        elif m.get("throughput_error"):
            tp = f"  n/a ({m['throughput_error']})"
        else:
            tp = f"{'-':>15}"
        print(f"  {name:30} {med:10.2f} {p90:9.2f} {ratio} {tp}")
    if reps and callers:
        print(
            f"  (throughput: {callers} concurrent callers x {per_caller} calls, median of {reps} runs; "
            f"pools at their default size)"
        )


def _targets(sizes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    checks = []
    for size in sizes:
        methods = size["methods"]
        default = f"asyncproc {size['default_start_method']}"

        def med(name: str, methods: dict[str, Any] = methods) -> float | None:
            m = methods.get(name)
            if not m or m["error"] or not m["samples_s"]:
                return None
            return _stats(m["samples_s"])[0]

        ours, anyio_m, torch = med(default), med("anyio.to_process"), med("torch: fork Pool(1) per call")
        mb = size["mb"]
        checks.append({
            "mb": mb, "what": f"{default} / anyio.to_process", "value": ours / anyio_m if ours and anyio_m else None,
            "op": "<=", "target": 2.0,
        })
        torch_target = 10.0 if mb == 0 else 50.0 if mb >= 1024 else None
        checks.append({
            "mb": mb, "what": f"torch Pool(1) per call / {default}", "value": torch / ours if ours and torch else None,
            "op": ">=", "target": torch_target,
        })
    return checks


def _print_targets(checks: list[dict[str, Any]]) -> None:
    print()
    print("targets (asyncproc's default start method, medians):")
    for c in checks:
        if c["value"] is None:
            verdict, value = "n/a", "n/a"
        else:
            value = f"{c['value']:.2f}x"
            if c["target"] is None:
                verdict = "(no target at this size)"
            else:
                ok = c["value"] <= c["target"] if c["op"] == "<=" else c["value"] >= c["target"]
                verdict = "PASS" if ok else "FAIL"
        target = f"target {c['op']} {c['target']:g}" if c["target"] is not None else ""
        c["verdict"] = verdict
        print(f"  +{c['mb']:<5} MB  {c['what']:45} {value:>9}  {target:12} {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=None, help="sequential calls per method and size (default 200; 60 with --quick)")
    parser.add_argument("--rss-mb", default="0,1024", help="comma-separated extra resident MB of the caller (default 0,1024)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent callers for throughput (0: skip)")
    parser.add_argument("--quick", action="store_true", help="fewer calls and one throughput run: about a minute")
    parser.add_argument("--methods", default="", help="comma-separated substrings: measure only the methods whose names contain one "
                        "(default: all; the targets need 'forkserver', 'anyio' and 'torch')")
    parser.add_argument("--json", metavar="PATH", help="write raw results (per-call seconds) here")
    parser.add_argument("--worker", type=int, metavar="MB", help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker is not None:
        only = [m.strip() for m in args.methods.split(",") if m.strip()]
        _size_worker(args.worker, *map(int, args.plan.split(",")), only)
        return

    calls = args.calls if args.calls is not None else (60 if args.quick else 200)
    if calls < 1:
        parser.error("--calls must be >= 1")
    rounds = min(ROUNDS // 2 if args.quick else ROUNDS, calls)
    per_round = math.ceil(calls / rounds)
    callers = max(0, args.concurrency)
    per_caller, reps = (2, 1) if args.quick else (8, 3)
    try:
        sizes_mb = [int(x) for x in args.rss_mb.split(",") if x.strip()]
    except ValueError:
        parser.error("--rss-mb takes comma-separated integers, e.g. 0,1024")

    machine = _machine()
    print(
        f"machine: {machine['nproc']} CPUs usable ({machine['cpu_count']} online), {machine['implementation']} "
        f"{machine['python']}, Linux {machine['kernel']} {machine['machine']}, "
        f"load {' '.join(f'{x:.2f}' for x in machine['loadavg'])}"
    )
    print("versions: " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()) + f"; repo {machine['git']}")
    subreaper = _become_subreaper()

    sizes: list[dict[str, Any]] = []
    leftovers: dict[int, list[str]] = {}
    start = time.monotonic()
    for mb in sizes_mb:
        plan = f"{rounds},{per_round},{callers},{per_caller},{reps}"
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(mb), "--plan", plan, "--methods", args.methods]
        print(f"\n... measuring the +{mb} MB caller", file=sys.stderr, flush=True)
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=SIZE_TIMEOUT_S)
            lines = proc.stdout.strip().splitlines()
            if proc.returncode != 0 or not lines:
                raise RuntimeError(f"size run exited with {proc.returncode}")
            size = json.loads(lines[-1])
        except Exception as exc:  # noqa: BLE001
            print(f"\ncaller +{mb} MB: n/a ({_err(exc)})")
            continue
        finally:
            if subreaper:
                leftovers[mb] = _leftovers()
        sizes.append(size)
        _table(size, calls, rounds, per_round, callers, per_caller, reps)
        if leftovers.get(mb):
            print(f"  WARNING: {len(leftovers[mb])} process(es) left behind (killed): " + "; ".join(leftovers[mb]))

    checks = _targets(sizes)
    _print_targets(checks)
    print(f"\n(total {time.monotonic() - start:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({
                "machine": machine, "function": f"{FUNC.__module__}.{FUNC.__name__}{ARGS}", "calls": calls,
                "rounds": rounds, "per_round": per_round, "concurrency": callers, "per_caller": per_caller,
                "throughput_reps": reps, "sizes": sizes, "targets": checks,
                "leftover_processes": leftovers if subreaper else "not checked (no subreaper)",
            }, f, indent=1)


if __name__ == "__main__":
    main()
