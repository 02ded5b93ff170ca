"""Isolated calls: every row of API.md's outcome table, for each start method, on
asyncio, uvloop and trio (the ``anyio_backend`` fixture)."""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from pathlib import Path

import anyio
import psutil
import pytest

import asyncproc
from asyncproc import ChildCrashed, Isolated, MemoryLimitExceeded, RemoteError

pytestmark = pytest.mark.anyio

# "returns at once, not at the timeout": crashes must be reported long before this.
LONG = 30.0


@pytest.fixture(params=["forkserver", "fork", "spawn"])
def method(request: pytest.FixtureRequest) -> str:
    return request.param


def runner(method: str, **options: object) -> Isolated:
    return Isolated(start_method=method, **{"timeout": LONG, **options})  # type: ignore[arg-type]


# -- functions that run in the child ------------------------------------------------------


class CustomError(Exception):
    def __init__(self, code: int, detail: str):
        super().__init__(code, detail)
        self.code = code


class Unpicklable(Exception):
    def __init__(self) -> None:
        super().__init__("holds a lock")
        self.lock = threading.Lock()


def add(a: int, b: int = 0, *, timeout: int = 0) -> int:
    return a + b + timeout


def raise_custom(code: int) -> None:
    raise CustomError(code, "went wrong")


def deep_in_child() -> None:
    raise_custom(7)


def raise_unpicklable() -> None:
    raise Unpicklable()


def return_lock() -> threading.Lock:
    return threading.Lock()


def crash_segfault() -> None:
    ctypes.string_at(0)


def crash_abort() -> None:
    os.abort()


def crash_os_exit() -> None:
    os._exit(3)


def crash_sys_exit() -> None:
    sys.exit(4)


def crash_killed() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def allocate(n: int) -> int:
    return len(bytearray(n))


def big_value(n: int) -> bytes:
    return b"x" * n


def start_then(what: str, pidfile: str, *, escape: bool = False) -> int:
    """Start a grandchild (optionally in a new session, out of our group), record its pid,
    then end as ``what`` says."""
    proc = subprocess.Popen(["sleep", "60"], start_new_session=escape)
    Path(pidfile).write_text(str(proc.pid))
    if what == "segfault":
        crash_segfault()
    if what == "hang":
        time.sleep(60)
    return proc.pid


def sleep_ignoring_sigterm(seconds: float) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(seconds)


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def assert_gone(pid: int) -> None:
    """Neither running nor an unreaped zombie."""
    try:
        status = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return
    pytest.fail(f"process {pid} is still there: {status}")


# -- values -------------------------------------------------------------------------------


async def test_returns_value_of_lambda_closure_and_kwargs(method: str) -> None:
    run = runner(method)
    offset = 10
    assert await run.call(lambda: 1 + 1) == 2
    assert await run.call(lambda x: x + offset, 5) == 15
    assert await run.call(add, 1, b=2, timeout=3) == 6  # a func kwarg named like an option


async def test_runs_in_another_process(method: str) -> None:
    assert await runner(method).call(os.getpid) != os.getpid()


async def test_large_value(method: str) -> None:
    n = 100 * 1024 * 1024
    value = await runner(method).call(big_value, n)
    assert len(value) == n and value[:3] == b"xxx" and value[-3:] == b"xxx"


async def test_safe_call_uses_defaults() -> None:
    assert await asyncproc.safe_call(add, 2, 3) == 5


# -- exceptions ---------------------------------------------------------------------------


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


# -- deaths -------------------------------------------------------------------------------

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


async def test_memory_limit(method: str) -> None:
    limit = 200 * 1024 * 1024
    run = runner(method, memory_limit=limit)
    assert await run.call(allocate, 10 * 1024 * 1024) == 10 * 1024 * 1024
    with pytest.raises(MemoryLimitExceeded) as info:
        await run.call(allocate, 2 * limit)
    assert isinstance(info.value, MemoryError) and isinstance(info.value, ChildCrashed)
    assert str(limit) in str(info.value) and "allocate" in str(info.value)


# -- timeouts, cancellation and what the child started ------------------------------------


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
    assert info.group_contains(Boom) if isinstance(info.value, BaseExceptionGroup) else isinstance(info.value, Boom)


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


@pytest.mark.parametrize("server_started", ["forkserver", "spawn"])
async def test_crash_ends_grandchild_that_left_the_group(server_started: str) -> None:
    # Workers the fork server starts: it is a subreaper, so the escaped orphan comes to it.
    # ("fork" workers are the caller's own children; see the README.)
    pidfile = Path(os.environ.get("TMPDIR", "/tmp")) / f"asyncproc-test-{os.getpid()}"
    try:
        with pytest.raises(ChildCrashed):
            await runner(server_started).call(start_then, "segfault", str(pidfile), escape=True)
        assert_gone(int(pidfile.read_text()))
    finally:
        pidfile.unlink(missing_ok=True)


