"""Isolated calls: every row of API.md's outcome table, for each start method, on
asyncio, uvloop and trio (the ``anyio_backend`` fixture)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback
import types
from pathlib import Path

import anyio
import psutil
import pytest

import asyncproc
from asyncproc import ChildCrashed, Isolated, MemoryLimitExceeded, RemoteError
from asyncproc._isolated import server as _server
from asyncproc._isolated import worker as _worker

from _children import (
    LONG,
    CustomError,
    _server_tree,
    add,
    allocate,
    assert_gone,
    big_return,
    big_value,
    cpus_and_policy,
    crash_abort,
    crash_killed,
    crash_leaving_background_job,
    crash_os_exit,
    crash_segfault,
    crash_sys_exit,
    deep_in_child,
    pythonpath,
    raise_custom,
    raise_unpicklable,
    return_lock,
    runner,
    running,
    sleep_ignoring_sigterm,
    start_then,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["forkserver", "fork", "spawn"])
def method(request: pytest.FixtureRequest) -> str:
    return request.param


async def test_returns_value_of_lambda_closure_and_kwargs(method: str) -> None:
    run = runner(method)
    offset = 10
    assert await run.call(lambda: 1 + 1) == 2
    assert await run.call(lambda x: x + offset, 5) == 15
    assert await run.call(add, 1, b=2, timeout=3) == 6  # a func kwarg named like an option


async def test_what_the_child_cannot_import_by_name_goes_by_value(method: str) -> None:
    # A module made at run time, registered with cloudpickle to go by value: pickle alone
    # would send its function and its class by name, which the child could never import.
    import cloudpickle

    made = types.ModuleType("asyncproc_made_at_run_time")
    exec("class Point:\n    def __init__(self, x):\n        self.x = x\n\ndef norm(p):\n    return abs(p.x)\n", made.__dict__)
    sys.modules[made.__name__] = made
    cloudpickle.register_pickle_by_value(made)
    try:
        assert await runner(method).call(made.norm, made.Point(-3)) == 3
        assert await runner(method).call(vars, made.Point(-3)) == {"x": -3}
    finally:
        cloudpickle.unregister_pickle_by_value(made)
        del sys.modules[made.__name__]


async def test_runs_in_another_process(method: str) -> None:
    assert await runner(method).call(os.getpid) != os.getpid()


async def test_large_value(method: str) -> None:
    n = 100 * 1024 * 1024
    value = await runner(method).call(big_value, n)
    assert len(value) == n and value[:3] == b"xxx" and value[-3:] == b"xxx"


async def test_safe_call_uses_defaults() -> None:
    assert await asyncproc.safe_call(add, 2, 3) == 5


async def test_exception_keeps_type_args_and_child_traceback(method: str) -> None:
    with pytest.raises(CustomError) as info:
        await runner(method).call(deep_in_child)
    assert info.value.args == (7, "went wrong") and info.value.code == 7
    frames = [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
    assert "deep_in_child" in frames and "raise_custom" in frames


async def test_exception_class_defined_in_a_function(method: str) -> None:
    class LocalError(Exception):
        pass

    def fail() -> None:
        raise LocalError("local")

    with pytest.raises(LocalError, match="local"):
        await runner(method).call(fail)


async def test_unpicklable_exception_becomes_remote_error(method: str) -> None:
    with pytest.raises(RemoteError) as info:
        await runner(method).call(raise_unpicklable)
    err = info.value
    assert err.type_name.endswith("Unpicklable")
    assert "holds a lock" in str(err) and "raise_unpicklable" in err.traceback_text
    assert isinstance(err, asyncproc.AsyncprocError)


async def test_unpicklable_value_becomes_remote_error(method: str) -> None:
    with pytest.raises(RemoteError, match="lock") as info:
        await runner(method).call(return_lock)
    assert "lock" in info.value.type_name


DEATHS = [
    (crash_segfault, -signal.SIGSEGV, "SIGSEGV"),
    (crash_abort, -signal.SIGABRT, "SIGABRT"),
    (crash_os_exit, 3, "code 3"),
    (crash_sys_exit, 4, "code 4"),
    (crash_killed, -signal.SIGKILL, "SIGKILL"),
]


@pytest.mark.parametrize("func, exitcode, named", DEATHS, ids=[d[2] for d in DEATHS])
async def test_death_is_reported_at_once(method: str, func: object, exitcode: int, named: str) -> None:
    started = time.monotonic()
    with pytest.raises(ChildCrashed) as info:
        await runner(method).call(func)  # type: ignore[arg-type]
    assert time.monotonic() - started < LONG / 3  # at the death, not at the timeout
    err = info.value
    assert err.exitcode == exitcode and named in str(err)
    assert err.pid is not None and err.pid != os.getpid()
    assert err.signal == (signal.Signals(-exitcode) if exitcode < 0 else None)
    assert isinstance(err, asyncproc.AsyncprocError)


async def test_segfault_message_shows_the_child_python_stack(method: str) -> None:
    with pytest.raises(ChildCrashed) as info:
        await runner(method).call(crash_segfault)
    message = str(info.value)
    assert "Segmentation fault" in message and "crash_segfault" in message
    assert "crash_segfault" in info.value.fault_log
    # asyncproc's own frames under the user's function are trimmed: the user debugs theirs.
    for module in (_server, _worker):
        assert os.path.abspath(module.__file__ or "") not in info.value.fault_log
    assert 'File "<string>"' not in info.value.fault_log


async def test_memory_limit(method: str) -> None:
    limit = 200 * 1024 * 1024
    run = runner(method, memory_limit=limit)
    assert await run.call(allocate, 10 * 1024 * 1024) == 10 * 1024 * 1024
    with pytest.raises(MemoryLimitExceeded) as info:
        await run.call(allocate, 2 * limit)
    assert isinstance(info.value, MemoryError) and isinstance(info.value, ChildCrashed)
    assert str(limit) in str(info.value) and "allocate" in str(info.value)


async def test_timeout_stops_child_and_grandchildren(method: str, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await runner(method, timeout=3).call(start_then, "hang", str(pidfile), escape=True)
    assert time.monotonic() - started < 15
    assert_gone(int(pidfile.read_text()))


async def test_timeout_escalates_to_sigkill_after_grace(method: str) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await runner(method, timeout=0.5, grace=0.3).call(sleep_ignoring_sigterm, 60)
    assert time.monotonic() - started < 10


async def test_cancel_scope_cancels_and_stops_child(method: str, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"

    async def cancel_once_started(scope: anyio.CancelScope) -> None:
        while not pidfile.exists() or not pidfile.read_text():
            await anyio.sleep(0.02)
        scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(cancel_once_started, tg.cancel_scope)
        await runner(method).call(start_then, "hang", str(pidfile))
        pytest.fail("the call was not cancelled")
    assert_gone(int(pidfile.read_text()))


async def test_task_group_cancellation_propagates(method: str) -> None:
    class Boom(Exception):
        pass

    async def fail_soon() -> None:
        await anyio.sleep(0.5)
        raise Boom

    with pytest.raises(BaseException) as info:
        async with anyio.create_task_group() as tg:
            tg.start_soon(fail_soon)
            await runner(method).call(time.sleep, 60)
    assert _contains(info.value, Boom)


def _contains(exc: BaseException, kind: type[BaseException]) -> bool:
    """``exc`` is ``kind`` or an exception group holding one (any Python >= 3.10)."""
    return isinstance(exc, kind) or any(_contains(e, kind) for e in getattr(exc, "exceptions", ()))


async def test_fail_after_is_the_callers_own_timeout(method: str) -> None:
    with pytest.raises(TimeoutError):
        with anyio.fail_after(1):
            await runner(method).call(time.sleep, 60)


async def test_grandchild_left_after_a_value_is_ended(method: str, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    pid = await runner(method).call(start_then, "return", str(pidfile))
    deadline = time.monotonic() + 2
    while running(pid):
        assert time.monotonic() < deadline, "grandchild still running 2 s after the value"
        await anyio.sleep(0.02)


async def test_crash_ends_grandchildren(method: str, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    with pytest.raises(ChildCrashed):
        await runner(method).call(start_then, "segfault", str(pidfile))
    assert_gone(int(pidfile.read_text()))


@pytest.mark.parametrize(
    "options, error, words",
    [
        ({"timeout": -1}, ValueError, "timeout must be >= 0 seconds, got -1"),
        ({"timeout": "5"}, TypeError, "timeout must be a number"),
        ({"grace": -0.5}, ValueError, "grace must be >= 0"),
        ({"grace": float("inf")}, ValueError, "grace must be finite"),
        ({"start_method": "thread"}, ValueError, "start_method must be one of"),
        ({"memory_limit": 0}, ValueError, "memory_limit must be >= 1, got 0"),
        ({"memory_limit": 1.5}, TypeError, "memory_limit must be an int or None, got 1.5"),
        ({"timeout": float("nan")}, ValueError, "timeout must be >= 0 seconds, got nan"),
        ({"timeout": True}, TypeError, "timeout must be a number of seconds or None, got True"),
        ({"grace": float("nan")}, ValueError, "grace must be >= 0 seconds, got nan"),
        ({"grace": "1"}, TypeError, "grace must be a number of seconds, got '1'"),
        ({"memory_limit": True}, TypeError, "memory_limit must be an int or None, got True"),
        ({"local_rank_id": -1}, ValueError, "local_rank_id must be >= 0, got -1"),
        ({"local_rank_id": True}, TypeError, "local_rank_id must be an int or None, got True"),
        ({"local_world_size": 0}, ValueError, "local_world_size must be >= 1, got 0"),
        ({"numa_options": "node", "local_rank_id": 0}, TypeError, "numa_options must be a NumaOptions, got 'node'"),
    ],
)
def test_bad_options_raise_at_once(options: dict[str, object], error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        Isolated(**options)  # type: ignore[arg-type]


async def test_bad_function_raises_before_any_process(method: str) -> None:
    async def coro() -> None:
        pass

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(TypeError, match="needs a callable as its first argument, got int 3"):
        await runner(method).call(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="async def"):
        await runner(method).call(coro)
    with pytest.raises(TypeError, match="pickle"):
        await runner(method if method != "fork" else "spawn").call(add, threading.Lock())
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before | _server_tree()


async def test_decorator_makes_an_async_function(method: str) -> None:
    @Isolated(timeout=LONG, start_method=method)
    def parse(blob: str, *, sep: str = ",") -> list[str]:
        """Split a blob."""
        return blob.split(sep)

    assert parse.__name__ == "parse" and parse.__doc__ == "Split a blob."
    assert await parse("a;b", sep=";") == ["a", "b"]


def test_safe_call_sync_without_event_loop() -> None:
    assert asyncproc.safe_call_sync(add, 1, 2) == 3
    with pytest.raises(CustomError):
        asyncproc.safe_call_sync(raise_custom, 1)


async def test_safe_call_sync_refuses_a_running_loop() -> None:
    with pytest.raises(RuntimeError, match="use 'await asyncproc.safe_call"):
        asyncproc.safe_call_sync(add, 1, 2)


UNGUARDED_MAIN = """
import os, sys, anyio, asyncproc
print("main logic ran in", os.getpid(), flush=True)

