"""Streams that survive a dropped connection (note 11): resume by Last-Event-ID or ?after=, the grace,
the TTL, the buffer bound, the key binding, DELETE, and the drain. Each test names its clause.

The real JavaScript clients (fetch-event-source, eventsource) are driven in tests/test_js_clients.py."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from tests.fake_model import FakeModel, expected_text
from tests.helpers import Event, Service, StartService, follow, iter_sse, scrape, text_of
from tests.spec import assert_error_response, validate

OUTCOMES = ("request_completed", "request_failed", "client_disconnected")
SLOW = "fake:deltas=30,delay=0.05"  # 1.5 s of answer: long enough to leave and come back


def seqs(events: list[Event]) -> list[int]:
    return [int(e.id.split(":")[1]) for e in events if e.id]


@contextmanager
def opened(
    service: Service, message: str, rid: str, headers: dict[str, str] | None = None
) -> Iterator[tuple[httpx.Response, Iterator[Event]]]:
    """POST /chat, yielding the response and its events (no pings); leaving the block hangs up."""
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "POST", f"{service.url}/chat", json={"message": message}, headers={"X-Request-ID": rid, **(headers or {})}
        ) as response,
    ):
        yield response, (e for e in iter_sse(response) if e.comment is None)


def leave_after(service: Service, message: str, rid: str, count: int) -> tuple[str, list[Event]]:
    """Start a stream, read `count` events, hang up, and wait until the service has seen it."""
    with opened(service, message, rid) as (response, events):
        got = [next(events) for _ in range(count)]
        stream_id = response.headers["x-stream-id"]
    service.wait_for_log("stream_detached", rid)
    return stream_id, got


def finished_stream(service: Service, message: str = "hello") -> tuple[str, list[Event]]:
    response, events = service.chat({"message": message})
    assert events[-1].event == "done"
    return response.headers["x-stream-id"], events


@pytest.fixture(scope="module")
def resumable(start_module_service: StartService) -> Service:
    svc: Service = start_module_service(RESUME_GRACE_S="30", RESUME_TTL_S="60")
    return svc


# Replay ------------------------------------------------------------------------------------------


def test_replay_from_every_position_gives_exactly_the_events_after_it(resumable: Service) -> None:
    stream_id, events = finished_stream(resumable, "fake:deltas=6")
    last = len(events) - 1
    for seq in range(-1, last):
        by_header = follow(resumable, stream_id, {"Last-Event-ID": f"{stream_id}:{seq}"}) if seq >= 0 else None
        by_query = follow(resumable, stream_id, after=str(seq))
        assert seqs(by_query) == list(range(seq + 1, last + 1))
        assert [(e.event, e.data) for e in by_query] == [(e.event, e.data) for e in events[seq + 1 :]]
        if by_header is not None:
            assert [(e.id, e.data) for e in by_header] == [(e.id, e.data) for e in by_query]
    assert follow(resumable, stream_id) == follow(resumable, stream_id, after="-1")  # neither: from the start
    assert [e.data for e in follow(resumable, stream_id)] == [e.data for e in events]


def test_nothing_left_to_send_is_204(resumable: Service) -> None:
    stream_id, events = finished_stream(resumable)
    assert events[-1].id is not None
    answer = httpx.get(f"{resumable.url}/chat/streams/{stream_id}", headers={"Last-Event-ID": events[-1].id})
    assert answer.status_code == 204
    assert answer.headers["x-stream-id"] == stream_id
    again = httpx.post(f"{resumable.url}/chat", json={"message": "x"}, headers={"Last-Event-ID": events[-1].id})
    assert again.status_code == 204


@pytest.mark.parametrize(
    "last_event_id",
    ["0" * 32 + ":1", "not-an-id", "{stream}:999", "{stream}:01", "{stream}", "ABCDEF" + "0" * 26 + ":1"],
    ids=["unknown", "malformed", "seq-not-sent", "leading-zero", "no-seq", "upper-case"],
)
def test_unknown_or_malformed_ids_are_404_never_a_new_generation(
    resumable: Service, fake_model: FakeModel, last_event_id: str
) -> None:
    stream_id, _ = finished_stream(resumable)
    header = {"Last-Event-ID": last_event_id.format(stream=stream_id)}
    seen = len(fake_model.requests)
    assert_error_response(
        httpx.post(f"{resumable.url}/chat", json={"message": "hi"}, headers=header), 404, "stream_not_found"
    )
    target = stream_id if "{stream}" in last_event_id else "0" * 32
    assert_error_response(httpx.get(f"{resumable.url}/chat/streams/{target}", headers=header), 404, "stream_not_found")
    assert len(fake_model.requests) == seen  # no generation was started


@pytest.mark.parametrize("path", ["0" * 32, "x", "%2e%2e", "0" * 33])
def test_unknown_stream_paths_are_404_stream_not_found(resumable: Service, path: str) -> None:
    assert_error_response(httpx.get(f"{resumable.url}/chat/streams/{path}"), 404, "stream_not_found")
    assert_error_response(httpx.delete(f"{resumable.url}/chat/streams/{path}"), 404, "stream_not_found")


def test_a_bad_after_is_404(resumable: Service) -> None:
    stream_id, _ = finished_stream(resumable)
    for after in ("-2", "abc", "1.5", "999"):
        response = httpx.get(f"{resumable.url}/chat/streams/{stream_id}", params={"after": after})
        assert_error_response(response, 404, "stream_not_found")


# Live resumes ------------------------------------------------------------------------------------


def test_post_with_last_event_id_resumes_without_running_the_body_again(
    resumable: Service, fake_model: FakeModel
) -> None:
    """What fetch-event-source's retry sends: the same POST, with the last id it read."""
    stream_id, got = leave_after(resumable, SLOW, "post-resume", 4)
    seen = len(fake_model.requests)
    with opened(resumable, "a body that must not run", "post-resume-2", {"Last-Event-ID": got[-1].id or ""}) as (
        response,
        events,
    ):
        assert response.headers["x-stream-id"] == stream_id
        rest = list(events)
    assert len(fake_model.requests) == seen
    whole = got + rest
    assert seqs(whole) == list(range(len(whole)))
    assert text_of(whole) == expected_text(SLOW)
    assert [e.event for e in whole].count("done") == 1
    record = resumable.wait_for_log("stream_resumed", "post-resume-2")
    assert record["from_seq"] == 4
    assert record["stream_id"] == stream_id


