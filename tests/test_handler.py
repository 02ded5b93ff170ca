"""SubprocessHandler: spawn, wait, kill, close and ``async with``, with real processes, on
asyncio, uvloop and trio."""

from __future__ import annotations

import gc
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

import anyio
import psutil
import pytest

import asyncproc
from asyncproc import SubprocessHandler, get_subprocess_handler

from _helpers import alive

pytestmark = pytest.mark.anyio

PY = sys.executable


def python(code: str, stdout: object = None, stderr: object = None, env: dict | None = None) -> SubprocessHandler:
    return get_subprocess_handler(PY, ["-c", textwrap.dedent(code)], env or {}, stdout, stderr, 0)


async def read_pids(path: Path, count: int) -> list[int]:
    """The first ``count`` pids a child wrote, one a line, to ``path``."""
    with anyio.fail_after(10):
        while True:
            text = path.read_text() if path.exists() else ""
            if text.endswith("\n") and len(text.split()) >= count:  # complete lines only
                return [int(x) for x in text.split()[:count]]
            await anyio.sleep(0.01)


def ignoring_sigterm(ready: Path) -> SubprocessHandler:
    """A child that ignores SIGTERM, then writes ``ready`` and sleeps."""
    return python(
        f"""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open({str(ready)!r}, "w").write("1\\n")
        time.sleep(60)
        """
    )


async def test_wait_returns_exit_code_and_the_attributes_say_so(anyio_backend: object) -> None:
    handler = python("import sys; sys.exit(7)")
    assert handler.pid is None and handler.returncode is None and handler.local_rank_id == 0
    await handler.spawn()
    assert isinstance(handler.pid, int)
    assert await handler.wait() == 7
    assert handler.returncode == 7
    assert await handler.wait() == 7  # again: the same answer, no error
    handler.close()


async def test_command_environment_and_log_files(anyio_backend: object, tmp_path: Path) -> None:
    out, err = tmp_path / "out.log", tmp_path / "err.log"
    out.write_text("stale text that must be truncated\n" * 10)
    os.environ["ASYNCPROC_TEST_DROP"] = "inherited"
    try:
        handler = get_subprocess_handler(
            PY,
            ["-c", "import os, sys; print(sys.argv[1:], os.environ['ADDED'], os.environ.get('ASYNCPROC_TEST_DROP')); "
                   "print('to stderr', file=sys.stderr)", 1, 2.5, Path("p")],
            {"ADDED": "yes", "ASYNCPROC_TEST_DROP": None},
            str(out), str(err), 3,
        )
        async with handler:
            assert await handler.wait() == 0
    finally:
        del os.environ["ASYNCPROC_TEST_DROP"]
    assert out.read_text() == "['1', '2.5', 'p'] yes None\n"
    assert err.read_text() == "to stderr\n"
    assert handler.local_rank_id == 3


async def test_child_leads_its_own_session_and_group(anyio_backend: object) -> None:
    async with python("import time; time.sleep(30)") as handler:
        assert handler.pid is not None
        assert os.getpgid(handler.pid) == handler.pid
        assert os.getsid(handler.pid) == handler.pid


async def test_missing_entrypoint_raises_file_not_found(anyio_backend: object, tmp_path: Path) -> None:
    handler = get_subprocess_handler(tmp_path / "no-such-program", [], {}, str(tmp_path / "o"), None, 0)
    with pytest.raises(FileNotFoundError):
        await handler.spawn()
    assert handler.pid is None


async def test_signal_death_is_a_negative_code_reported_at_once(anyio_backend: object) -> None:
    handler = python("import os, signal, time; os.kill(os.getpid(), signal.SIGSEGV); time.sleep(30)")
    await handler.spawn()
    with anyio.fail_after(5):  # at once, not after the sleep
        assert await handler.wait() == -signal.SIGSEGV


