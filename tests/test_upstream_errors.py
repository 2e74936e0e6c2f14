"""Upstream failures: each maps to its code and status, retries stay within the budget, and the three
clocks (idle, budget, connect) end what they should."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tests.fake_model import FakeModel
from tests.helpers import Service, StartService, free_port
from tests.spec import assert_error, assert_error_response, validate


@pytest.fixture(scope="module")
def no_retry(start_module_service: StartService) -> Service:
    svc: Service = start_module_service(UPSTREAM_MAX_RETRIES="0")
    return svc


@pytest.fixture(scope="module")
def quick(start_module_service: StartService) -> Service:
    """Short clocks: 0.5 s of silence is too long, 2 s is the whole budget."""
    svc: Service = start_module_service(IDLE_TIMEOUT_S="0.5", REQUEST_TIMEOUT_S="2", UPSTREAM_MAX_RETRIES="0")
    return svc


@pytest.mark.parametrize(
    ("status", "code", "http"),
    [
        (400, "upstream_error", 502),
        (404, "upstream_error", 502),
        (500, "upstream_error", 502),
        (503, "upstream_error", 502),
        (401, "upstream_auth", 502),
        (403, "upstream_auth", 502),
        (429, "rate_limited", 429),
    ],
)
def test_upstream_status_maps_to_our_code(no_retry: Service, status: int, code: str, http: int) -> None:
    response, _ = no_retry.chat({"message": f"fake:status={status}"}, {"X-Request-ID": f"st-{status}"})

    assert response.status_code == http
    body = response.json()
    assert_error(body, code, f"st-{status}")
    assert str(status) in body["detail"]
    assert "sk-leakedkey" not in response.text  # the upstream's message (which held a key) is not passed on


def test_upstream_auth_failure_tells_the_operator_what_to_check(no_retry: Service) -> None:
    response, _ = no_retry.chat({"message": "fake:status=401"})
    assert "OPENAI_API_KEY" in response.json()["action"]
    assert response.json()["retryable"] is False


def test_rate_limit_passes_retry_after_on(no_retry: Service) -> None:
    response, _ = no_retry.chat({"message": "fake:status=429,retry_after=7"})

    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert response.json()["retryable"] is True


def test_retries_recover_from_transient_failures(service: Service, fake_model: FakeModel) -> None:
    before = len(fake_model.requests)
    response, events = service.chat({"message": "fake:status=503,fail_times=2,key=recover"}, {"X-Request-ID": "rt-1"})

    assert response.status_code == 200
    assert events[-1].event == "done"
    assert len(fake_model.requests) - before == 3
    assert service.wait_for_log("upstream_opened", "rt-1")["retries"] == 2


def test_retries_stop_at_upstream_max_retries(service: Service, fake_model: FakeModel) -> None:
    before = len(fake_model.requests)
    response, _ = service.chat({"message": "fake:status=500,fail_times=5,key=exhaust"})

    assert response.status_code == 502
    assert len(fake_model.requests) - before == 3  # the try and UPSTREAM_MAX_RETRIES=2 retries


def test_client_errors_are_not_retried(service: Service, fake_model: FakeModel) -> None:
    before = len(fake_model.requests)
    response, _ = service.chat({"message": "fake:status=400,fail_times=5,key=noretry"})

    assert response.status_code == 502
    assert len(fake_model.requests) - before == 1


def test_no_retry_when_the_wait_would_break_the_budget(service: Service, fake_model: FakeModel) -> None:
    """Retry-After 100 s does not fit in the 30 s budget: answer 429 at once, do not sleep on it."""
    before = len(fake_model.requests)
    response, _ = service.chat({"message": "fake:status=429,retry_after=100,fail_times=5,key=budget"})

    assert response.status_code == 429
    assert response.headers["retry-after"] == "100"
    assert len(fake_model.requests) - before == 1


def test_unreachable_upstream_is_504(start_service: StartService) -> None:
    dead = start_service(OPENAI_BASE_URL=f"http://127.0.0.1:{free_port()}/v1", UPSTREAM_MAX_RETRIES="0")
    response, _ = dead.chat({"message": "hi"})

    assert_error_response(response, 504, "upstream_unreachable")
    assert "could not connect" in response.json()["detail"]


def test_hang_up_before_headers_is_named_not_called_a_timeout(no_retry: Service) -> None:
    """openai's aiohttp transport reports every aiohttp connection error as httpx's ConnectTimeout;
    a server that hangs up at once must not be reported as slow."""
    response, _ = no_retry.chat({"message": "fake:reset_before_headers=1"})

    assert_error_response(response, 504, "upstream_unreachable")
    detail = response.json()["detail"]
    assert "CONNECT_TIMEOUT_S" not in detail
    assert "closed the connection" in detail or "Disconnected" in detail


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A loopback port where connecting hangs: a listener that never accepts, its backlog full."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    queued = []
    for _ in range(4):
        client = socket.socket()
        client.setblocking(False)
        client.connect_ex(("127.0.0.1", port))
        queued.append(client)
    yield port
    for sock in [*queued, listener]:
        sock.close()


def test_connect_that_hangs_is_cut_at_connect_timeout(start_service: StartService, black_hole: int) -> None:
    svc: Service = start_service(
        OPENAI_BASE_URL=f"http://127.0.0.1:{black_hole}/v1", CONNECT_TIMEOUT_S="0.5", UPSTREAM_MAX_RETRIES="0"
    )
    response, _ = svc.chat({"message": "hi"})

    assert_error_response(response, 504, "upstream_unreachable")
    assert "CONNECT_TIMEOUT_S" in response.json()["detail"]


def test_silence_before_headers_is_504_upstream_timeout(quick: Service) -> None:
    response, _ = quick.chat({"message": "fake:header_delay=1.5"})

    assert_error_response(response, 504, "upstream_timeout")


@pytest.mark.parametrize("after", [0, 2])
def test_silence_in_the_stream_is_an_upstream_timeout_event(quick: Service, fake_model: FakeModel, after: int) -> None:
    """Before the first token (after=0) and after some (after=2)."""
    response, events = quick.chat({"message": f"fake:deltas=5,stall_after={after}"})

    assert response.status_code == 200
    assert events[-1].event == "error"
    validate("ErrorEvent", events[-1].data)
    assert events[-1].data["code"] == "upstream_timeout"
    assert events[-1].data["usage"]["completion_tokens"] == after
    assert fake_model.last().closed.wait(5), "the stalled upstream connection was not closed"


def test_stream_past_the_budget_ends_with_deadline_exceeded(quick: Service) -> None:
    """A slow drip never goes silent for IDLE_TIMEOUT_S, but the whole budget runs out."""
    response, events = quick.chat({"message": "fake:deltas=100,delay=0.1"})

    assert response.status_code == 200
    assert events[-1].event == "error"
    assert events[-1].data["code"] == "deadline_exceeded"
    assert 0 < len([e for e in events if e.event == "delta"]) < 100
