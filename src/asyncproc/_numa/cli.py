"""``asyncproc numa``: this machine's NUMA topology, and the CPUs each local rank would get.

Read-only: it computes bindings and applies none, so it is safe to run anywhere, and with
``--sysfs`` it describes a saved or hand-made tree of another machine.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .._exceptions import NumaBindingError
from ..numa import AffinityMode
from .place import Slot, cpus_in_mode, slot_of, slots, visible_gpus
from .topology import Topology, format_cpulist, parse_cpulist

__all__ = ["cli", "configure_parser"]


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def _cpu_list(text: str) -> frozenset[int]:
    try:
        cpus = parse_cpulist(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if not cpus:
        raise argparse.ArgumentTypeError("must name at least one CPU")
    return cpus


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nproc",
        type=_positive_int,
        metavar="N",
        help="local ranks to show (default: one per visible GPU; without GPUs $LOCAL_WORLD_SIZE, else one per node)",
    )
    parser.add_argument(
        "--mode", choices=[mode.value for mode in AffinityMode], help="show this affinity mode only (default: all)"
    )
    parser.add_argument(
        "--sysfs", default="/sys", metavar="PATH", help="read the topology from this folder laid out like /sys"
    )
    parser.add_argument(
        "--allowed",
        type=_cpu_list,
        metavar="CPULIST",
        help="CPUs the ranks may use, e.g. 0-15 (default: this process's affinity; with --sysfs, every CPU of the tree)",
    )


def cli(args: argparse.Namespace) -> int:
    try:
        topology = Topology.from_sysfs(args.sysfs)
    except NumaBindingError as err:
        print(f"asyncproc numa: {err}", file=sys.stderr)
        return 2
    allowed, allowed_source = _allowed(args, topology)
    modes = [AffinityMode(args.mode)] if args.mode else list(AffinityMode)
    lines = _describe_topology(topology)
    lines += ["", f"Allowed CPUs: {format_cpulist(allowed)} ({allowed_source})"]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    lines += [f"CUDA_VISIBLE_DEVICES: {'unset' if visible is None else repr(visible)}", ""]
    try:
        rank_lines, some_failed = _describe_ranks(topology, allowed, args.nproc, modes)
    except (NumaBindingError, ValueError) as err:
        print("\n".join([*lines, f"Cannot place local ranks: {err}"]))
        return 1
    print("\n".join(lines + rank_lines))
    # An overview of every mode reports what fails; asking for one mode asks whether it works.
    return 1 if some_failed and args.mode else 0


def _allowed(args: argparse.Namespace, topology: Topology) -> tuple[frozenset[int], str]:
    if args.allowed is not None:
        return args.allowed, "--allowed"
    if Path(args.sysfs).resolve() == Path("/sys").resolve():
        return frozenset(os.sched_getaffinity(0)), "this process's CPU affinity"
    return topology.cpus, "every CPU of the --sysfs tree"


def _describe_topology(topology: Topology) -> list[str]:
    all_cores = topology.core_groups(topology.cpus)
    sockets = sorted({topology.sockets[cpu] for cpu in topology.cpus})
    summary = (
        f"  {_count(len(sockets), 'socket')}, {_count(len(topology.nodes), 'node')}, "
        f"{_count(len(all_cores), 'physical core')}, {_count(len(topology.cpus), 'CPU')}, "
        f"{_count(len(topology.gpus), 'GPU')}"
    )
    rows = []
    for node, cpus in topology.nodes.items():
        gpus = [f"{gpu.pci_address} {gpu.vendor}" for gpu in topology.gpus if gpu.node == node]
        socket = topology.socket_of_node(node)
        rows.append(
            [
                str(node),
                "-" if socket is None else str(socket),
                format_cpulist(cpus) or "-",
                str(len(topology.core_groups(cpus))),
                "yes" if node in topology.memory_nodes else "no",
                "  ".join(format_cpulist(group) for group in topology.cache_groups(cpus)) or "-",
                ", ".join(gpus) or "-",
            ]
        )
    header = ["node", "socket", "CPUs", "cores", "memory", "last-level cache groups", "GPUs"]
    return [f"NUMA topology under {topology.root}", summary, "", *_table(header, rows)]


def _describe_ranks(
    topology: Topology, allowed: frozenset[int], nproc: int | None, modes: Sequence[AffinityMode]
) -> tuple[list[str], bool]:
    has_gpus = bool(visible_gpus(topology))
    placed = slots(topology, allowed, None if has_gpus else nproc)
    count = nproc if nproc is not None else len(placed)
    notes: list[str] = []  # the error messages, numbered by first appearance
    rows = []
    for rank in range(count):
        try:
            slot: Slot | None = slot_of(rank, placed)
        except NumaBindingError as err:
            slot, cells = None, [_note(notes, str(err))] * len(modes)
        if slot is not None:
            cells = [_cell(mode, slot, topology, allowed, notes) for mode in modes]
        gpu = [slot.label.removeprefix("GPU ") if slot else "-"] if has_gpus else []
        rows.append([str(rank), *gpu, "-" if slot is None else str(slot.node), *cells])
    header = ["rank", *(["GPU"] if has_gpus else []), "on node", *(mode.value for mode in modes)]
    lines = [f"CPUs for {_count(count, 'local rank')} ({_rank_source(has_gpus, nproc)}):", *_table(header, rows)]
    lines += ["", *(f"[{number}] {note}" for number, note in enumerate(notes, 1))] if notes else []
    return lines, bool(notes)


def _cell(mode: AffinityMode, slot: Slot, topology: Topology, allowed: frozenset[int], notes: list[str]) -> str:
    try:
        return format_cpulist(cpus_in_mode(mode, slot, topology, allowed))
    except NumaBindingError as err:
        return _note(notes, str(err))


def _note(notes: list[str], message: str) -> str:
    if message not in notes:
        notes.append(message)
    return f"error [{notes.index(message) + 1}]"


def _rank_source(has_gpus: bool, nproc: int | None) -> str:
    if nproc is not None:
        return "--nproc"
    if has_gpus:
        return "one per visible GPU"
    return "$LOCAL_WORLD_SIZE" if "LOCAL_WORLD_SIZE" in os.environ else "one per NUMA node with allowed CPUs"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    return ["  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
