"""The benchmark runs (its smoke mode) and finds every stream intact. Its figures are for reading,
never asserted here: timings belong to the benchmark, not to the tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow


def bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run a bench script in a process group of its own, and end the whole group however the run
    ends: a script stopped by a timeout leaves no relay, fake model or Redis of its own behind."""
    process = subprocess.Popen(
        [sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group we made: the script and what it started
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def ran(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.timeout(360)  # every relay and scenario, small: about a minute, several on a busy machine
def test_benchmark_smoke_run_completes_with_intact_streams(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    result = bench(str(ROOT / "bench" / "run.py"), "--smoke", "--json", str(results))
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

    # The same figures, as bench/plot.py draws them.
    run = json.loads(results.read_text())
    assert run["relays"] == header[2 : 2 + len(run["relays"])]
    assert {"floor", "chatsvc", "obvious"} <= set(run["figures"]["Ci"])
    picture = tmp_path / "benchmark.png"
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "plot.py"), str(results), str(picture)], check=True, timeout=120
    )
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(360)
def test_cost_measurements_run() -> None:
    """bench/run.py --costs, bench/client_cost.py and bench/protocols.py, in their smoke mode: each
    prints its rows."""
    costs = ran(bench(str(ROOT / "bench" / "run.py"), "--costs", "--smoke"))
    for row in (
        "CPU per stream, LOG_LEVEL=INFO: ",
        "CPU per stream, LOG_LEVEL=WARNING: ",
        "CPU per delta arriving alone: ",
    ):
        assert row in costs, costs
    clients = ran(bench(str(ROOT / "bench" / "client_cost.py"), "--smoke"))
    for way in ("create, httpx transport", "create, aiohttp transport", "post, aiohttp transport", "aiohttp alone"):
        assert f"| {way} | " in clients, clients
    protocols = ran(bench(str(ROOT / "bench" / "protocols.py"), "--smoke"))
    for path in ("/chat", "/api/chat"):
        assert f"| {path} | " in protocols, protocols
