"""Launching local ranks: torch.distributed.elastic's ``start_processes``, async (the
``asyncproc run`` command line is ``cli``).

Output paths, per rank and stream (``LaunchConfig.std_of``):

* redirected only (``--log-dir`` alone, or ``--redirects``): the rank writes straight into
  ``<log_dir>/<run id>/attempt_<n>/<rank>/stdout.log`` (or ``stderr.log``); the launcher
  is not in the data path.
* otherwise: the rank writes into a pipe; the launcher reads it, writes the raw bytes to the
  log file (if teed) and whole lines, prefixed (``[rankN]: ``), to its own stdout/stderr. All
  pumps run on the one event-loop thread and each batch of complete lines is one block,
  written whole by one writer per console stream (``_ConsoleStream``, non-blocking for a
  pipe or terminal), so console lines are never split or interleaved; a partial line waits for its newline (or
  for EOF, or for 64 KiB, whichever comes first).

Fail fast: the first rank to fail stops the others (its signal, ``grace``, SIGKILL, through
``SubprocessHandler.kill``); a handled signal to the launcher (``handle_signals``) does the
same with the signal received. With ``max_restarts``, a failed attempt is followed by a new
one (``_Run``), up to that many times.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import secrets
import shutil
import signal
import socket
import stat
import string
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Union

import anyio
import anyio.abc

from .._exceptions import LaunchFailed, describe_exitcode
from .._proc import proctree as _proctree
from .._subprocess import guardian as _guardian
from .._subprocess.handler import DEFAULT_GRACE_S, KILL_BOUND_S, StrPath, SubprocessHandler
from .._validate import check_count, check_env, check_flag, check_path, check_seconds, check_text
from .errorfile import ENV_VARS, ErrorRecord, read_error_file

log = logging.getLogger("asyncproc")

__all__ = ["LaunchConfig", "LaunchResult", "RankResult", "start_processes", "BOTH", "STDERR", "STDOUT"]

TAIL_LINES = 20  # last stderr lines kept per rank for the failure summary
_CHUNK = 65536
_LONGEST_LINE = 65536  # a line longer than this is emitted in pieces, each prefixed
_DRAIN_BOUND_S = 2.0  # after the ranks are gone, a grandchild may still hold their pipes
_ORPHAN_ROUNDS = 3  # a killed orphan's own descendants are re-parented to us in turn


# One stream's bits in torchrun's --redirects/--tee numbering: 1 stdout, 2 stderr, 3 both.
STDOUT, STDERR, BOTH = 1, 2, 3
# Per local rank (a mapping) or for every rank (an int; True means BOTH).
StdSpec = Union[bool, int, Mapping[int, int]]
DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)  # torchrun's set
DEFAULT_PREFIX = "[rank${rank}]: "


@dataclass(frozen=True)
class LaunchConfig:
    """How to launch ``nproc`` local ranks of one command, on node ``node_rank`` of ``nnodes``.

    ``env`` overlays ``os.environ`` for every rank (None removes a variable); the rank
    variables are set on top. ``master_port`` None picks a free port and holds it (see
    ``_PortHold``) for the whole run. ``handle_signals`` makes ``signals`` (torchrun's
    SIGTERM, SIGINT, SIGHUP, SIGQUIT by default) to this process stop every rank (main
    thread only; the CLI sets it).

    ``max_restarts``: when a rank fails, stop every rank and start them all again, at most
    this many times (torchrun's elastic restart, on one node). ``run_id`` names the run
    (``TORCHELASTIC_RUN_ID`` and the log folder ``log_dir/<run_id>/attempt_<n>/<rank>/``);
    None makes a fresh one.

    Output, per local rank and stream, in torchrun's numbering (``STDOUT``, ``STDERR``,
    ``BOTH``; an int for every rank or a mapping local rank -> int): ``redirects`` streams go
    to their log file only, ``tee`` streams to the file and the console, the others to the
    console only. ``redirects=None`` (the default) redirects every stream that ``tee`` does
    not when there is a ``log_dir``. ``local_ranks_filter`` limits the console to those
    local ranks (files are unaffected); ``log_line_prefix_template`` prefixes console lines
    (``${rank}``, ``${local_rank}``, ``${role_name}``).

    ``reap_orphans`` makes this process a child subreaper (for good: it cannot be undone
    per launch) and, once the ranks are stopped, kills (with their trees) and reaps every
    child of this process but the guardian: a rank's helper that started its own session
    and lost its parent is re-parented here instead of escaping. Only for a process that
    exists to launch (the CLI sets it): it would end the program's other children too.
    """

    nproc: int
    log_dir: StrPath | None = None
    tee: StdSpec = False
    numa_options: Any = None
    env: Mapping[str, str | None] = field(default_factory=dict)
    grace: float = DEFAULT_GRACE_S
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    handle_signals: bool = False
    reap_orphans: bool = False
    nnodes: int = 1
    node_rank: int = 0
    max_restarts: int = 0
    run_id: str | None = None
    role: str = "default"
    redirects: StdSpec | None = None
    local_ranks_filter: frozenset[int] | None = None
    log_line_prefix_template: str = DEFAULT_PREFIX
    signals: tuple[signal.Signals, ...] = DEFAULT_SIGNALS
    virtual_local_rank: bool = False

    def __post_init__(self) -> None:
        check_count("nproc", self.nproc, minimum=1)
        check_count("nnodes", self.nnodes, minimum=1)
        check_count("node_rank", self.node_rank)
        check_count("max_restarts", self.max_restarts)
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank must be < nnodes ({self.nnodes}), got {self.node_rank!r}")
        check_path("log_dir", self.log_dir, allow_none=True)
        check_env("env", self.env)
        check_seconds("grace", self.grace)
        check_text("master_addr", self.master_addr)
        port = check_count("master_port", self.master_port, minimum=1, allow_none=True)
        if port is not None and port > 65535:
            raise ValueError(f"master_port must be in 1..65535, got {port!r}")
        check_flag("handle_signals", self.handle_signals)
        check_flag("reap_orphans", self.reap_orphans)
        check_flag("virtual_local_rank", self.virtual_local_rank)
        check_text("role", self.role)
        if self.nnodes > 1 and self.master_port is None:
            raise ValueError("master_port must be given when nnodes > 1: every node must use the same one")
        if self.run_id is not None and (not self.run_id or "/" in self.run_id or self.run_id in (".", "..")):
            raise ValueError(f"run_id must be a non-empty name without '/', got {self.run_id!r}")
        for name in ("tee", "redirects"):
            spec = getattr(self, name)
            if spec is not None:
                _check_std(name, spec, self.nproc)
                if self.log_dir is None and any(_std_of(spec, r) for r in range(self.nproc)):
                    raise ValueError(f"{name}={spec!r} needs log_dir: the streams go to files there")
        if self.local_ranks_filter is not None:
            bad = [r for r in self.local_ranks_filter if not 0 <= r < self.nproc]
            if bad or not self.local_ranks_filter:
                raise ValueError(f"local_ranks_filter must name local ranks in 0..{self.nproc - 1}, got {sorted(self.local_ranks_filter)!r}")
        _check_prefix(self.log_line_prefix_template)
        try:
            object.__setattr__(self, "signals", tuple(signal.Signals(sig) for sig in self.signals))
        except (TypeError, ValueError):
            raise ValueError(f"signals must be signal numbers or signal.Signals, got {self.signals!r}") from None
        if signal.SIGKILL in self.signals or signal.SIGSTOP in self.signals:
            raise ValueError(f"signals cannot include SIGKILL or SIGSTOP (they cannot be caught), got {self.signals!r}")

    @property
    def world_size(self) -> int:
        """Ranks in the whole job: ``nnodes * nproc``."""
        return self.nnodes * self.nproc

    def std_of(self, local_rank: int) -> tuple[int, int]:
        """(streams written to a file, streams shown on the console) of a local rank."""
        tee = _std_of(self.tee, local_rank)
        if self.redirects is None:
            redirected = BOTH & ~tee if self.log_dir is not None else 0
        else:
            redirected = _std_of(self.redirects, local_rank) & ~tee
        shown = self.local_ranks_filter is None or local_rank in self.local_ranks_filter
        return redirected | tee, (BOTH & ~redirected) if shown else 0


def _check_std(name: str, spec: object, nproc: int) -> None:
    values = spec.values() if isinstance(spec, Mapping) else [spec]
    if isinstance(spec, Mapping) and any(isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < nproc for r in spec):
        raise ValueError(f"{name} must map local ranks in 0..{nproc - 1} to 0-3, got {spec!r}")
    if not all(isinstance(v, int) and 0 <= v <= BOTH for v in values):
        raise ValueError(f"{name} must be 0-3 (1 stdout, 2 stderr, 3 both), a bool, or a mapping local rank -> 0-3, got {spec!r}")


def _std_of(spec: StdSpec | None, local_rank: int) -> int:
    if spec is None:
        return 0
    if isinstance(spec, Mapping):
        return int(spec.get(local_rank, 0))
    return BOTH if spec is True else int(spec)


def _check_prefix(template: str) -> None:
    try:
        string.Template(template).substitute(rank=0, local_rank=0, role_name="x")
    except (KeyError, ValueError) as exc:
        raise ValueError(
            f"log_line_prefix_template may use only ${{rank}}, ${{local_rank}} and ${{role_name}}, got {template!r} ({exc!r})"
        ) from None


@dataclass(frozen=True)
class RankResult:
    """How one rank ended. ``exitcode`` follows ``Popen.returncode`` (negative: signal);
    ``stopped`` is True when the launcher ended it (another rank failed, or a signal)."""

    rank: int
    pid: int
    exitcode: int | None
    stopped: bool
    stdout_log: Path | None
    stderr_log: Path | None
    error: ErrorRecord | None  # what ``@asyncproc.record`` wrote, if anything
    stderr_tail: tuple[str, ...]
    local_rank: int = 0

    @property
    def failed(self) -> bool:
        """It failed by itself: a non-zero exit the launcher did not cause."""
        return self.exitcode != 0 and not self.stopped


@dataclass(frozen=True)
class LaunchResult:
    """Every rank's result in the last attempt; ``failure`` is its first rank that failed,
    if one did; ``restarts``: how many times the whole group was restarted before it.
    ``exit_code`` is what ``asyncproc run`` exits with; ``check()`` raises ``LaunchFailed``."""

    ranks: tuple[RankResult, ...]
    failure: RankResult | None
    interrupted_by: signal.Signals | None
    restarts: int = 0
    run_id: str = ""

    @property
    def exit_code(self) -> int:
        """0, the failure's exit code, or 128 + the signal number (shell convention)."""
        if self.failure is not None:
            code = self.failure.exitcode
            if code is None:
                return 1
            return code if code > 0 else 128 - code
        if self.interrupted_by is not None:
            return 128 + self.interrupted_by.value
        return 0

    def check(self) -> LaunchResult:
        """Raise ``LaunchFailed`` (with the summary) unless every rank succeeded."""
        if self.exit_code:
            failure = self.failure
            raise LaunchFailed(
                self.summary(), result=self,
                pid=failure.pid if failure else None, exitcode=failure.exitcode if failure else None,
            )
        return self

    def summary(self) -> str:
        """What happened, for a person: which rank failed, how, where its logs are."""
        if self.failure is not None:
            text = _describe_failure(self.failure, stopped=sum(r.stopped for r in self.ranks))
            return text + (f"\n  after {self.restarts} restart(s) of every rank" if self.restarts else "")
        if self.interrupted_by is not None:
            return f"asyncproc run: interrupted by {self.interrupted_by.name}; all {len(self.ranks)} ranks were stopped"
        return f"asyncproc run: all {len(self.ranks)} ranks succeeded"


