"""Fixtures: the fake model server, and chatsvc run for real (`python chatsvc.py`, uvicorn and all)
in a child process, because streaming behaviour (disconnects, pings, timeouts, SIGTERM) cannot be
seen through TestClient, which buffers whole bodies."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fake_model import FakeModel

ROOT = Path(__file__).resolve().parent.parent
STARTUP_LIMIT_S = 30


@dataclass
class Event:
    """One SSE event or comment as the client sees it."""

    event: str | None = None
    id: str | None = None
    data: Any = None
    comment: str | None = None


def iter_sse(response: httpx.Response) -> Iterator[Event]:
    """Parse an SSE body as it arrives; comments (pings) are yielded too."""
    current = Event()
    data_lines: list[str] = []
    for line in response.iter_lines():
        if line == "":
            if data_lines or current.event or current.comment is not None:
                current.data = json.loads("\n".join(data_lines)) if data_lines else None
                yield current
            current, data_lines = Event(), []
        elif line.startswith(":"):
            yield Event(comment=line[1:].strip())
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                data_lines.append(value)
            elif name == "event":
                current.event = value
            elif name == "id":
                current.id = value


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


@pytest.fixture(scope="session")
def fake_model() -> Iterator[FakeModel]:
    fake = FakeModel().start()
    yield fake
    fake.stop()


@pytest.fixture(scope="session")
def start_service(fake_model: FakeModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Start a chatsvc process with settings over the defaults; all are stopped at the end."""
    started: list[Service] = []

    def start(**env: str) -> Service:
        settings = {"OPENAI_BASE_URL": fake_model.base_url, "OPENAI_API_KEY": "sk-test-key-not-real-000000", **env}
        settings = {k: v for k, v in settings.items() if v is not None and v != "<unset>"}
        service = Service(settings, tmp_path_factory.mktemp("svc")).start()
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


@pytest.fixture(scope="session")
def service(start_service: Any) -> Service:
    """The shared service with default settings, against the fake model."""
    svc: Service = start_service(ALLOWED_MODELS="gpt-4o-mini,other-model", SYSTEM_PROMPT="You are terse.")
    return svc
