"""chatsvc's Prometheus metrics (prometheus-client): what /metrics serves, made once per app.

Besides the counts of streams, tokens and outcomes, two measures of the event loop's stalls, which
stall every stream at once: how late a short timer fires, and each garbage collection's pause
(`on_gc`, a `gc.callbacks` hook). With several workers, worker_metrics.py, imported only then,
makes the metrics live in the files the workers share (chatsvc note 13).
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

if TYPE_CHECKING:
    from worker_metrics import WorkerMetrics


def join_worker_metrics() -> WorkerMetrics | None:
    """In a worker of a supervisor, or with the operator's PROMETHEUS_MULTIPROC_DIR: the metrics
    directory that the workers share (chatsvc note 13). Elsewhere None, and its module is not imported."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR") and multiprocessing.parent_process() is None:
        return None
    from worker_metrics import WorkerMetrics

    return WorkerMetrics.join()


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    #: With several workers (chatsvc note 13), the metrics live in shared files, and gauges whose value is
    #: read when scraped are written by `workers` every second instead.
    workers: WorkerMetrics | None = None

    def __post_init__(self) -> None:
        r = self.registry

        def gauge(name: str, documentation: str, mode: Literal["livesum", "livemax"] = "livesum") -> Gauge:
            return Gauge(name, documentation, registry=r, multiprocess_mode=mode)  # how workers combine

        self.requests = Counter(
            "chatsvc_requests",
            "Chat requests by outcome code, refusals before the stream included",
            ["code"],
            registry=r,
        )
        self.active = gauge("chatsvc_active_streams", "Streams in progress, detached ones included")
        self.ttft = Histogram(
            "chatsvc_time_to_first_token_seconds",
            "Request start to first delta",
            registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
        )
        self.duration = Histogram(
            "chatsvc_stream_duration_seconds",
            "Request start to the end of the stream",
            registry=r,
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120),
        )
        self.tokens = Counter("chatsvc_tokens", "Tokens relayed", ["kind"], registry=r)
        # chatsvc note 22: labelled by the upstream's name, a bounded set (UPSTREAMS).
        self.upstream_attempts = Counter(
            "chatsvc_upstream_attempts",
            "Requests to each model server by result: ok (it answered), or the code that ended the attempt",
            ["upstream", "result"],
            registry=r,
        )
        self.circuit_open = Gauge(
            "chatsvc_upstream_circuit_open",
            "1 while a model server's circuit breaker is open (skipped), else 0",
            ["upstream"],
            registry=r,
            multiprocess_mode="livemax",
        )
        self.resumes = Counter(
            "chatsvc_resumes",
            "Resume requests by outcome: resumed, finished (204), not_found, unavailable (503)",
            ["outcome"],
            registry=r,
        )
        # RESUME_STORE=redis:// (chatsvc note 15): each round trip of the writer, and streams given up on.
        self.store_writes = Counter(
            "chatsvc_store_writes", "Round trips writing to RESUME_STORE, by result: ok, failed", ["result"], registry=r
        )
        self.store_latency = Histogram(
            "chatsvc_store_write_seconds",
            "Duration of a write round trip to RESUME_STORE",
            registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
        )
        self.store_unresumable = Counter(
            "chatsvc_store_unresumable_streams",
            "Streams whose store writes failed or fell behind: resumable only on their own replica",
            ["reason"],
            registry=r,
        )
        for result in ("ok", "failed"):  # 0 from the start (and without a store): rate() sees the first
            self.store_writes.labels(result)
        self.detached = gauge("chatsvc_detached_streams", "Streams running with no client attached")
        self.log_bytes = gauge("chatsvc_stream_log_bytes", "Bytes held by the stream logs (note 11)")
        # For the alert rules (deploy/prometheus/rules.yml): the limits, and how long a drain has run.
        self.max_streams = gauge("chatsvc_max_concurrent_streams", "MAX_CONCURRENT_STREAMS (summed: the host's)")
        self.grace = gauge("chatsvc_shutdown_grace_seconds", "SHUTDOWN_GRACE_S", "livemax")
        self.drain_seconds = gauge("chatsvc_drain_seconds", "Seconds since the drain began; 0 before", "livemax")
        # What leak checks watch: memory and open descriptors (process_*: per process, so not in
        # the sum of several workers), and tasks on the loop.
        if self.workers is None:
            ProcessCollector(registry=r)
        tasks = gauge("chatsvc_event_loop_tasks", "asyncio tasks on the event loop")
        self.observe(tasks, lambda: len(asyncio.all_tasks()))
        # A stall of the event loop stalls every stream at once: how late a 10 ms timer fires (so a
        # stall reads up to LAG_PROBE_S short), and each garbage collection's pause, measured exactly.
        stall_buckets = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
        self.loop_lag = Histogram(
            "chatsvc_event_loop_lag_seconds", "How late a timer fires", registry=r, buckets=stall_buckets
        )
        self.gc_pause = Histogram(
            "chatsvc_gc_pause_seconds",
            "Garbage collection pauses; when=idle: the full collections we run when no stream is open",
            ["generation", "when"],
            registry=r,
            buckets=stall_buckets,
        )
        self._gc_started = 0.0
        self.collecting_when_idle = False
        self.idle_collections = 0  # the lag probe leaves out the samples that span one

    LAG_PROBE_S = 0.01

    def observe(self, gauge: Gauge, read: Callable[[], float]) -> None:
        """A gauge whose value is `read()`: at each scrape, or with several workers every second."""
        if self.workers is not None:
            self.workers.observe(gauge, read)
        else:
            gauge.set_function(read)

    async def watch_loop_lag(self) -> None:
        while True:
            planned, idle_collections = time.perf_counter() + self.LAG_PROBE_S, self.idle_collections
            await asyncio.sleep(self.LAG_PROBE_S)
            if idle_collections == self.idle_collections:
                self.loop_lag.observe(max(0.0, time.perf_counter() - planned))

    def on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            when = "idle" if self.collecting_when_idle else "serving"
            self.gc_pause.labels(str(info["generation"]), when).observe(time.perf_counter() - self._gc_started)

    def collect_when_idle(self) -> None:
        self.collecting_when_idle, self.idle_collections = True, self.idle_collections + 1
        try:
            gc.collect()
        finally:
            self.collecting_when_idle = False
