"""``asyncproc run``'s configuration and results: ``LaunchConfig`` (checked when built),
``RankResult``, ``LaunchResult`` and its failure summary, and torchrun's stream numbering.
Pure data: no process, no I/O."""

from __future__ import annotations

import signal
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from .._exceptions import LaunchFailed, describe_exitcode
from .._subprocess.handler import DEFAULT_GRACE_S, StrPath
from .._validate import check_count, check_env, check_flag, check_path, check_seconds, check_text
from .errorfile import ErrorRecord

__all__ = ["LaunchConfig", "LaunchResult", "RankResult", "BOTH", "STDERR", "STDOUT", "DEFAULT_PREFIX", "DEFAULT_SIGNALS", "StdSpec"]

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


# Shown, pickled and documented under the name users import it by (asyncproc.X).
LaunchConfig.__module__ = LaunchResult.__module__ = RankResult.__module__ = "asyncproc"
