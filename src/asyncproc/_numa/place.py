"""Where each local rank lives and which CPUs each affinity mode gives it: the placement
rules behind ``asyncproc.numa.binding_for`` and the ``asyncproc numa`` command (an internal
API: both import these names; users import ``asyncproc.numa``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .._exceptions import NumaBindingError
from .topology import Gpu, Topology, format_cpulist

__all__ = ["Slot", "cpus_in_mode", "slot_of", "slots", "visible_gpus"]


# -- where each local rank lives -------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """A local rank's place before a mode narrows it: its node, who shares that node
    (``peers``, in order, itself included) and what put it there (``label``)."""

    label: str
    node: int
    peers: tuple[str, ...]

    @property
    def index_on_node(self) -> int:
        return self.peers.index(self.label)


def slots(topology: Topology, allowed: frozenset[int], local_world_size: int | None) -> list[Slot]:
    """One slot per local rank: near its GPU when there are GPUs, else laid over the nodes."""
    gpus = visible_gpus(topology)
    if gpus:
        placed = [(f"GPU {gpu.pci_address}", gpu.node) for gpu in gpus]
    else:
        nodes = [node for node, cpus in topology.nodes.items() if cpus & allowed]
        if not nodes:
            raise NumaBindingError(
                f"no NUMA node under {topology.root!r} has a CPU in the allowed set {format_cpulist(allowed)}"
            )
        size = _default_world_size(local_world_size, len(nodes))
        # Contiguous blocks: ranks 0..k-1 on the first node, and so on, as GPUs usually are.
        placed = [(f"local rank {rank}", nodes[rank * len(nodes) // size]) for rank in range(size)]
    return [
        Slot(label, node, tuple(other for other, other_node in placed if other_node == node)) for label, node in placed
    ]


def slot_of(local_rank_id: int, slots: Sequence[Slot]) -> Slot:
    if local_rank_id < len(slots):
        return slots[local_rank_id]
    if slots[0].label.startswith("GPU"):
        raise NumaBindingError(
            f"local rank {local_rank_id} is bound near GPU {local_rank_id}, "
            f"but only {len(slots)} GPU(s) are visible: {', '.join(slot.label for slot in slots)}"
        )
    raise ValueError(
        f"local_rank_id must be < the local world size ({len(slots)}, from $LOCAL_WORLD_SIZE or the number of "
        f"NUMA nodes with allowed CPUs when local_world_size is not given), got {local_rank_id}"
    )


def _default_world_size(given: int | None, node_count: int) -> int:
    if given is not None:
        return given
    text = os.environ.get("LOCAL_WORLD_SIZE")
    if text is None:
        return node_count  # one rank per node
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"$LOCAL_WORLD_SIZE must be a positive integer, got {text!r}")
    return int(text)


def visible_gpus(topology: Topology) -> tuple[Gpu, ...]:
    """The topology's GPUs as CUDA numbers them: all of them in PCI address order, or
    those that ``$CUDA_VISIBLE_DEVICES`` lists by index, in its order."""
    text = os.environ.get("CUDA_VISIBLE_DEVICES")
    if text is None:
        return topology.gpus
    return tuple(topology.gpus[index] for index in _visible_indices(text, topology))


def _visible_indices(text: str, topology: Topology) -> list[int]:
    indices: list[int] = []
    for entry in (part.strip() for part in text.split(",")) if text.strip() else ():
        if not re.fullmatch(r"-?\d+", entry):
            raise NumaBindingError(
                f"CUDA_VISIBLE_DEVICES={text!r} names GPU {entry!r}, which is not an index; without the GPU "
                "driver asyncproc cannot tell which PCI device a UUID or MIG name is. List the GPUs by index."
            )
        index = int(entry)
        if index < 0:
            break  # as CUDA does: a negative index ends the list
        if index >= len(topology.gpus) or index in indices:
            problem = "twice" if index in indices else f"but {topology.root!r} has {len(topology.gpus)} GPU(s)"
            raise NumaBindingError(f"CUDA_VISIBLE_DEVICES={text!r} lists GPU {index} {problem}")
        indices.append(index)
    return indices


# -- the modes --------------------------------------------------------------------------------


def cpus_in_mode(mode: str, slot: Slot, topology: Topology, allowed: frozenset[int]) -> frozenset[int]:
    """The CPUs ``mode`` (an ``AffinityMode``, a ``str`` enum) gives the rank in ``slot``;
    raises :class:`NumaBindingError`."""
    node_cpus = _allowed_node_cpus(slot, topology, allowed)
    if mode == "node":
        return node_cpus
    if mode == "socket":
        socket = topology.socket_of_node(slot.node)
        assert socket is not None  # the node has allowed CPUs: checked above
        return frozenset().union(*(topology.nodes[node] for node in topology.nodes_on_socket(socket))) & allowed
    if mode == "exclusive":
        return _exclusive_slice(topology.core_groups(node_cpus), slot)
    groups = topology.cache_groups(node_cpus)
    return groups[slot.index_on_node % len(groups)]


def _allowed_node_cpus(slot: Slot, topology: Topology, allowed: frozenset[int]) -> frozenset[int]:
    if slot.node not in topology.nodes:
        raise NumaBindingError(
            f"{slot.label} is on NUMA node {slot.node}, but {topology.root!r} lists only nodes "
            f"{format_cpulist(topology.nodes)}"
        )
    cpus = topology.nodes[slot.node] & allowed
    if not cpus:
        raise NumaBindingError(
            f"{slot.label} is on NUMA node {slot.node}, but none of that node's CPUs "
            f"({format_cpulist(topology.nodes[slot.node]) or 'none'}) is in the allowed set {format_cpulist(allowed)}"
        )
    return cpus


def _exclusive_slice(cores: list[frozenset[int]], slot: Slot) -> frozenset[int]:
    sharers = len(slot.peers)
    if len(cores) < sharers:
        raise NumaBindingError(
            f"exclusive mode needs a physical core for each of the {sharers} ranks on NUMA node {slot.node} "
            f"({', '.join(slot.peers)}), but it has only {len(cores)} physical core(s) among the allowed CPUs "
            f"({format_cpulist(frozenset().union(*cores))})"
        )
    per_rank, extra = divmod(len(cores), sharers)
    # The lowest `extra` ranks on the node take one core more, so every core is used.
    index = slot.index_on_node
    start = index * per_rank + min(index, extra)
    end = start + per_rank + (1 if index < extra else 0)
    return frozenset().union(*cores[start:end])
