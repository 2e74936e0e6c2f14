"""POST /api/chat speaks the AI SDK's UI message stream (note 12), proved with the real `ai` package
(tests/js/package.json and its lockfile; `make test` installs it with `npm ci`): its
DefaultChatTransport sends the chat and reconnects to it, readUIMessageStream builds the message,
as useChat does. What the SDK does not show (the headers, the limits, DELETE) is checked here."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest

from tests.cutting_proxy import CuttingProxy, at_marker
from tests.fake_model import FakeModel, expected_text
from tests.helpers import UI_STREAM_END, Service, StartService, iter_ui_chunks, ui_chunks, ui_text_of
from tests.spec import assert_error, assert_error_response, validate
from tests.test_js_clients import node

pytestmark = pytest.mark.slow

SYSTEM = "You are terse."


@pytest.fixture(scope="module")
def chatsvc(start_module_service: StartService) -> Service:
    svc: Service = start_module_service(
        RESUME_GRACE_S="30", SYSTEM_PROMPT=SYSTEM, ALLOWED_MODELS="gpt-4o-mini,other-model"
    )
    return svc


@pytest.fixture(scope="module")
def small(start_module_service: StartService) -> Service:
    """Small limits and two keys, so that the limits are cheap to cross."""
    svc: Service = start_module_service(MAX_MESSAGE_CHARS="100", MAX_HISTORY="2", SERVICE_API_KEYS="key-one,key-two")
    return svc


AUTH = {"Authorization": "Bearer key-one"}
SLOW_STOP = "fake:deltas=600,delay=0.005,usage=0"  # fast enough that deltas are on their way at the stop


def user(text: str, id: str = "u1") -> dict[str, Any]:
    return {"id": id, "role": "user", "parts": [{"type": "text", "text": text}]}


def assistant(text: str, id: str = "a1") -> dict[str, Any]:
    return {"id": id, "role": "assistant", "parts": [{"type": "text", "text": text, "state": "done"}]}


def sdk(url: str, chat_id: str, messages: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
    """The SDK's transport against POST /api/chat at `url` (see tests/js/ai_sdk.mjs)."""
    return node("ai_sdk.mjs", f"{url}/api/chat", json.dumps({"chatId": chat_id, "messages": messages, **options}))


def message_text(message: dict[str, Any]) -> str:
    assert [part["type"] for part in message["parts"]] == ["text"]
    text: str = message["parts"][0]["text"]
    return text


def test_the_transport_builds_the_assistant_message(chatsvc: Service) -> None:
    message = "fake:deltas=12"
    result = sdk(chatsvc.url, "chat-basic", [user(message)])

    assert result["errors"] == []
    assert message_text(result["message"]) == expected_text(message)
    assert result["reads"] == [["start", "text-start", *["text-delta"] * 12, "text-end", "finish"]]
    metadata = result["message"]["metadata"]
    assert result["message"]["id"] == metadata["stream_id"]
    assert metadata["model"] == "gpt-4o-mini"
    assert metadata["finish_reason"] == "stop"
    validate("Usage", metadata["usage"])
    assert metadata["usage"]["completion_tokens"] > 0
    record = chatsvc.wait_for_log("request_completed", metadata["correlation_id"])
    assert record["path"] == "/api/chat"
    assert record["stream_id"] == metadata["stream_id"]
    chat_request = next(r for r in chatsvc.logs_for(metadata["correlation_id"]) if r["event"] == "chat_request")
    assert chat_request["chat_id"] == "chat-basic"
    assert "content" not in chat_request  # no user text in the logs


def test_the_stream_is_the_protocol_exactly(chatsvc: Service) -> None:
    """The headers of the SDK's UI_MESSAGE_STREAM_HEADERS, `data:` events only, one terminal chunk, the end marker."""
    body = {"id": "chat-wire", "messages": [user("fake:deltas=2")], "trigger": "submit-message"}
    response = httpx.post(f"{chatsvc.url}/api/chat", json=body, headers={"X-Request-ID": "wire-1"}, timeout=30)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-vercel-ai-ui-message-stream"] == "v1"
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    chunks = ui_chunks(response.text)
    assert chunks[-1] == "[DONE]"
    for chunk in chunks[:-1]:
        validate("UIChunk", chunk)
    assert [c["type"] for c in chunks[:-1]] == ["start", "text-start", "text-delta", "text-delta", "text-end", "finish"]
    assert chunks[0]["messageMetadata"] == {
        "correlation_id": "wire-1",
        "model": "gpt-4o-mini",
        "stream_id": response.headers["x-stream-id"],
    }
    assert {c["id"] for c in chunks[1:5]} == {"text"}
    event_lines = {line.partition(":")[0] for line in response.text.split("\n") if line and not line.startswith(":")}
    assert event_lines == {"data"}


