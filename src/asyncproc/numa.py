"""NUMA binding: which CPUs and memory nodes a local rank should use, and binding a child
to them from its first instruction.

A port of ``torch.numa.binding`` that needs neither torch nor the ``numactl`` program: the
topology comes from sysfs, CPU affinity from ``os.sched_setaffinity`` and the memory policy
from the ``set_mempolicy`` syscall.

Choosing::

    options = NumaOptions(AffinityMode.EXCLUSIVE)
    cpus = cpus_for(options, local_rank_id=1, local_world_size=8)     # frozenset[int]
    binding = binding_for(options, 1, 8)                               # Binding | None

Applying: CPU affinity and memory policy belong to a *thread* and are inherited by a child
that thread forks, vforks or posix_spawns. So binding the spawning thread for the duration
of one synchronous spawn binds the child before it runs anything, and keeps CPython's vfork
fast path, which a ``preexec_fn`` would disable::

    with binding.on_this_thread():
        proc = subprocess.Popen(argv)

In a child that was forked without exec, ``binding.apply_to_current_thread()`` binds it.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum

from ._exceptions import NumaBindingError
from ._numa import memory as _numa_memory
from ._numa.place import cpus_in_mode, slot_of, slots
from ._numa.topology import Gpu, Topology, format_cpulist, parse_cpulist
from ._validate import check_count, check_flag

# Defined below this module to keep the imports one-way; shown (and pickled) as public names.
for _public in (Gpu, Topology):
    _public.__module__ = __name__
del _public

__all__ = [
    "AffinityMode",
    "Binding",
    "Gpu",
    "NumaBindingError",
    "NumaOptions",
    "Topology",
    "as_numa_options",
    "binding_for",
    "cpus_for",
    "format_cpulist",
    "parse_cpulist",
    "system_topology",
]

logger = logging.getLogger("asyncproc.numa")


class AffinityMode(str, Enum):
    """Which CPUs near its GPU (or its node) a local rank gets; see each member.

    A ``str`` enum: ``AffinityMode("core-complex")`` and ``NumaOptions("node")`` work too.
    """

    __module__ = "asyncproc"  # re-exported there: shown and pickled as asyncproc.AffinityMode

    NODE = "node"
    """Every CPU of the NUMA node of the rank's GPU. If in doubt, use this."""
    SOCKET = "socket"
    """Every CPU of every node on that node's socket."""
    EXCLUSIVE = "exclusive"
    """A disjoint slice of the node's physical cores (with their SMT siblings) per GPU."""
    CORE_COMPLEX = "core-complex"
    """One last-level-cache group (an AMD CCX/CCD, an Intel sub-NUMA cluster) of the node."""

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class NumaOptions:
    """How to bind local ranks.

    ``affinity_mode`` takes an :class:`AffinityMode` or its value (``"exclusive"``).
    ``should_fall_back_if_binding_fails``: when a binding cannot be made or the kernel
    refuses it, log a warning to the ``asyncproc.numa`` logger and run unbound instead of
    raising :class:`NumaBindingError`. ``strict_memory``: bind memory to the nodes of the
    chosen CPUs (``MPOL_BIND``: an allocation they cannot satisfy fails) instead of
    preferring them (the default, which spills to other nodes when they are full).
    """

    __module__ = "asyncproc"  # re-exported there: shown and pickled as asyncproc.NumaOptions

    affinity_mode: AffinityMode
    should_fall_back_if_binding_fails: bool = False
    strict_memory: bool = field(default=False, kw_only=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "affinity_mode", _affinity_mode(self.affinity_mode))
        _check_bool("should_fall_back_if_binding_fails", self.should_fall_back_if_binding_fails)
        _check_bool("strict_memory", self.strict_memory)


def as_numa_options(options: object, name: str = "options") -> NumaOptions:
    """``options`` as our :class:`NumaOptions`: ours as is, or torch's own
    ``torch.numa.binding.NumaOptions`` (or anything with the same field names), converted,
    so code ported from torch passes what it has. TypeError for anything else."""
    if isinstance(options, NumaOptions):
        return options
    if not hasattr(options, "affinity_mode"):
        raise TypeError(f"{name} must be a NumaOptions, got {options!r} (asyncproc's, or torch's with the same fields)")
    mode = options.affinity_mode
    return NumaOptions(
        _affinity_mode(mode.value if isinstance(mode, Enum) else mode),
        getattr(options, "should_fall_back_if_binding_fails", False),
    )


def _affinity_mode(value: object) -> AffinityMode:
    if isinstance(value, AffinityMode):
        return value
    choices = ", ".join(repr(mode.value) for mode in AffinityMode)
    if not isinstance(value, str):
        raise TypeError(f"affinity_mode must be an AffinityMode or one of {choices}, got {value!r}")
    try:
        return AffinityMode(value)
    except ValueError:
        raise ValueError(f"affinity_mode must be one of {choices}, got {value!r}") from None


