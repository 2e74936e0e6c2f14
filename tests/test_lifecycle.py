"""Client disconnects, the stream limit, and SIGTERM: drain, then exit."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from tests.fake_model import FakeModel
from tests.helpers import Event, Service, StartService, chat_not_read, iter_sse, scrape
from tests.spec import assert_error_response, validate


@contextmanager
def open_stream(service: Service, message: str, rid: str) -> Iterator[tuple[httpx.Response, Iterator[Event]]]:
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", f"{service.url}/chat", json={"message": message}, headers={"X-Request-ID": rid}) as resp,
    ):
        yield resp, (e for e in iter_sse(resp) if e.comment is None)


@pytest.fixture(scope="module")
def no_grace(start_module_service: StartService) -> Service:
    """RESUME_GRACE_S=0: a disconnect closes the upstream at once, as before resuming existed."""
    svc: Service = start_module_service(RESUME_GRACE_S="0")
    return svc


@pytest.mark.parametrize("after", [0, 3], ids=["before-first-token", "mid-stream"])
def test_client_disconnect_closes_upstream_within_a_second(
    no_grace: Service, fake_model: FakeModel, after: int
) -> None:
    service, rid = no_grace, f"leave-{after}"
    with open_stream(service, f"fake:deltas=10,stall_after={after}", rid) as (_, events):
        assert [next(events).event for _ in range(1 + after)] == ["meta"] + ["delta"] * after
        upstream = fake_model.last()
    left_at = time.monotonic()  # the client's connection is closed on leaving the block

    assert upstream.closed.wait(5), "the upstream connection stayed open"
    assert upstream.closed_at is not None
    assert upstream.closed_at - left_at < 1.0
    record = service.wait_for_log("client_disconnected", rid)
    assert record["completion_tokens"] == after
    assert not [r for r in service.logs_for(rid) if r["event"] in ("request_completed", "request_failed")]


def test_streams_over_the_limit_get_503_overloaded(start_service: StartService, fake_model: FakeModel) -> None:
    svc: Service = start_service(MAX_CONCURRENT_STREAMS="2", RESUME_GRACE_S="0")
    with (
        open_stream(svc, "fake:stall_after=0", "slot-1") as (_, first),
        open_stream(svc, "fake:stall_after=0", "slot-2") as (_, second),
    ):
        assert next(first).event == "meta"
        assert next(second).event == "meta"
        assert scrape(svc).value("chatsvc_active_streams") == 2

        refused = httpx.post(f"{svc.url}/chat", json={"message": "hi"})
        assert_error_response(refused, 503, "overloaded")
        assert int(refused.headers["retry-after"]) >= 1
    svc.wait_for_log("client_disconnected", "slot-1")
    svc.wait_for_log("client_disconnected", "slot-2")

    response, events = svc.chat({"message": "hi"})
    assert response.status_code == 200
    assert events[-1].event == "done"


def test_sigterm_drains_then_exits(start_service: StartService, fake_model: FakeModel) -> None:
    """readyz turns 503 and new chats get 503 shutting_down while streams continue; a stream that
    outlives SHUTDOWN_GRACE_S ends with an error event shutting_down; a short one finishes with done;
    then the process exits 0."""
    svc: Service = start_service(SHUTDOWN_GRACE_S="2", IDLE_TIMEOUT_S="60", REQUEST_TIMEOUT_S="120")
    results: dict[str, list[Event]] = {}

    def read_rest(name: str, events: Iterator[Event]) -> None:
        results[name] = list(events)

    with (
        open_stream(svc, "fake:deltas=5,stall_after=1", "drain-long") as (_, long_events),
        open_stream(svc, "fake:deltas=10,delay=0.1,first_delay=0.5", "drain-short") as (_, short_events),
    ):
        assert next(long_events).event == "meta"
        assert next(short_events).event == "meta"
        readers = [
            threading.Thread(target=read_rest, args=("long", long_events)),
            threading.Thread(target=read_rest, args=("short", short_events)),
        ]
        for reader in readers:
            reader.start()
        svc.signal(signal.SIGTERM)
        svc.wait_for_log("draining")

        ready = httpx.get(f"{svc.url}/readyz")
        assert_error_response(ready, 503, "shutting_down")
        refused = httpx.post(f"{svc.url}/chat", json={"message": "hi"})
        assert_error_response(refused, 503, "shutting_down")
        assert "retry-after" in refused.headers
        ui_message = {"id": "u", "role": "user", "parts": [{"type": "text", "text": "hi"}]}
        ui_chat = {"id": "c", "messages": [ui_message], "trigger": "submit-message"}
        refused = httpx.post(f"{svc.url}/api/chat", json=ui_chat)  # the AI SDK's route drains alike
        assert_error_response(refused, 503, "shutting_down")
        assert "retry-after" in refused.headers

        for reader in readers:
            reader.join(timeout=30)

    assert results["short"][-1].event == "done"
    assert "".join(e.data["content"] for e in results["short"] if e.event == "delta") == "".join(
        f"w{i} " for i in range(10)
    )
    last = results["long"][-1]
    assert last.event == "error"
    validate("ErrorEvent", last.data)
    assert last.data["code"] == "shutting_down"
    assert last.data["retryable"] is True
    assert svc.proc is not None
    assert svc.proc.wait(timeout=10) == 0


def test_sigterm_with_nothing_in_flight_exits_at_once(start_service: StartService) -> None:
    svc: Service = start_service(SHUTDOWN_GRACE_S="25")
    svc.signal(signal.SIGTERM)
    assert svc.proc is not None
    assert svc.proc.wait(timeout=10) == 0


def idle_collections(service: Service) -> float:
    return scrape(service).value("chatsvc_gc_pause_seconds_count", generation="2", when="idle", default=0)


def test_no_idle_collection_while_a_client_is_still_served(start_service: StartService) -> None:
    """Bug: the full collection meant for idle moments ran when the last slot was released, while a
    client was still being sent the end of its answer (0.3 s of pause with 1000 streams' garbage).
    Fix: it runs only once no stream and no follower is in flight, a moment after the last."""
    service = start_service(SEND_TIMEOUT_S="2", RESUME_GRACE_S="0")
    before = idle_collections(service)
    with chat_not_read(service, "fake:huge=100000,deltas=60", "idle-gc"):  # 6 MB: more than the buffers hold
        service.wait_for_log("request_completed", "idle-gc")  # the answer is whole: its slot is free
        during = idle_collections(service)  # the client, reading nothing, is still being sent it
        service.wait_for_log("follower_cut_off", "idle-gc")
    assert during == before
    deadline = time.monotonic() + 10
    while idle_collections(service) == before and time.monotonic() < deadline:
        time.sleep(0.05)  # no event says when the collection ran but its metric
    assert idle_collections(service) == before + 1
