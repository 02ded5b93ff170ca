"""Driving a real ``asyncproc up`` from tests: its output lines as they come, ``ctl`` calls."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from asyncproc._up import control

PY = sys.executable
BOUND_S = 60.0  # "at once, not at the timeout": generous, for a busy 2-core machine


def program(code: str) -> str:
    """A TOML array running ``code`` in this interpreter, unbuffered."""
    return json.dumps([PY, "-u", "-c", code])


class Up:
    """``asyncproc up FILE --socket SOCK --no-live``, its stdout+stderr read line by line."""

    def __init__(self, file: Path, sock: Path, *extra: str):
        self.sock = sock
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            [PY, "-m", "asyncproc", "up", str(file), "--socket", str(sock), "--no-live", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=file.parent,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wait_line(r" up: .*; control socket ")  # ctl may talk to it from now on

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.lines.append("<EOF>")
            self._cond.notify_all()

    def wait_line(self, pattern: str, start: int = 0, timeout: float = BOUND_S) -> re.Match[str]:
        """The first line (from index ``start``) matching ``pattern``, as it is printed."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        i = start
        with self._cond:
            while True:
                while i < len(self.lines):
                    if m := regex.search(self.lines[i]):
                        return m
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0 or (self.lines and self.lines[-1] == "<EOF>"):
                    raise AssertionError(f"no line matching {pattern!r}; output:\n" + "\n".join(self.lines))
                self._cond.wait(left)

    def count(self, pattern: str) -> int:
        with self._cond:
            return sum(1 for line in self.lines if re.search(pattern, line))

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return ctl(self.sock, *args)

    def status(self) -> dict[str, dict[str, Any]]:
        """The children by name, straight from the socket (what `ctl status --json` prints,
        without starting a Python per look)."""
        rows = control.request(self.sock, {"command": "status"}, timeout=BOUND_S)["children"]
        return {row["name"]: row for row in rows}

    def wait_status(self, predicate: Any, timeout: float = BOUND_S) -> dict[str, dict[str, Any]]:
        """``ctl status`` until ``predicate(status)`` holds (each call is a real round trip)."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if predicate(status):
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"status never matched: {status}")

    def wait_exit(self, timeout: float = BOUND_S) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        return code

    def close(self) -> None:
        """Whatever a test left: SIGKILL ``up`` (its guardian ends the programs) and reap."""
        left = []
        if self.proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                left = [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(BOUND_S)
        wait_gone(left)  # re-parented to the test process (a subreaper): reaped here
        self._reader.join(BOUND_S)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> Up:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ctl(sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "asyncproc", "ctl", "--socket", str(sock), *args],
                          capture_output=True, text=True, timeout=BOUND_S)


def wait_gone(pids: list[int], timeout: float = BOUND_S) -> list[int]:
    """Wait (reaping those that are ours: the tests are a subreaper) until the pids are gone;
    the ones still alive."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for pid in pids:  # a process re-parented to us is reaped here (psutil waits only on direct children)
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    return [p.pid for p in alive]