async def test_kill_ends_group_and_escaped_grandchild_then_reaps(anyio_backend: object, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    handler = python(
        f"""
        import os, subprocess, sys, time
        same_group = subprocess.Popen(["sleep", "60"])
        escaped = subprocess.Popen(["sleep", "60"], start_new_session=True)
        with open({str(pids)!r}, "w") as f:
            f.write(f"{{same_group.pid}} {{escaped.pid}}\\n")
        time.sleep(60)
        """
    )
    async with handler:
        grandchildren = await read_pids(pids, 2)
        assert await handler.kill(signal.SIGTERM, grace=5) == -signal.SIGTERM
        assert not any(alive(pid) for pid in grandchildren)


async def test_kill_escalates_to_sigkill_after_grace(anyio_backend: object, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    handler = ignoring_sigterm(ready)
    async with handler:
        await read_pids(ready, 1)
        started = time.monotonic()
        assert await handler.kill(grace=0.3) == -signal.SIGKILL
        assert time.monotonic() - started < 3  # grace, then SIGKILL: not a long timeout


async def test_kill_and_close_after_exit_are_not_errors(anyio_backend: object) -> None:
    handler = python("pass")
    await handler.spawn()
    assert await handler.wait() == 0
    # Same on every backend (asyncio's Process.terminate() would raise ProcessLookupError).
    assert await handler.kill(signal.SIGTERM, grace=1) == 0
    handler.close(signal.SIGKILL)
    handler.close()


async def test_kill_after_exit_still_ends_what_the_group_left_behind(anyio_backend: object, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    handler = python(
        f"""
        import subprocess
        p = subprocess.Popen(["sleep", "60"])
        open({str(pids)!r}, "w").write(f"{{p.pid}}\\n")
        """
    )
    async with handler:
        assert await handler.wait() == 0  # the leader is reaped; its grandchild lives on
        (orphan,) = await read_pids(pids, 1)
        assert alive(orphan)
        await handler.kill(grace=1)
        assert not alive(orphan)


async def test_close_signals_the_group_synchronously(anyio_backend: object) -> None:
    handler = python("import time; time.sleep(30)")
    await handler.spawn()
    handler.close(signal.SIGUSR1)
    with anyio.fail_after(5):
        assert await handler.wait() == -signal.SIGUSR1


async def test_async_with_kills_on_exception_and_on_cancel(anyio_backend: object) -> None:
    with pytest.raises(KeyError):
        async with python("import time; time.sleep(30)") as handler:
            raise KeyError("boom")
    assert handler.returncode == -signal.SIGTERM

    with anyio.move_on_after(0.2):
        async with python("import time; time.sleep(30)") as handler:
            await handler.wait()
    assert handler.returncode == -signal.SIGTERM


async def test_wait_and_kill_from_concurrent_tasks(anyio_backend: object) -> None:
    handler = python("import time; time.sleep(30)")
    await handler.spawn()
    codes: list[int | None] = []

    async def waiter() -> None:
        codes.append(await handler.wait())

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        tg.start_soon(waiter)
        await anyio.sleep(0.1)
        codes.append(await handler.kill(grace=2))
    assert codes == [-signal.SIGTERM] * 3


async def test_spawn_twice_and_wait_before_spawn_are_errors(anyio_backend: object) -> None:
    handler = python("pass")
    with pytest.raises(RuntimeError, match="spawn"):
        await handler.wait()
    async with handler:
        with pytest.raises(RuntimeError, match="already spawned"):
            await handler.spawn()


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((), {"args": "-c pass"}, "not a string"),
        ((), {"env": ["A=1"]}, "env must be a mapping"),
        ((), {"env": {"A": 1}}, r"env\['A'\] must be a str or None"),
        ((), {"local_rank_id": "0"}, "local_rank_id must be an int"),
        ((), {"stdout": sys.stdout}, r"stdout must be a file path, None or '' \(inherit\), or a file descriptor \(pass"),
        ((), {"stderr": True}, "stderr must be a file path, .* got True"),
        ((), {"args": [None]}, r"args\[0\] must be a str, path or number, got None"),
        ((), {"entrypoint": b"/bin/true"}, "entrypoint must be a str or path, got b'/bin/true'"),
    ],
)
def test_bad_arguments_are_named(args: tuple, kwargs: dict, match: str) -> None:
    call = {"entrypoint": PY, "args": args, "env": {}, "stdout": None, "stderr": None, "local_rank_id": 0}
    call.update(kwargs)
    with pytest.raises(TypeError, match=match):
        SubprocessHandler(**call)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"local_rank_id": -1}, "local_rank_id must be >= 0, got -1"), ({"stdout": -2}, "stdout .* must be >= 0, got -2"),
     ({"entrypoint": ""}, "entrypoint must not be empty")],
)
def test_bad_values_are_named(kwargs: dict, match: str) -> None:
    call = {"entrypoint": PY, "args": (), "env": {}, "stdout": None, "stderr": None, "local_rank_id": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        SubprocessHandler(**call)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [({"grace": float("nan")}, ValueError, "grace must be >= 0 seconds, got nan"),
     ({"grace": "2"}, TypeError, "grace must be a number of seconds, got '2'"),
     ({"grace": -1}, ValueError, "grace must be >= 0 seconds, got -1"),
     ({"sig": "TERM"}, TypeError, "sig must be a signal number"), ({"sig": 0}, ValueError, "sig must be a valid")],
)
async def test_bad_kill_arguments_are_named_and_leave_the_child_running(
    anyio_backend: object, kwargs: dict, error: type[Exception], match: str
) -> None:
    async with python("import time; time.sleep(60)") as handler:
        with pytest.raises(error, match=match):
            await handler.kill(**kwargs)
        assert handler.returncode is None and alive(handler.pid)  # type: ignore[arg-type]