# -- arguments, decorator, sync entry ----------------------------------------------------


@pytest.mark.parametrize(
    "options, error, words",
    [
        ({"timeout": -1}, ValueError, "timeout must be >= 0 seconds, got -1"),
        ({"timeout": "5"}, TypeError, "timeout must be a number"),
        ({"grace": -0.5}, ValueError, "grace must be >= 0"),
        ({"grace": float("inf")}, ValueError, "grace must be finite"),
        ({"start_method": "thread"}, ValueError, "start_method must be one of"),
        ({"memory_limit": 0}, ValueError, "memory_limit must be > 0 bytes, got 0"),
        ({"memory_limit": 1.5}, TypeError, "memory_limit must be a number of bytes"),
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


def _server_tree() -> set[int]:
    from asyncproc._serverlink import link

    if link.pid is None:
        return set()
    return {link.pid, *(p.pid for p in psutil.Process(link.pid).children(recursive=True))}


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


# -- the caller's __main__ and the fork server's life ------------------------------------

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


def test_fork_server_restarts_after_it_dies() -> None:
    from asyncproc._serverlink import link

    assert asyncproc.safe_call_sync(add, 1) == 1
    old = link.pid
    assert old is not None
    server = psutil.Process(old)
    workers = server.children()
    os.kill(old, signal.SIGKILL)
    # Its workers die with it (parent-death signal). Outside this harness init reaps them;
    # here the test process is a subreaper, so they are ours to reap. (A call racing the
    # server's death is reported as a crash with an unknown outcome: see the README.)
    psutil.wait_procs(workers, timeout=5)
    while server.status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.01)
    assert asyncproc.safe_call_sync(add, 2) == 2
    assert link.pid not in (None, old)


CALLER_KILLED = """
import os, sys, time, anyio, asyncproc
def hang(pidfile):
    import subprocess
    p = subprocess.Popen(["sleep", "60"])
    open(pidfile, "w").write(f"{os.getpid()} {p.pid}")
    time.sleep(60)
anyio.run(asyncproc.Isolated(timeout=60, start_method=sys.argv[3]).call, hang, sys.argv[1], backend=sys.argv[2])
"""


@pytest.mark.parametrize("server_started", ["forkserver", "spawn"])
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_nothing_survives_a_sigkilled_caller(tmp_path: Path, backend: str, server_started: str) -> None:
    pidfile = tmp_path / "pids"
    caller = subprocess.Popen([sys.executable, "-c", CALLER_KILLED, str(pidfile), backend, server_started])
    deadline = time.monotonic() + 30
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline and caller.poll() is None
        time.sleep(0.02)
    server = [p for p in psutil.Process(caller.pid).children() if p.name() == "asyncproc-srv"]
    caller.kill()
    caller.wait()
    pids = [int(p) for p in pidfile.read_text().split()] + [p.pid for p in server]
    deadline = time.monotonic() + 5
    for pid in pids:
        while psutil.pid_exists(pid):
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    os.waitpid(pid, os.WNOHANG)  # re-parented to this (subreaper) test process
                    continue
            except (psutil.NoSuchProcess, ChildProcessError):
                break
            assert time.monotonic() < deadline, f"{pid} survived its SIGKILLed caller"
            time.sleep(0.02)


# -- NUMA ---------------------------------------------------------------------------------


def cpus_and_policy() -> tuple[set[int], str]:
    with open("/proc/self/status") as f:
        status = f.read()
    return os.sched_getaffinity(0), status


async def test_numa_binding_applies_in_the_child(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two CPUs")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    first, second = sorted(os.sched_getaffinity(0))[:2]
    for rank, expected in ((0, {first}), (1, {second})):
        run = runner(method, numa_options=asyncproc.NumaOptions("exclusive"), local_rank_id=rank)
        cpus, _ = await run.call(cpus_and_policy)
        assert cpus == expected
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


# -- preloading ---------------------------------------------------------------------------

PRELOADED = """
import os, sys, anyio, asyncproc
sys.path.insert(0, sys.argv[1])
if sys.argv[2] == "preload":
    asyncproc.preload("_preload_probe")
import _preload_probe  # the caller imports it too: one line in the log

async def main():
    for _ in range(4):
        assert await asyncproc.safe_call(_preload_probe.answer) == 42
anyio.run(main)
"""


@pytest.mark.parametrize("mode", ["preload", "no-preload"])
def test_preloaded_module_is_not_imported_again_per_call(tmp_path: Path, mode: str) -> None:
    log = tmp_path / "imports"
    env = {**os.environ, "ASYNCPROC_TEST_IMPORT_LOG": str(log)}
    tests_dir = str(Path(__file__).parent)
    out = subprocess.run([sys.executable, "-c", PRELOADED, tests_dir, mode], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    imports = log.read_text().split()
    if mode == "preload":
        assert len(imports) == 2  # the caller and the fork server; no worker
    else:
        assert len(imports) == 5  # the caller and each of the four workers


def test_preload_rejects_what_is_not_a_module_name() -> None:
    with pytest.raises(ValueError, match="module names"):
        asyncproc.preload("not a module")


def big_return(n: int) -> bytes:
    return b"x" * n


async def test_memory_limit_counts_what_the_call_adds(method: str) -> None:
    # The limit is on top of the process's own size: even a small limit lets a call run.
    assert await runner(method, memory_limit=8 * 1024 * 1024).call(add, 1) == 1


async def test_running_out_while_pickling_the_value_is_a_memory_error(method: str) -> None:
    # 100 MB fits; pickling it needs 100 MB more, which does not.
    with pytest.raises(MemoryLimitExceeded):
        await runner(method, memory_limit=150 * 1024 * 1024).call(big_return, 100 * 1024 * 1024)


def crash_leaving_background_job() -> None:
    os.system("sleep 30 &")  # a grandchild that inherits whatever descriptors leak
    os._exit(3)


async def test_crash_is_seen_even_if_a_grandchild_inherited_descriptors(method: str) -> None:
    started = time.monotonic()
    with pytest.raises(ChildCrashed) as info:
        await runner(method).call(crash_leaving_background_job)
    assert info.value.exitcode == 3 and time.monotonic() - started < LONG / 3


def pythonpath() -> str | None:
    return os.environ.get("PYTHONPATH")


async def test_workers_see_the_callers_environment(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = os.environ.get("PYTHONPATH")
    assert await runner(method).call(pythonpath) == expected
    monkeypatch.setenv("ASYNCPROC_TEST_VAR", "changed after the server started")
    assert await runner(method).call(os.environ.get, "ASYNCPROC_TEST_VAR") == "changed after the server started"


def test_a_preload_that_exits_does_not_end_the_server() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        assert asyncproc.safe_call_sync(add, 1) == 1
        asyncproc.preload("_exits_on_import")
        assert asyncproc.safe_call_sync(add, 2) == 2
    finally:
        sys.path.remove(str(Path(__file__).parent))


def test_sigterm_to_the_server_still_ends_every_calls_tree(tmp_path: Path) -> None:
    from asyncproc._serverlink import link

    pidfile = tmp_path / "pid"

    async def call_and_terminate_server() -> None:
        async def terminate_once_started() -> None:
            while not pidfile.exists() or not pidfile.read_text():
                await anyio.sleep(0.02)
            assert link.pid is not None
            os.kill(link.pid, signal.SIGTERM)

        async with anyio.create_task_group() as tg:
            tg.start_soon(terminate_once_started)
            with pytest.raises(ChildCrashed) as info:  # the server ended its worker on the way out
                await runner("forkserver").call(start_then, "hang", str(pidfile))
            assert info.value.exitcode == -signal.SIGKILL

    anyio.run(call_and_terminate_server)
    assert_gone(int(pidfile.read_text()))
    assert asyncproc.safe_call_sync(add, 1) == 1  # a new server; the old one is reaped


async def test_a_stopped_server_never_freezes_the_event_loop() -> None:
    from asyncproc._serverlink import link

    assert await asyncproc.safe_call(add, 1) == 1
    assert link.pid is not None
    outcomes: list[BaseException] = []

    async def one_call() -> None:
        try:  # a worker reserved before the server stopped can still answer
            assert await Isolated(timeout=1, grace=0).call(add, 1) == 1
        except TimeoutError as exc:
            outcomes.append(exc)

    os.kill(link.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        async with anyio.create_task_group() as tg:  # 400 requests fill a stopped server's channel
            for _ in range(400):
                tg.start_soon(one_call)
        assert time.monotonic() - started < 12  # the loop kept running and every timeout fired
    finally:
        os.kill(link.pid, signal.SIGCONT)
    assert len(outcomes) >= 400 - 2 * 3  # all but the few reserved workers timed out
    assert await asyncproc.safe_call(add, 2) == 2  # served once the backlog is cleared
