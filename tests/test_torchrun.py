"""``asyncproc run`` as a drop-in for torchrun: restarts, several nodes, torchrun's
environment, options and signals, and bad values refused before any rank starts."""

from __future__ import annotations

import argparse
import enum
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import asyncproc
from asyncproc import LaunchConfig, start_processes
from asyncproc._launch import cli as _runcli

PY = sys.executable
LAUNCHER = [PY, "-m", "asyncproc", "run"]
BASE_ENV = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "SLURM_", "TORCHELASTIC_"))}

# A rank that prints torchrun's variables as one JSON line.
SHOW_ENV = """
import json, os, sys
keys = ["LOCAL_RANK", "RANK", "GROUP_RANK", "ROLE_RANK", "ROLE_NAME", "LOCAL_WORLD_SIZE", "WORLD_SIZE",
        "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT",
        "ASYNCPROC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID",
        "TORCHELASTIC_USE_AGENT_STORE", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "OMP_NUM_THREADS",
        "TORCHELASTIC_ERROR_FILE", "CUDA_VISIBLE_DEVICES", "TORCHELASTIC_SIGNALS_TO_HANDLE"]
print(json.dumps({k: os.environ.get(k) for k in keys}), flush=True)
"""


def rank_code(code: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(code)]


def launch(*args: str, env: dict[str, str] | None = None, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LAUNCHER, *args], capture_output=True, text=True, timeout=timeout,
                          env={**BASE_ENV, **(env or {})}, **kw)


def envs_of(stdout: str) -> dict[int, dict[str, str]]:
    """Each rank's SHOW_ENV line, by RANK (the console prefix stripped)."""
    found = {}
    for line in stdout.splitlines():
        seen = json.loads(line[line.index("{"):])
        found[int(seen["RANK"])] = seen
    return found


def config_of(*argv: str, env: dict[str, str] | None = None) -> tuple[LaunchConfig, list[str]]:
    parser = argparse.ArgumentParser()
    _runcli.configure_parser(parser)
    config, command, _ = _runcli._config(parser.parse_args(argv), env or {})
    return config, command


# -- elastic restarts ---------------------------------------------------------------------------

# Rank 1 fails in every attempt below argv[1], once rank 0 has printed its line (a FIFO per
# attempt in argv[2]: opening it blocks until the other side opens it), so no line is lost
# to rank 0 being stopped before it printed.
RESTARTING = """
import os, sys, time
attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
assert os.environ["ASYNCPROC_RESTART_COUNT"] == str(attempt)
print(os.environ["RANK"], attempt, os.environ["TORCHELASTIC_MAX_RESTARTS"], flush=True)
if attempt < int(sys.argv[1]):
    fifo = os.path.join(sys.argv[2], f"attempt{attempt}")
    if os.environ["RANK"] == "1":
        open(fifo).close()
        sys.exit(3)
    open(fifo, "w").close()
    time.sleep(60)  # stopped when rank 1 fails
"""


def fifos(folder: Path, count: int) -> str:
    folder.mkdir()
    for attempt in range(count):
        os.mkfifo(folder / f"attempt{attempt}")
    return str(folder)


@pytest.mark.anyio
async def test_a_failing_group_restarts_twice_then_succeeds(anyio_backend: object, tmp_path: Path) -> None:
    config = LaunchConfig(nproc=2, max_restarts=2, log_dir=tmp_path, run_id="job", grace=2)
    result = await start_processes([*rank_code(RESTARTING), "2", fifos(tmp_path / "sync", 2)], config)
    assert result.exit_code == 0 and result.restarts == 2 and result.run_id == "job"
    for attempt in range(3):  # every attempt's logs in their own folder
        for rank in (0, 1):
            log = tmp_path / "job" / f"attempt_{attempt}" / str(rank) / "stdout.log"
            assert log.read_text() == f"{rank} {attempt} 2\n"
    # The same run id again never overwrites the first run's logs.
    again = await start_processes([*rank_code(RESTARTING), "0", "-"], config)
    assert again.exit_code == 0 and again.restarts == 0
    assert again.ranks[0].stdout_log == tmp_path / "job.1" / "attempt_0" / "0" / "stdout.log"
    assert (tmp_path / "job" / "attempt_0" / "0" / "stdout.log").read_text() == "0 0 2\n"


