"""asyncproc: async-first process supervision on anyio (asyncio, uvloop, trio).

Public names are re-exported here; the modules behind them are private (``_x.py``),
except ``asyncproc.numa``.
"""

from __future__ import annotations

from ._errorfile import record
from ._exceptions import AsyncprocError, ChildCrashed, LaunchFailed, MemoryLimitExceeded, RemoteError
from ._handler import SubprocessHandler, get_subprocess_handler
from ._isolated import Isolated, safe_call, safe_call_sync
from ._launcher import LaunchConfig, LaunchResult, RankResult, start_processes
from .numa import AffinityMode, NumaOptions

__version__ = "0.1.0"

__all__ = [
    "AffinityMode",
    "AsyncprocError",
    "ChildCrashed",
    "Isolated",
    "LaunchConfig",
    "LaunchFailed",
    "LaunchResult",
    "MemoryLimitExceeded",
    "NumaOptions",
    "RankResult",
    "RemoteError",
    "SubprocessHandler",
    "get_subprocess_handler",
    "record",
    "safe_call",
    "safe_call_sync",
    "start_processes",
]
