"""A new stream's resources (its slot, its span, the upstream connection, its announcement in the
store) are each released however the opening ends, from the moment each is taken."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import anyio
import pytest
from starlette.requests import Request

from chatsvc import CHATSVC, Service, Settings, create_app, start_chat
from tests.fake_model import FakeModel


class FailingStore:
    """A store whose announcement fails with a bug of ours: a test cannot make one from outside."""

    def announce(self, *args: Any) -> asyncio.Task[BaseException | None]:
        async def fail() -> BaseException | None:
            raise RuntimeError("a bug while announcing the stream")

        return asyncio.create_task(fail())


async def chat_with_failing_announcement(fake_model: FakeModel) -> tuple[Service, bool]:
    """POST /chat, in process, with the store's announcement failing once the upstream has opened.
    Returns the service and whether the upstream connection was closed."""
    settings = Settings(
        OPENAI_BASE_URL=fake_model.base_url, OPENAI_API_KEY="sk-test", UPSTREAM_MAX_RETRIES=0, MAX_CONCURRENT_STREAMS=1
    )
    app = create_app(settings)
    service: Service = app.state.service
    service.store = FailingStore()  # type: ignore[assignment]
    message = "fake:deltas=3,first_delay=30,key=opening"  # the upstream stays open until we close it
    body = json.dumps({"message": message}).encode()
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/chat",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "query_string": b"",
        "app": app,
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        with pytest.raises(RuntimeError, match="announcing"):
            await start_chat(Request(scope, receive), CHATSVC)
        seen = next(seen for seen in fake_model.requests if seen.body["messages"][-1]["content"] == message)
        closed = await anyio.to_thread.run_sync(seen.closed.wait, 5)
        return service, closed
    finally:
        await service.close_clients()


def test_a_failed_announcement_releases_the_slot_and_the_upstream(fake_model: FakeModel) -> None:
    """Bug: start_chat took the slot and announced the stream before its `try`, and awaited the
    announcement after it: when that failed (or was cancelled), the slot stayed taken (at
    MAX_CONCURRENT_STREAMS=1 every later chat was refused 503), the span was never ended and the
    upstream connection was left open.
    Fix: each resource's release is registered the moment it is taken (an AsyncExitStack), and
    handed to the producer only when the stream starts."""
    service, closed = asyncio.run(chat_with_failing_announcement(fake_model))

    assert service.slots_in_use == 0, "the slot was never released"
    assert closed, "the upstream connection was left open"
