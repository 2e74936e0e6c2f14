"""A fast fake OpenAI-compatible chat server for the benchmark: raw asyncio, frames encoded once,
so that it is never the bottleneck.

    python bench/fake_upstream.py --port 9100

The last user message picks the answer: "bench:chunks=N,delay=S,first=S,tag=T" streams N deltas
"t0 ", "t1 ", ... with S seconds between them (0: all in one write) after `first` seconds. Like
vLLM's and OpenAI's servers, each event is its own HTTP chunk (Transfer-Encoding: chunked) and the
connection is kept alive for the next request unless the client asks to close it. No usage chunk.

With `tag=T`, the server notes when the client closed that request's connection (CLOCK_MONOTONIC,
which every process on the machine shares); GET /closes answers {"T": seconds, ...}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from functools import cache

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
END = b"0\r\n\r\n"
MODELS = b'{"object":"list","data":[{"id":"bench","object":"model"}]}'
closes: dict[str, float] = {}


@cache
def frames(chunks: int) -> tuple[bytes, ...]:
    def frame(delta: dict[str, str], finish: str | None) -> bytes:
        body = {
            "id": "b",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "bench",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

    # The last delta travels with the finish_reason and [DONE], as in vLLM's streams.
    events = [frame({"content": f"t{i} "}, None) for i in range(chunks)]
    events[-1] += frame({}, "stop") + b"data: [DONE]\n\n"
    return (
        *(b"%x\r\n%s\r\n" % (len(e), e) for e in events[:-1]),
        b"%x\r\n%s\r\n%s" % (len(events[-1]), events[-1], END),
    )


def directives(body: bytes) -> dict[str, str]:
    text = str(json.loads(body)["messages"][-1]["content"])
    return dict(item.split("=", 1) for item in text.removeprefix("bench:").split(",") if "=" in item)


def answer(writer: asyncio.StreamWriter, body: bytes) -> None:
    writer.write(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    )


async def watch_close(reader: asyncio.StreamReader, tag: str) -> None:
    await reader.read()  # until the client closes its end
    closes[tag] = time.monotonic()


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"GET /closes"):
                answer(writer, json.dumps(closes).encode())
                if head.startswith(b"GET /closes?reset"):
                    closes.clear()
                continue
            if head.startswith(b"GET"):
                answer(writer, MODELS)
                continue
            length = next(
                int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
            )
            d = directives(await reader.readexactly(length))
            chunks, delay, first = int(d.get("chunks", 10)), float(d.get("delay", 0)), float(d.get("first", 0))
            # A tagged connection is watched from here on, and not reused.
            watcher = asyncio.ensure_future(watch_close(reader, d["tag"])) if "tag" in d else None
            writer.write(HEAD)
            if first:
                await asyncio.sleep(first)
            if delay == 0:
                writer.write(b"".join(frames(chunks)))
            else:
                for i, data in enumerate(frames(chunks)):
                    if i:
                        await asyncio.sleep(delay)
                    if watcher is not None and watcher.done():
                        return
                    writer.write(data)
                    await writer.drain()
            await writer.drain()
            if watcher is not None:
                await asyncio.wait([watcher], timeout=5)
                return
            if b"connection: close" in head.lower():
                return
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(main(parser.parse_args().port))
