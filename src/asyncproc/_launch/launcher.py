"""Launching local ranks: torch.distributed.elastic's ``start_processes``, async (the
``asyncproc run`` command line is ``cli``; the configuration and results are ``config``,
one rank is ``ranks``, the output path is ``output``).

Output paths, per rank and stream (``LaunchConfig.std_of``):

* redirected only (``--log-dir`` alone, or ``--redirects``): the rank writes straight into
  ``<log_dir>/<run id>/attempt_<n>/<rank>/stdout.log`` (or ``stderr.log``); the launcher
  is not in the data path.
* otherwise: the rank writes into a pipe; the launcher reads it, writes the raw bytes to the
  log file (if teed) and whole lines, prefixed (``[rankN]: ``), to its own stdout/stderr
  (``output._Pump``).

Fail fast: the first rank to fail stops the others (its signal, ``grace``, SIGKILL, through
``SubprocessHandler.kill``); a handled signal to the launcher (``handle_signals``) does the
same with the signal received. With ``max_restarts``, a failed attempt is followed by a new
one (``_Run``), up to that many times.
"""

from __future__ import annotations

import logging
import secrets
import signal
import time
from collections.abc import Sequence

import anyio
import anyio.abc

from .._exceptions import describe_exitcode
from .._proc import proctree as _proctree
from .._subprocess import guardian as _guardian
from .._subprocess.handler import StrPath
from .config import LaunchConfig, LaunchResult, RankResult
from .output import _Console, _Pump
from .ranks import _Attempt, _Dirs, _PortHold, _Rank

log = logging.getLogger("asyncproc")

__all__ = ["start_processes"]

_DRAIN_BOUND_S = 2.0  # after the ranks are gone, a grandchild may still hold their pipes


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
        escaped helpers), with their descendants: signal, grace, SIGKILL. Every child is
        one but the guardian and the ranks not reaped yet."""
        if not self.config.reap_orphans:
            return
        keep = {_guardian.guardian_pid(), *(r.handler.pid for r in self.ranks if r.handler.returncode is None)}
        await _proctree.Adopted({pid for pid in keep if pid is not None}).end_async(self.stop_signal, self.config.grace)


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


start_processes.__module__ = "asyncproc"  # shown and documented as asyncproc.start_processes
