"""The relay benchmark: chatsvc with resume on and off, the floor of its stack, the obvious relay
and the fake upstream directly, in one run.

    .venv/bin/python bench/run.py           # the full scenarios (about three minutes)
    .venv/bin/python bench/run.py --smoke   # a small run, to see that it works (the tests run this)
    .venv/bin/python bench/run.py --json bench/results.json   # also the figures, for bench/plot.py

Each relay in turn is pinned to core 0 with taskset; the fake upstream and the load generator (each
its own process) share core 1. Relays: `floor` (bench/floor_relay.py: the fixed stack, no checks),
`chatsvc` (resume on, the defaults), `chatsvc-noresume` (RESUME_GRACE_S=0, RESUME_TTL_S=0),
`ai-sdk` (chatsvc as `chatsvc`, but every stream on POST /api/chat, the AI SDK's protocol),
`chatsvc-upstreams` (as `chatsvc`, with UPSTREAMS naming the fake upstream twice: failover and
breakers on, the first server answering), `chatsvc-idem` (as `chatsvc`, every stream with an
Idempotency-Key of its own), `chatsvc-traced` (as `chatsvc`, with OpenTelemetry exporting
every request's spans to a loopback OTLP receiver, tests/otlp_receiver.py, on core 1),
`chatsvc-redis` (as `chatsvc`, with RESUME_STORE=redis:// on Debian's redis-server, on core 1, and
a second replica beside it: its R resumes, and its X stops, every stream on that other replica)
and `obvious`
(bench/obvious_relay.py). Scenarios:
  A. time to first delta, p50 at concurrency 1 (added: relay minus upstream direct), measured with
     every relay up at once, in interleaved rounds;
  B. CPU seconds of the relay per 10,000 deltas, 32 streams at once, chunks back to back;
  C. the same with one chunk every 20 ms (what real models do);
  D. 1000 streams at once, one chunk every 500 ms: p99 time to first delta, p99 stream time
     against the ideal, memory per open stream, and (chatsvc's own metrics) the longest event-loop
     stall and garbage-collection pause;
  E. a client that leaves before the first token, and one that leaves after it: how long until
     the fake upstream sees its connection closed (not with resume on: the grace keeps it open);
  R. resume: streams each cut once mid-stream and resumed at once with GET /chat/streams/{id} and
     Last-Event-ID: all intact, and the time from the reconnect to the first replayed event;
  X. chatsvc-redis only: DELETE on the other replica, and how long until the fake upstream sees
     the producing replica close its connection.
`--costs` instead prints chatsvc's CPU per stream (with its logs and without) and per lone delta.
Every stream is checked for integrity. Every process and wait is bounded; all stop by themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
A_ROUNDS = 6
PURE_PYTHON = ["--loop", "asyncio", "--http", "h11", "--no-access-log"]
GRANIAN = ["--working-dir", str(ROOT), "--loop", "uvloop", "--no-ws", "chatsvc:app"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def pinned(core: int) -> list[str]:
    return ["taskset", "-c", str(core)] if (os.cpu_count() or 1) > 1 else []


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (our own loopback URL)
        body: bytes = response.read()
        return body


def wait_http(url: str, limit: float = 30) -> None:
    """Until `url` answers; a redis:// one until Redis answers PING."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            if url.startswith("redis://"):
                with socket.create_connection(("127.0.0.1", int(url.split(":")[2].split("/")[0])), 1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            else:
                get(url)
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"bench: {url} did not answer")


