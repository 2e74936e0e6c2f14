"""A fast fake OpenAI-compatible chat server for the benchmark: raw asyncio, frames encoded once,
so that it is never the bottleneck.

    python bench/fake_upstream.py --port 9100

The last user message picks the answer: "bench:chunks=N,delay=S,first=S" streams N deltas "t0 ",
"t1 ", ... with S seconds between them (0: all in one write) after `first` seconds. The body is
close-delimited (HTTP/1.1, Connection: close) and has no usage chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from functools import cache

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
MODELS = b'{"object":"list","data":[{"id":"bench","object":"model"}]}'


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

    deltas = [frame({"content": f"t{i} "}, None) for i in range(chunks)]
    return (*deltas, frame({}, "stop") + b"data: [DONE]\n\n")


def directives(body: bytes) -> dict[str, float]:
    text = str(json.loads(body)["messages"][-1]["content"])
    pairs = (item.split("=", 1) for item in text.removeprefix("bench:").split(",") if "=" in item)
    return {k: float(v) for k, v in pairs}


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"GET"):
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(MODELS), MODELS)
            )
            return
        length = next(
            int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
        )
        d = directives(await reader.readexactly(length))
        chunks, delay = int(d.get("chunks", 10)), d.get("delay", 0.0)
        writer.write(HEAD)
        if first := d.get("first", 0.0):
            await asyncio.sleep(first)
        if delay == 0:
            writer.write(b"".join(frames(chunks)))
        else:
            for i, data in enumerate(frames(chunks)):
                if i:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
        await writer.drain()
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
