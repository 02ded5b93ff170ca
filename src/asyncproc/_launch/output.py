"""The launcher's output path: each rank's pipe copied to its log file (raw) and to our
console (whole lines, prefixed), one writer per console stream, never blocking the event
loop on a reader that stops reading; and the tail of a log file for the failure summary.

All pumps run on the one event-loop thread and each batch of complete lines is one block,
written whole by one writer per console stream (``_ConsoleStream``, non-blocking for a
pipe or terminal), so console lines are never split or interleaved; a partial line waits
for its newline (or for EOF, or for 64 KiB, whichever comes first).
"""

from __future__ import annotations

import collections
import logging
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import anyio

log = logging.getLogger("asyncproc")

_CHUNK = 65536
_LONGEST_LINE = 65536  # a line longer than this is emitted in pieces, each prefixed


class _ConsoleStream:
    """One console stream, written by one writer at a time: whole blocks, in order.

    A pipe or terminal is written through a private non-blocking descriptor (reopened
    through /proc, so the flag never reaches the file description our parent shares), so
    a reader that stops reading (`| less`) makes the pumps wait on ``wait_writable``
    instead of blocking the event loop, which then still handles signals. Anything else
    (a regular file, a test's capture) is written as before. A write error (the reader
    went away) ends console output for good; logging and draining go on.
    """

    def __init__(self, stream: IO[bytes]):
        self.stream = stream
        self.fd = _private_nonblocking(stream)
        self.broken = False
        self._lock = anyio.Lock()

    async def write(self, block: bytes) -> None:
        if self.broken:
            return
        async with self._lock:  # a block is written whole before the next one starts
            try:
                if self.fd is None:
                    self.stream.write(block)
                    self.stream.flush()
                else:
                    await _write_all(self.fd, block)
            except OSError:
                self.broken = True

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _private_nonblocking(stream: IO[bytes]) -> int | None:
    """A non-blocking descriptor of our own on ``stream``'s pipe or terminal, or None."""
    try:
        stream.flush()  # what was written before us comes first
        mode = os.fstat(stream.fileno()).st_mode
        if not (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
            return None
        return os.open(f"/proc/self/fd/{stream.fileno()}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError, AttributeError):  # no fd, a socket (ENXIO), no /proc
        return None


async def _write_all(fd: int, block: bytes) -> None:
    view = memoryview(block)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            await anyio.wait_writable(fd)


@dataclass
class _Console:
    out: _ConsoleStream
    err: _ConsoleStream

    @classmethod
    def of_this_process(cls) -> _Console:
        out = _ConsoleStream(_binary(sys.stdout))
        # One writer for both when they are one pipe (`2>&1 |`): a block written in parts
        # must not have the other stream's block land in between.
        if _same_file(sys.stdout, sys.stderr):
            return cls(out, out)
        return cls(out, _ConsoleStream(_binary(sys.stderr)))

    def close(self) -> None:
        self.out.close()
        self.err.close()


def _same_file(a: Any, b: Any) -> bool:
    try:
        sa, sb = os.fstat(a.fileno()), os.fstat(b.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _binary(stream: Any) -> IO[bytes]:
    return stream.buffer if hasattr(stream, "buffer") else stream


@dataclass
class _Pump:
    """Copies a rank's pipe to its log (raw) and to the console (whole prefixed lines)."""

    fd: int
    prefix: bytes
    console: _ConsoleStream | None
    log_path: Path | None
    tail: collections.deque[str] | None

    closed: bool = False

    def close(self) -> None:
        """Close the pipe (idempotent): after running, or when the launch failed first."""
        if not self.closed:
            self.closed = True
            os.close(self.fd)

    async def run(self) -> None:
        try:
            os.set_blocking(self.fd, False)
            log = open(self.log_path, "wb") if self.log_path is not None else None
        except BaseException:
            self.close()
            raise
        pending = b""
        try:
            while data := await _read_some(self.fd):
                if log is not None and not _wrote(log, data, f"{self.log_path}"):
                    log.close()
                    log = None  # the disk is full, say: keep draining so the rank goes on
                pending += data
                cut = pending.rfind(b"\n") + 1
                if cut == 0 and len(pending) >= _LONGEST_LINE:
                    cut = len(pending)
                if cut:
                    await self._emit(pending[:cut])
                    pending = pending[cut:]
            if pending:
                await self._emit(pending)
        finally:
            self.close()
            if log is not None:
                log.close()

    async def _emit(self, chunk: bytes) -> None:
        """Write complete lines as one prefixed block (the stream keeps blocks whole)."""
        lines = chunk[:-1].split(b"\n") if chunk.endswith(b"\n") else chunk.split(b"\n")
        if self.tail is not None:
            self.tail.extend(line.decode(errors="replace") for line in lines)
        if self.console is not None:
            await self.console.write(b"".join(self.prefix + line + b"\n" for line in lines))


def _wrote(stream: IO[bytes], data: bytes, name: str) -> bool:
    """Write ``data``; False (logged) when the write failed."""
    try:
        stream.write(data)
    except OSError as exc:
        log.warning("asyncproc run: cannot write %s (%s); no longer writing it", name, exc)
        return False
    return True


async def _read_some(fd: int) -> bytes:
    while True:
        await anyio.wait_readable(fd)
        try:
            return os.read(fd, _CHUNK)
        except BlockingIOError:  # readiness can be spurious
            continue


def _file_tail(path: Path | None, count: int) -> tuple[str, ...]:
    """The last ``count`` lines of a log file, read from its end."""
    if path is None:
        return ()
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            data = f.read()
    except OSError:
        return ()
    return tuple(line.decode(errors="replace") for line in data.splitlines()[-count:])
