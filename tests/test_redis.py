"""Resume on any replica (note 15): a real redis-server (Debian's, installed by
tests/install-debian.sh) on a loopback port, and two chatsvc replicas, A and B, sharing it with
RESUME_STORE=redis://. A stream started on A is resumed, followed and stopped on B, by Python and by
the real JS clients through a proxy that cuts the connection and sends the reconnect to B; then the
faults: Redis unreachable at start, killed mid-stream and restarted, slow, and a replica restarted
during a follow. (RESUME_STORE=memory, the default, is what every other test runs.)"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.cutting_proxy import CuttingProxy, at_marker
from tests.fake_model import FakeModel, expected_text
from tests.helpers import (
    ROOT,
    UI_STREAM_END,
    Event,
    Service,
    StartService,
    free_port,
    iter_sse,
    parse_sse,
    scrape,
    text_of,
    ui_chunks,
    ui_text_of,
)
from tests.otlp_receiver import OTLPReceiver
from tests.spec import assert_error_response
from tests.test_js_clients import ANSWER, assert_whole_once, node

pytestmark = pytest.mark.slow

SLOW = "fake:deltas=30,delay=0.05"  # 1.5 s of answer
KEY, OTHER_KEY = "redis-test-key-0123456789", "redis-test-key-other-98765"
AUTH = {"Authorization": f"Bearer {KEY}"}


class RedisServer:
    """Debian's redis-server on a loopback port, no persistence; started and stopped by PID."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is missing: bash tests/install-debian.sh (make test runs it)"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--enable-debug-command", "local", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + 20
        while True:  # polling a child that has no readiness signal to await
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert self.proc.poll() is None, "redis-server exited"
                assert time.monotonic() < deadline, "redis-server did not answer within 20 s"
                time.sleep(0.02)
        client.close()
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.kill()


def replica(start_service: StartService, store: str, **env: str) -> Service:
    settings = {"RESUME_GRACE_S": "30", "SERVICE_API_KEYS": f"{KEY},{OTHER_KEY}", "PING_INTERVAL_S": "0.2", **env}
    svc: Service = start_service(RESUME_STORE=store, **settings)
    return svc


@pytest.fixture(scope="module")
def pair(start_module_service: StartService, redis_server: RedisServer) -> tuple[Service, Service]:
    return replica(start_module_service, redis_server.url), replica(start_module_service, redis_server.url)


def post(svc: Service, message: str, rid: str, headers: dict[str, str] | None = None) -> Any:
    client = httpx.Client(timeout=30)
    return client, client.stream(
        "POST", f"{svc.url}/chat", json={"message": message}, headers={"X-Request-ID": rid, **AUTH, **(headers or {})}
    )


@contextmanager
def resume_after(svc: Service, stream_id: str, last: Event) -> Iterator[httpx.Response]:
    """GET the stream on `svc` from after `last`, as a client that was cut off reconnects there."""
    with (
        httpx.Client(timeout=30) as client,
        client.stream(
            "GET", f"{svc.url}/chat/streams/{stream_id}", headers={**AUTH, "Last-Event-ID": last.id or ""}
        ) as response,
    ):
        yield response


def start_and_leave(svc: Service, message: str, rid: str, count: int) -> tuple[str, list[Event]]:
    """Start a stream on `svc`, read `count` events (pings left out), hang up."""
    client, stream = post(svc, message, rid)
    with client, stream as response:
        assert response.status_code == 200, response.read()
        events = (e for e in iter_sse(response) if e.comment is None)
        got = [next(events) for _ in range(count)]
        stream_id = response.headers["x-stream-id"]
    svc.wait_for_log("stream_detached", rid)
    return stream_id, got


def get_stream(svc: Service, stream_id: str, headers: dict[str, str] | None = None, **params: str) -> httpx.Response:
    """GET /chat/streams/{id} with the key, read whole, whatever its status."""
    with httpx.Client(timeout=30) as client:
        return client.get(f"{svc.url}/chat/streams/{stream_id}", headers={**AUTH, **(headers or {})}, params=params)


def wait_for_state(redis_server: RedisServer, stream_id: str, state: bytes | None) -> None:
    """The stream's facts in Redis say `state`: the copy is written behind the stream, so it comes a
    write round (STORE_WRITE_INTERVAL_S) after what the client and the log already saw."""
    client = redis_server.client()
    facts_key = f"chatsvc:{{{stream_id}}}:facts"
    deadline = time.monotonic() + 10
    while client.hget(facts_key, "state") != state:
        assert time.monotonic() < deadline, client.hgetall(facts_key)
        time.sleep(0.01)  # polling Redis: there is no event to await from here
    client.close()


# Any replica serves any stream ------------------------------------------------------------------------


