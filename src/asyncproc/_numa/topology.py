"""The machine's NUMA nodes, sockets, cores, caches and GPUs, read from a folder laid out like /sys.

Why sysfs and nothing else: ``numactl``, hwloc and NVML are often not installed, while
everything a binding needs is plain text under ``/sys``. Taking the root folder as an
argument lets tests and ``asyncproc numa --sysfs`` describe machines we do not have.

What a tree may leave out, and how it is read then (each matches what the kernel means):

* no ``devices/system/node`` (a kernel built without NUMA): one node 0 holding every
  online CPU;
* no ``has_memory`` list: every node has memory;
* no ``physical_package_id``, or -1 (the platform does not describe packages): socket 0;
* no ``core_cpus_list``/``thread_siblings_list``: the CPU is a core of its own (no SMT);
* no cache description: the CPU's whole node shares one last-level cache;
* a GPU whose ``numa_node`` is -1 or missing (firmware gave no affinity, typical of
  single-node machines): node 0.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from .._exceptions import NumaBindingError

__all__ = [
    "Gpu",
    "Topology",
    "format_cpulist",
    "parse_cpulist",
]

# PCI class code, upper 16 bits: display controller / VGA-compatible and 3D controller
# (NVIDIA data-centre GPUs are 3D controllers, consumer ones VGA).
_GPU_CLASSES = frozenset({0x0300, 0x0302})  # VGA-compatible, 3D controller
# AMD Instinct accelerators present themselves as "display controller" (MI200 series) or
# "processing accelerator" (MI300). The latter class also holds AMD's XDNA NPUs, hence the
# check that amdgpu drives the device.
_AMD_ACCELERATOR_CLASSES = frozenset({0x0380, 0x1200})
_GPU_VENDORS: Mapping[int, str] = MappingProxyType({0x10DE: "NVIDIA", 0x1002: "AMD"})
_PCI_ADDRESS = re.compile(r"^([0-9a-f]{4,}):([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])$")
_NODE_DIR = re.compile(r"^node(\d+)$")
_CACHE_DIR = re.compile(r"^index(\d+)$")


def parse_cpulist(text: str) -> frozenset[int]:
    """A kernel CPU/node list such as ``"0-3,8,10-11"`` as a set; ``""`` is the empty set."""
    found: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        low, sep, high = part.partition("-")
        try:
            first, last = int(low), int(high if sep else low)
        except ValueError:
            raise ValueError(f"not a CPU list: {text.strip()!r} (expected e.g. '0-3,8')") from None
        if first < 0 or last < first:
            raise ValueError(f"not a CPU list: {text.strip()!r} (bad range {part!r})")
        found.update(range(first, last + 1))
    return frozenset(found)


def format_cpulist(cpus: Iterable[int]) -> str:
    """The inverse of :func:`parse_cpulist`: ``{0, 1, 2, 3, 8}`` -> ``"0-3,8"``."""
    ranges: list[str] = []
    run: list[int] = []
    for cpu in sorted(cpus):
        if run and cpu != run[-1] + 1:
            ranges.append(_range_text(run))
            run = []
        run.append(cpu)
    if run:
        ranges.append(_range_text(run))
    return ",".join(ranges)


def _range_text(run: list[int]) -> str:
    return str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"


@dataclass(frozen=True)
class Gpu:
    """A GPU found on the PCI bus: its address (``"0000:17:00.0"``), maker and NUMA node."""

    pci_address: str
    vendor: str
    node: int


@dataclass(frozen=True)
class Topology:
    """The CPU layout of one machine. Build it with :meth:`from_sysfs`.

    ``nodes`` maps each NUMA node to its CPUs (a node may have none: memory-only nodes);
    ``sockets`` maps each CPU to its package; ``cores`` each CPU to the CPUs of its
    physical core (SMT siblings, itself included); ``caches`` each CPU to the CPUs sharing
    its last-level cache; ``gpus`` lists the GPUs in PCI address order;
    ``memory_nodes`` are the nodes that have memory.
    """

    nodes: Mapping[int, frozenset[int]]
    sockets: Mapping[int, int]
    cores: Mapping[int, frozenset[int]]
    caches: Mapping[int, frozenset[int]]
    gpus: tuple[Gpu, ...] = ()
    memory_nodes: frozenset[int] = frozenset()
    root: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        # Read-only views, so a topology shared between callers cannot be changed under them.
        for name in ("nodes", "sockets", "cores", "caches"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))
        object.__setattr__(self, "gpus", tuple(self.gpus))
        object.__setattr__(self, "memory_nodes", frozenset(self.memory_nodes))

    def __reduce__(self) -> tuple[type[Topology], tuple[object, ...]]:
        # Mapping proxies do not pickle; plain dicts do, and __post_init__ wraps them again.
        maps = (dict(self.nodes), dict(self.sockets), dict(self.cores), dict(self.caches))
        return (type(self), (*maps, self.gpus, self.memory_nodes, self.root))

    @classmethod
    def from_sysfs(cls, root: str | os.PathLike[str] = "/sys") -> Topology:
        """Read the topology under ``root``: ``/sys``, or any folder laid out like it.

        Raises :class:`NumaBindingError` naming the file when the tree cannot be read.
        """
        base = Path(root)
        if not base.is_dir():
            raise NumaBindingError(f"cannot read the CPU topology under {str(base)!r}: no such folder")
        try:
            return _read_topology(base)
        except (OSError, ValueError) as err:
            raise NumaBindingError(f"cannot read the CPU topology under {str(base)!r}: {err}") from err

    @property
    def cpus(self) -> frozenset[int]:
        """Every CPU of every node."""
        return frozenset().union(*self.nodes.values())

    def socket_of_node(self, node: int) -> int | None:
        """The socket of a node's lowest CPU; None for a node without CPUs."""
        cpus = self.nodes.get(node, frozenset())
        return self.sockets.get(min(cpus), 0) if cpus else None

    def nodes_on_socket(self, socket: int) -> frozenset[int]:
        """The nodes whose CPUs are on ``socket`` (by their lowest CPU, as torch reads it)."""
        return frozenset(node for node in self.nodes if self.socket_of_node(node) == socket)

    def core_groups(self, cpus: Iterable[int]) -> list[frozenset[int]]:
        """``cpus`` grouped by physical core, in order of each core's lowest CPU."""
        return _group(cpus, lambda cpu: min(self.cores.get(cpu, frozenset({cpu}))))

    def cache_groups(self, cpus: Iterable[int]) -> list[frozenset[int]]:
        """``cpus`` grouped by last-level cache: largest group first, then lowest CPU
        (torch's order, so the ranks sharing a node take the roomiest caches first)."""
        groups = _group(cpus, lambda cpu: min(self.caches.get(cpu, frozenset({cpu}))))
        return sorted(groups, key=lambda group: (-len(group), min(group)))


