"""What the tests share besides fixtures: chatsvc in a child process (`Service`), the one SSE parser,
/metrics read with prometheus-client's own parser, and the few ways of reading a stream that many
modules use. The fixtures that hand these out are in conftest.py."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
STARTUP_LIMIT_S = 30

# Server-Sent Events ------------------------------------------------------------------------------


@dataclass
class Event:
    """One SSE event or comment as the client sees it."""

    event: str | None = None
    id: str | None = None
    data: Any = None
    comment: str | None = None


UI_STREAM_END = "[DONE]"  # the AI SDK stream's last data: the one that is not JSON


class SSEParser:
    """The one SSE parser of the tests, fed a line at a time (without its line ending). An event's
    `data` is its data lines joined and read as JSON (the AI SDK's end marker kept as it is).
    Comments (pings) are events of their own."""

    def __init__(self) -> None:
        self._event = Event()
        self._data: list[str] = []

    def line(self, line: str) -> Event | None:
        """The event this line completes, if it does."""
        if line == "":
            event, data = self._event, self._data
            self._event, self._data = Event(), []
            if not data and not event.event:
                return None
            text = "\n".join(data)
            event.data = text if text == UI_STREAM_END else json.loads(text) if data else None
            return event
        if line.startswith(":"):
            return Event(comment=line[1:].strip())
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event.event = value
        elif name == "id":
            self._event.id = value
        return None

    def lines(self, lines: Iterable[str]) -> Iterator[Event]:
        for line in lines:
            if (event := self.line(line)) is not None:
                yield event


def iter_sse(response: httpx.Response) -> Iterator[Event]:
    """Parse an SSE body as it arrives; comments (pings) are yielded too."""
    return SSEParser().lines(response.iter_lines())


def parse_sse(body: str | bytes) -> list[Event]:
    """A whole SSE body (or one event of it), read: its events, comments (pings) left out."""
    text = body.decode() if isinstance(body, bytes) else body
    lines = re.split(r"\r\n|\r|\n", text)  # SSE's line endings only (str.splitlines knows more)
    return [e for e in SSEParser().lines([*lines, ""]) if e.comment is None]


def text_of(events: list[Event]) -> str:
    """The answer a /chat stream carried: its deltas, joined."""
    return "".join(e.data["content"] for e in events if e.event == "delta")


def ui_chunks(body: str) -> list[Any]:
    """The data of each event of a whole AI SDK stream: its chunks, then the end marker if it came."""
    return [e.data for e in parse_sse(body)]


def iter_ui_chunks(response: httpx.Response) -> Iterator[Any]:
    """The data of each event of an AI SDK stream, as it arrives: its chunks, then the end marker."""
    return (e.data for e in iter_sse(response) if e.comment is None)


def ui_text_of(chunks: list[Any]) -> str:
    """The answer an AI SDK stream carried: its text-delta chunks, joined."""
    return "".join(c["delta"] for c in chunks if isinstance(c, dict) and c["type"] == "text-delta")


# /metrics ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metrics:
    """One scrape of /metrics, read by prometheus-client's parser: each sample's value by its name
    and labels."""

    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]

    @classmethod
    def parse(cls, text: str) -> Metrics:
        samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.name, frozenset(sample.labels.items()))
                assert key not in samples, f"{key} twice in one scrape"
                samples[key] = sample.value
        return cls(samples)

    def value(self, name: str, /, *, default: float | None = None, **labels: str) -> float:
        """The sample of this name with exactly these labels; `default` if there is none (a labelled
        series appears at its first count), else an AssertionError."""
        found = self.samples.get((name, frozenset(labels.items())))
        if found is not None:
            return found
        assert default is not None, f"no sample {name} {labels} in {sorted(n for n, _ in self.samples)}"
        return default

    @property
    def names(self) -> set[str]:
        return {name for name, _ in self.samples}


def scrape(service: Service, client: httpx.Client | None = None) -> Metrics:
    """GET /metrics, read."""
    response = (client or httpx).get(f"{service.url}/metrics")
    assert response.status_code == 200, response.text
    return Metrics.parse(response.text)


# chatsvc in a child process ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until_answers(url: str, limit: float, process: subprocess.Popen[bytes] | None = None) -> None:
    """Until GET `url` answers 200. A child's socket opening sends no event to await, so this polls;
    it stops early, with an error, if `process` exits."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the process exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} did not answer 200 within {limit} s")


