"""A small raw-asyncio SSE client for the fault matrix and the load tests: light enough for 1000
streams on a 2-core machine, with exact control of when it leaves and how fast it reads."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from tests.helpers import SSEParser

Behaviour = Literal["read_all", "leave_before_first_token", "leave_mid_stream", "slow_reader"]
SLOW_READ_BYTES = 4096  # per read, with SLOW_READ_PAUSE_S between reads: 400 KB/s at most
SLOW_READ_PAUSE_S = 0.01


@dataclass
class Result:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    events: list[tuple[str, Any]] = field(default_factory=list)  # (event name, parsed data)
    body: bytes = b""  # for answers that are not streams
    error: str | None = None  # a transport failure on our side

    @property
    def terminals(self) -> list[tuple[str, Any]]:
        return [e for e in self.events if e[0] in ("done", "error")]

    @property
    def text(self) -> str:
        return "".join(data["content"] for name, data in self.events if name == "delta")

    def json(self) -> Any:
        return json.loads(self.body)


LIMIT_S = 120  # no single stream of the tests takes longer


async def chat(
    port: int,
    body: dict[str, Any],
    *,
    rid: str | None = None,
    behaviour: Behaviour = "read_all",
    on_meta: Callable[[], None] | None = None,
) -> Result:
    """POST /chat on 127.0.0.1:port and follow the answer as `behaviour` says; `on_meta` is called
    when the stream has started."""
    result = Result()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=SLOW_READ_BYTES)
    try:
        async with asyncio.timeout(LIMIT_S):
            await _exchange(reader, writer, body, rid, behaviour, result, on_meta)
    except (ConnectionError, asyncio.IncompleteReadError, TimeoutError) as exc:
        result.error = type(exc).__name__
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return result


async def _exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    body: dict[str, Any],
    rid: str | None,
    behaviour: Behaviour,
    result: Result,
    on_meta: Callable[[], None] | None,
) -> None:
    payload = json.dumps(body).encode()
    head = "POST /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(payload)}\r\n"
    if rid:
        head += f"X-Request-ID: {rid}\r\n"
    writer.write(head.encode() + b"\r\n" + payload)
    await writer.drain()

    status_line = await reader.readuntil(b"\r\n")
    result.status = int(status_line.split()[1])
    while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
        name, _, value = line.decode("latin-1").partition(":")
        result.headers[name.strip().lower()] = value.strip()
    if result.status != 200:
        result.body = await reader.readexactly(int(result.headers.get("content-length", "0")))
        return

    parser = _SseParser()
    async for data in _chunks(reader, slow=behaviour == "slow_reader"):
        for event in parser.feed(data):
            result.events.append(event)
            name = event[0]
            if name == "meta" and on_meta is not None:
                on_meta()
            if behaviour == "leave_before_first_token" and name == "meta":
                return
            if behaviour == "leave_mid_stream" and name == "delta":
                return
            if name in ("done", "error") and behaviour != "read_all":
                return  # read_all goes on to the end of the body: nothing may follow the terminal


async def _chunks(reader: asyncio.StreamReader, slow: bool) -> Any:
    """The body of a chunked response, as it arrives."""
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        if size == 0:
            return
        remaining = size
        while remaining:
            take = min(remaining, SLOW_READ_BYTES) if slow else remaining
            data = await reader.readexactly(take)
            remaining -= take
            yield data
            if slow:
                await asyncio.sleep(SLOW_READ_PAUSE_S)  # the slowness is the behaviour under test
        await reader.readexactly(2)


class _SseParser:
    """The tests' SSE parser, fed the body in the pieces it arrives in: whole lines go to it."""

    def __init__(self) -> None:
        self.buffer = b""
        self.parser = SSEParser()

    def feed(self, data: bytes) -> list[tuple[str, Any]]:
        *lines, self.buffer = (self.buffer + data).split(b"\n")
        events = [self.parser.line(line.removesuffix(b"\r").decode()) for line in lines]
        return [(e.event or "message", e.data) for e in events if e is not None and e.comment is None]
