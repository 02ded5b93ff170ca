"""``asyncproc demo``: what isolated calls do, in a few seconds, on a real child each time."""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import time
import traceback

import anyio

from ._exceptions import ChildCrashed
from ._isolated.api import START_METHODS, Isolated


def _read_config(path: str) -> dict[str, str]:
    """Stands in for native code with a bug: dereferences a null pointer."""
    if path.endswith(".bin"):
        ctypes.string_at(0)
    return {"path": path}


def _parse_port(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise ValueError(f"port out of range: {port}")
    return port


def _load_settings(text: str) -> int:
    return _parse_port(text)


def _banner(title: str) -> None:
    print(f"\n=== {title} ===")


async def _demo(start_method: str) -> None:
    run = Isolated(timeout=5, start_method=start_method)
    print(f"asyncproc demo: every call below runs in a fresh child process ({start_method!r}); this is pid {os.getpid()}")

    _banner("1. a value comes back, from a lambda")
    durations = []
    for _ in range(20):
        started = time.perf_counter()
        pid = await run.call(lambda: os.getpid())
        durations.append(time.perf_counter() - started)
    print(f"child pid {pid}; median of 20 calls: {statistics.median(durations) * 1e3:.2f} ms each")

    _banner("2. a segfault in the child: survived, and explained")
    try:
        await run.call(_read_config, "settings.bin")
    except ChildCrashed as crash:
        print(f"caught {type(crash).__name__} (exitcode {crash.exitcode}, signal {crash.signal!r}):")
        print(_indent(str(crash)))
    print("...and the caller is still running.")

    _banner("3. a call that hangs: stopped at its timeout")
    started = time.perf_counter()
    try:
        await Isolated(timeout=0.5, start_method=start_method).call(time.sleep, 60)
    except TimeoutError as exc:
        print(f"TimeoutError after {time.perf_counter() - started:.2f} s: {exc}")

    _banner("4. an exception: its own type, with the child's traceback")
    try:
        await run.call(_load_settings, "70000")
    except ValueError as exc:
        print(_indent("".join(traceback.format_exception(type(exc), exc, exc.__traceback__))))


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines())


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--start-method", choices=START_METHODS, default="forkserver", help="how each child is started")
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio", help="event loop to run on")


def cli(args: argparse.Namespace) -> int:
    anyio.run(_demo, args.start_method, backend=args.backend)
    return 0