def test_a_stream_cut_on_a_is_resumed_on_b_exactly_once(pair: tuple[Service, Service], fake_model: FakeModel) -> None:
    a, b = pair
    seen = len(fake_model.requests)
    stream_id, got = start_and_leave(a, SLOW, "r-ab-1", 4)
    response = get_stream(b, stream_id, {"Last-Event-ID": got[-1].id or ""})
    assert response.status_code == 200
    assert response.headers["x-stream-id"] == stream_id
    rest = parse_sse(response.text)
    events = got + rest
    assert [e.id for e in events] == [f"{stream_id}:{i}" for i in range(len(events))]
    assert text_of(events) == expected_text(SLOW)
    assert [e.event for e in events].count("done") == 1
    assert events[-1].event == "done"
    assert len(fake_model.requests) == seen + 1
    assert b.wait_for_log("stream_resumed")["from_seq"] == 4


def test_b_replays_from_every_position_what_a_sent(pair: tuple[Service, Service]) -> None:
    a, b = pair
    response, whole = a.chat({"message": "fake:deltas=6"}, headers=AUTH)
    stream_id = response.headers["x-stream-id"]
    for after in range(-1, len(whole) - 1):
        assert [e.id for e in parse_sse(get_stream(b, stream_id, after=str(after)).text)] == [
            e.id for e in whole[after + 1 :]
        ]
    assert [(e.event, e.data) for e in parse_sse(get_stream(b, stream_id).text)] == [(e.event, e.data) for e in whole]
    # Nothing left after the terminal event: 204, which stops an EventSource.
    finished = get_stream(b, stream_id, {"Last-Event-ID": whole[-1].id or ""})
    assert finished.status_code == 204


def test_b_follows_a_live_stream_as_a_writes_it(pair: tuple[Service, Service]) -> None:
    a, b = pair
    client, stream = post(a, "fake:deltas=20,delay=0.05", "r-live")
    with client, stream as response:
        stream_id = response.headers["x-stream-id"]
        on_b = parse_sse(get_stream(b, stream_id).text)  # starts while A is at the first events
        on_a = [e for e in iter_sse(response) if e.comment is None]
    assert [(e.id, e.event, e.data) for e in on_b] == [(e.id, e.event, e.data) for e in on_a]
    assert on_b[-1].event == "done"
    assert b.logs_for("r-live") == []  # B only followed: the stream is A's
    assert any(r["event"] == "stream_resumed" and r.get("stream_id") == stream_id for r in b.logs())


def test_delete_on_b_stops_as_upstream(pair: tuple[Service, Service], fake_model: FakeModel) -> None:
    a, b = pair
    client, stream = post(a, "fake:deltas=200,delay=0.05", "r-del")
    with client, stream as response:
        stream_id = response.headers["x-stream-id"]
        events = (e for e in iter_sse(response) if e.comment is None)
        assert [next(events).event for _ in range(3)] == ["meta", "delta", "delta"]
        upstream = fake_model.last()
        with httpx.Client(timeout=30) as other:
            deleted = other.delete(f"{b.url}/chat/streams/{stream_id}", headers={**AUTH, "X-Request-ID": "r-del-b"})
        assert deleted.status_code == 204
        assert upstream.closed.wait(10), "A's upstream connection was not closed"
        rest = list(events)
    assert rest[-1].event == "done"
    assert rest[-1].data["finish_reason"] == "cancelled"
    # A logs it with the id of the DELETE that B received: one id across the replicas.
    assert a.wait_for_log("stream_cancelled", "r-del-b")["stream_id"] == stream_id
    with httpx.Client(timeout=30) as other:  # idempotent, on either replica
        assert other.delete(f"{b.url}/chat/streams/{stream_id}", headers=AUTH).status_code == 204
        assert other.delete(f"{a.url}/chat/streams/{stream_id}", headers=AUTH).status_code == 204


