"""Slow clients at the connection (note 17): headers that never finish, bodies that stall, sockets
that say nothing, and followers that stop reading. Each is bounded under `python chatsvc.py`:
408 where an answer is possible, else the connection is closed; a follower cut off for not reading
is aborted, so that nothing stays queued for it, in asyncio or in the kernel."""

from __future__ import annotations

import json
import select
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Service, StartService
from tests.spec import assert_error

#: The service's deadlines in these tests, in seconds; every wait below is bounded well beyond them.
DEADLINE_S = 1
LIMIT_S = 8


@pytest.fixture(scope="module")
def strict(start_module_service: StartService) -> Service:
    # RESUME_GRACE_S=0: a follower cut off ends its stream at once (the grace is tested in test_resume).
    svc: Service = start_module_service(
        HEADERS_TIMEOUT_S=str(DEADLINE_S),
        BODY_TIMEOUT_S=str(DEADLINE_S),
        SEND_TIMEOUT_S=str(DEADLINE_S),
        RESUME_GRACE_S="0",
        REQUEST_TIMEOUT_S="60",
    )
    return svc


def connect(port: int, receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:  # before connecting, so that the window is small from the start
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect(("127.0.0.1", port))
    return sock


def answered(sock: socket.socket, wait: float) -> bool:
    """Whether the service has answered or closed, waiting up to `wait` for it."""
    readable, _, _ = select.select([sock], [], [], wait)
    return bool(readable)


def trickle(sock: socket.socket, data: bytes, interval: float = 0.2) -> None:
    """Send `data` a byte at a time, `interval` apart, until the service answers or closes, or the
    bytes run out, or LIMIT_S has passed."""
    deadline = time.monotonic() + LIMIT_S
    for byte in data:
        if time.monotonic() > deadline:
            return
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            return
        if answered(sock, interval):  # the slowness is the abuse under test
            return


def read_to_close(sock: socket.socket) -> tuple[bytes, bool]:
    """Everything the service sends, and whether it then closed the connection within LIMIT_S."""
    sock.settimeout(LIMIT_S)
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except TimeoutError:
        return answer, False
    except ConnectionResetError:
        pass
    return answer, True


def parse(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split(" ")[1]), headers, body


def assert_408_and_closed(answer: bytes, closed: bool, correlation_id: str | None = None) -> dict[str, Any]:
    assert answer, "the service answered nothing"
    status, headers, body = parse(answer)
    assert status == 408, answer[:300]
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    error: dict[str, Any] = json.loads(body)
    assert_error(error, "request_timeout", correlation_id)
    assert headers["x-request-id"] == error["correlation_id"]
    assert closed, "the connection stayed open after the 408"
    return error


# --- Headers -----------------------------------------------------------------------------------------


def test_headers_sent_a_byte_at_a_time_get_408_and_close(strict: Service) -> None:
    """Bug: each byte reset nothing and nothing bounded the whole: 20 sockets sending a header byte
    every 10 s were all still open after a minute. Fix: the headers' deadline runs from the
    connection's start, whatever arrives meanwhile."""
    with connect(strict.port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        trickle(sock, b"X-Slow: " + b"a" * 100)
        answer, closed = read_to_close(sock)

    error = assert_408_and_closed(answer, closed)
    record = strict.wait_for_log("request_failed", error["correlation_id"])
    assert (record["code"], record["status"]) == ("request_timeout", 408)


def test_connection_that_sends_nothing_is_closed_without_an_answer(strict: Service) -> None:
    with connect(strict.port) as sock:
        answer, closed = read_to_close(sock)

    assert closed, "a connection that sent nothing stayed open"
    assert answer == b""


def test_next_request_on_a_kept_alive_connection_has_the_same_deadline(strict: Service) -> None:
    """The deadline is per request: the first one answered, the second's headers trickle."""
    with connect(strict.port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        sock.settimeout(LIMIT_S)
        while not first.endswith(b"}"):
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        trickle(sock, b"Host: " + b"x" * 100)
        answer, closed = read_to_close(sock)

    assert_408_and_closed(answer, closed)


def test_a_stream_outlasting_the_deadlines_is_untouched(strict: Service) -> None:
    """The deadlines bound a request's arrival, not its answer."""
    response, events = strict.chat({"message": "fake:deltas=30,delay=0.1"})
    assert response.status_code == 200
    assert [e.event for e in events][-1] == "done"
    assert len([e for e in events if e.event == "delta"]) == 30


# --- Bodies ------------------------------------------------------------------------------------------


def chat_head(request_id: str, length: int, path: str = "/chat") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Request-ID: {request_id}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def test_body_that_stalls_gets_408_and_close(strict: Service) -> None:
    """Bug: 262,000 of 262,144 declared bytes, then nothing: held for as long as the client liked.
    Fix: the body's deadline runs from the end of the headers."""
    with connect(strict.port) as sock:
        sock.sendall(chat_head("stall-1", 1000) + b'{"message": "')
        answer, closed = read_to_close(sock)

    assert_408_and_closed(answer, closed, "stall-1")
    record = strict.wait_for_log("request_failed", "stall-1")
    assert (record["code"], record["status"], record["path"]) == ("request_timeout", 408, "/chat")


def test_body_sent_a_byte_at_a_time_gets_408_and_close(strict: Service) -> None:
    with connect(strict.port) as sock:
        sock.sendall(chat_head("trickle-1", 1000))
        trickle(sock, b'{"message": "' + b"a" * 500)
        answer, closed = read_to_close(sock)

    assert_408_and_closed(answer, closed, "trickle-1")


def test_unread_body_ends_the_connection_with_the_answer(strict: Service) -> None:
    """A request answered without its body being read (here a 404): the rest of the body must not
    keep the connection open, however slowly it comes after the answer."""
    with connect(strict.port) as sock:
        sock.sendall(chat_head("unread-1", 1000, path="/nowhere") + b"{")
        trickle(sock, b"a" * 100)
        answer, closed = read_to_close(sock)

    status, headers, _ = parse(answer)
    assert status == 404
    assert headers.get("connection") == "close"
    assert closed, "the connection stayed open after the answer"


# --- Followers that stop reading ---------------------------------------------------------------------


def server_side_queue(service_port: int, client_port: int) -> int | None:
    """The bytes the kernel holds to send on the service's end of this connection (/proc/net/tcp's
    tx_queue); None once that end is gone."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        remote_port = int(fields[2].rsplit(":", 1)[1], 16)
        if (local_port, remote_port) == (service_port, client_port):
            return int(fields[4].split(":")[0], 16)
    return None


@pytest.mark.parametrize(
    ("message", "streaming"),
    [("fake:deltas=200000", True), ("fake:huge=3000000", False)],
    ids=["while-streaming", "after-the-whole-answer"],
)
def test_follower_that_stops_reading_is_aborted(strict: Service, message: str, streaming: bool) -> None:
    """Bug: after SEND_TIMEOUT_S the connection was closed gracefully, which waits for the send
    buffers to drain: a client that never reads kept its socket and megabytes queued for it (300
    such followers of a 1 MB answer: 400 MB queued in the kernel). Fix: the connection is aborted,
    with SO_LINGER 0, so that the kernel drops what it holds (the client gets a reset). The answer
    is followed live, or replayed whole from the log; either is over what the kernel takes for one
    socket (some 2.8 MB here), so a send blocks."""
    request_id = f"sloth-{streaming}"
    body = json.dumps({"message": message}).encode()  # megabytes of answer
    with connect(strict.port, receive_buffer=4096) as sock:
        client_port = sock.getsockname()[1]
        sock.sendall(chat_head(request_id, len(body)) + body)
        deadline = time.monotonic() + LIMIT_S
        while (queued := server_side_queue(strict.port, client_port)) is not None and time.monotonic() < deadline:
            time.sleep(0.05)  # a socket's state in the kernel: there is no event to await
        received, _ = read_to_close(sock)

    assert queued is None, f"the service's end is still there, with {queued} bytes queued"
    assert len(received) < 1_000_000, "the answer was kept for the client that did not read"
    if streaming:  # the stream's outcome is the follower's only while it runs (note 8)
        assert strict.wait_for_log("request_failed", request_id)["code"] == "client_too_slow"


# --- Launchers ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_deadlines_hold_with_several_workers(start_service: StartService) -> None:
    svc: Service = start_service(WORKERS="2", HEADERS_TIMEOUT_S=str(DEADLINE_S))
    with connect(svc.port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        answer, closed = read_to_close(sock)

    assert_408_and_closed(answer, closed)
