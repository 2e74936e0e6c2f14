"""Followers are bounded (note 20): so many per stream and per process, each admitted or refused
with 503 `too_many_followers`; and a replay leaves in bounded pieces, so that a follower that does
not read is cut off after SEND_TIMEOUT_S holding little memory, however long the answer."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import Event, Service, StartService, iter_sse, scrape
from tests.spec import assert_error_response

LIVE = "fake:deltas=2,stall_after=2"  # a stream that stays live until its upstream is closed


@pytest.fixture(scope="module")
def bounded(start_module_service: StartService) -> Service:
    svc: Service = start_module_service(
        MAX_FOLLOWERS_PER_STREAM="2",
        MAX_FOLLOWERS="3",
        MAX_CONCURRENT_STREAMS="2",
        REQUEST_TIMEOUT_S="60",
        RESUME_GRACE_S="0",  # a stream nobody follows ends at once: the next test has its slots
    )
    return svc


def idle(service: Service) -> None:
    """Until the streams of an earlier test have ended: their clients' hang-ups reach the service
    asynchronously, and the producers end a moment later (polled: nothing to await from here)."""
    deadline = time.monotonic() + 10
    while scrape(service).value("chatsvc_active_streams") != 0:
        assert time.monotonic() < deadline, "streams of an earlier test are still running"
        time.sleep(0.05)


@contextmanager
def following(service: Service, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
    """A request whose response stays open (a follower) until the block is left."""
    with httpx.Client(timeout=30) as client, client.stream(method, f"{service.url}{path}", **kwargs) as response:
        if response.status_code != 200:
            response.read()
        yield response


def first_event(response: httpx.Response) -> Iterator[Event]:
    """Until the follower has its first event: it is admitted and counted by then. The rest of its
    events: the caller holds them (httpx closes a response whose iterator is dropped)."""
    assert response.status_code == 200, response.read()
    events = (e for e in iter_sse(response) if e.comment is None)
    assert next(events).event == "meta"
    return events


def assert_refused(response: httpx.Response) -> None:
    assert response.status_code == 503, response.status_code
    assert_error_response(response, 503, "too_many_followers")
    assert response.headers["retry-after"] == "1"


def test_followers_beyond_the_stream_limit_are_refused(bounded: Service) -> None:
    """Bug: any number of clients could follow one stream, each holding a connection and a replay.
    Fix: MAX_FOLLOWERS_PER_STREAM, the producer's own client included; a refused follower takes
    nothing, and one that leaves makes room."""
    idle(bounded)
    with ExitStack() as stack:
        first = stack.enter_context(following(bounded, "POST", "/chat", json={"message": LIVE}))
        held = [first_event(first)]
        stream_id = first.headers["x-stream-id"]
        second = stack.enter_context(following(bounded, "GET", f"/chat/streams/{stream_id}"))
        held.append(first_event(second))

        with following(bounded, "GET", f"/chat/streams/{stream_id}") as third:
            assert_refused(third)
            assert "MAX_FOLLOWERS_PER_STREAM" in third.json()["detail"]
        last_event_id = {"Last-Event-ID": f"{stream_id}:0", "X-Request-ID": "one-too-many"}
        with following(bounded, "POST", "/chat", json={"message": LIVE}, headers=last_event_id) as by_post:
            assert_refused(by_post)
            assert by_post.json()["correlation_id"] == "one-too-many"

        del held[1]
        second.close()  # one leaves: room for one (its count is released when its response ends)
        admitted_again(bounded, "GET", f"/chat/streams/{stream_id}")
    record = bounded.wait_for_log("request_failed", "one-too-many")
    assert (record["code"], record["status"]) == ("too_many_followers", 503)


def test_ai_sdk_resumes_beyond_the_stream_limit_are_refused(bounded: Service) -> None:
    """The AI SDK's reconnectToStream is a follower like any other (note 12)."""
    idle(bounded)
    message = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": LIVE}]}
    body = {"id": "chat-crowded", "messages": [message], "trigger": "submit-message"}
    with ExitStack() as stack:
        first = stack.enter_context(following(bounded, "POST", "/api/chat", json=body))
        owner = {"cookies": dict(first.cookies)}  # the chat is its browser's (note 21)
        second = stack.enter_context(following(bounded, "GET", "/api/chat/chat-crowded/stream", **owner))
        held = [first_chunk(first), first_chunk(second)]
        with following(bounded, "GET", "/api/chat/chat-crowded/stream", **owner) as third:
            assert_refused(third)
        del held


def first_chunk(response: httpx.Response) -> Iterator[Event]:
    """As first_event, for the AI SDK's stream: its first chunk is `start`."""
    assert response.status_code == 200, response.read()
    events = (e for e in iter_sse(response) if e.comment is None)
    assert next(events).data["type"] == "start"
    return events


