"""One terminal event, whatever the model server sends.

Every field of a chunk that the model server controls is sent with every JSON type, against one
service with a single slot: each stream must end with exactly one terminal event (`done`, or `error`
`upstream_error`, never our `internal_error`), log exactly one outcome line, and give its slot back,
so that the next case is admitted at all.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest

from chatsvc import CHATSVC, NO_SPAN, Failover, Producer, Settings, StreamLog, close_upstream, parse_chat
from chatsvc import Service as ChatService
from logging_conf import correlation_id
from tests.fake_model import FakeModel
from tests.helpers import UI_STREAM_END, Event, Service, StartService, iter_sse, parse_sse, scrape
from tests.spec import validate

OUTCOMES = ("request_completed", "request_failed", "client_disconnected")

# A well-formed answer: a delta, the finish_reason, the usage, [DONE]. Each case spoils one field.
FIRST: dict[str, Any] = {
    "id": "chatcmpl-x",
    "object": "chat.completion.chunk",
    "model": "m",
    "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hi"}, "finish_reason": None}],
}
FINISH: dict[str, Any] = {**FIRST, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
USAGE: dict[str, Any] = {
    **FIRST,
    "choices": [],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}
ERROR = {"message": "the model broke", "type": "server_error", "code": "boom"}

VALUES: dict[str, Any] = {
    "null": None,
    "bool": True,
    "int": -1,
    "float": 1.5,
    "huge_int": 10**30,  # past 64 bits: orjson refuses it
    "string": "x",
    "list": [1],
    "object": {"a": 1},
}


def spoil(field: str, value: Any) -> list[dict[str, Any]]:
    """The three chunks with `field` set to `value`."""
    first, finish, usage = copy.deepcopy(FIRST), copy.deepcopy(FINISH), copy.deepcopy(USAGE)
    if field == "usage":
        usage["usage"] = value
    elif field.startswith("usage."):
        usage["usage"][field.removeprefix("usage.")] = value
    elif field == "finish_reason":
        finish["choices"][0]["finish_reason"] = value
    elif field == "choices":
        first["choices"] = value
    elif field == "choices[0]":
        first["choices"][0] = value
    elif field == "delta":
        first["choices"][0]["delta"] = value
    elif field in ("content", "role"):
        first["choices"][0]["delta"][field] = value
    elif field == "error":
        first["error"] = value
    elif field.startswith("error."):
        first["error"] = {**ERROR, field.removeprefix("error."): value}
    elif field in ("id", "model"):
        for chunk in (first, finish, usage):
            chunk[field] = value
    else:
        raise AssertionError(field)
    return [first, finish, usage]


FIELDS = [
    "usage",
    "usage.prompt_tokens",
    "usage.completion_tokens",
    "usage.total_tokens",
    "finish_reason",
    "choices",
    "choices[0]",
    "delta",
    "content",
    "role",
    "error",
    "error.message",
    "error.code",
    "error.type",
    "id",
    "model",
]
CASES = [(f, v) for f in FIELDS for v in VALUES]


@pytest.fixture(scope="module")
def single(start_module_service: StartService) -> Service:
    """One slot: a stream that keeps it refuses the next case."""
    svc: Service = start_module_service(MAX_CONCURRENT_STREAMS="1", UPSTREAM_MAX_RETRIES="0", RESUME_GRACE_S="0")
    return svc


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    """One client for every case: a stream that never ends fails on the read timeout (pings come
    every 15 s)."""
    with httpx.Client(timeout=httpx.Timeout(10, read=5)) as c:
        yield c


class Logs:
    """The service's log lines since the last look: every case reads only its own."""

    def __init__(self, svc: Service) -> None:
        self.svc = svc
        self.offset = svc.log_path.stat().st_size

    def outcomes(self, cid: str) -> list[dict[str, Any]]:
        with self.svc.log_path.open("rb") as f:
            f.seek(self.offset)
            text = f.read()
        text = text[: text.rfind(b"\n") + 1]  # a line still being written is not one yet
        self.offset += len(text)
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        return [r for r in records if r.get("correlation_id") == cid and r.get("event") in OUTCOMES]


def active_streams(svc: Service, client: httpx.Client) -> float:
    return scrape(svc, client).value("chatsvc_active_streams")