def test_resume_during_the_grace_keeps_the_upstream_and_completes(resumable: Service, fake_model: FakeModel) -> None:
    stream_id, got = leave_after(resumable, SLOW, "grace-1", 3)
    upstream = fake_model.last()
    assert not upstream.closed.is_set()  # detached, but the model goes on
    rest = follow(resumable, stream_id, {"Last-Event-ID": got[-1].id or ""})
    whole = got + rest
    assert text_of(whole) == expected_text(SLOW)
    assert whole[-1].event == "done"
    validate("DoneEvent", whole[-1].data)
    assert len([r for r in resumable.logs_for("grace-1") if r["event"] == "request_completed"]) == 1


def test_two_followers_at_once_see_the_same_stream(resumable: Service) -> None:
    with opened(resumable, SLOW, "two-1") as (response, first):
        stream_id = response.headers["x-stream-id"]
        assert next(first).event == "meta"
        second = follow(resumable, stream_id)  # from the start, while the first still reads
        rest = list(first)
    assert second[0].event == "meta"
    assert text_of(second) == text_of(rest) == expected_text(SLOW)
    assert [(e.id, e.data) for e in second[1:]] == [(e.id, e.data) for e in rest]


def test_past_the_grace_the_upstream_is_closed_and_the_stream_is_gone(
    start_service: StartService, fake_model: FakeModel
) -> None:
    svc: Service = start_service(RESUME_GRACE_S="0.3")
    stream_id, _ = leave_after(svc, "fake:deltas=3,stall_after=1", "gone-1", 2)
    upstream = fake_model.last()
    record = svc.wait_for_log("client_disconnected", "gone-1")
    assert record["completion_tokens"] == 1
    assert upstream.closed.wait(5)
    assert_error_response(httpx.get(f"{svc.url}/chat/streams/{stream_id}"), 404, "stream_not_found")


def test_with_no_grace_a_disconnect_closes_at_once_and_nothing_resumes(
    start_service: StartService, fake_model: FakeModel
) -> None:
    svc: Service = start_service(RESUME_GRACE_S="0")
    stream_id, _ = leave_after(svc, "fake:deltas=3,stall_after=1", "nograce-1", 2)
    assert fake_model.last().closed.wait(5)
    svc.wait_for_log("client_disconnected", "nograce-1")
    assert_error_response(httpx.get(f"{svc.url}/chat/streams/{stream_id}"), 404, "stream_not_found")


# After the end: TTL and the buffer bound -----------------------------------------------------------


def test_a_finished_stream_is_kept_for_the_ttl_then_dropped(start_service: StartService) -> None:
    svc: Service = start_service(RESUME_TTL_S="1")
    # The service ends the stream after this and before the client has read it: from here on, the
    # TTL has surely not run out before 1 s (the client's own end would be a few ms late for that).
    asked_at = time.monotonic()
    stream_id, events = finished_stream(svc)
    assert [e.data for e in follow(svc, stream_id)] == [e.data for e in events]  # within the TTL
    while (status := httpx.get(f"{svc.url}/chat/streams/{stream_id}").status_code) == 200:
        assert time.monotonic() - asked_at < 10, "the stream was never dropped"
        time.sleep(0.1)  # nothing to await: the TTL is the passing of time
    assert status == 404
    assert time.monotonic() - asked_at >= 1


