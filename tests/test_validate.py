"""The argument checks every public entry point shares: one rule for seconds, counts,
flags and paths, and messages that name the argument and show the value received."""

from __future__ import annotations

import math
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from asyncproc import _validate as v

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
