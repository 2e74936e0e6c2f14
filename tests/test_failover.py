"""Several model servers (UPSTREAMS): before the first content, a failure that another server could
fix moves the stream to the next; after it, never. The client sees exactly one answer from one
server, and `done` names it. Each server is a fake of its own that fails its own way (`forced`).
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fake_model import FakeModel, expected_text
from tests.helpers import Event, Service, StartService, free_port, iter_sse, scrape, text_of
from tests.test_ai_sdk import message_text, sdk, user
from tests.test_js_clients import node

pytestmark = pytest.mark.slow

ANSWER = "fake:deltas=5"
CALLER_KEY = "sk-upstream-b-secret-0000000000"


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, FakeModel]]:
    fakes = {name: FakeModel().start() for name in "abc"}
    yield fakes
    for fake in fakes.values():
        fake.stop()


@pytest.fixture(autouse=True)
def healthy(servers: dict[str, FakeModel]) -> None:
    """Each test starts with every server answering."""
    for fake in servers.values():
        fake.forced = {}
        fake.healthy = True


def upstreams(servers: dict[str, FakeModel], **per_server: dict[str, Any]) -> str:
    return json.dumps(
        [
            {
                "name": name,
                "base_url": fake.base_url,
                "health_url": f"{fake.base_url}/models",
                **per_server.get(name, {}),
            }
            for name, fake in servers.items()
        ]
    )


@pytest.fixture(scope="module")
def chatsvc(start_module_service: StartService, servers: dict[str, FakeModel]) -> Service:
    # A first server that serves only other-model and refuses connections: its port is closed.
    closed = f"http://127.0.0.1:{free_port()}/v1"
    gone = {"name": "gone", "base_url": closed, "health_url": f"{closed}/models", "models": ["other-model"]}
    listed = [gone, *json.loads(upstreams(servers, a={"first_token_timeout_s": 1}, b={"api_key": CALLER_KEY}))]
    svc: Service = start_module_service(
        UPSTREAMS=json.dumps(listed),
        OPENAI_BASE_URL="<unset>",
        OPENAI_API_KEY="<unset>",
        ALLOWED_MODELS="gpt-4o-mini,other-model",
        IDLE_TIMEOUT_S="2",
        UPSTREAM_MAX_RETRIES="0",
        LOG_LEVEL="DEBUG",  # the request headers as sent are logged: the key must not be
    )
    return svc


def only_upstreams(
    start: StartService, servers: dict[str, FakeModel], per_server: dict[str, dict[str, Any]] | None = None, **env: str
) -> Service:
    """chatsvc with these servers as its UPSTREAMS, in place of the tests' OPENAI_*."""
    return start(
        UPSTREAMS=upstreams(servers, **(per_server or {})), OPENAI_BASE_URL="<unset>", OPENAI_API_KEY="<unset>", **env
    )


def requests_seen(servers: dict[str, FakeModel]) -> dict[str, int]:
    return {name: len(fake.requests) for name, fake in servers.items()}


def asked_since(servers: dict[str, FakeModel], before: dict[str, int]) -> dict[str, int]:
    """How many requests each server got since `before` (a `requests_seen`)."""
    return {name: seen - before[name] for name, seen in requests_seen(servers).items()}


def chat(svc: Service, request_id: str, **body: Any) -> tuple[httpx.Response, list[Event]]:
    return svc.chat({"message": ANSWER, **body}, headers={"X-Request-ID": request_id})


def assert_one_answer_from(events: list[Event], upstream: str, model: str = "gpt-4o-mini") -> None:
    """Exactly one whole answer: meta, the deltas, one `done`, which names the server that answered."""
    assert [e.event for e in events if e.event != "delta"] == ["meta", "done"]
    assert text_of(events) == expected_text(ANSWER)
    assert events[-1].data["upstream"] == upstream
    assert events[-1].data["upstream_model"] == model
    stream_id = events[0].data["stream_id"]
    assert [e.id for e in events] == [f"{stream_id}:{i}" for i in range(len(events))]


