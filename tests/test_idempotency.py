"""Idempotency-Key on POST /chat and POST /api/chat: the same key from the same owner attaches to the
stream its first request started (a replay from the start, then live) instead of asking the model
again, also when the first request is still waiting for the model server's headers, and also on
another replica sharing a Redis store. The same key with another body is refused; another owner's
key is another key."""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fake_model import FakeModel, expected_text
from tests.helpers import Event, Service, StartService, iter_sse, parse_sse, scrape, ui_chunks, ui_text_of
from tests.spec import assert_error_response
from tests.test_redis import RedisServer, replica

KEY, OTHER_KEY = "idem-test-key-0123456789", "idem-test-key-other-98765"
AUTH = {"Authorization": f"Bearer {KEY}"}
SLOW = "fake:deltas=20,delay=0.05"


@pytest.fixture(scope="module")
def svc(start_module_service: StartService) -> Service:
    service: Service = start_module_service(
        SERVICE_API_KEYS=f"{KEY},{OTHER_KEY}", UPSTREAM_MAX_RETRIES="0", RESUME_GRACE_S="30"
    )
    return service


def post(svc: Service, body: dict[str, Any], key: str | None, path: str = "/chat", **headers: str) -> httpx.Response:
    """POST and read the whole answer (the stream too)."""
    extra = {"Idempotency-Key": key} if key is not None else {}
    with httpx.Client(timeout=30) as client:
        return client.post(f"{svc.url}{path}", json=body, headers={**AUTH, **extra, **headers})


def text(response: httpx.Response) -> str:
    return "".join(e.data["content"] for e in parse(response) if e.event == "delta")


def parse(response: httpx.Response) -> list[Event]:
    return parse_sse(response.text)


def upstream_requests_for(fake_model: FakeModel, message: str) -> int:
    return sum(1 for r in fake_model.requests if r.body["messages"][-1]["content"] == message)


def assert_whole(events: list[Event], stream_id: str, message: str) -> None:
    """One whole answer of this stream, from its first event: every seq once, one terminal event."""
    assert [e.id for e in events] == [f"{stream_id}:{i}" for i in range(len(events))]
    assert events[0].event == "meta"
    assert [e.event for e in events].count("done") == 1
    assert events[-1].event == "done"
    assert "".join(e.data["content"] for e in events if e.event == "delta") == expected_text(message)


# One key, one answer ------------------------------------------------------------------------------


def test_the_same_key_while_the_stream_runs_attaches_to_it(svc: Service, fake_model: FakeModel) -> None:
    message = f"{SLOW},tag=runs"
    headers = {**AUTH, "Idempotency-Key": "k-runs", "X-Request-ID": "idem-runs-1"}
    attached = scrape(svc).value("chatsvc_resumes_total", outcome="idempotent", default=0)
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", f"{svc.url}/chat", json={"message": message}, headers=headers) as first,
    ):
        assert first.status_code == 200
        stream_id = first.headers["x-stream-id"]
        sse = (e for e in iter_sse(first) if e.comment is None)
        got = [next(sse) for _ in range(4)]
        again = post(svc, {"message": message}, "k-runs", **{"X-Request-ID": "idem-runs-2"})
        got += list(sse)
    assert again.status_code == 200
    assert again.headers["x-stream-id"] == stream_id
    assert_whole(got, stream_id, message)
    assert [(e.id, e.event, e.data) for e in parse(again)] == [(e.id, e.event, e.data) for e in got]
    assert upstream_requests_for(fake_model, message) == 1
    replay = svc.wait_for_log("idempotent_replay", "idem-runs-2")
    assert replay["stream_id"] == stream_id
    assert "k-runs" not in json.dumps(replay)
    assert scrape(svc).value("chatsvc_resumes_total", outcome="idempotent") == attached + 1


def test_the_same_key_after_the_end_replays_the_kept_answer(svc: Service, fake_model: FakeModel) -> None:
    message = "fake:deltas=3,tag=after"
    first = post(svc, {"message": message}, "k-after")
    again = post(svc, {"message": message}, "k-after")
    assert again.headers["x-stream-id"] == first.headers["x-stream-id"]
    assert again.text == first.text
    assert upstream_requests_for(fake_model, message) == 1


def cut_before_headers(svc: Service, path: str, body: dict[str, Any], key: str, fake_model: FakeModel) -> None:
    """POST from a client that gives up before the response's headers: it leaves once the model
    server has the request (and is holding its own headers back)."""
    payload = json.dumps(body).encode()
    seen = len(fake_model.requests)
    with socket.create_connection(("127.0.0.1", svc.port), timeout=30) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer {KEY}\r\n"
            f"Idempotency-Key: {key}\r\nX-Request-ID: cut-{key}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        deadline = time.monotonic() + 10
        while len(fake_model.requests) == seen:  # the fake model's thread records it: no event to await
            assert time.monotonic() < deadline, "the model server never got the request"
            time.sleep(0.01)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close() resets
    # Nothing of the answer was read, not even its status line.


