"""The calling thread's memory policy, through the raw set_mempolicy/get_mempolicy syscalls.

Why raw syscalls through ctypes: glibc has no wrappers (they live in libnuma, which is often
not installed), and we need neither. Like CPU affinity, the policy belongs to the calling
thread and is inherited by a child it forks, vforks or posix_spawns.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass

from .._proc import proctree as _proctree

__all__ = ["MemoryPolicy", "bind", "current", "prefer", "restore"]

logger = logging.getLogger("asyncproc.numa")

# <linux/mempolicy.h>
MPOL_DEFAULT = 0
MPOL_PREFERRED = 1
MPOL_BIND = 2
MPOL_PREFERRED_MANY = 5  # Linux 5.15+

# (set_mempolicy, get_mempolicy) per architecture, from the kernel's syscall tables.
_SYSCALLS: dict[str, tuple[int, int]] = {
    "x86_64": (238, 239),
    "aarch64": (237, 236),  # the generic table, shared by the three below
    "riscv64": (237, 236),
    "loongarch64": (237, 236),
    "ppc64le": (261, 260),
    "ppc64": (261, 260),
    "s390x": (270, 269),
    "i686": (276, 275),
    "i386": (276, 275),
}
_MAX_NODES = 1024  # the kernel's largest MAX_NUMNODES (NODES_SHIFT 10)
_ULONG_BITS = ctypes.sizeof(ctypes.c_ulong) * 8
_NodeMask = ctypes.c_ulong * (_MAX_NODES // _ULONG_BITS)

@dataclass(frozen=True)
class MemoryPolicy:
    """A thread's policy as get_mempolicy reports it: mode (with its flags) and nodes."""

    mode: int
    nodes: frozenset[int]


def _syscall(index: int, *args: object) -> None:
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None:
        raise OSError(errno.ENOSYS, f"memory policy syscalls are not known on {platform.machine()}")
    syscall = _proctree.libc().syscall
    syscall.restype = ctypes.c_long
    if syscall(ctypes.c_long(numbers[index]), *args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _mask(nodes: Iterable[int]) -> ctypes.Array[ctypes.c_ulong]:
    mask = _NodeMask()
    for node in nodes:
        if not 0 <= node < _MAX_NODES:
            raise OSError(errno.EINVAL, f"NUMA node {node} is outside 0-{_MAX_NODES - 1}")
        mask[node // _ULONG_BITS] |= 1 << (node % _ULONG_BITS)
    return mask


def _set(mode: int, nodes: frozenset[int]) -> None:
    # maxnode counts one past the last bit the kernel reads (the long-standing off-by-one
    # that libnuma also passes); an empty set is sent as no mask at all.
    if nodes:
        _syscall(0, ctypes.c_int(mode), _mask(nodes), ctypes.c_ulong(_MAX_NODES + 1))
    else:
        _syscall(0, ctypes.c_int(mode), None, ctypes.c_ulong(0))


def current() -> MemoryPolicy:
    """The calling thread's policy. Raises ``OSError`` where the kernel refuses."""
    mode = ctypes.c_int(0)
    mask = _NodeMask()
    _syscall(1, ctypes.byref(mode), mask, ctypes.c_ulong(_MAX_NODES + 1), None, ctypes.c_ulong(0))
    nodes = frozenset(
        word * _ULONG_BITS + bit for word, value in enumerate(mask) for bit in range(_ULONG_BITS) if value >> bit & 1
    )
    return MemoryPolicy(mode.value, nodes)


def restore(policy: MemoryPolicy) -> None:
    """Put back a policy that :func:`current` returned."""
    _set(policy.mode, policy.nodes if policy.mode != MPOL_DEFAULT else frozenset())


def prefer(nodes: frozenset[int]) -> None:
    """Allocate on ``nodes`` while they have memory, elsewhere when they do not."""
    if len(nodes) > 1:
        try:
            _set(MPOL_PREFERRED_MANY, nodes)
            return
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise
            # Kernels before 5.15 know no "preferred many": prefer the lowest node alone.
            logger.debug("MPOL_PREFERRED_MANY refused (%s); preferring node %d only", err, min(nodes))
    _set(MPOL_PREFERRED, frozenset({min(nodes)}))


def bind(nodes: frozenset[int]) -> None:
    """Allocate on ``nodes`` only; an allocation they cannot satisfy fails (OOM)."""
    _set(MPOL_BIND, nodes)
