"""The soak trial's short mode (benchmarks/soak.py --short): every outcome of an isolated
call, cancelling callers, fork-server SIGKILLs and handlers spawning and stopping, on the
three backends at once; no wrong value and nothing left running."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py"


def test_short_soak_has_no_wrong_value_and_no_leftover() -> None:
    out = subprocess.run([sys.executable, str(SOAK), "--short", "--json"], capture_output=True, text=True,
                         timeout=300)
    results = json.loads(out.stdout.strip().splitlines()[-1])
    table = out.stdout.rsplit("\n", 2)[0]
    for backend, result in results.items():
        assert "error" not in result, f"{backend}: {result['error']}\n{table}"
        assert result["calls"] == 60, table
        assert result["n_wrong"] == 0, f"{backend}: {result['wrong']}\n{table}"
        assert not result["left_inside"] and not result["left_after"], f"{backend} left processes\n{table}"
        assert result["handlers"] > 0, table
        kinds = result["outcomes"]
        assert kinds["value"] and kinds["exception"] and kinds["timeout"] and kinds["cancelled"], table
    assert out.returncode == 0, table