def _describe_failure(failure: RankResult, stopped: int) -> str:
    lines = [f"asyncproc run: rank {failure.rank} (pid {failure.pid}) failed: it {describe_exitcode(failure.exitcode)}"]
    if failure.error is not None:
        lines.append(f"  error      : {failure.error.message}")
        if failure.error.traceback:
            lines.append("  traceback  :")
            lines += ["    " + line for line in failure.error.traceback.rstrip().splitlines()]
    if failure.stderr_log is not None:
        lines.append(f"  stderr log : {failure.stderr_log}")
    if failure.stdout_log is not None:
        lines.append(f"  stdout log : {failure.stdout_log}")
    # With a recorded traceback the stderr tail mostly repeats it: show less of it.
    tail = failure.stderr_tail[-5:] if failure.error and failure.error.traceback else failure.stderr_tail
    if tail:
        lines.append(f"  last {len(tail)} lines of its stderr:")
        lines += ["    " + line for line in tail]
    if stopped:
        lines.append(f"  {stopped} other rank(s) were stopped")
    return "\n".join(lines)


# -- one rank ----------------------------------------------------------------------------


class _Rank:
    """A rank's handler, its pipes and logs, and what we learned about it."""

    def __init__(self, local_rank: int, command: Sequence[StrPath], config: LaunchConfig, where: _Attempt):
        self.local_rank = local_rank
        self.rank = config.node_rank * config.nproc + local_rank
        self.config = config
        self.attempt = where
        rank_dir = where.dirs.rank_dir(where.number, self.rank)
        self.error_file = rank_dir / "error.json"
        to_file, self.shown = config.std_of(local_rank)
        self.stdout_log = rank_dir / "stdout.log" if to_file & STDOUT else None
        self.stderr_log = rank_dir / "stderr.log" if to_file & STDERR else None
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.stopped = False
        self._read_ends: list[int] = []  # ours until handed to a pump
        self._write_ends: list[int] = []  # the child's; closed here once it has its copy
        env = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
               **config.env, **self._rank_env()}
        # A stream goes through us when the console shows it, or when it has no file (the
        # pipe is then drained: a filtered-out rank's stderr tail still makes the summary).
        self.piped = (self._piped(STDOUT, self.stdout_log), self._piped(STDERR, self.stderr_log))
        out: StrPath | int | None = self._pipe() if self.piped[0] else self.stdout_log
        err: StrPath | int | None = self._pipe() if self.piped[1] else self.stderr_log
        try:
            self.handler = SubprocessHandler(
                command[0], command[1:], env, out, err, local_rank, config.numa_options, local_world_size=config.nproc
            )
        except BaseException:  # a bad command: nobody else will close our pipes
            self._close_pipes()
            raise

    def _piped(self, stream: int, log_file: Path | None) -> bool:
        return bool(self.shown & stream) or log_file is None

    def _rank_env(self) -> dict[str, str]:
        c = self.config
        env = {
            "LOCAL_RANK": str(self.local_rank), "RANK": str(self.rank), "GROUP_RANK": str(c.node_rank),
            "ROLE_RANK": str(self.rank), "ROLE_NAME": c.role,
            "LOCAL_WORLD_SIZE": str(c.nproc), "WORLD_SIZE": str(c.world_size),
            "GROUP_WORLD_SIZE": str(c.nnodes), "ROLE_WORLD_SIZE": str(c.world_size),
            "MASTER_ADDR": c.master_addr, "MASTER_PORT": str(self.attempt.port),
            "TORCHELASTIC_RESTART_COUNT": str(self.attempt.number),
            "ASYNCPROC_RESTART_COUNT": str(self.attempt.number),
            "TORCHELASTIC_MAX_RESTARTS": str(c.max_restarts),
            "TORCHELASTIC_RUN_ID": self.attempt.run_id,
            # Nobody hosts a store for the ranks: rank 0 must start the TCPStore itself.
            "TORCHELASTIC_USE_AGENT_STORE": "False",
            "TORCHELASTIC_SIGNALS_TO_HANDLE": ",".join(sig.name for sig in c.signals),
        }
        if c.virtual_local_rank:
            env["LOCAL_RANK"] = "0"
            env["CUDA_VISIBLE_DEVICES"] = _device_of(self.local_rank)
        env.update(dict.fromkeys(ENV_VARS, str(self.error_file)))
        return env

    def _pipe(self) -> int:
        read_end, write_end = os.pipe()
        self._read_ends.append(read_end)
        self._write_ends.append(write_end)
        return write_end

    async def spawn(self, console: _Console) -> list[_Pump]:
        """Start the rank; the pumps its pipes need (none when it writes straight to files)."""
        self.error_file.unlink(missing_ok=True)  # a stale file would blame this run
        try:
            await self.handler.spawn()
        finally:
            for write_end in self._write_ends:
                os.close(write_end)  # the child has its copy; EOF must come when it exits
            self._write_ends.clear()
        c = self.config
        prefix = string.Template(c.log_line_prefix_template).substitute(
            rank=self.rank, local_rank=self.local_rank, role_name=c.role
        ).encode()
        pumps = []
        read_ends = iter(self._read_ends)
        for stream, log_file, tail, out in (
            (STDOUT, self.stdout_log, None, console.out), (STDERR, self.stderr_log, self.tail, console.err)
        ):
            if self.piped[stream - 1]:
                pumps.append(_Pump(next(read_ends), prefix, out if self.shown & stream else None, log_file, tail))
        self._read_ends.clear()  # the pumps own them now
        return pumps

    def result(self) -> RankResult:
        tail = tuple(self.tail) if self.piped[1] else _file_tail(self.stderr_log, TAIL_LINES)
        return RankResult(
            rank=self.rank, pid=self.handler.pid or 0, exitcode=self.handler.returncode,
            stopped=self.stopped and self.handler.returncode != 0,
            stdout_log=self.stdout_log, stderr_log=self.stderr_log,
            error=read_error_file(self.error_file), stderr_tail=tail, local_rank=self.local_rank,
        )

    def close(self) -> None:
        """Close the handler's logs, and pipes never handed to a pump (spawn failed)."""
        if self.handler.proc is not None:
            self.handler.close()
        self._close_pipes()

    def _close_pipes(self) -> None:
        for fd in (*self._read_ends, *self._write_ends):
            os.close(fd)
        self._read_ends.clear()
        self._write_ends.clear()


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


