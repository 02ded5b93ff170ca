"""/proc and pidfd helpers that need nothing but the standard library.

Shared by the library (``proctree``, the guardian's parent side, handlers) and by the
guardian itself, which runs as a script (``python -I -S``) outside the package and loads
this file by the path its parent gives it. So: stdlib only, and no package-relative import.

A pid alone names no process for sure: once a process is reaped its pid may be reused.
(pid, start time) does, for the machine's uptime, and a pidfd does for as long as it is
open, so the safe order is: open a pidfd, *then* check the start time, then act through
the pidfd.
"""

from __future__ import annotations

import os
import signal
from typing import NamedTuple

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Stat", "read_stat", "scan", "family", "pidfd_if", "pidfd_exactly", "signal_pidfd", "kill_exactly"]


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


def pidfd_if(pid: int, same: Callable[[], bool]) -> int | None:
    """A pidfd on ``pid`` if ``same()``, asked *after* it is open, says it is still the
    process meant; None otherwise, or where the kernel has no pidfds (< 5.3).

    The pid may be recycled between a snapshot and ``pidfd_open``; once the pidfd is open
    it no longer can be, so a check made then holds for as long as the pidfd is open.
    """
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None
    try:
        if same():
            return fd
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def pidfd_exactly(pid: int, starttime: int) -> int | None:
    """A pidfd on ``pid`` only if it is still the process that started at ``starttime``
    (field 22 of its stat)."""

    def same() -> bool:
        stat = read_stat(pid)
        return stat is not None and stat.starttime == starttime

    return pidfd_if(pid, same)


def signal_pidfd(fd: int, sig: int) -> None:
    """Send ``sig`` through a pidfd; a process that is gone (or not ours to signal) is fine."""
    try:
        signal.pidfd_send_signal(fd, sig)
    except OSError:
        pass


def kill_exactly(pid: int, starttime: int, sig: int = signal.SIGKILL) -> None:
    """Signal ``pid`` only if it is still the process that started at ``starttime``."""
    fd = pidfd_exactly(pid, starttime)
    if fd is not None:
        try:
            signal_pidfd(fd, sig)
        finally:
            os.close(fd)
