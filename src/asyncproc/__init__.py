"""asyncproc: async-first process supervision on anyio (asyncio, uvloop, trio).

Public names are re-exported here; the modules behind them are private (``_x.py``),
except ``asyncproc.numa``.
"""

from __future__ import annotations

from ._exceptions import AsyncprocError, ChildCrashed, MemoryLimitExceeded, RemoteError
from ._isolated import Isolated, safe_call, safe_call_sync

__version__ = "0.1.0"

__all__ = [
    "AsyncprocError",
    "ChildCrashed",
    "Isolated",
    "MemoryLimitExceeded",
    "RemoteError",
    "safe_call",
    "safe_call_sync",
]
