"""The correlation id: chosen, echoed on every response, in events and errors, on every log line of
the request (the libraries' too), and forwarded to the model server."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import chatsvc
from tests.fake_model import FakeModel
from tests.helpers import Service, StartService
from tests.spec import assert_error


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("GET", "/healthz", None, 200),
        ("GET", "/nowhere", None, 404),
        ("GET", "/chat", None, 405),
        ("DELETE", "/healthz", None, 405),
        ("POST", "/chat", {"message": ""}, 422),
        ("POST", "/chat", {"message": "hi"}, 200),
    ],
)
def test_valid_incoming_id_is_echoed(service: Service, method: str, path: str, body: Any, status: int) -> None:
    rid = "client-Id_1.2:3"
    response = httpx.request(method, f"{service.url}{path}", json=body, headers={"X-Request-ID": rid}, timeout=10)

    assert response.status_code == status
    assert response.headers["x-request-id"] == rid
    if status >= 400:
        assert response.json()["correlation_id"] == rid


@pytest.mark.parametrize("bad", [b"has space", b"x" * 129, b"semi;colon", "ünïcode".encode(), b""])
def test_invalid_incoming_id_is_replaced_and_logged(service: Service, bad: bytes) -> None:
    response = httpx.get(f"{service.url}/nowhere", headers={b"X-Request-ID": bad})

    new = response.headers["x-request-id"]
    assert new.encode() != bad
    assert uuid.UUID(new).version == 4
    assert response.json()["correlation_id"] == new
    warning = service.wait_for_log("invalid_request_id", new)
    assert warning["level"] == "WARNING"


def test_id_is_forwarded_to_the_model_server(service: Service, fake_model: FakeModel) -> None:
    service.chat({"message": "hi"}, {"X-Request-ID": "fwd-1"})
    assert fake_model.last().headers["x-client-request-id"] == "fwd-1"


def test_every_log_line_of_a_request_carries_its_id(start_service: StartService) -> None:
    svc: Service = start_service(LOG_LEVEL="DEBUG")
    svc.chat({"message": "hi"}, {"X-Request-ID": "lines-1"})
    svc.wait_for_log("request_completed", "lines-1")

    records = svc.logs()
    start = next(i for i, r in enumerate(records) if r["event"] == "request_received" and r["path"] == "/chat")
    end = next(i for i, r in enumerate(records) if r["event"] == "request_completed" and i > start)
    during = records[start : end + 1]
    assert {r["correlation_id"] for r in during} == {"lines-1"}
    loggers = {r["logger"] for r in during}
    assert "chatsvc" in loggers
    assert loggers - {"chatsvc"}, "no library record was written during the request"
    events = [r["event"] for r in during]
    for expected in ("request_received", "chat_request", "upstream_opened", "first_token", "request_completed"):
        assert expected in events


def test_model_servers_own_request_id_is_logged(service: Service) -> None:
    service.chat({"message": "hi"}, {"X-Request-ID": "up-1"})
    assert service.wait_for_log("upstream_opened", "up-1")["upstream_request_id"].startswith("fake-")


def test_500_has_the_error_body_and_the_id() -> None:
    """An unexpected exception: the one error shape, the id echoed, no traceback in the body."""
    settings = chatsvc.Settings(OPENAI_BASE_URL="http://127.0.0.1:9/v1", _env_file=None)
    app = chatsvc.create_app(settings)

    async def boom(request: Request) -> Response:
        raise RuntimeError("secret internals sk-abcdefghijklmnop")

    app.router.routes.append(Route("/boom", boom))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)

    async def call() -> httpx.Response:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/boom", headers={"X-Request-ID": "boom-1"})

    import anyio

    response = anyio.run(call)
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "boom-1"
    assert_error(response.json(), "internal_error", "boom-1")
    assert "secret internals" not in response.text
    assert "sk-" not in response.text
