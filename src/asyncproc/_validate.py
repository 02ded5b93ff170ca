"""Argument checks shared by every public entry point, so that one rule holds everywhere.

Each check raises before any process starts: ``TypeError`` for the wrong kind of value,
``ValueError`` for a value out of range, and the message names the argument and shows the
value received (``repr``), e.g. ``grace must be >= 0 seconds, got -1``. Each returns the
value it checked, so a caller can check and assign in one line.

The rules, and why:

* ``bool`` is never a number here (``grace=True`` is a mistake, not 1 second; a rank
  ``True`` is not rank 1), though Python makes it an ``int``.
* NaN is never a number of seconds: every comparison with it is False, so it would slip
  past ``< 0`` and then make a timeout that never fires (or fires at once).
* A grace or a bound is finite: every wait in asyncproc is bounded. Only an overall
  ``timeout`` may be infinite (``None`` says the same), where the caller asks for it.

A caller with context to give (a supervisor child's id) puts it in the name:
``check_count("Command 'web': memory_limit", ...)``. ``_up.config`` turns these errors into
``ConfigError``s that name the file, the line and the dotted key.

Standard library only: the handler and the launcher import it (never the fork server).
"""

from __future__ import annotations

import math
import os
import signal
from collections.abc import Iterable, Mapping
from typing import Literal, TypeVar, overload

T = TypeVar("T")

__all__ = [
    "check_args",
    "check_choice",
    "check_count",
    "check_env",
    "check_flag",
    "check_instance",
    "check_number",
    "check_path",
    "check_redirect",
    "check_seconds",
    "check_signal",
    "check_text",
]


@overload
def check_seconds(
    name: str, value: object, *, allow_none: Literal[False] = ..., allow_inf: bool = ..., positive: bool = ...
) -> float: ...
@overload
def check_seconds(name: str, value: object, *, allow_none: bool, allow_inf: bool = ..., positive: bool = ...) -> float | None: ...
def check_seconds(
    name: str, value: object, *, allow_none: bool = False, allow_inf: bool = False, positive: bool = False
) -> float | None:
    """A duration: an int or float, >= 0 (> 0 if ``positive``), not NaN, finite unless
    ``allow_inf``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds{' or None' if allow_none else ''}, got {value!r}")
    if math.isnan(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'>' if positive else '>='} 0 seconds, got {value!r}")
    if math.isinf(value) and not allow_inf:
        raise ValueError(f"{name} must be finite (every wait is bounded), got {value!r}")
    return value


def check_number(name: str, value: object, *, minimum: float, maximum: float | None = None) -> float:
    """A finite real number (not a bool, not NaN) in ``[minimum, maximum]``: a factor, a
    fraction."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(value) and value >= minimum and (maximum is None or value <= maximum)):
        bound = f">= {minimum}" if maximum is None else f"within [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return value


@overload
def check_count(name: str, value: object, *, minimum: int = ..., allow_none: Literal[False] = ...) -> int: ...
@overload
def check_count(name: str, value: object, *, minimum: int = ..., allow_none: bool) -> int | None: ...
def check_count(name: str, value: object, *, minimum: int = 0, allow_none: bool = False) -> int | None:
    """A whole number (a rank, a size, a port): an ``int``, not a ``bool``, >= ``minimum``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int{' or None' if allow_none else ''}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def check_flag(name: str, value: object) -> bool:
    """A ``bool``; 1 or ``"yes"`` are refused: a flag that is not one is a misplaced argument."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def check_text(name: str, value: object, *, allow_empty: bool = False) -> str:
    """A ``str`` (non-empty unless ``allow_empty``)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {value!r}")
    if not value and not allow_empty:
        raise ValueError(f"{name} must not be empty, got {value!r}")
    return value


def check_path(name: str, value: object, *, allow_none: bool = False) -> str | os.PathLike[str] | None:
    """A non-empty ``str`` or ``os.PathLike`` of ``str`` (bytes paths are refused: they
    would reach the child's command line as ``b'...'``)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, (str, os.PathLike)) or not isinstance(os.fspath(value), str):
        raise TypeError(f"{name} must be a str or path{' or None' if allow_none else ''}, got {value!r}")
    if not os.fspath(value):
        raise ValueError(f"{name} must not be empty, got {value!r}")
    return value


def check_redirect(name: str, value: object) -> str | os.PathLike[str] | int | None:
    """Where a child's stdout/stderr goes: a file path, None or ``""`` to inherit, or an
    open file descriptor (an ``int`` >= 0). A file object such as ``sys.stdout`` is refused
    here, naming the argument, rather than failing later inside ``Popen``."""
    if value is None or value == "":
        return None if value is None else ""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a file path, None or '' (inherit), or a file descriptor; got {value!r}")
    if isinstance(value, int):
        return check_count(f"{name} (a file descriptor)", value)
    if isinstance(value, (str, os.PathLike)) and isinstance(os.fspath(value), str):
        return value
    hint = " (pass its path, or its fileno())" if hasattr(value, "fileno") else ""
    raise TypeError(f"{name} must be a file path, None or '' (inherit), or a file descriptor{hint}; got {value!r}")


def check_args(name: str, value: object, *, numbers: bool = False, command: bool = False) -> tuple[object, ...]:
    """Command-line arguments: an iterable (not a string) of ``str`` or paths (and of ints
    and floats if ``numbers``). Each becomes ``str(arg)`` on the child's command line, so
    None (or any other object) would run as the word "None". A ``command`` is non-empty
    with a non-empty program name first. An iterator is read once, here: use the tuple."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be a sequence of arguments (not a string), got {value!r}")
    items = tuple(value)
    kinds = (str, os.PathLike, int, float) if numbers else (str, os.PathLike)
    for i, arg in enumerate(items):
        if isinstance(arg, bool) or not isinstance(arg, kinds):
            raise TypeError(f"{name}[{i}] must be a str{', path or number' if numbers else ' or path'}, got {arg!r}")
    if command and not items:
        raise ValueError(f"{name} must not be empty, got {value!r}")
    if command and isinstance(items[0], (str, os.PathLike)) and not os.fspath(items[0]):
        raise ValueError(f"{name}[0] (the program) must not be empty, got {items[0]!r}")
    return items


def check_choice(name: str, value: object, choices: Iterable[str]) -> str:
    """One of ``choices``."""
    options = tuple(choices)
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}, got {value!r}")
    return value


def check_instance(name: str, value: object, cls: type[T], *, allow_none: bool = False) -> T | None:
    """An instance of ``cls`` (or None when ``allow_none``)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, cls):
        raise TypeError(f"{name} must be a {cls.__name__}{' or None' if allow_none else ''}, got {value!r}")
    return value


def check_signal(name: str, value: object, *, allow_none: bool = False) -> int | None:
    """A signal number (``signal.SIGTERM`` or its int value) this platform has."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a signal number such as signal.SIGTERM, got {value!r}")
    if value not in signal.valid_signals():
        raise ValueError(f"{name} must be a valid signal number, got {value!r}")
    return value


def check_env(name: str, value: object) -> Mapping[str, str | None] | None:
    """None, or a mapping of ``str`` to ``str`` (set) or None (remove)."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping of str to str or None, got {type(value).__name__}")
    for key, item in value.items():
        if not isinstance(key, str):
            raise TypeError(f"{name} keys must be str, got {key!r}")
        if item is not None and not isinstance(item, str):
            raise TypeError(f"{name}[{key!r}] must be a str or None, got {item!r}")
    return value
