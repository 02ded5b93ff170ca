"""The argument checks every public entry point shares: one rule for seconds, counts,
flags and paths, and messages that name the argument and show the value received."""

from __future__ import annotations

import functools
import math
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

import asyncproc
from asyncproc import _validate as v
from asyncproc import numa
from asyncproc.numa import AffinityMode, NumaOptions

NAN, INF = math.nan, math.inf


@pytest.mark.parametrize(
    ("value", "options", "expected"),
    [(0, {}, 0), (1.5, {}, 1.5), (None, {"allow_none": True}, None), (INF, {"allow_inf": True}, INF)],
)
def test_seconds_accepted(value: object, options: dict[str, Any], expected: object) -> None:
    assert v.check_seconds("grace", value, **options) == expected


@pytest.mark.parametrize(
    ("value", "options", "error", "message"),
    [
        (NAN, {}, ValueError, "grace must be >= 0 seconds, got nan"),
        (NAN, {"allow_inf": True}, ValueError, "grace must be >= 0 seconds, got nan"),
        (-0.1, {}, ValueError, "grace must be >= 0 seconds, got -0.1"),
        (INF, {}, ValueError, "grace must be finite (every wait is bounded), got inf"),
        (-INF, {"allow_inf": True}, ValueError, "grace must be >= 0 seconds, got -inf"),
        (True, {}, TypeError, "grace must be a number of seconds, got True"),
        ("2", {}, TypeError, "grace must be a number of seconds, got '2'"),
        (None, {}, TypeError, "grace must be a number of seconds, got None"),
        ("2", {"allow_none": True}, TypeError, "grace must be a number of seconds or None, got '2'"),
    ],
)
def test_seconds_refused(value: object, options: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error) as caught:
        v.check_seconds("grace", value, **options)
    assert str(caught.value) == message


def test_counts() -> None:
    assert v.check_count("rank", 0) == 0
    assert v.check_count("size", None, minimum=1, allow_none=True) is None
    for value, error, message in [
        (-1, ValueError, "rank must be >= 0, got -1"),
        (True, TypeError, "rank must be an int, got True"),
        (1.0, TypeError, "rank must be an int, got 1.0"),
        ("1", TypeError, "rank must be an int, got '1'"),
        (None, TypeError, "rank must be an int, got None"),
    ]:
        with pytest.raises(error) as caught:
            v.check_count("rank", value)
        assert str(caught.value) == message
    with pytest.raises(ValueError, match="^size must be >= 1, got 0$"):
        v.check_count("size", 0, minimum=1, allow_none=True)


def test_flags_text_choices_instances() -> None:
    assert v.check_flag("tee", False) is False
    with pytest.raises(TypeError, match="^tee must be a bool, got 1$"):
        v.check_flag("tee", 1)
    assert v.check_text("addr", "h") == "h"
    with pytest.raises(ValueError, match="^addr must not be empty, got ''$"):
        v.check_text("addr", "")
    with pytest.raises(TypeError, match="^addr must be a str, got 1$"):
        v.check_text("addr", 1)
    assert v.check_choice("mode", "b", ("a", "b")) == "b"
    with pytest.raises(ValueError, match="^mode must be one of 'a', 'b', got 'c'$"):
        v.check_choice("mode", "c", ("a", "b"))
    with pytest.raises(TypeError, match="^opts must be a Path or None, got 'x'$"):
        v.check_instance("opts", "x", Path, allow_none=True)


def test_paths_and_redirects(tmp_path: Path) -> None:
    assert v.check_path("p", tmp_path) == tmp_path
    assert v.check_path("p", None, allow_none=True) is None
    with pytest.raises(TypeError, match=r"^p must be a str or path, got b'/x'$"):
        v.check_path("p", b"/x")
    with pytest.raises(ValueError, match="^p must not be empty"):
        v.check_path("p", "")
    for ok in (None, "", "out.log", tmp_path, 1):
        assert v.check_redirect("stdout", ok) == ok
    with pytest.raises(TypeError, match=r"stdout must be .*\(pass its path, or its fileno\(\)\); got <"):
        v.check_redirect("stdout", sys.stdout)
    with pytest.raises(TypeError, match="^stdout must be .*; got True$"):
        v.check_redirect("stdout", True)
    with pytest.raises(ValueError, match=r"^stdout \(a file descriptor\) must be >= 0, got -1$"):
        v.check_redirect("stdout", -1)


def test_signals_and_env() -> None:
    assert v.check_signal("sig", signal.SIGTERM) == signal.SIGTERM
    assert v.check_signal("sig", None, allow_none=True) is None
    with pytest.raises(TypeError, match="^sig must be a signal number such as signal.SIGTERM, got 'TERM'$"):
        v.check_signal("sig", "TERM")
    with pytest.raises(ValueError, match="^sig must be a valid signal number, got 12345$"):
        v.check_signal("sig", 12345)
    assert v.check_env("env", {"A": "1", "B": None}) == {"A": "1", "B": None}
    with pytest.raises(TypeError, match="^env must be a mapping of str to str or None, got list$"):
        v.check_env("env", ["A=1"])
    with pytest.raises(TypeError, match="^env keys must be str, got 1$"):
        v.check_env("env", {1: "a"})


