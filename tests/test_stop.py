"""A stop that keeps what was seen (note 23): DELETE /chat/streams/{id} with Last-Event-ID or ?after=
ends the stored answer exactly after the event that the client showed last, whatever the producer
had appended since; a replay then shows what the client showed, and `done` (finish_reason
"cancelled") follows it. Across replicas: tests/test_redis.py; in Chromium: tests/test_browser.py."""

from __future__ import annotations

import httpx
import pytest

from tests.helpers import Event, Service, StartService, follow, text_of
from tests.spec import assert_error_response, validate
from tests.test_resume import finished_stream, leave_after, opened

SLOW = "fake:deltas=200,delay=0.02,usage=0"  # 4 s of answer: the producer is well past any cut


@pytest.fixture(scope="module")
def svc(start_module_service: StartService) -> Service:
    service: Service = start_module_service(RESUME_GRACE_S="30", RESUME_TTL_S="60")
    return service


def stop_after(svc: Service, stream_id: str, seq: int, how: str, rid: str = "stop") -> httpx.Response:
    """DELETE naming the last event shown: as Last-Event-ID (`how` "header") or as ?after=."""
    url = f"{svc.url}/chat/streams/{stream_id}"
    if how == "header":
        return httpx.delete(url, headers={"Last-Event-ID": f"{stream_id}:{seq}", "X-Request-ID": rid})
    return httpx.delete(url, params={"after": str(seq)}, headers={"X-Request-ID": rid})


def assert_cut_at(svc: Service, stream_id: str, shown: list[Event]) -> Event:
    """The stored answer is `shown` (from the meta on), then `done` cancelled: the replay's terminal."""
    replay = follow(svc, stream_id)
    assert [e.id for e in replay] == [f"{stream_id}:{i}" for i in range(len(shown) + 1)]
    assert [(e.event, e.data) for e in replay[:-1]] == [(e.event, e.data) for e in shown]
    done = replay[-1]
    assert done.event == "done"
    validate("DoneEvent", done.data)
    assert done.data["finish_reason"] == "cancelled"
    # No usage came from the model server: the estimate counts the deltas kept, not those cut.
    assert done.data["usage"]["completion_tokens"] == len(shown) - 1
    assert done.data["usage"]["source"] == "estimated"
    return done


@pytest.mark.parametrize("how", ["header", "query"])
def test_a_stop_after_an_event_ends_the_stored_answer_there(svc: Service, how: str) -> None:
    with opened(svc, SLOW, f"stop-{how}") as (response, events):
        stream_id = response.headers["x-stream-id"]
        got = [next(events) for _ in range(7)]  # meta and six deltas: the producer is past seq 2
        assert stop_after(svc, stream_id, 2, how, f"stop-{how}-delete").status_code == 204
        rest = list(events)
    done = assert_cut_at(svc, stream_id, got[:3])
    # This client had events past the cut: it gets the one terminal event, the one the log holds.
    assert [e.event for e in rest].count("done") == 1
    assert (rest[-1].id, rest[-1].data) == (done.id, done.data)
    cancelled = svc.wait_for_log("stream_cancelled", f"stop-{how}-delete")
    assert (cancelled["stream_id"], cancelled["after"]) == (stream_id, 2)
    assert cancelled["seq"] >= 6
    # A reconnect from the last event shown gets the end, and a second stop changes nothing.
    assert [e.event for e in follow(svc, stream_id, {"Last-Event-ID": f"{stream_id}:2"})] == ["done"]
    assert stop_after(svc, stream_id, 2, how).status_code == 204
    assert_cut_at(svc, stream_id, got[:3])


def test_a_stop_while_detached_ends_the_answer_at_the_event_named(svc: Service) -> None:
    stream_id, got = leave_after(svc, SLOW, "stop-detached", 6)
    assert stop_after(svc, stream_id, 4, "query").status_code == 204
    assert_cut_at(svc, stream_id, got[:5])
    assert [e.event for e in follow(svc, stream_id, after="4")] == ["done"]


def test_a_client_that_saw_events_past_the_cut_gets_the_end_when_it_comes_back(svc: Service) -> None:
    """A client that showed more than the one that stopped (another tab), and left before the end:
    its Last-Event-ID names an event the cut removed. It gets the end, as it would have live; an id
    never sent is still 404."""
    stream_id, got = leave_after(svc, SLOW, "stop-past-cut", 8)
    assert stop_after(svc, stream_id, 3, "query").status_code == 204
    done = assert_cut_at(svc, stream_id, got[:4])
    assert got[7].id == f"{stream_id}:7"  # sent, then cut
    back = follow(svc, stream_id, {"Last-Event-ID": f"{stream_id}:7"})
    assert [(e.id, e.event, e.data) for e in back] == [(done.id, "done", done.data)]
    assert [e.event for e in follow(svc, stream_id, after="7")] == ["done"]
    # Having the end, it is told there is no more (the `done` took seq 4, the first the cut removed):
    # 204 tells an EventSource to stop. A DELETE from it changes nothing.
    assert done.id == f"{stream_id}:4"
    assert follow(svc, stream_id, {"Last-Event-ID": done.id}) == []
    assert stop_after(svc, stream_id, 7, "header").status_code == 204
    assert_cut_at(svc, stream_id, got[:4])
    # An event the stream never reached is no event of it.
    never = httpx.get(f"{svc.url}/chat/streams/{stream_id}", headers={"Last-Event-ID": f"{stream_id}:999"})
    assert_error_response(never, 404, "stream_not_found")


def test_a_stop_after_the_start_keeps_the_meta_alone(svc: Service) -> None:
    """?after=-1 (the client showed nothing yet): the meta is kept, it holds no text."""
    with opened(svc, SLOW, "stop-start") as (response, events):
        stream_id = response.headers["x-stream-id"]
        got = [next(events) for _ in range(3)]
        assert stop_after(svc, stream_id, -1, "query").status_code == 204
        list(events)
    assert_cut_at(svc, stream_id, got[:1])


@pytest.mark.parametrize(
    ("headers", "params"),
    [
        ({"Last-Event-ID": "{other}:1"}, {}),  # another stream's event
        ({"Last-Event-ID": "{stream_id}:999"}, {}),  # not sent yet
        ({"Last-Event-ID": "{stream_id}"}, {}),  # no seq
        ({}, {"after": "999"}),
        ({}, {"after": "x"}),
        ({}, {"after": "-2"}),
    ],
)
def test_a_stop_naming_an_event_not_sent_is_404_and_stops_nothing(
    svc: Service, headers: dict[str, str], params: dict[str, str]
) -> None:
    other, _ = finished_stream(svc)
    with opened(svc, "fake:deltas=20,delay=0.02", "stop-404") as (response, events):
        stream_id = response.headers["x-stream-id"]
        got = [next(events) for _ in range(3)]
        named = {k: v.format(other=other, stream_id=stream_id) for k, v in headers.items()}
        url = f"{svc.url}/chat/streams/{stream_id}"
        assert_error_response(httpx.delete(url, headers=named, params=params), 404, "stream_not_found")
        rest = list(events)
    assert rest[-1].event == "done"
    assert rest[-1].data["finish_reason"] == "stop"
    assert text_of(got + rest) == "".join(f"w{i} " for i in range(20))


def test_a_stop_of_a_finished_stream_changes_nothing(svc: Service) -> None:
    stream_id, events = finished_stream(svc, "fake:deltas=6")
    assert stop_after(svc, stream_id, 2, "query").status_code == 204
    assert [(e.id, e.data) for e in follow(svc, stream_id)] == [(e.id, e.data) for e in events]
