"""What the upstream client costs per stream, measured alone: open a stream to the fake upstream,
read its one-delta body, close; 1000 in a row, then 1000 at once. CPU time of this process
(`time.process_time`), pinned to core 0, the fake upstream on core 1.

    .venv/bin/python bench/client_cost.py

Ways compared: openai's `chat.completions.create` on its default httpx transport and on its
aiohttp transport; `client.post` on the aiohttp transport (what chatsvc does); aiohttp alone.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import openai
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.run import PY, ROOT, free_port, pinned, running

BODY = {"model": "bench", "messages": [{"role": "user", "content": "bench:chunks=1"}], "stream": True}


async def measure(base_url: str, way: str, count: int) -> tuple[float, float]:
    aio = way != "create, httpx transport"
    client = openai.AsyncOpenAI(
        api_key="bench", base_url=base_url, max_retries=0, http_client=openai.DefaultAioHttpClient() if aio else None
    )
    session = aiohttp.ClientSession()

    async def via_openai() -> None:
        if way.startswith("post"):
            stream: openai.AsyncStream[object] = await client.post(
                "/chat/completions", body=BODY, cast_to=object, stream=True, stream_cls=openai.AsyncStream[object]
            )
        else:
            stream = await client.chat.completions.create(  # type: ignore[assignment]
                model="bench", messages=[{"role": "user", "content": "bench:chunks=1"}], stream=True
            )
        async for _ in stream.response.aiter_bytes():
            pass
        await stream.close()

    async def via_aiohttp() -> None:
        async with session.post(f"{base_url}/chat/completions", json=BODY) as response:
            async for _ in response.content.iter_any():
                pass

    one: Callable[[], Awaitable[None]] = via_aiohttp if way == "aiohttp alone" else via_openai
    try:
        for _ in range(50):  # warm-up: connections, caches
            await one()
        started = time.process_time()
        for _ in range(count):
            await one()
        in_a_row = (time.process_time() - started) / count
        started = time.process_time()
        await asyncio.gather(*(one() for _ in range(count)))
        at_once = (time.process_time() - started) / count
    finally:
        await client.close()
        await session.close()
    return in_a_row, at_once


def main() -> None:
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {0})  # like chatsvc in bench/run.py; the fake upstream gets core 1
    port = free_port()
    count = 100 if "--smoke" in sys.argv else 1000
    fake = [*pinned(1), PY, str(ROOT / "bench/fake_upstream.py"), "--port", str(port)]
    with running(fake, {}, f"http://127.0.0.1:{port}/v1/models"):
        print(f"| upstream client, CPU per stream | {count} in a row | {count} at once |\n|---|---|---|")
        for way in ("create, httpx transport", "create, aiohttp transport", "post, aiohttp transport", "aiohttp alone"):
            in_a_row, at_once = uvloop.run(measure(f"http://127.0.0.1:{port}/v1", way, count))
            print(f"| {way} | {in_a_row * 1e6:,.0f} µs | {at_once * 1e6:,.0f} µs |")


if __name__ == "__main__":
    main()