class _Dirs:
    """Where logs and error files go: ``log_dir/<run id>/attempt_<n>/<rank>/``, or the
    same under a temporary folder removed after.

    A run never writes into a previous run's folder: when ``<run id>`` already holds this
    node's first rank (a rerun with the same id, a requeued Slurm job), ``<run id>.1``,
    ``.2``, ... is used instead. Nodes sharing the folder each claim their own ranks."""

    def __init__(self, log_dir: StrPath | None, run_id: str, first_rank: int):
        self.temporary = log_dir is None
        if log_dir is None:
            self.root = Path(tempfile.mkdtemp(prefix="asyncproc-run-"))
            # Our SIGKILL skips ``cleanup``: the guardian removes it then, after the ranks.
            _guardian.register_folder(str(self.root))
            return
        for n in itertools.count():
            self.root = Path(log_dir) / (run_id if n == 0 else f"{run_id}.{n}")
            try:
                # Claimed atomically, so two launchers with one id never share a folder.
                (self.root / "attempt_0" / str(first_rank)).mkdir(parents=True)
                return
            except FileExistsError:
                continue

    def rank_dir(self, attempt: int, rank: int) -> Path:
        path = self.root / f"attempt_{attempt}" / str(rank)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def cleanup(self) -> None:
        if self.temporary:
            shutil.rmtree(self.root, ignore_errors=True)
            _guardian.unregister_folder(str(self.root))


