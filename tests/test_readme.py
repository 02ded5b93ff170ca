"""The README's first commands are what newcomers and CI run: keep them true."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^    (python3 -m venv .*)$", text, flags=re.MULTILINE)[:2]


def test_readme_opens_with_demo_and_test_commands() -> None:
    demo, tests = _commands()
    assert demo.endswith("python -m asyncproc demo")
    assert "'.[test]'" in tests and tests.endswith("python -m pytest -q")


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run makes the README's venv with the lint extra added, lints, then runs the
    README's pytest command: what passes in CI passes for a newcomer, and the reverse."""
    _, tests = _commands()
    venv, install, pytest_command = tests.split(" && ")
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    setup = venv + " && " + install.replace("'.[test]'", "'.[test,lint]'")
    assert setup in lines
    assert pytest_command in lines
    checks = [".venv/bin/ruff check .", ".venv/bin/mypy"]
    assert all(lines.index(setup) < lines.index(check) < lines.index(pytest_command) for check in checks)
    assert "set -euo pipefail" in lines  # a finding fails the run


def test_demo_runs(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "asyncproc", "demo"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "SIGSEGV" in out.stdout and "TimeoutError" in out.stdout and "port out of range" in out.stdout
