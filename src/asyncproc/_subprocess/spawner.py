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

The caller waits on an event that the thread sets through its event loop's thread-safe
"call soon" (never a sleep, and no file descriptor: a number closed twice elsewhere could
make a descriptor of ours someone else's), shielded: a spawn is bounded, and a process
started for a cancelled caller must still reach it, or nobody would end it.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

import anyio
import sniffio

log = logging.getLogger("asyncproc")

__all__ = ["run"]

T = TypeVar("T")


class _Job(Generic[T]):
    def __init__(self, fn: Callable[[], T], wake: Callable[[Callable[[], None]], object]):
        self.fn = fn
        self.done = anyio.Event()
        self.wake = wake  # runs a callable on the caller's event-loop thread, from any thread
        self.result: T | None = None
        self.error: BaseException | None = None

    def __call__(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # handed to the caller, raised there
            self.error = exc
        finally:
            try:
                self.wake(self.done.set)
            except RuntimeError:  # the caller's loop has closed: nobody is waiting
                log.warning("asyncproc: a spawn finished after its event loop closed")


def _waker() -> Callable[[Callable[[], None]], object]:
    """This event loop's thread-safe "call soon"."""
    if sniffio.current_async_library() == "trio":
        import trio

        return trio.lowlevel.current_trio_token().run_sync_soon
    import asyncio

    return asyncio.get_running_loop().call_soon_threadsafe


_lock = threading.Lock()
_jobs: queue.SimpleQueue[_Job[object]] = queue.SimpleQueue()
_thread: threading.Thread | None = None


def _serve(jobs: queue.SimpleQueue[_Job[object]]) -> None:
    while True:
        job = jobs.get()
        try:
            job()
        except BaseException:  # never: the thread must outlive anything a job does
            log.exception("asyncproc: the spawning thread hit an error")
        del job  # holds the handler: it must be free to be collected (and its pidfd closed)


def _submit(job: _Job[T]) -> None:
    global _thread
    with _lock:
        if _thread is None:
            _thread = threading.Thread(target=_serve, args=(_jobs,), name="asyncproc-spawner", daemon=True)
            _thread.start()
    _jobs.put(job)  # type: ignore[arg-type]


async def run(fn: Callable[[], T]) -> T:
    """``fn()`` on the spawning thread; its result, or what it raised."""
    job = _Job(fn, _waker())
    _submit(job)
    with anyio.CancelScope(shield=True):
        await job.done.wait()
    if job.error is not None:
        raise job.error
    return job.result  # type: ignore[return-value]


def _forget_in_child() -> None:
    """After ``fork()`` the thread is gone (only the forking thread survives)."""
    global _lock, _jobs, _thread
    _lock, _jobs, _thread = threading.Lock(), queue.SimpleQueue(), None


os.register_at_fork(after_in_child=_forget_in_child)