# -- every public entry point that takes seconds or a count refuses the same bad values --

def _handler(**options: Any) -> asyncproc.SubprocessHandler:
    return asyncproc.SubprocessHandler("true", [], None, None, None, **{"local_rank_id": 0, **options})


def _kill(grace: object) -> None:
    anyio.run(functools.partial(_handler().kill, grace=grace))  # type: ignore[arg-type]


NODE = NumaOptions(AffinityMode.NODE)
SECONDS: dict[str, tuple[Callable[[Any], object], bool]] = {  # name: (entry point, takes inf)
    "Isolated(timeout)": (lambda x: asyncproc.Isolated(timeout=x), True),
    "Isolated(grace)": (lambda x: asyncproc.Isolated(grace=x), False),
    "LaunchConfig(grace)": (lambda x: asyncproc.LaunchConfig(nproc=1, grace=x), False),
    "SubprocessHandler.kill(grace)": (_kill, False),
    "Command(shutdown)": (lambda x: asyncproc.Command("c", ["true"], shutdown=x), True),
    "Task(shutdown)": (lambda x: asyncproc.Task("t", anyio.sleep, shutdown=x), True),
    "Call(shutdown)": (lambda x: asyncproc.Call("f", len, shutdown=x), True),
    "Backoff(initial)": (lambda x: asyncproc.Backoff(initial=x), False),
    "Backoff(max)": (lambda x: asyncproc.Backoff(max=x), False),
    "Backoff(reset_after)": (lambda x: asyncproc.Backoff(reset_after=x), True),
    "Supervisor(max_seconds)": (lambda x: asyncproc.Supervisor(max_seconds=x), True),
}
COUNTS: dict[str, Callable[[Any], object]] = {
    "Isolated(memory_limit)": lambda x: asyncproc.Isolated(memory_limit=x),
    "Isolated(local_rank_id)": lambda x: asyncproc.Isolated(numa_options=NODE, local_rank_id=x),
    "Isolated(local_world_size)": lambda x: asyncproc.Isolated(numa_options=NODE, local_rank_id=0, local_world_size=x),
    "LaunchConfig(nproc)": lambda x: asyncproc.LaunchConfig(nproc=x),
    "LaunchConfig(nnodes)": lambda x: asyncproc.LaunchConfig(nproc=1, nnodes=x),
    "LaunchConfig(node_rank)": lambda x: asyncproc.LaunchConfig(nproc=1, node_rank=x),
    "LaunchConfig(max_restarts)": lambda x: asyncproc.LaunchConfig(nproc=1, max_restarts=x),
    "LaunchConfig(master_port)": lambda x: asyncproc.LaunchConfig(nproc=1, master_port=x),
    "SubprocessHandler(local_rank_id)": lambda x: _handler(local_rank_id=x),
    "SubprocessHandler(local_world_size)": lambda x: _handler(local_world_size=x),
    "get_subprocess_handler(local_rank_id)": lambda x: asyncproc.get_subprocess_handler("true", [], None, None, None, x),
    "Command(memory_limit)": lambda x: asyncproc.Command("c", ["true"], memory_limit=x),
    "Command(local_rank_id)": lambda x: asyncproc.Command("c", ["true"], local_rank_id=x),
    "Command(local_world_size)": lambda x: asyncproc.Command("c", ["true"], local_rank_id=0, local_world_size=x),
    "Supervisor(max_restarts)": lambda x: asyncproc.Supervisor(max_restarts=x),
    "Supervisor.events(buffer)": lambda x: asyncproc.Supervisor().events(buffer=x),
    "numa.binding_for(local_rank_id)": lambda x: numa.binding_for(NODE, x, 1),
    "numa.binding_for(local_world_size)": lambda x: numa.binding_for(NODE, 0, x),
}


def _refused(entry: Callable[[Any], object], label: str, value: object) -> None:
    """``TypeError`` or ``ValueError``, naming the argument and showing the value received."""
    name = label.split("(")[1].rstrip(")")
    with pytest.raises((TypeError, ValueError)) as caught:
        entry(value)
    message = str(caught.value)
    assert name in message and repr(value) in message, message


@pytest.mark.parametrize("label", SECONDS)
@pytest.mark.parametrize("value", [NAN, -1, -0.5, -INF, True, False, "1", INF])
def test_every_seconds_argument_refuses_nan_negative_bool_and_text(label: str, value: object) -> None:
    entry, takes_inf = SECONDS[label]
    if value == INF and takes_inf:
        entry(value)  # inf is "no limit" where a caller may ask for one
        return
    _refused(entry, label, value)


@pytest.mark.parametrize("label", COUNTS)
@pytest.mark.parametrize("value", [-1, True, False, 1.0, NAN, INF, "1"])
def test_every_count_argument_refuses_negative_bool_float_and_text(label: str, value: object) -> None:
    _refused(COUNTS[label], label, value)
