"""The benchmark's load generator, run as its own process: N streams at concurrency C against
chatsvc (POST /chat, or POST /api/chat as the AI SDK) or straight against the fake upstream
(POST /v1/chat/completions), each
checked for integrity (the text that arrives equals what the model sent, in order). Prints one
JSON object: time to first delta and stream time per stream, and the failures.

    python bench/load_generator.py --port 8000 --target chatsvc --streams 100 --concurrency 10 --message bench:chunks=20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from typing import Any

LIMIT_S = 120  # per stream
ROLLBACK = 5  # deltas a resumed stream has lost in flight


async def one(
    port: int,
    target: str,
    message: str,
    expected: str,
    leave_after: int | None = None,
    resume_after: int | None = None,
    other_port: int | None = None,
    delete_after: int | None = None,
) -> dict[str, Any]:
    """One stream. With `leave_after`, close the connection once the stream is open (0) or after
    that many deltas, and note when (CLOCK_MONOTONIC, shared with the fake upstream). With
    `resume_after`, cut it after that many deltas, as if the last ROLLBACK of them were lost in
    flight, and resume it at once with GET /chat/streams/{id} and the id of the last one kept,
    timing the reconnect to the first replayed event (read from the stream's log, not awaited from
    the model); on `other_port` if given (another replica). With `delete_after`, after that many
    deltas send DELETE /chat/streams/{id} (to `other_port` if given) and note when, as `leave_after`
    does."""
    path, body = {
        "chatsvc": ("/chat", {"message": message}),
        "chatsvc-idem": ("/chat", {"message": message}),
        "ai-sdk": (
            "/api/chat",
            {"id": uuid.uuid4().hex, "messages": [_ui_message(message)], "trigger": "submit-message"},
        ),
        "upstream": (
            "/v1/chat/completions",
            {"model": "bench", "stream": True, "messages": [{"role": "user", "content": message}]},
        ),
    }[target]
    payload = json.dumps(body).encode()
    # chatsvc-idem: each stream sent with an Idempotency-Key of its own, as a careful client sends it
    key = b"Idempotency-Key: %s\r\n" % uuid.uuid4().hex.encode() if target == "chatsvc-idem" else b""
    sent = time.perf_counter()
    first = None
    text: list[str] = []
    resumed_in: float | None = None
    try:
        async with asyncio.timeout(LIMIT_S):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                b"%sConnection: close\r\n\r\n%s" % (path.encode(), len(payload), key, payload)
            )
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                return {"ok": False, "why": head.split(b"\r\n")[0].decode()}
            buffer, event, last_id, reconnected = b"", b"", b"", 0.0
            pending: str | None = None
            while chunk := await reader.read(65536):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    line = line.rstrip(b"\r")
                    if line.startswith(b"event: "):
                        event = line[7:]
                    elif line.startswith(b"id: "):
                        last_id = line[4:]
                    elif line.startswith(b"data: {"):
                        if reconnected and resumed_in is None:
                            resumed_in = time.perf_counter() - reconnected
                        pending = _content(json.loads(line[6:]), target, event)
                    elif not line and pending:  # an event counts once it is complete, as in EventSource
                        first = first or time.perf_counter()
                        text.append(pending)
                        pending = None
                if leave_after is not None and len(text) >= leave_after:
                    writer.close()
                    return {"ok": True, "why": None, "left_at": time.monotonic()}
                if delete_after is not None and len(text) >= delete_after:
                    deleted_at = time.monotonic()
                    status = await _delete(other_port or port, last_id.split(b":")[0])
                    writer.close()
                    return {"ok": status == b"204", "why": f"DELETE answered {status!r}", "left_at": deleted_at}
                if resume_after is not None and not reconnected and len(text) >= resume_after:
                    writer.close()  # cut: the events read so far are kept, the partial line is not
                    buffer, pending, reconnected = b"", None, time.perf_counter()
                    del text[-ROLLBACK:]
                    stream_id = last_id.split(b":")[0]
                    last_id = b"%s:%d" % (stream_id, len(text))  # delta k is event k: meta is 0
                    reader, writer = await asyncio.open_connection("127.0.0.1", other_port or port)
                    writer.write(
                        b"GET /chat/streams/%s HTTP/1.1\r\nHost: x\r\nLast-Event-ID: %s\r\nConnection: close\r\n\r\n"
                        % (stream_id, last_id)
                    )
                    head = await reader.readuntil(b"\r\n\r\n")
                    if not head.startswith(b"HTTP/1.1 200"):
                        return {"ok": False, "why": "resume: " + head.split(b"\r\n")[0].decode()}
            writer.close()
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        return {"ok": False, "why": type(exc).__name__}
    done = time.perf_counter()
    joined = "".join(text)
    return {
        "ok": joined == expected,
        "why": None if joined == expected else "text differs",
        "ttfb": (first or done) - sent,
        "total": done - sent,
        "resumed_in": resumed_in,
    }


async def _delete(port: int, stream_id: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"DELETE /chat/streams/%s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % stream_id)
    head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    return head.split(b" ")[1]


def _ui_message(text: str) -> dict[str, Any]:
    return {"id": "u", "role": "user", "parts": [{"type": "text", "text": text}]}


def _content(obj: dict[str, Any], target: str, event: bytes) -> str | None:
    if target in ("chatsvc", "chatsvc-idem"):
        return obj.get("content") if event == b"delta" else None
    if target == "ai-sdk":
        return obj.get("delta") if obj.get("type") == "text-delta" else None
    choices = obj.get("choices") or [{}]
    return (choices[0].get("delta") or {}).get("content")


async def run(
    port: int,
    target: str,
    streams: int,
    concurrency: int,
    message: str,
    leave_after: int | None = None,
    resume_after: int | None = None,
    other_port: int | None = None,
    delete_after: int | None = None,
) -> dict[str, Any]:
    chunks = int(dict(item.split("=") for item in message.removeprefix("bench:").split(","))["chunks"])
    expected = "".join(f"t{i} " for i in range(chunks))
    gate = asyncio.Semaphore(concurrency)

    async def gated(i: int) -> dict[str, Any]:
        async with gate:
            if leave_after is None and delete_after is None:
                return await one(port, target, message, expected, resume_after=resume_after, other_port=other_port)
            tagged = f"{message},tag={i}"
            return await one(
                port, target, tagged, expected, leave_after, other_port=other_port, delete_after=delete_after
            )

    started = time.perf_counter()
    results = await asyncio.gather(*(gated(i) for i in range(streams)))
    if leave_after is not None or delete_after is not None:
        return {
            "streams": streams,
            "failed": sum(not r["ok"] for r in results),
            "why": sorted({r["why"] for r in results if not r["ok"]}),
            "left_at": {str(i): r.get("left_at") for i, r in enumerate(results)},
        }
    good = [r for r in results if r["ok"]]
    return {
        "streams": streams,
        "failed": streams - len(good),
        "wall_s": time.perf_counter() - started,
        "why": sorted({r["why"] for r in results if not r["ok"]}),
        "ttfb": sorted(r["ttfb"] for r in good),
        "total": sorted(r["total"] for r in good),
        "resumed_in": sorted(r["resumed_in"] for r in good if r["resumed_in"] is not None),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--target", choices=["chatsvc", "chatsvc-idem", "ai-sdk", "upstream"], required=True)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--message", default="bench:chunks=20")
    parser.add_argument("--leave-after", type=int, help="close each stream after this many deltas")
    parser.add_argument("--resume-after", type=int, help="cut each stream after this many deltas and resume it")
    parser.add_argument("--delete-after", type=int, help="DELETE each stream after this many deltas")
    parser.add_argument("--other-port", type=int, help="resume or DELETE there: another replica")
    args = parser.parse_args()
    result = run(
        args.port, args.target, args.streams, args.concurrency, args.message,
        args.leave_after, args.resume_after, args.other_port, args.delete_after,
    )  # fmt: skip
    print(json.dumps(asyncio.run(result)))
