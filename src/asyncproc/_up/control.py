"""The control socket between ``asyncproc ctl`` and a running ``asyncproc up``.

One request per connection: a JSON object on one line (``{"command": "restart", "name":
"web"}``), answered by one JSON object on one line (``{"ok": true, "result": ...}`` or
``{"ok": false, "error": "..."}``).

Who may talk to it: the socket file is created with mode 0600 (under umask 0177, so there
is no moment when it is open to others; ``connect`` needs write permission on it), and
every peer is checked again with ``SO_PEERCRED``: the same user, or root. The second
check is the one that holds if someone loosens the file's mode.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

__all__ = ["default_socket_path", "ControlError", "serve", "request", "open_listener"]

log = logging.getLogger("asyncproc")

_MAX_REQUEST = 65536
_READ_BOUND_S = 10.0  # a peer that connects and says nothing does not hold a task for long
CLIENT_TIMEOUT_S = 300.0  # `stop`/`restart` wait for the program's grace; `reload` for several
Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class ControlError(Exception):
    """A request the running ``up`` refused (the message is its answer), or no ``up`` to ask."""


def default_socket_path() -> Path:
    """``$XDG_RUNTIME_DIR/asyncproc-up.sock``; without it, a 0700 folder of ours in /tmp."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "asyncproc-up.sock"
    return _fallback_dir() / "up.sock"


def _fallback_dir() -> Path:
    return Path("/tmp") / f"asyncproc-{os.getuid()}"


def _private_dir(path: Path) -> None:
    """Create the socket's folder 0700, and refuse one that someone else owns or can write
    (in /tmp another user could have made it first, to read or swap our socket)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid() or (info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX):
        raise ControlError(f"{path} is not a private folder of this user; use --socket PATH")


async def open_listener(path: Path) -> anyio.abc.SocketListener:
    """Bind the socket (0600). A stale file from a dead ``up`` is replaced; a live ``up``
    on the same path is an error, so two systems never share one control socket."""
    if path.parent == _fallback_dir():
        _private_dir(path.parent)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if _answers(path):
            raise ControlError(f"another asyncproc up is running with {path}; use --socket PATH")
        path.unlink()
    # Under umask 0177 the socket is born 0600: never a moment open to others (anyio's
    # ``mode`` alone would chmod after bind). Nothing else runs in this process yet.
    old = os.umask(0o177)
    try:
        return await anyio.create_unix_listener(path, mode=0o600)
    finally:
        os.umask(old)


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(os.fspath(path))
        except OSError:
            return False
        return True


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


async def serve(listener: anyio.abc.SocketListener, handler: Handler) -> None:
    """Answer requests until cancelled; each connection in its own task."""
    async with listener:
        await listener.serve(lambda stream: _connection(stream, handler))


async def _connection(stream: anyio.abc.SocketStream, handler: Handler) -> None:
    async with stream:
        uid = peer_uid(stream.extra(anyio.abc.SocketAttribute.raw_socket))
        if uid not in (os.getuid(), 0):
            log.warning("asyncproc up: refused a control connection from uid %d", uid)
            await _send(stream, {"ok": False, "error": "permission denied: only the user running asyncproc up (or root) may control it"})
            return
        try:
            with anyio.fail_after(_READ_BOUND_S):
                message = await _read_line(stream)
            req = json.loads(message)
            if not isinstance(req, dict) or not isinstance(req.get("command"), str):
                raise ValueError("expected a JSON object with a \"command\"")
        except (ValueError, TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError) as exc:
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await _send(stream, {"ok": False, "error": f"bad request: {exc}"})
            return
        try:
            answer = {"ok": True, "result": await handler(req)}
        except ControlError as exc:
            answer = {"ok": False, "error": str(exc)}
        except Exception as exc:  # one bad request must not take `up` down
            log.exception("asyncproc up: control request %r failed", req)
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await _send(stream, answer)  # the client may have given up waiting


async def _read_line(stream: anyio.abc.SocketStream) -> bytes:
    data = b""
    while b"\n" not in data:
        data += await stream.receive()
        if len(data) > _MAX_REQUEST:
            raise ValueError("request too long")
    return data.split(b"\n", 1)[0]


async def _send(stream: anyio.abc.SocketStream, message: dict[str, Any]) -> None:
    await stream.send(json.dumps(message).encode() + b"\n")


def request(path: Path, message: dict[str, Any], timeout: float = CLIENT_TIMEOUT_S) -> Any:
    """Send one request to the ``up`` at ``path`` and return its result (blocking; ctl's side).

    ``ControlError`` when nothing listens there, or when ``up`` refused the request.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(f"no asyncproc up is running with {path} (is it started? --socket PATH?)") from None
        except PermissionError:
            raise ControlError(f"permission denied on {path}: it belongs to another user") from None
        with contextlib.suppress(BrokenPipeError):  # refused before it read: its answer says why
            sock.sendall(json.dumps(message).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    if not data:
        raise ControlError(f"asyncproc up at {path} closed the connection without an answer")
    answer = json.loads(data)
    if not answer.get("ok"):
        raise ControlError(str(answer.get("error")))
    return answer.get("result")