def wait_released(svc: Service, client: httpx.Client) -> None:
    """Until the stream's slot is back: the producer releases it after the terminal event, and that
    sends nothing to await, so this polls (bounded)."""
    deadline = time.monotonic() + 5
    while active_streams(svc, client) != 0:
        assert time.monotonic() < deadline, "the stream's slot was never released"
        time.sleep(0.01)


def read_events(svc: Service, client: httpx.Client, path: str, body: dict[str, Any], cid: str) -> list[Event]:
    with client.stream("POST", f"{svc.url}{path}", json=body, headers={"X-Request-ID": cid}) as response:
        assert response.status_code == 200, response.read()
        if path == "/chat":
            return [e for e in iter_sse(response) if e.comment is None]
        return [e for e in iter_sse(response) if e.comment is None and e.data != UI_STREAM_END]


def scripted(fake_model: FakeModel, key: str, chunks: list[dict[str, Any]]) -> str:
    fake_model.scripts[key] = [json.dumps(c).encode() for c in chunks] + [b"[DONE]"]
    return f"fake:script={key}"


@pytest.mark.slow  # a matrix of some 150 streams
@pytest.mark.parametrize(("field", "kind"), CASES, ids=[f"{f}-{k}" for f, k in CASES])
def test_any_json_in_any_field_ends_with_one_terminal_event(
    single: Service, client: httpx.Client, fake_model: FakeModel, field: str, kind: str
) -> None:
    """Bug: `"usage": [1]` failed the producer, then its error path failed again building the error
    event: no terminal event, pings forever, the slot and the log held for good.
    Fix: the model server's chunk is checked where it is decoded (a malformed field is its fault,
    `upstream_error`; a malformed usage is ignored and estimated), and the producer's last resort
    ends the stream with a pre-encoded event whatever fails."""
    cid = f"term-{field.replace('[0]', '.0')}-{kind}"  # X-Request-ID takes no brackets
    message = scripted(fake_model, cid, spoil(field, VALUES[kind]))
    logs = Logs(single)

    events = read_events(single, client, "/chat", {"message": message}, cid)

    terminal = [e for e in events if e.event in ("done", "error")]
    assert len(terminal) == 1, [e.event for e in events]
    assert events[-1] is terminal[0]
    end = terminal[0]
    validate("DoneEvent" if end.event == "done" else "ErrorEvent", end.data)
    if end.event == "error":
        assert end.data["code"] == "upstream_error", end.data  # the model server's fault, never ours
    wait_released(single, client)
    lines = logs.outcomes(cid)
    assert len(lines) == 1, lines
    assert lines[0]["level"] != "ERROR", lines[0]


@pytest.mark.parametrize("kind", list(VALUES), ids=list(VALUES))
def test_any_finish_reason_ends_an_ai_sdk_stream_once(
    single: Service, client: httpx.Client, fake_model: FakeModel, kind: str
) -> None:
    """Bug: a list as finish_reason was logged as completed, then failed the AI SDK's encoding (an
    unhashable key) and was logged and counted a second time, as failed.
    Fix: a finish_reason that is not a short name is the model server's malformed stream."""
    cid = f"term-ui-{kind}"
    message = scripted(fake_model, cid, spoil("finish_reason", VALUES[kind]))
    body = {
        "id": f"chat-{kind}",
        "trigger": "submit-message",
        "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": message}]}],
    }

    logs = Logs(single)

    chunks = [e.data for e in read_events(single, client, "/api/chat", body, cid)]

    ends = [c for c in chunks if c["type"] in ("finish", "error")]
    assert len(ends) == 1, chunks
    assert chunks[-1] is ends[0]
    wait_released(single, client)
    assert len(logs.outcomes(cid)) == 1


class Broken(Producer):
    """A producer with a bug of ours where its stream ends: a test cannot make one from outside."""

    failing = ""

    def timings(self) -> dict[str, Any]:
        if self.failing == "before_the_outcome_line":
            raise RuntimeError("a bug while building the terminal event")
        return super().timings()

    def event(self, name: str, data: dict[str, Any]) -> bytes:
        if self.failing == "after_the_outcome_line" and name in ("done", "error"):
            raise RuntimeError("a bug while encoding the terminal event")
        return super().event(name, data)

    def take_frames(self, frames: list[bytes], request: Any) -> bool:
        if self.failing == "before_any_content":
            raise RuntimeError("a bug while reading the first chunk")
        return super().take_frames(frames, request)