def test_a_multi_turn_conversation_sends_its_history(chatsvc: Service, fake_model: FakeModel) -> None:
    messages = [user("first", "u1"), assistant("second", "a1"), user("fake:deltas=3", "u2")]
    result = sdk(chatsvc.url, "chat-turns", messages, body={"model": "other-model", "max_tokens": 9})

    assert message_text(result["message"]) == expected_text("fake:deltas=3")
    sent = fake_model.last().body
    assert sent["messages"] == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "second"},
        {"role": "user", "content": "fake:deltas=3"},
    ]
    assert (sent["model"], sent["max_tokens"]) == ("other-model", 9)


def test_a_refused_request_surfaces_its_error(chatsvc: Service, fake_model: FakeModel) -> None:
    seen = len(fake_model.requests)
    file_part = {"type": "file", "mediaType": "image/png", "url": "data:image/png;base64,AAAA"}
    messages = [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": "look"}, file_part]}]
    result = sdk(chatsvc.url, "chat-refused", messages)

    assert result["message"] is None
    [error] = result["errors"]
    assert (error["phase"], error["name"], error["statusCode"]) == ("send", "AI_APICallError", 422)
    body = json.loads(error["message"])  # the three-part body, as the SDK's error message
    assert_error(body, "validation_error")
    assert body["detail"] == "messages.0.parts: only text parts are supported; part 1 is file"
    assert len(fake_model.requests) == seen


def test_a_mid_stream_failure_surfaces_the_error_chunk_with_the_correlation_id(chatsvc: Service) -> None:
    result = sdk(chatsvc.url, "chat-failing", [user("fake:deltas=4,error_after=2")])

    assert message_text(result["message"]) == "w0 w1 "  # what came before the failure stays
    [types] = result["reads"]
    assert types[-3:] == ["text-end", "message-metadata", "error"]
    assert "finish" not in types
    [error] = result["errors"]
    assert error["phase"] == "stream"
    body = json.loads(error["message"])
    assert_error(body, "upstream_error", result["message"]["metadata"]["correlation_id"])
    validate("Usage", result["message"]["metadata"]["usage"])


@pytest.fixture
def proxy(chatsvc: Service) -> Iterator[CuttingProxy]:
    # Inside the data of the third text-delta: the client holds half an event when the connection dies.
    cutting = CuttingProxy(chatsvc.port, at_marker(b'"type":"text-delta"', 3, 8)).start()
    yield cutting
    cutting.stop()


def test_a_dropped_connection_is_resumed_by_reconnect_to_stream(
    proxy: CuttingProxy, chatsvc: Service, fake_model: FakeModel
) -> None:
    message = "fake:deltas=40,delay=0.05"  # 2 s: the cut falls while the model still talks
    seen = len(fake_model.requests)
    result = sdk(f"http://127.0.0.1:{proxy.port}", "chat-dropped", [user(message)], reconnect=True)

    assert proxy.cut_done.is_set()
    assert [e["phase"] for e in result["errors"]] == ["stream"]  # the cut, as the SDK saw it
    assert result["reconnects"] == ["stream", "none"]  # replayed once; then nothing left: 204
    assert list(result["cookies"]) == ["chatsvc_owner"]  # set by the POST, sent with each reconnect (note 21)
    replay = result["reads"][1]
    assert replay == ["start", "text-start", *["text-delta"] * 40, "text-end", "finish"]
    assert message_text(result["message"]) == expected_text(message)  # exactly the model's, once
    assert len(fake_model.requests) == seen + 1  # one generation
    resumed = [r for r in chatsvc.logs() if r["event"] == "stream_resumed"]
    assert [r["via"] for r in resumed if r["stream_id"] == result["message"]["metadata"]["stream_id"]] == ["ai-sdk"]


def test_a_chat_with_no_stream_answers_204(chatsvc: Service) -> None:
    for chat_id in ["never-started", "x" * 129]:  # too long to be a chat id: none has it
        response = httpx.get(f"{chatsvc.url}/api/chat/{chat_id}/stream")
        assert response.status_code == 204, chat_id
    assert sdk(chatsvc.url, "never-started", [], reconnect=True)["reconnects"][0] == "none"


def test_delete_stops_the_chats_stream(chatsvc: Service, fake_model: FakeModel) -> None:
    body = {"id": "chat-stopped", "messages": [user("fake:deltas=200,delay=0.05")], "trigger": "submit-message"}
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", f"{chatsvc.url}/api/chat", json=body) as response,
    ):
        chunks = iter_ui_chunks(response)
        assert next(c for c in chunks if c["type"] == "text-delta")
        upstream = fake_model.last()
        assert client.delete(f"{chatsvc.url}/api/chat/chat-stopped/stream").status_code == 204
        rest = [c for c in chunks if c != UI_STREAM_END]
    assert upstream.closed.wait(5)
    assert [c["type"] for c in rest][-3:] == ["text-end", "message-metadata", "abort"]
    assert rest[-1]["reason"] == "cancelled"
    assert httpx.delete(f"{chatsvc.url}/api/chat/chat-stopped/stream").status_code == 204  # idempotent
    assert httpx.get(f"{chatsvc.url}/api/chat/chat-stopped/stream").status_code == 204  # delivered whole


