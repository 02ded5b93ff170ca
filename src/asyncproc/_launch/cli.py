"""``asyncproc run``: torchrun's command line on top of ``start_processes``.

A torchrun command line runs unchanged with ``asyncproc run`` in its place: the same
options (both spellings, ``--nproc-per-node`` and ``--nproc_per_node``), their defaults
taken from torchrun's ``PET_<OPTION>`` variables (what Kubernetes training operators set)
and, for the node layout, from Slurm. Every value is checked before any rank starts; a bad
one is refused naming the option, the value and the reason (exit code 2).

Where a value comes from, first found wins: the command line, ``PET_*``, Slurm
(``SLURM_JOB_NUM_NODES``, ``SLURM_NODEID``, the first host of ``SLURM_JOB_NODELIST``,
``SLURM_JOB_ID`` as the run id), the default.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import resource
import signal
import string
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from .._subprocess.handler import DEFAULT_GRACE_S
from .config import BOTH, DEFAULT_PREFIX, DEFAULT_SIGNALS, LaunchConfig, StdSpec
from .launcher import start_processes

__all__ = ["configure_parser", "cli"]

NUMA_MODES = ("node", "socket", "exclusive", "core-complex")
RDZV_BACKENDS = ("static", "c10d", "etcd", "etcd-v2")
TORCHRUN_MASTER_PORT = 29500  # torchrun's default when several nodes must agree on one
# Descriptors one rank holds in the launcher at its start (two pipes, two log files, a
# pidfd and one being opened) with room for the launcher's own.
FDS_PER_RANK = 6
FDS_SPARE = 64
OMP_NOTICE = (
    "Setting OMP_NUM_THREADS environment variable for each process to be 1 in default, to avoid your "
    "system being overloaded, please further tune the variable for optimal performance in your "
    "application as needed."
)


class UsageError(Exception):
    """A bad option value: ``--option VALUE: reason``."""

    def __init__(self, option: str | None, value: object, reason: str):
        if option is None:
            super().__init__(reason)
        else:
            super().__init__(f"{option} {value!r}: {reason}" if value is not None else f"{option}: {reason}")


# -- the parser ---------------------------------------------------------------------------


def _opt(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *names: str, **kwargs: Any) -> None:
    """An option under its dashed name and torchrun's underscored twin, defaulting to
    ``PET_<DEST>`` when that variable is set (torchrun's rule)."""
    spellings = [*names]
    for name in names:
        if name.startswith("--") and "-" in name[2:]:
            spellings.append("--" + name[2:].replace("-", "_"))
    parser.add_argument(*spellings, **kwargs)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.usage = "asyncproc run [-n NPROC] [options] SCRIPT.py [ARGS...]  |  ... -m MODULE ...  |  ... -- COMMAND [ARGS...]"
    parser.description = (
        "Run NPROC local ranks (of one node among --nnodes), torchrun's command line; the first failure "
        "stops them all (or, with --max-restarts, restarts them all). A SCRIPT.py runs under this Python "
        "(-u), as with torchrun; any other COMMAND runs as it is."
    )
    g = parser.add_argument_group("ranks and nodes")
    _opt(g, "-n", "--nproc-per-node", "--nproc", dest="nproc", metavar="NPROC",
         help="local ranks: a number, or auto (GPUs if any, else CPUs), cpu, gpu (default: 1)")
    _opt(g, "--nnodes", help="nodes, one `asyncproc run` each: N or N:N (default: 1, or Slurm's)")
    _opt(g, "--node-rank", help="this node's rank, 0..N-1 (default: 0, or Slurm's SLURM_NODEID)")
    _opt(g, "--master-addr", help="rank 0's node (default: 127.0.0.1, or the first host of SLURM_JOB_NODELIST)")
    _opt(g, "--master-port", help=f"rank 0's port (default: one free port, held; {TORCHRUN_MASTER_PORT} with several nodes)")
    _opt(g, "--max-restarts", help="restart every rank after a failure, at most this many times (default: 0)")
    _opt(g, "--rdzv-backend", help="static; c10d/etcd only for one node (asyncproc has no rendezvous)")
    _opt(g, "--rdzv-endpoint", help="static rendezvous: HOST:PORT of rank 0 (as --master-addr/--master-port)")
    _opt(g, "--rdzv-id", "--run-id", dest="rdzv_id", help="the run's id: TORCHELASTIC_RUN_ID and the log folder's name")
    _opt(g, "--rdzv-conf", help="accepted for torchrun's command lines; no rendezvous reads it")
    _opt(g, "--standalone", action="store_true", default=None, help="one node, a free port (torchrun's)")
    _opt(g, "--role", help="ROLE_NAME of the ranks (default: default)")
    _opt(g, "--local-addr", help="accepted for torchrun's command lines; only a rendezvous would use it")
    _opt(g, "--virtual-local-rank", action="store_true", default=None,
         help="LOCAL_RANK=0 for every rank, CUDA_VISIBLE_DEVICES set to its own GPU")

    g = parser.add_argument_group("the command")
    _opt(g, "-m", "--module", action="store_true", default=None, help="run SCRIPT as `python -u -m MODULE`")
    _opt(g, "--no-python", action="store_true", default=None, help="run the command as it is, even a .py")
    _opt(g, "--run-path", action="store_true", default=None, help="torchrun's runpy in-process start: a Python script, run as `python -u SCRIPT`")

    g = parser.add_argument_group("output")
    _opt(g, "--log-dir", help="logs and error files in DIR/<run id>/attempt_<n>/<rank>/")
    _opt(g, "-r", "--redirects", help="streams into the log files only: 0-3 (1 stdout, 2 stderr, 3 both) or LOCAL_RANK:VALUE,...")
    _opt(g, "-t", "--tee", nargs="?", const="3", help="streams into the log files and the console (as --redirects; bare --tee: 3)")
    _opt(g, "--local-ranks-filter", help="show only these local ranks on the console: 0,1,...")
    _opt(g, "--log-line-prefix-template",
         help="console line prefix with ${rank}, ${local_rank}, ${role_name} (default: '[rank${rank}]: ', "
              "or $TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE)")

    g = parser.add_argument_group("stopping")
    _opt(g, "--grace", "--shutdown-timeout", dest="grace",
         help=f"seconds from SIGTERM to SIGKILL when stopping ranks (default: {DEFAULT_GRACE_S:g}, or $TORCH_ELASTIC_SHUTDOWN_TIMEOUT)")
    _opt(g, "--signals-to-handle", help="signals forwarded to the ranks (default: SIGTERM,SIGINT,SIGHUP,SIGQUIT)")

    g = parser.add_argument_group("this launcher")
    _opt(g, "--numa", "--numa-binding", dest="numa", choices=NUMA_MODES, help="bind each rank near its GPU (or NUMA node)")
    parser.add_argument("--backend", choices=("asyncio", "uvloop", "trio"), default="asyncio",
                        help="event loop the launcher runs on (default: %(default)s)")
    for name in ("--monitor-interval", "--start-method", "--event-log-handler", "--logs-specs",
                 "--duplicate-stdout-filters", "--duplicate-stderr-filters"):
        _opt(parser, name, help=argparse.SUPPRESS)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="SCRIPT.py [ARGS], -m MODULE [ARGS], or -- COMMAND [ARGS]")


