"""Launching local ranks: torch.distributed.elastic's ``start_processes``, async, and the
``asyncproc run`` command.

Output paths, per rank and stream:

* ``log_dir`` without ``tee``: the rank writes straight into ``<log_dir>/<rank>/stdout.log``
  (and ``stderr.log``); the launcher is not in the data path.
* otherwise: the rank writes into a pipe; the launcher reads it, writes the raw bytes to the
  log file (if any) and whole lines, prefixed ``[rankN]:``, to its own stdout/stderr. All
  pumps run on the one event-loop thread and each batch of complete lines is one block,
  written whole by one writer per console stream (``_ConsoleStream``, non-blocking for a
  pipe or terminal), so console lines are never split or interleaved; a partial line waits for its newline (or
  for EOF, or for 64 KiB, whichever comes first).

Fail fast: the first rank to fail stops the others (its signal, ``grace``, SIGKILL, through
``SubprocessHandler.kill``); SIGINT/SIGTERM to the launcher (``handle_signals``) do the same
with the signal received.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.abc

from . import _guardian, _proctree
from ._errorfile import ENV_VARS, ErrorRecord, read_error_file
from ._exceptions import LaunchFailed, describe_exitcode
from ._handler import DEFAULT_GRACE_S, KILL_BOUND_S, StrPath, SubprocessHandler
from ._validate import check_count, check_env, check_flag, check_path, check_seconds, check_text

log = logging.getLogger("asyncproc")

__all__ = ["LaunchConfig", "LaunchResult", "RankResult", "start_processes", "configure_parser", "cli"]

TAIL_LINES = 20  # last stderr lines kept per rank for the failure summary
_CHUNK = 65536
_LONGEST_LINE = 65536  # a line longer than this is emitted in pieces, each prefixed
_DRAIN_BOUND_S = 2.0  # after the ranks are gone, a grandchild may still hold their pipes
_ORPHAN_ROUNDS = 3  # a killed orphan's own descendants are re-parented to us in turn
NUMA_MODES = ("node", "socket", "exclusive", "core-complex")


@dataclass(frozen=True)
class LaunchConfig:
    """How to launch ``nproc`` local ranks of one command.

    ``env`` overlays ``os.environ`` for every rank (None removes a variable); the rank
    variables are set on top. ``master_port`` None picks a free port. ``handle_signals``
    makes SIGINT/SIGTERM to this process stop every rank (main thread only; the CLI sets it).

    ``reap_orphans`` makes this process a child subreaper (for good: it cannot be undone
    per launch) and, once the ranks are stopped, kills (with their trees) and reaps every
    child of this process but the guardian: a rank's helper that started its own session
    and lost its parent is re-parented here instead of escaping. Only for a process that
    exists to launch (the CLI sets it): it would end the program's other children too.
    """

    nproc: int
    log_dir: StrPath | None = None
    tee: bool = False
    numa_options: Any = None
    env: Mapping[str, str | None] = field(default_factory=dict)
    grace: float = DEFAULT_GRACE_S
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    handle_signals: bool = False
    reap_orphans: bool = False

    def __post_init__(self) -> None:
        check_count("nproc", self.nproc, minimum=1)
        check_path("log_dir", self.log_dir, allow_none=True)
        check_flag("tee", self.tee)
        check_env("env", self.env)
        check_seconds("grace", self.grace)
        check_text("master_addr", self.master_addr)
        port = check_count("master_port", self.master_port, minimum=1, allow_none=True)
        if port is not None and port > 65535:
            raise ValueError(f"master_port must be in 1..65535, got {port!r}")
        check_flag("handle_signals", self.handle_signals)
        check_flag("reap_orphans", self.reap_orphans)


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

    @property
    def failed(self) -> bool:
        """It failed by itself: a non-zero exit the launcher did not cause."""
        return self.exitcode != 0 and not self.stopped


@dataclass(frozen=True)
class LaunchResult:
    """Every rank's result; ``failure`` is the first rank that failed, if one did;
    ``interrupted_by`` the signal that stopped the launch, if one did. ``exit_code`` is
    what ``asyncproc run`` exits with; ``check()`` raises ``LaunchFailed``."""

    ranks: tuple[RankResult, ...]
    failure: RankResult | None
    interrupted_by: signal.Signals | None

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
            return _describe_failure(self.failure, stopped=sum(r.stopped for r in self.ranks))
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

    def __init__(self, rank: int, command: Sequence[StrPath], config: LaunchConfig, dirs: _Dirs, port: int):
        self.rank = rank
        self.config = config
        rank_dir = dirs.rank_dir(rank)
        self.error_file = rank_dir / "error.json"
        self.stdout_log = rank_dir / "stdout.log" if config.log_dir is not None else None
        self.stderr_log = rank_dir / "stderr.log" if config.log_dir is not None else None
        self.piped = config.log_dir is None or config.tee
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.stopped = False
        self._read_ends: list[int] = []  # ours until handed to a pump
        self._write_ends: list[int] = []  # the child's; closed here once it has its copy
        env = {**config.env, **self._rank_env(port)}
        out: StrPath | int | None = self.stdout_log
        err: StrPath | int | None = self.stderr_log
        if self.piped:
            out, err = self._pipe(), self._pipe()
        try:
            self.handler = SubprocessHandler(
                command[0], command[1:], env, out, err, rank, config.numa_options, local_world_size=config.nproc
            )
        except BaseException:  # a bad command: nobody else will close our pipes
            self._close_pipes()
            raise

    def _rank_env(self, port: int) -> dict[str, str]:
        n = str(self.config.nproc)
        env = {
            "LOCAL_RANK": str(self.rank), "RANK": str(self.rank), "GROUP_RANK": "0",
            "LOCAL_WORLD_SIZE": n, "WORLD_SIZE": n,
            "MASTER_ADDR": self.config.master_addr, "MASTER_PORT": str(port),
        }
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
        if not self._read_ends:
            return []
        out_r, err_r = self._read_ends
        self._read_ends.clear()  # the pumps own them now
        prefix = f"[rank{self.rank}]: ".encode()
        shown = self.config.tee or self.config.log_dir is None
        return [
            _Pump(out_r, prefix, console.out if shown else None, self.stdout_log, None),
            _Pump(err_r, prefix, console.err if shown else None, self.stderr_log, self.tail),
        ]

    def result(self) -> RankResult:
        tail = tuple(self.tail) if self.piped else _file_tail(self.stderr_log, TAIL_LINES)
        return RankResult(
            rank=self.rank, pid=self.handler.pid or 0, exitcode=self.handler.returncode,
            stopped=self.stopped and self.handler.returncode != 0,
            stdout_log=self.stdout_log, stderr_log=self.stderr_log,
            error=read_error_file(self.error_file), stderr_tail=tail,
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
    """Where logs and error files go: ``log_dir``, or a temporary folder removed after."""

    def __init__(self, log_dir: StrPath | None):
        self.temporary = log_dir is None
        self.root = Path(tempfile.mkdtemp(prefix="asyncproc-run-")) if log_dir is None else Path(log_dir)

    def rank_dir(self, rank: int) -> Path:
        path = self.root / str(rank)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def cleanup(self) -> None:
        if self.temporary:
            shutil.rmtree(self.root, ignore_errors=True)


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
    """Spawns the ranks, watches them, stops them all on the first failure or a signal."""

    def __init__(self, command: Sequence[StrPath], config: LaunchConfig):
        self.config = config
        self.dirs = _Dirs(config.log_dir)
        self.ranks: list[_Rank] = []
        try:
            port = config.master_port or _free_port(config.master_addr)
            for i in range(config.nproc):
                self.ranks.append(_Rank(i, command, config, self.dirs, port))
        except BaseException:  # a bad command: what was made so far is ours to undo
            for rank in self.ranks:
                rank.close()
            self.dirs.cleanup()
            raise
        self.done = anyio.Event()
        self.failure: _Rank | None = None
        self.interrupted_by: signal.Signals | None = None
        self.stop_signal: int = signal.SIGTERM
        self._running = config.nproc
        self._pumps_left = 0
        self._pumps_done = anyio.Event()

    async def run(self) -> LaunchResult:
        self.console = _Console.of_this_process()
        try:
            await self._supervise()
            ranks = tuple(rank.result() for rank in self.ranks)
        finally:
            self.console.close()
            self.dirs.cleanup()  # on every path: a failed spawn must not leave the folder
        failure = ranks[self.failure.rank] if self.failure is not None else None
        return LaunchResult(ranks, failure, self.interrupted_by)

    async def _supervise(self) -> None:
        pumps: list[_Pump] = []
        try:
            # Spawn before the task group, so a missing command raises FileNotFoundError
            # itself, not inside an exception group (the finally stops the ranks started).
            for rank in self.ranks:
                pumps += await rank.spawn(self.console)
            self._pumps_left = len(pumps)
            async with anyio.create_task_group() as tg:
                for pump in pumps:
                    tg.start_soon(self._run_pump, pump)
                for rank in self.ranks:
                    tg.start_soon(self._watch, rank)
                if self.config.handle_signals:
                    tg.start_soon(self._watch_signals)
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

    async def _watch_signals(self) -> None:
        """The first SIGINT/SIGTERM stops the ranks cleanly; a second one (an impatient
        user) SIGKILLs them now. The receiver stays open until the ranks are stopped, so
        a second signal never takes the launcher down without its summary."""
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                if self.interrupted_by is None:
                    self.interrupted_by = signal.Signals(signum)
                    self.stop_signal = signum  # forwarded to the ranks first, as torch does
                    self.done.set()
                    continue
                for rank in self.ranks:
                    if rank.handler.proc is not None:
                        rank.handler.signal_tree(signal.SIGKILL)

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
            tree = [proc for pid in self._orphans() for proc in _proctree.process_and_descendants(pid)]
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


def _free_port(host: str) -> int:
    """A port free right now (the ranks' rendezvous binds it moments later, as torchrun)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


async def start_processes(command: Sequence[StrPath], config: LaunchConfig) -> LaunchResult:
    """Run ``config.nproc`` copies of ``command`` as local ranks until all end or one fails.

    Returns every rank's result (call ``.check()`` to raise ``LaunchFailed`` on failure).
    Raises ``FileNotFoundError`` if the command does not exist (no rank is left running).
    Cancelling the caller stops every rank (SIGTERM, grace, SIGKILL) before it propagates.
    """
    if isinstance(command, (str, bytes)) or not command:
        raise ValueError(f"command must be a non-empty sequence of arguments, got {command!r}")
    if config.reap_orphans:
        _proctree.make_subreaper()
    return await _Launch(list(command), config).run()


# -- the command line ---------------------------------------------------------------------


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.usage = "asyncproc run -n NPROC [--numa MODE] [--log-dir DIR] [--tee] -- COMMAND [ARGS...]"
    parser.add_argument("-n", "--nproc", type=int, required=True, help="number of local ranks")
    parser.add_argument("--numa", choices=NUMA_MODES, help="bind each rank near its GPU (or NUMA node)")
    parser.add_argument("--log-dir", help="write each rank's output to DIR/<rank>/stdout.log and stderr.log")
    parser.add_argument("--tee", action="store_true", help="with --log-dir, show the output on the console too")
    parser.add_argument("--grace", type=float, default=DEFAULT_GRACE_S,
                        help="seconds between SIGTERM and SIGKILL when stopping ranks (default: %(default)s)")
    parser.add_argument("--backend", choices=("asyncio", "uvloop", "trio"), default="asyncio",
                        help="event loop the launcher runs on (default: %(default)s)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command each rank runs, after --")


def cli(args: argparse.Namespace) -> int:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        print("asyncproc run: no command given (usage: asyncproc run -n NPROC -- COMMAND [ARGS...])", file=sys.stderr)
        return 2
    try:
        config = LaunchConfig(
            nproc=args.nproc, log_dir=args.log_dir, tee=args.tee, grace=args.grace,
            numa_options=_numa_options(args.numa), handle_signals=True, reap_orphans=True,
        )
    except ValueError as exc:
        print(f"asyncproc run: {exc}", file=sys.stderr)
        return 2
    backend, options = ("trio", {}) if args.backend == "trio" else ("asyncio", {"use_uvloop": args.backend == "uvloop"})
    try:
        result = anyio.run(start_processes, command, config, backend=backend, backend_options=options)
    except FileNotFoundError as exc:
        print(f"asyncproc run: cannot run {command[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127
    except PermissionError as exc:
        print(f"asyncproc run: cannot run {command[0]!r}: {exc.strerror}", file=sys.stderr)
        return 126
    if result.exit_code:
        with contextlib.suppress(OSError):
            print(result.summary(), file=sys.stderr)
    _quiet_broken_stdout()
    return result.exit_code


def _quiet_broken_stdout() -> None:
    """When the console's reader went away, point stdout at /dev/null, so the flush at
    exit does not fail with a BrokenPipeError traceback and exit code 120."""
    try:
        sys.stdout.flush()
    except OSError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _numa_options(mode: str | None) -> Any:
    if mode is None:
        return None
    from .numa import AffinityMode, NumaOptions  # lazily: only --numa needs it

    return NumaOptions(AffinityMode(mode))


# Shown, pickled and documented under the name users import it by (asyncproc.X).
LaunchConfig.__module__ = LaunchResult.__module__ = RankResult.__module__ = start_processes.__module__ = "asyncproc"


if __name__ == "__main__":  # pragma: no cover - `python -m asyncproc run` is the front door
    _parser = argparse.ArgumentParser(prog="asyncproc run")
    configure_parser(_parser)
    sys.exit(cli(_parser.parse_args()))
