"""``asyncproc up`` and ``asyncproc ctl`` end to end: real processes, a real socket, a real
pseudo-terminal. Every wait is on something printed, a status answer, or a process exit."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import pwd
import re
import select
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from asyncproc._proc import proctree as _proctree

from _up_helpers import BOUND_S, PY, Up, ctl, program, wait_gone


@pytest.fixture
def sock(tmp_path: Path) -> Path:
    return tmp_path / "up.sock"


SLEEPER = "import os, sys, time; print('ready', os.environ.get('ASYNCPROC_REPLICA'), os.getpid()); time.sleep(600)"


def test_crash_loop_backs_off_and_gives_up_replicas_run_and_memory_limit_acts(tmp_path: Path, sock: Path) -> None:
    go = tmp_path / "go"
    crasher = f"import os, sys, time\nwhile not os.path.exists({str(go)!r}): time.sleep(0.05)\nprint('crashing'); sys.exit(3)"
    (tmp_path / "asyncproc.toml").write_text(f"""
[supervisor]
max_restarts = 3
max_seconds = 120
backoff = {{ initial = 0.2, factor = 2.0, jitter = 0 }}

[programs.web]
command = {program(SLEEPER)}
replicas = 2

[programs.hog]
command = {program("import time; data = b'x' * (120 << 20); print('allocated', flush=True); time.sleep(600)")}
memory_limit = "40 MiB"
restart = "temporary"

