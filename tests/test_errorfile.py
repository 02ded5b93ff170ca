"""``@asyncproc.record`` and error files in torch-elastic's format, read back by the
launcher's failure summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import asyncproc
from asyncproc._launch.errorfile import read_error_file

from test_launcher import LAUNCHER


def error_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, var: str = "ASYNCPROC_ERROR_FILE") -> Path:
    path = tmp_path / "error.json"
    monkeypatch.delenv("ASYNCPROC_ERROR_FILE", raising=False)
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    monkeypatch.setenv(var, str(path))
    return path


@pytest.mark.parametrize("var", ["ASYNCPROC_ERROR_FILE", "TORCHELASTIC_ERROR_FILE"])
def test_uncaught_exception_is_written_in_torch_format_and_reraised(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, var: str
) -> None:
    path = error_file(monkeypatch, tmp_path, var)

    @asyncproc.record
    def main(x: int) -> None:
        raise ValueError(f"bad value {x}")

    with pytest.raises(ValueError, match="bad value 4"):
        main(4)
    data = json.loads(path.read_text())
    assert set(data) == {"message"} and set(data["message"]) == {"message", "extraInfo"}
    assert data["message"]["message"] == "ValueError: bad value 4"
    assert "in main" in data["message"]["extraInfo"]["py_callstack"]
    assert data["message"]["extraInfo"]["timestamp"].isdigit()
    assert main.__name__ == "main"


@pytest.mark.anyio
async def test_async_functions_are_recorded_too(
    anyio_backend: object, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = error_file(monkeypatch, tmp_path)

    @asyncproc.record
    async def main() -> int:
        raise KeyError("missing")

    with pytest.raises(KeyError):
        await main()
    record = read_error_file(path)
    assert record is not None and record.message == "KeyError: 'missing'" and "in main" in record.traceback


def test_success_and_sys_exit_zero_write_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = error_file(monkeypatch, tmp_path)
    assert asyncproc.record(lambda: 5)() == 5
    assert asyncproc.record(lambda: sys.exit(0))() is None  # torch's rule
    with pytest.raises(SystemExit):
        asyncproc.record(lambda: sys.exit(3))()
    with pytest.raises(SystemExit):
        asyncproc.record(lambda: sys.exit())()  # torch swallows only an explicit 0
    assert not path.exists()


class _BadStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("bad __str__")


def test_an_exception_whose_str_raises_still_propagates_itself(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = error_file(monkeypatch, tmp_path)

    @asyncproc.record
    def main() -> None:
        raise _BadStr()

    with pytest.raises(_BadStr):
        main()
    record = read_error_file(path)
    assert record is not None and record.message.startswith("_BadStr: ")


def test_without_an_error_file_the_exception_just_propagates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ASYNCPROC_ERROR_FILE", raising=False)
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    with pytest.raises(ZeroDivisionError):
        asyncproc.record(lambda: 1 / 0)()


def test_reads_torch_files_in_both_formats_and_rejects_garbage(tmp_path: Path) -> None:
    new = tmp_path / "new.json"
    new.write_text(json.dumps({"message": {"message": "RuntimeError: x", "extraInfo": {"py_callstack": "tb", "timestamp": "17"}}}))
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"message": "plain text", "timestamp": 12}))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert read_error_file(new) == asyncproc._launch.errorfile.ErrorRecord("RuntimeError: x", "tb", 17)
    assert read_error_file(old) == asyncproc._launch.errorfile.ErrorRecord("plain text", "", 12)
    assert read_error_file(bad) is None
    assert read_error_file(tmp_path / "absent.json") is None


def test_launcher_summary_shows_the_recorded_error_and_traceback(tmp_path: Path) -> None:
    rank = textwrap.dedent(
        """
        import os, time, asyncproc

        def parse(n):
            raise ValueError(f"rank {n} cannot parse its shard")

        @asyncproc.record
        def main():
            if os.environ["RANK"] == "1":
                parse(1)
            time.sleep(60)

        main()
        """
    )
    done = subprocess.run(
        [*LAUNCHER, "-n", "2", "--grace", "1", "--log-dir", str(tmp_path), "--run-id", "r", "--", sys.executable, "-c", rank],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 1
    summary = done.stderr[done.stderr.index("asyncproc run: rank 1"):]
    assert "error      : ValueError: rank 1 cannot parse its shard" in summary
    assert "in parse" in summary.split("traceback  :")[1]
    assert (tmp_path / "r" / "attempt_0" / "1" / "error.json").exists()


@pytest.mark.parametrize(
    "content",
    ['{"message": {"message": "x", "extraInfo": "oops"}}', '{"message": {"message": "x", "extraInfo": [1]}}',
     "[" * 100000 + "]" * 100000, '{"message": {"message": "x"', "\udcff\udcfe", "[1]", "null"],
    ids=["str-extra", "list-extra", "deep", "truncated", "not-utf8", "list", "null"],
)
def test_a_malformed_error_file_is_never_an_exception(tmp_path: Path, content: str) -> None:
    path = tmp_path / "error.json"
    path.write_text(content, errors="surrogateescape")
    record = read_error_file(path)
    assert record is None or record.message == "x" and record.traceback == ""


def test_a_huge_error_file_or_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    huge = tmp_path / "huge.json"
    huge.write_text(json.dumps({"message": "x" * (2 << 20)}))
    assert read_error_file(huge) is None
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    started = time.monotonic()
    assert read_error_file(fifo) is None
    assert time.monotonic() - started < 5


def test_launcher_survives_a_malformed_error_file() -> None:
    code = "import os, json; json.dump({'message': {'message': 'boom', 'extraInfo': 'x'}}, open(os.environ['TORCHELASTIC_ERROR_FILE'], 'w')); raise SystemExit(3)"
    proc = subprocess.run([*LAUNCHER, "-n", "2", "--", sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert "error      : boom" in proc.stderr and "Traceback" not in proc.stderr
