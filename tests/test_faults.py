"""The fault matrix: every upstream fault crossed with every client behaviour.

For every cell: the client gets the documented status or exactly one terminal event (unless it
left), the upstream connection is closed, the service is back to the open descriptors and asyncio
tasks it had before, and the logs hold exactly one request_completed, request_failed or
client_disconnected line for the request.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest

from tests import loadgen
from tests.fake_model import FakeModel
from tests.helpers import Service, StartService, free_port, scrape
from tests.spec import assert_error, validate

pytestmark = pytest.mark.slow  # a matrix of some 60 cells, each waiting for the service to settle

OUTCOMES = ("request_completed", "request_failed", "client_disconnected")


@dataclass(frozen=True)
class Status:
    status: int
    code: str
    retry_after: str | None = None


@dataclass(frozen=True)
class Terminal:
    event: str
    code: str | None  # the error code, or the finish_reason of done
    text: str


FAULTS: dict[str, tuple[str, Status | Terminal]] = {
    "status_500": ("fake:status=500", Status(502, "upstream_error")),
    "status_503_retry_after": ("fake:status=503,retry_after=2", Status(502, "upstream_error")),
    "status_429_retry_after": ("fake:status=429,retry_after=3", Status(429, "rate_limited", "3")),
    "status_429_no_retry_after": ("fake:status=429", Status(429, "rate_limited", "1")),
    "connection_refused": ("hi", Status(504, "upstream_unreachable")),
    "reset_before_headers": ("fake:reset_before_headers=1", Status(504, "upstream_unreachable")),
    "reset_mid_stream": ("fake:deltas=6,die_after=3", Terminal("error", "upstream_error", "w0 w1 w2 ")),
    "stall_before_first_token": ("fake:deltas=3,stall_after=0", Terminal("error", "upstream_timeout", "")),
    "stall_after_first_token": ("fake:deltas=3,stall_after=1", Terminal("error", "upstream_timeout", "w0 ")),
    "slow_drip": ("fake:deltas=8,delay=0.25", Terminal("done", "stop", "".join(f"w{i} " for i in range(8)))),
    "in_band_error": ("fake:deltas=4,error_after=2", Terminal("error", "upstream_error", "w0 w1 ")),
    "invalid_json": ("fake:deltas=4,garbage_after=2", Terminal("error", "upstream_error", "w0 w1 ")),
    "truncated_frame": ("fake:deltas=4,truncate_after=2", Terminal("error", "upstream_error", "w0 w1 ")),
    "never_sends_done": ("fake:deltas=3,hang_after_finish=1", Terminal("done", "stop", "w0 w1 w2 ")),
    "huge_delta": ("fake:huge=1000000", Terminal("done", "stop", "x" * 1_000_000)),
}
BEHAVIOURS: list[loadgen.Behaviour] = ["read_all", "leave_before_first_token", "leave_mid_stream", "slow_reader"]
# RESUME_GRACE_S=0: a client that leaves ends the stream at once, as before resuming existed.
SETTINGS = {"IDLE_TIMEOUT_S": "1", "REQUEST_TIMEOUT_S": "20", "UPSTREAM_MAX_RETRIES": "0", "RESUME_GRACE_S": "0"}


@pytest.fixture(scope="module")
def matrix(start_module_service: StartService) -> Service:
    svc: Service = start_module_service(**SETTINGS)
    return svc


@pytest.fixture(scope="module")
def refused(start_module_service: StartService) -> Service:
    svc: Service = start_module_service(OPENAI_BASE_URL=f"http://127.0.0.1:{free_port()}/v1", **SETTINGS)
    return svc


def resources(service: Service) -> tuple[float, float]:
    """Open descriptors and event-loop tasks of the service, read from its /metrics."""
    metrics = scrape(service)
    return metrics.value("process_open_fds"), metrics.value("chatsvc_event_loop_tasks")


def settle(service: Service, baseline: tuple[float, float], limit: float = 10) -> tuple[float, float]:
    """Resources once the service has closed what the cell opened (closing takes a moment)."""
    deadline = time.monotonic() + limit
    while (now := resources(service)) != baseline and time.monotonic() < deadline:
        time.sleep(0.05)  # sockets close asynchronously in the service: nothing to await from here
    return now


@pytest.mark.parametrize("behaviour", BEHAVIOURS)
@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_cell(
    fault: str, behaviour: loadgen.Behaviour, matrix: Service, refused: Service, fake_model: FakeModel
) -> None:
    message, expected = FAULTS[fault]
    service = refused if fault == "connection_refused" else matrix
    service.chat({"message": "warm-up"})  # first-use costs (connection pools, imports) out of the baseline
    baseline = settle(service, resources(service), limit=2)
    seen_before = len(fake_model.requests)
    rid = f"cell-{fault}-{behaviour}"

    result = asyncio.run(loadgen.chat(service.port, {"message": message}, rid=rid, behaviour=behaviour))

    # What the client sees.
    assert result.error is None, result.error
    if isinstance(expected, Status):
        assert result.status == expected.status
        assert_error(result.json(), expected.code, rid)
        assert result.headers.get("retry-after") == expected.retry_after
    else:
        assert result.status == 200
        meta = {"correlation_id": rid, "model": "gpt-4o-mini", "stream_id": result.headers["x-stream-id"]}
        assert result.events[0] == ("meta", meta)
        if behaviour in ("read_all", "slow_reader") or result.terminals:
            assert len(result.terminals) == 1, [e[0] for e in result.events]
            name, data = result.events[-1]
            assert name == expected.event
            validate("DoneEvent" if name == "done" else "ErrorEvent", data)
            assert expected.code == (data["finish_reason"] if name == "done" else data["code"])
            assert result.text == expected.text

    # Exactly one outcome line in the logs.
    deadline = time.monotonic() + 10
    while not (lines := [r for r in service.logs_for(rid) if r["event"] in OUTCOMES]):
        assert time.monotonic() < deadline, f"no outcome line for {rid}"
        time.sleep(0.02)  # the service logs after the stream ends
    assert len(lines) == 1, lines

    # Upstream connections closed, and nothing left behind in the service.
    for seen in fake_model.requests[seen_before:]:
        assert seen.closed.wait(10), "an upstream connection stayed open"
    deadline = time.monotonic() + 10
    while fake_model.open_connections and time.monotonic() < deadline:
        time.sleep(0.02)  # the fake model's handlers end on their own loop
    assert fake_model.open_connections == 0
    assert settle(service, baseline) == baseline
