"""Messages: whole or nothing, descriptors attached, large bodies through a memfd."""

from __future__ import annotations

import os
from contextlib import closing

from asyncproc._isolated import protocol as _protocol


def test_small_and_large_messages_arrive_whole() -> None:
    a, b = _protocol.seqpacket_pair()
    with closing(a), closing(b):
        _protocol.send(a, _protocol.VALUE, b"small")
        big = os.urandom(3 * _protocol.INLINE_MAX + 5)
        _protocol.send(a, _protocol.VALUE, big)
        first, second = _protocol.recv(b), _protocol.recv(b)
        assert first is not None and first.tag == _protocol.VALUE and bytes(first.body) == b"small"
        assert second is not None and bytes(second.body) == big and second.fds == []


def test_descriptors_ride_along() -> None:
    a, b = _protocol.seqpacket_pair()
    r, w = os.pipe()
    with closing(a), closing(b):
        _protocol.send(a, _protocol.SPAWN, _protocol.FORKED, [w])
        os.close(w)
        msg = _protocol.recv(b)
        assert msg is not None and len(msg.fds) == 1
        os.write(msg.fds[0], b"through the passed fd")
        os.close(msg.fds[0])
        assert os.read(r, 100) == b"through the passed fd"
    os.close(r)


def test_end_of_stream_is_none() -> None:
    a, b = _protocol.seqpacket_pair()
    a.close()
    with closing(b):
        assert _protocol.recv(b) is None


def test_read_text_reads_a_memfd_from_the_start() -> None:
    fd = os.memfd_create("t")
    try:
        os.write(fd, b"Fatal Python error\n" * 5000)
        assert _protocol.read_text(fd).count("Fatal Python error") == 5000
    finally:
        os.close(fd)
