"""A finished stream leaves nothing of chatsvc's to the cycle collector (note 10): its objects go
with their last reference, whichever way it ended.

chatsvc runs for real (`python chatsvc.py`) under tests/gc_probe.py's wrapper, which counts what
full collections with DEBUG_SAVEALL find unreachable. A first round of streams warms the process up
and switches DEBUG_SAVEALL on; the second round's report names every object of chatsvc's modules
that any collection found unreachable since.

One of ours is found, on purpose: the response of each follower (`FollowerResponse`). anyio keeps
each task that a task group cancels in a reference cycle (its `task_done` callback holds the task's
CancelledError, whose traceback holds the task's frames), and sse-starlette's response cancels
three tasks whose frames hold the response. What the response held of the stream it drops when it
ends: with RESUME_TTL_S=0 a finished stream's log is dropped at once, so a log that the response
kept would be found here."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import gc_probe
from tests.fake_model import FakeModel
from tests.helpers import ROOT, Service, StartService, iter_sse, parse_sse
from tests.test_redis import RedisServer

pytestmark = pytest.mark.slow

#: The only object of ours that may be found in a cycle (see above).
HELD_BY_ANYIO = "__main__.FollowerResponse"
#: What a stream makes: none of it may outlive the stream, held by a cycle or by anything else
#: (with RESUME_TTL_S=0, not even its log).
STREAM_SCOPED = (
    "StreamLog", "Producer", "Failover", "Claim", "UpstreamFrames", "Outcome", "Slot", "ChatRequest", "UIChatRequest",
    "ChatTurn", "RemoteLog",
)  # fmt: skip


def start_probed(tmp_path: Path, **env: str) -> tuple[Service, Path]:
    """chatsvc under the probe, RESUME_TTL_S=0 (a finished stream's log is dropped at once: one
    still held would be found), with `env`."""
    report = tmp_path / "gc-report.jsonl"
    probe = gc_probe.env(report, watch=STREAM_SCOPED)
    settings = {"RESUME_TTL_S": "0", "BREAKER_FAILURES": "0", "LOG_LEVEL": "INFO", **probe, **env}
    return Service(settings, tmp_path, gc_probe.command(ROOT / "chatsvc.py")).start(), report


@pytest.fixture
def probed(fake_model: FakeModel, tmp_path: Path) -> Iterator[tuple[Service, Path]]:
    """chatsvc under the probe, with two model servers: "a" serves one model and fails, so that its
    chats fail over to "b" (the session's fake model), which serves every model."""
    failing = FakeModel().start()
    failing.forced = {"status": "503"}
    upstreams = [
        {"name": "a", "base_url": failing.base_url, "models": ["failover-model"]},
        {"name": "b", "base_url": fake_model.base_url},
    ]
    service, report = start_probed(
        tmp_path,
        UPSTREAMS=json.dumps(upstreams),
        ALLOWED_MODELS="gpt-4o-mini,failover-model",
        UPSTREAM_MAX_RETRIES="0",
        RESUME_GRACE_S="5",
        SHUTDOWN_GRACE_S="0.5",
    )
    try:
        yield service, report
    finally:
        service.stop()
        failing.stop()


def read_to_end(client: httpx.Client, method: str, url: str, **kwargs: Any) -> list[str]:
    """The events' names of a whole response (none for a response that is not a stream)."""
    with client.stream(method, url, **kwargs) as response:
        return [e.event or "" for e in iter_sse(response) if e.comment is None]


def take(response: httpx.Response, count: int) -> Iterator[Any]:
    """Read `count` events (no pings) of a response; the rest, as they come, from the iterator returned."""
    events = (e for e in iter_sse(response) if e.comment is None)
    for _ in range(count):
        next(events)
    return events


def every_way(service: Service, round_name: str) -> None:
    """Streams that end each way chatsvc knows, each read (or left) as a client would."""
    url = service.url
    with httpx.Client(timeout=30) as client:
        # Whole answers, on both protocols, and one from the second model server after the first failed.
        assert read_to_end(client, "POST", f"{url}/chat", json={"message": "fake:deltas=5"})[-1] == "done"
        failover = {"message": "fake:deltas=3", "model": "failover-model"}
        assert read_to_end(client, "POST", f"{url}/chat", json=failover)[-1] == "done"
        ui = {
            "id": f"chat-{round_name}",
            "trigger": "submit-message",
            "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": "fake:deltas=4"}]}],
        }
        assert read_to_end(client, "POST", f"{url}/api/chat", json=ui)  # to its end marker
        # The model server's failures: before any content and mid-stream, in-band, garbage, no
        # finish_reason, before the headers.
        for fault in ("die_after=0", "die_after=2", "error_after=2", "garbage_after=2", "no_finish=1"):
            events = read_to_end(client, "POST", f"{url}/chat", json={"message": f"fake:deltas=4,{fault}"})
            assert events[-1] == "error", (fault, events)
        assert client.post(f"{url}/chat", json={"message": "fake:status=500"}).status_code == 502

        # Stopped by DELETE after the event the client showed; resumed after a dropped connection; sent
        # again with its Idempotency-Key while it runs; left for good (abandoned after the grace).
        slow = {"message": "fake:deltas=40,delay=0.01"}
        long = {"message": "fake:deltas=2000,delay=0.01"}  # 20 s: ended by the client, not by the model
        with client.stream("POST", f"{url}/chat", json=long) as response:
            stream_id = response.headers["x-stream-id"]
            rest = take(response, 3)
            assert client.delete(f"{url}/chat/streams/{stream_id}", params={"after": "1"}).status_code == 204
            assert [e.event for e in rest][-1] == "done"
        left = f"left-{round_name}"
        with client.stream("POST", f"{url}/chat", json=long, headers={"X-Request-ID": left}) as response:
            stream_id = response.headers["x-stream-id"]
            take(response, 2)
        service.wait_for_log("stream_detached", left)
        with client.stream("GET", f"{url}/chat/streams/{stream_id}", params={"after": "1"}) as response:
            rest = take(response, 2)
            assert client.delete(f"{url}/chat/streams/{stream_id}").status_code == 204
            assert [e.event for e in rest][-1] == "done"
        key = {"Idempotency-Key": f"key-{round_name}"}
        with client.stream("POST", f"{url}/chat", json=slow, headers=key) as first:
            take(first, 2)
            assert read_to_end(client, "POST", f"{url}/chat", json=slow, headers=key)[-1] == "done"
        gone = f"gone-{round_name}"
        with client.stream("POST", f"{url}/chat", json=long, headers={"X-Request-ID": gone}) as response:
            take(response, 2)
        service.wait_for_log("client_disconnected", gone, timeout=30)  # after RESUME_GRACE_S


