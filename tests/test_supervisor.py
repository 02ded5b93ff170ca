"""Supervisor (API.md section 5), with real processes on asyncio, uvloop and trio.

The clock is what children do (a line they write, their exit) and the supervisor's own
event stream; no test sleeps to synchronise. Backoffs and shutdown bounds are small so the
whole file stays quick.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

import asyncproc
from asyncproc import Backoff, Call, ChildStatus, Command, Event, Supervisor, SupervisorGaveUp, Task

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


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


def sleeper(id: str, **kwargs: Any) -> Command:
    return Command(id, ["sleep", "60"], shutdown=kwargs.pop("shutdown", 2.0), **kwargs)


def crasher(id: str, code: int = 3, **kwargs: Any) -> Command:
    return Command(id, ["sh", "-c", f"exit {code}"], **kwargs)


class Lines:
    """A FIFO children write lines to, by path, whichever process they run in: the
    test's clock. We hold a write end too, so a writer that exits is no end-of-file."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = str(path)
        self.read_fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self.write_fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        self.buffer = b""

    async def line(self) -> str:
        with anyio.fail_after(BOUND):
            while b"\n" not in self.buffer:
                await anyio.wait_readable(self.read_fd)
                self.buffer += os.read(self.read_fd, 65536)
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


@pytest.fixture
def lines(tmp_path: Path) -> Any:
    fifo = Lines(tmp_path / "lines")
    yield fifo
    fifo.close()


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


async def _kill_b_under(strategy: str) -> tuple[list[int | None], list[tuple[str, str]], list[ChildStatus]]:
    """Start a, b, c under ``strategy``, SIGKILL b: the pids before, the events until c runs
    again, and the status then (taken while the supervisor still runs)."""
    sup = Supervisor([sleeper("a"), sleeper("b"), sleeper("c")], strategy=strategy, backoff=FAST)
    stream = sup.events()
    async with sup:
        await events_until(stream, "started", "c")
        before = [s.pid for s in sup.status()]
        assert before[1] is not None
        os.kill(before[1], signal.SIGKILL)
        seen = [(e.kind, e.child) for e in await events_until(stream, "started", "c")]
        return before, seen, sup.status()


async def test_one_for_all_stops_the_others_in_reverse_then_starts_all_in_order() -> None:
    before, seen, after = await _kill_b_under("one_for_all")
    assert seen == [("exited", "b"), ("restarting", "b"), ("stopped", "c"), ("stopped", "a"),
                    ("started", "a"), ("started", "b"), ("started", "c")]
    assert all(s.state == "running" and s.restarts == 1 for s in after)
    assert not {s.pid for s in after} & set(before)
    assert not any(alive(pid) for pid in before if pid is not None)


async def test_rest_for_one_restarts_the_failed_child_and_those_started_after_it() -> None:
    before, seen, after = await _kill_b_under("rest_for_one")
    assert seen == [("exited", "b"), ("restarting", "b"), ("stopped", "c"), ("started", "b"), ("started", "c")]
    assert after[0].pid == before[0] and after[0].restarts == 0
    assert [s.restarts for s in after[1:]] == [1, 1]


async def test_a_temporary_child_stopped_by_a_strategy_is_not_restarted() -> None:
    sup = Supervisor([sleeper("temp", restart="temporary"), sleeper("b")], strategy="one_for_all", backoff=FAST)
    stream = sup.events()
    async with sup:
        await events_until(stream, "started", "b")
        os.kill(sup.status()[1].pid, signal.SIGKILL)
        seen = [(e.kind, e.child) for e in await events_until(stream, "started", "b")]
        assert seen == [("exited", "b"), ("restarting", "b"), ("stopped", "temp"), ("started", "b")]
        assert [(s.state, s.restarts) for s in sup.status()] == [("stopped", 0), ("running", 1)]


