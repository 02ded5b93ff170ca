"""One local rank of a launch: its handler, environment, pipes and log paths (``_Rank``),
and what the ranks of an attempt share: the run's folders (``_Dirs``), the held master
port (``_PortHold``), the attempt's number (``_Attempt``), a rank's device."""

from __future__ import annotations

import collections
import itertools
import os
import shutil
import socket
import string
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .._subprocess import guardian as _guardian
from .._subprocess.handler import StrPath, SubprocessHandler
from .config import STDERR, STDOUT, LaunchConfig, RankResult
from .errorfile import ENV_VARS, read_error_file
from .output import _Console, _file_tail, _Pump

TAIL_LINES = 20  # last stderr lines kept per rank for the failure summary


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


