"""A module whose every import is recorded, to see where and how often it is imported."""

import os

_log = os.environ.get("ASYNCPROC_TEST_IMPORT_LOG")
if _log:
    with open(_log, "a") as f:
        f.write(f"{os.getpid()}\n")


def answer() -> int:
    return 42
