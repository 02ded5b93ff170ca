"""A reliability trial: many isolated calls of every outcome, cancelling callers, SIGKILLs of
the fork server and handlers spawning and stopping, all at once; then a count of what went
wrong.

    .venv/bin/python benchmarks/soak.py                  # 2,000 calls per backend
    .venv/bin/python benchmarks/soak.py --calls 7000     # the README's long run (21,000 calls)
    .venv/bin/python benchmarks/soak.py --short          # a few seconds per backend (CI)

Per backend, in a fresh interpreter (a child subreaper, so whatever escapes comes back to
it): ``--concurrency`` callers make calls in a cycle of kinds -- a value (checked), an
exception (type and args checked), a crash (``os._exit``), a timeout, a call whose caller
cancels it, and a value from a call that leaves a ``setsid`` grandchild behind. Meanwhile a
task SIGKILLs the fork server every ``--server-kill-every`` calls, a few tasks spawn and kill
handlers whose children start ``setsid`` grandchildren, and a heartbeat task measures how
late the event loop wakes it.

Columns: calls; outcomes (value, exception, crash, timeout, cancelled, and "lost": a call in
flight when its server was SIGKILLed, reported as ``ChildCrashed``); wrong (a wrong value or
exception, or an outcome no call of that kind may have); left (processes still running after
the backend's run, inside it and after its interpreter exited); fds and RSS slope per 1,000
calls (least squares over samples after a warm-up); the worst event-loop lag. Exit status 1
when any wrong value or leftover was found.
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
import time
import traceback
from typing import Any

BACKENDS = ("asyncio", "uvloop", "trio")
KINDS = ("value", "exception", "crash", "timeout", "cancel", "grandchild")
LONG_LIVED = {"asyncproc-srv", "asyncproc-idle"}
CALL_TIMEOUT = 0.3
HANDLER_CHILD = "setsid sleep 60 & echo ready; exec sleep 60"


# -- what the calls run (module level: picklable by reference or by value) --------------


def square(x: int) -> int:
    return x * x


def fail(x: int) -> None:
    raise ValueError(x)


def crash(code: int) -> None:
    os._exit(code)


def sleep_long(seconds: float) -> None:
    time.sleep(seconds)


def leave_grandchild(x: int) -> int:
    subprocess.Popen(["sleep", "60"], start_new_session=True, stdout=subprocess.DEVNULL)
    return x + 1


# -- one backend, in its own interpreter -------------------------------------------------


class Tally:
    def __init__(self) -> None:
        self.calls = 0
        self.outcomes = dict.fromkeys(("value", "exception", "crash", "timeout", "cancelled", "lost"), 0)
        self.wrong: list[str] = []
        self.samples: list[tuple[int, int, int]] = []  # (calls, fds, rss kB)
        self.lag = 0.0
        self.handlers = 0


async def one_call(kind: str, x: int, tally: Tally) -> None:
    import anyio

    import asyncproc

    runner = asyncproc.Isolated(timeout=CALL_TIMEOUT if kind == "timeout" else 10.0, grace=0.2)
    outcome = "?"
    try:
        if kind == "value":
            got = await runner.call(square, x)
            outcome = "value" if got == x * x else f"wrong value {got!r} for {x}"
        elif kind == "grandchild":
            got = await runner.call(leave_grandchild, x)
            outcome = "value" if got == x + 1 else f"wrong value {got!r} for {x}"
        elif kind == "exception":
            await runner.call(fail, x)
        elif kind == "crash":
            await runner.call(crash, 3)
        elif kind == "timeout":
            await runner.call(sleep_long, 30)
        else:
            outcome = "cancelled"
            with anyio.move_on_after(0.05):
                await runner.call(sleep_long, 30)
                outcome = "a cancelled call returned"
    except ValueError as exc:
        outcome = "exception" if exc.args == (x,) and kind == "exception" else f"wrong exception {exc!r}"
    except asyncproc.ChildCrashed as exc:
        if kind == "crash" and exc.exitcode == 3:
            outcome = "crash"
        elif "outcome is unknown" in str(exc):
            outcome = "lost"  # its server was SIGKILLed while it ran
        else:
            outcome = f"wrong crash {exc!r} for a {kind} call"
    except TimeoutError:
        outcome = "timeout" if kind == "timeout" else f"timeout for a {kind} call"
    except Exception as exc:  # noqa: BLE001 - counted, not hidden
        inner = f" {exc.exceptions!r}" if hasattr(exc, "exceptions") else ""  # an exception group
        where = "".join(traceback.format_exception(exc)[-6:]) if os.environ.get("SOAK_TRACEBACKS") else ""
        outcome = f"{type(exc).__name__}: {exc}{inner} for a {kind} call{where}"
    tally.calls += 1
    expected = {"value": "value", "grandchild": "value", "exception": "exception", "crash": "crash",
                "timeout": "timeout", "cancel": "cancelled"}[kind]
    if outcome in (expected, "lost"):
        tally.outcomes[outcome] += 1
    else:
        tally.wrong.append(outcome)


async def caller(start: int, step: int, total: int, tally: Tally) -> None:
    for i in range(start, total, step):
        await one_call(KINDS[i % len(KINDS)], i, tally)


async def server_killer(every: int, tally: Tally, done: Any) -> None:
    import anyio

    from asyncproc._isolated.link import link

    next_kill = every
    while not done.is_set():
        await anyio.sleep(0.05)
        if tally.calls >= next_kill:
            next_kill += every
            pid = link.pid
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


async def handler_churn(tally: Tally, done: Any) -> None:
    import anyio

    from asyncproc import get_subprocess_handler

    while not done.is_set():
        r, w = os.pipe()
        handler = get_subprocess_handler("/bin/sh", ["-c", HANDLER_CHILD], {}, w, None, 0)
        async with handler:
            os.close(w)
            await anyio.wait_readable(r)
            os.close(r)
        tally.handlers += 1


async def heartbeat(tally: Tally, done: Any) -> None:
    import anyio

    while not done.is_set():
        before = time.perf_counter()
        await anyio.sleep(0.005)
        tally.lag = max(tally.lag, time.perf_counter() - before - 0.005)


async def sampler(tally: Tally, every: int, done: Any) -> None:
    import anyio

    next_sample = every
    while not done.is_set():
        await anyio.sleep(0.05)
        if tally.calls >= next_sample:
            next_sample += every
            tally.samples.append((tally.calls, len(os.listdir("/proc/self/fd")), _rss_kb()))


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


async def trial(args: argparse.Namespace) -> dict[str, Any]:
    import anyio

    tally = Tally()
    done = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(heartbeat, tally, done)
        tg.start_soon(server_killer, args.server_kill_every, tally, done)
        tg.start_soon(sampler, tally, max(args.calls // 20, 10), done)
        for _ in range(args.handlers):
            tg.start_soon(handler_churn, tally, done)
        async with anyio.create_task_group() as callers:
            for i in range(args.concurrency):
                callers.start_soon(caller, i, args.concurrency, args.calls, tally)
        done.set()
    return {
        "calls": tally.calls, "outcomes": tally.outcomes, "wrong": tally.wrong[:10], "n_wrong": len(tally.wrong),
        "samples": tally.samples, "lag_ms": tally.lag * 1000, "handlers": tally.handlers,
        "left_inside": _leftovers(),
    }


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _origin(pid: int) -> str:
    """Where a leftover came from, as far as /proc tells (its cgroup: handler or call)."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            return next((line[3:].strip() for line in f if line.startswith("0::")), "")
    except OSError:
        return ""


