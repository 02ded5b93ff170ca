"""Nothing a handler or a launcher started outlives it, even a descendant that double-forked
and called ``setsid()`` (out of the process group, out of the tree, adopted by a subreaper):
with a cgroup per handler, ``cgroup.kill`` ends it. And no cgroup or temporary folder is left.

The test process is a child subreaper (conftest): orphans come to us, and we reap them.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anyio
import psutil
import pytest

from asyncproc import get_subprocess_handler
from asyncproc._proc import cgroup as _cgroup

PY = sys.executable
BACKENDS = ("asyncio", "uvloop", "trio")

needs_cgroups = pytest.mark.skipif(not _cgroup.available(), reason="cannot create cgroup v2 here (not root?)")

# Starts a helper that double-forks: the middle process exits, the helper calls setsid()
# and writes its pid into $PID_DIR; then says "ready <pid>" and sleeps.
DOUBLE_FORK = textwrap.dedent(
    """
    import os, subprocess, sys, time
    helper = ("import os, sys, time; os.setsid();"
              "open(os.path.join(os.environ['PID_DIR'], str(os.getpid())), 'w').close(); time.sleep(60)")
    middle = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {helper!r}])"
    subprocess.run([sys.executable, "-c", middle], check=True)  # the middle exits at once
    before = set(os.listdir(os.environ["PID_DIR"]))
    while len(os.listdir(os.environ["PID_DIR"])) < int(os.environ.get("EXPECT", "1")):
        time.sleep(0.01)
    print("ready", os.getpid(), flush=True)
    time.sleep(60)
    """
)


def cgroup_of(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        return next(line[3:].strip() for line in f if line.startswith("0::"))


def cgroup_dir(pid: int) -> Path:
    point, _ = _cgroup._v2_mount() or ("/", "/")
    return Path(point) / cgroup_of(pid).lstrip("/")


def pidfds(pids: list[int]) -> dict[int, int]:
    fds = {}
    for pid in pids:
        try:
            fds[pid] = os.pidfd_open(pid)
        except ProcessLookupError:
            pass
    return fds


def wait_dead_and_reap(fds: dict[int, int], timeout: float) -> list[int]:
    """Wait on the pidfds (an event per process) up to ``timeout``; reap those that came to
    us; the pids still alive."""
    deadline = time.monotonic() + timeout
    pending = dict(fds)
    while pending and (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select(list(pending.values()), [], [], left)
        for pid in [pid for pid, fd in pending.items() if fd in ready]:
            pending.pop(pid)
    for fd in fds.values():
        try:
            os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            pass
        os.close(fd)
    return list(pending)


def helper_pids(pid_dir: Path) -> list[int]:
    return [int(name) for name in os.listdir(pid_dir)]


@needs_cgroups
@pytest.mark.anyio
async def test_a_double_forked_setsid_descendant_dies_with_the_handler(anyio_backend: object, tmp_path: Path) -> None:
    env = {"PID_DIR": str(tmp_path)}
    handler = get_subprocess_handler(PY, ["-c", DOUBLE_FORK], env, None, None, 0)
    async with handler:
        leaf = cgroup_dir(handler.pid or 0)
        while not helper_pids(tmp_path):
            await anyio.sleep(0.01)
        (helper,) = helper_pids(tmp_path)
        assert cgroup_of(helper) == cgroup_of(handler.pid or 0)
        fds = pidfds([helper])
        await handler.kill(signal.SIGTERM, grace=5)
    assert not wait_dead_and_reap(fds, timeout=2.0), "the setsid helper outlived kill()"
    assert not leaf.exists(), f"cgroup {leaf} left behind"
    assert not leaf.parent.exists(), f"cgroup {leaf.parent} left behind after the last handler"


LAUNCHED = textwrap.dedent(
    """
    import os
    print("errfile", os.environ["TORCHELASTIC_ERROR_FILE"], flush=True)
    """
) + DOUBLE_FORK


# Without cgroups (ASYNCPROC_NO_CGROUP=1, as where asyncproc may not create them) the
# guardian finds the helpers by the environment entry every child and its descendants carry.
MODES = [pytest.param({}, id="cgroups", marks=needs_cgroups), pytest.param({"ASYNCPROC_NO_CGROUP": "1"}, id="scans")]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkilled_launcher_leaves_no_adopted_helper_no_cgroup_no_folder(
    backend: str, mode: dict[str, str], tmp_path: Path
) -> None:
    # Each rank's helper double-forks and calls setsid(): it is adopted by the launcher (a
    # subreaper), out of every rank's group, session and tree. Then the launcher is SIGKILLed.
    nproc = 2
    launcher = subprocess.Popen(
        [PY, "-m", "asyncproc", "run", "-n", str(nproc), "--backend", backend, "--", PY, "-c", LAUNCHED],
        stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PID_DIR": str(tmp_path), "EXPECT": str(nproc), **mode},
    )
    assert launcher.stdout is not None
    lines = [launcher.stdout.readline() for _ in range(2 * nproc)]
    folder = Path(next(line.split()[-1] for line in lines if "errfile" in line)).parent.parent
    rank = int(next(line.split()[-1] for line in lines if "ready" in line))
    helpers = helper_pids(tmp_path)
    assert len(helpers) == nproc
    assert {psutil.Process(pid).ppid() for pid in helpers} == {launcher.pid}, "not adopted by the launcher"
    base = cgroup_dir(rank).parent  # the launcher's base cgroup, holding one leaf per rank
    children = [p.pid for p in psutil.Process(launcher.pid).children()]  # ranks, helpers, guardian
    fds = pidfds(sorted({*helpers, *children}))
    launcher.kill()
    launcher.wait()
    launcher.stdout.close()
    alive = wait_dead_and_reap(fds, timeout=5.0)  # the guardian exits last, after cleaning up
    assert not alive, f"survived the launcher's SIGKILL: {alive} (helpers {helpers})"
    assert not folder.exists(), f"temporary folder {folder} left behind"
    assert not mode or base == cgroup_dir(os.getpid()).parent, "a cgroup was made with ASYNCPROC_NO_CGROUP=1"
    assert mode or not base.exists(), f"cgroup {base} left behind"


GUARDED = textwrap.dedent(
    """
    import os, sys, anyio
    from asyncproc import get_subprocess_handler
    from asyncproc._subprocess import guardian as _guardian

    async def main():
        handler = get_subprocess_handler(sys.executable, ["-c", sys.argv[2]], {}, None, None, 0)
        await handler.spawn()
        print("child", handler.pid, flush=True)
        print("guardian", _guardian.guardian_pid(), flush=True)
        await anyio.sleep(60)

    backend = sys.argv[1]
    name, options = ("trio", {}) if backend == "trio" else ("asyncio", {"use_uvloop": backend == "uvloop"})
    anyio.run(main, backend=name, backend_options=options)
    """
)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sigkilled_guardian_is_replaced_so_children_still_die_with_the_parent(
    backend: str, mode: dict[str, str], tmp_path: Path
) -> None:
    # Decided behaviour: a guardian's death never kills the children; the parent notices it
    # at once (pidfd) and starts a new guardian, told every registration before it runs.
    # Then the parent is SIGKILLed: its child and the child's double-forked helper die.
    parent = subprocess.Popen([PY, "-c", GUARDED, backend, DOUBLE_FORK], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PID_DIR": str(tmp_path), **mode})
    assert parent.stdout is not None
    child = int(parent.stdout.readline().split()[1])
    first = int(parent.stdout.readline().split()[1])
    while not helper_pids(tmp_path):
        time.sleep(0.01)
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the replacement appears (a state to observe, bounded)
        second = [p.pid for p in psutil.Process(parent.pid).children()
                  if p.pid != first and p.pid != child and p.name() == "asyncproc-srv"]
        if second:
            break
        time.sleep(0.01)
    assert second, "no new guardian after the first was SIGKILLed"
    fds = pidfds([child, *helper_pids(tmp_path), *second])
    parent.kill()
    parent.wait()
    parent.stdout.close()
    assert not wait_dead_and_reap(fds, timeout=5.0)


SCAN_CHILD = "setsid sleep 60 & echo ready; exec sleep 60"


@pytest.mark.anyio
@pytest.mark.parametrize("cgroups", [pytest.param(True, marks=needs_cgroups), False], ids=["cgroups", "scans"])
async def test_stopping_many_handlers_scans_proc_once_per_round_never_on_the_loop(
    anyio_backend: object, monkeypatch: pytest.MonkeyPatch, cgroups: bool
) -> None:
    # 30 handlers stopped at once, each with a setsid grandchild: without cgroups, one
    # shared /proc scan serves all of them per round (not one or more each), and no scan
    # and no spawn ever runs on the event loop's thread (each would hold every task).
    import threading

    from asyncproc._subprocess import handler as _handler

    if not cgroups:
        monkeypatch.setattr(_handler._HANDLERS, "new_leaf", lambda name: None)
    loop_thread = threading.get_ident()
    scans: list[int] = []
    listdir = os.listdir
    popen = subprocess.Popen.__init__

    def counting_listdir(path: object = ".") -> list[str]:
        if path == "/proc":
            scans.append(threading.get_ident())
        return listdir(path)  # type: ignore[arg-type]

    def spying_popen(self: subprocess.Popen[bytes], *args: object, **kwargs: object) -> None:
        if list(args[0])[:1] == ["/bin/sh"]:  # type: ignore[call-overload]  # not the guardian
            scans.append(-threading.get_ident())  # negative: a spawn
        popen(self, *args, **kwargs)  # type: ignore[arg-type]

    handlers, pipes = [], []
    for i in range(30):
        r, w = os.pipe()
        pipes.append(r)
        handlers.append(get_subprocess_handler("/bin/sh", ["-c", SCAN_CHILD], {}, w, None, i))
    monkeypatch.setattr(os, "listdir", counting_listdir)
    monkeypatch.setattr(subprocess.Popen, "__init__", spying_popen)
    try:
        async with anyio.create_task_group() as tg:
            for handler in handlers:
                tg.start_soon(handler.spawn)
        for handler in handlers:
            os.close(handler._stdout_target)  # type: ignore[arg-type]
        for r in pipes:
            await anyio.wait_readable(r)
        spawned = len(scans)
        async with anyio.create_task_group() as tg:
            for handler in handlers:
                tg.start_soon(handler.kill, signal.SIGTERM, 5.0)
    finally:
        monkeypatch.undo()
        for handler in handlers:
            handler.close()
        for r in pipes:
            os.close(r)
    assert all(h.returncode == -signal.SIGTERM for h in handlers)
    assert spawned == 30 and loop_thread not in (-t for t in scans[:spawned]), "spawned on the loop thread"
    assert loop_thread not in scans[spawned:], "a /proc scan ran on the event loop's thread"
    # Per handler: a snapshot and a check after the grace; shared, they are a few rounds.
    assert len(scans) - spawned <= (0 if cgroups else 6), f"{len(scans) - spawned} scans of /proc for 30 kills"


@needs_cgroups
@pytest.mark.anyio
async def test_a_cgroup_still_busy_at_close_is_removed_once_empty(anyio_backend: object, tmp_path: Path) -> None:
    # torch's way: wait() then close(); a member of the child's group is still running at
    # close() (which sends it SIGTERM), so the child's cgroup cannot go yet. Once that member
    # is dead, the next handler's spawn removes it, and the last handler takes ours along.
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    code = 'sleep 60 & echo $!; read x < "$GO"; exit 0'  # exits when told (after the checks)
    r, w = os.pipe()
    first = get_subprocess_handler("/bin/sh", ["-c", code], {"GO": str(fifo)}, w, None, 0)
    await first.spawn()
    os.close(w)
    with os.fdopen(r) as out:
        member = int(out.readline())
        leaf = cgroup_dir(first.pid or 0)
        assert leaf.name.startswith("h") and cgroup_of(member) == cgroup_of(first.pid or 0)
        await anyio.to_thread.run_sync(lambda: fifo.write_text("\n"))
    fds = pidfds([member])
    assert await first.wait() == 0
    first.close()
    assert not wait_dead_and_reap(fds, timeout=5.0)
    async with get_subprocess_handler("/bin/true", [], {}, None, None, 1) as second:
        assert not leaf.exists(), "the abandoned cgroup was not removed by the next spawn"
        await second.wait()
    assert not leaf.parent.exists(), f"cgroup {leaf.parent} left behind after the last handler"


@needs_cgroups
@pytest.mark.anyio
@pytest.mark.parametrize("bad", ["stdout", "stderr"])
async def test_a_spawn_that_cannot_open_its_log_leaves_no_cgroup(anyio_backend: object, tmp_path: Path, bad: str) -> None:
    # A log path that is a folder: the spawn fails before any child exists, and the cgroup
    # made for that child must go with it (it used to stay, one more per failed spawn, for
    # the life of the process, keeping the handlers' cgroup too).
    folder = tmp_path / "log"
    folder.mkdir()
    logs = {"stdout": None, "stderr": None, bad: folder}
    handlers = cgroup_dir(os.getpid()) / f"asyncproc-{os.getpid()}-handlers"  # no handler of ours runs now
    for _ in range(2):
        with pytest.raises(IsADirectoryError):
            await get_subprocess_handler("/bin/true", [], {}, logs["stdout"], logs["stderr"], 0).spawn()
        assert not handlers.exists(), f"cgroups left behind by a failed spawn: {[p.name for p in handlers.iterdir()]}"