def test_followers_beyond_the_process_limit_are_refused(bounded: Service) -> None:
    """Bug: followers of all streams together had no bound. Fix: MAX_FOLLOWERS per process; a new
    chat's own client counts, so a full process refuses a new chat before asking the model."""
    idle(bounded)
    with ExitStack() as stack:
        a = stack.enter_context(following(bounded, "POST", "/chat", json={"message": LIVE}))
        held = [first_event(a)]
        a_id = a.headers["x-stream-id"]
        held.append(first_event(stack.enter_context(following(bounded, "GET", f"/chat/streams/{a_id}"))))
        b = stack.enter_context(following(bounded, "POST", "/chat", json={"message": LIVE}))
        held.append(first_event(b))  # three followers: the process is full, though b has one only

        with following(bounded, "GET", f"/chat/streams/{b.headers['x-stream-id']}") as refused:
            assert_refused(refused)
            assert "MAX_FOLLOWERS" in refused.json()["detail"]
    admitted_again(bounded, "POST", "/chat", json={"message": "hi"})  # all gone: room again


def admitted_again(service: Service, method: str, path: str, **kwargs: Any) -> None:
    """Until a follower is admitted again: the counts are released when the responses of the ones
    that left end, a moment after the clients hang up."""
    deadline = time.monotonic() + 10
    while True:
        with following(service, method, path, **kwargs) as response:
            if response.status_code == 200:
                first_event(response)
                return
            assert response.status_code == 503, response.text
        assert time.monotonic() < deadline, response.text
        time.sleep(0.05)  # the service sees a hang-up asynchronously: nothing to await from here


#: The most the kernel buffers for one connection's sends: what a client that does not read can be
#: sent whatever the service does (4 MiB by default on Linux).
KERNEL_SEND_BUFFER = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
#: At least 6 MB, and more than the kernel takes, so that the service itself must hold or cut the rest.
ANSWER_CHARS = max(6_000_000, 2 * KERNEL_SEND_BUFFER)


@pytest.fixture(scope="module")
def impatient(start_module_service: StartService) -> Service:
    svc: Service = start_module_service(
        SEND_TIMEOUT_S="1", RESUME_GRACE_S="0", REQUEST_TIMEOUT_S="60", MAX_FOLLOWERS_PER_STREAM="10"
    )
    return svc


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_followers_that_do_not_read_a_long_answer_are_cut_off_in_bounded_memory(impatient: Service) -> None:
    """Bug: a replay left in one write of the whole log: ten followers of a 6 MB answer that read
    nothing added 115 MB to the service, and stayed connected (nothing timed out: the one write had
    been taken whole). Fix: the log leaves in pieces of at most 64 KiB, each under SEND_TIMEOUT_S.
    Bound: the ten together add less than twice the answer (12 MB or more) over the service's size
    after one client read it whole; and each is cut off: its connection is closed once what was
    buffered is read, and that is no more than the kernel's send buffer and a MiB."""
    assert impatient.proc is not None
    answer = {"message": f"fake:huge={ANSWER_CHARS}"}
    with httpx.Client(timeout=60) as client, client.stream("POST", f"{impatient.url}/chat", json=answer) as first:
        stream_id = first.headers["x-stream-id"]
        body = first.read()
    assert len(body) > ANSWER_CHARS
    assert b"event: done" in body
    baseline = rss_kib(impatient.proc.pid)

    sockets = []
    try:
        for i in range(10):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(10)
            sock.connect(("127.0.0.1", impatient.port))
            head = f"GET /chat/streams/{stream_id}?after=-1 HTTP/1.1\r\nHost: x\r\nX-Request-ID: sloth-{i}\r\n\r\n"
            sock.sendall(head.encode())
            sockets.append(sock)
        peak = baseline
        deadline = time.monotonic() + 15
        cut: set[str] = set()
        while len(cut) < 10:  # polling the child's log and its size: there is no event to await
            peak = max(peak, rss_kib(impatient.proc.pid))
            assert peak - baseline < 2 * ANSWER_CHARS // 1024, f"RSS {baseline} KiB, then {peak} KiB"
            cut = {r["correlation_id"] for r in impatient.logs() if r.get("event") == "follower_cut_off"}
            assert time.monotonic() < deadline, f"only {sorted(cut)} were cut off"
            time.sleep(0.05)
        peak = max(peak, rss_kib(impatient.proc.pid))
        assert peak - baseline < 2 * ANSWER_CHARS // 1024, f"RSS {baseline} KiB, then {peak} KiB"

        for sock in sockets:  # what was buffered, then the end of the connection: a reset (note 17)
            received, reset = b"", False
            try:
                while chunk := sock.recv(65536):
                    received += chunk
                    assert len(received) < KERNEL_SEND_BUFFER + 2**20
            except ConnectionResetError:
                reset = True
            assert reset, "the connection was closed gracefully, not aborted"
            assert b"event: done" not in received
    finally:
        for sock in sockets:
            sock.close()
    record = impatient.wait_for_log("follower_cut_off", "sloth-0")
    assert record["stream_id"] == stream_id
    assert record["send_timeout_s"] == 1
    assert record["path"] == f"/chat/streams/{stream_id}"
