"""A real OpenAI-compatible chat server on a loopback port, with faults on demand.

It speaks HTTP/1.1 on a raw asyncio socket (so that it can reset connections, stall, and see the
moment its peer closes) in a thread of its own. The last user message picks the behaviour:

    "fake:deltas=5,delay=0.01,usage=0"     directives, comma-separated key=value
    anything else                          the default answer, with usage

Directives:
    deltas=N         answer with N deltas "w0 ", "w1 ", ... (default: DEFAULT_REPLY's words)
    text=a|b|c       answer with exactly these deltas (split on "|")
    utf8=1           deltas of multi-byte text, written with each UTF-8 sequence cut across writes
    delay=S          seconds between deltas
    first_delay=S    seconds before the first delta (after the headers)
    header_delay=S   seconds before the response headers
    status=C         answer HTTP C with an error body; retry_after=S adds Retry-After;
    fail_times=N     with status: only the first N requests with this `key=` fail, then answer
    key=K            names a fail_times counter
    die_after=N      reset the connection after N deltas
    stall_after=N    after N deltas send nothing more (until the peer leaves)
    error_after=N    after N deltas send an in-band {"error": ...} chunk
    garbage_after=N  after N deltas send a frame that is not JSON
    no_finish=1      end the body after the deltas, with no finish_reason and no [DONE]
    hang_after_finish=1  send the finish_reason, then neither usage nor [DONE] (until the peer leaves)
    truncate_after=N after N deltas send half a frame, then end the body
    reset_before_headers=1  read the request, then reset the connection
    huge=N           answer with one delta of N characters (with deltas=M: M such deltas)
    usage=0          send no usage chunk (like llama.cpp and many local servers)
    request_id=0     send no x-request-id header
    script=K         send exactly the frames of `FakeModel.scripts[K]` (each a `data:` payload, sent
                     as one event in an HTTP chunk of its own), then end the body

`FakeModel.forced` holds directives that this server applies over the message's: with several
servers behind one chatsvc, each can fail its own way on the same request. `healthy = False` makes
its GET .../models, the health URL the tests give, answer 503.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

DEFAULT_REPLY = ["Hello", " from", " the", " fake", " model", "."]


@dataclass
class Seen:
    """One request the fake model received."""

    headers: dict[str, str]
    body: dict[str, Any]
    opened_at: float
    closed_at: float | None = None  # when the peer closed the connection
    closed: threading.Event = field(default_factory=threading.Event)  # for the tests' thread
    closed_here: asyncio.Event = field(default_factory=asyncio.Event)  # for the fake's own loop


class FakeModel:
    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self.fail_counts: dict[str, int] = {}
        self.scripts: dict[str, list[bytes]] = {}  # script=K: the exact frames a test wants sent
        self.open_connections = 0
        self.forced: dict[str, str] = {}  # directives over every message's
        self.healthy = True
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-model", daemon=True)
        self.port = 0

    # Lifecycle

    def start(self) -> FakeModel:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        future.result(timeout=10)
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        async def _stop() -> None:
            assert self._server is not None
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(_stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def last(self) -> Seen:
        return self.requests[-1]

    # HTTP

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open_connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                keep_open = await self._respond(method, path, headers, body, reader, writer)
                if not keep_open:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self.open_connections -= 1
            if not writer.is_closing():
                writer.close()

    async def _respond(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        raw: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        if method == "GET" and path.endswith("/models"):
            if not self.healthy:
                await self._send_json(writer, 503, {"error": {"message": "unhealthy", "type": "server_error"}})
                return False
            await self._send_json(writer, 200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})
            return False
        if method != "POST" or not path.endswith("/chat/completions"):
            await self._send_json(writer, 404, {"error": {"message": "not found", "type": "not_found"}})
            return True
        body = json.loads(raw)
        seen = Seen(headers=headers, body=body, opened_at=time.monotonic())
        self.requests.append(seen)
        # Watch the peer: the relay closing its connection is what the disconnect tests measure.
        # Each chat response closes its connection, so the watcher can read freely.
        watcher = asyncio.ensure_future(self._watch_close(reader, seen))
        try:
            await self._stream(seen, {**_directives(body), **self.forced}, writer)
        finally:
            watcher.cancel()
            # Every chat response ends its connection; when we end it first, it is closed all the same.
            writer.close()
            _mark_closed(seen)
        return False

    async def _watch_close(self, reader: asyncio.StreamReader, seen: Seen) -> None:
        await reader.read()  # b"" at EOF; the relay sends no more after the request body
        _mark_closed(seen)

    async def _stream(self, seen: Seen, d: dict[str, str], writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(float(d.get("header_delay", 0)))
        if d.get("reset_before_headers") == "1":
            writer.transport.abort()
            return False
        if "status" in d:
            key = d.get("key", "default")
            self.fail_counts[key] = self.fail_counts.get(key, 0) + 1
            if "fail_times" not in d or self.fail_counts[key] <= int(d["fail_times"]):
                extra = {"retry-after": d["retry_after"]} if "retry_after" in d else {}
                error = {
                    "error": {"message": "fake failure sk-leakedkey123456", "type": "fake_error", "code": "fake_code"}
                }
                await self._send_json(writer, int(d["status"]), error, extra)
                return True

        request_id = {} if d.get("request_id") == "0" else {"x-request-id": f"fake-{len(self.requests)}"}
        head = (
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\nconnection: close\r\n"
        )
        head += "".join(f"{k}: {v}\r\n" for k, v in request_id.items()) + "\r\n"
        writer.write(head.encode())
        await writer.drain()

        model = seen.body.get("model", "fake")
        deltas = _deltas(d)

        async def chunk(payload: bytes) -> None:
            writer.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
            await writer.drain()

        def frame(delta: dict[str, Any], finish: str | None = None, usage: dict[str, int] | None = None) -> bytes:
            choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]
            obj = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": model,
                "choices": choices,
                "usage": usage,
            }
            return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"

        if "script" in d:
            for payload in self.scripts[d["script"]]:
                await chunk(b"data: " + payload + b"\n\n")
            await chunk(b"")
            return True

        await chunk(frame({"role": "assistant", "content": ""}))
        await asyncio.sleep(float(d.get("first_delay", 0)))
        for i, text in enumerate(deltas):
            if i and "delay" in d:
                await asyncio.sleep(float(d["delay"]))
            if await self._fault(d, i, writer, chunk, seen):
                return False
            data = frame({"content": text})
            if d.get("utf8") == "1":
                await _write_cut_inside_utf8(writer, data, chunk)
            else:
                await chunk(data)
        if await self._fault(d, len(deltas), writer, chunk, seen):
            return False
        if d.get("no_finish") == "1":
            await chunk(b"")  # the body ends: no finish_reason, no [DONE]
            return False
        await chunk(frame({}, finish="stop"))
        if d.get("hang_after_finish") == "1":
            await seen.closed_here.wait()
            return False
        if d.get("usage") != "0":
            prompt = sum(len(str(m.get("content", ""))) for m in seen.body.get("messages", []))
            usage = {"prompt_tokens": prompt, "completion_tokens": len(deltas), "total_tokens": prompt + len(deltas)}
            await chunk(frame({}, usage=usage))
        await chunk(b"data: [DONE]\n\n")
        await chunk(b"")
        return True

    async def _fault(self, d: dict[str, str], i: int, writer: asyncio.StreamWriter, chunk: Any, seen: Seen) -> bool:
        """Inject the fault due after i deltas; True when the response is over."""
        if d.get("die_after") == str(i):
            writer.transport.abort()  # RST: the connection dies mid-stream
            return True
        if d.get("stall_after") == str(i):
            await seen.closed_here.wait()
            return True
        if d.get("error_after") == str(i):
            await chunk(b'data: {"error": {"message": "the model broke", "type": "server_error", "code": "boom"}}\n\n')
            await chunk(b"")
            return True
        if d.get("truncate_after") == str(i):
            delta = {"index": 0, "delta": {"content": "cut"}, "finish_reason": None}
            whole = b"data: " + json.dumps({"id": "x", "object": "chat.completion.chunk", "choices": [delta]}).encode()
            await chunk(whole[: len(whole) // 2])
            await chunk(b"")
            return True
        if d.get("garbage_after") == str(i):
            await chunk(b"data: {this is not json\n\n")
            await chunk(b"")
            return True
        return False

    async def _send_json(
        self, writer: asyncio.StreamWriter, status: int, obj: dict[str, Any], extra: dict[str, str] | None = None
    ) -> None:
        payload = json.dumps(obj).encode()
        head = f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {len(payload)}\r\n"
        head += "connection: close\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in (extra or {}).items())
        writer.write(head.encode() + b"\r\n" + payload)
        await writer.drain()


def _mark_closed(seen: Seen) -> None:
    if not seen.closed.is_set():
        seen.closed_at = time.monotonic()
        seen.closed.set()
        seen.closed_here.set()


def _directives(body: dict[str, Any]) -> dict[str, str]:
    messages = body.get("messages") or [{}]
    text = str(messages[-1].get("content", ""))
    if not text.startswith("fake:"):
        return {}
    pairs = (item.split("=", 1) for item in text[len("fake:") :].split(",") if "=" in item)
    return {k.strip(): v.strip() for k, v in pairs}


UTF8_DELTAS = ["Grüße ", "aus ", "日本", "語 ", "👍", "🏽 ", "и ", "ελληνικά", "!"]


def _deltas(d: dict[str, str]) -> list[str]:
    if "text" in d:
        return d["text"].split("|")
    if "huge" in d:
        return ["x" * int(d["huge"])] * int(d.get("deltas", 1))
    if d.get("utf8") == "1":
        return UTF8_DELTAS
    if "deltas" in d:
        return [f"w{i} " for i in range(int(d["deltas"]))]
    return DEFAULT_REPLY


async def _write_cut_inside_utf8(writer: asyncio.StreamWriter, data: bytes, chunk: Any) -> None:
    """Send one frame as two HTTP chunks, the cut falling inside a multi-byte UTF-8 sequence."""
    cut = next((i for i, b in enumerate(data) if b >= 0xC0), len(data) // 2) + 1
    await chunk(data[:cut])
    await asyncio.sleep(0.005)
    await chunk(data[cut:])


def expected_text(message: str) -> str:
    """The answer the fake model gives to `message`."""
    return "".join(_deltas(_directives({"messages": [{"content": message}]})))
