"""The ``asyncproc up`` file: what it expands to, and errors that say where and what."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from asyncproc._up.config import ConfigError, load, loads, parse_size


def _load(text: str, tmp_path: Path) -> object:
    file = tmp_path / "asyncproc.toml"
    file.write_text(text)
    return load(file)


def test_programs_expand_to_children_in_start_order(tmp_path: Path) -> None:
    config = loads("""
[supervisor]
strategy = "rest_for_one"
max_restarts = 5
backoff = { initial = 0.5, jitter = 0 }

[programs.web]
command = "python -m http.server '8000'"
replicas = 2
depends_on = ["db"]
env = { PORT = 8000, MODE = "prod" }
stdout = "logs/{name}.log"
numa = "node"

[programs.db]
command = ["postgres", "-D", "data"]
cwd = "db"
memory_limit = "1.5 GiB"
restart = "transient"
shutdown = 30
""", tmp_path / "sys.toml")
    assert config.programs == ("db", "web")  # db first: web depends on it
    db, web0, web1 = config.children
    assert (db.name, db.argv, db.restart, db.shutdown) == ("db", ("postgres", "-D", "data"), "transient", 30.0)
    assert db.memory_limit == int(1.5 * 2**30) and db.cwd == str(tmp_path.resolve() / "db")
    assert db.stdout is None and db.local_rank_id is None
    assert (web0.name, web1.name) == ("web-0", "web-1")
    assert web0.argv == ("python", "-m", "http.server", "8000")  # split like a shell
    assert dict(web1.env) == {"PORT": "8000", "MODE": "prod", "ASYNCPROC_REPLICA": "1"}
    assert web1.stdout == str(tmp_path.resolve() / "logs" / "web-1.log")
    assert (web0.numa, web0.local_rank_id, web1.local_rank_id) == ("node", 0, 1)  # replicas are the local ranks
    assert web0.local_world_size == web1.local_world_size == 2 and db.local_world_size is None
    assert config.supervisor.strategy == "rest_for_one" and config.supervisor.max_restarts == 5
    assert dict(config.supervisor.backoff) == {"initial": 0.5, "jitter": 0.0}


def test_a_changed_program_compares_unequal(tmp_path: Path) -> None:
    base = "[programs.a]\ncommand = 'sleep 1'\n[programs.b]\ncommand = 'sleep 2'\n"
    old = loads(base, tmp_path / "f.toml")
    new = loads(base.replace("sleep 2", "sleep 3"), tmp_path / "f.toml")
    assert old.child("a") == new.child("a") and old.child("b") != new.child("b")


@pytest.mark.parametrize("text, size", [
    (512, 512), ("512 MiB", 512 << 20), ("2GB", 2_000_000_000), ("64k", 65536), ("1.5 KiB", 1536), ("3 b", 3),
])
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["512 MiBs", "lots", "-1 MiB", "0", 0, True, 1.5, "1 PB"])
def test_bad_sizes(text: object) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


@pytest.mark.parametrize("text, where, what", [
    ("[programs.a]\ncommand = 'x'\ndepends_on = ['b']\n[programs.b]\ncommand = 'y'\ndepends_on = 'a'\n",
     r":3: programs\.a\.depends_on", r"dependency cycle: a -> b -> a"),
    ("[programs.a]\ncommand = 'x'\ndepends_on = ['zz']\n", r":3: programs\.a\.depends_on", r"unknown program 'zz'"),
    ("[programs.a]\ncommand = 'x'\nreplicas = 0\n", r":3: programs\.a\.replicas", r"replicas must be >= 1, got 0$"),
    ("[programs.a]\ncommand = 'x'\nreplicas = true\n", r":3: programs\.a\.replicas", r"replicas must be an int, got True$"),
    ("[programs.a]\ncommand = 'x'\nreplicas = 2\nstdout = 'out.log'\n", r":4: programs\.a\.stdout", r"\{replica\}"),
    ("[programs.a]\ncommand = 'x'\nnuma = 'nearby'\n", r":3: programs\.a\.numa", r"numa must be one of 'node', 'socket'.*, got 'nearby'$"),
    ("[programs.a]\ncommand = \"'x\"\n", r":2: programs\.a\.command", r"like a shell"),
    ("[programs.a]\ncommand = []\n", r":2: programs\.a\.command", r"empty"),
    ("[programs.a]\ncwd = '/'\n", r":1: programs\.a", r"missing key 'command'"),
    ("[programs.a]\ncommand = 'x'\nenv = { A = [1] }\n", r":3: programs\.a\.env", r"A: expected a string"),
    ("[programs.a]\ncommand = 'x'\nshutdown = -1\n", r":3: programs\.a\.shutdown", r"shutdown must be >= 0 seconds, got -1$"),
    ("[programs.a]\ncommand = 'x'\nshutdown = nan\n", r":3: programs\.a\.shutdown", r"shutdown must be >= 0 seconds, got nan$"),
    ("[programs.a]\ncommand = 'x'\nshutdown = inf\n", r":3: programs\.a\.shutdown", r"shutdown must be finite .*, got inf$"),
    ("[programs.a]\ncommand = 'x'\nshutdown = true\n", r":3: programs\.a\.shutdown", r"must be a number of seconds, got True$"),
    ("[supervisor]\nstrategy = 'all_for_one'\n[programs.a]\ncommand = 'x'\n", r":2: supervisor\.strategy", r"one_for_one"),
    ("[supervisor]\nbackoff = { start = 1 }\n[programs.a]\ncommand = 'x'\n", r"supervisor\.backoff\.start", r"unknown key"),
    ("[supervisor]\nmax_seconds = 0\n[programs.a]\ncommand = 'x'\n", r":2: supervisor\.max_seconds", r"max_seconds must be > 0 seconds, got 0$"),
    ("[program.a]\ncommand = 'x'\n", r"toml:1: program", r"unknown key 'program'"),
    ("[supervisor]\n", r"toml: programs", r"at least one \[programs\.NAME\]"),
    ("[programs.web]\ncommand = 'x'\nreplicas = 2\n[programs.web-1]\ncommand = 'y'\n", r"programs\.web", r"'web-1' is used twice"),
])
def test_errors_name_the_line_and_key(tmp_path: Path, text: str, where: str, what: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(text, tmp_path)
    message = str(info.value)
    assert message.startswith(str(tmp_path / "asyncproc.toml"))
    assert re.search(where, message) and re.search(what, message), message


def test_syntax_error_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"asyncproc\.toml:3: TOML syntax error"):
        _load("[programs.a]\ncommand = 'x'\nrestart = \n", tmp_path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "nope.toml")


def test_command_local_world_size_is_checked() -> None:
    import asyncproc

    assert asyncproc.Command("r-1", ["true"], local_rank_id=1, local_world_size=2).local_world_size == 2
    with pytest.raises(ValueError, match="local_world_size"):
        asyncproc.Command("r-1", ["true"], local_rank_id=1, local_world_size=1)
