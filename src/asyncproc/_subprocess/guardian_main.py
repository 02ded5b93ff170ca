"""The guardian process: kills a parent's children when the parent dies.

Run as a script (``python -I -S .../guardian_main.py PROCFS CGROUP``), never imported into
it, so the guardian boots in a few milliseconds with nothing but the standard library. The
parent side lives in ``guardian.py``. The /proc, pidfd and cgroup helpers are the process
core's own stdlib-only modules (``_proc/procfs.py``, ``_proc/cgroup.py``), loaded from the
paths the parent passes (their ``__file__``): the library and the guardian share one copy.

Protocol, on stdin (the read end of the parent's *lifeline* pipe; only the parent holds the
write end)::

    +PID STARTTIME\\n     a child was spawned (STARTTIME: field 22 of /proc/PID/stat)
    -PID\\n               that child was reaped; forget it
    CHEXPATH\\n           a cgroup (path hex-encoded): kill everything in it, then remove it
    cHEXPATH\\n           that cgroup was removed; forget it
    DHEXPATH\\n           a folder (a launcher's temporary one) to remove once all is dead
    dHEXPATH\\n           that folder was removed; forget it
    EHEXENTRY\\n          an environment entry (NAME=VALUE) our children's descendants carry:
                         kill every process that has it (where there are no cgroups)

End of file means the parent is gone (died, or exited and closed the pipe): every still
registered child, its descendants, its process group and its session are SIGKILLed, then the
guardian exits. Data written before the parent died is still read before EOF, so a child
registered a microsecond before a SIGKILL of the parent is covered too. Cgroups catch
what the scans cannot: a descendant that double-forked and called ``setsid()`` (then
re-parented to init or to a subreaper that is dying with the parent).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import NamedTuple

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType

    from .._proc.procfs import Stat

COMM = "asyncproc-srv"  # the name the test suite's leak check accepts as long-lived
MAX_SWEEPS = 10  # a fork bomb could outrun one sweep; stop retrying after this many
CGROUP_EMPTY_BOUND_S = 2.0  # after cgroup.kill; only uninterruptible sleep takes longer


def marked(markers: set[bytes], table: dict[int, Stat]) -> dict[int, int]:
    """Processes of ``table`` whose environment holds one of ``markers`` (``NAME=VALUE``
    entries): what the parent's children started inherits them, wherever it went since
    (a double fork and ``setsid()`` leave no trace in the tree, the group or the session)."""
    found: dict[int, int] = {}
    if not markers:
        return found
    for pid, stat in table.items():
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                entries = f.read().split(b"\0")
        except OSError:  # gone, or another user's
            continue
        if not stat.zombie and not markers.isdisjoint(entries):
            found[pid] = stat.starttime
    return found


def sweep(procfs: ModuleType, roots: dict[int, int], markers: set[bytes] = frozenset()) -> None:  # type: ignore[assignment]
    """SIGKILL everything that belongs to ``roots`` or carries one of ``markers``, again
    until nothing new turns up (a process may fork between our scan and our signal)."""
    killed: set[tuple[int, int]] = set()
    for _ in range(MAX_SWEEPS):
        table = procfs.scan()
        found = (set(procfs.family(roots, table).items()) | set(marked(markers, table).items())) - killed
        if not found:
            return
        for pid, start in found:
            procfs.kill_exactly(pid, start)
        killed |= found


class Registrations(NamedTuple):
    roots: dict[int, int]  # pid -> start time
    cgroups: dict[str, None]  # ordered sets
    folders: dict[str, None]
    markers: set[bytes]


def read_registrations(fd: int) -> Registrations:
    """Follow the lifeline until EOF; what is still registered then."""
    reg = Registrations({}, {}, {}, set())
    pending = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except InterruptedError:  # pragma: no cover - PEP 475 retries for us
            continue
        except OSError:
            chunk = b""
        if not chunk:
            return reg
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            apply(reg, line)


def apply(reg: Registrations, line: bytes) -> None:
    """One protocol line: ``+PID STARTTIME`` registers, ``-PID`` forgets; ``C``/``D``/``d``
    register a cgroup, register and forget a folder."""
    kind, rest = line[:1], line[1:]
    if kind == b"+":
        pid, start = rest.split()
        reg.roots[int(pid)] = int(start)
    elif kind == b"-":
        reg.roots.pop(int(rest), None)
    elif kind == b"C":
        reg.cgroups[os.fsdecode(bytes.fromhex(rest.decode()))] = None
    elif kind == b"c":
        reg.cgroups.pop(os.fsdecode(bytes.fromhex(rest.decode())), None)
    elif kind == b"D":
        reg.folders[os.fsdecode(bytes.fromhex(rest.decode()))] = None
    elif kind == b"d":
        reg.folders.pop(os.fsdecode(bytes.fromhex(rest.decode())), None)
    elif kind == b"E":
        reg.markers.add(bytes.fromhex(rest.decode()))


def load_core(path: str) -> ModuleType:
    """One of the process core's stdlib-only modules, from the path our parent gave (its
    ``__file__``): we run with -I -S, outside the package, so it cannot be imported."""
    import importlib.util

    name = "_asyncproc_" + os.path.basename(path).partition(".")[0]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def end_cgroups(cgroup_path: str, paths: list[str]) -> None:
    """``cgroup.kill`` each cgroup (its children too), wait (bounded) and remove them."""
    if not paths:
        return
    cgroup = load_core(cgroup_path)  # only now: most guardians never see a cgroup
    for path in paths:
        cgroup.kill(path)
    for path in paths:
        cgroup.wait_empty(path, CGROUP_EMPTY_BOUND_S)
        cgroup.remove(path)


def remove_folders(paths: list[str]) -> None:
    import shutil

    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(COMM)
    except OSError:
        pass
    # Ctrl-C and terminal hang-ups are meant for the parent; we end only by lifeline EOF
    # (and we run in our own session, so a kill of the parent's group misses us).
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    procfs_path, cgroup_path = sys.argv[1:3]
    procfs = load_core(procfs_path)  # now, not at EOF: the kills must not wait for imports
    reg = read_registrations(sys.stdin.fileno())
    sweep(procfs, reg.roots, reg.markers)
    end_cgroups(cgroup_path, list(reg.cgroups))
    remove_folders(list(reg.folders))  # last: the processes writing into them are dead


if __name__ == "__main__":
    main()
