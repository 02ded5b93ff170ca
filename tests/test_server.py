"""The fork server: restarted when it dies, stopped with its caller, told what to preload,
never a reason for a caller to hang, and the subreaper that catches escaped processes."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import psutil
import pytest

import asyncproc
from asyncproc import ChildCrashed, Isolated

from _children import add, assert_gone, runner, start_then

pytestmark = pytest.mark.anyio

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


def _forked_by_a_server(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE or "asyncproc._isolated.server" in " ".join(proc.cmdline())
    except psutil.Error:
        return True  # gone or a zombie: waiting on it costs nothing


def test_fork_server_restarts_after_it_dies() -> None:
    from asyncproc._isolated.link import link

    assert asyncproc.safe_call_sync(add, 1) == 1
    old = link.pid
    assert old is not None
    server = psutil.Process(old)
    workers = server.children()
    os.kill(old, signal.SIGKILL)
    # Its workers die with it (parent-death signal). Outside this harness init reaps them;
    # here the test process is a subreaper, so they are ours to reap. (A call racing the
    # server's death is reported as a crash with an unknown outcome: see the README.)
    while server.status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.01)
    # Re-parented to us before the server became a zombie: also those it forked after the
    # snapshot above (the reserve is refilled in the background once a call has its value).
    workers += [p for p in psutil.Process().children() if p.pid != old and p not in workers and _forked_by_a_server(p)]
    psutil.wait_procs(workers, timeout=5)
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


def test_a_preload_that_exits_does_not_end_the_server() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        assert asyncproc.safe_call_sync(add, 1) == 1
        asyncproc.preload("_exits_on_import")
        assert asyncproc.safe_call_sync(add, 2) == 2
    finally:
        sys.path.remove(str(Path(__file__).parent))


def test_sigterm_to_the_server_still_ends_every_calls_tree(tmp_path: Path) -> None:
    from asyncproc._isolated.link import link

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
    from asyncproc._isolated.link import link

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
    assert len(outcomes) >= 400 - link._reserve_size  # all but the few reserved workers timed out
    # Served once the backlog is cleared (about 2 s here): a generous bound, not a timing.
    assert await Isolated(timeout=30).call(add, 2) == 2



def test_a_preload_does_not_outlive_its_test_with_the_fixture() -> None:
    # The autouse fixture in conftest resets the link after a test that preloads; here,
    # the reset itself: no server, the preloads back to $ASYNCPROC_PRELOAD's.
    from asyncproc._isolated.link import link

    assert asyncproc.safe_call_sync(add, 1) == 1
    asyncproc.preload("json")
    assert "json" in link.preloads and link.pid is not None
    old = link.pid
    link.reset()
    assert link.pid is None and "json" not in link.preloads
    assert_gone(old)
    assert asyncproc.safe_call_sync(add, 2) == 2  # a new server starts on demand


@pytest.mark.parametrize("var", ["ASYNCPROC_RESERVE"])
def test_a_bad_environment_variable_fails_the_first_call_naming_it(var: str) -> None:
    # Read when first needed: importing and looking up asyncproc.safe_call still work.
    code = (
        "import asyncproc, operator\n"
        "call = asyncproc.safe_call_sync\n"
        "try:\n"
        "    call(operator.add, 1, 2)\n"
        "except ValueError as exc:\n"
        "    print('ValueError:', exc)\n"
    )
    env = {**os.environ, var: "two"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"ValueError: ${var} must be a whole number (at least 1), got 'two'"


def test_constructing_isolated_does_no_io() -> None:
    # An audit hook sees every open, spawn and socket: constructing a runner (NUMA binding
    # included: it reads /sys on the first call) must do none of them.
    code = (
        "import sys, asyncproc\n"
        "from asyncproc import numa\n"
        "from asyncproc._isolated import api\n"
        "events = []\n"
        "sys.addaudithook(lambda event, args: events.append(event)"
        " if event.startswith(('open', 'os.', 'socket.', 'subprocess.')) else None)\n"
        "asyncproc.Isolated(timeout=3, numa_options=asyncproc.NumaOptions('node'), local_rank_id=0)\n"
        "asyncproc.Isolated(start_method='spawn', memory_limit=2**30)\n"
        "print(events)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# The server's own loop, one step at a time, in a process of its own (it installs signal
# handlers): worker A's exit is reaped, so A drains; worker B exits; only then does the
# loop's drain round run, and its reaping finds B. Both must be reported (B at the latest
# in the round after). Before the fix that round judged B with A's emptiness list and
# dropped it: B's caller heard nothing until its own timeout (the soak's 19 crashes in
# 21,000 calls that came back as TimeoutError after 10 s).
DRAIN_RACE = r"""
import os, select, sys, time
from asyncproc._isolated import protocol as _protocol, server as _server, worker as _worker