class _PortHold:
    """The master port, chosen free and *held* until the run ends.

    Between choosing a port and rank 0 listening on it (an interpreter start and imports:
    seconds with torch) another process could take it. So the socket that found it stays
    bound, with SO_REUSEADDR and never listening: the kernel then lets a server that also
    sets SO_REUSEADDR (torch's TCPStore, asyncio, ``socket.create_server``) bind and listen
    on it, while an ephemeral bind or connect elsewhere never picks it (Linux skips bound
    ports). A server binding without SO_REUSEADDR gets EADDRINUSE: give it ``master_port``.
    """

    def __init__(self, host: str, port: int | None):
        self.socket: socket.socket | None = None
        if port is not None:
            self.port = port
            return
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind(("", 0))  # every address: no other bind on any of them
            self.port = int(self.socket.getsockname()[1])
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close()
            self.socket = None


@dataclass(frozen=True)
class _Attempt:
    """What the ranks of one attempt share: its number, the run's folders, port and id."""

    number: int
    dirs: _Dirs
    port: int
    run_id: str


def _device_of(local_rank: int) -> str:
    """The device a rank sees as its only one with --virtual-local-rank: its entry of our
    CUDA_VISIBLE_DEVICES (an index, a UUID or a MIG name), or its index."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    entries = [e.strip() for e in visible.split(",")] if visible else []
    return entries[local_rank] if local_rank < len(entries) else str(local_rank)


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


# -- the whole launch ------------------------------------------------------------------


class _Launch:
    """One attempt: spawns the ranks, watches them, stops them all on the first failure or
    when ``stop`` is called (a signal to the launcher)."""

    def __init__(self, command: Sequence[StrPath], config: LaunchConfig, attempt: _Attempt, console: _Console):
        self.config = config
        self.console = console
        self.ranks: list[_Rank] = []
        try:
            for i in range(config.nproc):
                self.ranks.append(_Rank(i, command, config, attempt))
        except BaseException:  # a bad command: what was made so far is ours to undo
            for rank in self.ranks:
                rank.close()
            raise
        self.done = anyio.Event()
        self.failure: _Rank | None = None
        self.stop_signal: int = signal.SIGTERM
        self._running = config.nproc
        self._pumps_left = 0
        self._pumps_done = anyio.Event()

    async def run(self) -> tuple[tuple[RankResult, ...], RankResult | None]:
        """Every rank's result, and the first failure's."""
        await self._supervise()
        ranks = tuple(rank.result() for rank in self.ranks)
        return ranks, ranks[self.failure.local_rank] if self.failure is not None else None

    def stop(self, sig: int) -> None:
        """End the attempt: every rank gets ``sig`` (forwarded as torch does), then SIGKILL."""
        self.stop_signal = sig
        self.done.set()

    def kill_now(self) -> None:
        """SIGKILL every rank's tree at once (a second signal: an impatient user)."""
        for rank in self.ranks:
            if rank.handler.proc is not None:
                rank.handler.signal_tree(signal.SIGKILL)

    async def _supervise(self) -> None:
        pumps: list[_Pump] = []
        try:
            # Spawn before the task group, so a missing command raises FileNotFoundError
            # itself, not inside an exception group (the finally stops the ranks started).
            for rank in self.ranks:
                if self.done.is_set():  # stopped by a signal while starting
                    break
                pumps += await rank.spawn(self.console)
            self._running = sum(rank.handler.proc is not None for rank in self.ranks)
            self._pumps_left = len(pumps)
            async with anyio.create_task_group() as tg:
                for pump in pumps:
                    tg.start_soon(self._run_pump, pump)
                for rank in self.ranks:
                    if rank.handler.proc is not None:
                        tg.start_soon(self._watch, rank)
                if self._running == 0:
                    self.done.set()
                await self.done.wait()
                await self._stop_all()  # on success too: their leftovers hold the pipes
                await self._end_orphans()
                # The ranks are gone; an escaped grandchild may hold a pipe open: bounded drain.
                with anyio.move_on_after(_DRAIN_BOUND_S):
                    if self._pumps_left:
                        await self._pumps_done.wait()
                tg.cancel_scope.cancel()
        finally:
            for pump in pumps:
                pump.close()  # those that never ran: a later rank's spawn failed
            with anyio.CancelScope(shield=True):
                await self._stop_all()
                await self._end_orphans()
                for rank in self.ranks:
                    rank.close()

    async def _run_pump(self, pump: _Pump) -> None:
        try:
            await pump.run()
        except Exception:  # one rank's output must never take the launch down
            log.exception("asyncproc run: output pump of %r failed", pump.prefix.decode().strip())
        finally:
            self._pumps_left -= 1
            if self._pumps_left == 0:
                self._pumps_done.set()

    async def _watch(self, rank: _Rank) -> None:
        code = await rank.handler.wait()
        if code != 0 and self.failure is None and not self.done.is_set():
            self.failure = rank  # the first to fail; the others are stopped, not failed
        self._running -= 1
        if code != 0 or self._running == 0:
            self.done.set()

    async def _stop_all(self) -> None:
        """Kill every started rank, all at once; bounded by grace + KILL_BOUND_S.

        Finished ranks too: ``kill`` then ends what their group left behind (SIGTERM,
        grace, SIGKILL), which would otherwise outlive the launch and hold its pipes.
        """
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                for rank in self.ranks:
                    if rank.handler.proc is None:
                        continue
                    if rank.handler.returncode is None:
                        rank.stopped = True
                    tg.start_soon(rank.handler.kill, self.stop_signal, self.config.grace)


    async def _end_orphans(self) -> None:
        """With ``reap_orphans``: stop and reap what was re-parented to us (the ranks'
        escaped helpers), with their descendants: signal, grace, SIGKILL."""
        if not self.config.reap_orphans:
            return
        for _ in range(_ORPHAN_ROUNDS):
            orphans = self._orphans()
            # One /proc scan for all of them, on a worker thread: never one per orphan.
            tree = await anyio.to_thread.run_sync(_proctree.trees_of, orphans) if orphans else []
            if not tree:
                return
            for sig, bound in ((self.stop_signal, self.config.grace), (signal.SIGKILL, KILL_BOUND_S)):
                _proctree.signal_tree(None, tree, sig)
                tree = await anyio.to_thread.run_sync(_proctree.wait_gone, tree, bound)
                if not tree:
                    break

    def _orphans(self) -> list[int]:
        """Our living children that are neither the guardian nor an unreaped rank; the
        dead ones are reaped on the way (they would stay zombies)."""
        keep = {_guardian.guardian_pid(), *(r.handler.pid for r in self.ranks if r.handler.returncode is None)}
        pids = [pid for pid in _proctree.own_children() or () if pid not in keep]
        return [pid for pid in pids if _proctree.reap(pid) is None]