def _check_bool(name: str, value: object) -> None:
    check_flag(name, value)


def _check_int(name: str, value: object, minimum: int) -> int:
    return check_count(name, value, minimum=minimum)


def _int_set(name: str, values: Iterable[int], *, allow_empty: bool) -> frozenset[int]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be an iterable of ints, got {values!r}")
    found = frozenset(_check_int(f"each of {name}", value, 0) for value in values)
    if not found and not allow_empty:
        raise ValueError(f"{name} must not be empty")
    return found


# -- the binding ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Binding:
    """A CPU set and the NUMA nodes whose memory goes with it, ready to apply to a thread.

    ``nodes`` are the nodes, with memory, of ``cpus``; empty means the memory policy is
    left alone. ``strict_memory`` and ``should_fall_back_if_binding_fails`` come from
    :class:`NumaOptions`.
    """

    cpus: frozenset[int]
    nodes: frozenset[int] = frozenset()
    strict_memory: bool = False
    should_fall_back_if_binding_fails: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "cpus", _int_set("cpus", self.cpus, allow_empty=False))
        object.__setattr__(self, "nodes", _int_set("nodes", self.nodes, allow_empty=True))
        _check_bool("strict_memory", self.strict_memory)
        _check_bool("should_fall_back_if_binding_fails", self.should_fall_back_if_binding_fails)

    def apply_to_current_thread(self) -> None:
        """Bind the calling thread, and every thread and child it starts afterwards.

        Meant for a freshly forked child, where the calling thread is the only one.
        Raises :class:`NumaBindingError` when the kernel refuses, leaving the thread as it
        was, unless ``should_fall_back_if_binding_fails`` (then it logs and goes on).
        """
        self._apply()

    @contextmanager
    def on_this_thread(self) -> Iterator[Binding]:
        """Bind the calling thread inside the block; restore its affinity and memory policy
        after it.

        Wrap exactly one synchronous spawn (``subprocess.Popen``, ``os.posix_spawn``) made
        *on this thread*: the child inherits the binding from its first instruction. Do not
        ``await`` inside: other tasks of the event loop would run bound meanwhile.
        """
        saved = self._apply()
        try:
            yield self
        except BaseException:
            self._restore(saved, raising=False)  # never hide what the block raised
            raise
        self._restore(saved, raising=True)

    # What the thread had before, to put back: None where we changed nothing.
    def _apply(self) -> tuple[set[int] | None, _numa_memory.MemoryPolicy | None]:
        previous_cpus = os.sched_getaffinity(0)
        try:
            os.sched_setaffinity(0, self.cpus)  # 0: the calling thread, on Linux
        except OSError as err:
            self._refused(f"the kernel refused CPU affinity {format_cpulist(self.cpus)}", err)
            return None, None
        try:
            return previous_cpus, self._apply_memory_policy()
        except BaseException:
            os.sched_setaffinity(0, previous_cpus)  # leave the thread as we found it
            raise

    def _apply_memory_policy(self) -> _numa_memory.MemoryPolicy | None:
        if not self.nodes:
            return None
        kind = "bind" if self.strict_memory else "preferred"
        try:
            previous = _numa_memory.current()
            (_numa_memory.bind if self.strict_memory else _numa_memory.prefer)(self.nodes)
        except OSError as err:
            what = f"the kernel refused the {kind} memory policy on nodes {format_cpulist(self.nodes)}"
            if self.strict_memory:
                self._refused(what, err, memory=True)
            else:
                # A preferred node is advice (the kernel allocates near the bound CPUs anyway),
                # and the syscall is often forbidden (Docker's default seccomp profile) or
                # missing: never let it fail a binding whose CPUs are in place.
                _warn_once(f"{what}: {err.strerror or err}{_hint(err, True)}; keeping the CPU binding only")
            return None
        return previous

    def _restore(self, saved: tuple[set[int] | None, _numa_memory.MemoryPolicy | None], *, raising: bool) -> None:
        """Put both back, whatever fails: a spawning thread left bound would bind every
        later child to one rank's CPUs. Failing to restore is an error whatever the
        fallback flag says (it is about this thread, not the child); it is raised after both
        attempts when ``raising``, logged when an exception is already leaving the block."""
        previous_cpus, previous_policy = saved
        errors: list[str] = []
        if previous_cpus is not None:
            try:
                os.sched_setaffinity(0, previous_cpus)
            except OSError as err:
                errors.append(f"CPU affinity {format_cpulist(previous_cpus)}: {err.strerror or err}")
        if previous_policy is not None:
            try:
                _numa_memory.restore(previous_policy)
            except OSError as err:
                errors.append(f"memory policy: {err.strerror or err}")
        if errors:
            message = "could not restore the spawning thread's " + "; ".join(errors)
            if not raising:
                logger.error("%s", message)
            else:
                raise NumaBindingError(message)

    def _refused(self, what: str, err: OSError, *, memory: bool = False) -> None:
        error = NumaBindingError(f"{what}: {err.strerror or err}{_hint(err, memory)}")
        if not self.should_fall_back_if_binding_fails:
            raise error from err
        logger.warning("%s; going on without it (should_fall_back_if_binding_fails=True)", error)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning("%s", message)