def test_finished_logs_are_dropped_oldest_first_beyond_the_buffer(start_service: StartService) -> None:
    svc: Service = start_service(RESUME_BUFFER_MB="0.05")  # 52,428 bytes: two 20,000-character answers
    ids = [finished_stream(svc, "fake:huge=20000")[0] for _ in range(3)]
    statuses = [httpx.get(f"{svc.url}/chat/streams/{i}", params={"after": "0"}).status_code for i in ids]
    assert statuses == [404, 200, 200]
    assert 40_000 < scrape(svc).value("chatsvc_stream_log_bytes") <= 0.05 * 1024 * 1024


def test_live_streams_alone_over_the_buffer_make_new_chats_503(start_service: StartService) -> None:
    svc: Service = start_service(RESUME_BUFFER_MB="0.05")
    with opened(svc, "fake:huge=60000,stall_after=1", "full-1") as (_, events):
        assert [next(events).event for _ in range(2)] == ["meta", "delta"]
        refused = httpx.post(f"{svc.url}/chat", json={"message": "hi"})
        assert_error_response(refused, 503, "overloaded")
        assert "RESUME_BUFFER_MB" in refused.json()["detail"]
        assert int(refused.headers["retry-after"]) >= 1


def test_a_live_client_is_never_refused_for_streams_whose_clients_left(start_service: StartService) -> None:
    """Bug: MAX_CONCURRENT_STREAMS clients that POST and hang up at once held every slot for
    RESUME_GRACE_S: every other caller got 503 overloaded, and anyone could do it again at will.
    Fix: with every slot taken, a new chat stops the stream whose client left first (its log ends
    with an `overloaded` error, kept for a resume to find) and takes its slot (note 11)."""
    svc: Service = start_service(MAX_CONCURRENT_STREAMS="3", RESUME_GRACE_S="300")
    left = [leave_after(svc, "fake:deltas=3,stall_after=1", f"evict-{i}", 2)[0] for i in range(3)]
    assert scrape(svc).value("chatsvc_detached_streams") == 3

    response, events = svc.chat({"message": "hi"}, {"X-Request-ID": "evict-new"})

    assert response.status_code == 200, response.text
    assert text_of(events) == expected_text("hi")
    assert events[-1].event == "done"
    evicted = svc.wait_for_log("request_failed", "evict-0")
    assert (evicted["code"], evicted["reason"], evicted["stream_id"]) == ("overloaded", "evicted", left[0])
    replay = follow(svc, left[0])  # the evicted stream's client comes back: it learns how it ended
    assert [e.event for e in replay] == ["meta", "delta", "error"]
    validate("ErrorEvent", replay[-1].data)
    assert (replay[-1].data["code"], replay[-1].data["correlation_id"]) == ("overloaded", "evict-0")
    assert "left" in replay[-1].data["detail"]
    for stream_id in left[1:]:  # the later ones still wait for their clients
        assert httpx.delete(f"{svc.url}/chat/streams/{stream_id}").status_code == 204
    for i in range(3):
        svc.wait_for_log("request_completed" if i else "request_failed", f"evict-{i}")
        assert len([r for r in svc.logs_for(f"evict-{i}") if r["event"] in OUTCOMES]) == 1


def test_with_every_slot_attached_a_new_chat_is_refused(start_service: StartService) -> None:
    """Only streams whose clients left make room: an attached one is never stopped for a newcomer."""
    svc: Service = start_service(MAX_CONCURRENT_STREAMS="1", RESUME_GRACE_S="300")
    with opened(svc, "fake:deltas=3,stall_after=1", "full-here") as (response, events):
        assert [next(events).event for _ in range(2)] == ["meta", "delta"]
        assert_error_response(httpx.post(f"{svc.url}/chat", json={"message": "hi"}), 503, "overloaded")
        stream_id = response.headers["x-stream-id"]
    assert httpx.delete(f"{svc.url}/chat/streams/{stream_id}").status_code == 204
    svc.wait_for_log("request_completed", "full-here")


# The key binding ---------------------------------------------------------------------------------


def test_only_the_key_that_started_a_stream_can_resume_or_stop_it(start_service: StartService) -> None:
    svc: Service = start_service(SERVICE_API_KEYS="key-one,key-two")
    one, two = {"Authorization": "Bearer key-one"}, {"Authorization": "Bearer key-two"}
    response, events = svc.chat({"message": "hello"}, one)
    stream_id = response.headers["x-stream-id"]
    url = f"{svc.url}/chat/streams/{stream_id}"

    assert_error_response(httpx.get(url, headers=two), 404, "stream_not_found")  # existence not revealed
    assert_error_response(httpx.delete(url, headers=two), 404, "stream_not_found")
    last = {"Last-Event-ID": f"{stream_id}:2"}
    assert_error_response(httpx.post(f"{svc.url}/chat", json={}, headers={**two, **last}), 404, "stream_not_found")
    assert_error_response(httpx.get(url), 401, "unauthorized")
    assert_error_response(httpx.get(url, headers={"Authorization": "Bearer key-one-not"}), 401, "unauthorized")
    assert [e.data for e in follow(svc, stream_id, one)] == [e.data for e in events]
    assert httpx.delete(url, headers=one).status_code == 204