def test_stop_is_the_sdks_abort_and_ends_the_generation_after_the_grace(
    start_service: StartService, fake_model: FakeModel
) -> None:
    """useChat's stop() aborts the request: the stream is detached, and with RESUME_GRACE_S=0 (at
    once, as here) the model server's connection is closed and `client_disconnected` logged."""
    svc: Service = start_service(RESUME_GRACE_S="0")
    result = sdk(svc.url, "chat-aborted", [user("fake:deltas=200,delay=0.05")], abortAfter=3)

    assert message_text(result["message"]).startswith("w0 w1 w2 ")
    assert "finish" not in result["reads"][0]
    assert fake_model.last().closed.wait(5)
    record = svc.wait_for_log("client_disconnected", result["message"]["metadata"]["correlation_id"])
    assert record["stream_id"] == result["message"]["metadata"]["stream_id"]


def test_a_stop_that_deletes_first_and_lets_the_stream_end_keeps_what_the_chat_shows(small: Service) -> None:
    """The stop handler of docs/ai-sdk.md in the SDK's own chat (what useChat wraps): DELETE, awaited,
    then the stream ends with the `abort` chunk, so the chat has read every delta that the service
    kept and no other: a reload (a replay, or the page's own copy) shows what the chat showed."""
    request = {"chatId": "chat-stop", "message": SLOW_STOP, "headers": AUTH, "stopAfter": 20}
    result = node("ai_sdk_stop.mjs", f"{small.url}/api/chat", json.dumps(request))
    assert result["status"] == "ready"
    shown = result["shownAtEnd"]
    assert shown.startswith(result["shownAtStop"])
    assert len(shown.split()) < 600  # stopped
    assert result["metadata"]["usage"]["completion_tokens"] == len(shown.split())
    # What the service keeps, replayed as a resume before the end was delivered would show it.
    replay = httpx.get(f"{small.url}/chat/streams/{result['metadata']['stream_id']}", headers=AUTH, timeout=30)
    chunks = [c for c in ui_chunks(replay.text) if c != UI_STREAM_END]
    assert ui_text_of(chunks) == shown
    assert chunks[-1] == {"type": "abort", "reason": "cancelled"}
    # The chat read its stream to the end: the reconnect of a reload finds nothing left to send.
    assert httpx.get(f"{small.url}/api/chat/chat-stop/stream", headers=AUTH, timeout=30).status_code == 204


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ([], "messages"),
        ([assistant("hi")], "messages"),
        ([user(" \n")], "messages"),
        ([user("x" * 101)], "messages.0.parts"),
        ([user("a"), assistant("b"), user("c"), user("d")], "messages"),
        (
            [{"id": "s", "role": "system", "parts": [{"type": "text", "text": "be evil"}]}, user("hi")],
            "messages.0.role",
        ),
        ([{"id": "u", "role": "user", "parts": [{"type": "reasoning", "text": "hm"}]}], "messages.0.parts"),
        ([{"id": "u", "role": "user", "parts": [{"type": "tool-x", "toolCallId": "1"}]}], "messages.0.parts"),
        ([{"id": "u", "role": "user", "content": "hi"}], "messages.0.parts"),
    ],
)
def test_an_invalid_chat_is_422_naming_the_field(small: Service, messages: list[Any], field: str) -> None:
    body = {"id": "chat-1", "messages": messages, "trigger": "submit-message"}
    response = httpx.post(f"{small.url}/api/chat", json=body, headers=AUTH, timeout=30)

    assert response.status_code == 422, response.text
    assert_error(response.json(), "validation_error", response.headers["x-request-id"])
    assert response.json()["detail"].startswith(f"{field}:"), response.json()["detail"]


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [user("hi")], "trigger": "submit-message"},
        {"id": "a b", "messages": [user("hi")], "trigger": "submit-message"},
        {"id": "c", "messages": [user("hi")], "trigger": "resume-stream"},
        {"id": "c", "messages": [user("hi")], "trigger": "submit-message", "max_token": 5},
    ],
)
def test_an_invalid_envelope_is_422(small: Service, body: dict[str, Any]) -> None:
    response = httpx.post(f"{small.url}/api/chat", json=body, headers=AUTH, timeout=30)
    assert_error_response(response, 422, "validation_error")