async def test_transient_and_temporary_children_end_and_wait_returns(tmp_path: Path) -> None:
    once = f"if [ -e {tmp_path}/ran ]; then exit 0; fi; touch {tmp_path}/ran; exit 1"
    sup = Supervisor([Command("transient", sh(once), restart="transient"), crasher("temporary", 5, restart="temporary")],
                     backoff=FAST)
    stream = sup.events()
    async with sup:
        with anyio.fail_after(BOUND):
            await sup.wait()
        assert [(s.state, s.restarts) for s in sup.status()] == [("ended", 1), ("ended", 0)]
    ends = {(e.child, e.exitcode) for e in [e async for e in stream] if e.kind == "exited"}
    assert ends == {("transient", 1), ("transient", 0), ("temporary", 5)}


async def test_a_permanent_child_is_restarted_after_a_normal_exit_too() -> None:
    sup = Supervisor([crasher("done", 0)], max_restarts=2, max_seconds=60, backoff=FAST)
    with pytest.raises(SupervisorGaveUp) as info:
        async with sup:
            await sup.wait()
    assert info.value.child == "done" and info.value.__cause__ is None
    assert sup.status()[0].restarts == 2


async def test_a_tasks_exception_is_the_cause_of_giving_up() -> None:
    class Boom(Exception):
        pass

    async def boom() -> None:
        raise Boom("boom")

    sup = Supervisor([Task("t", boom)], max_restarts=0)
    with pytest.raises(SupervisorGaveUp) as info:
        async with sup:
            await sup.wait()
    assert type(info.value.__cause__) is Boom and str(info.value.__cause__) == "boom"


async def test_a_call_that_dies_is_a_child_crashed() -> None:
    stream = (sup := Supervisor([Call("c", os._exit, 4)], max_restarts=0)).events()
    with pytest.raises(SupervisorGaveUp) as info:
        async with sup:
            await sup.wait()
    cause = info.value.__cause__
    assert isinstance(cause, asyncproc.ChildCrashed) and cause.exitcode == 4
    exited = [e for e in [e async for e in stream] if e.kind == "exited"]
    assert exited[0].error is cause and exited[0].pid == cause.pid