def test_without_keys_a_chat_stream_is_its_ids_alone(resumable: Service) -> None:
    """/chat's stream id is minted by the service and unguessable: it stays the capability, with or
    without the AI SDK's owner cookie on either side (note 21 binds only the chats a client names)."""
    cookie = {"Cookie": "chatsvc_owner=" + "1" * 32}
    response, events = resumable.chat({"message": "hello"}, cookie)
    assert "set-cookie" not in response.headers
    stream_id = response.headers["x-stream-id"]
    assert [e.data for e in follow(resumable, stream_id)] == [e.data for e in events]
    other = {"Cookie": "chatsvc_owner=" + "2" * 32}
    assert [e.data for e in follow(resumable, stream_id, other)] == [e.data for e in events]


# DELETE ------------------------------------------------------------------------------------------


def test_delete_while_streaming_stops_the_upstream_and_ends_with_cancelled(
    resumable: Service, fake_model: FakeModel
) -> None:
    with opened(resumable, "fake:deltas=200,delay=0.05", "del-1") as (response, events):
        stream_id = response.headers["x-stream-id"]
        got = [next(events) for _ in range(3)]
        upstream = fake_model.last()
        asked = time.monotonic()
        assert httpx.delete(f"{resumable.url}/chat/streams/{stream_id}").status_code == 204
        rest = list(events)
    assert upstream.closed.wait(5)
    assert upstream.closed_at is not None
    print(f"\nupstream closed {1000 * (upstream.closed_at - asked):.1f} ms after DELETE was sent")
    done = rest[-1]
    assert done.event == "done"
    validate("DoneEvent", done.data)
    assert done.data["finish_reason"] == "cancelled"
    assert done.data["usage"]["completion_tokens"] == len([e for e in got + rest if e.event == "delta"])
    assert [e.event for e in rest].count("done") == 1
    assert httpx.delete(f"{resumable.url}/chat/streams/{stream_id}").status_code == 204  # idempotent
    assert follow(resumable, stream_id)[-1].data["finish_reason"] == "cancelled"  # kept for the TTL
    assert resumable.wait_for_log("stream_cancelled")["stream_id"] == stream_id


def test_delete_while_detached_stops_the_upstream(resumable: Service, fake_model: FakeModel) -> None:
    stream_id, got = leave_after(resumable, "fake:deltas=5,stall_after=2", "del-2", 3)
    upstream = fake_model.last()
    assert httpx.delete(f"{resumable.url}/chat/streams/{stream_id}").status_code == 204
    assert upstream.closed.wait(5)
    rest = follow(resumable, stream_id, {"Last-Event-ID": got[-1].id or ""})
    assert [e.event for e in rest] == ["done"]
    assert rest[0].data["finish_reason"] == "cancelled"
    assert rest[0].data["usage"]["completion_tokens"] == 2


# Draining, logs and metrics ----------------------------------------------------------------------


def test_while_draining_resumes_are_served_and_new_chats_refused(start_service: StartService) -> None:
    svc: Service = start_service(SHUTDOWN_GRACE_S="20", RESUME_GRACE_S="30")
    stream_id, got = leave_after(svc, "fake:deltas=20,delay=0.1", "drain-r", 3)
    svc.signal(signal.SIGTERM)
    svc.wait_for_log("draining")
    assert_error_response(httpx.post(f"{svc.url}/chat", json={"message": "hi"}), 503, "shutting_down")
    rest = follow(svc, stream_id, {"Last-Event-ID": got[-1].id or ""})
    assert text_of(got + rest) == "".join(f"w{i} " for i in range(20))
    assert rest[-1].event == "done"
    assert svc.proc is not None
    assert svc.proc.wait(timeout=30) == 0


def test_resume_metrics_count_by_outcome(start_service: StartService) -> None:
    svc: Service = start_service()
    stream_id, events = finished_stream(svc)
    follow(svc, stream_id, after="2")
    follow(svc, stream_id, after=str(len(events) - 1))
    httpx.get(f"{svc.url}/chat/streams/{'0' * 32}")
    metrics = scrape(svc)
    for outcome in ("resumed", "finished", "not_found"):
        assert metrics.value("chatsvc_resumes_total", outcome=outcome) == 1
    assert metrics.value("chatsvc_detached_streams") == 0
