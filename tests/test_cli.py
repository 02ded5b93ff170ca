"""The command line: every sub-command is wired, and bad usage says what was wrong."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "asyncproc", *args], capture_output=True, text=True, timeout=60)


def test_help_lists_every_command() -> None:
    out = run("--help")
    assert out.returncode == 0
    for command in ("demo", "run", "numa"):
        assert command in out.stdout


def test_unknown_command_is_an_error() -> None:
    out = run("launch")
    assert out.returncode == 2 and "invalid choice: 'launch'" in out.stderr


def test_console_script_matches_module() -> None:
    script = Path(sys.executable).parent / "asyncproc"  # installed next to this interpreter
    exe = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert exe.returncode == 0 and "demo" in exe.stdout


def test_version() -> None:
    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"asyncproc {importlib.metadata.version('asyncproc')}"
