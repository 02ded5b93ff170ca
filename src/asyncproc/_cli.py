"""``asyncproc`` / ``python -m asyncproc``: one sub-command per module that owns it.

Each owning module exposes ``configure_parser(parser)`` and ``cli(args) -> int``; this file
only wires them, so adding a command is one line here.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

import asyncproc

# command -> (module, one-line help)
_COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("asyncproc._demo", "show isolated calls surviving a segfault, a timeout and an exception"),
    "run": ("asyncproc._launch.cli", "run NPROC local ranks of a command (torchrun's command line); the first failure stops them all"),
    "numa": ("asyncproc._numa.cli", "show this machine's NUMA topology and the CPUs each local rank would get"),
    "up": ("asyncproc._up.app", "run every program of a TOML file, supervised, with a live view"),
    "ctl": ("asyncproc._up.ctl", "control a running `asyncproc up`: status, start, stop, restart, reload, down"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asyncproc",
        description="Async-first process supervision: isolated calls, local-rank launcher, NUMA binding.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {asyncproc.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in _COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.configure_parser(command)
        command.set_defaults(_cli=module.cli)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args._cli(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
