"""The ``asyncproc up`` file: TOML in, checked and frozen, out.

Everything is validated before anything starts, and every error names the file, the
line when we can find it, the key, and what was expected. TOML parsers give no positions
for values, so ``_Locator`` finds a key's line by reading the text: the table's
``[programs.NAME]`` header, then the first ``key =`` line under it (an inline table has
no header: the error then names the key without a line).

The result is plain frozen data (``SystemConfig``, ``ChildDef``) so that ``reload`` can
compare an old and a new file child by child with ``==``.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .._exceptions import ConfigError
from .._validate import check_choice, check_count, check_seconds, check_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = ["ConfigError", "SupervisorOptions", "ChildDef", "SystemConfig", "load", "parse_size"]

RESTARTS = ("permanent", "transient", "temporary")
STRATEGIES = ("one_for_one", "one_for_all", "rest_for_one")
NUMA_MODES = ("node", "socket", "exclusive", "core-complex")
_TOP_KEYS = ("supervisor", "programs")
_SUPERVISOR_KEYS = ("strategy", "max_restarts", "max_seconds", "backoff")
_BACKOFF_KEYS = ("initial", "factor", "max", "jitter", "reset_after")
_PROGRAM_KEYS = (
    "command", "cwd", "env", "restart", "shutdown", "memory_limit", "replicas", "numa",
    "stdout", "stderr", "depends_on",
)
_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kib": 1024, "kb": 1000,
    "m": 1024**2, "mib": 1024**2, "mb": 1000**2,
    "g": 1024**3, "gib": 1024**3, "gb": 1000**3,
    "t": 1024**4, "tib": 1024**4, "tb": 1000**4,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")
_T = TypeVar("_T")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class SupervisorOptions:
    strategy: str = "one_for_one"
    max_restarts: int = 3
    max_seconds: float = 5.0
    backoff: tuple[tuple[str, float], ...] = ()  # only the keys given; Backoff() defaults the rest


@dataclass(frozen=True)
class ChildDef:
    """One supervised child: a program, or one replica of it. Compared with ``==`` on reload."""

    name: str
    program: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    cwd: str | None
    restart: str
    shutdown: float
    memory_limit: int | None
    numa: str | None
    local_rank_id: int | None
    local_world_size: int | None  # with numa: the replicas are the local ranks
    stdout: str | None  # a file, or None: the console, each line prefixed [name]
    stderr: str | None


@dataclass(frozen=True)
class SystemConfig:
    path: Path
    supervisor: SupervisorOptions
    programs: tuple[str, ...]  # in start order
    children: tuple[ChildDef, ...]  # in start order

    def child(self, name: str) -> ChildDef | None:
        return next((c for c in self.children if c.name == name), None)


def load(path: str | os.PathLike[str]) -> SystemConfig:
    """Read, check and expand the file; ``ConfigError`` naming the problem otherwise."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    return loads(text, path)


def loads(text: str, path: Path) -> SystemConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        at = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        where = f"{path}:{at.group(1)}" if at else f"{path}"
        raise ConfigError(f"{where}: TOML syntax error: {exc}") from None
    return _Checker(path, _Locator(text)).system(data)


