"""Supervisor (API.md section 5), with real processes on asyncio, uvloop and trio.

The clock is what children do (a line they write, their exit) and the supervisor's own
event stream; no test sleeps to synchronise. Backoffs and shutdown bounds are small so the
whole file stays quick.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

import asyncproc
from asyncproc import Backoff, Call, Command, Event, Supervisor, SupervisorGaveUp, Task

pytestmark = pytest.mark.anyio

FAST = Backoff(initial=0, jitter=0)
BOUND = 20.0  # "at once, not at a timeout": generous on a loaded 2-core machine


async def next_event(stream: Any, kind: str, child: str | None = None) -> Event:
    """The next event of ``kind`` (for ``child``) on ``stream``, skipping others."""
    with anyio.fail_after(BOUND):
        async for event in stream:
            if event.kind == kind and (child is None or event.child == child):
                return event
    raise AssertionError(f"the event stream ended before a {kind!r} event")


async def events_until(stream: Any, kind: str, child: str | None = None) -> list[Event]:
    """Every event up to and including the first ``kind`` (for ``child``)."""
    seen = []
    with anyio.fail_after(BOUND):
        async for event in stream:
            seen.append(event)
            if event.kind == kind and (child is None or event.child == child):
                return seen
    raise AssertionError(f"the event stream ended before a {kind!r} event: {seen}")


def sh(script: str, **kwargs: Any) -> list[str]:
    return ["sh", "-c", script]


def sleeper(id: str, **kwargs: Any) -> Command:
    return Command(id, ["sleep", "60"], shutdown=kwargs.pop("shutdown", 2.0), **kwargs)


def crasher(id: str, code: int = 3, **kwargs: Any) -> Command:
    return Command(id, ["sh", "-c", f"exit {code}"], **kwargs)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- restarts, strategies, restart types ------------------------------------------------------


async def test_one_for_one_restarts_only_the_failed_child() -> None:
    sup = Supervisor([sleeper("a"), Command("b", sh("exec sleep 60")), sleeper("c")], backoff=FAST)
    stream = sup.events()
    async with sup:
        before = {s.id: s.pid for s in sup.status()}
        os.kill(before["b"], signal.SIGKILL)
        exited = await next_event(stream, "exited", "b")
        assert exited.exitcode == -signal.SIGKILL and exited.pid == before["b"]
        assert isinstance(exited.error, asyncproc.ChildCrashed) and exited.error.signal == signal.SIGKILL
        restarting = await next_event(stream, "restarting", "b")
        assert restarting.delay == 0 and restarting.restarts == 1
        started = await next_event(stream, "started", "b")
        after = {s.id: s for s in sup.status()}
        assert started.pid == after["b"].pid != before["b"]
        assert after["b"].restarts == 1 and after["b"].state == "running"
        assert (after["a"].pid, after["c"].pid) == (before["a"], before["c"])
        assert after["a"].restarts == after["c"].restarts == 0


async def test_gives_up_past_intensity_and_stops_the_others(tmp_path: Path) -> None:
    sup = Supervisor([sleeper("steady"), crasher("bad", 7)], max_restarts=2, max_seconds=60, backoff=FAST)
    stream = sup.events()
    with pytest.raises(SupervisorGaveUp) as info:
        async with sup:
            steady = sup.status()[0].pid
            await sup.wait()
    err = info.value
    assert err.child == "bad"
    assert isinstance(err.__cause__, asyncproc.ChildCrashed) and err.__cause__.exitcode == 7
    assert isinstance(err, asyncproc.AsyncprocError)
    kinds = [(e.kind, e.child) for e in [e async for e in stream]]
    # 3 ends: two restarted, the third refused (no "restarting" for it), then the give-up.
    assert kinds.count(("exited", "bad")) == 3
    assert kinds.count(("restarting", "bad")) == 2
    assert kinds[-2:] == [("gave_up", "bad"), ("stopped", "steady")]
    assert not alive(steady)
    assert [s.state for s in sup.status()] == ["stopped", "ended"]


async def test_status_and_events_of_every_kind_of_child() -> None:
    async def forever() -> None:
        await anyio.sleep_forever()

    sup = Supervisor([sleeper("cmd"), Task("task", forever), Call("call", time.sleep, 60, shutdown=0.5)])
    stream = sup.events()
    async with sup:
        started = [await next_event(stream, "started") for _ in range(3)]
        assert [e.child for e in started] == ["cmd", "task", "call"]
        status = sup.status()
        assert [(s.id, s.state, s.restarts) for s in status] == [("cmd", "running", 0), ("task", "running", 0), ("call", "running", 0)]
        assert status[0].pid == started[0].pid and alive(status[0].pid)
        assert status[1].pid is None
    stopped = [e async for e in stream if e.kind == "stopped"]
    assert [e.child for e in stopped] == ["call", "task", "cmd"]  # reverse start order
    assert [s.state for s in sup.status()] == ["stopped"] * 3


async def test_dynamic_children(tmp_path: Path) -> None:
    sup = Supervisor([sleeper("a")], backoff=FAST)
    async with sup:
        await sup.start_child(sleeper("b"))
        assert [s.id for s in sup.status()] == ["a", "b"]
        with pytest.raises(ValueError, match="'b'"):
            await sup.start_child(sleeper("b"))
        old = sup.status()[1].pid
        await sup.restart_child("b")
        b = sup.status()[1]
        assert b.pid != old and b.restarts == 1 and not alive(old)
        await sup.stop_child("b")
        assert [s.id for s in sup.status()] == ["a"]
        assert not alive(b.pid)
        for call in (sup.stop_child, sup.restart_child):
            with pytest.raises(KeyError):
                await call("nope")


def test_bad_specs_raise_at_construction() -> None:
    async def coro() -> None: ...

    def plain() -> None: ...

    with pytest.raises(ValueError, match="restart"):
        Command("x", ["true"], restart="sometimes")
    with pytest.raises(ValueError, match="strategy"):
        Supervisor([], strategy="all_for_one")
    with pytest.raises(ValueError, match="argv"):
        Command("x", [])
    with pytest.raises(ValueError, match="shutdown"):
        Command("x", ["true"], shutdown=-1)
    with pytest.raises(ValueError, match="max_restarts"):
        Supervisor([], max_restarts=-1)
    with pytest.raises(ValueError, match="duplicate"):
        Supervisor([sleeper("x"), sleeper("x")])
    with pytest.raises(TypeError, match="async"):
        Task("t", plain)
    with pytest.raises(TypeError, match="async"):
        Call("c", coro)
    with pytest.raises(ValueError, match="initial"):
        Backoff(initial=-0.1)
    Task("t", coro)
    Call("c", plain)