FAILURES = {
    "500": {"status": "500"},
    "503": {"status": "503"},
    "429": {"status": "429", "retry_after": "1"},
    "401": {"status": "401"},
    "408": {"status": "408"},
    "reset-before-headers": {"reset_before_headers": "1"},
    "silent-before-headers": {"header_delay": "6"},  # IDLE_TIMEOUT_S (2 s) on the headers
    "stall-before-first-token": {"stall_after": "0"},  # a's first_token_timeout_s (1 s)
    "no-content": {"deltas": "0", "no_finish": "1"},
    "error-before-content": {"error_after": "0"},
    "garbage-before-content": {"garbage_after": "0"},
    "cut-before-content": {"truncate_after": "0"},
}


@pytest.mark.parametrize("failure", list(FAILURES))
def test_a_failure_before_the_first_token_moves_the_stream_to_the_next(
    chatsvc: Service, servers: dict[str, FakeModel], failure: str
) -> None:
    servers["a"].forced = FAILURES[failure]
    before = requests_seen(servers)

    response, events = chat(chatsvc, f"fo-{failure}")

    assert response.status_code == 200
    assert_one_answer_from(events, "b")
    assert asked_since(servers, before) == {"a": 1, "b": 1, "c": 0}
    failed = chatsvc.wait_for_log("upstream_failed", f"fo-{failure}")
    assert (failed["upstream"], failed["next"]) == ("a", True)
    completed = chatsvc.wait_for_log("request_completed", f"fo-{failure}")
    assert completed["upstream"] == "b"


@pytest.mark.parametrize("failure", ["503", "stall-before-first-token", "no-content"])
def test_real_clients_see_one_answer_after_a_failover(
    chatsvc: Service, servers: dict[str, FakeModel], failure: str
) -> None:
    """fetch-event-source on /chat, and the AI SDK's transport on /api/chat, as useChat reads it."""
    servers["a"].forced = FAILURES[failure]

    result = node("fetch_event_source.mjs", f"{chatsvc.url}/chat", ANSWER)

    assert (result["statuses"], result["errors"]) == ([200], 0)
    events = [Event(event=e["event"], id=e["id"], data=e["data"]) for e in result["events"]]
    assert_one_answer_from(events, "b")

    answer = sdk(chatsvc.url, f"fo-sdk-{failure}", [user(ANSWER)])

    assert answer["errors"] == []
    assert message_text(answer["message"]) == expected_text(ANSWER)
    assert answer["reads"][0].count("start") == answer["reads"][0].count("finish") == 1
    assert answer["message"]["metadata"]["upstream"] == "b"


def test_a_request_sent_again_with_its_key_gets_the_answer_of_the_server_that_answered(
    chatsvc: Service, servers: dict[str, FakeModel]
) -> None:
    servers["a"].forced = {"status": "503"}
    before = requests_seen(servers)
    key = {"Idempotency-Key": "fo-idem-1"}

    _, first = chatsvc.chat({"message": ANSWER}, headers={**key, "X-Request-ID": "fo-idem-1"})
    servers["a"].forced = {}  # a is back: the answer sent again is still b's, not a new one
    _, again = chatsvc.chat({"message": ANSWER}, headers={**key, "X-Request-ID": "fo-idem-2"})

    assert_one_answer_from(first, "b")
    assert [(e.id, e.event, e.data) for e in again] == [(e.id, e.event, e.data) for e in first]
    assert asked_since(servers, before) == {"a": 1, "b": 1, "c": 0}


def test_a_refused_connection_moves_the_stream_to_the_next(chatsvc: Service, servers: dict[str, FakeModel]) -> None:
    before = requests_seen(servers)

    response, events = chat(chatsvc, "fo-refused", model="other-model")

    assert response.status_code == 200
    assert_one_answer_from(events, "a", model="other-model")
    assert asked_since(servers, before) == {"a": 1, "b": 0, "c": 0}
    failed = chatsvc.wait_for_log("upstream_failed", "fo-refused")
    assert (failed["upstream"], failed["code"]) == ("gone", "upstream_unreachable")


