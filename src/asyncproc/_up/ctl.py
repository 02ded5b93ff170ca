"""``asyncproc ctl``: ask the running ``asyncproc up`` (through its socket) what runs, or to
change it. Plain blocking code: one request, one answer."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import control

__all__ = ["configure_parser", "cli"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.usage = "asyncproc ctl [--socket PATH] status [--json] | start NAME | stop NAME | restart NAME | reload | down"
    parser.add_argument("--socket", type=Path, help=f"the control socket of `up` (default: {control.default_socket_path()})")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    status = sub.add_parser("status", help="the table of children (and the last events)")
    status.add_argument("--json", action="store_true", help="a JSON list, one object per child, in start order")
    for action, text in (("start", "start a stopped child"), ("stop", "stop a child (it stays listed, stopped)"),
                         ("restart", "stop and start a child (not counted as a failure)")):
        sub.add_parser(action, help=text).add_argument("name", help="a child (web-0) or a program (web: all its replicas)")
    sub.add_parser("reload", help="re-read the file: start added programs, stop removed ones, restart changed ones")
    sub.add_parser("down", help="stop everything (reverse order) and end `up`")


def cli(args: argparse.Namespace) -> int:
    path = args.socket or control.default_socket_path()
    message = {"command": args.action}
    if getattr(args, "name", None) is not None:
        message["name"] = args.name
    try:
        result = control.request(path, message)
    except control.ControlError as exc:
        print(f"asyncproc ctl: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a timeout, a reset
        print(f"asyncproc ctl: {path}: {exc}", file=sys.stderr)
        return 1
    if args.action == "status":
        if args.json:
            print(json.dumps(result["children"], indent=2))
        else:
            from .view import print_status

            print_status(result["children"], result["events"])
    elif isinstance(result, list):
        print("\n".join(map(str, result)) or "nothing changed")
    else:
        print(result)
    return 0