def test_a_stop_on_b_after_an_event_ends_the_answer_there_on_both(
    pair: tuple[Service, Service], redis_server: RedisServer
) -> None:
    """Note 22 across replicas: the store's copy already holds events past the cut, and a follower
    on B has read some of them; the cut reaches the copy in order with the appends."""
    a, b = pair
    client, stream = post(a, "fake:deltas=200,delay=0.02,usage=0", "r-cut")
    with client, stream as response:
        stream_id = response.headers["x-stream-id"]
        events = (e for e in iter_sse(response) if e.comment is None)
        got = [next(events) for _ in range(8)]
        with resume_after(b, stream_id, got[6]) as on_b:  # its events come from the store's copy
            sse_b = iter_sse(on_b)
            first_on_b = until_first(sse_b)
            assert first_on_b.id == f"{stream_id}:7"
            with httpx.Client(timeout=30) as other:
                deleted = other.delete(
                    f"{b.url}/chat/streams/{stream_id}",
                    params={"after": "3"},
                    headers={**AUTH, "X-Request-ID": "r-cut-b"},
                )
            assert deleted.status_code == 204
            rest_b = until_terminal(sse_b)
        rest = until_terminal(events)
    end = f"{stream_id}:4"
    # Both followers had events past the cut: each gets the one terminal event that the log holds.
    for followed in (rest, rest_b):
        assert [e.event for e in followed].count("done") == 1
        assert (followed[-1].id, followed[-1].event) == (end, "done")
        assert followed[-1].data["finish_reason"] == "cancelled"
    assert a.wait_for_log("stream_cancelled", "r-cut-b")["after"] == 3
    wait_for_state(redis_server, stream_id, b"finished")
    for svc in (a, b):
        replay = parse_sse(get_stream(svc, stream_id).text)
        assert [e.id for e in replay] == [f"{stream_id}:{i}" for i in range(5)]
        assert [e.data for e in replay[:4]] == [e.data for e in got[:4]]
        assert replay[-1].data == rest[-1].data
        assert replay[-1].data["usage"]["completion_tokens"] == 3
        assert [e.event for e in parse_sse(get_stream(svc, stream_id, after="3").text)] == ["done"]
        # A client that showed an event the cut removed, back after the end: the end, here or there.
        past_cut = parse_sse(get_stream(svc, stream_id, {"Last-Event-ID": f"{stream_id}:7"}).text)
        assert [(e.id, e.event) for e in past_cut] == [(end, "done")]


def test_the_key_binding_holds_across_replicas(pair: tuple[Service, Service]) -> None:
    a, b = pair
    response, _ = a.chat({"message": "fake:deltas=2"}, headers=AUTH)
    stream_id = response.headers["x-stream-id"]
    other = {"Authorization": f"Bearer {OTHER_KEY}"}
    for method in ("GET", "DELETE"):
        refused = httpx.request(method, f"{b.url}/chat/streams/{stream_id}", headers=other, timeout=30)
        assert_error_response(refused, 404, "stream_not_found")
    assert get_stream(b, stream_id).status_code == 200


def test_the_store_holds_no_key_and_no_text_beyond_the_events(
    pair: tuple[Service, Service], redis_server: RedisServer
) -> None:
    a, _ = pair
    marker = "words-of-the-user-7f3a"
    response, _ = a.chat({"message": f"fake:deltas=2,{marker}"}, headers=AUTH)
    stream_id = response.headers["x-stream-id"]
    wait_for_state(redis_server, stream_id, b"finished")
    client = redis_server.client()
    keys = sorted(k.decode() for k in client.scan_iter(f"*{stream_id}*"))
    assert keys == [f"chatsvc:{{{stream_id}}}:events", f"chatsvc:{{{stream_id}}}:facts"]
    facts: dict[bytes, bytes] = client.hgetall(f"chatsvc:{{{stream_id}}}:facts")  # type: ignore[assignment]
    dumped = json.dumps({k.decode(): v.decode() for k, v in facts.items()})
    dumped += str(client.xrange(f"chatsvc:{{{stream_id}}}:events"))
    assert KEY not in dumped
    assert marker not in dumped
    assert len(facts[b"owner"]) == 64  # a keyed digest: not the SHA-256 of the key either
    assert facts[b"owner"].decode() != hashlib.sha256(KEY.encode()).hexdigest()
    # Finished: the keys expire after RESUME_TTL_S (60 s by default).
    assert 0 < client.pttl(f"chatsvc:{{{stream_id}}}:events") <= 60_000
    client.close()


def test_an_ai_sdk_chat_started_on_a_is_replayed_on_b(pair: tuple[Service, Service]) -> None:
    a, b = pair
    body = {"id": "chat-across", "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": SLOW}]}]}
    body["trigger"] = "submit-message"
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{a.url}/api/chat", json=body, headers=AUTH) as response:
            assert response.status_code == 200
            next(response.iter_lines())  # the start, then hang up
        replayed = client.get(f"{b.url}/api/chat/chat-across/stream", headers=AUTH)
    assert replayed.status_code == 200
    chunks = [c for c in ui_chunks(replayed.text) if c != UI_STREAM_END]
    assert ui_text_of(chunks) == expected_text(SLOW)
    assert chunks[-1]["type"] == "finish"
    with httpx.Client(timeout=30) as client:  # delivered whole (on B): nothing in progress any more
        assert client.get(f"{a.url}/api/chat/chat-across/stream", headers=AUTH).status_code == 204


@pytest.fixture(scope="module")
def keyless_pair(start_module_service: StartService, redis_server: RedisServer) -> tuple[Service, Service]:
    """Two replicas without SERVICE_API_KEYS: an AI SDK chat is its owner cookie's (note 21)."""
    a: Service = start_module_service(RESUME_STORE=redis_server.url, RESUME_GRACE_S="30")
    b: Service = start_module_service(RESUME_STORE=redis_server.url, RESUME_GRACE_S="30")
    return a, b


