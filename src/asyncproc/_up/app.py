"""``asyncproc up``: one ``Supervisor`` running every program of a file, a live view, a
control socket, reload, and signals.

Output: a program that writes to the console gets one pipe per stream for the life of its
name (not per run), created here and handed to each run as ``/proc/self/fd/N`` (a
``Command`` takes paths; opening that path opens the same pipe). So restarts keep one
reader, and the launcher's pump (``_launch.output._Pump``: whole lines, one prefixed block at a
time, through one non-blocking writer per console stream) is reused unchanged. With the
live view, blocks go through rich above the table instead of to the raw terminal.

Shutdown: leaving ``async with Supervisor`` stops every child in reverse order, each with
its grace. The signal receiver stays open around it, so a second SIGINT/SIGTERM can
SIGKILL what is left. If ``up`` itself is SIGKILLed, the handlers' guardian kills every
program it started.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import anyio
import anyio.abc

from .._exceptions import describe_exitcode
from .._proc import proctree as _proctree
from . import config as _config
from . import control

if TYPE_CHECKING:
    import psutil

    from .._launch.output import _Console, _ConsoleStream, _Pump
    from .view import LiveView

__all__ = ["configure_parser", "cli", "UpApp"]

log = logging.getLogger("asyncproc")

EVENTS_SHOWN = 8  # under the live table, and in `ctl status`
_REFRESH_S = 1.0  # uptime and CPU % move on their own: redraw this often
_DRAIN_BOUND_S = 2.0  # an escaped grandchild may hold a program's pipe open after the stop
_KILL_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Child:
    """What ``up`` knows about a child beyond ``ChildStatus``: for the table."""

    def __init__(self) -> None:
        self.started_at: float | None = None  # monotonic, for uptime; set by its "started" event
        self.last_exit: str | None = None
        self.exitcode: int | None = None
        self.over_memory = False
        self.procs: dict[int, psutil.Process] = {}  # kept across refreshes: cpu_percent needs the same object
        self.cpu: float | None = None
        self.rss: int | None = None


class _Outputs:
    """The console pipes, one pair per child name, and their pumps."""

    def __init__(self, out: _ConsoleStream, err: _ConsoleStream, tg: anyio.abc.TaskGroup):
        self.sinks = {"stdout": out, "stderr": err}
        self.tg = tg
        self.write_ends: dict[tuple[str, str], int] = {}
        self.running = 0
        self.drained = anyio.Event()

    def path(self, name: str, stream: str) -> str:
        """A path that opens this child's console pipe (created on first use)."""
        key = (name, stream)
        if key not in self.write_ends:
            from .._launch.output import _Pump

            read_end, write_end = os.pipe()
            self.write_ends[key] = write_end
            self.running += 1
            self.tg.start_soon(self._pump, _Pump(read_end, f"[{name}] ".encode(), self.sinks[stream], None, None))
        return f"/proc/{os.getpid()}/fd/{self.write_ends[key]}"

    async def _pump(self, pump: _Pump) -> None:
        try:
            await pump.run()
        except Exception:  # one program's output must never take `up` down
            log.exception("asyncproc up: output of %s failed", pump.prefix.decode().strip())
        finally:
            self.running -= 1
            if not self.running:
                self.drained.set()

    def release(self, name: str) -> None:
        """The child is gone for good: its pump ends at EOF (once its last writer exits)."""
        for stream in ("stdout", "stderr"):
            fd = self.write_ends.pop((name, stream), None)
            if fd is not None:
                os.close(fd)

    async def close(self) -> None:
        for name, _ in list(self.write_ends):
            self.release(name)
        with anyio.move_on_after(_DRAIN_BOUND_S):
            if self.running:
                await self.drained.wait()


class _LiveSink:
    """Stands in for a ``_ConsoleStream`` under the live view: rich prints each block of
    whole lines above the table (writing to the terminal ourselves would tear it)."""

    broken = False

    def __init__(self, view: LiveView):
        self.view = view

    async def write(self, block: bytes) -> None:
        self.view.print_lines(block.decode(errors="replace"))


