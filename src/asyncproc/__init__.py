"""asyncproc: async-first process supervision on anyio (asyncio, uvloop, trio).

Public names are re-exported here; the modules behind them are private (``_x.py``),
except ``asyncproc.numa``.

The re-exports are lazy (PEP 562): the fork server imports ``asyncproc._isolated.server``, and
every page it holds is copied into page tables and torn down again for every call it
forks (measured here: a worker's exit takes 0.7 ms from an 11 MB server and 1.5 ms from a
14 MB one). So importing the package must not drag in anyio, trio and psutil.
"""

from __future__ import annotations

import importlib
import sys

# Linux only (pidfds, prctl, /proc, set_mempolicy): say so on import, not with an
# AttributeError from deep inside the first call.
if sys.platform != "linux":
    raise ImportError(f"asyncproc runs on Linux only (it needs pidfds, prctl and /proc); this is {sys.platform!r}")

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (and re) at run time

if TYPE_CHECKING:
    from typing import Any

    from . import numa as numa  # the public submodule
    from ._exceptions import (
        AsyncprocError,
        ChildCrashed,
        LaunchFailed,
        MemoryLimitExceeded,
        RemoteError,
        SupervisorGaveUp,
    )
    from ._isolated.api import Isolated, preload, safe_call, safe_call_sync
    from ._launch.config import LaunchConfig, LaunchResult, RankResult
    from ._launch.errorfile import record
    from ._launch.launcher import start_processes
    from ._subprocess.handler import SubprocessHandler, get_subprocess_handler
    from ._supervise.specs import Backoff, Call, ChildStatus, Command, Event, Task
    from ._supervise.supervisor import Supervisor
    from .numa import AffinityMode, NumaOptions

# public name -> the module that defines it
_EXPORTS = {
    "AffinityMode": ".numa",
    "AsyncprocError": "._exceptions",
    "Backoff": "._supervise.specs",
    "Call": "._supervise.specs",
    "ChildCrashed": "._exceptions",
    "ChildStatus": "._supervise.specs",
    "Command": "._supervise.specs",
    "Event": "._supervise.specs",
    "Isolated": "._isolated.api",
    "LaunchConfig": "._launch.config",
    "LaunchFailed": "._exceptions",
    "LaunchResult": "._launch.config",
    "MemoryLimitExceeded": "._exceptions",
    "NumaOptions": ".numa",
    "RankResult": "._launch.config",
    "RemoteError": "._exceptions",
    "SubprocessHandler": "._subprocess.handler",
    "Supervisor": "._supervise.supervisor",
    "SupervisorGaveUp": "._exceptions",
    "Task": "._supervise.specs",
    "get_subprocess_handler": "._subprocess.handler",
    "preload": "._isolated.api",
    "record": "._launch.errorfile",
    "safe_call": "._isolated.api",
    "safe_call_sync": "._isolated.api",
    "start_processes": "._launch.launcher",
}

__all__ = [  # a literal, for linters and IDEs; tests/test_init.py keeps it equal to _EXPORTS
    "AffinityMode",
    "AsyncprocError",
    "Backoff",
    "Call",
    "ChildCrashed",
    "ChildStatus",
    "Command",
    "Event",
    "Isolated",
    "LaunchConfig",
    "LaunchFailed",
    "LaunchResult",
    "MemoryLimitExceeded",
    "NumaOptions",
    "RankResult",
    "RemoteError",
    "SubprocessHandler",
    "Supervisor",
    "SupervisorGaveUp",
    "Task",
    "get_subprocess_handler",
    "preload",
    "record",
    "safe_call",
    "safe_call_sync",
    "start_processes",
]


def __getattr__(name: str) -> Any:
    if name == "numa":
        return importlib.import_module(".numa", __name__)
    if name == "__version__":
        return _version()
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'asyncproc' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted([*__all__, "numa", "__version__"])


def _version() -> str:
    """The installed distribution's version: pyproject.toml is its one source. Read on
    first use (importlib.metadata is heavy, and the fork server imports this package)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("asyncproc")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"