def left_behind(found: dict[str, Any]) -> dict[str, int]:
    """Of ours: what a cycle held but the responses, and what of the streams' objects is alive."""
    in_cycles = {kind: n for kind, n in found["ours"].items() if kind != HELD_BY_ANYIO}
    alive = {kind: n for kind, n in found["alive"].items() if kind.rsplit(".", 1)[-1] in STREAM_SCOPED}
    return {**in_cycles, **alive}


def explain(found: dict[str, Any]) -> str:
    """What was left behind, and for each kind what held one of them: where its cycle (or leak) comes from."""
    return json.dumps(left_behind(found)) + "".join(
        f"\n{kind}:\n" + "\n".join(lines) for kind, lines in found["why"].items() if kind != HELD_BY_ANYIO
    )


def test_no_stream_leaves_anything_of_ours_to_the_cycle_collector(probed: tuple[Service, Path]) -> None:
    service, report = probed
    every_way(service, "warm-up")  # imports, pools and first-use caches: not the streams' own
    gc_probe.report(service, report)
    every_way(service, "measured")
    found = gc_probe.report(service, report)
    assert left_behind(found) == {}, explain(found)

    # Drained: a stream that outlives SHUTDOWN_GRACE_S ends with `shutting_down`; the wrapper reports
    # once more as the process exits.
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", f"{service.url}/chat", json={"message": "fake:deltas=400,delay=0.05"}) as response,
    ):
        events = take(response, 1)
        service.signal(signal.SIGTERM)
        rest = list(events)
    assert rest[-1].event == "error"
    assert rest[-1].data["code"] == "shutting_down"
    assert service.exited() == 0
    at_exit = gc_probe.reports(report)[-1]
    assert left_behind(at_exit) == {}, explain(at_exit)


