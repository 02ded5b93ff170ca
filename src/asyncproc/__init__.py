"""asyncproc: async-first process supervision on anyio (asyncio, uvloop, trio).

Public names are re-exported here; the modules behind them are private (``_x.py``),
except ``asyncproc.numa``.

The re-exports are lazy (PEP 562): the fork server imports ``asyncproc._server``, and
every page it holds is copied into page tables and torn down again for every call it
forks (measured here: a worker's exit takes 0.7 ms from an 11 MB server and 1.5 ms from a
14 MB one). So importing the package must not drag in anyio, trio and psutil.
"""

from __future__ import annotations

import importlib
TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (and re) at run time

if TYPE_CHECKING:
    from typing import Any

    from . import numa as numa  # the public submodule
    from ._errorfile import record
    from ._exceptions import AsyncprocError, ChildCrashed, LaunchFailed, MemoryLimitExceeded, RemoteError, SupervisorGaveUp
    from ._handler import SubprocessHandler, get_subprocess_handler
    from ._isolated import Isolated, preload, safe_call, safe_call_sync
    from ._launcher import LaunchConfig, LaunchResult, RankResult, start_processes
    from ._specs import Backoff, Call, ChildStatus, Command, Event, Task
    from ._supervisor import Supervisor
    from .numa import AffinityMode, NumaOptions

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "AffinityMode": ".numa",
    "AsyncprocError": "._exceptions",
    "Backoff": "._specs",
    "Call": "._specs",
    "ChildCrashed": "._exceptions",
    "ChildStatus": "._specs",
    "Command": "._specs",
    "Event": "._specs",
    "Isolated": "._isolated",
    "LaunchConfig": "._launcher",
    "LaunchFailed": "._exceptions",
    "LaunchResult": "._launcher",
    "MemoryLimitExceeded": "._exceptions",
    "NumaOptions": ".numa",
    "RankResult": "._launcher",
    "RemoteError": "._exceptions",
    "SubprocessHandler": "._handler",
    "Supervisor": "._supervisor",
    "SupervisorGaveUp": "._exceptions",
    "Task": "._specs",
    "get_subprocess_handler": "._handler",
    "preload": "._isolated",
    "record": "._errorfile",
    "safe_call": "._isolated",
    "safe_call_sync": "._isolated",
    "start_processes": "._launcher",
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
    try:
        module = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'asyncproc' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted([*__all__, "numa", "__version__"])