def load(port: int, target: str, streams: int, concurrency: int, message: str, *extra: str) -> dict[str, Any]:
    args = ["--port", str(port), "--target", target, "--streams", str(streams)]
    args += ["--concurrency", str(concurrency), "--message", message, *extra]
    out = subprocess.run(
        [*pinned(1), PY, str(ROOT / "bench/load_generator.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    result: dict[str, Any] = json.loads(out)
    return result


def pct(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(p * len(values)))] if values else float("nan")


def histogram(metrics: str, name: str, having: str = "") -> dict[float, float]:
    """Cumulative bucket counts of a Prometheus histogram, summed over the series whose labels
    contain `having`."""
    counts: dict[float, float] = {}
    for labels, value in re.findall(rf"^{name}_bucket{{(.*?)}} (\S+)$", metrics, re.M):
        if having in labels:
            le = float(re.findall(r'le="([^"]+)"', labels)[0])
            counts[le] = counts.get(le, 0.0) + float(value)
    return counts


def longest(before: dict[float, float], after: dict[float, float]) -> str:
    """The bucket that holds the longest sample observed between two readings of a histogram."""
    grew = {le: after.get(le, 0) - before.get(le, 0) for le in after}
    total = grew.get(float("inf"), 0)
    if not total:
        return "none"
    bound = min(le for le, n in grew.items() if n == total)
    over_50ms = total - grew.get(0.05, total)
    return f"≤ {bound * 1000:g} ms ({int(over_50ms)} of {int(total)} over 50 ms)"


@dataclass(frozen=True)
class Sizes:
    """Streams (and chunks each) per scenario."""

    a: int
    b: tuple[int, int]
    c: tuple[int, int]
    d: tuple[int, int]
    e: int
    r: int
    interleaved: tuple[int, int] = (32, 100)  # Bi and Ci: streams (all at once), chunks each
    rounds: int = A_ROUNDS  # of A, Bi and Ci


@dataclass
class Relay:
    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    has_metrics: bool = False
    kept_on_leave: str | None = None  # why E does not apply, if it does not
    resumes: bool = False  # R applies
    replicas: int = 1  # 2: R and X go to a second replica of the same relay
    target: str = "chatsvc"  # the load generator's: POST /chat; "ai-sdk": POST /api/chat


@contextmanager
def running(command: list[str], env: dict[str, str], health: str) -> Iterator[subprocess.Popen[bytes]]:
    workdir = tempfile.mkdtemp(prefix="chatsvc-bench-")  # no .env of anyone's applies here
    process = subprocess.Popen(
        command,
        env={**os.environ, **env},
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(health)
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Bench:
    def __init__(self, size: Sizes, up_port: int) -> None:
        self.size = size
        self.up_port = up_port
        self.results: dict[str, dict[str, str]] = {}
        self.figures: dict[str, dict[str, float]] = {}
        self.failures = 0

    def put(self, scenario: str, target: str, text: str, figure: float | None = None) -> None:
        self.results.setdefault(scenario, {})[target] = text
        if figure is not None:
            self.figures.setdefault(scenario, {})[target] = figure

    def count(self, result: dict[str, Any]) -> None:
        self.failures += result["failed"]
        if result["failed"]:
            print(f"bench: {result['failed']} streams failed: {result['why']}", file=sys.stderr)

    def first_delta(self, relays: list[Relay]) -> None:
        """A, with every relay up at once and idle but for the one asked: rounds of one stream at a
        time go to the fake model directly and to each relay in turn, so that the machine's drift
        over minutes (seen here: the same relay's A twice as long in one run as in the next) falls
        on all of them alike; in an order shuffled each round."""
        samples: dict[str, list[float]] = {"upstream": [], **{r.name: [] for r in relays}}
        targets = [("upstream", self.up_port, "upstream")]
        pids: dict[str, int] = {}
        with ExitStack() as stack:
            for relay in relays:
                port = free_port()
                env = {**relay.env, "PORT": str(port)}
                command = [*pinned(0), *(arg.format(port=port) for arg in relay.command)]
                pids[relay.name] = stack.enter_context(running(command, env, f"http://127.0.0.1:{port}/healthz")).pid
                self.count(load(port, relay.target, 20, 5, "bench:chunks=5"))  # warm-up
                targets.append((relay.name, port, relay.target))
            for round_number in range(self.size.rounds):
                # A new order each round (the same in every run), so that no relay always follows the
                # same one: in trials with a fixed order, near-identical variants came out 0.3 ms
                # apart; shuffled, two copies of the same code measured alike.
                for name, port, target in random.Random(round_number).sample(targets, len(targets)):
                    result = load(port, target, max(5, self.size.a // self.size.rounds), 1, "bench:chunks=5")
                    self.count(result)
                    samples[name] += result["ttfb"]
            self.interleaved_cpu(targets[1:], pids)
        direct = statistics.median(samples["upstream"])
        self.put("A", "upstream", f"{direct * 1000:.2f} ms", direct)
        for relay in relays:
            ttfb = statistics.median(samples[relay.name])
            added = ttfb - direct
            self.put("A", relay.name, f"{ttfb * 1000:.2f} ms, added {added * 1000:.2f} ms", added)

    def interleaved_cpu(self, targets: list[tuple[str, int, str]], pids: dict[str, int]) -> None:
        """B and C again, smaller, in interleaved rounds over the relays that A started: the
        machine's drift, which moves single B and C runs by 30 % and more, falls on all alike.
        Each relay's figure is the median of its rounds."""
        (streams, chunks), rounds = self.size.interleaved, self.size.rounds
        per_round: dict[str, dict[str, list[float]]] = {"Bi": {}, "Ci": {}}
        for _ in range(rounds):
            for row, delay in (("Bi", 0.0), ("Ci", 0.02)):
                for name, port, target in targets:
                    before = cpu_seconds(pids[name])
                    result = load(port, target, streams, streams, f"bench:chunks={chunks},delay={delay}")
                    self.count(result)
                    per_10k = (cpu_seconds(pids[name]) - before) / (streams * chunks) * 10_000
                    per_round[row].setdefault(name, []).append(per_10k)
        for row, figures in per_round.items():
            for name, values in figures.items():
                median = statistics.median(values)
                self.put(row, name, f"{median:.3f} CPU s ({median * 100:.0f} µs a delta)", median)

    def direct(self) -> None:
        size, port = self.size, self.up_port
        streams, chunks = size.d
        result = load(port, "upstream", streams, streams, f"bench:chunks={chunks},delay=0.5")
        self.count(result)
        self.put("D", "upstream", f"{pct(result['ttfb'], 0.99):.3f} s / {pct(result['total'], 0.99):.2f} s")

    def relay(self, relay: Relay) -> None:
        size, name = self.size, relay.name
        port = free_port()
        env = {**relay.env, "PORT": str(port)}
        command = [*pinned(0), *(arg.format(port=port) for arg in relay.command)]
        with ExitStack() as replicas:
            p = replicas.enter_context(running(command, env, f"http://127.0.0.1:{port}/healthz"))
            other = port
            if relay.replicas == 2:
                other = free_port()
                other_command = [*pinned(0), *(arg.format(port=other) for arg in relay.command)]
                replicas.enter_context(
                    running(other_command, {**relay.env, "PORT": str(other)}, f"http://127.0.0.1:{other}/healthz")
                )
            self.count(load(port, relay.target, 20, 5, "bench:chunks=5"))  # warm-up

            for scenario, (streams, chunks), delay in (("B", size.b, 0.0), ("C", size.c, 0.02)):
                before = cpu_seconds(p.pid)
                result = load(port, relay.target, streams, 32, f"bench:chunks={chunks},delay={delay}")
                spent = cpu_seconds(p.pid) - before
                self.count(result)
                per_10k = spent / (streams * chunks) * 10_000
                self.put(scenario, name, f"{per_10k:.3f} CPU s ({per_10k * 100:.0f} µs a delta)", per_10k)

            metrics_url = f"http://127.0.0.1:{port}/metrics"
            before_metrics = get(metrics_url).decode() if relay.has_metrics else ""
            streams, chunks = size.d
            base_rss, peak = rss_bytes(p.pid), [0]
            stop = threading.Event()

            def sample() -> None:
                while not stop.wait(0.25):
                    peak[0] = max(peak[0], rss_bytes(p.pid))

            sampler = threading.Thread(target=sample)
            sampler.start()
            result = load(port, relay.target, streams, streams, f"bench:chunks={chunks},delay=0.5")
            stop.set()
            sampler.join()
            self.count(result)
            p99_first, p99_total = pct(result["ttfb"], 0.99), pct(result["total"], 0.99)
            self.put("D", name, f"{p99_first:.3f} s / {p99_total:.2f} s", p99_total)
            kb = (peak[0] - base_rss) / streams / 1024
            self.put("D mem", name, f"{kb:.0f} KB", kb)
            if relay.has_metrics:
                after_metrics = get(metrics_url).decode()
                for row, metric, having in (
                    ("D lag", "chatsvc_event_loop_lag_seconds", ""),
                    ("D gc", "chatsvc_gc_pause_seconds", 'when="serving"'),
                ):
                    then, now = histogram(before_metrics, metric, having), histogram(after_metrics, metric, having)
                    self.put(row, name, longest(then, now))

            if relay.resumes:
                for row, streams, concurrency in (("R1", size.a // 3, 1), ("R", size.r, 32)):
                    result = load(
                        port, "chatsvc", streams, concurrency, "bench:chunks=20,delay=0.02",
                        "--resume-after", "10", "--other-port", str(other),
                    )  # fmt: skip
                    self.count(result)
                    waits = result["resumed_in"]
                    self.put(row, name, f"p50 {pct(waits, 0.5) * 1000:.1f} ms, p99 {pct(waits, 0.99) * 1000:.1f} ms")
            rows = [] if relay.kept_on_leave else [
                ("E before", "bench:chunks=5,first=10", "--leave-after", "0"),
                ("E after", "bench:chunks=100,delay=0.2", "--leave-after", "1"),
            ]  # fmt: skip
            if relay.kept_on_leave:
                self.put("E before", name, relay.kept_on_leave)
                self.put("E after", name, relay.kept_on_leave)
            if relay.replicas == 2:
                rows.append(("X", "bench:chunks=100,delay=0.2", "--delete-after", "1"))
            for row, message, how, after in rows:
                result = load(port, relay.target, size.e, size.e, message, how, after, "--other-port", str(other))
                self.count(result)
                left_at = {tag: left for tag, left in result["left_at"].items() if left is not None}
                deadline = time.monotonic() + 3  # far past the 50 ms goal: a close later than this is "never"
                while True:
                    closes = json.loads(get(f"http://127.0.0.1:{self.up_port}/closes"))
                    if set(left_at) <= set(closes) or time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
                lags = sorted((closes[tag] - left) * 1000 for tag, left in left_at.items() if tag in closes)
                missing = size.e - len(lags)
                if relay.has_metrics:  # chatsvc's promise; the obvious relay is only measured
                    self.failures += missing
                text = f"p50 {statistics.median(lags):.1f} ms, max {max(lags):.1f} ms" if lags else "never"
                self.put(row, name, text + (f" ({missing} never closed)" if missing else ""))
                get(f"http://127.0.0.1:{self.up_port}/closes?reset")

    def record(self, relays: list[str]) -> dict[str, Any]:
        """The run's figures as bench/plot.py reads them: per scenario, per relay, the number that
        its table cell shows (seconds added to the first delta for A, CPU seconds per 10,000 deltas
        for B and C), and when and where they were measured."""
        return {
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "machine": f"{os.cpu_count()} cores, Python {sys.version.split()[0]}",
            "relays": relays,
            "figures": self.figures,
        }

    def table(self, relays: list[str]) -> str:
        rows = {
            "A": "A. time to first delta, p50, c=1",
            "B": "B. CPU per 10,000 deltas, c=32, back to back",
            "C": "C. CPU per 10,000 deltas, c=32, a chunk every 20 ms",
            "Bi": f"B, interleaved: {self.size.interleaved[0]} streams of {self.size.interleaved[1]} chunks,"
            f" median of {self.size.rounds} rounds",
            "Ci": f"C, interleaved: the same, a chunk every 20 ms, median of {self.size.rounds} rounds",
            "D": f"D. {self.size.d[0]} streams, a chunk every 500 ms: p99 first delta / p99 stream"
            f" (ideal {(self.size.d[1] - 1) * 0.5:.1f} s)",
            "D mem": "D. memory per open stream",
            "D lag": "D. longest event-loop stall",
            "D gc": "D. longest garbage-collection pause while streams are open",
            "E before": "E. upstream closed after the client left, before the first token",
            "E after": "E. upstream closed after the client left, after the first token",
            "R1": f"R. {self.size.a // 3} streams cut once and resumed, one at a time: reconnect to first event",
            "R": f"R. {self.size.r} streams, 32 at a time, all cut at once and resumed: the same",
            "X": "X. DELETE on the other replica to the upstream closed by the producing one",
        }
        targets = ["upstream", *relays]
        ratios = [
            ("chatsvc", "floor", ("A", "B", "C", "Bi", "Ci")),
            ("chatsvc", "chatsvc-noresume", ("B", "C", "Bi", "Ci", "D mem")),
            ("ai-sdk", "chatsvc", ("B", "C", "Bi", "Ci")),
            ("chatsvc-traced", "chatsvc", ("B", "C", "Bi", "Ci", "D mem")),
            ("chatsvc-redis", "chatsvc", ("B", "C", "Bi", "Ci", "D mem")),
            ("chatsvc-upstreams", "chatsvc", ("A", "B", "C", "Bi", "Ci", "D mem")),
            ("chatsvc-idem", "chatsvc", ("A", "B", "C", "Bi", "Ci", "D mem")),
            ("chatsvc", "baseline", ("A", "B", "C", "Bi", "Ci", "D mem")),
        ]
        ratios = [r for r in ratios if r[0] in relays and r[1] in relays]
        header = [*targets, *(f"{a} / {b}" for a, b, _ in ratios)]
        lines = ["| scenario | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
        for key, label in rows.items():
            cells = [self.results.get(key, {}).get(t, "—") for t in targets]
            figures = self.figures.get(key, {})
            for a, b, keys in ratios:
                cells.append(f"{figures[a] / figures[b]:.2f}" if key in keys and figures.get(b) else "—")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def costs(upstream_env: dict[str, str], streams: int) -> None:
    """What chatsvc costs: CPU per stream (one-delta streams, 32 at a time) with its usual logs and
    with them off, and CPU per delta when every delta arrives alone (32 streams, one every 5 ms)."""
    for label, message, count, env in (
        ("CPU per stream, LOG_LEVEL=INFO", "bench:chunks=1", streams, {}),
        ("CPU per stream, LOG_LEVEL=WARNING", "bench:chunks=1", streams, {"LOG_LEVEL": "WARNING"}),
        ("CPU per delta arriving alone", "bench:chunks=500,delay=0.005", 32, {}),
    ):
        port = free_port()
        env = {**upstream_env, **env, "PORT": str(port)}
        command = [*pinned(0), PY, str(ROOT / "chatsvc.py")]
        with running(command, env, f"http://127.0.0.1:{port}/healthz") as p:
            load(port, "chatsvc", 50, 10, "bench:chunks=5")  # warm-up
            before = cpu_seconds(p.pid)
            result = load(port, "chatsvc", count, 32, message)
            spent = cpu_seconds(p.pid) - before
        if result["failed"]:
            raise SystemExit(f"bench: {result['failed']} streams failed: {result['why']}")
        units = count * (500 if "500" in message else 1)
        print(f"{label}: {spent / units * 1e6:.0f} µs ({units} {'deltas' if units > count else 'streams'})")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument(
        "--relays",
        default="floor,chatsvc,chatsvc-noresume,ai-sdk,chatsvc-traced,chatsvc-redis,obvious",
        help="comma-separated: floor, chatsvc, chatsvc-noresume, ai-sdk, chatsvc-traced, chatsvc-redis,"
        " chatsvc-upstreams, chatsvc-idem, chatsvc-quiet, obvious,"
        " chatsvc-h11,"
        " chatsvc-granian (after `pip install granian`)",
    )
    parser.add_argument("--costs", action="store_true", help="only chatsvc's CPU per stream and per delta")
    parser.add_argument(
        "--interleaved-chunks",
        type=int,
        help="chunks a stream in Bi and Ci (default 100): more make each round's CPU finer than /proc's ticks",
    )
    parser.add_argument("--json", type=Path, help="also write the figures there, for bench/plot.py")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a checkout whose chatsvc.py runs as the relay `baseline` (add it to --relays), as `chatsvc`"
        " does: what a change costs, in the same run (e.g. `git worktree add /tmp/before HEAD~1`)",
    )
    args = parser.parse_args()
    size = (
        Sizes(20, (32, 50), (8, 10), (50, 4), 3, 10, (8, 10), rounds=2)
        if args.smoke
        else Sizes(300, (320, 500), (64, 50), (1000, 20), 20, 100)
    )
    if args.interleaved_chunks:
        size = replace(size, interleaved=(size.interleaved[0], args.interleaved_chunks))
    up_port, otlp_port, redis_port = free_port(), free_port(), free_port()
    upstream_env = {
        "OPENAI_BASE_URL": f"http://127.0.0.1:{up_port}/v1",
        "OPENAI_API_KEY": "bench",
        "OPENAI_MODEL": "bench",
        "MAX_CONCURRENT_STREAMS": "5000",
        "REQUEST_TIMEOUT_S": "120",
    }
    no_resume = {**upstream_env, "RESUME_GRACE_S": "0", "RESUME_TTL_S": "0"}
    chatsvc = Relay(
        "chatsvc",
        [PY, str(ROOT / "chatsvc.py")],
        upstream_env,
        has_metrics=True,
        kept_on_leave="kept for RESUME_GRACE_S",
        resumes=True,
    )
    available = {
        "floor": Relay(
            "floor",
            [PY, str(ROOT / "bench/floor_relay.py"), "--port", "{port}"],
            upstream_env,
            kept_on_leave="not measured (no disconnect handling)",
        ),
        "chatsvc": chatsvc,
        "chatsvc-noresume": Relay("chatsvc-noresume", [PY, str(ROOT / "chatsvc.py")], no_resume, has_metrics=True),
        # The same service as `chatsvc`, spoken to as the AI SDK's DefaultChatTransport does.
        # (R drives resumes by event id; the AI SDK resumes by chat, which tests/test_ai_sdk.py shows.)
        "ai-sdk": replace(chatsvc, name="ai-sdk", target="ai-sdk", resumes=False),
        # The same service with every request traced (the default sampler) and exported.
        # The same service with the stream logs in Redis, and a second replica for R and X.
        "chatsvc-redis": replace(
            chatsvc,
            name="chatsvc-redis",
            env={**upstream_env, "RESUME_STORE": f"redis://127.0.0.1:{redis_port}/0"},
            replicas=2,
        ),
        "chatsvc-traced": replace(
            chatsvc,
            name="chatsvc-traced",
            env={**upstream_env, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}"},
        ),
        # Resume on, with only warnings logged: how much of chatsvc's cost over the floor its logs are.
        "chatsvc-quiet": Relay(
            "chatsvc-quiet",
            [PY, str(ROOT / "chatsvc.py")],
            {**upstream_env, "LOG_LEVEL": "WARNING"},
            has_metrics=True,
            kept_on_leave="kept for RESUME_GRACE_S",
        ),
        # The same app on uvicorn's pure-Python stack (asyncio loop, h11), to show what the stack adds.
        "chatsvc-h11": Relay(
            "chatsvc-h11",
            [PY, "-m", "uvicorn", "chatsvc:app", "--app-dir", str(ROOT), "--port", "{port}", *PURE_PYTHON],
            no_resume,
            has_metrics=True,
        ),
        # The same app on granian, a Rust HTTP server, when installed. Its CPU and memory sit in a
        # worker process that this benchmark does not add up: compare only A, D's times and E.
        "chatsvc-granian": Relay(
            "chatsvc-granian",
            [PY, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1", "--port", "{port}", *GRANIAN],
            no_resume,
            has_metrics=True,
        ),
        # The same service with two model servers in UPSTREAMS (the fake upstream under two names):
        # what failover and the breakers cost while the first one answers.
        "chatsvc-upstreams": replace(
            chatsvc,
            name="chatsvc-upstreams",
            env={
                **{k: v for k, v in upstream_env.items() if not k.startswith("OPENAI_") or k == "OPENAI_MODEL"},
                "UPSTREAMS": json.dumps(
                    [{"name": name, "base_url": upstream_env["OPENAI_BASE_URL"], "api_key": "bench"} for name in "ab"]
                ),
            },
        ),
        # The same service, every stream sent with an Idempotency-Key of its own.
        "chatsvc-idem": replace(chatsvc, name="chatsvc-idem", target="chatsvc-idem", resumes=False),
        # Another version of chatsvc, run as `chatsvc` is: the same run with a change and without it.
        "baseline": replace(
            chatsvc, name="baseline", command=[PY, str((args.baseline or ROOT) / "chatsvc.py")], resumes=False
        ),
        "obvious": Relay("obvious", [PY, str(ROOT / "bench/obvious_relay.py"), "--port", "{port}"], upstream_env),
    }
    relays = [available[name] for name in args.relays.split(",")]
    bench = Bench(size, up_port)
    with ExitStack() as servers:
        servers.enter_context(
            running(
                [*pinned(1), PY, str(ROOT / "bench/fake_upstream.py"), "--port", str(up_port)],
                {},
                f"http://127.0.0.1:{up_port}/v1/models",
            )
        )
        if any(relay.name == "chatsvc-traced" for relay in relays):
            servers.enter_context(
                running(
                    [*pinned(1), PY, str(ROOT / "tests/otlp_receiver.py"), "--port", str(otlp_port)],
                    {"PYTHONPATH": str(ROOT)},
                    f"http://127.0.0.1:{otlp_port}/spans",
                )
            )
        if any(relay.name == "chatsvc-redis" for relay in relays):
            redis_server = shutil.which("redis-server") or "redis-server"  # tests/install-debian.sh
            servers.enter_context(
                running(
                    [*pinned(1), redis_server, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""],
                    {},
                    f"redis://127.0.0.1:{redis_port}/0",
                )
            )
        if args.costs:
            costs(upstream_env, 200 if args.smoke else 6000)
            return 0
        bench.first_delta(relays)
        bench.direct()
        for relay in relays:
            bench.relay(relay)
        traced = any(relay.name == "chatsvc-traced" for relay in relays)
        exported = int(get(f"http://127.0.0.1:{otlp_port}/spans")) if traced else 0
        bench.failures += traced and exported == 0  # tracing that exports nothing would measure nothing
    print(bench.table([r.name for r in relays]))
    if args.json:
        args.json.write_text(json.dumps(bench.record([r.name for r in relays]), indent=1) + "\n")
    if traced:
        print(f"spans the OTLP receiver decoded: {exported}")
    print(f"streams failed or not intact: {bench.failures}")
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
