"""What runs inside isolated children in the tests, and helpers to check on them.

A module of its own (not a test module): workers import these functions by reference.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from asyncproc import Isolated

from _helpers import alive, assert_gone  # noqa: F401 - assert_gone: imported from here too

LONG = 30.0


def publish(path: str, text: str) -> None:
    """Write ``path`` whole or not at all (a temporary file renamed): a test that waits for
    it to exist must never read it created but still empty."""
    Path(path + ".tmp").write_text(text)
    os.rename(path + ".tmp", path)


def runner(method: str, **options: object) -> Isolated:
    return Isolated(start_method=method, **{"timeout": LONG, **options})  # type: ignore[arg-type]


class CustomError(Exception):
    def __init__(self, code: int, detail: str):
        super().__init__(code, detail)
        self.code = code


class Unpicklable(Exception):
    def __init__(self) -> None:
        super().__init__("holds a lock")
        self.lock = threading.Lock()


def add(a: int, b: int = 0, *, timeout: int = 0) -> int:
    return a + b + timeout


def raise_custom(code: int) -> None:
    raise CustomError(code, "went wrong")


def deep_in_child() -> None:
    raise_custom(7)


def raise_unpicklable() -> None:
    raise Unpicklable()


def return_lock() -> threading.Lock:
    return threading.Lock()


def crash_segfault() -> None:
    ctypes.string_at(0)


def crash_abort() -> None:
    os.abort()


def crash_os_exit() -> None:
    os._exit(3)


def crash_sys_exit() -> None:
    sys.exit(4)


def crash_killed() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def allocate(n: int) -> int:
    return len(bytearray(n))


def big_value(n: int) -> bytes:
    return b"x" * n


def start_then(what: str, pidfile: str, *, escape: bool = False) -> int:
    """Start a grandchild (optionally in a new session, out of our group), record its pid,
    then end as ``what`` says."""
    proc = subprocess.Popen(["sleep", "60"], start_new_session=escape)
    publish(pidfile, str(proc.pid))
    if what == "segfault":
        crash_segfault()
    if what == "hang":
        time.sleep(60)
    return proc.pid


def sleep_ignoring_sigterm(seconds: float) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(seconds)


running = alive  # the tests of isolated calls import these two from here


def _server_tree() -> set[int]:
    from asyncproc._isolated.link import link

    if link.pid is None:
        return set()
    return {link.pid, *(p.pid for p in psutil.Process(link.pid).children(recursive=True))}


def cpus_and_policy() -> tuple[set[int], str]:
    with open("/proc/self/status") as f:
        status = f.read()
    return os.sched_getaffinity(0), status


def big_return(n: int) -> bytes:
    return b"x" * n


def crash_leaving_background_job() -> None:
    os.system("sleep 30 &")  # a grandchild that inherits whatever descriptors leak
    os._exit(3)


def pythonpath() -> str | None:
    return os.environ.get("PYTHONPATH")



def start_pair_then_hang(pidfile: str) -> None:
    """Start one grandchild in our group and one in a session of its own, record both pids
    (one line), then hang."""
    kept = subprocess.Popen(["sleep", "60"])
    escaped = subprocess.Popen(["sleep", "60"], start_new_session=True)
    publish(pidfile, f"{kept.pid} {escaped.pid}")
    time.sleep(60)


def setsid_children_then_crash(n: int, pidfile: str) -> None:
    """Fork ``n`` children that each start a session of their own and wait; record their
    pids; die without ending them (as a crashing call would)."""
    pids = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            os.setsid()
            signal.pause()
            os._exit(0)
        pids.append(pid)
    publish(pidfile, " ".join(map(str, pids)))
    os._exit(1)


def raise_deep(depth: int) -> None:
    if depth == 0:
        raise ValueError("deep down")
    raise_deep(depth - 1)


def recurse_forever() -> None:
    recurse_forever()


def raise_on_sigusr1(pidfile: str) -> None:
    """Record our pid, wait for SIGUSR1 (bounded), then raise."""
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
    publish(pidfile, str(os.getpid()))  # the test signals the pid it reads: never an empty file
    signal.sigtimedwait([signal.SIGUSR1], LONG)
    raise ValueError("raised on SIGUSR1")


def hang() -> None:
    time.sleep(LONG)


def sys_path() -> list[str]:
    return list(sys.path)
