"""The obvious relay the issue measures chatsvc against: Starlette, sse-starlette's
EventSourceResponse and the openai client's AsyncStream, one event per chunk, nothing else (no
errors mapped, no deadlines, no logs). Run only by the benchmark, for the ratio in its table.

    OPENAI_BASE_URL=http://127.0.0.1:9100/v1 python bench/obvious_relay.py --port 8001
"""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator

import openai
import uvicorn
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

client = openai.AsyncOpenAI(api_key="bench")


async def chat(request: Request) -> Response:
    body = await request.json()
    stream = await client.chat.completions.create(
        model="bench", messages=[{"role": "user", "content": body["message"]}], stream=True
    )

    async def events() -> AsyncIterator[dict[str, str]]:
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                yield {"event": "delta", "data": json.dumps({"content": chunk.choices[0].delta.content})}
        yield {"event": "done", "data": "{}"}

    return EventSourceResponse(events())


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


app = Starlette(routes=[Route("/chat", chat, methods=["POST"]), Route("/healthz", healthz)])

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--loop", default="asyncio")
    parser.add_argument("--http", default="h11")
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", loop=args.loop, http=args.http)
