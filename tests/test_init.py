"""The package's public surface: lazy re-exports that behave like plain ones."""

from __future__ import annotations

import subprocess
import sys

import asyncproc


def test_all_names_every_export_and_each_resolves() -> None:
    assert asyncproc.__all__ == sorted(asyncproc._EXPORTS)
    for name in asyncproc.__all__:
        assert getattr(asyncproc, name) is not None
    assert asyncproc.numa.NumaOptions is asyncproc.NumaOptions


def test_unknown_attribute_is_an_attribute_error() -> None:
    try:
        asyncproc.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


def test_importing_the_fork_server_stays_lean() -> None:
    # Every page the fork server holds is copied into and torn down with each worker.
    code = "import sys, asyncproc._server; print(sorted(m for m in ('anyio', 'trio', 'psutil', 'cloudpickle') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