KEY = "a-key"  # an Idempotency-Key's name, as start_chat makes it


async def run_broken(
    fake_model: FakeModel, failing: str, *, after: Callable[[ChatService], Awaitable[Any]] | None = None
) -> tuple[ChatService, StreamLog]:
    """A stream whose producer is `Broken`, taken under the Idempotency-Key KEY; `after` runs once
    it has ended, before the service's clients close."""
    settings = Settings(OPENAI_BASE_URL=fake_model.base_url, OPENAI_API_KEY="sk-test", UPSTREAM_MAX_RETRIES=0)
    service = ChatService(settings)
    correlation_id.set(f"broken-{failing}")  # as the middleware sets it for a request
    try:
        chat, _ = parse_chat(b'{"message": "fake:deltas=3"}', settings)
        messages = chat.messages(None)
        started = time.monotonic()
        deadline = started + settings.REQUEST_TIMEOUT_S
        resources = AsyncExitStack()  # as start_chat hands them to the producer
        assert await service.claim(KEY, "request", "ab" * 16, None, deadline, resources) is None
        slot = await service.take_slot()
        resources.callback(slot.release)
        failover = Failover(service, chat, messages, deadline, NO_SPAN)
        stream = await failover.open()
        resources.push_async_callback(close_upstream, stream)

        def producer(stream_log: StreamLog) -> Producer:
            broken = Broken(service, stream_log, failover, stream, NO_SPAN, slot, "m", 2, started, deadline)
            broken.failing = failing
            return broken

        stream_log = service.start_stream("ab" * 16, None, CHATSVC, None, producer, resources)
        await asyncio.gather(*service.producers.values())
        if after is not None:
            await after(service)
        return service, stream_log
    finally:
        await service.close_clients()


@pytest.mark.parametrize("failing", ["before_the_outcome_line", "after_the_outcome_line"])
def test_a_bug_where_the_stream_ends_still_ends_it_once(
    fake_model: FakeModel, caplog: pytest.LogCaptureFixture, failing: str
) -> None:
    """Bug: the producer's error path built its event the way that had just failed: the same bug
    raised again (no terminal event, the followers left waiting on pings), or, when the outcome line
    was out already, a second outcome line and count.
    Fix: the last resort, an error event encoded when the stream began, and the outcome line only if
    none was logged."""
    caplog.set_level(logging.INFO, logger="chatsvc")

    service, stream_log = asyncio.run(run_broken(fake_model, failing))

    assert stream_log.finished
    ends = [e for e in stream_log.entries if e.startswith((b"event: done", b"event: error"))]
    assert len(ends) == 1
    assert stream_log.entries[-1] is ends[0]
    [end] = parse_sse(ends[0])
    data = end.data
    validate("ErrorEvent", data)
    assert data["code"] == "internal_error"
    assert data["correlation_id"] == f"broken-{failing}"
    assert data["usage"]["completion_tokens"] == 3
    assert service.slots_in_use == 0
    assert stream_log.producer is None
    failed = [r for r in caplog.records if r.getMessage() == "producer_failed"]
    assert len(failed) == 1
    assert failed[0].levelno == logging.ERROR
    assert failed[0].exc_info is not None  # with its traceback: a bug of ours
    outcomes = [r for r in caplog.records if r.getMessage() in OUTCOMES]
    assert len(outcomes) == 1, outcomes
    expected = "request_failed" if failing == "before_the_outcome_line" else "request_completed"
    assert outcomes[0].getMessage() == expected


def test_a_bug_before_any_content_frees_the_idempotency_key(fake_model: FakeModel) -> None:
    """Bug: a stream ended by the last resort kept its Idempotency-Key although nothing was
    answered: the request sent again, as `internal_error` says it may be, got the same error for
    RESUME_TTL_S. Fix: the last resort frees it as the ordinary end of such a stream does."""
    again: list[object] = []

    async def send_again(service: ChatService) -> None:
        deadline = time.monotonic() + 5
        async with AsyncExitStack() as resources:
            again.append(await service.claim(KEY, "request", "cd" * 16, None, deadline, resources))

    _, stream_log = asyncio.run(run_broken(fake_model, "before_any_content", after=send_again))

    [end] = parse_sse(stream_log.entries[-1])
    assert (end.event, end.data["code"]) == ("error", "internal_error")
    assert again == [None]  # the key is free: the request is tried again, not given the error again
