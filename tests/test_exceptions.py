"""The exception tree: what each error says, and that each crosses a process boundary."""

from __future__ import annotations

import pickle
import signal

import pytest

from asyncproc import AsyncprocError, ChildCrashed, LaunchFailed, MemoryLimitExceeded, RemoteError
from asyncproc._exceptions import describe_exitcode


@pytest.mark.parametrize(
    "exitcode, words",
    [(-11, "killed by SIGSEGV (signal 11)"), (3, "exited with code 3"), (0, "exited with code 0"), (None, "unknown status")],
)
def test_describe_exitcode(exitcode: int | None, words: str) -> None:
    assert words in describe_exitcode(exitcode)


def test_child_crashed_names_signal_and_carries_fault_log() -> None:
    err = ChildCrashed(pid=42, exitcode=-signal.SIGABRT, fault_log='  File "x.py", line 3 in f\n')
    assert err.signal is signal.SIGABRT and err.pid == 42 and err.exitcode == -6
    assert "child process 42 was killed by SIGABRT" in str(err) and 'File "x.py"' in str(err)
    assert ChildCrashed(pid=1, exitcode=2).signal is None


def test_memory_limit_exceeded_is_both() -> None:
    err = MemoryLimitExceeded("too big", pid=1, exitcode=1)
    assert isinstance(err, ChildCrashed) and isinstance(err, MemoryError) and isinstance(err, AsyncprocError)


@pytest.mark.parametrize(
    "err",
    [
        ChildCrashed(pid=7, exitcode=-9, fault_log="stack"),
        MemoryLimitExceeded("over", pid=7, exitcode=1),
        RemoteError("E: boom", type_name="mod.E", traceback_text="Traceback ...", pid=7),
        AsyncprocError("base", pid=7, exitcode=3),
    ],
    ids=lambda e: type(e).__name__,
)
def test_errors_survive_pickling(err: AsyncprocError) -> None:
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err) and str(back) == str(err) and back.__dict__ == err.__dict__


def test_every_library_error_derives_from_the_base() -> None:
    for cls in (ChildCrashed, MemoryLimitExceeded, RemoteError, LaunchFailed):
        assert issubclass(cls, AsyncprocError)
