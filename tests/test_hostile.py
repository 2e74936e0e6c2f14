"""Hostile clients: one that stops reading, and abuse of headers and bodies on a raw socket.
None may cause a 500, hold a slot, or leave the service unwell."""

from __future__ import annotations

import json
import socket
import time
import uuid
from typing import Any

import httpx
import pytest

from tests.conftest import Service
from tests.fake_model import FakeModel
from tests.test_faults import resources, settle


@pytest.fixture(scope="module")
def guarded(start_service: Any) -> Service:
    # RESUME_GRACE_S=0: a client cut off ends its stream at once (the grace is tested in test_resume).
    svc: Service = start_service(SEND_TIMEOUT_S="1", IDLE_TIMEOUT_S="5", REQUEST_TIMEOUT_S="60", RESUME_GRACE_S="0")
    return svc


def raw_request(port: int, head: bytes, body: bytes = b"", *, shut_write: bool = False) -> bytes:
    """Send bytes as they are; return everything the service answers until it closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + body)
        if shut_write:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer and _complete(answer):
                    break
        except TimeoutError:
            pass
        return answer


def _complete(answer: bytes) -> bool:
    head, _, body = answer.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return body.endswith(b"0\r\n\r\n")


def assert_well(service: Service) -> None:
    assert httpx.get(f"{service.url}/healthz").status_code == 200
    response, events = service.chat({"message": "hi"})
    assert response.status_code == 200
    assert events[-1].event == "done"
    crashes = [r for r in service.logs() if r.get("code") == "internal_error" or "Exception in ASGI" in r["event"]]
    assert not crashes


def test_client_that_stops_reading_is_cut_and_logged(guarded: Service, fake_model: FakeModel) -> None:
    """A client that reads nothing after the headers, while the model streams megabytes. (uvicorn adds
    its own ERROR line, 'ASGI callable returned without completing response.': it cannot finish a
    response to a client that does not read.)"""
    guarded.chat({"message": "warm-up"})  # once-per-process tasks (sse-starlette's watcher) first
    baseline = settle(guarded, resources(guarded), limit=2)
    body = json.dumps({"message": "fake:deltas=200000"}).encode()
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(
            b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Request-ID: sloth-1\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        record = guarded.wait_for_log("request_failed", "sloth-1", timeout=30)
        upstream = fake_model.last()

    assert record["code"] == "client_too_slow"
    assert record["completion_tokens"] < 200000
    assert upstream.closed.wait(5), "the model server's connection stayed open"
    assert settle(guarded, baseline) == baseline
    assert "chatsvc_active_streams 0.0" in httpx.get(f"{guarded.url}/metrics").text
    assert_well(guarded)


@pytest.mark.parametrize(
    "request_id",
    [b"a\rb", b"a\nInjected: yes", b"a\x00b"],
    ids=["bare-CR", "LF-injection", "NUL"],
)
def test_control_characters_in_request_id_are_refused_not_echoed(guarded: Service, request_id: bytes) -> None:
    answer = raw_request(guarded.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-ID: " + request_id + b"\r\n\r\n")

    assert (
        answer.startswith(b"HTTP/1.1 400") or b'"status":"ok"' in answer
    )  # refused by the HTTP parser, or id replaced
    assert b"injected" not in answer.lower()
    assert not answer.startswith(b"HTTP/1.1 500")
    assert_well(guarded)


def test_10kb_request_id_is_replaced(guarded: Service) -> None:
    response = httpx.get(f"{guarded.url}/healthz", headers={"X-Request-ID": "x" * 10_000})
    assert response.status_code == 200
    assert uuid.UUID(response.headers["x-request-id"]).version == 4


def test_100_headers_are_fine(guarded: Service) -> None:
    headers = {f"X-Extra-{i}": "v" * 20 for i in range(100)}
    response, events = guarded.chat({"message": "hi"}, headers)
    assert response.status_code == 200
    assert events[-1].event == "done"


def test_body_sent_byte_by_byte_is_read_whole(guarded: Service) -> None:
    body = json.dumps({"message": "fake:deltas=3"}).encode()
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=30) as sock:
        sock.sendall(
            b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        for byte in body:
            sock.sendall(bytes([byte]))
            time.sleep(0.01)  # the slowness is the abuse under test
        answer = b""
        while b"event: done" not in answer and (chunk := sock.recv(65536)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200")
    assert b"event: done" in answer


def test_body_shorter_than_declared_is_no_500(guarded: Service, fake_model: FakeModel) -> None:
    before = len(fake_model.requests)
    answer = raw_request(
        guarded.port,
        b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Request-ID: short-1\r\n"
        b"Content-Length: 100\r\n\r\n",
        b'{"message": "hi"',
        shut_write=True,
    )
    assert not answer.startswith(b"HTTP/1.1 500")
    assert len(fake_model.requests) == before  # nothing reached the model
    record = guarded.wait_for_log("client_disconnected", "short-1")
    assert record["path"] == "/chat"
    assert_well(guarded)


def test_chunked_body_over_the_limit_is_413(start_service: Any) -> None:
    svc: Service = start_service(MAX_BODY_BYTES="2048")

    def chunks() -> Any:
        for _ in range(100):
            yield b"x" * 1000

    response = httpx.post(f"{svc.url}/chat", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.json()["code"] == "payload_too_large"
    assert_well(svc)
