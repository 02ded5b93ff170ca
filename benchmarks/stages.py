"""Where one isolated call's time goes: a per-stage breakdown, and CPU and page faults per
call by process (caller, fork server, workers).

    .venv/bin/python benchmarks/stages.py [--calls 300] [--backend asyncio|trio]

A diagnostic, not a benchmark: it wraps asyncproc's internal functions by name (in the
caller, and in the fork server through a ``sitecustomize`` put on its PYTHONPATH), each
wrapper stamping ``perf_counter_ns`` (one clock for every process) and the process's minor
page faults. Each process keeps its stamps in memory and writes them out when it exits. A
stage missing from the table was renamed: update ``_WRAP``.

Two tables: for each stage, when it starts (median offset from the call's start, over the
calls where it happens) and what it costs (median duration, mean faults) - the stages of
the other processes of a call (the server's fork for the next one, the last worker's
exit) show where they overlap it; then CPU and faults per call by process, from /proc,
over a second, unwrapped run.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap

# module -> functions wrapped (Class.method allowed); missing ones are skipped
_WRAP = {
    "asyncproc._isolated.server": ["Server._on_request", "Server._prepare_job", "Server._fork_batch", "Server._register", "Server._on_signal",
                          "Server._finish_job", "Server._drain", "Server._report", "Server._on_ctl",
                          ],
    "asyncproc._isolated.worker": ["forked_from_server", "_decode_call", "_apply",
                          "_encode_value", "_flush_stdio", "_end_descendants", "run_one", "_finish"],
    "asyncproc._proc.proctree": ["set_parent_death_signal", "make_subreaper", "set_comm"],
    "asyncproc._isolated.api": ["Isolated._call_once"],
    "asyncproc._isolated.outcome": ["loads_value"],
    "asyncproc._isolated.handles": ["ServerWorker.release"],
    "asyncproc._isolated.link": ["ServerLink.take", "ServerLink.top_up"],
    "asyncproc._isolated.protocol": ["send", "recv"],
}

_SITE = r'''
import os, sys, time, resource, importlib, inspect, functools
_out = os.environ["ASYNCPROC_STAGES"]
_buf = []
_pc, _ru = time.perf_counter_ns, resource.getrusage

def stamp(name):
    _buf.append((name, _pc(), _ru(0).ru_minflt))

def _flush():
    if _buf:
        with open(os.path.join(_out, str(os.getpid())), "a") as f:
            f.write("".join(f"{n} {t} {m}\n" for n, t, m in _buf))
        _buf.clear()

_parents_stamps = []

def _forked():
    # A forked child's fault count starts at 0: what it took to get here (the fork's
    # return, the interpreter's after-fork work) shows as "boot". The parent's stamps are
    # kept, not freed: freeing them would touch (and copy) every page they sit on.
    global _buf
    _parents_stamps.append(_buf)
    _buf = []
    _buf.append(("boot<", _pc(), 0))
    stamp("boot>")
    _buf.append(("life<", _pc(), 0))

os.register_at_fork(after_in_child=_forked)
_real_exit = os._exit
def _exit(code):
    stamp("life>")  # every fault of a forked child before its exit
    _flush()
    _real_exit(code)
os._exit = _exit
import atexit
atexit.register(_flush)

def _wrapped(f, name):
    if inspect.iscoroutinefunction(f):
        async def w(*a, **k):
            stamp(name + "<")
            try:
                return await f(*a, **k)
            finally:
                stamp(name + ">")
    elif name.endswith(("send", "recv")):
        def w(sock, *a, **k):
            stamp(name + "<")
            r = f(sock, *a, **k)
            tag = (a[0] if a else b"") if name.endswith("send") else (r.tag if r is not None else b"-")
            stamp(name + ":" + tag.decode() + ">")
            return r
    else:
        def w(*a, **k):
            stamp(name + "<")
            try:
                return f(*a, **k)
            finally:
                stamp(name + ">")
    return functools.wraps(f)(w)

def install(wrap):
    for mod, names in wrap.items():
        m = importlib.import_module(mod)
        for qual in names:
            owner = m
            *path, attr = qual.split(".")
            for p in path:
                owner = getattr(owner, p)
            if hasattr(owner, attr):
                setattr(owner, attr, _wrapped(getattr(owner, attr), qual.split(".")[-1]))

class _Finder:
    # Wrap the server's modules once they are imported (the server is `python -c`).
    def find_spec(self, name, path, target=None):
        if name == "asyncproc._isolated.server" and "--stages-installed" not in sys.argv:
            sys.argv.append("--stages-installed")
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            loader = spec.loader
            exec_module = loader.exec_module
            def run(module):
                exec_module(module)
                sys.modules[name] = module
                install({k: v for k, v in WRAP.items() if k.rsplit(".", 1)[1] in ("server", "worker", "protocol", "proctree")})
            loader.exec_module = run
            return spec
        return None

import importlib.util
WRAP = eval(os.environ["ASYNCPROC_STAGES_WRAP"])
if os.environ.get("ASYNCPROC_STAGES_ROLE") != "caller":
    sys.meta_path.insert(0, _Finder())
'''

_CALLER = r'''
import os, sys, anyio
os.environ["ASYNCPROC_STAGES_ROLE"] = "caller"
import sitecustomize as st
import asyncproc
st.install(st.WRAP)
os.environ.pop("ASYNCPROC_STAGES_ROLE")

async def main(n):
    isolated = asyncproc.Isolated()
    for _ in range(20):
        await isolated.call(abs, -1)
    await anyio.sleep(0.2)
    for i in range(n):
        st.stamp("CALL")
        await isolated.call(abs, -i)
    st.stamp("END")
    await anyio.sleep(0.3)

anyio.run(main, int(sys.argv[1]), backend=sys.argv[2])
'''


def _load(folder: str) -> dict[int, list[tuple[int, str, int]]]:
    procs = {}
    for name in os.listdir(folder):
        with open(os.path.join(folder, name)) as f:
            procs[int(name)] = sorted((int(t), n, int(m)) for n, t, m in (line.split() for line in f))
    return procs


def _breakdown(procs: dict[int, list[tuple[int, str, int]]]) -> None:
    caller = next(p for p, ev in procs.items() if any(n == "CALL" for _, n, _ in ev))
    server = next((p for p, ev in procs.items() if any(n.startswith("_on_request") for _, n, _ in ev)), -1)
    role = {p: "caller" if p == caller else "server" if p == server else "worker" for p in procs}
    starts = [t for t, n, _ in procs[caller] if n in ("CALL", "END")]
    events = sorted((t, role[p], p, n, m) for p, ev in procs.items() for t, n, m in ev)
    times = [e[0] for e in events]
    offsets: dict[tuple[str, str], list[int]] = collections.defaultdict(list)
    costs: dict[tuple[str, str], list[tuple[int, int]]] = collections.defaultdict(list)
    for a, b in zip(starts, starts[1:]):
        seen: dict[tuple[str, str], int] = {}
        opened: dict[tuple[int, str], tuple[int, int]] = {}
        for t, r, p, n, m in events[bisect.bisect_left(times, a):bisect.bisect_left(times, b)]:
            stage = n.rstrip("<>").split(":")[0]
            if n.endswith("<"):
                opened[(p, stage)] = (t, m)
                seen.setdefault((r, stage), t - a)
            elif n.endswith(">") and (p, stage) in opened:
                t0, m0 = opened.pop((p, stage))
                costs[(r, n[:-1])].append((t - t0, m - m0))
        for key, off in seen.items():
            offsets[key].append(off)
    calls = len(starts) - 1
    print(f"{calls} calls, median {statistics.median(b - a for a, b in zip(starts, starts[1:])) / 1e3:.0f} us each\n")
    print(f"  {'starts at':>10} {'process':8} {'stage':28} {'in % of calls':>13} {'takes':>9} {'faults':>7}")
    rows = []
    for (r, name), cs in costs.items():
        stage = name.split(":")[0]
        off = statistics.median(offsets.get((r, stage), [0]))
        rows.append((off, r, name, len(cs), statistics.median(c for c, _ in cs), statistics.mean(f for _, f in cs)))
    for off, r, name, n, took, faults in sorted(rows):
        if n >= calls * 0.2:
            print(f"  {off / 1e3:8.0f} us {r:8} {name:28} {100 * n / calls:12.0f}% {took / 1e3:6.0f} us {faults:7.1f}")


_ACCOUNT = r'''
import os, sys, time, statistics, anyio, asyncproc
from asyncproc._isolated.link import link
HZ = os.sysconf("SC_CLK_TCK")
def stat(pid):  # utime stime cutime cstime minflt cminflt
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return [int(x) / HZ for x in f[11:15]] + [int(f[7]), int(f[8])]
async def main(n):
    isolated = asyncproc.Isolated()
    for _ in range(20):
        await isolated.call(abs, -1)
    s0, c0 = stat(link.pid), stat(os.getpid())
    for i in range(n):
        await isolated.call(abs, -i)
    await anyio.sleep(0.3)
    s1, c1 = stat(link.pid), stat(os.getpid())
    per = lambda a, b, i, j: ((b[i] - a[i]) + (b[j] - a[j])) / n * 1e6
    print(f"  {'caller':8} {per(c0, c1, 0, 1):6.0f} us CPU {(c1[4] - c0[4]) / n:6.0f} faults")
    print(f"  {'server':8} {per(s0, s1, 0, 1):6.0f} us CPU {(s1[4] - s0[4]) / n:6.0f} faults")
    print(f"  {'workers':8} {per(s0, s1, 2, 3):6.0f} us CPU {(s1[5] - s0[5]) / n:6.0f} faults  (reaped by the server)")
anyio.run(main, int(sys.argv[1]), backend=sys.argv[2])
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--backend", default="asyncio", choices=["asyncio", "trio"])
    args = parser.parse_args()
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; backend {args.backend}")
    work = tempfile.mkdtemp(prefix="asyncproc-stages-")
    try:
        site, out = os.path.join(work, "site"), os.path.join(work, "out")
        os.mkdir(site)
        os.mkdir(out)
        with open(os.path.join(site, "sitecustomize.py"), "w") as f:
            f.write(textwrap.dedent(_SITE))
        env = {**os.environ, "PYTHONPATH": site + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "ASYNCPROC_STAGES": out, "ASYNCPROC_STAGES_WRAP": repr(_WRAP)}
        subprocess.run([sys.executable, "-c", _CALLER, str(args.calls), args.backend], env=env, check=True, timeout=600)
        _breakdown(_load(out))
        print(f"\nCPU and minor page faults per call, by process ({args.calls * 3} unwrapped calls):")
        subprocess.run([sys.executable, "-c", _ACCOUNT, str(args.calls * 3), args.backend], check=True, timeout=600)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
