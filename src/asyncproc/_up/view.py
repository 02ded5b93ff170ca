"""What a person sees: the status table (live, or once for ``ctl status``) and event lines.

Rows are plain JSON-able dicts (``app.Rows``), so ``ctl status`` draws from the socket's
answer exactly the table ``up`` draws live. rich is imported here only, and this module
only by the command line.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

__all__ = ["table", "print_status", "LiveView", "human_duration", "human_bytes"]

_STATE_STYLE = {"running": "green", "starting": "cyan", "backoff": "yellow", "stopped": "dim", "ended": "red"}
COLUMNS = ("NAME", "PID", "STATE", "UPTIME", "RESTARTS", "CPU %", "RSS", "LAST EXIT")


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def human_bytes(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def table(rows: Sequence[dict[str, Any]], events: Sequence[str] = (), title: str | None = None) -> RenderableType:
    grid = Table(title=title, title_justify="left", expand=False)
    for column in COLUMNS:
        grid.add_column(column, justify="right" if column in ("PID", "RESTARTS", "CPU %", "RSS") else "left",
                        no_wrap=True)
    for row in rows:
        state = str(row.get("state"))
        cpu = row.get("cpu")
        grid.add_row(
            str(row["name"]), str(row.get("pid") or "-"), Text(state, style=_STATE_STYLE.get(state, "")),
            human_duration(row.get("uptime")), str(row.get("restarts", 0)),
            "-" if cpu is None else f"{cpu:.1f}", human_bytes(row.get("rss")), str(row.get("last_exit") or "-"),
        )
    if not events:
        return grid
    return Group(grid, Text("\n".join(events), style="dim"))


def print_status(rows: Sequence[dict[str, Any]], events: Sequence[str] = (), file: TextIO | None = None) -> None:
    Console(file=file or sys.stdout, highlight=False).print(table(rows, events))


class LiveView:
    """The table redrawn in place; program output and notices are printed above it."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.console = Console(highlight=False)
        # auto_refresh off: we redraw from the event loop when something changed (and
        # once a second for uptime and CPU), so rich's own thread never races our writes.
        self.live = Live(console=self.console, auto_refresh=False, transient=False, redirect_stdout=False,
                         redirect_stderr=False)

    def __enter__(self) -> LiveView:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.__exit__(None, None, None)

    def update(self, rows: Sequence[dict[str, Any]], events: Sequence[str]) -> None:
        self.live.update(table(rows, events, title=self.title), refresh=True)

    def print_lines(self, text: str) -> None:
        """Whole lines above the table (rich moves the table down)."""
        self.console.print(Text(text.rstrip("\n")), soft_wrap=True)
