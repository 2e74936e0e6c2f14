"""Several workers, one /metrics: prometheus-client's multiprocess mode (chatsvc note 13).

chatsvc imports this module only in a worker of a supervisor (uvicorn's, under `--workers N` or
WORKERS), or where the operator set PROMETHEUS_MULTIPROC_DIR. The worker joins the metrics directory
of its supervisor, switching prometheus-client to it before any metric is made, and leaves it at
its end; the /metrics endpoint reads every worker's files. A gauge whose value is read when
scraped is written to the files every LIVE_INTERVAL_S instead (`observe`, `publish_live`).
"""

from __future__ import annotations

import asyncio
import fcntl
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client import multiprocess as prometheus_multiprocess
from prometheus_client import values as prometheus_values
from prometheus_client.multiprocess import MultiProcessCollector

LIVE_INTERVAL_S = 1.0


class WorkerMetrics:
    """The metrics directory that a supervisor's workers share: one per supervisor process, named
    by its pid and start time. The first worker in empties it; the last out removes it. A shared
    flock on `.lock`, held by every worker while it lives, says who is in."""

    def __init__(self, path: Path, lock: IO[str] | None) -> None:
        self.path = path
        self.lock = lock  # None: the operator's directory, which we neither empty nor remove
        self.live: list[tuple[Gauge, Callable[[], float]]] = []

    @classmethod
    def join(cls) -> WorkerMetrics | None:
        """In a worker of a supervisor (uvicorn's, under `--workers` or WORKERS): the directory,
        with prometheus-client switched to it; elsewhere None. Before any metric is made."""
        if operators := os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return cls(Path(operators), None)  # set before start: prometheus-client is in that mode
        parent = multiprocessing.parent_process()
        if parent is None or parent.pid is None:
            return None
        path = Path(tempfile.gettempdir()) / f"chatsvc-metrics-{parent.pid}-{_started_ticks(parent.pid)}"
        path.mkdir(mode=0o700, exist_ok=True)
        lock = (path / ".lock").open("a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody else in: anything here is stale
            for stale in path.glob("*.db"):
                stale.unlink()
        except BlockingIOError:
            pass
        fcntl.flock(lock, fcntl.LOCK_SH)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
        # prometheus-client chose its value class from this variable when it was imported, before
        # this worker could know it is one: its own chooser, asked again.
        prometheus_values.ValueClass = prometheus_values.get_value_class()  # type: ignore[no-untyped-call]
        return cls(path, lock)

    def observe(self, gauge: Gauge, read: Callable[[], float]) -> None:
        """A gauge whose value is `read()`, written every LIVE_INTERVAL_S by `publish_live`: a
        function set on a gauge would be read by the one worker that answers the scrape."""
        self.live.append((gauge, read))

    async def publish_live(self) -> None:
        while True:
            for gauge, read in self.live:
                gauge.set(read())
            await asyncio.sleep(LIVE_INTERVAL_S)

    def registry(self) -> CollectorRegistry:
        """Every worker's metrics, summed as each metric's multiprocess mode says."""
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.path))  # type: ignore[no-untyped-call]
        return registry

    def leave(self) -> None:
        """This worker's live gauges go; the last worker out removes the directory."""
        prometheus_multiprocess.mark_process_dead(os.getpid(), str(self.path))  # type: ignore[no-untyped-call]
        if self.lock is None:
            return
        fcntl.flock(self.lock, fcntl.LOCK_UN)
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(self.path, ignore_errors=True)
        except BlockingIOError:
            pass  # another worker is still in
        self.lock.close()


def _started_ticks(pid: int) -> str:
    """When a process started (clock ticks since boot): with the pid, it names one process's life."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "0"