def cut_and_sent_again(first: Service, then: Service, message: str, key: str, fake_model: FakeModel) -> None:
    """POST /chat to `first`, cut before its headers, then the same with its key to `then`: one
    answer, whole from its first event, and the model server asked once."""
    cut_before_headers(first, "/chat", {"message": message}, key, fake_model)
    again = post(then, {"message": message}, key, **{"X-Request-ID": f"idem-{key}"})
    assert again.status_code == 200, again.text
    assert_whole(parse(again), again.headers["x-stream-id"], message)
    assert upstream_requests_for(fake_model, message) == 1
    assert then.wait_for_log("idempotent_replay", f"idem-{key}")["stream_id"] == again.headers["x-stream-id"]


def test_a_post_cut_before_its_headers_and_sent_again_is_one_answer(svc: Service, fake_model: FakeModel) -> None:
    """The phone lost the network while the model server was still to answer: the retry, sent while
    the first request still waits for the model server's headers, waits for that stream and gets it
    whole from its first event; the model server is asked once."""
    cut_and_sent_again(svc, svc, "fake:header_delay=1.5,deltas=5,tag=cut", "k-cut", fake_model)
    # The first request went on without its client: the stream is the one it opened.
    assert svc.wait_for_log("upstream_opened", "cut-k-cut")


def test_the_same_key_with_another_body_is_refused(svc: Service, fake_model: FakeModel) -> None:
    post(svc, {"message": "fake:deltas=2,tag=reused"}, "k-reused")
    seen = len(fake_model.requests)
    refused = post(svc, {"message": "fake:deltas=2,tag=reused-other"}, "k-reused")
    assert_error_response(refused, 422, "idempotency_key_reused")
    assert "Idempotency-Key" in refused.json()["detail"]
    other_model = post(svc, {"message": "fake:deltas=2,tag=reused", "max_tokens": 5}, "k-reused")
    assert_error_response(other_model, 422, "idempotency_key_reused")
    assert len(fake_model.requests) == seen


def test_another_owners_key_is_another_key(svc: Service, fake_model: FakeModel) -> None:
    message = "fake:deltas=3,tag=owners"
    mine = post(svc, {"message": message}, "k-owners")
    theirs = post(svc, {"message": message}, "k-owners", Authorization=f"Bearer {OTHER_KEY}")
    assert mine.status_code == theirs.status_code == 200
    assert mine.headers["x-stream-id"] != theirs.headers["x-stream-id"]
    assert text(mine) == text(theirs) == expected_text(message)
    assert upstream_requests_for(fake_model, message) == 2
    # Another owner's different body under the same key is not a reuse either.
    assert post(svc, {"message": "fake:deltas=1"}, "k-owners", Authorization=f"Bearer {OTHER_KEY}").status_code == 422


def test_without_a_key_every_post_is_a_new_answer(svc: Service, fake_model: FakeModel) -> None:
    message = "fake:deltas=2,tag=nokey"
    first, second = post(svc, {"message": message}, None), post(svc, {"message": message}, None)
    assert first.headers["x-stream-id"] != second.headers["x-stream-id"]
    assert upstream_requests_for(fake_model, message) == 2


def test_a_first_request_that_failed_before_its_stream_frees_the_key(svc: Service, fake_model: FakeModel) -> None:
    message = "fake:status=500,fail_times=1,key=idem-freed,deltas=3"
    failed = post(svc, {"message": message}, "k-freed")
    assert_error_response(failed, 502, "upstream_error")
    again = post(svc, {"message": message}, "k-freed")
    assert again.status_code == 200
    assert_whole(parse(again), again.headers["x-stream-id"], message)
    assert upstream_requests_for(fake_model, message) == 2


def test_a_stream_that_ended_with_an_error_before_any_content_frees_the_key(
    svc: Service, fake_model: FakeModel
) -> None:
    """The error says retry: sent again with its key, the request is tried again, not given the
    error again. (Once content has gone out, the key keeps the answer, error and all.)"""
    message = "fake:deltas=0,no_finish=1,tag=idem-nothing"
    failed = post(svc, {"message": message}, "k-nothing")
    assert [e.event for e in parse(failed)] == ["meta", "error"]

    again = post(svc, {"message": message}, "k-nothing")

    assert again.headers["x-stream-id"] != failed.headers["x-stream-id"]
    assert upstream_requests_for(fake_model, message) == 2


@pytest.mark.parametrize("key", ["", "x" * 256, "a\tb"])
def test_a_malformed_key_is_refused_naming_the_header(svc: Service, key: str) -> None:
    refused = post(svc, {"message": "hi"}, key)
    assert_error_response(refused, 422, "validation_error")
    assert refused.json()["detail"].startswith("Idempotency-Key")


def test_the_longest_key_is_taken(svc: Service) -> None:
    assert post(svc, {"message": "fake:deltas=1"}, "~" * 255).status_code == 200


# The AI SDK's route ------------------------------------------------------------------------------


def ui_body(chat_id: str, text: str) -> dict[str, Any]:
    message = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": text}]}
    return {"id": chat_id, "messages": [message], "trigger": "submit-message"}