def _leftovers(settle: float = 3.0) -> list[str]:
    """Our descendants that are not long-lived by design, after up to ``settle`` seconds
    (a returned value's clean-up is promised within one)."""
    import psutil

    from asyncproc._proc import proctree as _proctree

    deadline = time.monotonic() + settle
    while True:
        _proctree.Adopted().step(None)  # we are a subreaper: orphans come to us
        found = [f"{p.pid} {_comm(p.pid)} {_origin(p.pid)}" for p in psutil.Process().children(recursive=True)
                 if _comm(p.pid) not in LONG_LIVED and p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def _child(args: argparse.Namespace) -> None:
    import anyio

    from asyncproc._proc import proctree as _proctree

    _proctree.make_subreaper()
    name, options = ("trio", {}) if args.child == "trio" else ("asyncio", {"use_uvloop": args.child == "uvloop"})
    result = anyio.run(trial, args, backend=name, backend_options=options)
    with open(args.result, "w") as f:
        json.dump(result, f)


# -- the driver ----------------------------------------------------------------------------


def slope_per_1000(points: list[tuple[int, int]]) -> float:
    """Least-squares slope of value against calls, per 1,000 calls (second half of the run:
    the first is warm-up, where caches and pools fill)."""
    points = points[len(points) // 2 :]
    if len(points) < 2:
        return 0.0
    xs = [float(x) for x, _ in points]
    ys = [float(y) for _, y in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 0.0 if var == 0 else 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var


def run_backend(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    import psutil

    from asyncproc._proc import proctree as _proctree

    _proctree.make_subreaper()
    with tempfile.TemporaryDirectory(prefix="asyncproc-soak-") as folder:
        cmd = [sys.executable, __file__, "--child", backend, "--calls", str(args.calls),
               "--concurrency", str(args.concurrency), "--handlers", str(args.handlers),
               "--server-kill-every", str(args.server_kill_every), "--result", f"{folder}/result.json"]
        started = time.monotonic()
        # Files, not pipes: a leftover holding a pipe would make us wait for it to exit.
        with open(f"{folder}/stderr", "w+") as err:
            code = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                  timeout=3600).returncode
            err.seek(0)
            errors = err.read().strip().splitlines()[-3:]
        result: dict[str, Any] = json.load(open(f"{folder}/result.json")) if code == 0 else {"error": errors}
        result["seconds"] = time.monotonic() - started
    # After its interpreter exited: what it started must be gone with it (its guardian).
    deadline = time.monotonic() + 3.0
    while True:
        _proctree.Adopted().step(None)
        after = [p.pid for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
        if not after or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    strays = []
    for pid in after:  # never leave them running (nor unreaped), but count them
        try:
            strays.append(psutil.Process(pid))
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, psutil.Error):
            pass
    psutil.wait_procs(strays, timeout=2)
    _proctree.Adopted().step(None)
    result["left_after"] = after
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, help="isolated calls per backend (default 2000; short: 60)")
    parser.add_argument("--concurrency", type=int, help="concurrent callers (default 16; short: 8)")
    parser.add_argument("--handlers", type=int, help="tasks spawning and killing handlers (default 4; short: 2)")
    parser.add_argument("--server-kill-every", type=int,
                        help="SIGKILL the fork server every N calls (default 1000; short: 25)")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--short", action="store_true", help="a few seconds per backend (CI)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    defaults = {"calls": 60, "concurrency": 8, "handlers": 2, "server_kill_every": 25} if args.short else \
        {"calls": 2000, "concurrency": 16, "handlers": 4, "server_kill_every": 1000}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.child:
        _child(args)
        return 0
    results = {backend: run_backend(backend, args) for backend in args.backends.split(",")}
    print_table(results, args)
    if args.json:
        print(json.dumps(results))
    bad = any(r.get("error") or r.get("n_wrong") or r.get("left_inside") or r.get("left_after") for r in results.values())
    return 1 if bad else 0


def print_table(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"soak: {args.calls} calls per backend, {args.concurrency} concurrent callers, fork server SIGKILLed "
          f"every {args.server_kill_every} calls, {args.handlers} handler tasks")
    head = (f"{'backend':8} {'calls':>6} {'value':>6} {'exc':>5} {'crash':>5} {'tmout':>5} {'cancel':>6} {'lost':>4} "
            f"{'wrong':>5} {'left':>4} {'fd/1k':>6} {'RSS kB/1k':>9} {'lag max':>8} {'handlers':>8} {'time':>6}")
    print(head)
    for backend, r in results.items():
        if "outcomes" not in r:
            print(f"{backend:8} failed: {r.get('error')}")
            continue
        o = r["outcomes"]
        samples = r["samples"]
        fd = slope_per_1000([(c, f) for c, f, _ in samples])
        rss = slope_per_1000([(c, m) for c, _, m in samples])
        left = len(r["left_inside"]) + len(r["left_after"])
        print(f"{backend:8} {r['calls']:6d} {o['value']:6d} {o['exception']:5d} {o['crash']:5d} {o['timeout']:5d} "
              f"{o['cancelled']:6d} {o['lost']:4d} {r['n_wrong']:5d} {left:4d} {fd:6.2f} {rss:9.1f} "
              f"{r['lag_ms']:6.1f}ms {r['handlers']:8d} {r['seconds']:5.0f}s")
        for line in r["wrong"]:
            print(f"    wrong: {line}")
        for line in r["left_inside"] + [str(p) for p in r["left_after"]]:
            print(f"    left: {line}")


if __name__ == "__main__":
    sys.exit(main())