def test_exported() -> None:
    assert asyncproc.SubprocessHandler is SubprocessHandler
    assert isinstance(get_subprocess_handler(PY, [], None, None, "", 1), SubprocessHandler)


@pytest.mark.anyio
async def test_numa_binding_is_in_place_before_exec(anyio_backend: object, tmp_path: Path) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    log = tmp_path / "status"
    handler = SubprocessHandler(
        "grep", ["Cpus_allowed_list", "/proc/self/status"], {}, str(log), None, 1,
        asyncproc.NumaOptions("exclusive"), local_world_size=2,
    )
    await handler.spawn()
    assert await handler.wait() == 0
    assert log.read_text().split()[-1] == str(cpus[1])
    assert sorted(os.sched_getaffinity(0)) == cpus  # the spawning thread got its CPUs back


async def test_kill_escalates_for_a_group_member_left_by_an_exited_leader(anyio_backend: object, tmp_path: Path) -> None:
    # The leader exits at once (a zombie, unreaped); its background child ignores SIGTERM.
    pids = tmp_path / "pids"
    handler = python(
        f"""
        import subprocess
        code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(flush=True); time.sleep(60)"
        p = subprocess.Popen([{PY!r}, "-c", code], stdout=subprocess.PIPE)
        p.stdout.readline()
        open({str(pids)!r}, "w").write(f"{{p.pid}}\\n")
        """
    )
    await handler.spawn()
    try:
        (member,) = await read_pids(pids, 1)
        with anyio.fail_after(10):
            while psutil.Process(handler.pid).status() != psutil.STATUS_ZOMBIE:
                await anyio.sleep(0.01)
            assert await handler.kill(signal.SIGTERM, grace=0.5) == 0
        assert not alive(member)
    finally:
        handler.close()


async def test_cancelling_kill_during_its_grace_still_ends_the_child(anyio_backend: object, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    handler = ignoring_sigterm(ready)
    await handler.spawn()
    try:
        await read_pids(ready, 1)
        with anyio.fail_after(10):
            with anyio.move_on_after(0.3) as scope:
                await handler.kill(signal.SIGTERM, grace=30)
        assert scope.cancelled_caught
        assert handler.returncode == -signal.SIGKILL
    finally:
        handler.close(signal.SIGKILL)
        with anyio.fail_after(10):
            await handler.wait()


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


async def test_reaping_through_popen_or_dropping_the_handler_leaks_nothing(anyio_backend: object) -> None:
    from asyncproc._subprocess import guardian as _guardian

    warm = python("pass")  # the guardian's lifeline is opened once, by the first spawn
    await warm.spawn()
    await warm.wait()
    before = open_fds()
    handler = python("pass")
    await handler.spawn()
    assert handler.proc is not None
    handler.proc.wait()  # what torch's SubprocessContext does
    handler.close()
    assert handler.pid not in _guardian._registered
    assert await handler.wait() == 0
    assert open_fds() == before

    dropped = python("pass")
    await dropped.spawn()
    assert dropped.proc is not None
    dropped.proc.wait()
    del dropped
    gc.collect()
    assert open_fds() == before