async def test_escalation_through_a_nested_supervisor_which_restarts_afresh(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    inner = Supervisor([Command("bad", sh(f"echo x >> {starts}; exit 3"))], id="inner",
                       max_restarts=1, max_seconds=60, backoff=FAST)
    outer = Supervisor([sleeper("svc"), inner], max_restarts=1, max_seconds=60, backoff=FAST)
    stream = outer.events()
    with pytest.raises(SupervisorGaveUp) as info:
        async with outer:
            svc = outer.status()[0].pid
            await outer.wait()
    err = info.value
    assert err.child == "inner" and isinstance(err.__cause__, SupervisorGaveUp)
    assert err.__cause__.child == "bad" and isinstance(err.__cause__.__cause__, asyncproc.ChildCrashed)
    seen = [(e.kind, e.child) for e in [e async for e in stream]]
    assert seen == [("started", "svc"), ("started", "inner"), ("exited", "inner"), ("restarting", "inner"),
                    ("started", "inner"), ("exited", "inner"), ("gave_up", "inner"), ("stopped", "svc")]
    # Each run of inner: "bad" started, restarted once, then inner gave up: 2 starts. A
    # restarted inner that kept its intensity window would give up after 1.
    assert starts.read_text().count("x") == 4
    assert not alive(svc)


async def test_backoff_delays_are_exact_without_jitter() -> None:
    backoff = Backoff(initial=0.02, factor=2.0, max=0.08, jitter=0, reset_after=60)
    sup = Supervisor([crasher("c")], max_restarts=10, max_seconds=60, backoff=backoff)
    stream = sup.events()
    async with sup:
        pairs = []
        for _ in range(5):
            restarting = await next_event(stream, "restarting")
            started = await next_event(stream, "started")
            pairs.append((restarting, started))
    assert [r.delay for r, _ in pairs] == [0.02, 0.04, 0.08, 0.08, 0.08]
    assert [r.restarts for r, _ in pairs] == [1, 2, 3, 4, 5]
    for restarting, started in pairs:
        assert restarting.delay * 0.9 <= started.time - restarting.time < restarting.delay + BOUND


async def test_backoff_jitter_stays_within_its_bounds() -> None:
    backoff = Backoff(initial=0.01, factor=1.0, jitter=0.5)
    sup = Supervisor([crasher("c")], max_restarts=10, max_seconds=60, backoff=backoff)
    stream = sup.events()
    async with sup:
        delays = [(await next_event(stream, "restarting")).delay for _ in range(5)]
    assert all(0.005 <= d <= 0.015 for d in delays if d is not None), delays


async def test_backoff_goes_back_to_its_first_delay_after_reset_after_seconds_of_uptime() -> None:
    runs = 0

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs == 3:
            await anyio.sleep(1.2)  # this run lasts past reset_after (the child's behaviour)
        raise RuntimeError(f"run {runs}")

    backoff = Backoff(initial=0.01, factor=3.0, max=10, jitter=0, reset_after=1.0)
    sup = Supervisor([Task("flaky", flaky)], max_restarts=10, max_seconds=60, backoff=backoff)
    stream = sup.events()
    async with sup:
        delays = [(await next_event(stream, "restarting")).delay for _ in range(4)]
    assert delays == [0.01, 0.03, 0.01, 0.03]


def test_backoff_formula() -> None:
    b = Backoff(initial=0.5, factor=3.0, max=5.0, jitter=0)
    assert [b.delay(k) for k in (1, 2, 3, 4, 100000)] == [0.5, 1.5, 4.5, 5.0, 5.0]
    assert Backoff(initial=0).delay(7) == 0


async def test_shutdown_is_in_reverse_order_and_bounded_for_a_child_ignoring_sigterm(lines: Lines) -> None:
    stubborn = Command("stubborn", sh("trap '' TERM; echo ready; exec sleep 60"), stdout=lines.path, shutdown=0.3)
    sup = Supervisor([stubborn, sleeper("polite")])
    stream = sup.events()
    async with sup:
        assert await lines.line() == "ready"  # SIGTERM is ignored from here on
        pids = [s.pid for s in sup.status()]
        t0 = time.monotonic()
    took = time.monotonic() - t0
    stopped = [e for e in [e async for e in stream] if e.kind == "stopped"]
    assert [(e.child, e.exitcode) for e in stopped] == [("polite", -signal.SIGTERM), ("stubborn", -signal.SIGKILL)]
    assert 0.3 <= took < 0.3 + BOUND
    assert not any(alive(pid) for pid in pids)


async def test_cancellation_stops_every_child_in_reverse_order_then_propagates(lines: Lines) -> None:
    def call_child(path: str) -> None:
        with open(path, "w") as f:
            print(os.getpid(), file=f, flush=True)
        time.sleep(60)

    sup = Supervisor([sleeper("cmd"), Task("task", anyio.sleep_forever), Call("call", call_child, lines.path, shutdown=0.5)])
    stream = sup.events()
    with anyio.CancelScope() as scope:
        async with sup:
            call_pid = int(await lines.line())
            cmd_pid = sup.status()[0].pid
            assert sup.status()[2].pid == call_pid  # the process running the call
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    stopped = [e.child for e in [e async for e in stream] if e.kind == "stopped"]
    assert stopped == ["call", "task", "cmd"]
    assert not alive(cmd_pid) and not alive(call_pid)


async def test_an_error_in_the_body_passes_through_unchanged() -> None:
    sup = Supervisor([sleeper("a")])
    with pytest.raises(KeyError, match="mine"):
        async with sup:
            pid = sup.status()[0].pid
            raise KeyError("mine")
    assert not alive(pid)


async def test_a_child_that_cannot_start_fails_the_start_and_nothing_is_left() -> None:
    sup = Supervisor([sleeper("a"), Command("missing", ["/nonexistent/program"])])
    stream = sup.events()
    with pytest.raises(FileNotFoundError):
        async with sup:
            raise AssertionError("not reached")
    seen = [(e.kind, e.child) for e in [e async for e in stream]]
    assert seen == [("started", "a"), ("stopped", "a")]


async def test_a_restart_that_cannot_start_is_a_failure(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    sup = Supervisor([Command("gone", sh('rmdir "$PWD"; exit 1'), cwd=home)], max_restarts=2, max_seconds=60, backoff=FAST)
    with pytest.raises(SupervisorGaveUp) as info:
        async with sup:
            await sup.wait()
    assert isinstance(info.value.__cause__, FileNotFoundError)


async def test_memory_limit_stops_the_command_and_is_a_failure() -> None:
    hog = [sys.executable, "-c", "import time; b = b'x' * (150 << 20); print('full', flush=True); time.sleep(60)"]
    sup = Supervisor([Command("hog", hog, memory_limit=60 << 20, shutdown=1.0)], max_restarts=0)
    stream = sup.events()
    with pytest.raises(SupervisorGaveUp) as info:
        async with sup:
            await sup.wait()
    cause = info.value.__cause__
    assert isinstance(cause, asyncproc.MemoryLimitExceeded) and isinstance(cause, MemoryError)
    seen = [e for e in [e async for e in stream]]
    assert [e.kind for e in seen] == ["started", "memory_exceeded", "exited", "gave_up"]
    assert seen[2].error is cause and seen[2].exitcode == -signal.SIGTERM
    assert seen[1].time - seen[0].time < BOUND


async def test_a_reader_that_never_reads_loses_the_oldest_events_and_is_told(caplog: pytest.LogCaptureFixture) -> None:
    sup = Supervisor([crasher("c")], max_restarts=6, max_seconds=60, backoff=FAST)
    slow = sup.events(buffer=4)
    full = sup.events()
    with pytest.raises(SupervisorGaveUp):
        async with sup:
            await sup.wait()
    everything = [e async for e in full]
    assert len(everything) == 1 + 7 + 6 + 6 + 1  # started, exited x7, restarting x6, started x6, gave_up
    with caplog.at_level("WARNING", logger="asyncproc"):
        kept = [e async for e in slow]
    assert kept == everything[-4:]
    assert slow.dropped == len(everything) - 4
    assert f"{len(everything) - 4} event(s) dropped" in caplog.text


async def test_every_event_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="asyncproc"):
        with pytest.raises(SupervisorGaveUp):
            async with Supervisor([crasher("c", 9)], id="top", max_restarts=1, backoff=FAST) as sup:
                await sup.wait()
    records = [(r.levelname, r.getMessage()) for r in caplog.records if "supervisor 'top'" in r.getMessage()]
    assert [level for level, _ in records] == ["INFO", "WARNING", "WARNING", "INFO", "WARNING", "ERROR"]
    assert records[0][1].startswith("supervisor 'top': child 'c' started (pid ")
    assert "exited with code 9" in records[1][1]
    assert "restarting in 0 s (restart 1)" in records[2][1]
    assert "giving up" in records[5][1]


async def test_a_stopped_child_can_stay_listed_and_be_started_again() -> None:
    sup = Supervisor([sleeper("a"), sleeper("b")], max_restarts=0)
    async with sup:
        await sup.stop_child("a", forget=False)
        assert [(s.id, s.state, s.pid) for s in sup.status()][0] == ("a", "stopped", None)
        # Manual restarts are not counted toward intensity (max_restarts=0 here).
        await sup.restart_child("a")
        await sup.restart_child("b")
        assert [(s.state, s.restarts) for s in sup.status()] == [("running", 1), ("running", 1)]


async def test_dynamic_calls_need_a_running_supervisor() -> None:
    sup = Supervisor([sleeper("a")])
    assert [(s.id, s.state, s.pid, s.restarts) for s in sup.status()] == [("a", "stopped", None, 0)]
    with pytest.raises(RuntimeError, match="not running"):
        await sup.start_child(sleeper("b"))
    with pytest.raises(TypeError, match="child spec"):
        await sup.start_child("sleep 60")  # type: ignore[arg-type]
    await sup.wait()  # nothing runs: returns at once


SUPERVISED_SCRIPT = """
import os, sys, time, anyio, asyncproc

def call_child():
    print("call", os.getpid(), flush=True)
    time.sleep(600)

async def main():
    sup = asyncproc.Supervisor([
        asyncproc.Command("cmd", ["sh", "-c", "echo cmd $$; sleep 600 & echo grandchild $!; wait"], stdout="/dev/fd/1"),
        asyncproc.Call("call", call_child),
        asyncproc.Supervisor([asyncproc.Command("inner", ["sh", "-c", "echo inner $$; exec sleep 600"], stdout="/dev/fd/1")],
                             id="nested"),
    ])
    async with sup:
        await sup.wait()

backend, _, uvloop = sys.argv[1].partition("+")
anyio.run(main, backend=backend, backend_options={"use_uvloop": True} if uvloop else {})
"""


@pytest.mark.parametrize("backend", ["asyncio", "asyncio+uvloop", "trio"])
def test_everything_dies_with_a_sigkilled_supervising_process(backend: str) -> None:
    import subprocess

    import psutil

    proc = subprocess.Popen([sys.executable, "-c", SUPERVISED_SCRIPT, backend], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        fd, out = proc.stdout.fileno(), b""
        deadline = time.monotonic() + BOUND
        while out.count(b"\n") < 4:  # a line per child: its name and pid
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(fd, 4096) if ready else b""
            assert chunk, f"the supervising process ended or went silent before naming its children: {out!r}"
            out += chunk
        pids = {name: int(pid) for name, pid in (line.split() for line in out.decode().splitlines())}
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert set(pids.values()) <= {p.pid for p in tree}
    finally:
        proc.kill()
        proc.wait()
    # Re-parented to us (the tests are a subreaper): wait_procs reaps them as they die.
    gone, left = psutil.wait_procs(tree, timeout=BOUND)
    assert not left, f"outlived the supervising process: {left}"


def _fails_first_time(path: str) -> int:
    marker = Path(path)
    if not marker.exists():
        marker.write_text("ran")
        raise ValueError("the first run fails")
    return 42


async def test_a_transient_call_is_restarted_after_its_exception_then_ends(tmp_path: Path) -> None:
    sup = Supervisor([Call("c", _fails_first_time, str(tmp_path / "ran"), restart="transient")], backoff=FAST)
    stream = sup.events()
    async with sup:
        with anyio.fail_after(BOUND):
            await sup.wait()
        assert [(s.state, s.restarts) for s in sup.status()] == [("ended", 1)]
    exited = [e for e in [e async for e in stream] if e.kind == "exited"]
    assert type(exited[0].error) is ValueError and exited[1].error is None


async def test_a_supervisor_runs_once_at_a_time() -> None:
    sup = Supervisor([sleeper("a")])
    async with sup:
        with pytest.raises(RuntimeError, match="already running"):
            async with sup:
                pass
        assert sup.status()[0].state == "running"


async def test_a_command_gets_its_env_and_cwd_and_appends_its_output_across_restarts(tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    once = 'echo "$GREETING from $PWD"; if [ -e ran ]; then exit 0; fi; touch ran; exit 1'
    cmd = Command("c", sh(once), env={"GREETING": "hello"}, cwd=tmp_path, stdout=out, restart="transient")
    sup = Supervisor([cmd], backoff=FAST)
    async with sup:
        with anyio.fail_after(BOUND):
            await sup.wait()
    assert out.read_text() == f"hello from {tmp_path}\n" * 2  # both runs, in one file


async def test_children_failing_together_under_one_for_all_make_one_restart() -> None:
    sup = Supervisor([sleeper("a"), sleeper("b")], strategy="one_for_all", max_restarts=1, max_seconds=60, backoff=FAST)
    stream = sup.events()
    async with sup:
        await events_until(stream, "started", "b")
        for status in sup.status():
            os.kill(status.pid, signal.SIGKILL)
        seen = await events_until(stream, "started", "b")
        assert [e.kind for e in seen].count("restarting") == 1  # one incident, one restart
        assert [(s.state, s.restarts) for s in sup.status()] == [("running", 1), ("running", 1)]
