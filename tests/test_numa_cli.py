"""``asyncproc numa``: the topology and per-rank CPU table, read from fake /sys trees."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import pytest

from asyncproc import _cli
from asyncproc._numa import cli as _numa_cli

from numa_sysfs import DGX_GPUS, build_sysfs, gpus


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="asyncproc numa")
    _numa_cli.configure_parser(parser)
    code = _numa_cli.cli(parser.parse_args(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def dgx_tree(tmp_path: Path) -> Path:
    shape = dict(sockets=2, nodes_per_socket=2, caches_per_node=2, cores_per_cache=2, threads_per_core=2)
    return build_sysfs(tmp_path / "sys", pci=DGX_GPUS, **shape)  # type: ignore[arg-type]


def test_the_command_is_wired_into_the_cli() -> None:
    assert importlib.import_module(_cli._COMMANDS["numa"][0], "asyncproc") is _numa_cli


def test_shows_topology_and_every_mode_per_gpu(capsys: pytest.CaptureFixture[str], dgx_tree: Path) -> None:
    code, out, _ = run(capsys, "--sysfs", str(dgx_tree))
    assert code == 0
    assert "2 sockets, 4 nodes, 16 physical cores, 32 CPUs, 5 GPUs" in out
    assert "0     0       0-3,16-19    4      yes     0-1,16-17  2-3,18-19      0000:17:00.0 NVIDIA, 0000:3a:00.0 NVIDIA" in out
    assert "Allowed CPUs: 0-31 (every CPU of the --sysfs tree)" in out
    assert "CPUs for 5 local ranks (one per visible GPU):" in out
    ranks = out.split("CPUs for 5 local ranks (one per visible GPU):\n")[1].splitlines()
    assert [line.split() for line in ranks] == [
        ["rank", "GPU", "on", "node", "node", "socket", "exclusive", "core-complex"],
        ["0", "0000:17:00.0", "0", "0-3,16-19", "0-7,16-23", "0-1,16-17", "0-1,16-17"],
        ["1", "0000:3a:00.0", "0", "0-3,16-19", "0-7,16-23", "2-3,18-19", "2-3,18-19"],
        ["2", "0000:86:00.0", "2", "8-11,24-27", "8-15,24-31", "8-11,24-27", "8-9,24-25"],
        ["3", "0000:af:00.0", "3", "12-15,28-31", "8-15,24-31", "12-15,28-31", "12-13,28-29"],
        ["4", "0001:00:00.0", "1", "4-7,20-23", "0-7,16-23", "4-7,20-23", "4-5,20-21"],
    ]


def test_one_mode_without_gpus_with_allowed_and_nproc(
    capsys: pytest.CaptureFixture[str], dgx_tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    # Socket 1 is outside the allowed set, so the four ranks share the nodes of socket 0.
    code, out, _ = run(capsys, "--sysfs", str(dgx_tree), "--nproc", "4", "--mode", "exclusive", "--allowed", "0-7,16-23")
    assert code == 0
    assert "CUDA_VISIBLE_DEVICES: ''" in out and "Allowed CPUs: 0-7,16-23 (--allowed)" in out
    ranks = out.split("CPUs for 4 local ranks (--nproc):\n")[1].splitlines()
    assert [line.split() for line in ranks] == [
        ["rank", "on", "node", "exclusive"],
        ["0", "0", "0-1,16-17"],
        ["1", "0", "2-3,18-19"],
        ["2", "1", "4-5,20-21"],
        ["3", "1", "6-7,22-23"],
    ]


def test_a_mode_that_cannot_be_satisfied_is_footnoted_and_fails(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    tree = build_sysfs(tmp_path, cores_per_cache=2, pci=gpus(("0000:01:00.0", 0), ("0000:02:00.0", 0), ("0000:03:00.0", 0)))
    code, out, _ = run(capsys, "--sysfs", str(tree), "--mode", "exclusive")
    assert code == 1
    assert "0     0000:01:00.0  0        error [1]" in out
    assert "[1] exclusive mode needs a physical core for each of the 3 ranks on NUMA node 0" in out
    # The overview of every mode reports the same failure but succeeds: it is a report.
    assert run(capsys, "--sysfs", str(tree))[0] == 0


def test_this_machine(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys)
    assert code == 0
    assert out.startswith("NUMA topology under /sys\n")
    assert "(this process's CPU affinity)" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nproc", "0"], "argument --nproc: must be a positive integer, got '0'"),
        (["--allowed", "x"], "argument --allowed: not a CPU list: 'x'"),
        (["--mode", "numa"], "argument --mode: invalid choice: 'numa'"),
    ],
)
def test_bad_arguments(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit):
        run(capsys, *argv)
    assert message in capsys.readouterr().err


def test_a_missing_tree_is_an_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = run(capsys, "--sysfs", str(tmp_path / "nowhere"))
    assert (code, out) == (2, "")
    assert "asyncproc numa: cannot read the CPU topology under" in err and "no such folder" in err