class Service:
    """chatsvc in a child process, with its own environment and a log file."""

    def __init__(self, env: dict[str, str], workdir: Path, command: list[str] | None = None) -> None:
        self.port = free_port()
        # `python chatsvc.py` unless told otherwise; "{port}" in the command is this one's port.
        self.command = [a.format(port=self.port) for a in command or [sys.executable, str(ROOT / "chatsvc.py")]]
        self.workdir = workdir
        self.log_path = workdir / f"chatsvc-{self.port}.log"
        self.err_path = workdir / f"chatsvc-{self.port}.err"
        base = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "SYSTEMROOT") if k in os.environ}
        self.env = {**base, "HOST": "127.0.0.1", "PORT": str(self.port), **env}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Service:
        with self.log_path.open("wb") as out, self.err_path.open("wb") as err:
            self.proc = subprocess.Popen(self.command, cwd=self.workdir, env=self.env, stdout=out, stderr=err)
        try:
            wait_until_answers(f"{self.url}/healthz", STARTUP_LIMIT_S, self.proc)
        except RuntimeError as exc:
            raise RuntimeError(f"chatsvc exited {self.proc.returncode}: {self.err_path.read_text()}") from exc
        return self

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 40) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.exited(timeout)

    def exited(self, timeout: float = 40) -> int:
        """Its exit status, once it has exited; killed if it has not within `timeout`."""
        assert self.proc is not None
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode

    def output(self) -> str:
        return self.log_path.read_text(encoding="utf-8") + self.err_path.read_text(encoding="utf-8")

    def logs(self) -> list[dict[str, Any]]:
        """Every stdout line, parsed: each must be one JSON object. While the service runs, a line that
        has no newline yet is one it is still writing (a record can straddle two flushes of the stream's
        buffer), so only finished lines count; once it has exited, everything must parse."""
        text = self.log_path.read_text(encoding="utf-8")
        if self.proc is None or self.proc.poll() is None:
            text = text[: text.rfind("\n") + 1]
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def logs_for(self, correlation_id: str) -> list[dict[str, Any]]:
        return [r for r in self.logs() if r.get("correlation_id") == correlation_id]

    def wait_for_log(self, event: str, correlation_id: str | None = None, timeout: float = 10) -> dict[str, Any]:
        """The first log record with this event (and id): a record is written after the fact, so a test
        that checks logs right after a stream ends may have to wait for it."""
        deadline = time.monotonic() + timeout
        while True:
            for record in self.logs():
                if record.get("event") == event and correlation_id in (None, record.get("correlation_id")):
                    return record
            if time.monotonic() > deadline:
                raise AssertionError(f"no {event!r} log line for {correlation_id}")
            time.sleep(0.02)  # polling a child's log file: there is no event to await

    def chat(self, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[httpx.Response, list[Event]]:
        """POST /chat and read the whole answer: the response and its events (pings left out)."""
        with (
            httpx.Client(timeout=60) as client,
            client.stream("POST", f"{self.url}/chat", json=body, headers=headers or {}) as response,
        ):
            if response.status_code != 200:
                response.read()
                return response, []
            events = [e for e in iter_sse(response) if e.comment is None]
        return response, events


class StartService(Protocol):
    """The `start_service` fixtures: a chatsvc process with these settings over the test defaults
    (a value of "<unset>" leaves that setting out), answering by the time it is returned."""

    def __call__(self, **env: str) -> Service: ...


def follow(service: Service, stream_id: str, headers: dict[str, str] | None = None, **params: str) -> list[Event]:
    """GET /chat/streams/{id} to its end: the events (no pings); [] for a 204."""
    with (
        httpx.Client(timeout=30) as client,
        client.stream("GET", f"{service.url}/chat/streams/{stream_id}", headers=headers or {}, params=params) as resp,
    ):
        assert resp.status_code in (200, 204), resp.read()
        return [e for e in iter_sse(resp) if e.comment is None]


@contextmanager
def chat_not_read(service: Service, message: str, request_id: str) -> Iterator[socket.socket]:
    """POST /chat from a client that reads nothing of the answer: a 4 KiB receive window, so that
    a long answer fills the buffers and the service's sends block."""
    body = json.dumps({"message": message}).encode()
    with socket.create_connection(("127.0.0.1", service.port), timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(
            b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"X-Request-ID: {request_id}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        yield sock