def test_without_keys_an_ai_sdk_chat_is_its_owners_on_every_replica(
    keyless_pair: tuple[Service, Service], redis_server: RedisServer
) -> None:
    """Bug: without keys, anyone with the chat id read it on any replica, and a POST of the same id
    on B took the chat over. Fix: the owner cookie's digest names the chat in the store too."""
    a, b = keyless_pair
    ui = {"id": "chat-owned-across", "trigger": "submit-message"}
    mine = {**ui, "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": SLOW}]}]}
    theirs = {**ui, "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": "fake:deltas=2"}]}]}
    with httpx.Client(timeout=30) as owner:
        with owner.stream("POST", f"{a.url}/api/chat", json=mine) as response:
            assert response.status_code == 200
            stream_id = response.headers["x-stream-id"]
            next(response.iter_lines())  # the start, then hang up
        for cookies in ({}, {"chatsvc_owner": "0" * 32}):
            with httpx.Client(timeout=30, cookies=cookies) as stranger:
                read = stranger.get(f"{b.url}/api/chat/chat-owned-across/stream")
                assert (read.status_code, read.content) == (204, b"")
                assert stranger.delete(f"{b.url}/api/chat/chat-owned-across/stream").status_code == 204
                assert stranger.post(f"{b.url}/api/chat", json=theirs).status_code == 200  # a chat of its own
        replayed = owner.get(f"{b.url}/api/chat/chat-owned-across/stream")  # the cookie A set, sent to B
        assert replayed.status_code == 200
        chunks = [c for c in ui_chunks(replayed.text) if c != UI_STREAM_END]
        assert ui_text_of(chunks) == expected_text(SLOW)
        assert chunks[-1]["type"] == "finish"
        assert owner.get(f"{a.url}/api/chat/chat-owned-across/stream").status_code == 204  # once
        token = owner.cookies["chatsvc_owner"]
    client = redis_server.client()
    facts: dict[bytes, bytes] = client.hgetall(f"chatsvc:{{{stream_id}}}:facts")  # type: ignore[assignment]
    assert re.fullmatch(rb"[0-9a-f]{64}", facts[b"owner"])  # a digest of the cookie, never the cookie
    stored = [*client.scan_iter("chatsvc:*")]
    stored += [v for k in stored if client.type(k) == b"hash" for v in client.hvals(k)]
    assert not [item for item in stored if token.encode() in item]
    client.close()


# The real JS clients, the reconnect sent to the other replica --------------------------------------


def test_fetch_event_source_cut_on_a_resumes_on_b(pair: tuple[Service, Service], fake_model: FakeModel) -> None:
    a, b = pair
    seen = len(fake_model.requests)
    proxy = CuttingProxy(a.port, at_marker(b"event: delta", 3, len(b'event: delta\r\ndata: {"con')), b.port).start()
    try:
        result = node("fetch_event_source.mjs", f"http://127.0.0.1:{proxy.port}/chat", ANSWER, json.dumps(AUTH))
    finally:
        proxy.stop()
    assert proxy.cut_done.is_set()
    assert result["statuses"] == [200, 200]
    assert_whole_once(result["events"], ANSWER)
    assert len(fake_model.requests) == seen + 1
    stream_id = result["events"][0]["data"]["stream_id"]
    assert [r["via"] for r in b.logs() if r["event"] == "stream_resumed" and r.get("stream_id") == stream_id] == [
        "post"
    ]


def test_eventsource_cut_on_a_resumes_on_b_and_stops(pair: tuple[Service, Service], fake_model: FakeModel) -> None:
    a, b = pair
    seen = len(fake_model.requests)
    stream_id, _ = start_and_leave(a, ANSWER, "r-es", 1)
    proxy = CuttingProxy(a.port, at_marker(b"event: delta", 3, 5), b.port).start()
    try:
        url = f"http://127.0.0.1:{proxy.port}/chat/streams/{stream_id}"
        result = node("eventsource.mjs", url, json.dumps(AUTH))
    finally:
        proxy.stop()
    assert proxy.cut_done.is_set()
    assert_whole_once(result["events"], ANSWER)
    assert result["opens"] == 2
    # A completion names the route's template; the arrival, the path it came with.
    path = f"/chat/streams/{stream_id}"
    ids = {r["correlation_id"] for r in b.logs() if r["event"] == "request_received" and r.get("path") == path}
    assert [r["status"] for r in b.logs() if r["event"] == "request_completed" and r["correlation_id"] in ids] == [204]
    assert len(fake_model.requests) == seen + 1


# Faults ---------------------------------------------------------------------------------------------