class _Run:
    """The whole run: attempts, restarted on a rank failure up to ``max_restarts`` times,
    and the signals received meanwhile (the receiver stays open between attempts, so no
    signal finds the launcher without its handler and its summary).

    The attempts are a plain loop rather than a ``Supervisor`` with a ``one_for_all`` group
    of ``Command`` children: every attempt needs a fresh environment
    (``TORCHELASTIC_RESTART_COUNT``), fresh log paths and pipes read by our pumps, which a
    ``Command`` (argv, env and files fixed when built) cannot give. ``_attempts`` is the
    only place that decides on restarts, so moving onto a supervisor is local: one ``Task``
    child running ``_Launch.run`` (raising on a rank failure), ``restart="transient"``,
    ``max_restarts=K``, ``max_seconds=inf``, ``Backoff(initial=0, jitter=0)``: torchrun's
    rule, the same behaviour.
    """

    def __init__(self, command: Sequence[StrPath], config: LaunchConfig):
        self.command = command
        self.config = config
        self.run_id = config.run_id or _new_run_id()
        self.interrupted_by: signal.Signals | None = None
        self.current: _Launch | None = None

    async def run(self) -> LaunchResult:
        config = self.config
        dirs = _Dirs(config.log_dir, self.run_id, config.node_rank * config.nproc)
        port: _PortHold | None = None
        console: _Console | None = None
        try:
            port = _PortHold(config.master_addr, config.master_port)
            console = _Console.of_this_process()
            return await self._with_signals(dirs, port.port, console)
        finally:
            if console is not None:
                console.close()
            if port is not None:
                port.close()
            dirs.cleanup()  # on every path: a failed spawn must not leave the folder

    async def _with_signals(self, dirs: _Dirs, port: int, console: _Console) -> LaunchResult:
        if not self.config.handle_signals:
            return await self._attempts(dirs, port, console)
        error: Exception | None = None
        async with anyio.create_task_group() as tg:
            await tg.start(self._watch_signals)
            try:
                result = await self._attempts(dirs, port, console)
            except Exception as exc:  # raised as itself, not inside an exception group
                error = exc
            tg.cancel_scope.cancel()
        if error is not None:
            raise error
        return result

    async def _attempts(self, dirs: _Dirs, port: int, console: _Console) -> LaunchResult:
        ranks: tuple[RankResult, ...] = ()
        failure: RankResult | None = None
        restarts = 0
        for number in range(self.config.max_restarts + 1):
            if number and self.interrupted_by is None:
                await self._announce_restart(console, failure, number)
            if self.interrupted_by is not None:
                break
            # No await between the check above and this: a signal cannot fall in between.
            self.current = _Launch(self.command, self.config, _Attempt(number, dirs, port, self.run_id), console)
            try:
                ranks, failure = await self.current.run()
            finally:
                self.current = None
            restarts = number
            if failure is None:
                break
        return LaunchResult(ranks, failure, self.interrupted_by, restarts=restarts, run_id=self.run_id)

    async def _announce_restart(self, console: _Console, failure: RankResult | None, number: int) -> None:
        assert failure is not None
        line = (
            f"asyncproc run: rank {failure.rank} (pid {failure.pid}) {describe_exitcode(failure.exitcode)}; "
            f"restarting every rank (restart {number} of {self.config.max_restarts})\n"
        )
        await console.err.write(line.encode())

    async def _watch_signals(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The first signal stops the ranks cleanly (forwarded to them); a second one SIGKILLs
        them now. The receiver stays open until the run ends, so a second signal never
        takes the launcher down without its summary."""
        with anyio.open_signal_receiver(*self.config.signals) as signals:
            task_status.started()
            async for signum in signals:
                if self.interrupted_by is None:
                    self.interrupted_by = signal.Signals(signum)
                    if self.current is not None:
                        self.current.stop(signum)
                elif self.current is not None:
                    self.current.kill_now()


def _new_run_id() -> str:
    """Sortable and unique: when, and a random tail for two runs in one second."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


async def start_processes(command: Sequence[StrPath], config: LaunchConfig) -> LaunchResult:
    """Run ``config.nproc`` copies of ``command`` as local ranks until all end or one fails
    (then, with ``max_restarts``, all of them again).

    Returns every rank's result (call ``.check()`` to raise ``LaunchFailed`` on failure).
    Raises ``FileNotFoundError`` if the command does not exist (no rank is left running).
    Cancelling the caller stops every rank (SIGTERM, grace, SIGKILL) before it propagates.
    """
    if isinstance(command, (str, bytes)) or not command:
        raise ValueError(f"command must be a non-empty sequence of arguments, got {command!r}")
    if config.reap_orphans:
        _proctree.make_subreaper()
    return await _Run(list(command), config).run()


# Shown, pickled and documented under the name users import it by (asyncproc.X).
LaunchConfig.__module__ = LaunchResult.__module__ = RankResult.__module__ = start_processes.__module__ = "asyncproc"