def _group(cpus: Iterable[int], key_of: Callable[[int], int]) -> list[frozenset[int]]:
    by_key: dict[int, set[int]] = {}
    for cpu in cpus:
        by_key.setdefault(key_of(cpu), set()).add(cpu)
    return [frozenset(by_key[key]) for key in sorted(by_key)]


# -- reading sysfs -------------------------------------------------------------------------


def _read_topology(base: Path) -> Topology:
    cpu_dir = base / "devices/system/cpu"
    nodes = _read_nodes(base)
    all_cpus = frozenset().union(*nodes.values())
    if not all_cpus:
        raise ValueError(f"no CPUs listed under {base / 'devices/system'}")
    sockets = {cpu: _read_socket(cpu_dir / f"cpu{cpu}") for cpu in all_cpus}
    cores = {cpu: _read_core(cpu_dir / f"cpu{cpu}", cpu) for cpu in all_cpus}
    node_of = {cpu: node for node, cpus in nodes.items() for cpu in cpus}
    caches = {cpu: _read_last_level_cache(cpu_dir / f"cpu{cpu}") or nodes[node_of[cpu]] for cpu in all_cpus}
    has_memory = base / "devices/system/node/has_memory"
    memory_nodes = parse_cpulist(has_memory.read_text()) if has_memory.exists() else frozenset(nodes)
    return Topology(
        nodes=nodes,
        sockets=sockets,
        cores=cores,
        caches=caches,
        gpus=_read_gpus(base / "bus/pci/devices"),
        memory_nodes=memory_nodes,
        root=str(base),
    )


