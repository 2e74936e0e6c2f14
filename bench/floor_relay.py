"""The floor of the stack chatsvc is fixed to: uvicorn, Starlette, one EventSourceResponse and the
openai client's raw stream (on its aiohttp transport, opened with `client.post` as chatsvc does), one
event per read, and nothing else: no checks, deadlines, logs, metrics or ids. Run only by the
benchmark, as the yardstick for what chatsvc itself adds.

    OPENAI_BASE_URL=http://127.0.0.1:9100/v1 python bench/floor_relay.py --port 8002
"""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator

import openai
import uvicorn
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

client = openai.AsyncOpenAI(api_key="bench", max_retries=0, http_client=openai.DefaultAioHttpClient())


async def chat(request: Request) -> Response:
    body = await request.json()
    stream = await client.post(
        "/chat/completions",
        body={"model": "bench", "messages": [{"role": "user", "content": body["message"]}], "stream": True},
        cast_to=ChatCompletion,
        stream=True,
        stream_cls=openai.AsyncStream[ChatCompletionChunk],
    )

    async def events() -> AsyncIterator[dict[str, str]]:
        rest = b""
        async for data in stream.response.aiter_bytes():
            *frames, rest = (rest + data).split(b"\n\n")
            content = "".join(
                json.loads(frame[6:])["choices"][0]["delta"].get("content") or ""
                for frame in frames
                if frame.startswith(b"data: {")
            )
            if content:
                yield {"event": "delta", "data": json.dumps({"content": content})}
        yield {"event": "done", "data": "{}"}

    return EventSourceResponse(events())


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


app = Starlette(routes=[Route("/chat", chat, methods=["POST"]), Route("/healthz", healthz)])

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