def test_a_failure_after_the_first_token_never_moves_the_stream(
    chatsvc: Service, servers: dict[str, FakeModel]
) -> None:
    servers["a"].forced = {"die_after": "2"}
    before = requests_seen(servers)

    response, events = chat(chatsvc, "fo-after-content")

    assert response.status_code == 200
    assert [e.event for e in events if e.event != "delta"] == ["meta", "error"]
    assert text_of(events) == "w0 w1 "
    assert events[-1].data["code"] == "upstream_error"
    assert asked_since(servers, before) == {"a": 1, "b": 0, "c": 0}


def test_a_refusal_of_the_request_itself_is_not_tried_elsewhere(
    chatsvc: Service, servers: dict[str, FakeModel]
) -> None:
    servers["a"].forced = {"status": "400"}
    before = requests_seen(servers)

    response, _ = chat(chatsvc, "fo-400")

    assert response.status_code == 502
    assert response.json()["code"] == "upstream_error"
    assert asked_since(servers, before) == {"a": 1, "b": 0, "c": 0}


def test_when_every_server_fails_before_the_headers_one_error_names_the_last(
    chatsvc: Service, servers: dict[str, FakeModel]
) -> None:
    for name, status in zip("abc", ("500", "429", "503"), strict=True):
        servers[name].forced = {"status": status}
    before = requests_seen(servers)

    response, _ = chat(chatsvc, "fo-all-refuse")

    assert response.status_code == 502
    body = response.json()
    assert body["code"] == "upstream_error"
    assert body["detail"] == "the model server answered 503 (fake_code) (upstream c, after 3 attempts)"
    assert asked_since(servers, before) == {"a": 1, "b": 1, "c": 1}


def test_when_every_server_fails_before_the_first_token_one_error_event_ends_the_stream(
    chatsvc: Service, servers: dict[str, FakeModel]
) -> None:
    servers["a"].forced = {"stall_after": "0"}
    servers["b"].forced = {"deltas": "0", "no_finish": "1"}
    servers["c"].forced = {"error_after": "0"}
    before = requests_seen(servers)

    response, events = chat(chatsvc, "fo-all-fail")

    assert response.status_code == 200
    assert [e.event for e in events] == ["meta", "error"]
    error = events[-1].data
    assert error["code"] == "upstream_error"
    assert error["detail"].endswith("(upstream c, after 3 attempts)")
    assert asked_since(servers, before) == {"a": 1, "b": 1, "c": 1}
    failed = [r for r in chatsvc.logs_for("fo-all-fail") if r["event"] == "upstream_failed"]
    assert [(r["upstream"], r["next"]) for r in failed] == [("a", True), ("b", True), ("c", False)]


def test_a_server_is_sent_its_own_name_for_the_model(
    start_service: StartService, servers: dict[str, FakeModel]
) -> None:
    svc = only_upstreams(start_service, servers, {"a": {"models": {"gpt-4o-mini": "their-mini"}}})
    response, events = chat(svc, "fo-mapped")

    assert response.status_code == 200
    assert_one_answer_from(events, "a", model="their-mini")
    assert servers["a"].last().body["model"] == "their-mini"


def test_the_upstream_key_is_sent_to_its_server_alone_and_never_logged(
    chatsvc: Service, servers: dict[str, FakeModel]
) -> None:
    servers["a"].forced = {"status": "503"}

    response, events = chat(chatsvc, "fo-key")

    assert response.status_code == 200
    assert_one_answer_from(events, "b")
    assert servers["b"].last().headers["authorization"] == f"Bearer {CALLER_KEY}"
    assert CALLER_KEY not in servers["a"].last().headers.get("authorization", "")
    chatsvc.wait_for_log("request_completed", "fo-key")
    assert CALLER_KEY not in chatsvc.output()
    assert servers["a"].base_url not in json.dumps(events[-1].data)


