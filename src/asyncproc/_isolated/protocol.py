"""Messages between a caller, the fork server and a worker.

Every channel is an ``AF_UNIX``/``SOCK_SEQPACKET`` pair: each ``sendmsg`` arrives whole
or not at all, so a worker that dies half-way through answering can never leave a torn
frame for the next reader, and file descriptors ride along (``SCM_RIGHTS``). A payload
too large for one packet travels in a sealed-off memfd whose descriptor is attached.

A message is ``tag (1 byte) | flags (1 byte) | body``; ``FLAG_MEMFD`` says the body is in
the last attached descriptor instead.
"""

from __future__ import annotations

import _socket
import array
import mmap
import os

__all__ = ["ANCILLARY_SPACE", "Message", "parse", "recv", "read_text", "read_until", "send", "seqpacket_pair", "INLINE_MAX"]

# Unix sockets buffer about 208 KiB per direction by default; a packet must fit in it.
INLINE_MAX = 64 * 1024
_MAX_FDS = 4
ANCILLARY_SPACE = _socket.CMSG_SPACE(_MAX_FDS * 4)
# SPAWN carries a (ctl, data) pair per worker asked for: the reserve's refill sends a batch
# in one message (one wake-up of the server, one system call). Linux takes at most 253
# descriptors per SCM_RIGHTS message; a batch stays far below.
SPAWN_BATCH_MAX = 32
SERVER_MAX_FDS = 2 * SPAWN_BATCH_MAX + 1  # + a memfd body
FLAG_MEMFD = 1

# tags
CALL = b"C"  # caller -> worker: options, context and the pickled call
VALUE = b"V"  # worker -> caller: the pickled return value
RAISED = b"E"  # worker -> caller: the exception, pickled and as text
UNPICKLABLE = b"U"  # worker -> caller: the return value could not be pickled
MEMORY = b"M"  # worker -> caller: MemoryError under memory_limit
SPAWN = b"S"  # caller -> server: give me a worker per (ctl, data) pair of fds attached; body:
FORKED = b"f"  #   ... forked from the server ("forkserver")
FRESH = b"s"  #   ... a fresh interpreter the server starts ("spawn")
HELLO = b"H"  # worker or server -> caller: your call went to worker PID
EXITED = b"X"  # server -> caller: the worker exited; status and fault log
TERM = b"T"  # caller -> server: SIGTERM the worker's tree
KILL = b"K"  # caller -> server: SIGKILL the worker's tree
PRELOAD = b"P"  # caller -> server: import these modules before forking more workers
CONTEXT = b"c"  # caller -> server: take my sys.path, cwd and environment (workers inherit them)


class Message:
    __slots__ = ("tag", "body", "fds")

    def __init__(self, tag: bytes, body: bytes | memoryview, fds: list[int]):
        self.tag = tag
        self.body = body
        self.fds = fds


def seqpacket_pair(nonblocking: bool = False) -> tuple[_socket.socket, _socket.socket]:
    """``nonblocking``: both ends (they share nothing else), without a system call each."""
    # Not socket.socketpair: its socket.socket wrappers cost a getsockname() and a Python
    # __init__ each, and a call takes two pairs. What the wrapper adds (makefile, "with")
    # no caller of this needs.
    flags = _socket.SOCK_NONBLOCK if nonblocking else 0
    return _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | flags)


def _to_memfd(body: bytes | memoryview) -> int:
    fd = os.memfd_create("asyncproc-payload", os.MFD_CLOEXEC)
    view = memoryview(body)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    return fd


def send(sock: _socket.socket, tag: bytes, body: bytes | memoryview = b"", fds: list[int] | tuple[int, ...] = ()) -> None:
    """Send one message; blocks only if the peer's buffer is full (never for our sizes)."""
    if len(body) <= INLINE_MAX:  # the usual message: nothing built that need not be
        head = tag + b"\0"
        if fds:
            sock.sendmsg((head, body), [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            sock.sendmsg((head, body))
        return
    memfd = _to_memfd(body)
    try:
        sock.sendmsg((tag + bytes((FLAG_MEMFD,)), b""), [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, array.array("i", [*fds, memfd]))])
    finally:
        os.close(memfd)


def recv(sock: _socket.socket, max_fds: int = _MAX_FDS) -> Message | None:
    """Receive one message; None at end of stream. Received fds are the caller's to close.
    A message with more than ``max_fds`` descriptors is refused (OSError), all of them closed."""
    # MSG_CMSG_CLOEXEC: a received descriptor must not leak into what the receiver execs
    # (a grandchild holding a worker's data socket would hide the worker's death).
    space = ANCILLARY_SPACE if max_fds == _MAX_FDS else _socket.CMSG_SPACE(max_fds * 4)
    data, ancillary, msg_flags, _ = sock.recvmsg(INLINE_MAX + 2, space, _socket.MSG_CMSG_CLOEXEC)
    return parse(data, ancillary, msg_flags)


def parse(data: bytes, ancillary: list[tuple[int, int, bytes]], msg_flags: int) -> Message | None:
    """The message of one ``recvmsg(INLINE_MAX + 2, ANCILLARY_SPACE, MSG_CMSG_CLOEXEC)``
    (what ``recv`` does, for a reader that looked at the packet first)."""
    fds = _fds_from(ancillary)
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    if msg_flags & _socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise OSError("asyncproc: a message carried more file descriptors than expected")
    tag, flags, body = data[:1], data[1], memoryview(data)[2:]
    if flags & FLAG_MEMFD:
        body = _read_memfd(fds.pop())
    return Message(tag, body, fds)


def read_until(sock: _socket.socket, stop: bytes | None) -> bool:
    """Read what waits on non-blocking ``sock`` (closing any descriptors it carries) until
    a message tagged ``stop`` or end-of-stream: True; False once nothing more waits.
    ``stop=None``: only end-of-stream (the peer closed) counts."""
    while True:
        try:
            # The tag alone: a SEQPACKET read drops the rest of the message, so no buffer
            # for a whole message is made and unmade per read (two to four per call).
            tag, ancillary, _, _ = sock.recvmsg(1, ANCILLARY_SPACE, _socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            return False
        except OSError:
            return True
        for fd in _fds_from(ancillary):
            os.close(fd)
        if not tag or tag == stop:
            return True


def _fds_from(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, raw in ancillary:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(raw[: len(raw) - (len(raw) % arr.itemsize)])
            fds.extend(arr)
    return fds


def read_text(fd: int) -> str:
    """All of a memfd (or file) written by another process, from offset 0, as text."""
    chunks = []
    offset = 0
    while chunk := os.pread(fd, 65536, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks).decode(errors="replace")


def _read_memfd(fd: int) -> memoryview:
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return memoryview(b"")
        # A private read-only map: no copy until unpickling builds its objects.
        return memoryview(mmap.mmap(fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ))
    finally:
        os.close(fd)