def test_the_ai_sdk_route_takes_a_key_too(svc: Service, fake_model: FakeModel) -> None:
    message = "fake:header_delay=1,deltas=4,tag=sdk"
    cut_before_headers(svc, "/api/chat", ui_body("chat-idem", message), "k-sdk", fake_model)
    again = post(svc, ui_body("chat-idem", message), "k-sdk", "/api/chat")
    assert again.status_code == 200
    chunks = ui_chunks(again.text)
    assert chunks[0]["type"] == "start"
    assert chunks[0]["messageId"] == again.headers["x-stream-id"]
    assert ui_text_of(chunks) == expected_text(message)
    assert upstream_requests_for(fake_model, message) == 1
    # The same key on /chat is another key: the protocols do not share them.
    assert post(svc, {"message": message}, "k-sdk").status_code == 200
    assert upstream_requests_for(fake_model, message) == 2
    other_chat = post(svc, ui_body("chat-idem-2", message), "k-sdk", "/api/chat")
    assert_error_response(other_chat, 422, "idempotency_key_reused")


# Across replicas --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def pair(start_module_service: StartService, redis_server: RedisServer) -> tuple[Service, Service]:
    env = {"SERVICE_API_KEYS": f"{KEY},{OTHER_KEY}", "UPSTREAM_MAX_RETRIES": "0"}
    return replica(start_module_service, redis_server.url, **env), replica(
        start_module_service, redis_server.url, **env
    )


def test_a_post_cut_on_a_and_sent_again_to_b_is_one_answer(
    pair: tuple[Service, Service], fake_model: FakeModel
) -> None:
    """As above, across replicas: B finds A's claim on the key in Redis while A still waits for the
    model server's headers, waits for A's stream to start, then follows it from the store."""
    a, b = pair
    cut_and_sent_again(a, b, "fake:header_delay=1.5,deltas=5,tag=across", "k-across", fake_model)
    # Reused with another body, on either replica.
    assert_error_response(post(a, {"message": "fake:deltas=1"}, "k-across"), 422, "idempotency_key_reused")
    assert_error_response(post(b, {"message": "fake:deltas=1"}, "k-across"), 422, "idempotency_key_reused")


def test_a_claim_whose_first_request_failed_is_freed_on_every_replica(
    pair: tuple[Service, Service], fake_model: FakeModel, redis_server: RedisServer
) -> None:
    a, b = pair
    message = "fake:status=500,fail_times=1,key=idem-freed-across,deltas=3"
    assert_error_response(post(a, {"message": message}, "k-freed-across"), 502, "upstream_error")
    again = post(b, {"message": message}, "k-freed-across")
    assert again.status_code == 200, again.text
    assert_whole(parse(again), again.headers["x-stream-id"], message)
    assert upstream_requests_for(fake_model, message) == 2
    client = redis_server.client()
    ttls = {k: client.pttl(k) for k in client.scan_iter("chatsvc:idempotency:*")}
    stored = str([(k, client.get(k)) for k in ttls])
    client.close()
    assert ttls
    assert all(ttl > 0 for ttl in ttls.values()), ttls  # every claim expires
    assert "k-freed-across" not in stored  # a digest of the key, its owner and route; never the key
    assert "k-across" not in stored


def test_a_stream_that_ended_with_an_error_before_any_content_frees_the_key_on_every_replica(
    pair: tuple[Service, Service], fake_model: FakeModel
) -> None:
    """The stream starts and fails within one write batch: the key's "started" and "free" reach
    Redis as one change, so that the request sent again, on either replica, is tried again."""
    a, b = pair
    message = "fake:deltas=0,no_finish=1,tag=idem-nothing-across"
    failed = post(a, {"message": message}, "k-nothing-across")
    assert [e.event for e in parse(failed)] == ["meta", "error"]

    again = post(b, {"message": message}, "k-nothing-across")

    assert [e.event for e in parse(again)] == ["meta", "error"]
    assert again.headers["x-stream-id"] != failed.headers["x-stream-id"]
    assert upstream_requests_for(fake_model, message) == 2


def test_a_key_with_no_store_to_hold_it_is_refused_not_answered_twice(
    start_service: StartService, tmp_path_factory: pytest.TempPathFactory, fake_model: FakeModel
) -> None:
    """With Redis gone, no replica can tell whether the key was used: 503 resume_unavailable (the
    client retries), while a chat without a key is served as usual."""
    server = RedisServer(tmp_path_factory.mktemp("redis-lost")).start()
    try:
        svc = replica(start_service, server.url, SERVICE_API_KEYS=f"{KEY},{OTHER_KEY}", RESUME_STORE_TIMEOUT_S="0.5")
    finally:
        server.kill()
    message = "fake:deltas=2,tag=no-store"
    refused = post(svc, {"message": message}, "k-no-store")
    assert_error_response(refused, 503, "resume_unavailable")
    assert "retry-after" in refused.headers
    assert upstream_requests_for(fake_model, message) == 0
    assert post(svc, {"message": message}, None).status_code == 200