def test_an_unreachable_store_at_start_exits_2_naming_it(tmp_path: Path, fake_model: FakeModel) -> None:
    svc = Service(
        {"OPENAI_BASE_URL": fake_model.base_url, "RESUME_STORE": f"redis://127.0.0.1:{free_port()}/0"}, tmp_path
    )
    done = subprocess.run(svc.command, env=svc.env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    message = json.loads(done.stderr.strip().splitlines()[-1])
    assert set(message) == {"error", "detail", "action"}
    assert "RESUME_STORE" in message["detail"]
    assert "RESUME_STORE" in message["action"]


REDIS_PROBE = """
import sys
import chatsvc
imported = {"redis", "redis_store"} & set(sys.modules)
chatsvc.create_app()  # builds the store, which connects only when the lifespan starts it
print(sorted(imported), sorted({"redis", "redis_store"} & set(sys.modules)))
"""


@pytest.mark.parametrize(("store", "loaded"), [("memory", "[]"), ("redis://127.0.0.1:9/0", "['redis', 'redis_store']")])
def test_redis_py_is_loaded_only_with_a_redis_store(store: str, loaded: str, tmp_path: Path) -> None:
    """Note 15: redis-py loads OpenTelemetry's metrics SDK when that is installed (60 ms, and an SDK
    that note 14 keeps out): importing chatsvc loads neither it nor redis_store, and only
    RESUME_STORE=redis:// does."""
    done = subprocess.run(
        [sys.executable, "-c", REDIS_PROBE],
        env={**os.environ, "PYTHONPATH": str(ROOT), "OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "RESUME_STORE": store},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == f"[] {loaded}"


def test_redis_lost_mid_stream_then_back(
    start_service: StartService, tmp_path_factory: pytest.TempPathFactory, fake_model: FakeModel
) -> None:
    server = RedisServer(tmp_path_factory.mktemp("redis-lost")).start()
    a, b = replica(start_service, server.url), replica(start_service, server.url)
    try:
        client, stream = post(a, "fake:deltas=30,delay=0.05", "r-lost")
        with client, stream as response:
            stream_id = response.headers["x-stream-id"]
            events = (e for e in iter_sse(response) if e.comment is None)
            got = [next(events) for _ in range(3)]
            server.kill()
            got += list(events)  # the live stream goes on, unharmed
        assert text_of(got) == expected_text("fake:deltas=30,delay=0.05")
        assert got[-1].event == "done"
        a.wait_for_log("store_write_failed", "r-lost")
        assert scrape(a).value("chatsvc_store_unresumable_streams_total", reason="failed") >= 1
        assert scrape(a).value("chatsvc_store_writes_total", result="failed") >= 1

        unavailable = get_stream(b, stream_id)
        assert_error_response(unavailable, 503, "resume_unavailable")
        assert int(unavailable.headers["retry-after"]) >= 1
        assert_error_response(httpx.get(f"{b.url}/readyz"), 503, "resume_unavailable")
        assert get_stream(a, stream_id).status_code == 200  # A still has it, in memory

        port, server = server.port, RedisServer(server.workdir)
        server.port = port  # Redis back where the replicas look for it
        server.start()
        assert httpx.get(f"{b.url}/readyz").status_code == 200
        stream_id, got = start_and_leave(a, SLOW, "r-back", 3)  # new streams are stored again
        rest = parse_sse(get_stream(b, stream_id, {"Last-Event-ID": got[-1].id or ""}).text)
        assert text_of(got + rest) == expected_text(SLOW)
    finally:
        server.kill()


def test_a_slow_store_never_holds_up_the_live_stream(start_service: StartService, redis_server: RedisServer) -> None:
    a = replica(start_service, redis_server.url, RESUME_STORE_TIMEOUT_S="0.3")
    finished_while_redis_slept = threading.Event()
    slept = threading.Event()

    def sleep_redis() -> None:
        with redis_server.client() as client:
            client.execute_command("DEBUG", "SLEEP", "3")
        slept.set()

    client, stream = post(a, "fake:deltas=10,delay=0.05", "r-slow")
    with client, stream as response:
        events = (e for e in iter_sse(response) if e.comment is None)
        assert next(events).event == "meta"
        sleeper = threading.Thread(target=sleep_redis)
        sleeper.start()
        rest = list(events)
        if not slept.is_set():
            finished_while_redis_slept.set()
    sleeper.join()
    assert rest[-1].event == "done"
    assert finished_while_redis_slept.is_set(), "the stream waited for Redis"
    failed = a.wait_for_log("store_write_failed", "r-slow")
    assert failed["exception"] in ("TimeoutError", "CancelledError")


def test_a_backlog_over_the_queue_bound_marks_the_stream_unresumable_elsewhere(
    start_service: StartService, redis_server: RedisServer, pair: tuple[Service, Service]
) -> None:
    _, b = pair
    a = replica(start_service, redis_server.url, RESUME_STORE_QUEUE_MB="0.01")  # 10 KiB
    response, events = a.chat({"message": "fake:huge=20000"}, headers={**AUTH, "X-Request-ID": "r-big"})
    assert events[-1].event == "done"  # the live stream is whole
    assert a.wait_for_log("store_behind", "r-big")["stream_id"] == response.headers["x-stream-id"]
    assert scrape(a).value("chatsvc_store_unresumable_streams_total", reason="behind") == 1
    wait_for_state(redis_server, response.headers["x-stream-id"], b"unresumable")
    refused = get_stream(b, response.headers["x-stream-id"])
    assert_error_response(refused, 503, "resume_unavailable")
    assert get_stream(a, response.headers["x-stream-id"]).status_code == 200  # A has it whole


def test_replica_b_restarted_during_a_follow(
    start_service: StartService, redis_server: RedisServer, pair: tuple[Service, Service]
) -> None:
    a, _ = pair
    b = replica(start_service, redis_server.url)
    stream_id, got = start_and_leave(a, "fake:deltas=40,delay=0.05", "r-restart", 2)
    with resume_after(b, stream_id, got[-1]) as response:
        events = (e for e in iter_sse(response) if e.comment is None)
        got += [next(events) for _ in range(3)]
        b.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        with pytest.raises(httpx.HTTPError):
            got += list(events)
    b.proc.wait()  # type: ignore[union-attr]
    b2 = replica(start_service, redis_server.url)  # B again, after its restart
    got += parse_sse(get_stream(b2, stream_id, {"Last-Event-ID": got[-1].id or ""}).text)
    assert [e.id for e in got] == [f"{stream_id}:{i}" for i in range(len(got))]
    assert text_of(got) == expected_text("fake:deltas=40,delay=0.05")
    assert got[-1].event == "done"


def test_the_store_metrics_count_writes_and_their_latency(pair: tuple[Service, Service]) -> None:
    a, _ = pair
    before = scrape(a).value("chatsvc_store_writes_total", result="ok")
    a.chat({"message": "fake:deltas=3"}, headers=AUTH)
    assert scrape(a).value("chatsvc_store_writes_total", result="ok") > before
    # One scrape: the writer counts a round trip's outcome and its latency together, and another
    # write may land between two scrapes.
    metrics = scrape(a)
    observed, ok = (
        metrics.value("chatsvc_store_write_seconds_count"),
        metrics.value("chatsvc_store_writes_total", result="ok"),
    )
    assert observed == ok  # every successful round trip's latency is observed


def test_a_resume_on_b_links_to_the_upstream_span_on_a(start_service: StartService, redis_server: RedisServer) -> None:
    """Traces across replicas (note 14): the producer's span ids travel in the stream's facts."""
    receiver = OTLPReceiver().start()
    try:
        otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"}
        a, b = replica(start_service, redis_server.url, **otel), replica(start_service, redis_server.url, **otel)
        stream_id, got = start_and_leave(a, SLOW, "r-link", 3)
        resumed = get_stream(b, stream_id, {"Last-Event-ID": got[-1].id or "", "X-Request-ID": "r-link-b"})
        assert resumed.status_code == 200
        trace_id = a.wait_for_log("request_completed", "r-link")["trace_id"]
        upstream = receiver.wait_for(lambda spans: next((s for s in spans if s.name.startswith("chat ")), None))
        follower = receiver.wait_for(
            lambda spans: next((s for s in spans if s.name == "GET /chat/streams/{stream_id}"), None)
        )
        assert upstream.trace_id == trace_id
        assert follower.links == [(trace_id, upstream.span_id)]
        assert follower.trace_id != trace_id  # a trace of its own, linked
    finally:
        receiver.stop()


# Lifetimes across replicas: the grace counts remote followers, a lost producer ends its followers,
# every key expires, and the DELETE listener survives what Redis sends it --------------------------


@pytest.fixture(scope="module")
def short_grace(start_module_service: StartService, redis_server: RedisServer) -> tuple[Service, Service]:
    """Two replicas whose grace (1 s) is far shorter than the streams that the tests cut, and whose
    finished streams expire at once (RESUME_TTL_S 0.5 s)."""
    env = {"RESUME_GRACE_S": "1", "RESUME_TTL_S": "0.5"}
    return tuple(replica(start_module_service, redis_server.url, **env) for _ in range(2))  # type: ignore[return-value]


def until_first(sse: Iterator[Event]) -> Event:
    """The first event of `iter_sse` that is not a ping."""
    return next(e for e in sse if e.comment is None)


def until_terminal(sse: Iterator[Event], bound_s: float = 20) -> list[Event]:
    """The events (pings left out) of `iter_sse` up to the terminal one or the end of the body; pings
    alone must not keep a follower waiting: past `bound_s` the follow is a failure."""
    deadline = time.monotonic() + bound_s
    events: list[Event] = []
    for event in sse:
        assert time.monotonic() < deadline, f"still following after {bound_s} s: {events[-1:]}"
        if event.comment is None:
            events.append(event)
            if event.event in ("done", "error"):
                break
    return events


def test_a_stream_followed_only_on_b_outlives_the_grace_on_a(
    short_grace: tuple[Service, Service], fake_model: FakeModel
) -> None:
    """Bug: A never learnt that B followed the stream cut on A; its grace ran out, the stream was
    dropped and B's client got pings, then a close with no terminal event. Fix: remote followers keep
    a presence key alive and A's grace counts from its lapse."""
    a, b = short_grace
    answer = "fake:deltas=40,delay=0.1"  # 4 s: three times the grace past the cut
    stream_id, got = start_and_leave(a, answer, "r-grace", 3)
    with resume_after(b, stream_id, got[-1]) as response:
        assert response.status_code == 200
        got += until_terminal(iter_sse(response))
    assert [e.id for e in got] == [f"{stream_id}:{i}" for i in range(len(got))]
    assert got[-1].event == "done", got[-1]
    assert text_of(got) == expected_text(answer)
    assert a.wait_for_log("request_completed", "r-grace")["stream_id"] == stream_id
    assert not any(r["event"] == "client_disconnected" for r in a.logs_for("r-grace"))


def test_a_follower_on_b_of_a_killed_replica_ends_with_a_retryable_error(
    start_service: StartService, redis_server: RedisServer, short_grace: tuple[Service, Service]
) -> None:
    """Bug: when the producing replica died, a follower on another replica got pings for as long as
    the stream's facts lived, then a silent close. Fix: each replica keeps a liveness key alive; a
    follower that sees neither new events nor its producer's replica ends with `stream_lost`."""
    _, b = short_grace
    a = replica(start_service, redis_server.url, RESUME_GRACE_S="1")
    stream_id, got = start_and_leave(a, "fake:deltas=200,delay=0.1", "r-killed", 2)
    with resume_after(b, stream_id, got[-1]) as response:
        sse = iter_sse(response)
        got.append(next(e for e in sse if e.comment is None))
        a.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        a.proc.wait()  # type: ignore[union-attr]
        got += until_terminal(sse)
    terminal = got[-1]
    assert terminal.event == "error", terminal
    assert terminal.data["code"] == "stream_lost"
    assert terminal.data["retryable"] is True
    assert {"error", "detail", "action", "usage"} <= set(terminal.data)
    assert [e.event for e in got].count("error") == 1
    assert terminal.id == f"{stream_id}:{len(got) - 1}"


def assert_every_key_expires(redis_server: RedisServer) -> list[str]:
    client = redis_server.client()
    keys = [k.decode() for k in client.scan_iter(count=1000)]
    ttls = {k: client.pttl(k) for k in keys}
    client.close()
    assert {k: ttl for k, ttl in ttls.items() if ttl == -1} == {}  # -2: expired between the two calls
    return keys


def test_every_key_in_the_store_expires(
    start_service: StartService, redis_server: RedisServer, short_grace: tuple[Service, Service], fake_model: FakeModel
) -> None:
    """Bug: a client that took its answer after RESUME_TTL_S left a facts key holding only
    `delivered`, with no expiry. Fix: every write that can create a key sets its expiry with it."""
    a, b = short_grace
    # Mid-stream: A producing, B following (its presence key), A's replica key.
    client, stream = post(a, "fake:deltas=20,delay=0.05", "r-ttl-live")
    with client, stream as response:
        stream_id = response.headers["x-stream-id"]
        with (
            httpx.Client(timeout=30) as other,
            other.stream("GET", f"{b.url}/chat/streams/{stream_id}", headers=AUTH) as followed,
        ):
            live = iter_sse(followed)
            assert [next(e for e in live if e.comment is None).event for _ in range(3)] == [
                "meta",
                "delta",
                "delta",
            ]
            keys = assert_every_key_expires(redis_server)
            assert f"chatsvc:{{{stream_id}}}:events" in keys
            assert until_terminal(live)[-1].event == "done"
        assert until_terminal(iter_sse(response))[-1].event == "done"
    # Every ending: done, error, cancelled, an AI SDK chat, and an answer taken after RESUME_TTL_S.
    a.chat({"message": "fake:deltas=3"}, headers=AUTH)
    _, failed = a.chat({"message": "fake:deltas=3,error_after=2"}, headers=AUTH)
    assert failed[-1].event == "error"
    client, stream = post(a, "fake:deltas=200,delay=0.05", "r-ttl-del")
    with client, stream as response:
        stream_id = response.headers["x-stream-id"]
        sse = iter_sse(response)
        assert next(e for e in sse if e.comment is None).event == "meta"
        assert httpx.delete(f"{b.url}/chat/streams/{stream_id}", headers=AUTH).status_code == 204
        assert until_terminal(sse)[-1].data["finish_reason"] == "cancelled"
    body = {"id": "chat-ttl", "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": "hi"}]}]}
    body["trigger"] = "submit-message"
    assert httpx.post(f"{a.url}/api/chat", json=body, headers=AUTH, timeout=30).status_code == 200
    with socket.socket() as sock:  # a client whose small receive window leaves the end unsent
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", a.port))
        payload = json.dumps({"message": "fake:huge=100000,deltas=60,delay=0.01"}).encode()  # 6 MB: over the buffers
        head = f"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer {KEY}\r\n"
        sock.sendall(f"{head}Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        start = sock.recv(4096)
        stream_id = re.search(rb"x-stream-id: ([0-9a-f]{32})", start, flags=re.IGNORECASE)[1].decode()  # type: ignore[index]
        wait_for_state(redis_server, stream_id, None)  # expired, the answer's end still unsent
        writes = scrape(a).value("chatsvc_store_writes_total", result="ok")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)  # now read it all, quickly
        received = start
        while not received.endswith(b"\r\n0\r\n\r\n"):  # the body's last chunk: after `delivered`
            chunk = sock.recv(1 << 20)
            assert chunk, received[-200:]
            received += chunk
    deadline = time.monotonic() + 10
    while scrape(a).value("chatsvc_store_writes_total", result="ok") == writes:  # `delivered` written
        assert time.monotonic() < deadline
        time.sleep(0.02)  # polling the metrics: there is no event to await from here
    assert_every_key_expires(redis_server)