_server._FAULT_FD = os.dup(2)  # as main() sets it: workers inherit faulthandler's target
srv = _server.Server(_protocol.seqpacket_pair()[0], cgroup_root=None)

def start():
    data, data_far = _protocol.seqpacket_pair()
    ctl, ctl_far = _protocol.seqpacket_pair()
    job = srv._fork_worker(ctl_far, data_far)
    srv._register(job)  # the server owns both far ends now, as if sent in a SPAWN
    assert _protocol.recv(ctl).tag == _protocol.HELLO
    return job, data, ctl

def crash(job, data):
    _protocol.send(data, _protocol.CALL, _worker.encode_call(_worker.CallSpec(), (os._exit, (3,), {})))
    os.waitid(os.P_PID, job.pid, os.WEXITED | os.WNOWAIT)  # dead, not reaped: the server reaps

(a, a_data, a_ctl), (b, b_data, b_ctl) = start(), start()
crash(a, a_data)
srv._reap_all()
assert srv.draining == [a]
crash(b, b_data)  # B dies after A's reaping and before the drain round: the race
deadline = time.monotonic() + 5
while srv.draining and time.monotonic() < deadline:
    srv._drain()
for name, data, ctl in (("A", a_data, a_ctl), ("B", b_data, b_ctl)):
    if not select.select([data], [], [], 2)[0] or data.recv(1) != b"":
        sys.exit(f"worker {name}'s caller got no end-of-stream: its exit was never reported")
    exited = _protocol.recv(ctl)
    assert exited is not None and exited.tag == _protocol.EXITED, exited
    assert bytes(exited.body).split()[1] == b"3", bytes(exited.body)