# -- from options to a LaunchConfig ----------------------------------------------------------


# Where our option's name differs from torchrun's (messages and PET_* use torchrun's).
_OPTION_NAMES = {"nproc": "--nproc-per-node", "grace": "--grace", "rdzv_id": "--rdzv-id", "numa": "--numa"}
_PET_NAMES = {"nproc": "nproc_per_node", "grace": "shutdown_timeout", "numa": "numa_binding"}


@dataclass(frozen=True)
class _Source:
    """Looks an option up: command line, then PET_<DEST>, then Slurm (where it applies)."""

    args: argparse.Namespace
    environ: Mapping[str, str]
    borrowed: list[str] = field(default_factory=list)  # options taken from PET_* or Slurm

    def get(self, dest: str, slurm: Callable[[], str | None] | None = None) -> tuple[str, str | None]:
        """(option name for messages, value or None)."""
        option = _OPTION_NAMES.get(dest, "--" + dest.replace("_", "-"))
        value = getattr(self.args, dest, None)
        if value is not None:
            return option, str(value) if not isinstance(value, bool) else ("1" if value else "0")
        pet = f"PET_{_PET_NAMES.get(dest, dest).upper()}"
        if self.environ.get(pet, "") != "":
            self.borrowed.append(f"{option} (from ${pet})")
            return self.borrowed[-1], self.environ[pet]
        if slurm is not None and (found := slurm()) is not None:
            self.borrowed.append(f"{option} (from Slurm)")
            return self.borrowed[-1], found
        return option, None

    def flag(self, dest: str) -> bool:
        option, value = self.get(dest)
        if value is None:
            return False
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no", ""):
            return False
        raise UsageError(option, value, "must be 0 or 1")

    def slurm(self, name: str) -> Callable[[], str | None]:
        return lambda: self.environ.get(name) or None