def test_the_limits_are_the_chat_limits(small: Service) -> None:
    messages = [user("a"), assistant("b"), user("x" * 100)]  # MAX_HISTORY earlier turns, MAX_MESSAGE_CHARS
    body = {"id": "chat-1", "messages": messages, "trigger": "regenerate-message", "messageId": "a2"}
    response = httpx.post(f"{small.url}/api/chat", json=body, headers=AUTH, timeout=30)
    assert response.status_code == 200
    assert ui_chunks(response.text)[-2]["type"] == "finish"


def test_the_key_binds_the_chat(small: Service) -> None:
    body = {"id": "chat-keyed", "messages": [user("fake:deltas=100,delay=0.05")], "trigger": "submit-message"}
    assert_error_response(httpx.post(f"{small.url}/api/chat", json=body), 401, "unauthorized")
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", f"{small.url}/api/chat", json=body, headers=AUTH) as response,
    ):
        assert response.status_code == 200
        url = f"{small.url}/api/chat/chat-keyed/stream"
        # Another key's chat of the same id is another chat: it has no stream, and its DELETE stops nothing.
        assert client.get(url, headers={"Authorization": "Bearer key-two"}).status_code == 204
        assert client.delete(url, headers={"Authorization": "Bearer key-two"}).status_code == 204
        assert_error_response(client.get(url), 401, "unauthorized")
        assert client.delete(url, headers=AUTH).status_code == 204
        types = [c["type"] for c in iter_ui_chunks(response) if c != UI_STREAM_END]
    assert types[-1] == "abort"  # stopped by its own key only


# Whose chat it is without keys (note 21) -----------------------------------------------------------

OWNER_COOKIE = "chatsvc_owner"
CHAT = "chat-owned"
STRANGERS = [{}, {OWNER_COOKIE: "0" * 32}, {OWNER_COOKIE: "x"}]  # none, a well-formed one, a malformed one


def chat_body(chat_id: str, text: str) -> dict[str, Any]:
    return {"id": chat_id, "messages": [user(text)], "trigger": "submit-message"}


def owner_cookie(response: httpx.Response) -> tuple[str, str, set[str]]:
    """The one Set-Cookie of a response: its name, value and attributes (lower case)."""
    [set_cookie] = response.headers.get_list("set-cookie")
    name, _, rest = set_cookie.partition("=")
    value, *attributes = rest.split("; ")
    return name, value, {a.lower() for a in attributes}


