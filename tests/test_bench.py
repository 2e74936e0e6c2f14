"""The benchmark runs (its smoke mode) and finds every stream intact. Its figures are for reading,
never asserted here: timings belong to the benchmark, not to the tests."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow


@pytest.mark.timeout(360)  # every relay and scenario, small: about a minute, several on a busy machine
def test_benchmark_smoke_run_completes_with_intact_streams() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows: dict[str, list[str]] = {}  # the first row of each scenario letter ("D." has four)
    for line in lines[2:]:
        if line.startswith("|"):
            rows.setdefault(line.split("|")[1].strip()[:2], line.strip("|").split("|"))
    # Resume on: every scenario but E (the grace keeps a left stream open); resume off: all but R;
    # the AI SDK route: A to D (its resume is by chat, which R does not drive).
    for relay, scenarios in (
        ("chatsvc", "ABCDR"),
        ("chatsvc-noresume", "ABCDE"),
        ("ai-sdk", "ABCD"),
        ("chatsvc-traced", "ABCDR"),
        ("chatsvc-redis", "ABCDRX"),  # R and X on its other replica
        ("floor", "ABCD"),
    ):
        column = header.index(relay)
        for scenario in scenarios:
            assert rows[f"{scenario}."][column].strip() not in ("", "—"), (relay, rows[f"{scenario}."])
    assert rows["E."][header.index("chatsvc")].strip() == "kept for RESUME_GRACE_S"
    assert "streams failed or not intact: 0" in result.stdout
    assert int(result.stdout.split("spans the OTLP receiver decoded: ")[1].split()[0]) > 0


@pytest.mark.timeout(360)
def test_cost_measurements_run() -> None:
    """bench/run.py --costs, bench/client_cost.py and bench/protocols.py, in their smoke mode: each
    prints its rows."""
    costs = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--costs", "--smoke"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    for row in (
        "CPU per stream, LOG_LEVEL=INFO: ",
        "CPU per stream, LOG_LEVEL=WARNING: ",
        "CPU per delta arriving alone: ",
    ):
        assert row in costs, costs
    clients = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "client_cost.py"), "--smoke"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    for way in ("create, httpx transport", "create, aiohttp transport", "post, aiohttp transport", "aiohttp alone"):
        assert f"| {way} | " in clients, clients
    protocols = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "protocols.py"), "--smoke"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True,
    ).stdout  # fmt: skip
    for path in ("/chat", "/api/chat"):
        assert f"| {path} | " in protocols, protocols