[programs.crash]
# crashes only once the test says so (the memory limit is seen first), then at every start
command = {program(crasher)}
""")
    with Up(tmp_path / "asyncproc.toml", sock) as up:
        up.wait_line(r"^\[web-0\] ready 0 ")
        up.wait_line(r"^\[web-1\] ready 1 ")
        up.wait_line(r"hog: went over its memory limit")
        # each line can be pumped before its spawn's completion reaches the supervisor: wait for the pids too
        status = up.wait_status(lambda s: s["hog"]["last_exit"] is not None
                                and all(s[n]["state"] == "running" and s[n]["pid"] for n in ("web-0", "web-1", "crash")))
        assert status["hog"]["last_exit"] == "memory limit" and status["hog"]["state"] == "ended"
        assert status["hog"]["restarts"] == 0  # temporary: not restarted
        web_pids = [status["web-0"]["pid"], status["web-1"]["pid"]]

        go.touch()
        delays = [float(up.wait_line(rf"crash: restarting in ([\d.]+) s \(restart {k}\)").group(1)) for k in (1, 2, 3)]
        assert delays == [0.2, 0.4, 0.8]  # backoff doubles (no jitter)
        up.wait_line(r"crash: failed too often")
        assert up.wait_exit() == 1  # the supervisor gave up: non-zero, everything stopped
        assert up.count(r"^\[crash\] crashing") == 4
        assert re.search(r"gave up", "\n".join(up.lines))
        assert wait_gone(web_pids) == []


def _system(tmp_path: Path, **programs: str) -> Path:
    text = "".join(f"[programs.{name}]\n{body}\n\n" for name, body in programs.items())
    file = tmp_path / "asyncproc.toml"
    file.write_text(text)
    return file


@pytest.mark.parametrize("backend", ["asyncio", "uvloop", "trio"])
def test_ctl_status_restart_stop_start_reload_down(tmp_path: Path, sock: Path, backend: str) -> None:
    sleeper = program(SLEEPER)
    file = _system(tmp_path,
                   a=f"command = {sleeper}\nreplicas = 2\nshutdown = 2",
                   b=f"command = {sleeper}\nshutdown = 2",
                   keep=f"command = {sleeper}\nshutdown = 2")
    with Up(file, sock, "--backend", backend) as up:
        status = up.wait_status(lambda s: all(r["state"] == "running" for r in s.values()))
        assert list(status) == ["a-0", "a-1", "b", "keep"]  # start order
        out = up.ctl("status", "--json")
        assert out.returncode == 0
        assert [row["name"] for row in json.loads(out.stdout)] == ["a-0", "a-1", "b", "keep"]
        assert {"name", "state", "pid", "restarts"} <= set(json.loads(out.stdout)[0])

        table = up.ctl("status")
        assert table.returncode == 0
        for name in ("a-0", "a-1", "b", "keep", "RESTARTS", "LAST EXIT"):
            assert name in table.stdout

        old = status["a-0"]["pid"]
        assert up.ctl("restart", "a-0").returncode == 0
        status = up.status()
        assert status["a-0"]["state"] == "running" and status["a-0"]["pid"] not in (None, old)
        assert wait_gone([old]) == []

        assert up.ctl("stop", "b").returncode == 0
        status = up.status()
        assert status["b"]["state"] == "stopped" and status["b"]["pid"] is None  # still listed
        assert up.ctl("start", "b").returncode == 0
        assert up.status()["b"]["state"] == "running"

        unknown = up.ctl("restart", "nope")
        assert unknown.returncode != 0 and "nope" in unknown.stderr

        # reload: b removed, c added, a changed, keep untouched
        before = up.status()
        _system(tmp_path,
                a=f"command = {sleeper}\nreplicas = 2\nshutdown = 2\nenv = {{ CHANGED = '1' }}",
                keep=f"command = {sleeper}\nshutdown = 2",
                c=f"command = {sleeper}\nshutdown = 2")
        reload = up.ctl("reload")
        assert reload.returncode == 0, reload.stderr
        after = up.wait_status(lambda s: all(r["state"] == "running" for r in s.values()))
        assert list(after) == ["a-0", "a-1", "keep", "c"]
        assert after["keep"]["pid"] == before["keep"]["pid"]
        assert after["a-0"]["pid"] != before["a-0"]["pid"] and after["a-1"]["pid"] != before["a-1"]["pid"]
        assert wait_gone([before["b"]["pid"], before["a-0"]["pid"], before["a-1"]["pid"]]) == []

        # a file that does not load is refused; the running system is kept
        file.write_text(file.read_text() + "\n[programs.bad]\ncommand = 'x'\nrestart = 'sometimes'\n")
        refused = up.ctl("reload")
        assert refused.returncode != 0 and "restart" in refused.stderr
        assert {n: r["pid"] for n, r in up.status().items()} == {n: r["pid"] for n, r in after.items()}

        assert up.ctl("down").returncode == 0
        assert up.wait_exit() == 0
        assert wait_gone([r["pid"] for r in after.values()]) == []


def test_sighup_reloads(tmp_path: Path, sock: Path) -> None:
    sleeper = program(SLEEPER)
    file = _system(tmp_path, a=f"command = {sleeper}\nshutdown = 2")
    with Up(file, sock) as up:
        up.wait_line(r"^\[a\] ready")
        second = subprocess.run([PY, "-m", "asyncproc", "up", str(file), "--socket", str(sock), "--no-live"],
                                capture_output=True, text=True, timeout=BOUND_S)
        assert second.returncode == 1 and "another asyncproc up is running" in second.stderr
        _system(tmp_path, a=f"command = {sleeper}\nshutdown = 2", b=f"command = {sleeper}\nshutdown = 2")
        up.proc.send_signal(signal.SIGHUP)
        up.wait_line(r"^\[b\] ready")
        up.proc.send_signal(signal.SIGTERM)
        assert up.wait_exit() == 0
        up.wait_line(r"b: stopped")


def test_numa_replicas_and_log_files(tmp_path: Path, sock: Path) -> None:
    report = program("import os; print(os.environ['ASYNCPROC_REPLICA'], sorted(os.sched_getaffinity(0)))")
    file = _system(tmp_path, r=f"command = {report}\nreplicas = 2\nnuma = 'node'\nrestart = 'temporary'\n"
                               "stdout = 'logs/{name}.out'")
    with Up(file, sock) as up:
        up.wait_line(r"r-0: exited with code 0")
        up.wait_line(r"r-1: exited with code 0")
        allowed = os.sched_getaffinity(0)
        for i in (0, 1):  # each replica bound as local rank i of 2, its output in its own file
            replica, cpus = (tmp_path / "logs" / f"r-{i}.out").read_text().split(" ", 1)
            assert int(replica) == i and set(json.loads(cpus)) <= allowed
        again = up.ctl("start", "r")  # a program's name: both replicas, ended, run again
        assert again.returncode == 0 and again.stdout.split() == ["r-0:", "started", "r-1:", "started"]
        up.wait_status(lambda s: s["r-0"]["state"] == s["r-1"]["state"] == "ended" and up.count(r"r-1: exited") == 2)
        assert len((tmp_path / "logs" / "r-1.out").read_text().splitlines()) == 2  # appended to
        assert up.ctl("down").returncode == 0
        assert up.wait_exit() == 0


def test_second_sigterm_kills_at_once(tmp_path: Path, sock: Path) -> None:
    stubborn = program("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready'); time.sleep(600)")
    file = _system(tmp_path, stubborn=f"command = {stubborn}\nshutdown = 300")
    with Up(file, sock) as up:
        up.wait_line(r"^\[stubborn\] ready")
        # a line can be pumped before the spawn's completion reaches the supervisor: wait for the pid
        pid = up.wait_status(lambda s: s["stubborn"]["pid"] is not None)["stubborn"]["pid"]
        up.proc.send_signal(signal.SIGTERM)
        up.wait_line(r"SIGTERM: stopping everything")
        start = time.monotonic()
        up.proc.send_signal(signal.SIGTERM)
        assert up.wait_exit() == 0
        assert time.monotonic() - start < 30  # not the 300 s grace
        assert wait_gone([pid]) == []


def test_sigkill_of_up_leaves_nothing(tmp_path: Path, sock: Path) -> None:
    # each program has a grandchild, in its group, and one that left it (its own session)
    tree = program("import os, subprocess, sys, time\n"
                   "subprocess.Popen(['sleep', '600'])\n"
                   "subprocess.Popen(['sleep', '600'], start_new_session=True)\n"
                   "print('ready', flush=True); time.sleep(600)")
    file = _system(tmp_path, t=f"command = {tree}\nreplicas = 2")
    with Up(file, sock) as up:
        up.wait_line(r"^\[t-0\] ready")
        up.wait_line(r"^\[t-1\] ready")
        rows = up.wait_status(lambda s: all(r["pid"] is not None for r in s.values())).values()
        pids = [p.pid for row in rows for p in [psutil.Process(row["pid"])]
                + psutil.Process(row["pid"]).children(recursive=True)]
        assert len(pids) == 6
        everything = [p.pid for p in psutil.Process(up.proc.pid).children(recursive=True)]  # its guardian too
        assert set(pids) <= set(everything)
        up.proc.send_signal(signal.SIGKILL)
        assert up.wait_exit() == -signal.SIGKILL
        assert wait_gone(everything) == []


@pytest.mark.parametrize("body, expected", [
    ("[programs.a]\ncommand = 'true'\nrestart = \n", r"asyncproc.toml:3: TOML syntax error"),
    ("[programs.a]\ncommand = 'true'\nmemroy_limit = '1 GiB'\n", r"asyncproc.toml:3: programs.a.memroy_limit: unknown key"),
    ("[programs.a]\ncommand = 'true'\nmemory_limit = '512 MiBs'\n", r"asyncproc.toml:3: programs.a.memory_limit: expected a size"),
    ("[programs.a]\ncommand = 'true'\nrestart = 'sometimes'\n", r"asyncproc.toml:3: programs.a.restart must be one of 'permanent'"),
])
def test_bad_file_is_refused_before_anything_starts(tmp_path: Path, sock: Path, body: str, expected: str) -> None:
    marker = tmp_path / "started"
    starter = program(f"open({str(marker)!r}, 'w').close()")
    (tmp_path / "asyncproc.toml").write_text(body + f"\n[programs.first]\ncommand = {starter}\n")
    out = subprocess.run([PY, "-m", "asyncproc", "up", "--socket", str(sock), "--no-live"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=BOUND_S)
    assert out.returncode == 2
    assert re.search(expected, out.stderr), out.stderr
    assert not marker.exists() and not sock.exists()


def test_another_users_connection_is_refused(sock: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root, to try as another user")
    shared = Path(tempfile.mkdtemp(prefix="asyncproc-up-test-"))
    try:
        shared.chmod(0o711)  # others may reach the socket; its own mode decides
        path = shared / "up.sock"
        file = _system(Path(tempfile.mkdtemp(dir=shared)), a=f"command = {program(SLEEPER)}")
        with Up(file, path) as up:
            up.wait_line(r"^\[a\] ready")
            assert (path.stat().st_mode & 0o777) == 0o600
            assert _as_nobody(path) == "EACCES"  # the file's mode
            path.chmod(0o666)  # loosened by someone: SO_PEERCRED still refuses
            assert _as_nobody(path).startswith("refused: permission denied")
            assert up.ctl("status").returncode == 0  # the owner still may
            assert up.ctl("down").returncode == 0
            assert up.wait_exit() == 0
    finally:
        subprocess.run(["rm", "-rf", str(shared)], check=False)


def _as_nobody(path: Path) -> str:
    """Connect as user nobody (forked child drops privileges); what happened."""
    nobody = pwd.getpwnam("nobody").pw_uid
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        result = "?"
        try:
            os.setgid(nobody)
            os.setuid(nobody)
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(BOUND_S)
                try:
                    s.connect(str(path))
                except PermissionError:
                    result = "EACCES"
                else:
                    try:
                        s.sendall(b'{"command": "status"}\n')
                    except BrokenPipeError:  # refused before it read: the answer is there
                        pass
                    answer = json.loads(s.makefile().readline())
                    result = "refused: " + answer["error"] if not answer["ok"] else "ALLOWED"
        except BaseException as exc:
            result = f"error {exc!r}"
        os.write(write_end, result.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        result = f.read().decode()
    os.waitpid(pid, 0)
    return result


def _plain(screen: bytes) -> str:
    """What the terminal shows, as text: escape sequences (colours, cursor moves) removed."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.decode(errors="replace"))


