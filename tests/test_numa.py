"""NUMA binding: the CPU sets each mode chooses on fake /sys trees of several shapes, the
errors and the fallback, and real bindings of real children on this machine."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import pickle
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

import asyncproc
from asyncproc import AffinityMode, NumaOptions
from asyncproc.numa import Binding, NumaBindingError, Topology, binding_for, cpus_for, format_cpulist, parse_cpulist

from numa_sysfs import ACCELERATOR, AMD, DGX_GPUS, DISPLAY_OTHER, Pci, build_sysfs, gpus

NODE, SOCKET, EXCLUSIVE, CORE_COMPLEX = (NumaOptions(mode) for mode in AffinityMode)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # The machine running the tests may set these; each test sets what it means to.
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)


def cpus(text: str) -> frozenset[int]:
    return parse_cpulist(text)


Trees = Callable[..., Topology]


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> Trees:
    """Builds fake trees, each shape once per module: a Topology is immutable, so shared."""
    built: dict[str, Topology] = {}

    def make(**shape: Any) -> Topology:
        key = repr(sorted(shape.items()))
        if key not in built:
            built[key] = Topology.from_sysfs(build_sysfs(tmp_path_factory.mktemp("sys"), **shape))
        return built[key]

    return make


def two_sockets(trees: Trees, **shape: Any) -> Topology:
    layout = dict(sockets=2, nodes_per_socket=2, caches_per_node=2, cores_per_cache=2, threads_per_core=2, pci=DGX_GPUS)
    return trees(**{**layout, **shape})


@pytest.fixture
def dgx(trees: Trees) -> Topology:
    return two_sockets(trees)


def all_ranks(options: NumaOptions, topology: Topology, count: int, **kwargs: object) -> list[str]:
    """Each rank's CPUs as a cpulist; allowed defaults to every CPU of the fake tree."""
    kwargs.setdefault("allowed", topology.cpus)
    return [format_cpulist(cpus_for(options, rank, topology=topology, **kwargs)) for rank in range(count)]  # type: ignore[arg-type]


# -- reading the topology ---------------------------------------------------------------------


def test_topology_reads_nodes_sockets_cores_caches_and_gpus_in_pci_order(dgx: Topology) -> None:
    assert {node: format_cpulist(c) for node, c in dgx.nodes.items()} == {
        0: "0-3,16-19",
        1: "4-7,20-23",
        2: "8-11,24-27",
        3: "12-15,28-31",
    }
    assert [dgx.socket_of_node(node) for node in range(4)] == [0, 0, 1, 1]
    assert dgx.cores[17] == {1, 17}
    assert dgx.caches[18] == cpus("2-3,18-19")
    assert [(g.pci_address, g.vendor, g.node) for g in dgx.gpus] == [
        ("0000:17:00.0", "NVIDIA", 0),
        ("0000:3a:00.0", "NVIDIA", 0),
        ("0000:86:00.0", "AMD", 2),
        ("0000:af:00.0", "NVIDIA", 3),
        ("0001:00:00.0", "NVIDIA", 1),
    ]
    assert dgx.memory_nodes == {0, 1, 2, 3}
    assert pickle.loads(pickle.dumps(dgx)) == dgx  # it can be computed once and sent to children


def test_topology_of_this_machine_covers_the_allowed_cpus() -> None:
    topology = Topology.from_sysfs("/sys")
    assert os.sched_getaffinity(0) <= topology.cpus


def test_topology_from_a_missing_folder_says_which(tmp_path: Path) -> None:
    with pytest.raises(NumaBindingError, match="cannot read the CPU topology under .*nowhere.*no such folder"):
        Topology.from_sysfs(tmp_path / "nowhere")