def _hint(err: OSError, memory: bool) -> str:
    if err.errno == errno.EINVAL:
        if memory:
            return " (the nodes have no memory, or are outside this cgroup's cpuset.mems)"
        return " (the CPUs are offline, or outside this cgroup's cpuset)"
    if err.errno == errno.EPERM:
        return " (forbidden, e.g. by a seccomp profile such as Docker's default without CAP_SYS_NICE)"
    if err.errno == errno.ENOSYS:
        return " (this kernel or architecture lacks the syscall)"
    return ""


# -- choosing CPUs ----------------------------------------------------------------------------


def cpus_for(
    options: NumaOptions,
    local_rank_id: int,
    local_world_size: int | None = None,
    topology: Topology | None = None,
    allowed: Iterable[int] | None = None,
) -> frozenset[int]:
    """The CPUs local rank ``local_rank_id`` should run on; always inside ``allowed``.

    ``topology`` defaults to :func:`system_topology` (/sys, read once), ``allowed`` to
    ``os.sched_getaffinity(0)``. ``local_world_size`` defaults to ``$LOCAL_WORLD_SIZE``,
    else (without GPUs) to the number of NUMA nodes that have allowed CPUs; with GPUs it
    only bounds ``local_rank_id``. When the binding cannot be made and
    ``options.should_fall_back_if_binding_fails``, returns all of ``allowed`` (unbound).
    """
    allowed_set = _allowed_set(allowed)
    binding = binding_for(options, local_rank_id, local_world_size, topology=topology, allowed=allowed_set)
    return allowed_set if binding is None else binding.cpus


@functools.lru_cache(maxsize=1)
def system_topology() -> Topology:
    """This machine's topology, read from /sys once per process.

    Reading /sys takes milliseconds (more on big machines), longer than the spawn it binds;
    a launcher binds every rank. What can change at run time is read on every call instead:
    the allowed CPU set and CUDA_VISIBLE_DEVICES. After CPU or GPU hotplug, call
    ``system_topology.cache_clear()``.
    """
    return Topology.from_sysfs("/sys")


def binding_for(
    options: NumaOptions,
    local_rank_id: int,
    local_world_size: int | None = None,
    *,
    topology: Topology | None = None,
    allowed: Iterable[int] | None = None,
) -> Binding | None:
    """The :class:`Binding` of local rank ``local_rank_id``, as :func:`cpus_for` chooses it.

    None when it cannot be made and ``options.should_fall_back_if_binding_fails`` (a
    warning is logged): run unbound. Raises :class:`NumaBindingError` otherwise.
    """
    options = as_numa_options(options)
    _check_int("local_rank_id", local_rank_id, 0)
    if local_world_size is not None:
        _check_int("local_world_size", local_world_size, 1)
        if local_rank_id >= local_world_size:
            raise ValueError(f"local_rank_id must be < local_world_size ({local_world_size}), got {local_rank_id}")
    if topology is not None and not isinstance(topology, Topology):
        raise TypeError(f"topology must be a Topology or None, got {topology!r}")
    allowed_set = _allowed_set(allowed)
    try:
        topo = topology if topology is not None else system_topology()
        slot = slot_of(local_rank_id, slots(topo, allowed_set, local_world_size))
        cpus = cpus_in_mode(options.affinity_mode, slot, topo, allowed_set)
    except NumaBindingError as err:
        if not options.should_fall_back_if_binding_fails:
            raise
        logger.warning(
            "NUMA binding of local rank %d in %s mode failed, running unbound: %s", local_rank_id, options.affinity_mode, err
        )
        return None
    nodes = frozenset(node for node, node_cpus in topo.nodes.items() if node_cpus & cpus and node in topo.memory_nodes)
    return Binding(cpus, nodes, options.strict_memory, options.should_fall_back_if_binding_fails)


def _allowed_set(allowed: Iterable[int] | None) -> frozenset[int]:
    if allowed is None:
        return frozenset(os.sched_getaffinity(0))
    return _int_set("allowed", allowed, allow_empty=False)
