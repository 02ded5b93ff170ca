"""One long-lived thread that makes every handler's spawn, off the event loop.

A spawn is synchronous work (opening log files, ``Popen``, a cgroup to make and join, the
guardian to tell) that took the event loop for milliseconds each, and for 1.6 s at a time
with 300 handlers spawning at once. Why one *dedicated* thread rather than
``anyio.to_thread``:

* ``Popen`` without ``preexec_fn`` still takes CPython's vfork path on any thread.
* A NUMA binding is per thread and inherited by a child forked from that thread: this
  thread binds itself around one spawn and restores itself after (``Binding.on_this_thread``),
  and nothing else runs on it meanwhile.
* trio's worker threads exit after 10 s idle, which fires ``PR_SET_PDEATHSIG`` in every
  child forked from them; this thread lives as long as the process.

The caller waits on an eventfd the thread signals (an event on every backend, never a
sleep), shielded: a spawn is bounded, and a process started for a cancelled caller must
still reach it, or nobody would end it.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

import anyio

__all__ = ["run"]

T = TypeVar("T")


class _Job(Generic[T]):
    def __init__(self, fn: Callable[[], T]):
        self.fn = fn
        self.efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.result: T | None = None
        self.error: BaseException | None = None

    def __call__(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # handed to the caller, raised there
            self.error = exc
        finally:
            os.eventfd_write(self.efd, 1)


_lock = threading.Lock()
_jobs: queue.SimpleQueue[_Job[object]] = queue.SimpleQueue()
_thread: threading.Thread | None = None


def _serve(jobs: queue.SimpleQueue[_Job[object]]) -> None:
    while True:
        jobs.get()()


def _submit(job: _Job[T]) -> None:
    global _thread
    with _lock:
        if _thread is None:
            _thread = threading.Thread(target=_serve, args=(_jobs,), name="asyncproc-spawner", daemon=True)
            _thread.start()
    _jobs.put(job)  # type: ignore[arg-type]


async def run(fn: Callable[[], T]) -> T:
    """``fn()`` on the spawning thread; its result, or what it raised."""
    job = _Job(fn)
    try:
        _submit(job)
        with anyio.CancelScope(shield=True):
            await anyio.wait_readable(job.efd)
    finally:
        os.close(job.efd)
    if job.error is not None:
        raise job.error
    return job.result  # type: ignore[return-value]


def _forget_in_child() -> None:
    """After ``fork()`` the thread is gone (only the forking thread survives)."""
    global _lock, _jobs, _thread
    _lock, _jobs, _thread = threading.Lock(), queue.SimpleQueue(), None


os.register_at_fork(after_in_child=_forget_in_child)