def _or(value: str | None, default: str) -> str:
    """The value given (an empty one too: it is refused, not taken as the default)."""
    return default if value is None else value


def _int(option: str, value: str, minimum: int, maximum: int | None = None) -> int:
    try:
        number = int(value)
    except ValueError:
        raise UsageError(option, value, "is not a whole number") from None
    if number < minimum or (maximum is not None and number > maximum):
        bound = f"in {minimum}..{maximum}" if maximum is not None else f">= {minimum}"
        raise UsageError(option, value, f"must be {bound}")
    return number


def _nproc(option: str, value: str) -> int:
    if value in ("auto", "cpu", "gpu"):
        gpus = _gpu_count()
        if value == "gpu" and not gpus:
            raise UsageError(option, value, "no GPU found under /sys/bus/pci/devices (nor in CUDA_VISIBLE_DEVICES)")
        count = gpus if value == "gpu" or (value == "auto" and gpus) else len(os.sched_getaffinity(0))
        print(f"asyncproc run: {option.split()[0]} {value}: {count} local rank(s)", file=sys.stderr)
        return count
    if value == "xpu":
        raise UsageError(option, value, "Intel XPUs are not detected by asyncproc; give a number")
    return _int(option, value, 1)


def _gpu_count() -> int:
    """GPUs as the NUMA code finds them (PCI devices, in CUDA_VISIBLE_DEVICES' order)."""
    from .. import numa
    from .._numa import place as _numa_place

    try:
        return len(_numa_place.visible_gpus(numa.system_topology()))
    except numa.NumaBindingError:  # UUIDs or MIG names: the list itself says how many
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        return len([e for e in visible.split(",") if e.strip()])


def _nnodes(option: str, value: str) -> int:
    low, _, high = value.partition(":")
    nodes = _int(option, low, 1)
    if high and _int(option, high, 1) != nodes:
        raise UsageError(option, value, "an elastic range of nodes needs a rendezvous, which asyncproc run does not have "
                                        "(use torchrun with --rdzv-backend c10d); give one number")
    return nodes


def _first_slurm_host(environ: Mapping[str, str]) -> str | None:
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if not nodelist:
        return None
    import hostlist  # python-hostlist: Slurm's compressed syntax, "gpu-a[07-08,11],gpu-b01"

    try:
        hosts = hostlist.expand_hostlist(nodelist)
    except hostlist.BadHostlist as exc:
        raise UsageError("--master-addr (from Slurm)", nodelist, f"SLURM_JOB_NODELIST does not parse: {exc}") from None
    return hosts[0] if hosts else None


def _std(option: str, value: str | None, nproc: int) -> StdSpec:
    """torchrun's Std forms: "3" for every rank, "0:1,1:2" per local rank."""
    if value is None or value == "":
        return 0
    reason = "must be 0-3 (1 stdout, 2 stderr, 3 both) or LOCAL_RANK:VALUE pairs like 0:1,1:3 (put the command after --)"
    if ":" not in value:
        number = _int(option, value, 0, BOTH) if value.isdigit() else None
        if number is None:
            raise UsageError(option, value, reason)
        return number
    per_rank: dict[int, int] = {}
    for pair in value.split(","):
        rank, _, std = pair.partition(":")
        if not (rank.strip().isdigit() and std.strip().isdigit()) or int(std) > BOTH:
            raise UsageError(option, value, reason)
        if int(rank) >= nproc:
            raise UsageError(option, value, f"names local rank {int(rank)}, but there are only {nproc}")
        per_rank[int(rank)] = int(std)
    return per_rank


def _ranks_filter(option: str, value: str | None, nproc: int) -> frozenset[int] | None:
    if not value:
        return None
    try:
        ranks = frozenset(int(part) for part in value.split(","))
    except ValueError:
        raise UsageError(option, value, "must be local ranks separated by commas, like 0,1,2") from None
    if any(not 0 <= r < nproc for r in ranks):
        raise UsageError(option, value, f"local ranks are 0..{nproc - 1}")
    return ranks


