"""The benchmark runs (its smoke mode) and finds every stream intact. Its figures are for reading,
never asserted here: timings belong to the benchmark, not to the tests."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_benchmark_smoke_run_completes_with_intact_streams() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    table = result.stdout
    for scenario in ("A. time to first delta", "B. chatsvc CPU per 10,000 deltas", "C. ", "D. "):
        assert scenario in table
    assert "streams failed or not intact: 0" in table
