"""OpenTelemetry traces (note 14): chatsvc exports with the real OTLP/HTTP exporter to a loopback
receiver that decodes opentelemetry-proto (tests/otlp_receiver.py). The span tree, the GenAI
attributes, the trace context the fake model server received, the ids on the log lines, links from
resumes, failures, and that no secret or user text is in any span; and, with no OTel variable set,
that the SDK is not even loaded."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fake_model import FakeModel
from tests.helpers import ROOT, Service, StartService, iter_sse
from tests.otlp_receiver import OTLPReceiver, Span

SERVICE_KEY = "svc-key-for-tracing-0123456789"
UPSTREAM_KEY = "sk-test-key-not-real-000000"  # conftest's OPENAI_API_KEY


@pytest.fixture(scope="module")
def receiver() -> Iterator[OTLPReceiver]:
    receiver = OTLPReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def traced(start_module_service: StartService, receiver: OTLPReceiver) -> Service:
    svc: Service = start_module_service(
        OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
        OTEL_BSP_SCHEDULE_DELAY="50",  # export within 50 ms, not the default 5 s
        OTEL_SERVICE_NAME="chatsvc-under-test",
        SERVICE_API_KEYS=SERVICE_KEY,
        RESUME_GRACE_S="30",
    )
    return svc


def traceparent() -> tuple[str, str, str]:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{parent_id}-01", trace_id, parent_id


def chat(svc: Service, message: str, rid: str, **headers: str) -> httpx.Response:
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "POST",
            f"{svc.url}/chat",
            json={"message": message},
            headers={"X-Request-ID": rid, "Authorization": f"Bearer {SERVICE_KEY}", **headers},
        ) as response,
    ):
        response.read()
    return response


def upstream_request(fake_model: FakeModel, rid: str) -> dict[str, str]:
    return next(r.headers for r in fake_model.requests if r.headers.get("x-client-request-id") == rid)


def spans_named(receiver: OTLPReceiver, trace_id: str, *names: str) -> dict[str, Span]:
    def found(_: list[Span]) -> dict[str, Span] | None:
        spans = {s.name: s for s in receiver.trace(trace_id)}
        return spans if all(name in spans for name in names) else None

    result: dict[str, Span] = receiver.wait_for(found)
    return result


def test_a_chat_continues_the_callers_trace_and_forwards_it_to_the_model(
    traced: Service, receiver: OTLPReceiver, fake_model: FakeModel
) -> None:
    header, trace_id, parent_id = traceparent()
    response = chat(traced, "fake:text=alpha|beta|gamma", "trace-1", traceparent=header, tracestate="vendor=blue")
    assert response.status_code == 200
    spans = spans_named(receiver, trace_id, "POST /chat", "chat gpt-4o-mini")
    server, upstream = spans["POST /chat"], spans["chat gpt-4o-mini"]

    assert (server.kind, server.parent_span_id) == ("SERVER", parent_id)
    assert server.attributes["http.request.method"] == "POST"
    assert server.attributes["http.route"] == "/chat"
    assert server.attributes["http.response.status_code"] == 200
    assert server.resource["service.name"] == "chatsvc-under-test"

    assert (upstream.kind, upstream.parent_span_id, upstream.status) == ("CLIENT", server.span_id, "UNSET")
    assert upstream.attributes["gen_ai.operation.name"] == "chat"
    assert upstream.attributes["gen_ai.provider.name"] == "openai"
    assert upstream.attributes["gen_ai.request.model"] == "gpt-4o-mini"
    assert upstream.attributes["gen_ai.request.max_tokens"] == 2000
    assert upstream.attributes["gen_ai.response.finish_reasons"] == ["stop"]
    assert upstream.attributes["chatsvc.outcome"] == "ok"
    assert upstream.attributes["chatsvc.upstream.retries"] == 0
    assert upstream.attributes["server.address"] == "127.0.0.1"
    assert upstream.attributes["chatsvc.upstream.name"] == "default"
    done = traced.wait_for_log("request_completed", "trace-1")
    assert upstream.attributes["gen_ai.usage.input_tokens"] == done["prompt_tokens"]
    assert upstream.attributes["gen_ai.usage.output_tokens"] == done["completion_tokens"]
    assert upstream.attributes["chatsvc.usage.source"] == done["usage_source"]
    assert [name for name, _ in upstream.events] == ["first_token"]
    assert upstream.attributes["gen_ai.response.time_to_first_chunk"] > 0

    # The model server's own spans would join: it got the upstream span as parent, and the state.
    sent = upstream_request(fake_model, "trace-1")
    assert sent["traceparent"] == f"00-{trace_id}-{upstream.span_id}-01"
    assert sent["tracestate"] == "vendor=blue"


def test_every_log_line_of_a_request_carries_its_trace_and_span(traced: Service, receiver: OTLPReceiver) -> None:
    header, trace_id, _ = traceparent()
    chat(traced, "fake:deltas=3", "trace-logs", traceparent=header)
    spans = spans_named(receiver, trace_id, "POST /chat", "chat gpt-4o-mini")
    traced.wait_for_log("request_completed", "trace-logs")
    lines = traced.logs_for("trace-logs")
    assert len(lines) >= 4
    assert {line.get("trace_id") for line in lines} == {trace_id}
    by_event = {line["event"]: line["span_id"] for line in lines}
    assert by_event["request_received"] == spans["POST /chat"].span_id
    assert by_event["chat_request"] == spans["POST /chat"].span_id
    # The upstream span's lines: the producer's, and the opening's.
    assert by_event["first_token"] == spans["chat gpt-4o-mini"].span_id
    assert by_event["request_completed"] == spans["chat gpt-4o-mini"].span_id


def test_without_a_valid_traceparent_a_new_trace_starts(traced: Service, receiver: OTLPReceiver) -> None:
    for rid, headers in (("trace-none", {}), ("trace-bad", {"traceparent": "00-zz-not-a-trace-01"})):
        chat(traced, "fake:deltas=2", rid, **headers)
        line = traced.wait_for_log("request_completed", rid)
        spans = spans_named(receiver, line["trace_id"], "POST /chat", "chat gpt-4o-mini")
        assert spans["POST /chat"].parent_span_id == ""
        assert spans["chat gpt-4o-mini"].parent_span_id == spans["POST /chat"].span_id


def test_no_secret_or_user_text_is_in_any_span(traced: Service, receiver: OTLPReceiver) -> None:
    header, trace_id, _ = traceparent()
    marker, answer = "user-words-" + secrets.token_hex(4), "model-words-" + secrets.token_hex(4)
    chat(traced, f"fake:text={answer}|x,{marker}", "trace-secret", traceparent=header)
    response = chat(traced, "fake:status=500", "trace-secret-2", traceparent=header)
    assert response.status_code == 502
    spans = receiver.wait_for(lambda _: len(receiver.trace(trace_id)) >= 3 and receiver.trace(trace_id))
    dumped = json.dumps([s.__dict__ for s in spans], default=str)
    for leak in (marker, answer, SERVICE_KEY, UPSTREAM_KEY, "Bearer", "fake:"):
        assert leak not in dumped
    # A stream's id is its capability without SERVICE_API_KEYS: not in traces either.
    stream_id = traced.wait_for_log("request_completed", "trace-secret")["stream_id"]
    assert len(stream_id) == 32
    assert stream_id not in dumped


@pytest.mark.parametrize(
    ("message", "status", "exception", "server_status"),
    [
        # A 4xx is the caller's error, not the server's: the server span's status stays unset.
        ("fake:status=429,retry_after=100", 429, "RateLimitError", "UNSET"),
        ("fake:status=401", 502, "AuthenticationError", "ERROR"),
    ],
)
def test_a_refused_upstream_marks_the_spans_failed(
    traced: Service, receiver: OTLPReceiver, message: str, status: int, exception: str, server_status: str
) -> None:
    header, trace_id, _ = traceparent()
    response = chat(traced, message, f"trace-{status}", traceparent=header)
    assert response.status_code == status
    code = response.json()["code"]
    spans = spans_named(receiver, trace_id, "POST /chat", "chat gpt-4o-mini")
    upstream, server = spans["chat gpt-4o-mini"], spans["POST /chat"]
    assert (upstream.status, upstream.status_message) == ("ERROR", "")
    assert upstream.attributes["chatsvc.outcome"] == code
    assert upstream.attributes["error.type"] == exception  # openai's exception, never its text
    assert server.attributes["chatsvc.outcome"] == code
    assert server.attributes["error.type"] == exception
    assert server.attributes["http.response.status_code"] == status
    assert (server.status, server.status_message) == (server_status, "")


def test_a_stream_that_fails_midway_marks_the_upstream_span(traced: Service, receiver: OTLPReceiver) -> None:
    header, trace_id, _ = traceparent()
    chat(traced, "fake:deltas=5,die_after=2", "trace-die", traceparent=header)
    upstream = spans_named(receiver, trace_id, "chat gpt-4o-mini")["chat gpt-4o-mini"]
    failed = traced.wait_for_log("request_failed", "trace-die")
    assert upstream.status == "ERROR"
    assert upstream.attributes["chatsvc.outcome"] == failed["code"] == "upstream_error"
    assert upstream.attributes["error.type"] == failed["exception"] == "APIConnectionError"
    assert "gen_ai.response.finish_reasons" not in upstream.attributes


def test_a_resumes_span_links_to_the_stream_it_follows(traced: Service, receiver: OTLPReceiver) -> None:
    header, trace_id, _ = traceparent()
    auth = {"Authorization": f"Bearer {SERVICE_KEY}"}
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "POST",
            f"{traced.url}/chat",
            json={"message": "fake:deltas=20,delay=0.05"},
            headers={"traceparent": header, "X-Request-ID": "trace-resume", **auth},
        ) as response,
    ):
        stream_id = response.headers["x-stream-id"]
        next(e for e in iter_sse(response) if e.event == "delta")
    traced.wait_for_log("stream_detached", "trace-resume")
    resume_header, resume_trace, _ = traceparent()
    with httpx.Client(timeout=30) as client:
        resumed = client.get(f"{traced.url}/chat/streams/{stream_id}", headers={"traceparent": resume_header, **auth})
    assert resumed.status_code == 200
    assert "event: done" in resumed.text
    upstream = spans_named(receiver, trace_id, "chat gpt-4o-mini")["chat gpt-4o-mini"]
    follower = spans_named(receiver, resume_trace, "GET /chat/streams/{stream_id}")["GET /chat/streams/{stream_id}"]
    assert follower.links == [(trace_id, upstream.span_id)]
    assert follower.attributes["http.route"] == "/chat/streams/{stream_id}"


def test_tracing_off_still_forwards_and_logs_the_callers_trace(service: Service, fake_model: FakeModel) -> None:
    header, trace_id, parent_id = traceparent()
    _, events = service.chat({"message": "hello"}, headers={"traceparent": header, "X-Request-ID": "off-1"})
    assert events[-1].event == "done"
    assert upstream_request(fake_model, "off-1")["traceparent"] == header
    line = service.wait_for_log("request_completed", "off-1")
    assert (line["trace_id"], line["span_id"]) == (trace_id, parent_id)


def test_without_a_traceparent_and_tracing_off_nothing_is_sent_or_logged(
    service: Service, fake_model: FakeModel
) -> None:
    service.chat({"message": "hello"}, headers={"X-Request-ID": "off-2"})
    assert "traceparent" not in upstream_request(fake_model, "off-2")
    assert "trace_id" not in service.wait_for_log("request_completed", "off-2")


PROBE = """
import os, sys, threading
from starlette.testclient import TestClient
import chatsvc
with TestClient(chatsvc.create_app()) as client:
    assert client.get("/healthz").status_code == 200
    # The trace SDK and the exporter: what chatsvc loads (redis-py may load the metrics SDK).
    sdk = [m for m in sys.modules if m.startswith(("opentelemetry.sdk.trace", "opentelemetry.exporter"))]
    print(len(sdk), sum(t.name.startswith("OtelBatch") for t in threading.enumerate()))
"""


@pytest.mark.slow  # a fresh interpreter per case
@pytest.mark.parametrize(
    ("env", "loaded"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:9/v1/traces"}, True),
    ],
)
def test_the_sdk_is_loaded_only_when_opentelemetry_is_configured(
    env: dict[str, str], loaded: bool, tmp_path: Any
) -> None:
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**base, "PYTHONPATH": str(ROOT), "OPENAI_BASE_URL": "http://127.0.0.1:9/v1", **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    modules, threads = map(int, done.stdout.split())
    assert (modules > 0, threads) == (loaded, int(loaded))