def test_exhausting_the_restarts_keeps_the_rank_exit_code(tmp_path: Path) -> None:
    done = launch("-n", "2", "--max-restarts", "1", "--grace", "2", "--", *rank_code(RESTARTING), "5",
                  fifos(tmp_path / "sync", 2))
    assert done.returncode == 3, done.stderr
    assert "rank 1 (pid" in done.stderr and "exited with code 3; restarting every rank (restart 1 of 1)" in done.stderr
    assert "failed: it exited with code 3" in done.stderr and "after 1 restart(s) of every rank" in done.stderr
    assert sorted(done.stdout.splitlines()) == ["[rank0]: 0 0 1", "[rank0]: 0 1 1", "[rank1]: 1 0 1", "[rank1]: 1 1 1"]


# -- several nodes -----------------------------------------------------------------------------

TWO_NODES = """
import os, socket, time
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
addr = (os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
if rank == 0:
    server = socket.create_server(addr)  # SO_REUSEADDR, as torch's TCPStore
    seen = []
    for _ in range(world - 1):
        conn, _ = server.accept()
        seen.append(conn.makefile().readline().strip())
        conn.close()
    print("rank 0 heard", ",".join(sorted(seen)), flush=True)
else:
    deadline = time.monotonic() + 30
    while True:  # rank 0 may not listen yet: the protocol itself retries, as TCPStore does
        try:
            conn = socket.create_connection(addr)
            break
        except ConnectionRefusedError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    conn.sendall(f"{rank}/{os.environ['GROUP_RANK']}/{os.environ['LOCAL_RANK']}\\n".encode())
    conn.close()
"""