def _read_pty(fd: int, until: re.Pattern[str] | None, timeout: float = BOUND_S, out: bytes = b"") -> bytes:
    """Read the terminal (after ``out``) until ``until`` matches its plain text, or to its end."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], deadline - time.monotonic())
        if not ready:
            break
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the other side is closed
            break
        if not data:
            break
        out += data
        if until is not None and until.search(_plain(out)):
            return out
    if until is not None:
        raise AssertionError(f"never saw {until.pattern!r} on the terminal:\n{_plain(out)}")
    return out


def _row(name: str) -> str:
    return rf"{name}\s+│\s+(\d+)\s+│\s+running\s+│"


# One frame's rows (consecutive lines): all three running. Then the next header: the frame is whole.
ALL_RUNNING = re.compile(rf"{_row('web-0')}[^\n]*\n[^\n]*{_row('web-1')}[^\n]*\n[^\n]*{_row('db')}")
ALL_RUNNING_THEN_NEXT = re.compile(ALL_RUNNING.pattern + r"(?s:.*)NAME")
EVERY_READY = re.compile(r"(?s)^(?=.*\[web-0\] ready 0 )(?=.*\[web-1\] ready 1 )(?=.*\[db\] ready )")


def test_live_view_under_a_pty(tmp_path: Path, sock: Path) -> None:
    _system(tmp_path, web=f"command = {program(SLEEPER)}\nreplicas = 2\nshutdown = 2",
                   db=f"command = {program(SLEEPER)}\nshutdown = 2")
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - child
        os.chdir(tmp_path)
        os.environ.update(COLUMNS="110", LINES="40", TERM="xterm")
        os.execv(PY, [PY, "-m", "asyncproc", "up", "--socket", str(sock)])
    terminated = False
    try:
        # the programs' lines printed above the table (each through its own pipe: any order)
        screen = _read_pty(fd, EVERY_READY)
        # the table redrawn until all three are running; the frame goes on to its events,
        # and the next redraw (at most a second later) ends it
        text = _plain(_read_pty(fd, ALL_RUNNING_THEN_NEXT, out=screen))
        rows = ALL_RUNNING.search(text)
        assert rows is not None
        frame = text[text.rindex("NAME", 0, rows.start()):text.index("NAME", rows.end())]
        for header in ("NAME", "PID", "STATE", "UPTIME", "RESTARTS", "CPU %", "RSS", "LAST EXIT"):
            assert header in frame
        # the events beneath agree with the table: each child shown running has its
        # "started" line, with the pid shown, in the same frame
        for name, shown_pid in zip(("web-0", "web-1", "db"), rows.groups()):
            assert f"{name}: started (pid {shown_pid})" in frame, frame
        os.kill(pid, signal.SIGTERM)
        terminated = True
        rest = _read_pty(fd, None)
        assert b"stopped" in rest
    finally:
        code = _end_up_under_pty(pid, fd, terminated)
    assert code == 0


def _end_up_under_pty(pid: int, fd: int, terminated: bool) -> int:
    """Bounded whatever the test got to: SIGTERM ``up`` unless the test did (a second one
    would mean "kill now"), read the terminal to its end (``up`` must never block writing to
    it), SIGKILL it if it is still there BOUND_S later (its guardian ends the programs), reap
    it and them; its exit code."""
    programs: list[int] = []
    with contextlib.suppress(psutil.Error):
        programs = [p.pid for p in psutil.Process(pid).children(recursive=True)]
    try:
        if not terminated:
            os.kill(pid, signal.SIGTERM)
        _read_pty(fd, None)
        _proctree.wait_pids([pid], BOUND_S)  # on a pidfd; a zombie counts as exited
        reaped, status = os.waitpid(pid, os.WNOHANG)
        if not reaped:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
        wait_gone(programs)
    return os.waitstatus_to_exitcode(status)


def test_help_lists_up_and_ctl() -> None:
    out = subprocess.run([PY, "-m", "asyncproc", "--help"], capture_output=True, text=True, timeout=BOUND_S)
    assert out.returncode == 0 and " up " in out.stdout and " ctl " in out.stdout
    missing = ctl(Path("/nonexistent/up.sock"), "status")
    assert missing.returncode == 1 and "no asyncproc up is running" in missing.stderr
