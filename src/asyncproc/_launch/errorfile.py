"""Error files, torch-elastic compatible: a rank's uncaught exception, written as JSON.

The launcher gives each rank ``ASYNCPROC_ERROR_FILE`` and ``TORCHELASTIC_ERROR_FILE`` (the
same path). ``@asyncproc.record`` on the rank's main function writes an uncaught exception
there in torch's format, so either tool reads the other's files::

    {"message": {"message": "ValueError: boom",
                 "extraInfo": {"py_callstack": "Traceback ...", "timestamp": "1700000000"}}}

This module imports only the standard library: a rank pays nothing for using it.
"""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import inspect
import json
import os
import stat
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar, cast

__all__ = ["ENV_VARS", "ErrorRecord", "read_error_file", "record", "write_error_file"]

# Read in this order; the launcher sets both to the same path.
ENV_VARS = ("ASYNCPROC_ERROR_FILE", "TORCHELASTIC_ERROR_FILE")
MAX_ERROR_FILE = 1 << 20  # bytes read at most from a rank's error file

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class ErrorRecord:
    """What a failed rank recorded: ``message`` ("ValueError: boom"), its traceback text,
    and when (seconds since the epoch; 0 when the file did not say)."""

    message: str
    traceback: str
    timestamp: int


def record(fn: F) -> F:
    """Write an uncaught exception of ``fn`` to the rank's error file, then re-raise it.

    It also turns on ``faulthandler`` (into stderr), so a rank that segfaults leaves its
    Python stack. For sync and async functions. ``SystemExit`` is not an error to record (torch's rule:
    ``sys.exit(0)`` returns None; any other code, ``sys.exit()`` included, propagates). Without an error file in
    the environment, ``fn`` runs undecorated in effect.
    """
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            with _recording():
                return await fn(*args, **kwargs)
            return None  # reached only when a successful SystemExit was swallowed

        return cast(F, async_wrapper)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _recording():
            return fn(*args, **kwargs)
        return None  # reached only when a successful SystemExit was swallowed

    return cast(F, wrapper)


@contextlib.contextmanager
def _recording() -> Iterator[None]:
    _enable_faulthandler()
    try:
        yield
    except SystemExit as exc:
        if exc.code != 0:  # as torch: only an explicit 0 is swallowed, not None
            raise
    except Exception as exc:
        write_error_file(exc)
        raise


def _enable_faulthandler() -> None:
    """As torch's ``@record``: a segfault or abort then leaves every thread's Python stack
    on stderr (the rank's log), where no exception handler could have written it."""
    if faulthandler.is_enabled():
        return
    try:
        faulthandler.enable(file=sys.stderr, all_threads=True)
    except (AttributeError, ValueError, OSError):  # no usable stderr (None, closed, no fd)
        pass


def error_file_path() -> str | None:
    """The error file this process was given, if any."""
    for name in ENV_VARS:
        if os.environ.get(name):
            return os.environ[name]
    return None


def write_error_file(exc: BaseException, path: str | None = None) -> str | None:
    """Write ``exc`` (with its traceback) as torch-format JSON; the path written, or None.

    Never raises: failing to record an error must not hide the error itself.
    """
    path = path or error_file_path()
    if not path:
        return None
    try:
        data = {
            "message": {
                "message": f"{type(exc).__name__}: {_str(exc)}",
                "extraInfo": {
                    "py_callstack": "".join(traceback.format_exception(type(exc), exc, _user_frames(exc))),
                    "timestamp": str(int(time.time())),
                },
            }
        }
    except Exception:  # a broken exception must not replace itself with our error
        return None
    try:
        # Write then rename: the launcher never reads half a file.
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError:
        return None
    return path


def _str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # the user's __str__ raised
        return f"<{type(exc).__name__}: str() failed>"


def _user_frames(exc: BaseException) -> TracebackType | None:
    """The traceback without our own wrapper frames at its top: they explain nothing."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return tb


def read_error_file(path: str | os.PathLike[str]) -> ErrorRecord | None:
    """Parse an error file written by ``record`` or by torch; None if absent or unreadable.

    Torch writes ``message`` either as a dict (with ``extraInfo``) or as a plain string
    with a top-level ``timestamp``; both are accepted.
    """
    data = _load_json(path)
    if not isinstance(data, dict):
        return None
    message = data.get("message")
    if isinstance(message, str):
        return ErrorRecord(message, "", _int(data.get("timestamp")))
    if not isinstance(message, dict):
        return None
    extra = message.get("extraInfo")
    extra = extra if isinstance(extra, dict) else {}  # a rank wrote it: anything goes
    return ErrorRecord(
        str(message.get("message", "<N/A>")),
        str(extra.get("py_callstack", "")),
        _int(extra.get("timestamp")),
    )


def _load_json(path: str | os.PathLike[str]) -> object:
    """The file's JSON, or None. The file comes from a rank, so nothing it holds may hurt
    the launcher: only a regular file (a FIFO would block), at most ``MAX_ERROR_FILE``
    bytes, and any parse failure (deep nesting raises RecursionError) is just None."""
    try:
        # O_NONBLOCK: opening a FIFO for reading must not wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        with open(fd, "rb", closefd=False) as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            raw = f.read(MAX_ERROR_FILE + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(raw) > MAX_ERROR_FILE:
        return None
    try:
        return json.loads(raw)
    except Exception:  # ValueError, UnicodeDecodeError, RecursionError
        return None


def _int(value: object) -> int:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return 0


# Shown, pickled and documented under the name users import it by (asyncproc.X).
record.__module__ = "asyncproc"
