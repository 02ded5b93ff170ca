"""The guardian process: kills a parent's children when the parent dies.

Run as a script (``python -I -S .../guardian_main.py``), never imported into it, so the
guardian boots in a few milliseconds with nothing but the standard library. The parent side
lives in ``guardian.py`` and imports the /proc helpers below.

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

COMM = "asyncproc-srv"  # the name the test suite's leak check accepts as long-lived
MAX_SWEEPS = 10  # a fork bomb could outrun one sweep; stop retrying after this many
CGROUP_EMPTY_BOUND_S = 2.0  # after cgroup.kill; only uninterruptible sleep takes longer


class Stat(NamedTuple):
    """The fields of /proc/PID/stat that identify a process and its family."""

    ppid: int
    pgrp: int
    session: int
    starttime: int  # clock ticks after boot: with the pid, unique for the machine's uptime
    zombie: bool


def read_stat(pid: int) -> Stat | None:
    """``pid``'s stat, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself hold ") " or spaces:
    # split after the *last* closing parenthesis.
    fields = raw[raw.rindex(b")") + 2 :].split()
    return Stat(
        ppid=int(fields[1]),
        pgrp=int(fields[2]),
        session=int(fields[3]),
        starttime=int(fields[19]),
        zombie=fields[0] == b"Z",
    )


def scan() -> dict[int, Stat]:
    """Every process on the machine (in our pid namespace)."""
    table: dict[int, Stat] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = read_stat(int(name))
            if stat is not None:
                table[int(name)] = stat
    return table


def family(roots: dict[int, int], table: dict[int, Stat]) -> dict[int, int]:
    """Living processes that belong to ``roots`` (pid -> starttime): the roots that are still
    themselves, their descendants, and members of a group or session a root leads.

    A group or session id stays reserved while any member lives (the kernel frees a pid
    number only when no task uses it as pid, group or session id), so a member of group
    ``R`` is ours even after root ``R`` itself was reaped -- unless ``R`` now names another
    process, which proves our group is empty.
    """
    mine: set[int] = set()
    leaders: set[int] = set()
    for pid, start in roots.items():
        stat = table.get(pid)
        if stat is None:
            leaders.add(pid)
        elif stat.starttime == start:
            mine.add(pid)
            leaders.add(pid)
    children: dict[int, list[int]] = {}
    for pid, stat in table.items():
        children.setdefault(stat.ppid, []).append(pid)
        if stat.pgrp in leaders or stat.session in leaders:
            mine.add(pid)
    pending = list(mine)
    while pending:
        for child in children.get(pending.pop(), ()):
            if child not in mine:
                mine.add(child)
                pending.append(child)
    return {pid: table[pid].starttime for pid in mine if not table[pid].zombie}


def kill_exactly(pid: int, starttime: int, sig: int = signal.SIGKILL) -> None:
    """Signal ``pid`` only if it is still the process that started at ``starttime``.

    Through a pidfd: once it is open, the pid cannot be recycled under us, so checking
    the start time and then signalling is free of races.
    """
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        stat = read_stat(pid)
        if stat is not None and stat.starttime == starttime:
            signal.pidfd_send_signal(fd, sig)
    except OSError:
        pass
    finally:
        os.close(fd)


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


def sweep(roots: dict[int, int], markers: set[bytes] = frozenset()) -> None:  # type: ignore[assignment]
    """SIGKILL everything that belongs to ``roots`` or carries one of ``markers``, again
    until nothing new turns up (a process may fork between our scan and our signal)."""
    killed: set[tuple[int, int]] = set()
    for _ in range(MAX_SWEEPS):
        table = scan()
        found = (set(family(roots, table).items()) | set(marked(markers, table).items())) - killed
        if not found:
            return
        for pid, start in found:
            kill_exactly(pid, start)
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


def end_cgroups(paths: list[str]) -> None:
    """``cgroup.kill`` each cgroup (its children too), wait (bounded) and remove them."""
    if not paths:
        return
    import importlib.util  # only now: most guardians never see a cgroup

    # Loaded by path: we run with -I -S, outside the package, and it needs only the stdlib.
    spec = importlib.util.spec_from_file_location(
        "_asyncproc_cgroup", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_proc", "cgroup.py")
    )
    assert spec is not None and spec.loader is not None
    cgroup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cgroup)
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
    reg = read_registrations(sys.stdin.fileno())
    sweep(reg.roots, reg.markers)
    end_cgroups(list(reg.cgroups))
    remove_folders(list(reg.folders))  # last: the processes writing into them are dead


if __name__ == "__main__":
    main()
