"""The stream: headers, event order and ids, deltas forwarded at once and intact, usage, and exactly
one terminal event whatever the upstream does."""

from __future__ import annotations

import re

import httpx

from tests.fake_model import UTF8_DELTAS, FakeModel, expected_text
from tests.helpers import Event, Service, StartService, iter_sse, text_of


def assert_one_terminal(events: list[Event], kind: str) -> Event:
    terminals = [e for e in events if e.event in ("done", "error")]
    assert len(terminals) == 1, [e.event for e in events]
    assert events[-1] is terminals[0]
    assert terminals[0].event == kind, terminals[0].data
    return terminals[0]


def test_stream_headers_and_event_sequence(service: Service) -> None:
    response, events = service.chat({"message": "hello"}, {"X-Request-ID": "seq-1"})

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-accel-buffering"] == "no"
    assert response.headers["x-request-id"] == "seq-1"
    stream_id = response.headers["x-stream-id"]
    assert re.fullmatch("[0-9a-f]{32}", stream_id)
    assert [e.id for e in events] == [f"{stream_id}:{i}" for i in range(len(events))]
    assert events[0].event == "meta"
    assert events[0].data == {"correlation_id": "seq-1", "model": "gpt-4o-mini", "stream_id": stream_id}
    assert text_of(events) == expected_text("hello")
    done = assert_one_terminal(events, "done")
    assert done.data["finish_reason"] == "stop"
    assert done.data["correlation_id"] == "seq-1"
    assert done.data["usage"]["source"] == "upstream"
    assert done.data["usage"]["completion_tokens"] == len([e for e in events if e.event == "delta"])
    assert done.data["ttft_ms"] > 0
    assert done.data["duration_ms"] >= done.data["ttft_ms"]


def test_usage_is_estimated_when_upstream_sends_none(service: Service) -> None:
    _, events = service.chat({"message": "fake:deltas=7,usage=0"})

    usage = assert_one_terminal(events, "done").data["usage"]
    assert usage["source"] == "estimated"
    assert usage["completion_tokens"] == 7
    assert usage["total_tokens"] == usage["prompt_tokens"] + 7
    assert usage["prompt_tokens"] > 0


def test_usage_is_requested_from_upstream(service: Service, fake_model: FakeModel) -> None:
    service.chat({"message": "hello"})

    body = fake_model.last().body
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


def test_2000_token_stream_arrives_whole_and_in_order(service: Service) -> None:
    _, events = service.chat({"message": "fake:deltas=2000"})

    assert text_of(events) == "".join(f"w{i} " for i in range(2000))
    assert assert_one_terminal(events, "done").data["usage"]["completion_tokens"] == 2000


def test_multibyte_text_split_across_deltas_and_writes_arrives_intact(service: Service) -> None:
    _, events = service.chat({"message": "fake:utf8=1"})

    assert text_of(events) == "".join(UTF8_DELTAS)
    assert_one_terminal(events, "done")


def test_delta_is_forwarded_while_upstream_is_silent(service: Service, fake_model: FakeModel) -> None:
    """The first delta must reach the client although the model sends nothing after it: nothing is
    held back waiting for more."""
    with (
        httpx.Client(timeout=10) as client,
        client.stream("POST", f"{service.url}/chat", json={"message": "fake:deltas=3,stall_after=1"}) as response,
    ):
        events = iter_sse(response)
        assert next(events).event == "meta"
        first = next(e for e in events if e.comment is None)
        assert first.event == "delta"
        assert first.data == {"content": "w0 "}
        # The upstream is still stalled, holding its connection: the delta came without it.
        assert not fake_model.last().closed.is_set()


def test_pings_flow_before_the_first_token(start_service: StartService, fake_model: FakeModel) -> None:
    svc: Service = start_service(PING_INTERVAL_S="0.2", IDLE_TIMEOUT_S="30")
    with (
        httpx.Client(timeout=10) as client,
        client.stream("POST", f"{svc.url}/chat", json={"message": "fake:stall_after=0"}) as response,
    ):
        events = iter_sse(response)
        assert next(events).event == "meta"
        # No token will come: what arrives is the keep-alive comment, twice.
        assert next(events).comment == "ping"
        assert next(events).comment == "ping"


def test_upstream_death_mid_stream_gives_error_event(service: Service) -> None:
    _, events = service.chat({"message": "fake:deltas=5,die_after=2"}, {"X-Request-ID": "die-1"})

    assert text_of(events) == "w0 w1 "
    error = assert_one_terminal(events, "error")
    assert error.data["code"] == "upstream_error"
    assert error.data["retryable"] is True
    assert error.data["correlation_id"] == "die-1"
    assert error.data["usage"]["completion_tokens"] == 2


def test_in_band_error_chunk_gives_error_event(service: Service) -> None:
    _, events = service.chat({"message": "fake:deltas=5,error_after=1"})

    error = assert_one_terminal(events, "error")
    assert error.data["code"] == "upstream_error"
    assert "boom" in error.data["detail"]  # the upstream's own error code, not its message


def test_garbage_from_upstream_gives_error_event(service: Service) -> None:
    _, events = service.chat({"message": "fake:deltas=5,garbage_after=3"})

    assert text_of(events) == "w0 w1 w2 "
    assert assert_one_terminal(events, "error").data["code"] == "upstream_error"


def test_stream_that_ends_without_finishing_is_an_error_not_done(service: Service) -> None:
    """Bug: openai's parser ends quietly when [DONE] never comes. Fix: no finish_reason, no done."""
    _, events = service.chat({"message": "fake:deltas=4,no_finish=1"})

    assert text_of(events) == "w0 w1 w2 w3 "
    assert assert_one_terminal(events, "error").data["code"] == "upstream_error"


def test_upstream_refusal_before_the_stream_is_an_http_status(service: Service) -> None:
    """The 200 is committed only once the model server accepted the request."""
    response, events = service.chat({"message": "fake:status=400"})

    assert response.status_code == 502
    assert events == []
    assert response.json()["code"] == "upstream_error"
