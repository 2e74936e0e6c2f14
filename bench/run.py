"""The relay benchmark: chatsvc against the fake upstream directly, in one run.

    .venv/bin/python bench/run.py           # the full scenarios (a few minutes)
    .venv/bin/python bench/run.py --smoke   # a small run, to see that it works (the tests run this)

chatsvc is pinned to core 0 with taskset; the fake upstream and the load generator (each its own
process) share core 1. Scenarios:
  A. added time to first delta, p50 at concurrency 1 (chatsvc minus upstream direct);
  B. CPU seconds of chatsvc per 10,000 deltas, 32 streams at once, chunks back to back;
  C. the same with one chunk every 20 ms (what real models do);
  D. 1000 streams at once, one chunk every 500 ms: p99 time to first delta, p99 stream time
     against the ideal, and chatsvc's memory per open stream.
Every stream is checked for integrity. Every process and wait is bounded; all stop by themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def pinned(core: int) -> list[str]:
    return ["taskset", "-c", str(core)] if os.cpu_count() and os.cpu_count() > 1 else []  # type: ignore[operator]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


def wait_http(url: str, limit: float = 30) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310 (our own loopback URL)
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"bench: {url} did not answer")


def load(port: int, target: str, streams: int, concurrency: int, message: str) -> dict[str, Any]:
    out = subprocess.run(
        [
            *pinned(1),
            PY,
            str(ROOT / "bench/load_generator.py"),
            "--port",
            str(port),
            "--target",
            target,
            "--streams",
            str(streams),
            "--concurrency",
            str(concurrency),
            "--message",
            message,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def pct(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(p * len(values)))] if values else float("nan")


@dataclass(frozen=True)
class Sizes:
    """Streams (and chunks each) per scenario."""

    a: int
    b: tuple[int, int]
    c: tuple[int, int]
    d: tuple[int, int]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    smoke = parser.parse_args().smoke
    size = Sizes(20, (32, 50), (8, 10), (50, 4)) if smoke else Sizes(300, (320, 500), (64, 50), (1000, 20))

    up_port, svc_port = free_port(), free_port()
    upstream = subprocess.Popen([*pinned(1), PY, str(ROOT / "bench/fake_upstream.py"), "--port", str(up_port)])
    env = {
        **os.environ,
        "OPENAI_BASE_URL": f"http://127.0.0.1:{up_port}/v1",
        "OPENAI_MODEL": "bench",
        "PORT": str(svc_port),
        "MAX_CONCURRENT_STREAMS": "5000",
        "REQUEST_TIMEOUT_S": "120",
    }
    workdir = tempfile.mkdtemp(prefix="chatsvc-bench-")  # no .env of anyone's applies here
    service = subprocess.Popen(
        [*pinned(0), PY, str(ROOT / "chatsvc.py")],
        env=env,
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    rows: list[tuple[str, str, str]] = []
    failures = 0
    try:
        wait_http(f"http://127.0.0.1:{up_port}/v1/models")
        wait_http(f"http://127.0.0.1:{svc_port}/healthz")
        load(svc_port, "chatsvc", 5, 5, "bench:chunks=5")  # warm-up

        # A. Added time to first delta at concurrency 1.
        via = load(svc_port, "chatsvc", size.a, 1, "bench:chunks=5")
        direct = load(up_port, "upstream", size.a, 1, "bench:chunks=5")
        failures += via["failed"] + direct["failed"]
        added = (statistics.median(via["ttfb"]) - statistics.median(direct["ttfb"])) * 1000
        rows.append(
            (
                "A. time to first delta, p50, c=1",
                f"{statistics.median(via['ttfb']) * 1000:.2f} ms via chatsvc",
                f"{statistics.median(direct['ttfb']) * 1000:.2f} ms direct; added {added:.2f} ms",
            )
        )

        # B and C. CPU of chatsvc per delta.
        for name, (streams, chunks), delay in (("B", size.b, 0.0), ("C", size.c, 0.02)):
            before = cpu_seconds(service.pid)
            result = load(svc_port, "chatsvc", streams, 32, f"bench:chunks={chunks},delay={delay}")
            spent = cpu_seconds(service.pid) - before
            failures += result["failed"]
            deltas = streams * chunks
            how = "chunks back to back" if delay == 0 else f"one chunk every {delay * 1000:.0f} ms"
            note = f"{deltas} deltas in {result['wall_s']:.1f} s, {result['failed']} streams failed"
            rows.append(
                (f"{name}. chatsvc CPU per 10,000 deltas, c=32, {how}", f"{spent / deltas * 10_000:.2f} CPU s", note)
            )

        # D. Many open streams, one chunk every 500 ms.
        streams, chunks = size.d
        ideal = (chunks - 1) * 0.5
        base_rss, peak = rss_bytes(service.pid), [0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.25):
                peak[0] = max(peak[0], rss_bytes(service.pid))

        sampler = threading.Thread(target=sample)
        sampler.start()
        result = load(svc_port, "chatsvc", streams, streams, f"bench:chunks={chunks},delay=0.5")
        stop.set()
        sampler.join()
        failures += result["failed"]
        per_stream_kb = (peak[0] - base_rss) / streams / 1024
        p99_first, p99_total = pct(result["ttfb"], 0.99), pct(result["total"], 0.99)
        rows.append(
            (
                f"D. {streams} open streams, a chunk every 500 ms",
                f"p99 first delta {p99_first:.3f} s; p99 stream {p99_total:.2f} s (ideal {ideal:.1f} s)",
                f"{per_stream_kb:.0f} KB of RSS per open stream; {result['failed']} failed",
            )
        )
    finally:
        for process in (service, upstream):
            process.send_signal(signal.SIGTERM)
        for process in (service, upstream):
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                process.kill()

    width = max(len(r[0]) for r in rows)
    print(f"{'scenario':<{width}} | chatsvc | notes")
    for row in rows:
        print(f"{row[0]:<{width}} | {row[1]} | {row[2]}")
    print(f"streams failed or not intact: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
