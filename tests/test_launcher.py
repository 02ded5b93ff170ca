"""The local-rank launcher: ``asyncproc.start_processes`` on three backends, and the
``asyncproc run`` command as a real subprocess."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import termios
import textwrap
import time
from pathlib import Path

import anyio
import pytest

from asyncproc import LaunchConfig, LaunchFailed, start_processes

from _helpers import alive, assert_gone, gone

PY = sys.executable

LAUNCHER = [PY, "-m", "asyncproc", "run"]
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)  # Linux; in fcntl from Python 3.10


def rank_code(code: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(code)]


# Set, so the launcher's OMP_NUM_THREADS notice (tested in test_torchrun.py) stays off the console.
QUIET_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LAUNCHER, *args], capture_output=True, text=True, timeout=timeout, env=QUIET_ENV)


# -- the Python API ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_every_rank_gets_its_variables_and_logs(anyio_backend: object, tmp_path: Path) -> None:
    command = rank_code(
        """
        import json, os, sys
        keys = ["LOCAL_RANK", "RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "ASYNCPROC_ERROR_FILE", "TORCHELASTIC_ERROR_FILE", "EXTRA"]
        print(json.dumps({k: os.environ.get(k) for k in keys}))
        print("err line", file=sys.stderr)
        """
    )
    result = await start_processes(command, LaunchConfig(nproc=3, log_dir=tmp_path, env={"EXTRA": "x"}, run_id="r"))
    assert result.exit_code == 0 and result.failure is None
    assert [r.exitcode for r in result.ranks] == [0, 0, 0]
    for rank in result.ranks:
        rank_dir = tmp_path / "r" / "attempt_0" / str(rank.rank)
        assert rank.stdout_log == rank_dir / "stdout.log"
        seen = json.loads(rank.stdout_log.read_text())
        assert seen["LOCAL_RANK"] == seen["RANK"] == str(rank.rank)
        assert seen["LOCAL_WORLD_SIZE"] == seen["WORLD_SIZE"] == "3"
        assert seen["ASYNCPROC_ERROR_FILE"] == seen["TORCHELASTIC_ERROR_FILE"] == str(rank_dir / "error.json")
        assert seen["MASTER_ADDR"] == "127.0.0.1" and int(seen["MASTER_PORT"]) > 0 and seen["EXTRA"] == "x"
        assert (rank_dir / "stderr.log").read_text() == "err line\n"
    assert "all 3 ranks succeeded" in result.summary()


@pytest.mark.anyio
async def test_first_failure_stops_the_others_at_once(anyio_backend: object, tmp_path: Path) -> None:
    command = rank_code(
        """
        import os, sys, time
        if os.environ["RANK"] == "2":
            time.sleep(0.2)
            print("rank two gives up", file=sys.stderr)
            sys.exit(3)
        time.sleep(60)
        """
    )
    started = time.monotonic()
    result = await start_processes(command, LaunchConfig(nproc=4, log_dir=tmp_path, grace=2))
    assert time.monotonic() - started < 10  # not the ranks' 60 s
    assert result.failure is not None and result.failure.rank == 2
    assert result.exit_code == 3
    assert result.failure.stderr_tail == ("rank two gives up",)
    assert [r.stopped for r in result.ranks] == [True, True, False, True]
    assert all(r.exitcode == -signal.SIGTERM for r in result.ranks if r.stopped)
    with pytest.raises(LaunchFailed, match="rank 2 .* failed: it exited with code 3") as info:
        result.check()
    assert info.value.result is result and info.value.exitcode == 3


@pytest.mark.anyio
async def test_cancelling_the_caller_stops_every_rank(anyio_backend: object, tmp_path: Path) -> None:
    # Each rank writes its pid once it runs, and "stopped" when SIGTERM comes: a rank that
    # died by itself, or never started, would fail this test.
    code = """
        import os, signal, sys, time
        path = os.path.join(sys.argv[1], os.environ["RANK"])
        def stopped(signum, frame):
            open(path, "a").write("stopped\\n")
            sys.exit(0)
        signal.signal(signal.SIGTERM, stopped)
        open(path, "w").write(f"{os.getpid()}\\n")
        time.sleep(60)
        """
    command = [*rank_code(code), str(tmp_path)]
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(start_processes, command, LaunchConfig(nproc=3, grace=10))
            await read_lines([tmp_path / str(rank) for rank in range(3)], 1)  # all three run
            tg.cancel_scope.cancel()
    for rank in range(3):
        pid, status = (tmp_path / str(rank)).read_text().split()
        assert status == "stopped"  # by the launcher's SIGTERM
        assert_gone(int(pid))


async def read_lines(paths: list[Path], count: int) -> list[list[str]]:
    """The first ``count`` complete lines each of ``paths`` gets, once they are all there."""
    while True:
        texts = [path.read_text() if path.exists() else "" for path in paths]
        if all(len(text.splitlines()) >= count and text.endswith("\n") for text in texts):
            return [text.splitlines()[:count] for text in texts]
        await anyio.sleep(0.01)


@pytest.mark.anyio
async def test_missing_command_raises_and_starts_nothing(anyio_backend: object, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await start_processes([str(tmp_path / "nope")], LaunchConfig(nproc=2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"nproc": 0}, "nproc must be >= 1, got 0"), ({"nproc": 1, "grace": -1}, "grace must be"),
     ({"nproc": 1, "master_port": 70000}, "master_port"),
     ({"nproc": 1, "grace": float("nan")}, "grace must be >= 0 seconds, got nan"),
     ({"nproc": 1, "grace": float("inf")}, "grace must be finite")],
)
def test_bad_config_is_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LaunchConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"nproc": True}, "nproc must be an int, got True"), ({"nproc": 1, "grace": True}, "grace must be a number"),
     ({"nproc": 1, "master_port": True}, "master_port must be an int or None, got True"),
     ({"nproc": 1, "env": {"A": 1}}, r"env\['A'\] must be a str or None, got 1")],
)
def test_config_of_the_wrong_type_is_named(kwargs: dict, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        LaunchConfig(**kwargs)


# -- the command line ----------------------------------------------------------------------

LINE = re.compile(r"\[rank(\d+)\]: (out|err) (\d+) (\d+) (x{80})\Z")


def test_32_ranks_thousands_of_lines_never_split_or_interleaved() -> None:
    lines = 2000
    command = rank_code(
        f"""
        import os, sys
        r = os.environ["RANK"]
        for i in range({lines}):
            sys.stdout.write(f"out {{r}} {{i}} {{'x' * 80}}\\n")
            sys.stderr.write(f"err {{r}} {{i}} {{'x' * 80}}\\n")
        """
    )
    done = run_cli("-n", "32", "--", *command, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    for stream, text in (("out", done.stdout), ("err", done.stderr)):
        counts = [0] * 32
        for line in text.splitlines():
            match = LINE.match(line)
            assert match, f"malformed console line: {line[:200]!r}"
            rank, kind, rank_again, index, _ = match.groups()
            assert kind == stream and rank == rank_again
            assert int(index) == counts[int(rank)]  # in order, none lost within a rank
            counts[int(rank)] += 1
        assert counts == [lines] * 32


def test_log_dir_with_and_without_tee(tmp_path: Path) -> None:
    command = rank_code("import os, sys; print('hello', os.environ['RANK']); print('oops', file=sys.stderr)")
    quiet = run_cli("-n", "2", "--log-dir", str(tmp_path / "quiet"), "--run-id", "r", "--", *command)
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
    teed = run_cli("-n", "2", "--log-dir", str(tmp_path / "teed"), "--run-id", "r", "--tee", "--", *command)
    assert sorted(teed.stdout.splitlines()) == ["[rank0]: hello 0", "[rank1]: hello 1"]
    assert sorted(teed.stderr.splitlines()) == ["[rank0]: oops", "[rank1]: oops"]
    for mode in ("quiet", "teed"):
        for rank in (0, 1):
            assert (tmp_path / mode / "r" / "attempt_0" / str(rank) / "stdout.log").read_text() == f"hello {rank}\n"
            assert (tmp_path / mode / "r" / "attempt_0" / str(rank) / "stderr.log").read_text() == "oops\n"


def test_failure_summary_names_rank_code_log_and_stderr(tmp_path: Path) -> None:
    command = rank_code(
        """
        import os, sys, time
        if os.environ["RANK"] == "1":
            print("about to fail", file=sys.stderr)
            sys.exit(5)
        time.sleep(60)
        """
    )
    done = run_cli("-n", "3", "--log-dir", str(tmp_path), "--run-id", "r", "--grace", "1", "--", *command)
    assert done.returncode == 5
    assert "rank 1 (pid" in done.stderr and "failed: it exited with code 5" in done.stderr
    assert f"stderr log : {tmp_path / 'r' / 'attempt_0' / '1' / 'stderr.log'}" in done.stderr
    assert "about to fail" in done.stderr
    assert "2 other rank(s) were stopped" in done.stderr


def test_rank_killed_by_signal_gives_128_plus_signal() -> None:
    command = rank_code("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    done = run_cli("-n", "2", "--", *command)
    assert done.returncode == 128 + signal.SIGKILL
    assert "was killed by SIGKILL (signal 9)" in done.stderr


def test_missing_command_exits_127_with_a_message() -> None:
    done = run_cli("-n", "2", "--", "/no/such/program")
    assert done.returncode == 127 and "cannot run '/no/such/program'" in done.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("backend", ["asyncio", "uvloop", "trio"])
def test_signal_to_launcher_stops_every_rank(sig: signal.Signals, backend: str) -> None:
    command = rank_code("import os, time; print(os.getpid(), flush=True); time.sleep(60)")
    launcher = subprocess.Popen(
        [*LAUNCHER, "-n", "3", "--grace", "2", "--backend", backend, "--", *command],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert launcher.stdout is not None
    ranks = [int(launcher.stdout.readline().split(": ")[1]) for _ in range(3)]
    launcher.send_signal(sig)
    _, err = launcher.communicate(timeout=15)
    assert launcher.returncode == 128 + sig
    assert f"interrupted by {sig.name}" in err
    assert not [pid for pid in ranks if alive(pid)]


def test_numa_exclusive_launch_binds_each_rank_before_its_first_instruction() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    # grep reads /proc/self/status as its very first act: the binding must already be there.
    out = run_cli("-n", "2", "--numa", "exclusive", "--", "grep", "Cpus_allowed_list", "/proc/self/status")
    assert out.returncode == 0, out.stderr
    lines = sorted(line for line in out.stdout.splitlines() if "Cpus_allowed_list" in line)
    assert [line.split()[-1] for line in lines] == [str(cpus[0]), str(cpus[1])]
    assert [line.split(":")[0] for line in lines] == ["[rank0]", "[rank1]"]


LEFTOVER = """
import os, signal, subprocess, sys
code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(flush=True); time.sleep(60)"
if os.environ["RANK"] == "0":
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    p.stdout.readline()
    open(sys.argv[1], "w").write(f"{p.pid}\\n")
    sys.exit(int(sys.argv[2]))
"""


def _gone(path: Path) -> bool:
    return gone(int(path.read_text()))


@pytest.mark.anyio
@pytest.mark.parametrize("code", [0, 3])
async def test_what_a_finished_rank_left_in_its_group_is_killed(
    anyio_backend: object, tmp_path: Path, code: int
) -> None:
    # A SIGTERM-ignoring member of the rank's group: one SIGTERM is not enough, and on
    # success it holds the rank's stdout pipe, so it must be ended before draining.
    pid_file = tmp_path / "pid"
    command = [*rank_code(LEFTOVER + "import time; time.sleep(60)"), str(pid_file), str(code)]
    started = time.monotonic()
    result = await start_processes(command, LaunchConfig(nproc=2 if code else 1, grace=0.3))
    assert result.exit_code == code
    assert _gone(pid_file)
    assert time.monotonic() - started < 10


def test_a_helper_in_its_own_session_does_not_outlive_the_run(tmp_path: Path) -> None:
    # Rank 0 starts a helper with setsid and exits: nothing can find the helper from the
    # rank any more; the launcher (a subreaper) adopts it and ends it.
    pid_file = tmp_path / "pid"
    # Written whole, then renamed: the rank exits (and the launcher ends the helper) as soon
    # as the file exists, which must not be before the pid is in it.
    helper = ("import os, time; path = os.environ['PID_FILE']; open(path + '.tmp', 'w').write(f'{os.getpid()}\\n'); "
              "os.rename(path + '.tmp', path); time.sleep(60)")
    code = f"""
        import os, subprocess, sys, time
        if os.environ["RANK"] == "0":
            subprocess.Popen([sys.executable, "-c", {helper!r}], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while not os.path.exists(os.environ["PID_FILE"]):
                time.sleep(0.01)
            sys.exit(4)
        time.sleep(60)
        """
    env = {**os.environ, "PID_FILE": str(pid_file)}
    proc = subprocess.run([*LAUNCHER, "-n", "2", "--grace", "0.5", "--", *rank_code(code)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 4, proc.stderr
    assert _gone(pid_file)


def _fds_and_temp_dirs(temp: Path) -> tuple[set[int], list[Path]]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}, list(temp.iterdir())


@pytest.mark.anyio
async def test_a_launch_that_fails_to_start_leaks_no_fd_and_no_folder(
    anyio_backend: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    temp = tmp_path / "temp"  # our own temporary folder: other runs' folders don't count
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    await start_processes(["true"], LaunchConfig(nproc=1))  # the guardian's lifeline, once
    before = _fds_and_temp_dirs(temp)
    with pytest.raises(FileNotFoundError):
        await start_processes([str(tmp_path / "nope")], LaunchConfig(nproc=2))
    with pytest.raises(TypeError):
        await start_processes([b"/bin/true"], LaunchConfig(nproc=2))  # type: ignore[list-item]
    # Rank 1 cannot open its log (a folder is in the way): rank 0 already runs.
    (tmp_path / "logs" / "r" / "attempt_0" / "1" / "stdout.log").mkdir(parents=True)
    with pytest.raises(IsADirectoryError):
        await start_processes(rank_code("import time; time.sleep(60)"), LaunchConfig(nproc=2, log_dir=tmp_path / "logs", grace=0.5, run_id="r"))
    assert _fds_and_temp_dirs(temp) == before == (before[0], [])


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_second_signal_kills_the_ranks_now_and_still_summarizes(sig: signal.Signals, backend: str) -> None:
    command = rank_code(
        """
        import os, signal, time
        def got(signum, frame):  # says so (the launcher has taken the first signal), lives on
            print("got", signal.Signals(signum).name, flush=True)
        signal.signal(signal.SIGINT, got)
        signal.signal(signal.SIGTERM, got)
        print(os.getpid(), flush=True)
        time.sleep(60)
        """
    )
    launcher = subprocess.Popen(
        [*LAUNCHER, "-n", "1", "--grace", "30", "--backend", backend, "--", *command],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert launcher.stdout is not None
    rank = int(launcher.stdout.readline().split(": ")[1])
    launcher.send_signal(sig)
    # Forwarded to the rank: the launcher has taken the first signal; now the second.
    assert launcher.stdout.readline().split(": ")[1].strip() == f"got {sig.name}"
    started = time.monotonic()
    launcher.send_signal(sig)
    _, err = launcher.communicate(timeout=20)
    assert time.monotonic() - started < 10  # not the 30 s grace
    assert launcher.returncode == 128 + sig, err
    assert f"interrupted by {sig.name}" in err and "Traceback" not in err
    assert not alive(rank)


def test_a_console_reader_that_goes_away_does_not_crash_the_launch(tmp_path: Path) -> None:
    # `asyncproc run ... | head -1`: the console pipe breaks; the launch goes on, logged.
    code = "import sys\nfor i in range(20000): print('x' * 100, i)\nsys.stdout.flush()"
    launcher = subprocess.Popen(
        [*LAUNCHER, "-n", "1", "--log-dir", str(tmp_path), "--run-id", "r", "--tee", "--", *rank_code(code)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert launcher.stdout is not None and launcher.stderr is not None
    launcher.stdout.readline()
    launcher.stdout.close()
    err = launcher.stderr.read().decode()
    assert launcher.wait(timeout=60) == 0, err
    assert "Traceback" not in err
    assert len((tmp_path / "r" / "attempt_0" / "0" / "stdout.log").read_text().splitlines()) == 20000


def wait_until_full(read_end: int, timeout: float = 20) -> None:
    """Until the pipe holds all it can: its writer (the launcher's console) is then blocked,
    or waiting for room, and it got that far with its signal handling set up."""
    capacity = fcntl.fcntl(read_end, F_GETPIPE_SZ)
    deadline = time.monotonic() + timeout
    while int.from_bytes(fcntl.ioctl(read_end, termios.FIONREAD, b"\0" * 4), sys.byteorder) < capacity:
        assert time.monotonic() < deadline, "the console pipe never filled up"
        time.sleep(0.01)


def test_a_console_nobody_reads_does_not_block_the_launcher(tmp_path: Path) -> None:
    # The console pipe fills up; the launcher must still take SIGTERM and stop the rank.
    pid_file = tmp_path / "pid"
    code = f"""
        import os, sys, time
        open({str(pid_file)!r}, "w").write(f"{{os.getpid()}}\\n")
        sys.stdout.write(("x" * 100 + "\\n") * 20000)
        sys.stdout.flush()
        time.sleep(60)
        """
    launcher = subprocess.Popen(
        [*LAUNCHER, "-n", "1", "--grace", "1", "--", *rank_code(code)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        wait_until_full(launcher.stdout.fileno())  # the launcher is stuck writing, if it blocks
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=20) == 128 + signal.SIGTERM
        assert _gone(pid_file)
    finally:
        launcher.kill()
        launcher.communicate()