def test_a_malformed_cancel_message_leaves_the_listener_alive(
    short_grace: tuple[Service, Service], redis_server: RedisServer
) -> None:
    """Bug: a message on the cancel channel that is not UTF-8 ended every replica's DELETE listener
    for good. Fix: it is logged and ignored. The listener also comes back after Redis drops it."""
    a, b = short_grace

    def deleted_on_b(rid: str, before: bytes | None = None) -> None:
        client, stream = post(a, "fake:deltas=200,delay=0.05", rid)
        with client, stream as response:
            stream_id = response.headers["x-stream-id"]
            sse = iter_sse(response)
            assert next(e for e in sse if e.comment is None).event == "meta"
            if before is not None:
                with redis_server.client() as client:
                    assert client.publish("chatsvc:cancel", before) >= 2  # A and B hear it first
            deleted = httpx.delete(f"{b.url}/chat/streams/{stream_id}", headers=AUTH, timeout=30)
            assert deleted.status_code == 204, deleted.text
            assert until_terminal(sse)[-1].data["finish_reason"] == "cancelled"

    deleted_on_b("r-bad-msg", before=b"\xff\xfe")
    assert a.wait_for_log("store_bad_message")["bytes"] == 2
    with redis_server.client() as client:  # Redis drops every subscriber: they subscribe again
        listening = client.pubsub_numsub("chatsvc:cancel")[0][1]
        assert client.client_kill_filter(_type="pubsub") == listening
        deadline = time.monotonic() + 10
        while client.pubsub_numsub("chatsvc:cancel")[0][1] < listening:
            assert time.monotonic() < deadline, "a replica did not subscribe again"
            time.sleep(0.02)  # polling Redis: there is no event to await from here
    deleted_on_b("r-after-kill")