def _read_nodes(base: Path) -> dict[int, frozenset[int]]:
    node_dir = base / "devices/system/node"
    if not node_dir.is_dir():
        # A kernel built without NUMA support: the whole machine is one node.
        return {0: parse_cpulist((base / "devices/system/cpu/online").read_text())}
    nodes = {}
    for entry in node_dir.iterdir():
        match = _NODE_DIR.match(entry.name)
        if match:
            nodes[int(match.group(1))] = parse_cpulist((entry / "cpulist").read_text())
    if not nodes:
        raise ValueError(f"no node<N> folders in {node_dir}")
    return dict(sorted(nodes.items()))


def _read_socket(cpu_path: Path) -> int:
    path = cpu_path / "topology/physical_package_id"
    if not path.exists():
        return 0
    # -1: the platform does not describe packages; treat the machine as one socket.
    return max(int(path.read_text()), 0)


def _read_core(cpu_path: Path, cpu: int) -> frozenset[int]:
    # core_cpus_list is the current name; thread_siblings_list the older, still present one.
    for name in ("core_cpus_list", "thread_siblings_list"):
        path = cpu_path / "topology" / name
        if path.exists():
            return parse_cpulist(path.read_text()) | {cpu}
    return frozenset({cpu})


def _read_last_level_cache(cpu_path: Path) -> frozenset[int] | None:
    """The CPUs sharing this CPU's highest-level data or unified cache; None if not described."""
    cache_dir = cpu_path / "cache"
    if not cache_dir.is_dir():
        return None
    best_level, best = -1, None
    for entry in cache_dir.iterdir():
        if not _CACHE_DIR.match(entry.name) or not (entry / "shared_cpu_list").exists():
            continue
        kind = (entry / "type").read_text().strip() if (entry / "type").exists() else "Unified"
        if kind == "Instruction":  # an L1i is never the last level that matters for data
            continue
        level = int((entry / "level").read_text())
        if level > best_level:
            best_level, best = level, parse_cpulist((entry / "shared_cpu_list").read_text())
    return best


def _read_gpus(pci_dir: Path) -> tuple[Gpu, ...]:
    if not pci_dir.is_dir():
        return ()
    found: list[tuple[tuple[int, ...], Gpu]] = []
    for entry in pci_dir.iterdir():
        match = _PCI_ADDRESS.match(entry.name)
        gpu = _read_gpu(entry) if match else None
        if match and gpu is not None:
            found.append((tuple(int(part, 16) for part in match.groups()), gpu))
    # PCI address order: what nvidia-smi and CUDA_DEVICE_ORDER=PCI_BUS_ID number by.
    return tuple(gpu for _, gpu in sorted(found, key=lambda item: item[0]))


def _is_gpu_class(pci_class: int, vendor: int, device: Path) -> bool:
    if pci_class in _GPU_CLASSES:
        return True
    return vendor == 0x1002 and pci_class in _AMD_ACCELERATOR_CLASSES and _driver(device) == "amdgpu"


def _driver(device: Path) -> str | None:
    try:
        return os.path.basename(os.readlink(device / "driver"))
    except OSError:
        return None


def _read_int(path: Path, base: int) -> int:
    """An integer file of /sys; a clear error naming the file and what it held."""
    text = path.read_text()
    try:
        return int(text, base)
    except ValueError:
        raise ValueError(f"{path}: expected an integer, got {text.strip()!r}") from None


def _read_gpu(device: Path) -> Gpu | None:
    try:
        pci_class = _read_int(device / "class", base=16)
        vendor = _read_int(device / "vendor", base=16)
    except FileNotFoundError:
        return None  # not a function that describes itself: not a GPU we could drive
    if vendor not in _GPU_VENDORS or not _is_gpu_class(pci_class >> 8, vendor, device):
        return None
    node_file = device / "numa_node"
    node = _read_int(node_file, base=10) if node_file.exists() else -1
    # -1: the firmware gave no affinity (usual on single-node machines); node 0 is the one.
    return Gpu(pci_address=device.name, vendor=_GPU_VENDORS[vendor], node=max(node, 0))
