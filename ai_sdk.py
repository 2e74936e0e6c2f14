"""The AI SDK's UI message stream protocol, as POST /api/chat speaks it (chatsvc note 12).

The `ai` package's DefaultChatTransport (which useChat uses) sends UI messages and reads a stream of
UI message chunks. This module holds that protocol's side of chatsvc's `ChatProtocol`: the messages
it reads (text parts only) and how the meta, delta and terminal events are written as chunks. chatsvc
builds its `AI_SDK` protocol from these; the relay is the same for both protocols.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal, Protocol

import orjson
from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

#: The SDK's UI_MESSAGE_STREAM_HEADERS.
HEADERS = {
    "Cache-Control": "no-cache",
    "Connection": "keep-alive",
    "X-Vercel-AI-UI-Message-Stream": "v1",
    "X-Accel-Buffering": "no",
}
TEXT_ID = "text"  # the message's one text part
TEXT_ID_BYTES = TEXT_ID.encode()
#: OpenAI's finish reasons as the AI SDK names them (its `finish` chunk's enum).
FINISH_REASONS = {
    "stop": "stop",
    "length": "length",
    "content_filter": "content-filter",
    "tool_calls": "tool-calls",
    "function_call": "tool-calls",
}

_json = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode  # as JSONResponse's


class Limits(Protocol):
    """What the validators read from the validation context's `settings` (chatsvc's Settings)."""

    MAX_MESSAGE_CHARS: int


def _limits(info: ValidationInfo) -> Limits:
    assert info.context is not None, "validated with the settings as context"
    limits: Limits = info.context["settings"]
    return limits


class UITextPart(BaseModel):
    """A text part of an AI SDK UI message; its other fields (state, providerMetadata, citations)
    are the SDK's own and say nothing to the model, so they are ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text"]
    text: str


class UIMessage(BaseModel):
    """A message as the AI SDK's DefaultChatTransport sends it. Only text is taken."""

    model_config = ConfigDict(extra="ignore", strict=True)  # metadata: the page's own

    id: str
    role: Literal["user", "assistant"]
    parts: list[UITextPart]

    @field_validator("role", mode="before")
    @classmethod
    def _role(cls, value: object) -> object:
        if value == "system":
            raise ValueError("system messages are not taken from the client (the operator sets SYSTEM_PROMPT)")
        return value

    @field_validator("parts", mode="before")
    @classmethod
    def _text_parts_only(cls, value: object) -> object:
        for i, part in enumerate(value if isinstance(value, list) else []):
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind != "text":
                named = kind if re.fullmatch(r"[a-z0-9-]{1,40}", kind) else "another type"
                raise ValueError(f"only text parts are supported; part {i} is {named}")
        return value

    @field_validator("parts")
    @classmethod
    def _length(cls, value: list[UITextPart], info: ValidationInfo) -> list[UITextPart]:
        limit = _limits(info).MAX_MESSAGE_CHARS
        if sum(len(part.text) for part in value) > limit:
            raise ValueError(f"must hold at most {limit} characters of text")
        return value

    @property
    def text(self) -> str:
        return "".join(part.text for part in self.parts)


def encode_chunks(stream_id: str, seq: int, name: str, data: dict[str, Any]) -> bytes:
    """The meta, done or error event as UI message chunks: `data:` lines only, as the SDK's
    JsonToSseTransformStream writes them. The message's metadata carries the correlation id, the
    model and the stream id at the start, the usage and timings at the end."""
    if name == "meta":
        chunks: list[dict[str, Any]] = [
            {"type": "start", "messageId": stream_id, "messageMetadata": data},
            {"type": "text-start", "id": TEXT_ID},
        ]
    elif name == "done" and data["finish_reason"] == "cancelled":  # DELETE: as the SDK's own abort
        chunks = [*_end(data), {"type": "abort", "reason": "cancelled"}]
    elif name == "done":
        finish_reason = FINISH_REASONS.get(data["finish_reason"], "other")
        chunks = [
            {"type": "text-end", "id": TEXT_ID},
            {"type": "finish", "finishReason": finish_reason, "messageMetadata": data},
        ]
    else:  # error: the text is the JSON body, as a refusal's (an APICallError's message) is
        error = {key: value for key, value in data.items() if key != "usage"}
        chunks = [*_end({"usage": data["usage"]}), {"type": "error", "errorText": _json(error)}]
    return b"".join(b"data: %b\n\n" % orjson.dumps(chunk) for chunk in chunks) + (
        b"" if name == "meta" else b"data: [DONE]\n\n"
    )


def _end(metadata: dict[str, Any]) -> list[dict[str, Any]]:
    """The text part's end, and the usage in the metadata, before an abort or an error chunk."""
    return [{"type": "text-end", "id": TEXT_ID}, {"type": "message-metadata", "messageMetadata": metadata}]


def encode_deltas(stream_id: str, first: int, contents: list[str]) -> list[bytes]:
    """Deltas as `text-delta` chunks, one log entry each."""
    return [
        b'data: {"type":"text-delta","id":"%b","delta":%b}\n\n' % (TEXT_ID_BYTES, orjson.dumps(c)) for c in contents
    ]


def last_words(stream_id: str, body: dict[str, Any], usage_template: bytes) -> bytes:
    """encode_chunks's error as a template that `%` fills (chatsvc note 18), its usage chatsvc's
    `usage_template`: encoded when the stream starts, so that its end cannot fail."""
    error = orjson.dumps({"type": "error", "errorText": _json(body)}).replace(b"%", b"%%")
    return (
        b'data: {"type":"text-end","id":"%b"}\n\ndata: {"type":"message-metadata","messageMetadata":{"usage":%b}}\n\n'
        b"data: %b\n\ndata: [DONE]\n\n" % (TEXT_ID_BYTES, usage_template, error)
    )