def test_cpulists_round_trip_and_reject_garbage() -> None:
    assert parse_cpulist("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert parse_cpulist("") == frozenset()
    assert format_cpulist({11, 0, 1, 2, 3, 8, 10}) == "0-3,8,10-11"
    with pytest.raises(ValueError, match="not a CPU list: '3-1'"):
        parse_cpulist("3-1")
    with pytest.raises(ValueError, match="not a CPU list: 'zero'"):
        parse_cpulist("zero")


# -- each mode, with GPUs ---------------------------------------------------------------------


def test_node_mode_binds_each_rank_to_its_gpus_node(dgx: Topology) -> None:
    assert all_ranks(NODE, dgx, 5) == ["0-3,16-19", "0-3,16-19", "8-11,24-27", "12-15,28-31", "4-7,20-23"]


def test_socket_mode_binds_to_every_node_of_the_gpus_socket(dgx: Topology) -> None:
    assert all_ranks(SOCKET, dgx, 5) == ["0-7,16-23", "0-7,16-23", "8-15,24-31", "8-15,24-31", "0-7,16-23"]


def test_exclusive_mode_splits_the_nodes_cores_among_its_gpus_with_smt_siblings(dgx: Topology) -> None:
    # Node 0 has cores 0-3 and GPUs 0000:17 and 0000:3a: two cores (four CPUs) each.
    assert all_ranks(EXCLUSIVE, dgx, 5) == ["0-1,16-17", "2-3,18-19", "8-11,24-27", "12-15,28-31", "4-7,20-23"]


def test_exclusive_mode_gives_the_lowest_gpus_one_core_more_when_it_does_not_divide(trees: Trees) -> None:
    pci = gpus(("0000:01:00.0", 0), ("0000:02:00.0", 0), ("0000:03:00.0", 0))
    topology = trees(cores_per_cache=5, pci=pci)
    assert all_ranks(EXCLUSIVE, topology, 3) == ["0-1", "2-3", "4"]


def test_core_complex_mode_gives_each_gpu_on_a_node_its_own_last_level_cache(dgx: Topology) -> None:
    assert all_ranks(CORE_COMPLEX, dgx, 5) == ["0-1,16-17", "2-3,18-19", "8-9,24-25", "12-13,28-29", "4-5,20-21"]


def test_core_complex_mode_wraps_around_when_a_node_has_more_gpus_than_caches(trees: Trees) -> None:
    pci = gpus(("0000:01:00.0", 0), ("0000:02:00.0", 0), ("0000:03:00.0", 0))
    topology = trees(caches_per_node=2, cores_per_cache=2, pci=pci)
    assert all_ranks(CORE_COMPLEX, topology, 3) == ["0-1", "2-3", "0-1"]


def test_core_complex_mode_without_cache_information_takes_the_whole_node(trees: Trees) -> None:
    topology = two_sockets(trees, cache_info=False)
    assert all_ranks(CORE_COMPLEX, topology, 2) == ["0-3,16-19", "0-3,16-19"]


def test_a_gpu_whose_numa_node_is_minus_one_counts_as_node_zero(trees: Trees) -> None:
    topology = two_sockets(trees, pci=gpus(("0000:3b:00.0", -1)))
    assert topology.gpus[0].node == 0
    assert all_ranks(NODE, topology, 1) == ["0-3,16-19"]


def test_the_gpus_cuda_sees_can_be_given_to_the_topology(dgx: Topology) -> None:
    # The documented way out when a container sees all the host's GPUs in /sys.
    mine = dataclasses.replace(dgx, gpus=tuple(g for g in dgx.gpus if g.pci_address == "0000:86:00.0"))
    assert all_ranks(NODE, mine, 1) == ["8-11,24-27"]


# -- the allowed set --------------------------------------------------------------------------


def test_every_mode_stays_inside_a_restricted_allowed_set(dgx: Topology) -> None:
    allowed = cpus("1-31")  # CPU 0 taken away
    assert all_ranks(NODE, dgx, 1, allowed=allowed) == ["1-3,16-19"]
    assert all_ranks(SOCKET, dgx, 1, allowed=cpus("0-5")) == ["0-5"]
    # Core 0 keeps only CPU 16: still a core, still the first slice.
    assert all_ranks(EXCLUSIVE, dgx, 2, allowed=allowed) == ["1,16-17", "2-3,18-19"]
    # The fuller cache group now comes first.
    assert all_ranks(CORE_COMPLEX, dgx, 2, allowed=allowed) == ["2-3,18-19", "1,16-17"]


def test_a_gpu_on_a_node_with_no_allowed_cpu_cannot_be_bound(dgx: Topology) -> None:
    with pytest.raises(NumaBindingError) as caught:
        cpus_for(NODE, 0, topology=dgx, allowed=cpus("4-15,20-31"))
    assert str(caught.value) == (
        "GPU 0000:17:00.0 is on NUMA node 0, but none of that node's CPUs (0-3,16-19) "
        "is in the allowed set 4-15,20-31"
    )


def test_allowed_defaults_to_this_threads_affinity(trees: Trees) -> None:
    # A one-node tree holding CPUs 0-63: the answer is cut down to what we may use.
    topology = trees(cores_per_cache=64)
    assert cpus_for(NODE, 0, topology=topology) == os.sched_getaffinity(0)


# -- CUDA_VISIBLE_DEVICES ---------------------------------------------------------------------


def test_cuda_visible_devices_reorders_and_restricts_the_gpus(dgx: Topology, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 0")
    assert all_ranks(NODE, dgx, 2) == ["8-11,24-27", "0-3,16-19"]
    # GPU 0000:3a is not visible, so GPU 0000:17 has node 0 to itself.
    assert all_ranks(EXCLUSIVE, dgx, 2) == ["8-11,24-27", "0-3,16-19"]


def test_cuda_visible_devices_ends_at_a_negative_index_as_cuda_does(
    dgx: Topology, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,-1,0")
    assert cpus_for(NODE, 0, topology=dgx, allowed=dgx.cpus) == cpus("0-3,16-19")
    with pytest.raises(NumaBindingError, match=r"local rank 1 is bound near GPU 1, but only 1 GPU\(s\) are visible"):
        cpus_for(NODE, 1, topology=dgx, allowed=dgx.cpus)


def test_empty_cuda_visible_devices_hides_every_gpu(dgx: Topology, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert all_ranks(NODE, dgx, 4) == ["0-3,16-19", "4-7,20-23", "8-11,24-27", "12-15,28-31"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("GPU-8f6c1f9e-3a2b", "names GPU 'GPU-8f6c1f9e-3a2b', which is not an index; .* List the GPUs by index"),
        ("0,7", r"lists GPU 7 but '.*' has 5 GPU\(s\)"),
        ("1,1", "lists GPU 1 twice"),
    ],
)
def test_cuda_visible_devices_that_cannot_be_mapped_is_an_error(
    dgx: Topology, monkeypatch: pytest.MonkeyPatch, value: str, message: str
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    with pytest.raises(NumaBindingError, match=message):
        cpus_for(NODE, 0, topology=dgx, allowed=dgx.cpus)


# -- without GPUs -----------------------------------------------------------------------------


def test_without_gpus_one_rank_per_node_by_default(trees: Trees) -> None:
    topology = two_sockets(trees, pci=[])
    assert all_ranks(NODE, topology, 4) == ["0-3,16-19", "4-7,20-23", "8-11,24-27", "12-15,28-31"]
    with pytest.raises(ValueError, match="local_rank_id must be < the local world size \\(4"):
        cpus_for(NODE, 4, topology=topology, allowed=topology.cpus)


def test_without_gpus_ranks_fill_nodes_in_contiguous_blocks_and_share_them_like_gpus(trees: Trees) -> None:
    topology = two_sockets(trees, pci=[])
    exclusive = all_ranks(EXCLUSIVE, topology, 8, local_world_size=8)
    assert exclusive == [
        "0-1,16-17", "2-3,18-19", "4-5,20-21", "6-7,22-23",
        "8-9,24-25", "10-11,26-27", "12-13,28-29", "14-15,30-31",
    ]  # fmt: skip
    assert all_ranks(NODE, topology, 2, local_world_size=2) == ["0-3,16-19", "8-11,24-27"]
    # Three ranks per node and two caches per node: the third shares the first cache.
    assert all_ranks(CORE_COMPLEX, topology, 3, local_world_size=12) == ["0-1,16-17", "2-3,18-19", "0-1,16-17"]


def test_without_gpus_local_world_size_defaults_to_the_environment(
    trees: Trees, monkeypatch: pytest.MonkeyPatch
) -> None:
    topology = two_sockets(trees, pci=[])
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert cpus_for(EXCLUSIVE, 1, topology=topology, allowed=topology.cpus) == cpus("2-3,18-19")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "eight")
    with pytest.raises(ValueError, match=r"\$LOCAL_WORLD_SIZE must be a positive integer, got 'eight'"):
        cpus_for(EXCLUSIVE, 1, topology=topology, allowed=topology.cpus)


def test_without_gpus_nodes_without_allowed_cpus_are_skipped(trees: Trees) -> None:
    topology = two_sockets(trees, pci=[])
    allowed = cpus("8-15,24-31")  # socket 1 only, as a cgroup cpuset may leave us
    assert all_ranks(NODE, topology, 2, allowed=allowed) == ["8-11,24-27", "12-15,28-31"]


def test_two_ranks_in_exclusive_mode_on_this_machine_get_disjoint_cpus() -> None:
    topology = Topology.from_sysfs("/sys")
    allowed = frozenset(os.sched_getaffinity(0))
    if topology.gpus or len(topology.core_groups(allowed)) < 2:
        pytest.skip("needs a machine without GPUs and with two allowed physical cores")
    first, second = (cpus_for(EXCLUSIVE, rank, 2) for rank in range(2))
    assert first and second and not first & second
    if len(topology.nodes) == 1:  # then the two ranks share the node and split it
        assert first | second == allowed
    if allowed == {0, 1} and topology.core_groups(allowed) == [{0}, {1}]:
        assert (first, second) == ({0}, {1})


# -- errors and the fallback ------------------------------------------------------------------


def test_exclusive_mode_with_fewer_cores_than_gpus_says_so(trees: Trees) -> None:
    pci = gpus(("0000:01:00.0", 0), ("0000:02:00.0", 0), ("0000:03:00.0", 0))
    topology = trees(cores_per_cache=2, pci=pci)
    with pytest.raises(NumaBindingError) as caught:
        cpus_for(EXCLUSIVE, 0, topology=topology, allowed=topology.cpus)
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, asyncproc.AsyncprocError)
    assert str(caught.value) == (
        "exclusive mode needs a physical core for each of the 3 ranks on NUMA node 0 (GPU 0000:01:00.0, "
        "GPU 0000:02:00.0, GPU 0000:03:00.0), but it has only 2 physical core(s) among the allowed CPUs (0-1)"
    )


def test_more_ranks_than_gpus_is_an_error(dgx: Topology) -> None:
    with pytest.raises(NumaBindingError, match=r"local rank 5 is bound near GPU 5, but only 5 GPU\(s\) are visible"):
        cpus_for(NODE, 5, topology=dgx, allowed=dgx.cpus)


def test_fallback_logs_and_runs_unbound(trees: Trees, caplog: pytest.LogCaptureFixture) -> None:
    pci = gpus(("0000:01:00.0", 0), ("0000:02:00.0", 0), ("0000:03:00.0", 0))
    topology = trees(cores_per_cache=2, pci=pci)
    options = NumaOptions("exclusive", should_fall_back_if_binding_fails=True)
    with caplog.at_level(logging.WARNING, logger="asyncproc.numa"):
        assert cpus_for(options, 2, topology=topology, allowed={0, 1}) == {0, 1}
        assert binding_for(options, 2, topology=topology, allowed={0, 1}) is None
    assert len(caplog.records) == 2
    record = caplog.records[0]
    assert record.name == "asyncproc.numa" and record.levelno == logging.WARNING
    assert "local rank 2 in exclusive mode failed, running unbound" in record.getMessage()
    assert "only 2 physical core(s)" in record.getMessage()


def test_a_garbled_topology_file_is_reported_with_its_content(tmp_path: Path) -> None:
    root = build_sysfs(tmp_path, pci=[])
    (root / "devices/system/node/node0/cpulist").write_text("garbage\n")
    with pytest.raises(NumaBindingError, match="cannot read the CPU topology under .*not a CPU list: 'garbage'"):
        Topology.from_sysfs(root)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: NumaOptions("bogus"), ValueError, "affinity_mode must be one of 'node', 'socket', .*got 'bogus'"),
        (lambda: NumaOptions(3), TypeError, "affinity_mode must be an AffinityMode or one of .*got 3"),  # type: ignore[arg-type]
        (lambda: NumaOptions("node", 1), TypeError, "should_fall_back_if_binding_fails must be a bool, got 1"),  # type: ignore[arg-type]
        (lambda: NumaOptions("node", strict_memory="yes"), TypeError, "strict_memory must be a bool"),  # type: ignore[arg-type]
        (lambda: cpus_for("node", 0), TypeError, "options must be a NumaOptions, got 'node'"),  # type: ignore[arg-type]
        (lambda: cpus_for(NODE, -1), ValueError, "local_rank_id must be >= 0, got -1"),
        (lambda: cpus_for(NODE, True), TypeError, "local_rank_id must be an int, got True"),
        (lambda: cpus_for(NODE, 0, 0), ValueError, "local_world_size must be >= 1, got 0"),
        (lambda: cpus_for(NODE, 2, 2), ValueError, r"local_rank_id must be < local_world_size \(2\), got 2"),
        (lambda: cpus_for(NODE, 0, allowed=[]), ValueError, "allowed must not be empty"),
        (lambda: cpus_for(NODE, 0, allowed="0-3"), TypeError, "allowed must be an iterable of ints, got '0-3'"),  # type: ignore[arg-type]
        (lambda: cpus_for(NODE, 0, allowed=[-2]), ValueError, "each of allowed must be >= 0, got -2"),
        (lambda: cpus_for(NODE, 0, topology="/sys"), TypeError, "topology must be a Topology or None, got '/sys'"),  # type: ignore[arg-type]
        (lambda: Binding(frozenset()), ValueError, "cpus must not be empty"),
    ],
)
def test_bad_arguments_are_refused_up_front_even_with_fallback(call: object, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        call()  # type: ignore[operator]
    fallback = NumaOptions("node", should_fall_back_if_binding_fails=True)
    with pytest.raises(ValueError, match="local_rank_id must be >= 0"):
        cpus_for(fallback, -1)


def test_options_take_the_mode_by_value_and_export_from_the_package() -> None:
    assert NumaOptions("core-complex") == NumaOptions(asyncproc.AffinityMode.CORE_COMPLEX)
    assert NumaOptions(AffinityMode.NODE).strict_memory is False
    assert [mode.value for mode in AffinityMode] == ["node", "socket", "exclusive", "core-complex"]
    assert {"AffinityMode", "NumaOptions"} <= set(asyncproc.__all__)


# -- memory nodes of a binding ----------------------------------------------------------------


def test_a_binding_carries_the_memory_nodes_of_its_cpus(dgx: Topology) -> None:
    options = NumaOptions(AffinityMode.SOCKET, strict_memory=True)
    binding = binding_for(options, 2, topology=dgx, allowed=dgx.cpus)
    assert binding == Binding(cpus("8-15,24-31"), frozenset({2, 3}), strict_memory=True)


def test_nodes_without_memory_are_left_out_of_the_memory_policy(trees: Trees) -> None:
    topology = two_sockets(trees, nodes_without_memory=[1])
    binding = binding_for(SOCKET, 0, topology=topology, allowed=topology.cpus)
    assert binding is not None and binding.nodes == {0}


# -- applying a binding to real children on this machine --------------------------------------


def _child_sees() -> tuple[frozenset[int], str]:
    """What a child reads as its first act: its CPUs and its memory policy."""
    out = subprocess.run(
        ["cat", "/proc/self/status", "/proc/self/numa_maps"], capture_output=True, text=True, check=True
    ).stdout
    return _parse_child(out)


def _parse_child(out: str) -> tuple[frozenset[int], str]:
    lines = out.splitlines()
    allowed = next(line.split(":", 1)[1] for line in lines if line.startswith("Cpus_allowed_list:"))
    return parse_cpulist(allowed), lines[-1].split()[1]  # numa_maps: "<address> <policy> ..."


def _memory_policy_works() -> bool:
    from asyncproc._numa import memory as _numa_memory

    try:
        _numa_memory.current()
    except OSError as err:
        assert err.errno in (errno.EPERM, errno.ENOSYS)
        return False
    return os.path.exists("/proc/self/numa_maps")


needs_two_cpus = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two allowed CPUs")
needs_mempolicy = pytest.mark.skipif(not _memory_policy_works(), reason="set_mempolicy is forbidden here")
LAST_CPU = max(os.sched_getaffinity(0))


@needs_two_cpus
@needs_mempolicy
def test_a_child_spawned_on_a_bound_thread_is_bound_from_its_first_instruction() -> None:
    before = os.sched_getaffinity(0)
    with Binding(frozenset({LAST_CPU}), frozenset({0})).on_this_thread():
        assert _child_sees() == ({LAST_CPU}, "prefer:0")
    assert os.sched_getaffinity(0) == before
    assert _child_sees() == (before, "default")


@needs_mempolicy
def test_strict_memory_binds_instead_of_preferring() -> None:
    with Binding(frozenset({0}), frozenset({0}), strict_memory=True).on_this_thread():
        assert _child_sees() == ({0}, "bind:0")
    assert _child_sees()[1] == "default"


@needs_two_cpus
def test_the_thread_is_restored_when_the_block_raises() -> None:
    before = os.sched_getaffinity(0)
    with pytest.raises(RuntimeError, match="spawn failed"):
        with Binding(frozenset({LAST_CPU})).on_this_thread():
            raise RuntimeError("spawn failed")
    assert os.sched_getaffinity(0) == before


@needs_two_cpus
def test_binding_a_worker_thread_leaves_the_other_threads_alone() -> None:
    before = os.sched_getaffinity(0)
    seen: list[set[int]] = []

    def bind_in_worker() -> None:
        with Binding(frozenset({LAST_CPU})).on_this_thread():
            seen.append(os.sched_getaffinity(0))
            seen.append(os.sched_getaffinity(threading.main_thread().native_id))

    worker = threading.Thread(target=bind_in_worker)
    worker.start()
    worker.join()
    assert seen == [{LAST_CPU}, before]
    assert os.sched_getaffinity(0) == before


@needs_two_cpus
def test_a_thread_started_while_bound_inherits_the_binding() -> None:
    # Why the block should wrap one spawn and nothing else.
    seen: list[set[int]] = []
    with Binding(frozenset({LAST_CPU})).on_this_thread():
        started = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0)))
        started.start()
        started.join()
    assert seen == [{LAST_CPU}]