class UpApp:
    """A running system: the supervisor, what is shown, and what ctl may do."""

    def __init__(self, config: _config.SystemConfig, socket_path: Path, live: bool):
        self.config = config
        self.socket_path = socket_path
        self.live = live
        self.order: list[str] = [c.name for c in config.children]
        self.stopped: set[str] = set()  # stopped by ctl: listed, state "stopped", until `start`
        self.children: dict[str, _Child] = {name: _Child() for name in self.order}
        self.events: collections.deque[str] = collections.deque(maxlen=EVENTS_SHOWN)
        self.done = anyio.Event()
        self.gave_up: BaseException | None = None
        self.start_error: Exception | None = None
        self._events_done = anyio.Event()
        self._lock = anyio.Lock()  # one change at a time: reload, restart, SIGHUP
        self.view: LiveView | None = None
        self.sup: Any = None
        self.stream: Any = None  # the supervisor's EventStream, read by _consume_events

    # -- running -----------------------------------------------------------------------

    async def run(self) -> int:
        import asyncproc

        from .._launch.output import _Console

        listener = await control.open_listener(self.socket_path)  # a second `up` on this socket: refused before anything starts
        console = _Console.of_this_process()
        try:
            with self._live_view(console), _log_to(self):
                await self._run(asyncproc, listener, console)
        finally:
            await listener.aclose()
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
            console.close()
        return self._report()

    @contextlib.contextmanager
    def _live_view(self, console: _Console) -> Any:
        if not self.live:
            yield
            return
        from .view import LiveView

        with LiveView(f"asyncproc up {self.config.path}") as view:
            self.view = view
            self._redraw()
            yield

    async def _run(self, asyncproc: Any, listener: Any, console: _Console) -> None:
        async with anyio.create_task_group() as outer:
            if self.view is not None:
                sink = cast("_ConsoleStream", _LiveSink(self.view))
                self.outputs = _Outputs(sink, sink, outer)
            else:
                self.outputs = _Outputs(console.out, console.err, outer)
            self.sup = asyncproc.Supervisor(
                [self._command(c) for c in self.config.children],
                strategy=self.config.supervisor.strategy,
                max_restarts=self.config.supervisor.max_restarts,
                max_seconds=self.config.supervisor.max_seconds,
                backoff=asyncproc.Backoff(**dict(self.config.supervisor.backoff)),
                id="up",
            )
            self.stream = self.sup.events()
            outer.start_soon(self._consume_events, self.stream, console)
            await outer.start(self._watch_signals)  # installed before anything starts: no signal finds the default action
            outer.start_soon(control.serve, listener, self._handle)
            self._notice(f"{len(self.config.children)} children from {self.config.path}; control socket {self.socket_path}")
            try:
                async with self.sup:
                    async with anyio.create_task_group() as inner:
                        inner.start_soon(self._wait_supervisor)
                        inner.start_soon(self._refresh)
                        await self.done.wait()
                        inner.cancel_scope.cancel()
            except asyncproc.SupervisorGaveUp as exc:
                self.gave_up = exc
            except Exception as exc:  # a program that cannot start (missing command, NUMA): everything started was stopped
                self.start_error = exc
            await self.outputs.close()
            with anyio.move_on_after(_DRAIN_BOUND_S):
                await self._events_done.wait()  # the stream ends with the supervisor: show its last events
            outer.cancel_scope.cancel()

    async def _wait_supervisor(self) -> None:
        import asyncproc

        try:
            await self.sup.wait()
        except asyncproc.SupervisorGaveUp as exc:
            self.gave_up = exc
            self.done.set()

    def _command(self, child: _config.ChildDef) -> Any:
        import asyncproc

        numa = None
        if child.numa is not None:
            from ..numa import AffinityMode, NumaOptions

            numa = NumaOptions(AffinityMode(child.numa))
        for path in (child.stdout, child.stderr):
            if path is not None:
                Path(path).parent.mkdir(parents=True, exist_ok=True)  # logs/{name}.out: the folder too
        return asyncproc.Command(
            child.name, list(child.argv), env=dict(child.env), cwd=child.cwd,
            stdout=child.stdout or self.outputs.path(child.name, "stdout"),
            stderr=child.stderr or self.outputs.path(child.name, "stderr"),
            restart=child.restart, shutdown=child.shutdown, memory_limit=child.memory_limit,
            numa_options=numa, local_rank_id=child.local_rank_id, local_world_size=child.local_world_size,
        )

    def _report(self) -> int:
        if self.start_error is not None:
            with contextlib.suppress(OSError):
                print(f"asyncproc up: cannot start the system: {_describe_error(self.start_error)}; everything started was stopped",
                      file=sys.stderr)
            return 1
        if self.gave_up is None:
            return 0
        with contextlib.suppress(OSError):  # the message names the child and its last failure
            print(f"asyncproc up: {self.gave_up}; everything was stopped", file=sys.stderr)
        return 1

    # -- events, metrics, the view -------------------------------------------------------

    async def _consume_events(self, events: Any, console: _Console) -> None:
        try:
            async for event in events:
                line = self._note(event)
                if self.view is not None:
                    self._redraw()
                else:
                    await console.out.write((line + "\n").encode())
        finally:
            self._events_done.set()

    def _note(self, event: Any) -> str:
        """Update what we know from one supervisor event; the line that tells it."""
        child = self.children.setdefault(event.child, _Child())
        kind = event.kind
        if kind == "started":
            child.started_at = time.monotonic()
            text = f"started (pid {event.pid})"
        elif kind == "exited":
            child.started_at = None
            child.exitcode = event.exitcode
            child.last_exit = "memory limit" if child.over_memory else _short_exit(event.exitcode)
            child.over_memory = False
            text = describe_exitcode(event.exitcode) if event.exitcode is not None else f"ended ({event.error!r})"
        elif kind == "memory_exceeded":
            child.over_memory = True
            text = "went over its memory limit; stopping it"
        elif kind == "restarting":
            text = f"restarting in {event.delay or 0:.1f} s (restart {event.restarts})"
        elif kind == "stopped":
            child.started_at = None
            text = "stopped"
        elif kind == "gave_up":
            text = "failed too often: the supervisor gives up and stops everything"
        else:
            text = kind
        line = f"{time.strftime('%H:%M:%S', time.localtime(event.time))} {event.child}: {text}"
        self.events.append(line)
        return line

    async def _refresh(self) -> None:
        while True:
            self._measure()
            self._redraw()
            await anyio.sleep(_REFRESH_S)

    def _measure(self) -> None:
        """CPU % and RSS of each running child's whole tree (psutil)."""
        import psutil

        pids = {s.id: s.pid for s in self.sup.status()}
        for name, child in self.children.items():
            pid = pids.get(name)
            if pid is None:
                child.procs.clear()
                child.cpu = child.rss = None
                continue
            tree = {p.pid: p for p in _proctree.process_and_descendants(pid)}
            child.procs = {p: child.procs.get(p, proc) for p, proc in tree.items()}
            cpu, rss = 0.0, 0
            for proc in child.procs.values():
                with contextlib.suppress(psutil.Error):
                    cpu += proc.cpu_percent(None)  # since the last refresh; 0.0 the first time
                    rss += proc.memory_info().rss
            child.cpu, child.rss = cpu, rss

    def _redraw(self) -> None:
        if self.view is not None:
            rows = self.rows()  # first: it takes in the events not read yet
            self.view.update(rows, list(self.events))

    def _catch_up(self) -> None:
        """Take in every event the supervisor has emitted but ``_consume_events`` has not
        read yet. ``status()`` already reflects them: a table drawn from it beside event
        lines that lag would show a child running whose "started" line is not there yet."""
        if self.stream is not None:
            for event in self.stream._take_pending():
                self._note(event)

    def rows(self) -> list[dict[str, Any]]:
        """The table. Under the live view (and its ``ctl status``) it agrees with the events
        shown beside it: a child the supervisor counts as running from the moment its spawn
        begins is "starting" until its "started" event is in (``_Child.started_at``)."""
        agree = self.view is not None
        if agree:
            self._catch_up()
        statuses = {s.id: s for s in self.sup.status()} if self.sup is not None else {}
        rows = []
        now = time.monotonic()
        for name in self.order:
            status = statuses.get(name)
            child = self.children.setdefault(name, _Child())
            running = status is not None and status.state == "running"
            starting = running and agree and child.started_at is None
            running = running and not starting
            rows.append({
                "name": name,
                "program": self._program_of(name),
                "state": "starting" if starting else status.state if status is not None else "stopped",
                "pid": status.pid if status is not None and not starting else None,
                "restarts": status.restarts if status is not None else 0,
                "uptime": now - child.started_at if running and child.started_at is not None else None,
                "cpu": child.cpu if running else None,
                "rss": child.rss if running else None,
                "exitcode": child.exitcode,
                "last_exit": child.last_exit,
            })
        return rows

    def _program_of(self, name: str) -> str:
        child = self.config.child(name)
        return child.program if child is not None else name

    # -- signals -------------------------------------------------------------------------

    async def _watch_signals(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """SIGINT/SIGTERM: stop everything (reverse order, each program's grace); a second
        one: SIGKILL every child's tree now. SIGHUP: reload."""
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    with contextlib.suppress(control.ControlError):
                        await self.reload()
                elif not self.done.is_set():
                    self._notice(f"{signal.Signals(signum).name}: stopping everything (again to kill now)")
                    self.done.set()
                else:
                    self._notice(f"{signal.Signals(signum).name} again: killing everything now")
                    self._kill_all()

    def _kill_all(self) -> None:
        for status in self.sup.status():
            if status.pid is not None:
                procs = _proctree.process_and_descendants(status.pid)
                _proctree.signal_tree(status.pid, procs, signal.SIGKILL)

    def _notice(self, text: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} up: {text}"
        self.events.append(line)
        if self.view is not None:
            self._redraw()
        else:
            with contextlib.suppress(OSError):
                print(line, file=sys.stderr, flush=True)

    # -- control ---------------------------------------------------------------------------

    async def _handle(self, req: dict[str, Any]) -> Any:
        command = req["command"]
        if command == "status":
            rows = self.rows()  # first: under the live view it takes in the events not read yet
            return {"children": rows, "events": list(self.events)}
        if command == "down":
            self._notice("down requested: stopping everything")
            self.done.set()
            return "stopping"
        if command == "reload":
            return await self.reload()
        if command in ("start", "stop", "restart"):
            names = self._resolve(req.get("name"))
            act = {"start": self._start, "stop": self._stop, "restart": self._restart}[command]
            async with self._lock:  # replicas stop in reverse order, start in order
                return [await act(name) for name in (reversed(names) if command == "stop" else names)]
        raise control.ControlError(f"unknown command {command!r}")

    def _resolve(self, name: object) -> list[str]:
        """A child's name, or a program's (all its replicas)."""
        if not isinstance(name, str):
            raise control.ControlError("a NAME is needed")
        if name in self.order:
            return [name]
        replicas = [c.name for c in self.config.children if c.program == name]
        if not replicas:
            raise control.ControlError(f"no program or child named {name!r} (children: {', '.join(self.order)})")
        return replicas

    async def _stop(self, name: str) -> str:
        if name in self.stopped:
            return f"{name}: already stopped"
        await self.sup.stop_child(name)
        self.stopped.add(name)
        self._notice(f"{name}: stopped by ctl")
        return f"{name}: stopped"

    async def _start(self, name: str) -> str:
        if name not in self.stopped:
            state = next((s.state for s in self.sup.status() if s.id == name), None)
            if state == "ended":  # a temporary or transient child that is over: run it again
                await self.sup.restart_child(name)
                return f"{name}: started"
            return f"{name}: already {state}"
        child = self.config.child(name)
        assert child is not None
        await self.sup.start_child(self._command(child))
        self.stopped.discard(name)
        return f"{name}: started"

    async def _restart(self, name: str) -> str:
        if name in self.stopped:
            return await self._start(name)
        await self.sup.restart_child(name)
        return f"{name}: restarted"

    async def reload(self) -> list[str]:
        """Re-read the file: added programs start, removed ones stop, changed ones restart,
        unchanged ones are not touched. A file that does not load changes nothing."""
        try:
            new = _config.load(self.config.path)
        except _config.ConfigError as exc:
            self._notice(f"reload refused, the running system is kept: {exc}")
            raise control.ControlError(f"reload refused, the running system is kept: {exc}") from None
        async with self._lock:
            return await self._apply(new)

    async def _apply(self, new: _config.SystemConfig) -> list[str]:
        old = self.config
        names = {c.name for c in new.children}
        done = []
        for child in reversed(old.children):
            if child.name not in names:
                if child.name not in self.stopped:
                    await self.sup.stop_child(child.name)
                self.stopped.discard(child.name)
                self.outputs.release(child.name)
                done.append(f"{child.name}: removed")
        self.config = new  # _command reads the new definitions from here on
        for child in new.children:
            before = old.child(child.name)
            if before == child:
                continue
            if before is not None and child.name not in self.stopped:
                await self.sup.stop_child(child.name)
            if child.name not in self.stopped:
                await self.sup.start_child(self._command(child))
            done.append(f"{child.name}: {'added' if before is None else 'changed, restarted'}")
        self.order = [c.name for c in new.children]
        if new.supervisor != old.supervisor:
            done.append("[supervisor] changed: it applies when up is started again")
        self._notice(f"reloaded {new.path}: " + ("; ".join(done) or "nothing changed"))
        return done


class _NoticeHandler(logging.Handler):
    """asyncproc's log records as ``up``'s notices (above the live table, or a plain line),
    except the supervisor's echo of each event: ``up`` shows the events themselves."""

    def __init__(self, app: UpApp):
        super().__init__(logging.INFO)
        self.app = app

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, str) and record.msg.startswith("supervisor %r: child %r"):
            return
        try:
            self.app._notice(record.getMessage())
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def _log_to(app: UpApp) -> Iterator[None]:
    logger = logging.getLogger("asyncproc")
    handler = _NoticeHandler(app)
    saved = logger.propagate, logger.level
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.propagate, logger.level = saved