def square(x):
    return x * x

print("result", anyio.run(asyncproc.Isolated(start_method=sys.argv[1]).call, square, 7))
print("sync result", asyncproc.safe_call_sync(square, 3))
"""


def test_unguarded_main_never_runs_again(method: str, tmp_path: Path) -> None:
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent(UNGUARDED_MAIN))
    out = subprocess.run([sys.executable, str(script), method], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("main logic ran") == 1
    assert "result 49" in out.stdout and "sync result 9" in out.stdout


async def test_numa_binding_applies_in_the_child(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs")
    first, second = sorted(os.sched_getaffinity(0))[:2]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # the default world size: rank 0 of 2
    run = runner(method, numa_options=asyncproc.NumaOptions("exclusive"), local_rank_id=0)
    assert (await run.call(cpus_and_policy))[0] == {first}
    monkeypatch.delenv("LOCAL_WORLD_SIZE")  # or given explicitly: rank 1 of 2
    run = runner(method, numa_options=asyncproc.NumaOptions("exclusive"), local_rank_id=1, local_world_size=2)
    assert (await run.call(cpus_and_policy))[0] == {second}
    assert len(os.sched_getaffinity(0)) >= 2  # the caller itself is never bound


@pytest.mark.parametrize(
    "options, error, words",
    [
        ({"local_rank_id": 0}, ValueError, "needs numa_options too"),
        ({"numa_options": "exclusive"}, ValueError, "needs local_rank_id"),
        ({"numa_options": "exclusive", "local_rank_id": 0}, TypeError, "NumaOptions"),
    ],
)
def test_bad_numa_options_raise_at_once(options: dict[str, object], error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        Isolated(**options)  # type: ignore[arg-type]


async def test_memory_limit_counts_what_the_call_adds(method: str) -> None:
    # The limit is on top of the process's own size: even a small limit lets a call run.
    assert await runner(method, memory_limit=8 * 1024 * 1024).call(add, 1) == 1


async def test_running_out_while_pickling_the_value_is_a_memory_error(method: str) -> None:
    # 100 MB fits; pickling it needs 100 MB more, which does not.
    with pytest.raises(MemoryLimitExceeded):
        await runner(method, memory_limit=150 * 1024 * 1024).call(big_return, 100 * 1024 * 1024)


async def test_crash_is_seen_even_if_a_grandchild_inherited_descriptors(method: str) -> None:
    started = time.monotonic()
    with pytest.raises(ChildCrashed) as info:
        await runner(method).call(crash_leaving_background_job)
    assert info.value.exitcode == 3 and time.monotonic() - started < LONG / 3


async def test_workers_see_the_callers_environment(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = os.environ.get("PYTHONPATH")
    assert await runner(method).call(pythonpath) == expected
    monkeypatch.setenv("ASYNCPROC_TEST_VAR", "changed after the server started")
    assert await runner(method).call(os.environ.get, "ASYNCPROC_TEST_VAR") == "changed after the server started"