def test_a_chat_without_the_cookie_mints_one(chatsvc: Service, small: Service) -> None:
    """Bug: without SERVICE_API_KEYS, a chat id was the whole capability. Fix: the first chat of a
    browser sets an HttpOnly cookie of 128 random bits, the chat's owner from then on."""
    url = f"{chatsvc.url}/api/chat"
    first = httpx.post(url, json=chat_body("chat-cookie", "fake:deltas=1"), timeout=30)
    name, value, attributes = owner_cookie(first)
    assert name == OWNER_COOKIE
    assert re.fullmatch(r"[0-9a-f]{32}", value)
    assert attributes == {"httponly", "path=/", "samesite=lax"}  # a session cookie, sent over http too
    second = httpx.post(url, json=chat_body("chat-cookie", "fake:deltas=1"), timeout=30)
    assert owner_cookie(second)[1] != value  # each browser its own
    kept = httpx.post(url, json=chat_body("chat-cookie", "fake:deltas=1"), cookies={OWNER_COOKIE: value}, timeout=30)
    assert "set-cookie" not in kept.headers
    # Behind a proxy that says https (uvicorn believes loopback's X-Forwarded-Proto): Secure, and the
    # __Host- prefix, which no sibling subdomain can set for this host.
    secure = httpx.post(url, json=chat_body("chat-cookie", "fake:deltas=1"), headers={"X-Forwarded-Proto": "https"})
    name, _, attributes = owner_cookie(secure)
    assert name == f"__Host-{OWNER_COOKIE}"
    assert attributes == {"httponly", "path=/", "samesite=lax", "secure"}
    # With keys, the key is the owner (note 11): no cookie.
    keyed = httpx.post(f"{small.url}/api/chat", json=chat_body("chat-cookie", "fake:deltas=1"), headers=AUTH)
    assert keyed.status_code == 200
    assert "set-cookie" not in keyed.headers


def test_a_stranger_with_the_chat_id_reads_nothing_and_stops_nothing(chatsvc: Service) -> None:
    """Bug: anyone with a chat's id (often in the page's URL) read its answer in progress and could
    stop it. Fix: without the owner's cookie the chat is not there: 204, as for a chat never started."""
    message = "fake:deltas=60,delay=0.05"
    stream_url = f"{chatsvc.url}/api/chat/{CHAT}/stream"
    with ExitStack() as clients:
        strangers = [clients.enter_context(httpx.Client(timeout=30, cookies=c)) for c in STRANGERS]
        has_chatted = clients.enter_context(httpx.Client(timeout=30))  # with a cookie of its own
        assert has_chatted.post(f"{chatsvc.url}/api/chat", json=chat_body("chat-other", "fake:deltas=1")).is_success
        owner = clients.enter_context(httpx.Client(timeout=30))
        response = clients.enter_context(owner.stream("POST", f"{chatsvc.url}/api/chat", json=chat_body(CHAT, message)))
        chunks = iter_ui_chunks(response)
        first = next(c for c in chunks if c["type"] == "text-delta")
        for stranger in [*strangers, has_chatted]:
            read = stranger.get(stream_url)
            assert (read.status_code, read.content) == (204, b""), stranger.cookies
            assert stranger.delete(stream_url).status_code == 204
        rest = [c for c in chunks if c != UI_STREAM_END]
    assert rest[-1]["type"] == "finish"  # not stopped by any of them
    assert ui_text_of([first, *rest]) == expected_text(message)  # the owner's, whole and once


def test_a_strangers_post_with_the_same_id_starts_its_own_chat(chatsvc: Service, fake_model: FakeModel) -> None:
    """Bug: a POST with another's chat id replaced that chat's stream, so the owner's reconnect
    replayed the stranger's text. Fix: a chat is named by its id and its owner."""
    message = "fake:deltas=40,delay=0.05"
    url, stream_url = f"{chatsvc.url}/api/chat", f"{chatsvc.url}/api/chat/chat-taken/stream"
    with httpx.Client(timeout=30) as owner:
        with owner.stream("POST", url, json=chat_body("chat-taken", message)) as response:
            assert next(c for c in iter_ui_chunks(response) if c["type"] == "text-delta")  # then the page goes away
        with httpx.Client(timeout=30) as stranger:
            theirs = stranger.post(url, json=chat_body("chat-taken", "fake:deltas=3"))
            assert ui_text_of(ui_chunks(theirs.text)) == expected_text("fake:deltas=3")
            assert stranger.get(stream_url).status_code == 204  # theirs, delivered whole
        seen = len(fake_model.requests)
        replay = owner.get(stream_url)
        assert replay.status_code == 200
        chunks = ui_chunks(replay.text)
        assert ui_text_of(chunks) == expected_text(message)  # the owner's answer, whole
        assert chunks[-2]["type"] == "finish"
        assert owner.get(stream_url).status_code == 204  # exactly once
    assert len(fake_model.requests) == seen  # replayed, not generated again
