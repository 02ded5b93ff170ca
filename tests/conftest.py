"""Shared fixtures: every async test on three backends, and no process left behind.

The test process makes itself a child subreaper, so a process that escaped its parent
(double fork, setsid) is re-parented to us instead of to init and the leak check below
still sees it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import psutil
import pytest

from asyncproc._isolated.link import link
from asyncproc._proc import proctree as _proctree

# Long-lived by design: the fork server and the workers a caller keeps in reserve. A worker that is
# running a call renames itself, so it is *not* in this set and counts as a leak.
LONG_LIVED = {"asyncproc-srv", "asyncproc-idle"}
SETTLE_S = 3.0  # background clean-up after a returned value is promised within 1 s

# What the library preloads into the fork server by itself, once a call needs it: process
# state it keeps on purpose, not a leak.
LEARNED_PRELOADS = {"cloudpickle", "tblib.pickling_support", "asyncproc.numa"}

_proctree.make_subreaper()


@pytest.fixture(autouse=True)
def no_preload_leaks() -> Iterator[None]:
    """A test that preloads modules gets a fresh fork-server link afterwards: the next test
    must not run on a server that imports what this one asked for."""
    before = set(link.preloads)
    yield
    if set(link.preloads) - before - LEARNED_PRELOADS:
        link.reset()


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {"use_uvloop": False}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
        pytest.param(("trio", {}), id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, object]]:
    return request.param


def _comm(proc: psutil.Process) -> str:
    try:
        with open(f"/proc/{proc.pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def leftovers(allowed: set[int] = frozenset()) -> list[psutil.Process]:  # type: ignore[assignment]
    """Descendants of this test process that should not be there: anything not long-lived,
    and every zombie."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        if proc.pid in allowed:
            continue
        try:
            zombie = proc.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            continue
        if zombie or _comm(proc) not in LONG_LIVED:
            found.append(proc)
    return found


def _reap_strays(procs: list[psutil.Process]) -> None:
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=2)
    for proc in procs:
        try:
            os.waitpid(proc.pid, os.WNOHANG)
        except ChildProcessError:
            pass


@pytest.fixture(autouse=True)
def no_process_left_behind() -> Iterator[None]:
    before = {p.pid for p in leftovers()}
    yield
    deadline = time.monotonic() + SETTLE_S
    while (found := leftovers(before)) and time.monotonic() < deadline:
        time.sleep(0.02)
    if found:
        described = [f"{p.pid} ({_comm(p)}, {p.status() if p.is_running() else 'gone'})" for p in found]
        _reap_strays(found)
        pytest.fail(f"test left processes behind: {', '.join(described)}")