print("ok")
"""


def test_a_worker_dying_during_a_drain_round_is_still_reported() -> None:
    out = subprocess.run([sys.executable, "-c", DRAIN_RACE], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr


async def test_value_calls_leave_no_descriptors_behind() -> None:
    # After a value the caller keeps the call's ctl socket until the server has reported
    # the worker's exit (closing it then wakes nobody); later calls close those. A leak
    # would be a descriptor per call; the reserve and the few not yet reported are not.
    isolated = Isolated()  # calls of a builtin: no worker imports a module per call
    for _ in range(20):
        assert await isolated.call(abs, -1) == 1
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(150):
        assert await isolated.call(abs, -1) == 1
    assert len(os.listdir("/proc/self/fd")) - before < 60


async def test_spawn_calls_keep_no_forked_workers_idle() -> None:
    # The reserve is of forked workers, refilled by "forkserver" calls: a caller that only
    # spawns keeps none of them idle for itself.
    from asyncproc._isolated.link import link

    link.reset()
    for _ in range(2):
        assert await runner("spawn").call(abs, -1) == 1
    assert len(link._reserve) == 0
    assert await Isolated().call(abs, -1) == 1
    assert len(link._reserve) > 0


async def test_a_call_asked_of_a_dying_server_runs_on_a_new_one() -> None:
    # With no worker in reserve, the call's request goes to the server just SIGKILLed: its
    # sockets close a moment before its exit shows, and what it was asked then is lost.
    # That call never ran: it is retried on a new server, never on the dying one again,
    # and returns its value (it used to fail, now and then, as "died before the call
    # reached a worker" when the retry reached the dying server too).
    from asyncproc._isolated.link import link

    for i in range(10):
        assert await asyncproc.safe_call(add, i) == i
        link._drop_reserve()
        server = link.pid
        assert server is not None
        workers = psutil.Process(server).children()
        os.kill(server, signal.SIGKILL)
        assert await asyncproc.safe_call(add, i + 1) == i + 1
        assert link.pid != server
        # Its idle workers die with it; this test process is a subreaper: ours to reap.
        workers += [p for p in psutil.Process().children() if p.pid != link.pid and _forked_by_a_server(p)]
        psutil.wait_procs(workers, timeout=5)


def test_one_spawn_request_for_a_batch_serves_every_pair_it_can(capfd: pytest.CaptureFixture[str]) -> None:
    # The reserve asks for its workers in one SPAWN message, a (ctl, data) pair per worker.
    # A pair the server cannot use (here: not sockets) or whose caller gave up already is
    # closed unanswered, and the pairs around it still get their workers.
    from asyncproc._isolated import protocol as _protocol
    from asyncproc._isolated import worker as _worker
    from asyncproc._isolated.link import link

    link.reset()  # a server of this test's own: its stderr is captured
    try:
        assert asyncproc.safe_call_sync(add, 1) == 1
        good = [(_protocol.seqpacket_pair(), _protocol.seqpacket_pair()) for _ in range(2)]
        gave_up_data, gave_up_data_far = _protocol.seqpacket_pair()
        gave_up_ctl, gave_up_ctl_far = _protocol.seqpacket_pair()
        gave_up_data.close()
        gave_up_ctl.close()
        pipe_r, pipe_w = os.pipe()
        (data0, data0_far), (ctl0, ctl0_far) = good[0]
        (data1, data1_far), (ctl1, ctl1_far) = good[1]
        far = [ctl0_far, data0_far, gave_up_ctl_far, gave_up_data_far, ctl1_far, data1_far]
        fds = [s.fileno() for s in far[:2]] + [pipe_r, pipe_w] + [s.fileno() for s in far[2:]]
        link._send(_protocol.SPAWN, _protocol.FORKED, fds)
        for sock in far:
            sock.close()
        os.close(pipe_r)
        os.close(pipe_w)
        for i, (data, ctl) in enumerate([(data0, ctl0), (data1, ctl1)]):
            data.settimeout(10)
            ctl.settimeout(10)
            _protocol.send(data, _protocol.CALL, _worker.encode_call(_worker.CallSpec(), (add, (i,), {})))
            answer = _protocol.recv(data)
            assert answer is not None and answer.tag == _protocol.VALUE and pickle.loads(answer.body) == i
            hello, exited = _protocol.recv(ctl), _protocol.recv(ctl)
            assert hello is not None and hello.tag == _protocol.HELLO
            assert exited is not None and exited.tag == _protocol.EXITED
            data.close()
            ctl.close()
        assert asyncproc.safe_call_sync(add, 7) == 7  # and the server serves on
        assert "could not start a worker" in capfd.readouterr().err
    finally:
        link.reset()


async def test_calls_reaching_workers_killed_while_idle_run_elsewhere() -> None:
    # Idle reserved workers SIGKILLed from outside (the OOM killer, a pkill) as a call
    # reaches one of them: the kernel may hand the call to the dying worker's recvmsg,
    # which never returns to run it. The server reports such a worker unstarted (it never
    # took its running name), and the call runs on another: never a ChildCrashed for a
    # call that never ran. (Before: 1 or 2 calls in 8 rounds failed so.)
    isolated = Isolated()
    for i in range(12):
        assert await isolated.call(abs, -i) == i
        for proc in psutil.Process().children(recursive=True):
            try:
                if proc.name() == "asyncproc-idle":
                    proc.kill()
            except psutil.NoSuchProcess:
                pass
        assert await isolated.call(abs, -i - 1) == i + 1
