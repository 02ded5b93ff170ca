"""What a call's outcome is, once its worker answered or went silent: the value, the
function's own exception, TimeoutError after stopping the tree, ChildCrashed with the
fault log (asyncproc's own frames trimmed), MemoryLimitExceeded, RemoteError.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
from typing import Any

import anyio

from .._exceptions import ChildCrashed, MemoryLimitExceeded, RemoteError, ServerLost
from .._proc.proctree import KILL_BOUND_S
from . import protocol as _protocol
from . import server as _server
from . import worker as _worker
from .handles import EXIT_BOUND_S, Exit, OwnWorker, ServerWorker, Worker
from .link import link

log = logging.getLogger("asyncproc")


_LOOP_FILES = tuple(
    f'File "{os.path.abspath(module.__file__ or "")}"' for module in (_worker, _server)
) + ('File "<string>"',)


def user_frames(fault_log: str) -> str:
    """faulthandler's dump without the frames of asyncproc's own worker loop under the
    user's function: the user debugs their code, not ours."""
    return "\n".join(
        line
        for line in fault_log.splitlines()
        if not line.lstrip().startswith(_LOOP_FILES)
    )


async def stop(worker: Worker, grace: float) -> Exit:
    """SIGTERM the tree, wait ``grace``, SIGKILL, wait a bounded time; then the status.

    Never raises: it runs while a timeout or a cancellation is on its way to the caller,
    and an error here must neither replace that outcome nor skip the SIGKILL.
    """
    try:
        return await _stop_or_raise(worker, grace)
    except Exception as exc:
        log.warning("asyncproc: error while stopping child %s: %r; killing it", worker.pid, exc)
        try:
            worker.signal(signal.SIGKILL)
        finally:
            worker.close()
        return Exit(worker.pid, None)


async def _stop_or_raise(worker: Worker, grace: float) -> Exit:
    # grace, then the kill bound: the only waits (exit_status no longer waits once the
    # kill bound has passed), whatever state the fork server is in.
    worker.signal(signal.SIGTERM)
    with anyio.move_on_after(grace) as graceful:
        await worker.wait_gone()
    if graceful.cancelled_caught:
        worker.signal(signal.SIGKILL)
        with anyio.move_on_after(KILL_BOUND_S):
            await worker.wait_gone()
    return await worker.exit_status()


async def finish_after_answer(worker: Worker, deadline: float, grace: float) -> Exit:
    """After an answer that is not a value: wait for the worker to end (it is already
    ending) until the call's own deadline, then stop it as a timeout would; the status."""
    with anyio.move_on_after(min(EXIT_BOUND_S, max(0.0, deadline - anyio.current_time()))) as waited:
        await worker.wait_gone()
    if waited.cancelled_caught:
        return await stop(worker, grace)
    return await worker.exit_status()


def loads_exception(body: bytes | memoryview) -> tuple[BaseException, int]:
    type_name, message, text, data, pid = pickle.loads(body)
    if data is not None:
        try:
            exc = pickle.loads(data)
            if isinstance(exc, BaseException):
                if hasattr(exc, "add_note"):
                    exc.add_note(f"(raised in asyncproc child process {pid})")
                return exc, pid
        except Exception as exc:
            text += f"\n(the exception could not be rebuilt in the caller: {type(exc).__name__}: {exc})"
    return RemoteError(f"{type_name}: {message}", type_name=type_name, traceback_text=text, pid=pid), pid


def loads_value(body: bytes | memoryview, pid: int | None) -> Any:
    try:
        return pickle.loads(body)
    except Exception as exc:
        raise RemoteError(
            f"the child's return value could not be unpickled in the caller: {type(exc).__name__}: {exc}",
            type_name=type(exc).__name__,
            pid=pid,
        ) from None


async def outcome(worker: Worker, msg: _protocol.Message | None, deadline: float, grace: float) -> Any:
    if msg is not None and msg.tag == _protocol.VALUE:
        value = loads_value(msg.body, worker.pid)
        if isinstance(worker, OwnWorker):
            await worker.finish()
        else:
            worker.release()
        return value
    with anyio.CancelScope(shield=True):
        end = await finish_after_answer(worker, deadline, grace) if msg is not None else await worker.exit_status()
    if msg is None and end.never_started:
        raise ServerLost
    if msg is None:
        message = f"{end.note}; its outcome is unknown" if end.note else None
        raise ChildCrashed(message, pid=end.pid, exitcode=end.exitcode, fault_log=user_frames(end.fault_log))
    if msg.tag == _protocol.RAISED:
        if isinstance(worker, ServerWorker) and "tblib.pickling_support" not in link.preloads:
            link.preload(["tblib.pickling_support"])  # how workers pickle tracebacks
        exc, _ = loads_exception(msg.body)
        raise exc
    if msg.tag == _protocol.MEMORY:
        limit, text, pid = pickle.loads(msg.body)
        message = f"child process {pid} went over its memory limit of {limit} bytes (MemoryError)"
        if text:
            message += "\n\nTraceback in the child:\n" + text.rstrip()
        raise MemoryLimitExceeded(message, pid=pid, exitcode=end.exitcode)
    if msg.tag == _protocol.UNPICKLABLE:
        type_name, reason = pickle.loads(msg.body)
        raise RemoteError(
            f"the child returned a {type_name}, which cannot be pickled ({reason})",
            type_name=type_name,
            pid=end.pid,
            exitcode=end.exitcode,
        )
    raise RuntimeError(f"asyncproc: unexpected message {msg.tag!r} from a worker")  # pragma: no cover


def call_read(worker: Worker) -> bool:
    """Whether the worker has read what we sent it (the call, or a "fork" worker's go):
    a Unix socket counts sent bytes against the sender until the receiver reads them."""
    import array
    import fcntl
    import termios

    unread = array.array("i", [0])
    try:
        fcntl.ioctl(worker.data.fileno(), termios.TIOCOUTQ, unread)
    except OSError:
        return True  # cannot tell: say the usual
    return unread[0] == 0


def is_closed(worker: Worker) -> bool:
    return worker.data.fileno() == -1