def test_a_replica_following_another_ones_streams_leaves_nothing_of_ours(
    start_service: StartService, fake_model: FakeModel, tmp_path: Path
) -> None:
    """The same, on a replica that follows, resumes, stops and replays streams that another one
    produces (RESUME_STORE, note 15): the store's copies it reads go with their followers."""
    for workdir in ("redis", "b"):
        (tmp_path / workdir).mkdir()
    redis_server = RedisServer(tmp_path / "redis").start()
    try:
        a = start_service(RESUME_STORE=redis_server.url, RESUME_GRACE_S="30")
        b, report = start_probed(
            tmp_path / "b", OPENAI_BASE_URL=fake_model.base_url, RESUME_STORE=redis_server.url, RESUME_GRACE_S="30"
        )
        try:
            across(a, b, "warm-up")
            gc_probe.report(b, report)
            across(a, b, "measured")
            found = gc_probe.report(b, report)
            assert found["ours"].get(HELD_BY_ANYIO), "no follower on B was measured"
            assert left_behind(found) == {}, explain(found)
        finally:
            b.stop()
    finally:
        redis_server.kill()


def across(a: Service, b: Service, round_name: str) -> None:
    """Streams produced on A, followed on B: whole, left part-way, stopped from B after an event, and
    a request sent again on B with the Idempotency-Key it came with on A; an AI SDK chat too."""
    slow = {"message": "fake:deltas=40,delay=0.01"}
    long = {"message": "fake:deltas=2000,delay=0.01"}
    with httpx.Client(timeout=30) as client:
        for message, way in ((slow, "whole"), (long, "left"), (long, "stopped")):
            with client.stream("POST", f"{a.url}/chat", json=message) as on_a:
                stream_id = on_a.headers["x-stream-id"]
                take(on_a, 2)
                with client.stream("GET", f"{b.url}/chat/streams/{stream_id}", params={"after": "1"}) as on_b:
                    rest = take(on_b, 1)
                    if way == "stopped":
                        stop = client.delete(f"{b.url}/chat/streams/{stream_id}", params={"after": "2"})
                        assert stop.status_code == 204
                    if way != "left":
                        assert [e.event for e in rest][-1] == "done"
                if way == "left":  # B's follower is gone: end the stream on A
                    assert client.delete(f"{a.url}/chat/streams/{stream_id}").status_code == 204
        key = {"Idempotency-Key": f"key-{round_name}"}
        with client.stream("POST", f"{a.url}/chat", json=slow, headers=key) as first:
            take(first, 2)
            again = client.post(f"{b.url}/chat", json=slow, headers=key)
            assert again.status_code == 200, again.text
            assert parse_sse(again.text)[-1].event == "done"
        chat_id = f"chat-{round_name}"
        ui = {
            "id": chat_id,
            "trigger": "submit-message",
            "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": slow["message"]}]}],
        }
        with client.stream("POST", f"{a.url}/api/chat", json=ui) as on_a:
            take(on_a, 2)  # the browser's owner cookie is the client's now
            assert read_to_end(client, "GET", f"{b.url}/api/chat/{chat_id}/stream")  # to its end marker