def _signals(option: str, value: str | None) -> tuple[signal.Signals, ...]:
    if value is None:
        return DEFAULT_SIGNALS
    found = []
    for name in (part.strip() for part in value.split(",") if part.strip()):
        key = name.upper() if name.upper().startswith("SIG") else "SIG" + name.upper()
        try:
            sig = signal.Signals[key] if not name.isdigit() else signal.Signals(int(name))
        except (KeyError, ValueError):
            raise UsageError(option, value, f"{name!r} is not a signal name (like SIGTERM)") from None
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise UsageError(option, value, f"{sig.name} cannot be caught, so it cannot be forwarded")
        found.append(sig)
    if not found:
        raise UsageError(option, value, "names no signal")
    return tuple(dict.fromkeys(found))


def _log_dir(option: str, value: str | None) -> Path | None:
    """The folder, created if missing; refused unless we can write in it."""
    if value is None:
        return None
    path = Path(value)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UsageError(option, value, "is not a folder") from None
    except OSError as exc:
        raise UsageError(option, value, f"cannot create it: {exc.strerror}") from None
    if not path.is_dir():
        raise UsageError(option, value, "is not a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(option, value, "is not writable")
    return path


def _check_fd_limit(option: str, nproc: int) -> None:
    """Raise the soft descriptor limit as far as needed (up to the hard one), or refuse:
    running out halfway would leave a launch half started."""
    needed = nproc * FDS_PER_RANK + FDS_SPARE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise UsageError(option, str(nproc), f"needs about {needed} open files, and the limit is {soft} "
                                             f"(hard limit {hard}; see `ulimit -n`)")


def _command(args: argparse.Namespace, source: _Source) -> list[str]:
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise UsageError("COMMAND", None, "no command given (asyncproc run -n NPROC SCRIPT.py [ARGS], or -- COMMAND [ARGS])")
    module, no_python, run_path = source.flag("module"), source.flag("no_python"), source.flag("run_path")
    if module and no_python:
        raise UsageError("--module", None, "cannot be used with --no-python")
    python = source.environ.get("PYTHON_EXEC") or sys.executable  # torchrun's rule
    if module:
        return [python, "-u", "-m", *command]
    if run_path or (not no_python and command[0].endswith(".py")):
        return [python, "-u", *command]
    return command


@dataclass(frozen=True)
class _Layout:
    nproc: int
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int | None
    max_restarts: int


@dataclass(frozen=True)
class _Output:
    log_dir: Path | None
    redirects: StdSpec | None
    tee: StdSpec
    ranks_filter: frozenset[int] | None
    template: str


def _config(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[LaunchConfig, list[str], list[str]]:
    """The launch's config, its command, and notices to print; UsageError on a bad value."""
    source = _Source(args, environ)
    layout = _layout(source)
    out = _output(source, layout.nproc)
    option, value = source.get("grace")
    grace = _grace(option, value if value is not None else environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT"))
    option, value = source.get("signals_to_handle")
    signals = _signals(option, value)
    option, value = source.get("rdzv_id", source.slurm("SLURM_JOB_ID"))
    run_id = None if value in (None, "", "none") else value
    if run_id is not None and ("/" in run_id or run_id in (".", "..")):
        raise UsageError(option, value, "must be a name without '/'")
    _refuse_unsupported(source)
    notices = _ignored(source)
    env: dict[str, str | None] = {}
    if "OMP_NUM_THREADS" not in environ and layout.nproc > 1:
        env["OMP_NUM_THREADS"] = "1"
        notices.append(f"asyncproc run: {OMP_NOTICE}")
    _, role = source.get("role")
    _, numa = source.get("numa")
    try:
        config = LaunchConfig(
            nproc=layout.nproc, nnodes=layout.nnodes, node_rank=layout.node_rank, master_addr=layout.master_addr,
            master_port=layout.master_port, max_restarts=layout.max_restarts, run_id=run_id,
            role=role or "default", log_dir=out.log_dir, redirects=out.redirects, tee=out.tee,
            local_ranks_filter=out.ranks_filter, log_line_prefix_template=out.template, grace=grace,
            signals=signals, env=env, numa_options=_numa_options(numa),
            virtual_local_rank=source.flag("virtual_local_rank"), handle_signals=True, reap_orphans=True,
        )
    except ValueError as exc:  # what the option checks did not catch, named by field
        raise UsageError(None, None, str(exc)) from None
    if source.borrowed:  # say so: a stray SLURM_* or PET_* variable changes the whole layout
        notices.append(_layout_notice(config, source.borrowed))
    return config, _command(args, source), notices


def _layout(source: _Source) -> _Layout:
    """Ranks per node, nodes, this node's rank, rank 0's address, restarts."""
    option, value = source.get("nproc")
    nproc = _nproc(option, _or(value, "1"))
    _check_fd_limit(option, nproc)
    standalone = source.flag("standalone")
    option, value = source.get("nnodes", source.slurm("SLURM_JOB_NUM_NODES"))
    nnodes = _nnodes(option, _or(value, "1"))
    if standalone and nnodes > 1:
        raise UsageError(option, value, "--standalone runs one node")
    option, value = source.get("node_rank", source.slurm("SLURM_NODEID"))
    node_rank = _int(option, _or(value, "0"), 0)
    if node_rank >= nnodes:
        raise UsageError(option, value, f"must be below --nnodes ({nnodes})")
    option, backend = source.get("rdzv_backend")
    if backend is not None and backend not in RDZV_BACKENDS:
        raise UsageError(option, backend, f"must be one of {', '.join(RDZV_BACKENDS)}")
    if backend not in (None, "static") and nnodes > 1:
        raise UsageError(option, backend, "asyncproc run has no rendezvous: several nodes use the static one "
                                          "(--master-addr, --master-port, --node-rank); for elastic jobs use torchrun")
    master_addr, master_port = _master(source, nnodes, standalone or backend not in (None, "static"))
    option, value = source.get("max_restarts")
    max_restarts = _int(option, _or(value, "0"), 0)
    if max_restarts and nnodes > 1:
        raise UsageError(option, value, "restarting several nodes together needs a rendezvous: use torchrun's "
                                        "c10d rendezvous, or the scheduler's requeue (see the README)")
    return _Layout(nproc, nnodes, node_rank, master_addr, master_port, max_restarts)


def _output(source: _Source, nproc: int) -> _Output:
    """Log folder, which streams go where, the console filter and prefix."""
    option, value = source.get("log_dir")
    log_dir = _log_dir(option, value)
    stds: dict[str, StdSpec] = {}
    given = False
    for dest in ("redirects", "tee"):
        option, value = source.get(dest)
        stds[dest] = _std(option, value, nproc)
        given = given or value is not None
        if log_dir is None and stds[dest]:
            raise UsageError(option, value, "needs --log-dir: the streams go to files there")
    option, value = source.get("local_ranks_filter")
    ranks_filter = _ranks_filter(option, value, nproc)
    # With neither -r nor -t, --log-dir alone sends every stream to its file (asyncproc's
    # rule); with either, torchrun's: what neither names goes to the console only.
    return _Output(log_dir, stds["redirects"] if given else None, stds["tee"], ranks_filter, _template(source))


def _template(source: _Source) -> str:
    option, value = source.get("log_line_prefix_template")
    if value is None and "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE" in source.environ:
        option, value = "$TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE", source.environ["TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"]
    if value is None:
        return DEFAULT_PREFIX
    try:
        string.Template(value).substitute(rank=0, local_rank=0, role_name="x")
    except (KeyError, ValueError):
        raise UsageError(option, value, "may use only ${rank}, ${local_rank} and ${role_name} ($$ for a $)") from None
    return value


def _ignored(source: _Source) -> list[str]:
    """Rendezvous settings a torchrun command line may carry: accepted, said to be unused."""
    _, rdzv_conf = source.get("rdzv_conf")
    _, local_addr = source.get("local_addr")
    if rdzv_conf or local_addr:
        return ["asyncproc run: --rdzv-conf and --local-addr are ignored: they configure a rendezvous"]
    return []


def _layout_notice(config: LaunchConfig, borrowed: list[str]) -> str:
    first = config.node_rank * config.nproc
    port = config.master_port if config.master_port is not None else "a free port"
    return (f"asyncproc run: node {config.node_rank} of {config.nnodes}, ranks {first}-{first + config.nproc - 1} "
            f"of {config.world_size}, rank 0 at {config.master_addr}:{port}; taken from the environment: "
            + ", ".join(borrowed))


def _master(source: _Source, nnodes: int, rendezvous: bool) -> tuple[str, int | None]:
    """MASTER_ADDR and MASTER_PORT (None: a free port, held). A static --rdzv-endpoint
    names them as torchrun's does; a c10d/etcd one (one node only) is not needed."""
    option, endpoint = source.get("rdzv_endpoint")
    if endpoint and not rendezvous:
        host, sep, port = endpoint.rpartition(":")
        if not sep or not host:
            raise UsageError(option, endpoint, "must be HOST:PORT")
        return host.strip("[]"), _int(option, port, 1, 65535)
    if rendezvous:  # one node: torchrun's --standalone, any free port
        return "127.0.0.1", None
    option, value = source.get("master_addr", lambda: _first_slurm_host(source.environ))
    addr = value or "127.0.0.1"
    option, value = source.get("master_port")
    if value is None:
        return addr, TORCHRUN_MASTER_PORT if nnodes > 1 else None
    return addr, _int(option, value, 1, 65535)


def _grace(option: str, value: str | None) -> float:
    if value is None:
        return DEFAULT_GRACE_S
    try:
        grace = float(value)
    except ValueError:
        raise UsageError(option, value, "is not a number of seconds") from None
    if not grace >= 0:  # NaN too
        raise UsageError(option, value, "must be >= 0")
    if math.isinf(grace):  # LaunchConfig's rule (_validate.check_seconds), said in this CLI's words
        raise UsageError(option, value, "must be finite (every wait is bounded)")
    return grace


def _refuse_unsupported(source: _Source) -> None:
    """torchrun options with no meaning here: accepted at their defaults, refused otherwise."""
    accepted = {"monitor_interval": None, "start_method": ("spawn", "fork", "forkserver"),
                "event_log_handler": ("null",), "logs_specs": (), "duplicate_stdout_filters": ("",),
                "duplicate_stderr_filters": ("",)}
    reasons = {
        "logs_specs": "asyncproc has no LogsSpecs plugins; use --log-dir, --redirects and --tee",
        "event_log_handler": "asyncproc has no event log handlers",
        "duplicate_stdout_filters": "not supported: grep the log files (--log-dir, --tee)",
        "duplicate_stderr_filters": "not supported: grep the log files (--log-dir, --tee)",
        "start_method": "must be spawn, fork or forkserver (a command always starts as a new program)",
    }
    for dest, allowed in accepted.items():
        option, value = source.get(dest)
        if value is None or allowed is None or value in allowed:
            if dest == "monitor_interval" and value is not None:
                _grace(option, value)  # a number, though nothing polls: exits are events here
            continue
        raise UsageError(option, value, reasons[dest])


def _numa_options(mode: str | None) -> Any:
    if mode is None:
        return None
    if mode not in NUMA_MODES:
        raise UsageError("--numa", mode, f"must be one of {', '.join(NUMA_MODES)}")
    from ..numa import AffinityMode, NumaOptions  # lazily: only --numa needs it

    return NumaOptions(AffinityMode(mode))


def _backend(name: str) -> tuple[str, dict[str, Any]]:
    if name == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise UsageError("--backend", name, f"uvloop is not installed; install it with `{sys.executable} -m pip install uvloop`")
    return ("trio", {}) if name == "trio" else ("asyncio", {"use_uvloop": name == "uvloop"})


# -- running ------------------------------------------------------------------------------------


def cli(args: argparse.Namespace) -> int:
    try:
        config, command, notices = _config(args, os.environ)
        backend, options = _backend(args.backend)
    except UsageError as exc:
        print(f"asyncproc run: {exc}", file=sys.stderr)
        return 2
    for notice in notices:
        print(notice, file=sys.stderr)
    try:
        result = anyio.run(start_processes, command, config, backend=backend, backend_options=options)
    except FileNotFoundError as exc:
        print(f"asyncproc run: cannot run {command[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127
    except PermissionError as exc:
        print(f"asyncproc run: cannot run {command[0]!r}: {exc.strerror}", file=sys.stderr)
        return 126
    if result.exit_code:
        try:
            print(result.summary(), file=sys.stderr)
        except OSError:
            pass
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="asyncproc run")
    configure_parser(parser)
    return cli(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover - `python -m asyncproc run` is the front door
    sys.exit(main())