def _describe_error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename!r}: {exc.strerror}" if exc.filename else exc.strerror
    return f"{type(exc).__name__}: {exc}"


def _short_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "error"
    if exitcode < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-exitcode).name
    return str(exitcode)


# -- the command line ----------------------------------------------------------------------


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.usage = "asyncproc up [FILE] [--socket PATH] [--no-live]"
    parser.add_argument("file", nargs="?", default="asyncproc.toml", help="the system's file (default: %(default)s)")
    parser.add_argument("--socket", type=Path, help=f"control socket (default: {control.default_socket_path()})")
    parser.add_argument("--no-live", action="store_true", help="one log line per event instead of the live table")
    parser.add_argument("--backend", choices=("asyncio", "uvloop", "trio"), default="asyncio",
                        help="event loop to run on (default: %(default)s)")


def cli(args: argparse.Namespace) -> int:
    try:
        config = _config.load(args.file)
    except _config.ConfigError as exc:
        print(f"asyncproc up: {exc}", file=sys.stderr)
        return 2
    live = not args.no_live and sys.stdout.isatty()
    app = UpApp(config, args.socket or control.default_socket_path(), live)
    backend, options = ("trio", {}) if args.backend == "trio" else ("asyncio", {"use_uvloop": args.backend == "uvloop"})
    try:
        return int(anyio.run(app.run, backend=backend, backend_options=options))
    except control.ControlError as exc:
        print(f"asyncproc up: {exc}", file=sys.stderr)
        return 1
