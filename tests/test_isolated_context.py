"""The caller's context (sys.path, cwd, environment) reaches every call, however the
worker got it: a forked worker inherits it from the fork server, which takes it when it
changes, and workers forked before a change (the reserve) must never serve a later call."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import asyncproc

from _children import runner, sys_path

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["forkserver", "fork", "spawn"])
def method(request: pytest.FixtureRequest) -> str:
    return request.param


async def test_a_change_made_after_workers_were_forked_is_seen(method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    isolated = runner(method)
    assert await isolated.call(os.getcwd) == os.getcwd()  # the server and its reserve are up
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ASYNCPROC_TEST_CONTEXT", "one")
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    assert await isolated.call(os.getcwd) == str(tmp_path)
    assert await isolated.call(os.environ.get, "ASYNCPROC_TEST_CONTEXT") == "one"
    assert (await isolated.call(sys_path))[0] == str(tmp_path / "lib")


async def test_each_change_between_calls_is_seen_even_one_undone(method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    isolated = runner(method)
    for value in ("a", "b", None, "a", None):
        folder = tmp_path / str(value)
        folder.mkdir(exist_ok=True)
        monkeypatch.chdir(folder)
        if value is None:
            monkeypatch.delenv("ASYNCPROC_TEST_CONTEXT", raising=False)
        else:
            monkeypatch.setenv("ASYNCPROC_TEST_CONTEXT", value)
        assert await isolated.call(os.environ.get, "ASYNCPROC_TEST_CONTEXT") == value
        assert await isolated.call(os.getcwd) == str(folder)


async def test_a_module_on_a_path_added_later_is_imported_from_there(method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert await runner(method).call(abs, -1) == 1
    (tmp_path / "asyncproc_test_context_mod.py").write_text("import os\ndef where():\n    return os.getpid(), __file__\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "asyncproc_test_context_mod", raising=False)
    import asyncproc_test_context_mod  # type: ignore[import-not-found]

    try:
        pid, file = await runner(method).call(asyncproc_test_context_mod.where)
    finally:
        sys.modules.pop("asyncproc_test_context_mod", None)
    assert pid != os.getpid() and file == str(tmp_path / "asyncproc_test_context_mod.py")


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])  # "fork" runs there, as forked code does
async def test_a_working_directory_gone_fails_the_call_not_the_server(start_method: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    isolated = runner(start_method)
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    with pytest.raises(FileNotFoundError):
        await isolated.call(abs, -1)
    monkeypatch.chdir(tmp_path)
    assert await isolated.call(os.getcwd) == str(tmp_path)


async def test_the_path_after_a_preload_is_the_callers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A preload carries the caller's sys.path of that moment to the server; a later call
    # must still see the caller's sys.path of its own moment.
    isolated = runner("forkserver")
    before = await isolated.call(sys_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    asyncproc.preload("json")
    monkeypatch.undo()
    assert await isolated.call(sys_path) == before == sys.path


def test_a_worker_has_the_callers_descriptor_limit() -> None:
    # The fork server raises its own soft limit (three descriptors per call in flight);
    # its workers get the caller's back.
    code = (
        "import resource, asyncproc\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (min(512, hard), hard))\n"
        "print(asyncproc.safe_call_sync(resource.getrlimit, resource.RLIMIT_NOFILE)"
        " == resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "True", out.stdout + out.stderr