@needs_two_cpus
def test_apply_to_current_thread_binds_a_forked_child() -> None:
    binding = Binding(frozenset({LAST_CPU}))
    out = subprocess.run(
        ["cat", "/proc/self/status", "/proc/self/numa_maps"],
        preexec_fn=binding.apply_to_current_thread,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert _parse_child(out)[0] == {LAST_CPU}
    assert os.sched_getaffinity(0) != {LAST_CPU}


@needs_mempolicy
def test_a_refused_strict_memory_policy_raises_and_leaves_the_thread_alone() -> None:
    before = os.sched_getaffinity(0)
    # Node 900 does not exist: the kernel refuses the policy for real.
    with pytest.raises(NumaBindingError, match="the kernel refused the bind memory policy on nodes 900"):
        with Binding(frozenset({0}), frozenset({900}), strict_memory=True).on_this_thread():
            pytest.fail("the block must not run")
    assert os.sched_getaffinity(0) == before


@needs_two_cpus
@needs_mempolicy
def test_a_refused_preferred_memory_policy_keeps_the_cpus_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    # A preferred node is advice; Docker's default seccomp profile forbids the syscall. The
    # binding must not fail for it, with or without should_fall_back_if_binding_fails.
    binding = Binding(frozenset({LAST_CPU}), frozenset({900}))
    with caplog.at_level(logging.WARNING, logger="asyncproc.numa"):
        for _ in range(2):
            with binding.on_this_thread():
                assert _child_sees() == ({LAST_CPU}, "default")
    assert [r.name for r in caplog.records] == ["asyncproc.numa"]  # once, not per spawn
    assert "refused the preferred memory policy on nodes 900" in caplog.records[0].getMessage()
    assert "keeping the CPU binding only" in caplog.records[0].getMessage()


def test_a_refused_cpu_set_raises_or_falls_back_unbound(caplog: pytest.LogCaptureFixture) -> None:
    before = os.sched_getaffinity(0)
    absent = frozenset({max(Topology.from_sysfs("/sys").cpus) + 1000})
    with pytest.raises(NumaBindingError, match=r"the kernel refused CPU affinity \d+: Invalid argument"):
        with Binding(absent).on_this_thread():
            pytest.fail("the block must not run")
    with caplog.at_level(logging.WARNING, logger="asyncproc.numa"):
        with Binding(absent, should_fall_back_if_binding_fails=True).on_this_thread():
            assert _child_sees()[0] == before
    assert "refused CPU affinity" in caplog.records[0].getMessage()
    assert os.sched_getaffinity(0) == before


@needs_two_cpus
@pytest.mark.anyio
async def test_binding_the_spawning_worker_thread_from_async_code(anyio_backend: object) -> None:
    # trio and anyio spawn on worker threads; the binding goes around the spawn on that thread.
    binding = binding_for(EXCLUSIVE, 1, 2)
    assert binding is not None

    def spawn_bound() -> tuple[frozenset[int], str]:
        with binding.on_this_thread():
            return _child_sees()

    child_cpus, _ = await anyio.to_thread.run_sync(spawn_bound)
    assert child_cpus == binding.cpus
    assert await anyio.to_thread.run_sync(os.sched_getaffinity, 0) == os.sched_getaffinity(0)


def test_amd_instinct_accelerators_are_gpus_but_npus_are_not(tmp_path: Path) -> None:
    root = build_sysfs(
        tmp_path,
        nodes_per_socket=2,
        pci=[
            Pci("0000:c1:00.0", 1, vendor=AMD, pci_class=ACCELERATOR, driver="amdgpu"),  # MI300
            Pci("0000:41:00.0", 0, vendor=AMD, pci_class=DISPLAY_OTHER, driver="amdgpu"),  # MI200
            Pci("0000:c5:00.1", 1, vendor=AMD, pci_class=ACCELERATOR, driver="amdxdna"),  # an NPU
        ],
    )
    topology = Topology.from_sysfs(root)
    assert [(g.pci_address, g.vendor, g.node) for g in topology.gpus] == [
        ("0000:41:00.0", "AMD", 0),
        ("0000:c1:00.0", "AMD", 1),
    ]
    # local rank 1 is bound near the second accelerator, on node 1
    assert cpus_for(NumaOptions("node"), 1, topology=topology, allowed=topology.cpus) == topology.nodes[1]


def test_a_garbled_sysfs_file_is_named_in_the_error(tmp_path: Path) -> None:
    root = build_sysfs(tmp_path, pci=[Pci("0000:17:00.0", 0)])
    (root / "bus/pci/devices/0000:17:00.0/numa_node").write_text("garbage\n")
    with pytest.raises(NumaBindingError, match=r"numa_node: expected an integer, got 'garbage'"):
        Topology.from_sysfs(root)
