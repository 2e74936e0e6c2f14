"""However chatsvc is launched, SIGTERM drains (note 4): `python chatsvc.py`, with WORKERS=2,
`uvicorn chatsvc:app`, and with `--workers 2`. In each, started for real: /readyz answers 503
and a new chat 503 shutting_down (not a refused connection) while a long stream still runs; the
stream ends with its terminal event at the end of the grace; the process exits by itself, with
the exit code the README documents. With two workers, requests reach both, /metrics (whichever
worker answers) counts them all (note 13), and the shared metrics directory is gone after the exit."""

from __future__ import annotations

import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fake_model import FakeModel
from tests.helpers import ROOT, Service, scrape
from tests.spec import assert_error_response, validate
from tests.test_lifecycle import open_stream

pytestmark = pytest.mark.slow  # each launcher started and drained: 15-20 s apiece on a busy machine

UVICORN = [sys.executable, "-m", "uvicorn", "chatsvc:app", "--app-dir", str(ROOT), "--port", "{port}"]
#: command, settings, worker processes, exit status after the drain (negative: killed by that signal)
LAUNCHERS: dict[str, tuple[list[str] | None, dict[str, str], int, int]] = {
    "python chatsvc.py": (None, {}, 1, 0),
    "WORKERS=2 python chatsvc.py": (None, {"WORKERS": "2"}, 2, 0),
    # uvicorn re-raises the SIGTERM it caught once it has shut down, as it does for any app.
    "uvicorn chatsvc:app": (UVICORN, {}, 1, -signal.SIGTERM),
    "uvicorn chatsvc:app --workers 2": ([*UVICORN, "--workers", "2"], {}, 2, 0),
}


def records(svc: Service, event: str) -> list[dict[str, Any]]:
    return [r for r in svc.logs() if r["event"] == event]


def wait_for_records(svc: Service, event: str, count: int, limit: float = 30) -> list[dict[str, Any]]:
    """Until `count` records of this event are in the log (one per worker, say)."""
    deadline = time.monotonic() + limit
    while len(found := records(svc, event)) < count:
        assert time.monotonic() < deadline, f"{len(found)} {event!r} records, not {count}: {svc.output()[-3000:]}"
        time.sleep(0.02)  # a child's log file: there is no event to await
    return found


def metric_dirs(svc: Service) -> list[Path]:
    """The metrics directory the workers of this supervisor share (note 13)."""
    assert svc.proc is not None
    return list(Path(tempfile.gettempdir()).glob(f"chatsvc-metrics-{svc.proc.pid}-*"))


def assert_counted(svc: Service, sent: int) -> None:
    """/metrics counts every chat sent, whichever worker served it and whichever answers the scrape.
    A stream is counted just after its last event is sent: the first scrapes may come before."""
    deadline = time.monotonic() + 10
    while True:
        counted = [scrape(svc).value("chatsvc_requests_total", default=0, code="ok") for _ in range(6)]
        if counted == [sent] * 6 or time.monotonic() > deadline:
            break
        time.sleep(0.05)  # a count in another process: there is no event to await
    assert counted == [sent] * 6


def answered(request: Callable[[], httpx.Response]) -> httpx.Response:
    """A request during a drain with several workers: the worker that had no stream exits at once,
    and a connection it accepted just before it stopped listening is closed unanswered (uvicorn
    closes a connection whose request it has not begun), as a load balancer would see and retry.
    Retried on that alone, a few times; the answer, when one comes, is what is checked."""
    for _ in range(4):
        try:
            return request()
        except httpx.RemoteProtocolError:
            continue
    return request()


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_sigterm_drains_under_every_launcher(launcher: str, fake_model: FakeModel, tmp_path: Path) -> None:
    command, settings, workers, exit_status = LAUNCHERS[launcher]
    env = {"OPENAI_BASE_URL": fake_model.base_url, "SHUTDOWN_GRACE_S": "2", "IDLE_TIMEOUT_S": "60", **settings}
    svc = Service(env, tmp_path, command).start()
    try:
        pids = {r["pid"] for r in wait_for_records(svc, "service_started", workers)}
        assert len(pids) == workers
        # The kernel hands each connection to whichever worker accepts it first.
        served: set[int] = set()
        sent = 0
        while sent < 4 or (served != pids and sent < 200):
            rid = f"spread-{sent}"
            assert svc.chat({"message": "hi"}, {"X-Request-ID": rid})[0].status_code == 200
            served.add(svc.wait_for_log("request_completed", rid)["pid"])
            sent += 1
        assert served == pids, "requests reached only one worker"
        assert_counted(svc, sent)
        assert len(metric_dirs(svc)) == (1 if workers > 1 else 0)

        with open_stream(svc, "fake:deltas=5,stall_after=1", "drain-long") as (_, events):
            assert next(events).event == "meta"
            assert next(events).event == "delta"
            signalled = time.monotonic()
            svc.signal(signal.SIGTERM)
            draining = wait_for_records(svc, "draining", workers)
            ready = answered(lambda: httpx.get(f"{svc.url}/readyz"))
            ready_after = time.monotonic() - signalled
            assert_error_response(ready, 503, "shutting_down")
            refused = answered(lambda: httpx.post(f"{svc.url}/chat", json={"message": "hi"}))
            assert_error_response(refused, 503, "shutting_down")
            assert "retry-after" in refused.headers
            if workers == 1:  # with several, the drain's age is published once a second (note 13)
                assert scrape(svc).value("chatsvc_drain_seconds") > 0
            rest = list(events)
        print(f"\n{launcher}: /readyz 503 {ready_after * 1000:.0f} ms after SIGTERM")
        assert {r["pid"] for r in draining} == pids  # every worker drained
        assert rest[-1].event == "error"
        validate("ErrorEvent", rest[-1].data)
        assert rest[-1].data["code"] == "shutting_down"
        assert svc.proc is not None
        assert svc.proc.wait(timeout=30) == exit_status
        assert len(records(svc, "service_stopped")) == workers
        assert metric_dirs(svc) == []  # removed by the last worker out
    finally:
        svc.stop()