def test_two_nodes_on_this_machine_reach_rank_0_through_master_addr_and_port(tmp_path: Path) -> None:
    script = tmp_path / "YOUR_TRAINING_SCRIPT.py"
    script.write_text(textwrap.dedent(TWO_NODES))
    # The test holds the port as the launcher does, so nothing else takes it meanwhile.
    with socket.socket() as hold:
        hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        hold.bind(("127.0.0.1", 0))
        port = str(hold.getsockname()[1])
        nodes = [
            subprocess.Popen(  # torch's documented multi-node static command line, node by node
                [*LAUNCHER, "--nproc-per-node=2", "--nnodes=2", f"--node-rank={node}", "--master-addr=127.0.0.1",
                 f"--master-port={port}", str(script), "--arg1"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=BASE_ENV,
            )
            for node in (1, 0)
        ]
        outs = [node.communicate(timeout=60) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outs
    assert outs[1][0] == "[rank0]: rank 0 heard 1/0/1,2/1/0,3/1/1\n"


SLURM = {"SLURM_JOB_NUM_NODES": "3", "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "gpu-a[07-08,11]", "SLURM_JOB_ID": "4242"}
PET = {"PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_MASTER_ADDR": "10.1.2.3", "PET_MASTER_PORT": "23456",
       "PET_NPROC_PER_NODE": "2"}


@pytest.mark.parametrize(
    ("env", "args", "ranks", "world", "group", "master"),
    [
        (SLURM, ["-n", "2"], [4, 5], 6, "2", "gpu-a07:29500"),
        (PET, [], [2, 3], 4, "1", "10.1.2.3:23456"),
        ({**SLURM, **PET}, [], [2, 3], 4, "1", "10.1.2.3:23456"),  # torchrun's own variables first
        ({**SLURM, **PET}, ["--node-rank", "0", "--master-port", "1234"], [0, 1], 4, "0", "10.1.2.3:1234"),
    ],
    ids=["slurm", "pet", "pet-over-slurm", "options-over-both"],
)
def test_slurm_and_pet_variables_give_global_ranks(
    env: dict[str, str], args: list[str], ranks: list[int], world: int, group: str, master: str
) -> None:
    done = launch(*args, "--", *rank_code(SHOW_ENV), env=env)
    assert done.returncode == 0, done.stderr
    seen = envs_of(done.stdout)
    assert sorted(seen) == ranks
    for local, rank in enumerate(ranks):
        assert seen[rank]["LOCAL_RANK"] == str(local) and seen[rank]["GROUP_RANK"] == group
        assert seen[rank]["WORLD_SIZE"] == seen[rank]["ROLE_WORLD_SIZE"] == str(world)
        assert seen[rank]["GROUP_WORLD_SIZE"] == str(world // 2 if env is not SLURM else 3)
        assert f"{seen[rank]['MASTER_ADDR']}:{seen[rank]['MASTER_PORT']}" == master
    if env is SLURM:
        assert seen[4]["TORCHELASTIC_RUN_ID"] == "4242"
        # A stray SLURM_* or PET_* variable changes the layout: the launcher says where it came from.
        assert ("asyncproc run: node 2 of 3, ranks 4-5 of 6, rank 0 at gpu-a07:29500; taken from the environment: "
                "--nnodes (from Slurm), --node-rank (from Slurm), --master-addr (from Slurm)") in done.stderr


# -- torchrun's environment and command line ----------------------------------------------------


def test_every_rank_gets_torchruns_environment(tmp_path: Path) -> None:
    done = launch("--standalone", "--nnodes=1", "--nproc-per-node=2", "--role", "trainer", "--max-restarts", "3", "--virtual-local-rank",
                  "--", *rank_code(SHOW_ENV), env={"CUDA_VISIBLE_DEVICES": "5,7"})
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [f"asyncproc run: {_runcli.OMP_NOTICE}"]  # torchrun's notice, one line
    seen = envs_of(done.stdout)
    run_id = seen[0]["TORCHELASTIC_RUN_ID"]
    assert run_id and seen[1]["TORCHELASTIC_RUN_ID"] == run_id
    for rank in (0, 1):
        assert seen[rank] | {"TORCHELASTIC_RUN_ID": None, "MASTER_PORT": None, "TORCHELASTIC_ERROR_FILE": None} == {
            "LOCAL_RANK": "0", "RANK": str(rank), "GROUP_RANK": "0", "ROLE_RANK": str(rank), "ROLE_NAME": "trainer",
            "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "1", "ROLE_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": None, "TORCHELASTIC_RESTART_COUNT": "0",
            "ASYNCPROC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_RUN_ID": None,
            "TORCHELASTIC_USE_AGENT_STORE": "False", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "OMP_NUM_THREADS": "1",
            "TORCHELASTIC_ERROR_FILE": None, "CUDA_VISIBLE_DEVICES": "57"[rank],
            "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT",
        }
        assert seen[rank]["TORCHELASTIC_ERROR_FILE"].endswith(f"/attempt_0/{rank}/error.json")
    # Set by the user: kept, and no notice. One rank: not set at all.
    kept = launch("-n", "2", "--", *rank_code(SHOW_ENV), env={"OMP_NUM_THREADS": "3", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "0"})
    assert kept.stderr == "" and {e["OMP_NUM_THREADS"] for e in envs_of(kept.stdout).values()} == {"3"}
    assert {e["TORCH_NCCL_ASYNC_ERROR_HANDLING"] for e in envs_of(kept.stdout).values()} == {"0"}
    single = launch("-n", "1", "--", *rank_code(SHOW_ENV))
    assert single.stderr == "" and envs_of(single.stdout)[0]["OMP_NUM_THREADS"] is None


SHOW_START = "import os, sys; print(sys.executable, sys.orig_argv[1:], __name__, os.environ['RANK'], flush=True)"


def test_script_module_and_no_python_forms(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(SHOW_START)
    py = launch("-n", "1", str(script), "--lr", "1")  # a .py runs under the launcher's own Python, -u
    assert py.returncode == 0, py.stderr
    assert py.stdout == f"[rank0]: {PY} ['-u', '{script}', '--lr', '1'] __main__ 0\n"
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "train.py").write_text(SHOW_START)
    mod = launch("-n", "1", "-m", "pkg.train", "x", env={"PYTHONPATH": str(tmp_path)})
    assert mod.stdout == f"[rank0]: {PY} ['-u', '-m', 'pkg.train', 'x'] __main__ 0\n", mod.stderr
    exe = tmp_path / "tool.py"
    exe.write_text(f"#!{PY}\n{SHOW_START}")
    exe.chmod(0o755)
    raw = launch("-n", "1", "--no-python", str(exe))  # run as it is: through its #! line, no -u
    assert raw.stdout == f"[rank0]: {PY} ['{exe}'] __main__ 0\n", raw.stderr


def test_nproc_per_node_auto_cpu_and_gpu() -> None:
    cpus = len(os.sched_getaffinity(0))
    done = launch("--nproc-per-node", "cpu", "--no-python", "true", env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0 and f"--nproc-per-node cpu: {cpus} local rank(s)" in done.stderr
    gpus = _runcli._gpu_count()
    auto = launch("--nproc_per_node=auto", "--no-python", "true", env={"OMP_NUM_THREADS": "1"})
    assert auto.returncode == 0 and f"auto: {gpus or cpus} local rank(s)" in auto.stderr
    if not gpus:
        gpu = launch("--nproc-per-node", "gpu", "--no-python", "true")
        assert gpu.returncode == 2 and "--nproc-per-node 'gpu': no GPU found" in gpu.stderr


OUT_AND_ERR = "import os, sys; r = os.environ['RANK']; print('out', r); print('err', r, file=sys.stderr)"


def test_redirects_tee_per_stream_and_rank_filter_and_prefix(tmp_path: Path) -> None:
    done = launch("-n", "2", "--log-dir", str(tmp_path), "--run-id", "r", "-r", "0:1", "-t", "1:2", "--role", "w",
                  "--log-line-prefix-template", "<${role_name}:${rank}/${local_rank}> ", "--", *rank_code(OUT_AND_ERR),
                  env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    # rank 0: stdout to its file only, stderr to the console only; rank 1: stdout to the
    # console only, stderr to its file and the console.
    assert done.stdout == "<w:1/1> out 1\n"
    assert sorted(done.stderr.splitlines()) == ["<w:0/0> err 0", "<w:1/1> err 1"]
    logs = tmp_path / "r" / "attempt_0"
    assert sorted(str(p.relative_to(logs)) for p in logs.rglob("*.log")) == ["0/stdout.log", "1/stderr.log"]
    assert (logs / "0" / "stdout.log").read_text() == "out 0\n" and (logs / "1" / "stderr.log").read_text() == "err 1\n"
    filtered = launch("-n", "2", "--local-ranks-filter", "1", "--", *rank_code(OUT_AND_ERR), env={"OMP_NUM_THREADS": "1"})
    assert (filtered.stdout, filtered.stderr) == ("[rank1]: out 1\n", "[rank1]: err 1\n")
    # torchrun's log line prefix variable works too; -r 3 sends everything to the files.
    quiet = launch("-n", "1", "--log-dir", str(tmp_path), "--run-id", "q", "-r", "3", "--", *rank_code(OUT_AND_ERR),
                   env={"TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": "${rank}| "})
    assert (quiet.stdout, quiet.stderr) == ("", "")
    assert (tmp_path / "q" / "attempt_0" / "0" / "stderr.log").read_text() == "err 0\n"
    teed = launch("-n", "1", "--log-dir", str(tmp_path), "--run-id", "t", "--tee", "1", "--", *rank_code(OUT_AND_ERR),
                  env={"TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE": "${rank}| "})
    assert (teed.stdout, teed.stderr) == ("0| out 0\n", "0| err 0\n")


def test_the_chosen_master_port_is_held_until_rank_0_takes_it() -> None:
    code = """
        import errno, os, socket
        port = int(os.environ["MASTER_PORT"])
        plain = socket.socket()
        try:
            plain.bind(("127.0.0.1", port))  # without SO_REUSEADDR: the launcher still holds it
            print("taken by someone else")
        except OSError as exc:
            print("held", exc.errno == errno.EADDRINUSE)
        server = socket.create_server(("127.0.0.1", port))  # SO_REUSEADDR, as torch's TCPStore
        print("rank 0 listens", server.getsockname()[1] == port)
        """
    done = launch("-n", "1", "--", *rank_code(code))
    assert done.stdout.splitlines() == ["[rank0]: held True", "[rank0]: rank 0 listens True"], done.stderr


# -- signals -------------------------------------------------------------------------------------

WAIT_FOR_SIGNAL = """
import os, signal, sys, time
sig = signal.Signals[sys.argv[1]]
signal.signal(sig, lambda *_: (print("got", sig.name, flush=True), os._exit(0)))
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize(
    ("sig", "args"),
    [(signal.SIGHUP, []), (signal.SIGQUIT, []), (signal.SIGUSR1, ["--signals-to-handle", "SIGUSR1,SIGTERM"]),
     (signal.SIGTERM, ["--max-restarts", "3"])],
    ids=["SIGHUP", "SIGQUIT", "SIGUSR1-configured", "SIGTERM-no-restart"],
)
def test_each_handled_signal_is_forwarded_with_summary_and_code(sig: signal.Signals, args: list[str], tmp_path: Path) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    launcher = subprocess.Popen(
        [*LAUNCHER, "-n", "2", "--grace", "5", *args, "--", *rank_code(WAIT_FOR_SIGNAL), sig.name],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**BASE_ENV, "TMPDIR": str(temp)},
    )
    assert launcher.stdout is not None
    lines = [launcher.stdout.readline() for _ in range(2)]
    assert sorted(lines) == ["[rank0]: ready\n", "[rank1]: ready\n"]
    launcher.send_signal(sig)
    out, err = launcher.communicate(timeout=30)
    assert launcher.returncode == 128 + sig, err
    assert sorted(out.splitlines()) == [f"[rank0]: got {sig.name}", f"[rank1]: got {sig.name}"]
    assert f"interrupted by {sig.name}" in err and "Traceback" not in err and "restarting" not in err
    assert list(temp.iterdir()) == []  # the temporary folder is gone


# -- @record -----------------------------------------------------------------------------------


def test_record_leaves_the_python_stack_of_a_segfaulting_rank() -> None:
    code = """
        import ctypes, asyncproc

        def deep_in_the_model():
            ctypes.string_at(0)

        @asyncproc.record
        def main():
            deep_in_the_model()

        main()
        """
    done = launch("-n", "1", "--", *rank_code(code))
    assert done.returncode == 128 + signal.SIGSEGV
    assert "[rank0]: Fatal Python error: Segmentation fault" in done.stderr
    assert "in deep_in_the_model" in done.stderr and "in main" in done.stderr


# -- bad values ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--log-dir", "/proc/nope"], "--log-dir '/proc/nope': cannot create it: No such file or directory"),
        (["--tee", "3"], "--tee '3': needs --log-dir"),
        (["-r", "1"], "--redirects '1': needs --log-dir"),
        (["--log-dir", "{tmp}", "--tee", "bogus"], "--tee 'bogus': must be 0-3"),
        (["--log-dir", "{tmp}", "-r", "5:1"], "--redirects '5:1': names local rank 5, but there are only 1"),
        (["-n", "0"], "--nproc-per-node '0': must be >= 1"),
        (["-n", "two"], "--nproc-per-node 'two': is not a whole number"),
        (["--nproc-per-node", "xpu"], "--nproc-per-node 'xpu': Intel XPUs"),
        (["--nnodes", "1:4"], "--nnodes '1:4': an elastic range of nodes needs a rendezvous"),
        (["--nnodes", "2", "--node-rank", "2"], "--node-rank '2': must be below --nnodes (2)"),
        (["--master-port", "70000"], "--master-port '70000': must be in 1..65535"),
        (["--max-restarts", "-1"], "--max-restarts '-1': must be >= 0"),
        (["--nnodes", "2", "--max-restarts", "1"], "--max-restarts '1': restarting several nodes together needs a rendezvous"),
        (["--nnodes", "2", "--rdzv-backend", "c10d"], "--rdzv-backend 'c10d': asyncproc run has no rendezvous"),
        (["--nnodes", "2", "--standalone"], "--nnodes '2': --standalone runs one node"),
        (["--signals-to-handle", "SIGKILL"], "--signals-to-handle 'SIGKILL': SIGKILL cannot be caught"),
        (["--signals-to-handle", "SIGFOO"], "--signals-to-handle 'SIGFOO': 'SIGFOO' is not a signal name"),
        (["-n", "2", "--local-ranks-filter", "0,5"], "--local-ranks-filter '0,5': local ranks are 0..1"),
        (["--log-line-prefix-template", "${host}"], "--log-line-prefix-template '${host}': may use only ${rank}, ${local_rank} and ${role_name}"),
        (["-m", "--no-python"], "--module: cannot be used with --no-python"),
        (["--grace", "-1"], "--grace '-1': must be >= 0"),
        (["--grace", "nan"], "--grace 'nan': must be >= 0"),
        (["--grace", "inf"], "--grace 'inf': must be finite"),
        (["--logs-specs", "mine"], "--logs-specs 'mine': asyncproc has no LogsSpecs plugins"),
        (["--rdzv-id", "a/b"], "--rdzv-id 'a/b': must be a name without '/'"),
        (["--monitor-interval", "often"], "--monitor-interval 'often': is not a number of seconds"),
        (["--event-log-handler", "console"], "--event-log-handler 'console': asyncproc has no event log handlers"),
        (["--duplicate-stdout-filters", "loss"], "--duplicate-stdout-filters 'loss': not supported"),
    ],
)
def test_bad_option_values_are_refused_naming_option_value_and_reason(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "ran"
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    code = _runcli.main([*argv, "--", "touch", str(marker)])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not marker.exists()


def test_a_file_as_log_dir_and_too_many_ranks_are_refused_before_any_rank_starts(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    a_file = tmp_path / "passwd"
    a_file.write_text("")
    done = launch("--log-dir", str(a_file), "--no-python", "touch", str(marker))
    assert done.returncode == 2 and done.stderr == f"asyncproc run: --log-dir '{a_file}': is not a folder\n"

    def low_fd_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    many = launch("-n", "100000", "--no-python", "touch", str(marker), preexec_fn=low_fd_limit)
    assert many.returncode == 2
    assert many.stderr.startswith("asyncproc run: --nproc-per-node '100000': needs about 600064 open files, and the limit is 1024")
    assert not marker.exists()


def test_uvloop_backend_without_uvloop_says_how_to_install_it() -> None:
    code = "import sys; sys.modules['uvloop'] = None; from asyncproc._cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run([PY, "-c", code, "run", "--backend", "uvloop", "--no-python", "true"],
                          capture_output=True, text=True, timeout=60, env=BASE_ENV)
    assert done.returncode == 2
    assert done.stderr == f"asyncproc run: --backend 'uvloop': uvloop is not installed; install it with `{PY} -m pip install uvloop`\n"


# -- option parsing, in-process ------------------------------------------------------------------


def test_torchrun_spellings_and_defaults() -> None:
    config, command = config_of("--nproc_per_node=3", "--standalone", "--rdzv_backend=c10d", "--rdzv-endpoint=localhost:0",
                                "--shutdown-timeout", "7", "--numa-binding", "node", "--monitor-interval", "1",
                                "--start-method", "fork", "--rdzv-id", "job", "train.py", "--lr", "1")
    assert (config.nproc, config.nnodes, config.master_port, config.grace, config.run_id) == (3, 1, None, 7.0, "job")
    assert config.numa_options.affinity_mode.value == "node"
    assert command == [PY, "-u", "train.py", "--lr", "1"]
    static, _ = config_of("--nnodes=2", "--node_rank=1", "--rdzv-endpoint", "10.0.0.9:29400", "true")
    assert (static.master_addr, static.master_port, static.node_rank) == ("10.0.0.9", 29400, 1)
    default_port, _ = config_of("--nnodes", "2", "--master-addr", "n0", "true")
    assert default_port.master_port == 29500  # torchrun's, when several nodes must agree
    from_env, command = config_of("mod", env={"PET_NPROC_PER_NODE": "2", "PET_MAX_RESTARTS": "4", "PET_MODULE": "1",
                                       "PET_SHUTDOWN_TIMEOUT": "3", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "9"})
    assert (from_env.nproc, from_env.max_restarts, from_env.grace) == (2, 4, 3.0) and command[:3] == [PY, "-u", "-m"]
    _, command = config_of("--run-path", "/abs/train.py", "x", env={"PYTHON_EXEC": "/opt/py"})
    assert command == ["/opt/py", "-u", "/abs/train.py", "x"]  # a process per rank either way
    parser = argparse.ArgumentParser()
    _runcli.configure_parser(parser)
    _, _, notices = _runcli._config(parser.parse_args(["--rdzv-conf", "timeout=9", "--local-addr", "n1", "true"]), {})
    assert notices == ["asyncproc run: --rdzv-conf and --local-addr are ignored: they configure a rendezvous"]
    elastic_timeout, _ = config_of("true", env={"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "9"})
    assert elastic_timeout.grace == 9.0 and elastic_timeout.signals == (
        signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"nproc": 1, "nnodes": 2}, "master_port must be given when nnodes > 1"),
     ({"nproc": 1, "nnodes": 2, "node_rank": 2, "master_port": 1}, r"node_rank must be < nnodes \(2\), got 2"),
     ({"nproc": 2, "tee": 1}, "tee=1 needs log_dir"),
     ({"nproc": 2, "log_dir": "/tmp", "redirects": {2: 1}}, "redirects must map local ranks in 0..1"),
     ({"nproc": 2, "local_ranks_filter": frozenset({3})}, "local_ranks_filter must name local ranks in 0..1"),
     ({"nproc": 1, "max_restarts": -1}, "max_restarts must be >= 0, got -1"),
     ({"nproc": 1, "run_id": "a/b"}, "run_id must be a non-empty name without '/'"),
     ({"nproc": 1, "signals": (signal.SIGKILL,)}, "signals cannot include SIGKILL"),
     ({"nproc": 1, "signals": ("TERM",)}, "signals must be signal numbers or signal.Signals")],
)
def test_bad_launch_configs_are_named(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LaunchConfig(**kwargs)


# -- porting from torch ------------------------------------------------------------------------------


class TorchAffinityMode(str, enum.Enum):  # the shape of torch.numa.binding's
    NODE = "node"


class TorchNumaOptions:
    def __init__(self, affinity_mode: TorchAffinityMode, should_fall_back_if_binding_fails: bool = False):
        self.affinity_mode = affinity_mode
        self.should_fall_back_if_binding_fails = should_fall_back_if_binding_fails


def test_handlers_take_torchs_numa_options_and_local_world_size() -> None:
    handler = asyncproc.get_subprocess_handler(
        "true", [], {}, None, None, 1, TorchNumaOptions(TorchAffinityMode.NODE, True), local_world_size=2
    )
    assert handler.numa_options == asyncproc.NumaOptions("node", True) and handler.local_world_size == 2
    with pytest.raises(TypeError, match="numa_options must be a NumaOptions, got 'node'"):
        asyncproc.get_subprocess_handler("true", [], {}, None, None, 0, "node")


# -- torch itself, when installed ---------------------------------------------------------------------


def test_torch_sees_a_torchelastic_launch_and_gloo_all_reduce_works() -> None:
    pytest.importorskip("torch")
    code = """
        import torch, torch.distributed as dist
        assert dist.is_torchelastic_launched()
        dist.init_process_group("gloo")
        t = torch.tensor([dist.get_rank() + 1])
        dist.all_reduce(t)
        print("sum", int(t), flush=True)
        dist.destroy_process_group()
        """
    done = launch("-n", "2", "--", *rank_code(code), timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()) == ["[rank0]: sum 3", "[rank1]: sum 3"]