def test_a_full_replica_never_evicts_a_stream_followed_on_another(
    start_service: StartService, redis_server: RedisServer, pair: tuple[Service, Service]
) -> None:
    """Bug: with every slot full, a new chat stopped the oldest stream detached on this replica, even
    one that a client followed on another replica (its grace runs here all the same, note 19). Fix:
    eviction asks the store first; a stream followed anywhere is never evicted."""
    a = replica(start_service, redis_server.url, MAX_CONCURRENT_STREAMS="1")
    _, b = pair
    answer = "fake:deltas=40,delay=0.1"
    stream_id, got = start_and_leave(a, answer, "r-evict-followed", 2)
    client = redis_server.client()
    with resume_after(b, stream_id, got[-1]) as response:
        assert response.status_code == 200
        sse = iter_sse(response)
        got.append(next(e for e in sse if e.comment is None))
        deadline = time.monotonic() + 10
        while not client.exists(f"chatsvc:{{{stream_id}}}:followed"):  # B's presence is in the store
            assert time.monotonic() < deadline, "no presence key for B's follower"
            time.sleep(0.01)  # polling Redis: there is no event to await from here
        refused = httpx.post(f"{a.url}/chat", json={"message": "hi"}, headers=AUTH, timeout=30)
        assert refused.status_code == 503, refused.text
        assert refused.json()["code"] == "overloaded"
        got += until_terminal(sse)
    client.close()
    assert got[-1].event == "done", got[-1]
    assert text_of(got) == expected_text(answer)