def parse_size(value: object) -> int:
    """Bytes from an int or a "512 MiB"-style string (KiB/MiB/GiB/TiB = 1024**n, kB/MB/GB/TB
    = 1000**n, a bare K/M/G/T = 1024**n as systemd and docker read it)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 512 MiB, got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE.fullmatch(value)) and m.group(2).lower() in _UNITS:
        size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    else:
        raise ValueError(f"expected a size such as \"512 MiB\", \"2 GB\" or a number of bytes, got {value!r}")
    if size <= 0:
        raise ValueError(f"expected a size > 0, got {value!r}")
    return size


class _Locator:
    """Finds the line of a table header or of a key in it, by reading the text."""

    def __init__(self, text: str):
        self.lines = text.splitlines()

    def line_of(self, table: Sequence[str], key: str | None = None) -> int | None:
        header = self._header_line(table)
        if key is not None:
            if header is not None:
                key_re = re.compile(rf"\s*{_quoted(key)}\s*[=.]")
                for i in range(header + 1, len(self.lines)):
                    if self.lines[i].lstrip().startswith("["):
                        break
                    if key_re.match(self.lines[i]):
                        return i + 1
            sub = self._header_line([*table, key], nested=True)  # [programs.web] for key "web"
            if sub is not None:
                return sub + 1
        return header + 1 if header is not None and header >= 0 else None

    def _header_line(self, table: Sequence[str], nested: bool = False) -> int | None:
        if not table:
            return -1  # the top level: keys before the first header
        dotted = r"\.".join(rf"\s*{_quoted(p)}\s*" for p in table)
        header_re = re.compile(r"\s*\[" + dotted + (r"(?:\.[^\]]*)?" if nested else "") + r"\]\s*(?:#.*)?")
        for i, line in enumerate(self.lines):
            if header_re.fullmatch(line):
                return i
        return None


def _quoted(name: str) -> str:
    """A TOML key as written: bare, or in double or single quotes."""
    return rf"(?:{re.escape(name)}|\"{re.escape(name)}\"|'{re.escape(name)}')"


class _Checker:
    def __init__(self, path: Path, locator: _Locator):
        self.path = path
        self.locator = locator
        self.base = path.resolve().parent  # relative cwd/stdout/stderr are read from the file's folder

    def error(self, table: Sequence[str], key: str | None, message: str) -> ConfigError:
        dotted = ".".join([*table, *([key] if key else [])])
        return ConfigError(f"{self.place(table, key)}: {dotted}: {message}" if dotted else f"{self.place(table, key)}: {message}")

    def place(self, table: Sequence[str], key: str | None) -> str:
        """The file, and the line when the locator finds it: ``asyncproc.toml:3``."""
        line = self.locator.line_of(table, key)
        return f"{self.path}:{line}" if line is not None else f"{self.path}"

    def checked(self, table: Sequence[str], key: str, check: Callable[..., _T], value: object, **options: Any) -> _T:
        """``check`` (from ``_validate``, the rules every public entry point uses) on the
        value of ``table.key``, its message naming the dotted key; a ``ConfigError`` that
        names the file and line when it fails."""
        try:
            return check(".".join([*table, key]), value, **options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{self.place(table, key)}: {exc}") from None

    def table(self, value: object, where: Sequence[str], allowed: Sequence[str]) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise self.error(where[:-1], where[-1] if where else None, f"expected a table, got {value!r}")
        for key in value:
            if key not in allowed:
                raise self.error(where, key, f"unknown key {key!r} (expected one of: {', '.join(allowed)})")
        return value

    # -- the file ----------------------------------------------------------------------

    def system(self, data: Mapping[str, Any]) -> SystemConfig:
        self.table(data, [], _TOP_KEYS)
        supervisor = self.supervisor(data.get("supervisor", {}))
        programs = data.get("programs", {})
        if not isinstance(programs, dict) or not programs:
            raise self.error([], "programs", "expected at least one [programs.NAME] table")
        parsed = {name: self.program(name, spec) for name, spec in programs.items()}
        order = self.start_order({name: deps for name, (_, deps) in parsed.items()})
        children = tuple(child for name in order for child in parsed[name][0])
        self.check_unique(children, set(order))
        return SystemConfig(self.path, supervisor, tuple(order), children)

    def supervisor(self, value: object) -> SupervisorOptions:
        where = ["supervisor"]
        spec = self.table(value, where, _SUPERVISOR_KEYS)
        strategy = self.checked(where, "strategy", check_choice, spec.get("strategy", "one_for_one"), choices=STRATEGIES)
        max_restarts = self.checked(where, "max_restarts", check_count, spec.get("max_restarts", 3))
        max_seconds = self.number(where, "max_seconds", spec.get("max_seconds", 5.0), positive=True)
        backoff_where = [*where, "backoff"]
        backoff = self.table(spec.get("backoff", {}), backoff_where, _BACKOFF_KEYS)
        values = tuple((k, self.number(backoff_where, k, v)) for k, v in backoff.items())
        return SupervisorOptions(strategy, max_restarts, max_seconds, values)

    def program(self, name: str, value: object) -> tuple[list[ChildDef], tuple[str, ...]]:
        where = ["programs", name]
        if not _NAME.fullmatch(name):
            raise self.error(where, None, "a program name is letters, digits, '_', '-' and '.'")
        spec = self.table(value, where, _PROGRAM_KEYS)
        if "command" not in spec:
            raise self.error(where, None, "missing key 'command' (a list of arguments, or a string split like a shell)")
        argv = self.command(where, spec["command"])
        restart = self.checked(where, "restart", check_choice, spec.get("restart", "permanent"), choices=RESTARTS)
        shutdown = self.number(where, "shutdown", spec.get("shutdown", 5.0))
        memory_limit = None
        if "memory_limit" in spec:
            try:
                memory_limit = parse_size(spec["memory_limit"])
            except ValueError as exc:
                raise self.error(where, "memory_limit", str(exc)) from None
        replicas = self.checked(where, "replicas", check_count, spec.get("replicas", 1), minimum=1)
        numa = spec.get("numa")
        if numa is not None:
            self.checked(where, "numa", check_choice, numa, choices=NUMA_MODES)
        env = self.env(where, spec.get("env", {}))
        cwd = self.path_value(where, "cwd", spec.get("cwd"))
        outputs = {k: self.path_value(where, k, spec.get(k)) for k in ("stdout", "stderr")}
        for key, out in outputs.items():
            if out is not None and replicas > 1 and "{" not in out:
                raise self.error(where, key, "with replicas, the file name needs {replica} or {name}, so each replica has its own file")
        deps = self.names(where, "depends_on", spec.get("depends_on", []))
        children = []
        for i in range(replicas):
            child = name if replicas == 1 else f"{name}-{i}"
            out, err = (self.format_path(where, k, v, child, i) for k, v in outputs.items())
            children.append(ChildDef(
                name=child, program=name, argv=argv,
                env=(*env, ("ASYNCPROC_REPLICA", str(i))), cwd=cwd, restart=restart,
                shutdown=shutdown, memory_limit=memory_limit, numa=numa,
                local_rank_id=i if numa is not None else None,
                local_world_size=replicas if numa is not None else None, stdout=out, stderr=err,
            ))
        return children, deps

    # -- values -------------------------------------------------------------------------

    def command(self, where: Sequence[str], value: object) -> tuple[str, ...]:
        if isinstance(value, str):
            try:
                argv = shlex.split(value)
            except ValueError as exc:  # "No closing quotation"
                raise self.error(where, "command", f"cannot split {value!r} like a shell: {exc}") from None
        elif isinstance(value, list) and all(isinstance(a, str) for a in value):
            argv = list(value)
        else:
            raise self.error(where, "command", f"expected a list of strings or a string, got {value!r}")
        if not argv or not argv[0]:
            raise self.error(where, "command", "expected a command, got an empty one")
        return tuple(argv)

    def env(self, where: Sequence[str], value: object) -> tuple[tuple[str, str], ...]:
        spec = value if isinstance(value, dict) else None
        if spec is None:
            raise self.error(where, "env", f"expected a table of NAME = \"value\", got {value!r}")
        out = []
        for key, v in spec.items():
            if isinstance(v, bool) or not isinstance(v, (str, int, float)):
                raise self.error(where, "env", f"{key}: expected a string, got {v!r}")
            out.append((key, str(v)))
        return tuple(out)

    def number(self, where: Sequence[str], key: str, value: object, *, positive: bool = False) -> float:
        return float(self.checked(where, key, check_seconds, value, positive=positive))

    def path_value(self, where: Sequence[str], key: str, value: object) -> str | None:
        if value is None:
            return None
        path = self.checked(where, key, check_text, value)
        return str(self.base / os.path.expanduser(path))

    def format_path(self, where: Sequence[str], key: str, value: str | None, name: str, replica: int) -> str | None:
        if value is None:
            return None
        try:
            return value.format(name=name, replica=replica)
        except (KeyError, IndexError, ValueError) as exc:
            raise self.error(where, key, f"only {{name}} and {{replica}} may be filled in, got {value!r} ({exc})") from None

    def names(self, where: Sequence[str], key: str, value: object) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(n, str) for n in items):
            raise self.error(where, key, f"expected a list of program names, got {value!r}")
        return tuple(items)

    # -- the whole ------------------------------------------------------------------------

    def start_order(self, deps: Mapping[str, tuple[str, ...]]) -> list[str]:
        """File order, except that a program starts after what it depends on."""
        for name, needs in deps.items():
            for need in needs:
                if need not in deps:
                    raise self.error(["programs", name], "depends_on", f"unknown program {need!r} (programs: {', '.join(deps)})")
        order: list[str] = []
        state: dict[str, str] = {}

        def visit(name: str, path: list[str]) -> None:
            if state.get(name) == "done":
                return
            if state.get(name) == "visiting":
                cycle = path[path.index(name):] + [name]
                raise self.error(["programs", cycle[0]], "depends_on", f"dependency cycle: {' -> '.join(cycle)}")
            state[name] = "visiting"
            for need in deps[name]:
                visit(need, [*path, name])
            state[name] = "done"
            order.append(name)

        for name in deps:
            visit(name, [])
        return order

    def check_unique(self, children: Sequence[ChildDef], programs: set[str]) -> None:
        seen: set[str] = set()
        for child in children:
            # web-0 of "web" (replicas) against a program literally called "web-0"
            if child.name in seen or (child.name != child.program and child.name in programs):
                raise self.error(["programs", child.program], "replicas", f"child name {child.name!r} is used twice")
            seen.add(child.name)
