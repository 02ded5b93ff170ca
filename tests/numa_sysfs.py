"""Builds fake /sys trees, laid out as Linux lays them out, for the NUMA tests and docs.

CPUs are numbered as x86 Linux numbers them: cores 0..C-1 in socket, node, cache order,
then the second SMT thread of each core as C..2C-1 (so core k is CPUs k and k+C).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from asyncproc.numa import format_cpulist

NVIDIA, AMD, INTEL, MELLANOX = 0x10DE, 0x1002, 0x8086, 0x15B3
VGA, CONTROLLER_3D, AUDIO, ETHERNET = 0x030000, 0x030200, 0x040300, 0x020000
DISPLAY_OTHER, ACCELERATOR = 0x038000, 0x120000


@dataclass(frozen=True)
class Pci:
    address: str
    numa_node: int  # -1: the firmware gave no affinity
    vendor: int = NVIDIA
    pci_class: int = CONTROLLER_3D
    driver: str | None = None  # the name its bus/pci/drivers link points to


def gpus(*placed: tuple[str, int]) -> list[Pci]:
    return [Pci(address, node) for address, node in placed]


# The PCI devices of the tests' two-socket tree (two sockets x two nodes x two L3 groups x
# two cores x two SMT threads: core k is CPUs k and k+16, node n holds cores 4n..4n+3).
# GPUs are written out of PCI order, next to PCI functions that are not GPUs (an NVIDIA
# audio function, an Intel iGPU, a NIC).
DGX_GPUS = [
    *gpus(("0000:af:00.0", 3), ("0000:17:00.0", 0), ("0001:00:00.0", 1), ("0000:3a:00.0", 0)),
    Pci("0000:86:00.0", 2, vendor=AMD, pci_class=VGA),
    Pci("0000:17:00.1", 0, pci_class=AUDIO),
    Pci("0000:00:02.0", -1, vendor=INTEL, pci_class=VGA),
    Pci("0000:5e:00.0", 1, vendor=MELLANOX, pci_class=ETHERNET),
]
# ... so local ranks 0-4 are near GPUs 0000:17 (node 0), 0000:3a (node 0), 0000:86
# (node 2), 0000:af (node 3) and 0001:00 (node 1).


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def build_sysfs(
    root: Path,
    *,
    sockets: int = 1,
    nodes_per_socket: int = 1,
    caches_per_node: int = 1,
    cores_per_cache: int = 2,
    threads_per_core: int = 1,
    pci: Sequence[Pci] = (),
    nodes_without_memory: Iterable[int] = (),
    cache_info: bool = True,
) -> Path:
    """Write the tree under ``root`` and return ``root``."""
    nodes = sockets * nodes_per_socket
    cores_per_node = caches_per_node * cores_per_cache
    total_cores = nodes * cores_per_node

    def threads_of(core: int) -> list[int]:
        return [core + thread * total_cores for thread in range(threads_per_core)]

    system = root / "devices/system"
    for node in range(nodes):
        node_cores = range(node * cores_per_node, (node + 1) * cores_per_node)
        _write(system / f"node/node{node}/cpulist", format_cpulist(c for k in node_cores for c in threads_of(k)))
    memory = set(range(nodes)) - set(nodes_without_memory)
    _write(system / "node/has_memory", format_cpulist(memory))
    _write(system / "node/possible", f"0-{nodes - 1}")
    _write(system / "cpu/online", f"0-{total_cores * threads_per_core - 1}")
    for core in range(total_cores):
        node = core // cores_per_node
        cache_first = core - core % cores_per_cache
        cache_cpus = [c for k in range(cache_first, cache_first + cores_per_cache) for c in threads_of(k)]
        for cpu in threads_of(core):
            cpu_dir = system / f"cpu/cpu{cpu}"
            _write(cpu_dir / "topology/physical_package_id", str(node // nodes_per_socket))
            _write(cpu_dir / "topology/core_cpus_list", format_cpulist(threads_of(core)))
            _write(cpu_dir / "topology/thread_siblings_list", format_cpulist(threads_of(core)))
            if cache_info:
                _write_caches(cpu_dir / "cache", threads_of(core), cache_cpus)
    for device in pci:
        device_dir = root / "bus/pci/devices" / device.address
        _write(device_dir / "class", f"0x{device.pci_class:06x}")
        _write(device_dir / "vendor", f"0x{device.vendor:04x}")
        _write(device_dir / "numa_node", str(device.numa_node))
        if device.driver is not None:
            driver_dir = root / "bus/pci/drivers" / device.driver
            driver_dir.mkdir(parents=True, exist_ok=True)
            (device_dir / "driver").symlink_to(driver_dir)
    return root


def _write_caches(cache_dir: Path, core_cpus: list[int], llc_cpus: list[int]) -> None:
    levels = [(1, "Data", core_cpus), (1, "Instruction", core_cpus), (2, "Unified", core_cpus), (3, "Unified", llc_cpus)]
    for index, (level, kind, shared) in enumerate(levels):
        _write(cache_dir / f"index{index}/level", str(level))
        _write(cache_dir / f"index{index}/type", kind)
        _write(cache_dir / f"index{index}/shared_cpu_list", format_cpulist(shared))