def test_metrics_count_attempts_by_server_and_result(chatsvc: Service, servers: dict[str, FakeModel]) -> None:
    before = scrape(chatsvc)
    servers["a"].forced = {"status": "500"}

    chat(chatsvc, "fo-metrics")

    after = scrape(chatsvc)
    for upstream, result in (("a", "upstream_error"), ("b", "ok")):
        counted = after.value("chatsvc_upstream_attempts_total", upstream=upstream, result=result)
        assert (
            counted == before.value("chatsvc_upstream_attempts_total", upstream=upstream, result=result, default=0) + 1
        )
    assert after.value("chatsvc_upstream_circuit_open", upstream="a") == 0  # no breaker here


def test_readyz_is_ready_while_any_server_is(chatsvc: Service, servers: dict[str, FakeModel]) -> None:
    servers["a"].healthy = False
    servers["b"].healthy = False
    assert httpx.get(f"{chatsvc.url}/readyz").status_code == 200  # c answers

    servers["c"].healthy = False
    refused = httpx.get(f"{chatsvc.url}/readyz")
    assert refused.status_code == 503
    assert refused.json()["code"] == "upstream_unreachable"


# The circuit breaker -----------------------------------------------------------------------------

COOLDOWN_S = 1.0


@pytest.fixture
def guarded(start_service: StartService, servers: dict[str, FakeModel]) -> Service:
    svc: Service = only_upstreams(
        start_service,
        servers,
        UPSTREAM_MAX_RETRIES="0",
        BREAKER_FAILURES="2",
        BREAKER_WINDOW_S="60",
        BREAKER_COOLDOWN_S=str(COOLDOWN_S),
    )
    return svc


def test_the_breaker_opens_skips_and_closes_again(guarded: Service, servers: dict[str, FakeModel]) -> None:
    a = servers["a"]
    a.forced = {"status": "500"}
    for i in range(2):  # two failures within the window: a's breaker opens
        _, events = chat(guarded, f"br-fail-{i}")
        assert_one_answer_from(events, "b")
    guarded.wait_for_log("upstream_circuit_open")
    assert scrape(guarded).value("chatsvc_upstream_circuit_open", upstream="a") == 1

    tried = len(a.requests)
    _, events = chat(guarded, "br-skipped")
    assert_one_answer_from(events, "b")
    assert len(a.requests) == tried  # skipped, not asked
    assert guarded.wait_for_log("upstream_skipped", "br-skipped")["upstream"] == "a"

    # After the cool-down, one request tries a again; it fails: the breaker opens once more.
    time.sleep(COOLDOWN_S)  # a stretch of time is what is tested: there is no event to await
    _, events = chat(guarded, "br-trial-fails")
    assert_one_answer_from(events, "b")
    assert len(a.requests) == tried + 1
    _, events = chat(guarded, "br-skipped-again")
    assert len(a.requests) == tried + 1

    # a recovers: after the cool-down its trial answers, and the breaker closes.
    a.forced = {}
    time.sleep(COOLDOWN_S)
    _, events = chat(guarded, "br-trial-answers")
    assert_one_answer_from(events, "a")
    guarded.wait_for_log("upstream_circuit_closed", "br-trial-answers")
    assert scrape(guarded).value("chatsvc_upstream_circuit_open", upstream="a") == 0
    _, events = chat(guarded, "br-closed")
    assert_one_answer_from(events, "a")


def test_with_every_breaker_open_a_chat_is_refused_at_once_and_readyz_says_so(
    start_service: StartService, fake_model: FakeModel
) -> None:
    svc = start_service(UPSTREAM_MAX_RETRIES="0", BREAKER_FAILURES="1", BREAKER_COOLDOWN_S="60")
    refused, _ = svc.chat({"message": "fake:status=503"})
    assert refused.status_code == 502
    seen = len(fake_model.requests)

    response, _ = svc.chat({"message": ANSWER})

    assert response.status_code == 503
    assert response.json()["code"] == "upstream_unavailable"
    assert 1 <= int(response.headers["retry-after"]) <= 60
    assert len(fake_model.requests) == seen
    assert httpx.get(f"{svc.url}/readyz").status_code == 503


# Budgets, drains, rounds ------------------------------------------------------------------------


def test_a_request_out_of_time_blames_no_server_it_did_not_ask(
    start_service: StartService, servers: dict[str, FakeModel]
) -> None:
    """a holds its headers past the whole budget: the request ends, and b and c, never asked, are
    not counted as failed (with BREAKER_FAILURES=1 their breakers would open)."""
    svc = only_upstreams(
        start_service,
        servers,
        REQUEST_TIMEOUT_S="1.5",
        IDLE_TIMEOUT_S="10",
        UPSTREAM_MAX_RETRIES="0",
        BREAKER_FAILURES="1",
        BREAKER_COOLDOWN_S="60",
    )
    servers["a"].forced = {"header_delay": "5"}
    before = requests_seen(servers)

    response, _ = chat(svc, "fo-budget")

    assert response.status_code == 504
    assert asked_since(servers, before) == {"a": 1, "b": 0, "c": 0}
    assert [r for r in svc.logs_for("fo-budget") if r["event"] == "upstream_failed"] == []
    servers["a"].forced = {}
    _, events = chat(svc, "fo-budget-after")  # no breaker opened: a answers
    assert_one_answer_from(events, "a")


def test_a_drain_during_a_failover_ends_the_stream_with_shutting_down(
    start_service: StartService, servers: dict[str, FakeModel]
) -> None:
    """a stalls past its first-token limit; b holds its headers: the drain's grace bounds the wait
    for b as it bounds a read, and the stream ends with its one terminal event."""
    svc = only_upstreams(
        start_service,
        servers,
        {"a": {"first_token_timeout_s": 0.5}},
        IDLE_TIMEOUT_S="25",
        UPSTREAM_MAX_RETRIES="0",
        SHUTDOWN_GRACE_S="1",
    )
    servers["a"].forced = {"stall_after": "0"}
    servers["b"].forced = {"header_delay": "20"}
    headers = {"X-Request-ID": "fo-drain"}
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", f"{svc.url}/chat", json={"message": ANSWER}, headers=headers) as response,
    ):
        events = (e for e in iter_sse(response) if e.comment is None)
        got = [next(events)]
        svc.wait_for_log("upstream_failed", "fo-drain")
        svc.signal(signal.SIGTERM)
        got += list(events)

    assert [e.event for e in got] == ["meta", "error"]
    assert got[-1].data["code"] == "shutting_down"


def test_the_state_of_a_failed_attempt_is_not_the_answers(
    start_service: StartService, servers: dict[str, FakeModel]
) -> None:
    """a sends usage and a finish_reason but no content, then an error: b's answer is done with its
    own finish_reason and the usage of its own deltas."""
    svc = only_upstreams(start_service, servers, UPSTREAM_MAX_RETRIES="0")
    chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m"}
    usage = {**chunk, "choices": [], "usage": {"prompt_tokens": 999, "completion_tokens": 0, "total_tokens": 999}}
    finish = {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "content_filter"}]}
    error = {"error": {"message": "x", "type": "server_error", "code": "boom"}}
    servers["a"].scripts["spent"] = [json.dumps(frame).encode() for frame in (usage, finish, error)]
    servers["a"].forced = {"script": "spent"}
    servers["b"].forced = {"usage": "0"}

    _, events = chat(svc, "fo-spent")

    assert_one_answer_from(events, "b")
    done = events[-1].data
    assert done["finish_reason"] == "stop"
    assert (done["usage"]["completion_tokens"], done["usage"]["source"]) == (5, "estimated")


def test_when_every_server_failed_the_list_is_tried_again(
    start_service: StartService, servers: dict[str, FakeModel]
) -> None:
    svc = only_upstreams(start_service, servers, UPSTREAM_MAX_RETRIES="1")
    for name in "abc":  # each fails its first request only
        servers[name].forced = {"status": "503", "fail_times": "1", "key": f"fo-round-{name}"}
    before = requests_seen(servers)

    _, events = chat(svc, "fo-round")

    assert_one_answer_from(events, "a")
    assert asked_since(servers, before) == {"a": 2, "b": 1, "c": 1}
    assert svc.wait_for_log("upstream_retry", "fo-round")["retry"] == 1
