"""chatsvc: relay an OpenAI-compatible chat model's answer as Server-Sent Events.

Read top-down: settings, errors, the request middleware, the chat request and the upstream client,
the relay (the stream log, its producer and its followers), the store interface, admission and
drain (the service's state), the endpoints, `create_app`, and the launcher that `python chatsvc.py`
runs. Each integration that brings a library of its own sits beside this module: redis_store.py
(redis-py) and the OpenTelemetry SDK (through tracing.py) loaded only when configured,
worker_metrics.py (prometheus-client's multiprocess mode) only with several workers or
PROMETHEUS_MULTIPROC_DIR; metrics.py (prometheus-client), http_protocol.py (uvicorn's protocol),
served_files.py (the page and the contract, PyYAML), logging_conf.py (python-json-logger) and
ai_sdk.py (the AI SDK's protocol) always.

Deliberate departures from the libraries' defaults. The code points back here as "note N"; each note
says what departs from which default and why, and docs/design.md explains it at length.

1. Retries are ours: the openai client has `max_retries=0`, since its loop sleeps for Retry-After
   (up to two minutes) without knowing our REQUEST_TIMEOUT_S. Ours retries the same failures only
   while the wait fits in the budget, and never once content has been sent (note 22).
   docs/design.md#1-retries-are-ours-not-openais
2. A declared Content-Length over MAX_BODY_BYTES is refused by our middleware, not by Starlette's
   `max_body_size`, which would replace our JSON error with a plain-text 413. Starlette's limit
   still guards bodies without a length. docs/design.md#2-declared-body-length-checked-by-our-middleware
3. One producer, a log, followers: one task per stream reads the upstream body, appends each event to
   the stream's log and decides the one outcome; each client connection is a follower that replays
   and tails that log. One cancel scope bounds the read; the producer reads ahead of slow clients,
   within RESUME_BUFFER_MB. The read returns how it ended, and `record` logs, counts and marks the
   span once. The slot, span, store announcement and upstream connection are each registered in an
   AsyncExitStack as they are taken, and the producer takes the stack over when its task starts.
   docs/design.md#3-one-producer-a-log-followers
4. Shutdown drains before uvicorn stops listening: the lifespan puts its own SIGTERM/SIGINT handler
   in front of uvicorn's (which closes the socket at once), flips /readyz and new chats to 503, lets
   streams run SHUTDOWN_GRACE_S, ends the rest with `shutting_down`, then hands the signal on.
   docs/design.md#4-drain-before-the-server-stops-listening
5. sse-starlette's force-cancel grace is set longer than ours, so that our `shutting_down` event,
   not a silent cancel, ends a stream that outlives SHUTDOWN_GRACE_S.
   docs/design.md#5-a-longer-force-cancel-grace
6. No usage from the upstream (many local servers send none): completion tokens are the content
   deltas, prompt tokens four characters each, and `done` says `"source": "estimated"`.
   docs/design.md#6-estimated-usage
7. No `done` without a finish_reason: openai's parser ends quietly when `[DONE]` never comes, so a cut
   stream gets `upstream_error`. After a finish_reason we wait at most FINISH_WAIT_S more, then `done`.
   docs/design.md#7-no-done-without-a-finish-reason
8. A client that stops reading is cut off after SEND_TIMEOUT_S (sse-starlette's send timeout), so it
   cannot hold a connection and a growing buffer; its stream is detached (note 11), and if nobody
   resumes it, it ends `client_too_slow`. docs/design.md#8-clients-that-stop-reading
9. openai opens the stream, but its body is parsed here (`UpstreamFrames`, orjson), not by openai's
   `AsyncStream`, whose per-chunk models were half of our CPU; failures are raised as the openai
   exceptions `AsyncStream` raises, so they are mapped in one place.
   docs/design.md#9-our-own-parser-for-the-upstream-body
10. Garbage collection departs from CPython's defaults, under which a full collection stalled 1000
    open streams for up to 0.5 s: the start-up heap is frozen, the young thresholds raised, and
    full collections left to idle moments (no stream and no follower in flight). A finished
    stream leaves nothing of ours in a cycle: what anyio's cycles hold lets go of the stream.
    docs/design.md#10-garbage-collection-for-many-open-streams
11. Streams survive a dropped connection: event ids `<stream_id>:<seq>`, with the `id:` line last,
    not first as in sse-starlette (fetch-event-source takes it on reading it); a detached stream runs
    on for RESUME_GRACE_S, a finished log is kept RESUME_TTL_S, detached streams are evicted first,
    and a stream is bound to its key or browser. A POST sent again with its Idempotency-Key follows
    the stream that the first one started (or, still opening, starts). docs/design.md#11-resumable-streams
12. Two protocols, one relay: POST /api/chat speaks the AI SDK's UI message stream beside /chat's own
    events. A `ChatProtocol` reads the request and encodes the events; the producer, the log and the
    followers are shared; the SDK resumes by chat. The SDK's side (UI messages, chunk encoders,
    headers) is ai_sdk.py. docs/design.md#12-two-protocols-one-relay
13. Several workers, one /metrics: each of uvicorn's workers switches prometheus-client's multiprocess
    mode on for itself (no code of ours runs in the supervisor); gauges are `livesum`/`livemax`, and
    scrape-time gauges are written every second (worker_metrics.py, imported only in a worker of a
    supervisor or with PROMETHEUS_MULTIPROC_DIR set). docs/design.md#13-several-workers-one-metrics
14. Traces are OpenTelemetry's, switched on by its own OTEL_* variables (else tracing.py does not
    import the SDK, and the core's calls go to the API's no-op spans): a server span per request
    from W3C trace context (never baggage), and the producer's upstream span, which carries the
    outcome; no stream id, text or key in a span.
    docs/design.md#14-tracing-with-opentelemetry
15. Any replica resumes any stream with RESUME_STORE=redis://: the producing replica's log stays the
    live path and a writer copies it behind, batched every STORE_WRITE_INTERVAL_S (50 ms), never
    awaited by the producer; other replicas read the store. redis-py, and redis_store.py, which the
    core calls through `Store`, are imported only then.
    docs/design.md#15-a-shared-resume-store-redis
16. What a client sends costs time linear in its size (targets over MAX_TARGET_BYTES refused 414,
    paths logged as route templates or a bounded prefix, an upstream event joined once), and a route
    answers only its documented methods: no HEAD that Starlette would add (405).
    docs/design.md#16-linear-cost-documented-methods
17. Slow clients are bounded at the connection, where uvicorn has no deadline and closes gracefully:
    the body within BODY_TIMEOUT_S (any server), the headers within HEADERS_TIMEOUT_S and an abort
    with SO_LINGER 0 for a follower cut off (`python chatsvc.py` only), and the last send bounded.
    docs/design.md#17-slow-clients-bounded-at-the-connection
18. One terminal event, whatever the model server sends and whatever fails in us: each chunk checked
    in one place (`parse_chunk`); a malformed stream is `upstream_error`, our bug `internal_error` at
    ERROR, and a last resort that cannot fail ends the stream. The model server's failures are
    mapped by `map_upstream_error` alone; anything else raised while opening or reading is ours.
    docs/design.md#18-one-terminal-event
19. A stream lives in the store as long as someone follows it anywhere: presence keys renewed every
    second, a liveness key per replica (its loss ends remote followers with `stream_lost`), and every
    key created with its expiry. docs/design.md#19-store-keys-live-as-long-as-someone-follows
20. Followers are bounded: each writes at most WRITE_BYTES (64 KiB) at a time, since uvicorn takes a
    whole write whether or not the client reads, and MAX_FOLLOWERS_PER_STREAM and MAX_FOLLOWERS
    bound their number (503 `too_many_followers`). docs/design.md#20-bounded-followers
21. Without SERVICE_API_KEYS, an AI SDK chat, whose id the client chooses, belongs to the browser that
    started it: an HttpOnly owner cookie, kept only as a digest; a resume with another cookie names a
    chat nobody started (204). docs/design.md#21-ai-sdk-chats-belong-to-their-browser
22. Several model servers (UPSTREAMS): before the first content, a failure another server could fix
    moves the stream to the next (`Failover`); after it, never. A breaker per server skips one that
    keeps failing; `done` names the server that answered, never its URL.
    docs/design.md#22-failover-before-the-first-content-a-breaker-per-model-server
23. A stop keeps what was seen: DELETE with Last-Event-ID or ?after= cuts the log back to that event
    before the `done` (followers past the cut get it next), here and in the store's copy, in order
    with the appends; a stream that has ended stays as it is. docs/design.md#23-a-stop-keeps-what-was-seen
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import enum
import functools
import gc
import hashlib
import hmac
import itertools
import json
import logging
import math
import os
import random
import re
import secrets
import signal
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import cached_property
from types import FrameType
from typing import Annotated, Any, ClassVar, Literal, NoReturn, Protocol, TypeVar

import aiohttp
import anyio
import httpx2
import openai
import orjson
import uvicorn
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageParam
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import SendTimeoutError
from starlette.applications import Starlette
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route, request_response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.supervisors import Multiprocess

import ai_sdk
from http_protocol import ABORT_EXTENSION, ServerConfig
from logging_conf import Redactor, configure_logging, correlation_id, text_fingerprint
from metrics import Metrics, join_worker_metrics
from served_files import ChatPage, load_openapi
from tracing import Tracing

log = logging.getLogger("chatsvc")

REQUEST_ID_HEADER = "X-Request-ID"
STREAM_ID_HEADER = "X-Stream-ID"
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
IDEMPOTENCY_KEY_PATTERN = re.compile(r"[\x20-\x7e]{1,255}")  # printable ASCII; Stripe's length
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
MAX_TARGET_BYTES = 8 * 1024  # the path and query string of a request (note 16)
LOGGED_PATH_CHARS = 64  # of a path that matched no route (note 16)
FINISH_WAIT_S = 2.0  # note 7


# --- Settings ---------------------------------------------------------------------------------------

UPSTREAM_NAME_PATTERN = r"^[A-Za-z0-9._-]{1,32}$"  # a metric label and a log field: short, plain


class UpstreamServer(BaseModel):
    """One model server of UPSTREAMS (note 22): named for the logs, metrics and `done`, which never
    show its URL or key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=UPSTREAM_NAME_PATTERN)
    base_url: str | None = Field(None, pattern=r"^https?://[^\s]+$")  # None: OpenAI's
    api_key: SecretStr | None = None
    # The models it serves: a list of the names clients ask for, or a mapping from those names to
    # its own; None: every model in ALLOWED_MODELS, by the same name.
    models: tuple[str, ...] | dict[str, str] | None = None
    health_url: str | None = Field(None, pattern=r"^https?://[^\s]+$")  # for /readyz
    connect_timeout_s: float | None = Field(None, gt=0)  # its own CONNECT_TIMEOUT_S
    idle_timeout_s: float | None = Field(None, gt=0)  # its own IDLE_TIMEOUT_S
    first_token_timeout_s: float | None = Field(None, gt=0)  # its own FIRST_TOKEN_TIMEOUT_S

    def model_name(self, model: str) -> str | None:
        """Its name for the model a client asked for; None if it does not serve it."""
        if self.models is None:
            return model
        if isinstance(self.models, dict):
            return self.models.get(model)
        return model if model in self.models else None


class Settings(BaseSettings):
    """Everything configurable, read once from the environment and `.env`; see `.env.example`."""

    model_config = SettingsConfigDict(env_file=".env", env_ignore_empty=True, extra="ignore", frozen=True)

    OPENAI_API_KEY: SecretStr | None = None
    OPENAI_BASE_URL: str | None = None
    UPSTREAM_HEALTH_URL: str | None = None
    UPSTREAMS: tuple[UpstreamServer, ...] = ()  # JSON; in place of OPENAI_* (note 22)
    OPENAI_MODEL: str = "gpt-4o-mini"
    ALLOWED_MODELS: Annotated[tuple[str, ...], NoDecode] = ()
    SYSTEM_PROMPT: str | None = None
    MAX_TOKENS: int = Field(2000, ge=1)
    MAX_MESSAGE_CHARS: int = Field(32000, ge=1)
    MAX_HISTORY: int = Field(50, ge=0)
    MAX_BODY_BYTES: int = Field(256 * 1024, ge=1024)
    REQUEST_TIMEOUT_S: float = Field(30.0, gt=0)
    CONNECT_TIMEOUT_S: float = Field(5.0, gt=0)
    IDLE_TIMEOUT_S: float = Field(15.0, gt=0)
    FIRST_TOKEN_TIMEOUT_S: float | None = Field(None, gt=0)  # unset: only IDLE_TIMEOUT_S and the budget
    UPSTREAM_MAX_RETRIES: int = Field(2, ge=0, le=10)
    BREAKER_FAILURES: int = Field(5, ge=0)  # note 22; 0: no breaker
    BREAKER_WINDOW_S: float = Field(30.0, gt=0)
    BREAKER_COOLDOWN_S: float = Field(30.0, gt=0)
    PING_INTERVAL_S: float = Field(15.0, gt=0)
    MAX_CONCURRENT_STREAMS: int = Field(256, ge=1)
    MAX_FOLLOWERS: int | None = Field(None, ge=1)  # note 20; unset: 4 x MAX_CONCURRENT_STREAMS
    MAX_FOLLOWERS_PER_STREAM: int = Field(8, ge=1)
    SHUTDOWN_GRACE_S: float = Field(25.0, ge=0)
    SEND_TIMEOUT_S: float = Field(30.0, gt=0)
    HEADERS_TIMEOUT_S: float = Field(10.0, gt=0)
    BODY_TIMEOUT_S: float = Field(30.0, gt=0)
    RESUME_GRACE_S: float = Field(20.0, ge=0)
    RESUME_TTL_S: float = Field(60.0, ge=0)
    RESUME_BUFFER_MB: float = Field(64.0, gt=0)
    RESUME_STORE: str = Field("memory", pattern=r"^(memory|rediss?://.+)$")
    RESUME_STORE_TIMEOUT_S: float = Field(1.0, gt=0)
    RESUME_STORE_QUEUE_MB: float = Field(8.0, gt=0)
    SERVICE_API_KEYS: SecretStr | None = None
    CORS_ALLOW_ORIGINS: Annotated[tuple[str, ...], NoDecode] = ()
    LOG_LEVEL: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    LOG_CONTENT: bool = False
    LOG_FORMAT: Literal["auto", "json", "console"] = "auto"
    SERVE_PAGE: bool = True
    HOST: str = "127.0.0.1"
    PORT: int = Field(8000, ge=0, le=65535)
    WORKERS: int = Field(1, ge=1, le=64)

    @field_validator("ALLOWED_MODELS", "CORS_ALLOW_ORIGINS", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(item.strip() for item in value.split(",") if item.strip())
        return value

    @field_validator("LOG_LEVEL", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("LOG_FORMAT", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("MAX_FOLLOWERS")
    @classmethod
    def _room_for_every_stream(cls, value: int | None, info: ValidationInfo) -> int | None:
        # Every stream's first client is a follower (note 20): fewer followers than streams would
        # refuse chats that MAX_CONCURRENT_STREAMS admits.
        streams = info.data.get("MAX_CONCURRENT_STREAMS")
        if value is not None and streams is not None and value < streams:
            raise ValueError(f"must be at least MAX_CONCURRENT_STREAMS ({streams})")
        return value

    @field_validator("UPSTREAMS")
    @classmethod
    def _one_way_to_name_upstreams(
        cls, value: tuple[UpstreamServer, ...], info: ValidationInfo
    ) -> tuple[UpstreamServer, ...]:
        if not value:
            return value
        names = [server.name for server in value]
        if len(set(names)) < len(names):
            raise ValueError("each upstream needs a name of its own")
        given = [v for v in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "UPSTREAM_HEALTH_URL") if info.data.get(v)]
        if given:
            raise ValueError(f"set either UPSTREAMS or {', '.join(given)}, not both")
        return value

    @model_validator(mode="after")
    def _every_model_served(self) -> Settings:
        for model in dict.fromkeys((*self.allowed_models, self.OPENAI_MODEL)):  # the default is asked for too
            if not any(server.model_name(model) for server in self.upstreams):
                raise ValueError(f"UPSTREAMS: no upstream serves the model {model!r} (ALLOWED_MODELS, OPENAI_MODEL)")
        return self

    @cached_property
    def upstreams(self) -> tuple[UpstreamServer, ...]:
        """UPSTREAMS, or the one model server that OPENAI_* name (made once: the settings are frozen)."""
        if self.UPSTREAMS:
            return self.UPSTREAMS
        server = UpstreamServer(name="default", api_key=self.OPENAI_API_KEY, health_url=self.UPSTREAM_HEALTH_URL)
        return (server.model_copy(update={"base_url": self.OPENAI_BASE_URL}),)  # as given: not checked before

    @property
    def max_followers(self) -> int:
        return self.MAX_FOLLOWERS or 4 * self.MAX_CONCURRENT_STREAMS

    @property
    def configured(self) -> bool:
        return self.OPENAI_API_KEY is not None or self.OPENAI_BASE_URL is not None or bool(self.UPSTREAMS)

    @property
    def allowed_models(self) -> tuple[str, ...]:
        return self.ALLOWED_MODELS or (self.OPENAI_MODEL,)

    @property
    def service_keys(self) -> tuple[bytes, ...]:
        raw = self.SERVICE_API_KEYS.get_secret_value() if self.SERVICE_API_KEYS else ""
        return tuple(k.strip().encode() for k in raw.split(",") if k.strip())

    @property
    def log_format(self) -> str:
        """LOG_FORMAT, with "auto" decided: console for a terminal, JSON for anything else."""
        if self.LOG_FORMAT == "auto":
            return "console" if sys.stdout.isatty() else "json"
        return self.LOG_FORMAT

    @cached_property
    def owner_key(self) -> bytes:
        """The key of the digests that bind streams to the API key that started them (note 11): the
        same on every replica given the same SERVICE_API_KEYS, and no digest reveals a key without
        all of them."""
        return hashlib.sha256(b"chatsvc stream owner\0" + b"\0".join(sorted(self.service_keys))).digest()

    @property
    def redis_url(self) -> str | None:
        return None if self.RESUME_STORE == "memory" else self.RESUME_STORE

    @property
    def secrets(self) -> list[str]:
        """Values that must never reach the logs."""
        keys = [server.api_key.get_secret_value() for server in self.upstreams if server.api_key]
        store_password = urllib.parse.urlsplit(self.redis_url).password if self.redis_url else None
        return [*keys, *(k.decode() for k in self.service_keys), *([store_password] if store_password else [])]


def load_settings() -> Settings:
    """Settings from the environment; a bad value ends the process with exit code 2 and a
    three-part message on stderr naming the variable (never the value: it may be a secret)."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = (
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" if e["loc"] else e["msg"].removeprefix("Value error, ")
            for e in exc.errors()
        )
        exit_misconfigured("; ".join(problems))
    except SettingsError as exc:  # a JSON setting that is not JSON: pydantic-settings names it
        field_name = re.search(r'field "(\w+)"', str(exc))
        exit_misconfigured(f"{field_name[1] if field_name else 'a setting'}: not valid JSON")


def exit_misconfigured(detail: str, variable: str = "the named variable") -> NoReturn:
    message = {
        "error": "invalid configuration",
        "detail": detail,
        "action": f"fix {variable} in the environment or in .env (see .env.example), then start again",
    }
    print(json.dumps(message), file=sys.stderr)
    raise SystemExit(2)


# --- Errors -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErrorKind:
    status: int
    error: str
    action: str
    retryable: bool


#: Every error code the service answers with: status, what happened, what the caller can do.
ERRORS: dict[str, ErrorKind] = {
    "invalid_json": ErrorKind(400, "request body is not valid JSON", "send a JSON object", False),
    "unauthorized": ErrorKind(
        401, "missing or wrong API key", "send the header 'Authorization: Bearer <key>' with a valid key", False
    ),
    "not_found": ErrorKind(404, "no such endpoint", "see /openapi.json for the endpoints", False),
    "stream_not_found": ErrorKind(
        404,
        "no such stream",
        "start a new chat: a stream can be resumed while it runs and for RESUME_TTL_S after it ends",
        False,
    ),
    "method_not_allowed": ErrorKind(
        405, "method not allowed on this endpoint", "see /openapi.json for the methods", False
    ),
    "request_timeout": ErrorKind(
        408,
        "the request did not arrive in time",
        "send the headers within HEADERS_TIMEOUT_S of connecting and the body within BODY_TIMEOUT_S after them",
        True,
    ),
    "payload_too_large": ErrorKind(
        413, "request body too large", "shorten the message or the history (limit: MAX_BODY_BYTES)", False
    ),
    "uri_too_long": ErrorKind(
        414, "request target too long", "shorten the path and query string (limit: 8 KiB)", False
    ),
    "unsupported_media_type": ErrorKind(
        415, "unsupported content type", "send 'Content-Type: application/json'", False
    ),
    "validation_error": ErrorKind(422, "request is invalid", "correct the named field and send again", False),
    "idempotency_key_reused": ErrorKind(
        422,
        "this Idempotency-Key came with another request",
        "send a new request with a new key; the same key is for sending the same request again",
        False,
    ),
    "rate_limited": ErrorKind(
        429, "the model server is rate limiting", "wait for Retry-After seconds, then retry", True
    ),
    "upstream_error": ErrorKind(502, "the model server failed", "retry; if it persists, check the model server", True),
    "upstream_auth": ErrorKind(
        502,
        "the model server refused our credentials",
        "the operator must check OPENAI_API_KEY (or the upstream's api_key in UPSTREAMS)",
        False,
    ),
    "resume_unavailable": ErrorKind(
        503,
        "this stream cannot be resumed here now",
        "retry after Retry-After seconds: the replica producing it still has it (RESUME_STORE)",
        True,
    ),
    "stream_lost": ErrorKind(
        503,
        "the replica producing this stream is gone",
        "send the chat again: the rest of this answer was lost with the replica producing it (RESUME_STORE)",
        True,
    ),
    "overloaded": ErrorKind(
        503, "too many streams in progress", "retry after Retry-After seconds (limit: MAX_CONCURRENT_STREAMS)", True
    ),
    "too_many_followers": ErrorKind(
        503,
        "too many clients follow streams here",
        "retry after Retry-After seconds (limits: MAX_FOLLOWERS_PER_STREAM, MAX_FOLLOWERS)",
        True,
    ),
    "shutting_down": ErrorKind(
        503, "the service is shutting down", "retry; another instance or this one after restart will answer", True
    ),
    "not_configured": ErrorKind(
        503,
        "no model server is configured",
        "the operator must set OPENAI_API_KEY, OPENAI_BASE_URL or UPSTREAMS",
        False,
    ),
    "upstream_unavailable": ErrorKind(
        503,
        "no model server can take the request now",
        "retry after Retry-After seconds: every model server for this model failed recently (BREAKER_COOLDOWN_S)",
        True,
    ),
    "upstream_timeout": ErrorKind(
        504, "the model server did not answer in time", "retry, perhaps with a shorter request", True
    ),
    "upstream_unreachable": ErrorKind(
        504, "the model server cannot be reached", "retry; if it persists, check OPENAI_BASE_URL (or UPSTREAMS)", True
    ),
    "deadline_exceeded": ErrorKind(
        504, "the answer took longer than the request budget", "ask for a shorter answer (max_tokens)", True
    ),
    "internal_error": ErrorKind(500, "internal error", "retry; if it persists, report the correlation_id", True),
}


class ServiceError(Exception):
    """An error with a stable code; rendered as an HTTP body before the stream, as an event after."""

    def __init__(self, code: str, detail: str, *, retry_after: float | None = None, status: int | None = None) -> None:
        super().__init__(code, detail)
        self.code = code
        self.kind = ERRORS[code]
        self.status = status or self.kind.status  # /readyz answers 503 whatever the reason
        self.detail = detail
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {
            "error": self.kind.error,
            "detail": self.detail,
            "action": self.kind.action,
            "code": self.code,
            "retryable": self.kind.retryable,
            "correlation_id": correlation_id.get(),
        }

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class MalformedStream(Exception):
    """The model server's body cannot be read (note 18): what is wrong with it, for map_upstream_error."""


#: Every failure of the model server that map_upstream_error maps; anything else raised while the
#: upstream is opened or read is a bug of ours (note 18).
UPSTREAM_FAILURES = (openai.APIError, TimeoutError, MalformedStream)


def map_upstream_error(
    exc: Exception,
    settings: Settings,
    *,
    streaming: bool = False,
    deadline: float = math.inf,
    drain_deadline: float = math.inf,
    first_token_by: float = math.inf,
) -> ServiceError:
    """The one place where the model server's failures become our codes: openai's exceptions (what
    it raises, and what the relay raises in its shape, note 9), our parser's MalformedStream, and
    our own deadlines (the TimeoutError of anyio's fail_after or fail_at).
    `streaming`: the 200 is already sent, so a broken connection is an `upstream_error` event, not an
    unreachable server, and a deadline is the request's (`deadline`) or the drain's. Anything else
    is re-raised: a bug of ours is never the model server's fault."""
    if isinstance(exc, MalformedStream):
        return ServiceError("upstream_error", f"the model server sent a malformed stream ({exc})")
    if isinstance(exc, openai.APIError):
        error = _openai_failure(exc, streaming)
        # What broke, for the span and the log (note 14): its type and status, not the tracebacks of it
        # and what it chains to, whose frames hold what holds this error (a cycle, note 10).
        cause: BaseException | None = exc
        while cause is not None and cause.__traceback__ is not None:
            cause = cause.with_traceback(None).__cause__ or cause.__context__
        error.__cause__ = exc
        return error
    if isinstance(exc, TimeoutError):  # our own deadline (anyio.fail_after): which one
        if not streaming:
            detail = f"the model server did not accept the request within {settings.REQUEST_TIMEOUT_S} s"
            return ServiceError("upstream_timeout", detail)
        now = time.monotonic()  # anyio raises it at or after the deadline it was given
        if now >= drain_deadline:
            code = "shutting_down"
        elif now >= deadline:
            code = "deadline_exceeded"
        elif now >= first_token_by:
            return ServiceError("upstream_timeout", "no content from the model server within its first-token timeout")
        else:
            code = "upstream_timeout"  # the wait after a finish_reason (note 7)
        return ServiceError(code, _TIMEOUT_DETAILS[code](settings))
    raise exc


def _openai_failure(exc: openai.APIError, streaming: bool) -> ServiceError:
    if isinstance(exc, openai.APIConnectionError):  # APITimeoutError included
        failure = _transport_failure(exc)
        name = type(failure).__name__
        if isinstance(failure, TimeoutError | httpx2.TimeoutException):
            if isinstance(failure, httpx2.ConnectTimeout | httpx2.PoolTimeout | aiohttp.ConnectionTimeoutError):
                return ServiceError(
                    "upstream_unreachable", "connecting to the model server took over CONNECT_TIMEOUT_S"
                )
            return ServiceError("upstream_timeout", "the model server went silent for longer than IDLE_TIMEOUT_S")
        if streaming:
            return ServiceError("upstream_error", f"the connection to the model server broke mid-stream ({name})")
        if isinstance(failure, aiohttp.ServerDisconnectedError | httpx2.RemoteProtocolError):
            return ServiceError(
                "upstream_unreachable", f"the model server closed the connection before answering ({name})"
            )
        return ServiceError("upstream_unreachable", f"could not connect to the model server ({name})")
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        upstream_code = _upstream_error_code(exc.body)
        said = f"the model server answered {status}" + (f" ({upstream_code})" if upstream_code else "")
        if status == 429:
            return ServiceError("rate_limited", said, retry_after=retry_after_seconds(exc.response.headers) or 1)
        if status in (401, 403):
            return ServiceError("upstream_auth", said)
        return ServiceError("upstream_error", said)
    # An in-band {"error": ...} chunk in the middle of the stream.
    upstream_code = _upstream_error_code(exc.body)
    return ServiceError(
        "upstream_error",
        "the model server sent an error in the stream" + (f" ({upstream_code})" if upstream_code else ""),
    )


_TIMEOUT_DETAILS: dict[str, Callable[[Settings], str]] = {
    "upstream_timeout": lambda s: f"no data from the model server for {s.IDLE_TIMEOUT_S} s",
    "deadline_exceeded": lambda s: f"the answer did not finish within REQUEST_TIMEOUT_S ({s.REQUEST_TIMEOUT_S} s)",
    "shutting_down": lambda s: (
        f"the service is shutting down and the stream outlived its grace ({s.SHUTDOWN_GRACE_S} s)"
    ),
}


def _transport_failure(exc: openai.APIConnectionError) -> BaseException:
    """What really failed beneath openai's wrapping. openai's aiohttp transport raises httpx's
    ConnectTimeout for every aiohttp connection error, a refused or hung-up connection included:
    there, the aiohttp error underneath tells."""
    cause = exc.__cause__
    if cause is not None and isinstance(cause.__cause__, aiohttp.ClientError | TimeoutError):
        return cause.__cause__
    return cause or exc


def _upstream_error_code(body: object) -> str | None:
    """The upstream's own error code or type (e.g. context_length_exceeded): stable and safe to show,
    unlike its message, which may echo a key or the user's text."""
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping):
            for key in ("code", "type"):
                value = inner.get(key)
                if isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", value):
                    return value
    return None


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value) if email.utils.parsedate_tz(value) else None
        return None if when is None else max(0.0, when.timestamp() - time.time())


def is_retryable(exc: Exception) -> bool:
    if isinstance(exc, openai.APIConnectionError):
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in (408, 409, 429) or exc.status_code >= 500
    return False


async def render_error(request: Request, exc: Exception) -> Response:
    """Exception handler for everything: our errors, Starlette's 404/405/413, and the unexpected."""
    if isinstance(exc, ServiceError):
        error = exc
    elif isinstance(exc, HTTPException) and exc.status_code in _HTTP_CODES:
        error = ServiceError(_HTTP_CODES[exc.status_code], _HTTP_DETAILS[exc.status_code](request))
    else:
        # uvicorn logs the traceback (through our redaction) once this handler has answered.
        error = ServiceError("internal_error", f"unexpected {type(exc).__name__}")
    log_request_failed(request.scope, error, error.status, exc)
    headers = {**error.headers(), REQUEST_ID_HEADER: correlation_id.get() or ""}
    if exc.__class__ is HTTPException and exc.headers:  # 405 carries Allow
        headers.update(exc.headers)
    if error.code == "unauthorized":
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
_HTTP_DETAILS: dict[int, Callable[[Request], str]] = {
    404: lambda r: f"there is no endpoint at {logged_path(r.scope)}",
    405: lambda r: f"{r.method} is not allowed on {logged_path(r.scope)}",
    413: lambda r: "the request body exceeds MAX_BODY_BYTES",
}


def headers_timeout_response(request_id: str, timeout_s: float) -> Response:
    """The 408 for a request whose headers missed HEADERS_TIMEOUT_S (note 17), logged as render_error
    logs one, under the correlation id it is given: http_protocol.py writes it."""
    token = correlation_id.set(request_id)
    try:
        error = ServiceError(
            "request_timeout", f"the request headers did not arrive within HEADERS_TIMEOUT_S ({timeout_s:g} s)"
        )
        log_request_failed({}, error, error.status, None)  # no path yet: uvicorn sets it with the headers
        headers = {REQUEST_ID_HEADER: request_id, "Connection": "close"}
        return JSONResponse(error.body(), status_code=error.status, headers=headers)
    finally:
        correlation_id.reset(token)


def log_request_failed(scope: Scope, error: ServiceError, status: int, exc: BaseException | None) -> None:
    """The outcome of a request refused before any stream: its log line, and for a chat its count
    in chatsvc_requests_total (a stream's outcome is its producer's to count)."""
    if scope.get("path") in (CHATSVC.path, AI_SDK.path):
        scope["app"].state.service.metrics.requests.labels(error.code).inc()
    mark_failed(trace.get_current_span(), error.code, exc, error=status >= 500)
    level = logging.ERROR if error.code == "internal_error" else logging.WARNING
    log.log(
        level,
        "request_failed",
        extra={
            "code": error.code,
            "status": status,
            "exception": type(exc).__name__ if exc is not None else None,
            "path": logged_path(scope),
        },
    )


# --- Traces (note 14) -------------------------------------------------------------------------------

TRACE_CONTEXT = TraceContextTextMapPropagator()  # W3C traceparent and tracestate, nothing else
NO_SPAN = trace.INVALID_SPAN  # tracing off: a span whose every method does nothing


def incoming_trace(headers: Headers) -> otel_context.Context | None:
    """The caller's trace context, if it sent a traceparent (an invalid one yields no span: a new trace)."""
    if "traceparent" not in headers:
        return None
    return TRACE_CONTEXT.extract(headers)


def mark_failed(span: trace.Span, code: str, exc: BaseException | None, *, error: bool = True) -> None:
    """A failure on a span: chatsvc's code and the exception's type, never its message (note 14)."""
    if span.is_recording():
        cause = exc.__cause__ if isinstance(exc, ServiceError) else exc  # what broke, not our wrapper
        span.set_attribute("chatsvc.outcome", code)
        span.set_attribute("error.type", type(cause).__name__ if cause is not None else code)
        if error:
            span.set_status(trace.StatusCode.ERROR)


def logged_path(scope: Scope) -> str | None:
    """A request's path as a log line or an error detail names it (note 16): the template of the
    route it matched (also the span's http.route), else a bounded prefix; None before uvicorn has
    read the request line's path (a request whose headers timed out, note 17)."""
    route = scope.get("route")
    if isinstance(route, Route):
        return route.path
    path: str | None = scope.get("path")
    if path is None:
        return None
    return path if len(path) <= LOGGED_PATH_CHARS else path[:LOGGED_PATH_CHARS] + "\u2026"


# --- Request middleware -----------------------------------------------------------------------------


class RequestContextMiddleware:
    """Gives every request a correlation id (validated incoming X-Request-ID, else a new UUID4), echoes
    it on the response, refuses over-long declared bodies (note 2), bounds the body's arrival (note
    17) and logs the request's arrival and the completion of a plain response. The others have
    their outcome logged where it is decided: an error where it is rendered, a stream by its
    producer. With tracing on, each request is a server span, continuing the caller's trace (note 14)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, body_timeout_s: float, tracing: Tracing) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        headers = Headers(scope=scope)
        parent = incoming_trace(headers)
        span = self.tracing.server_span(scope, parent)
        if span is NO_SPAN:
            if parent is None:
                await self.serve(scope, receive, send, headers)
                return
            trace_context = parent  # tracing off: the caller's trace is still forwarded and logged
        else:
            trace_context = trace.set_span_in_context(span, parent)
        token = otel_context.attach(trace_context)
        try:
            await self.serve(scope, receive, send, headers, span)
        finally:
            otel_context.detach(token)
            if span.is_recording():
                if isinstance(route := scope.get("route"), Route):
                    span.update_name(f"{scope['method']} {route.path}")
                    span.set_attribute("http.route", route.path)
                span.end()

    async def serve(
        self, scope: Scope, receive: Receive, send: Send, headers: Headers, span: trace.Span = NO_SPAN
    ) -> None:
        incoming = headers.get(REQUEST_ID_HEADER)
        valid = incoming is not None and REQUEST_ID_PATTERN.fullmatch(incoming)
        request_id = incoming if valid and incoming else str(uuid.uuid4())
        correlation_id.set(request_id)  # unconditionally: the context is per request task
        if incoming is not None and request_id != incoming:
            log.warning("invalid_request_id", extra={"length": len(incoming), "replaced_by": request_id})

        level = logging.DEBUG if scope["path"] in PROBE_PATHS else logging.INFO
        log.log(level, "request_received", extra={"method": scope["method"], "path": logged_path(scope)})
        started = time.monotonic()
        status = 0
        plain = False  # a response whose outcome nobody else logs
        declared = _declared_length(headers)
        # Note 17: while a body is still to come (RFC 9112 6.3: a Transfer-Encoding, or a length over
        # 0), when it must have come; None once it has, or once the answer has started without it.
        body_due = started + self.body_timeout_s if declared > 0 or "transfer-encoding" in headers else None

        async def receive_in_time() -> Message:
            nonlocal body_due
            if body_due is None:
                return await receive()
            with anyio.move_on_after(body_due - time.monotonic()):
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    body_due = None
                return message
            raise ServiceError(
                "request_timeout", f"the request body did not arrive within BODY_TIMEOUT_S ({self.body_timeout_s:g} s)"
            )

        async def send_with_id(message: Message) -> None:
            nonlocal status, plain, body_due
            if message["type"] == "http.response.start":
                status = message["status"]
                if span.is_recording():
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(trace.StatusCode.ERROR)
                response_headers = MutableHeaders(scope=message)
                response_headers[REQUEST_ID_HEADER] = request_id
                if body_due is not None:
                    # The rest of the body, however slowly it comes, must not keep the connection.
                    response_headers["Connection"] = "close"
                    body_due = None
                plain = status < 400 and not response_headers.get("content-type", "").startswith("text/event-stream")
            await send(message)

        if (
            len(scope.get("raw_path") or scope["path"].encode()) + len(scope.get("query_string", b""))
            > MAX_TARGET_BYTES
        ):
            await self._refuse(
                scope, receive, send_with_id, ServiceError("uri_too_long", "the path and query exceed 8 KiB")
            )
            return
        if declared > self.max_body_bytes:
            detail = f"the declared body exceeds MAX_BODY_BYTES ({self.max_body_bytes})"
            # Close the connection: we will not read the body the client is about to send.
            await self._refuse(scope, receive, send_with_id, ServiceError("payload_too_large", detail), close=True)
            return
        await self.app(scope, receive_in_time, send_with_id)
        if plain:
            duration_ms = round((time.monotonic() - started) * 1000, 1)
            extra = {"status": status, "path": logged_path(scope), "duration_ms": duration_ms}
            log.log(level, "request_completed", extra=extra)

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, error: ServiceError, *, close: bool = False
    ) -> None:
        log_request_failed(scope, error, error.status, None)
        headers = {"Connection": "close"} if close else None
        await JSONResponse(error.body(), status_code=error.status, headers=headers)(scope, receive, send)


def _declared_length(headers: Headers) -> int:
    try:
        return int(headers.get("content-length", "0"))
    except ValueError:
        return 0


# --- Upstream client --------------------------------------------------------------------------------


def create_upstream_client(server: UpstreamServer, settings: Settings) -> openai.AsyncOpenAI:
    api_key = server.api_key.get_secret_value() if server.api_key else "no-key"
    connect = server.connect_timeout_s or settings.CONNECT_TIMEOUT_S
    return openai.AsyncOpenAI(
        api_key=api_key,
        base_url=server.base_url,
        max_retries=0,  # note 1
        # openai's aiohttp transport (the `openai[aiohttp]` extra), which openai recommends for
        # concurrency: httpx's pool scans every connection on every request, so its cost per stream
        # grows with the streams open (docs/performance.md). Errors still arrive as httpx's.
        http_client=openai.DefaultAioHttpClient(),
        # The read timeout is the idle limit between bytes; the budget is enforced around it (note 3).
        timeout=openai.Timeout(
            connect=connect, read=server.idle_timeout_s or settings.IDLE_TIMEOUT_S, write=connect, pool=connect
        ),
    )


class Upstream:
    """One model server as the service uses it: its client, and its circuit breaker (note 22). The
    breaker opens when the server has failed BREAKER_FAILURES times within BREAKER_WINDOW_S: it is
    skipped for BREAKER_COOLDOWN_S, then one request tries it, which closes or reopens it."""

    def __init__(self, server: UpstreamServer, settings: Settings, metrics: Metrics) -> None:
        self.server = server
        self.name = server.name
        self.host = urllib.parse.urlsplit(server.base_url or "https://api.openai.com/v1").hostname
        self.client = create_upstream_client(server, settings)
        self.first_token_timeout_s = server.first_token_timeout_s or settings.FIRST_TOKEN_TIMEOUT_S
        self.settings = settings
        self.metrics = metrics
        self.failures: collections.deque[float] = collections.deque()  # when, within the window
        self.open_until: float | None = None  # open: skipped until then, then tried by one request
        self.trial = False  # that one request is in flight
        metrics.circuit_open.labels(self.name).set(0)

    def admit(self) -> bool | None:
        """Whether a request may try it now (None: skip it), and if so whether it is the one trial
        after a cool-down: only the trial's outcome closes or reopens the breaker."""
        if self.open_until is None:
            return False
        if self.trial or time.monotonic() < self.open_until:
            return None
        self.trial = True
        return True

    @property
    def ready(self) -> bool:
        return self.open_until is None or (not self.trial and time.monotonic() >= self.open_until)

    def succeeded(self) -> None:
        self.failures.clear()
        if self.open_until is not None:
            self.open_until, self.trial = None, False
            self.metrics.circuit_open.labels(self.name).set(0)
            log.info("upstream_circuit_closed", extra={"upstream": self.name})

    def failed(self, *, trial: bool) -> None:
        now = time.monotonic()
        self.failures.append(now)
        while self.failures[0] < now - self.settings.BREAKER_WINDOW_S:
            self.failures.popleft()
        limit = self.settings.BREAKER_FAILURES
        if (trial and self.trial) or (self.open_until is None and limit and len(self.failures) >= limit):
            self.open_until, self.trial = now + self.settings.BREAKER_COOLDOWN_S, False
            self.failures.clear()
            self.metrics.circuit_open.labels(self.name).set(1)
            log.warning(
                "upstream_circuit_open", extra={"upstream": self.name, "cooldown_s": self.settings.BREAKER_COOLDOWN_S}
            )

    def untried(self, *, trial: bool) -> None:
        """An attempt that ended saying nothing of the server (the client stopped it, a 4xx of the
        request's own, our deadline): if it was the trial, the next request tries it."""
        if trial:
            self.trial = False


class ChatTurn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["user", "assistant"]
    content: str

    @field_validator("content")
    @classmethod
    def _content_length(cls, value: str, info: ValidationInfo) -> str:
        limit = _limits(info).MAX_MESSAGE_CHARS
        if len(value) > limit:
            raise ValueError(f"must be at most {limit} characters")
        return value


class GenerationOptions(BaseModel):
    """What both chat protocols take besides the conversation: the model and how it samples. Limits
    come from the settings, passed as validation context."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    # JSON Schema counts 1000.0 as an integer; strict pydantic would not. Strings and booleans stay refused.
    max_tokens: float | None = None  # a whole number, checked below
    temperature: float | None = Field(None, ge=0, le=2)

    @field_validator("model")
    @classmethod
    def _model(cls, value: str | None, info: ValidationInfo) -> str | None:
        allowed = _limits(info).allowed_models
        if value is not None and value not in allowed:
            raise ValueError(f"must be one of: {', '.join(allowed)}")
        return value

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, value: float | None, info: ValidationInfo) -> int | None:
        limit = _limits(info).MAX_TOKENS
        if value is None:
            return None
        if isinstance(value, float) and not value.is_integer():
            raise ValueError("must be a whole number")
        if not 1 <= value <= limit:
            raise ValueError(f"must be from 1 to {limit}")
        return int(value)


class ChatRequest(GenerationOptions):
    """The body of POST /chat."""

    message: str
    history: list[ChatTurn] = []

    @field_validator("message")
    @classmethod
    def _message(cls, value: str, info: ValidationInfo) -> str:
        _check_message(value, _limits(info))
        return value

    @field_validator("history")
    @classmethod
    def _history(cls, value: list[ChatTurn], info: ValidationInfo) -> list[ChatTurn]:
        limit = _limits(info).MAX_HISTORY
        if len(value) > limit:
            raise ValueError(f"must have at most {limit} turns")
        return value

    def messages(self, system_prompt: str | None) -> list[ChatCompletionMessageParam]:
        out: list[ChatCompletionMessageParam] = []
        if system_prompt:
            out.append({"role": "system", "content": system_prompt})
        for turn in self.history:
            if turn.role == "user":
                out.append({"role": "user", "content": turn.content})
            else:
                out.append({"role": "assistant", "content": turn.content})
        out.append({"role": "user", "content": self.message})
        return out


def _check_message(value: str, settings: Settings) -> None:
    """The new message: some text, within MAX_MESSAGE_CHARS."""
    if not _NON_SPACE.search(value):
        raise ValueError("must contain text, not only whitespace")
    if len(value) > settings.MAX_MESSAGE_CHARS:
        raise ValueError(f"must be at most {settings.MAX_MESSAGE_CHARS} characters")


#: openapi.yaml's pattern `\S` as JSON Schema reads it, in ECMAScript: Python's str.isspace() also
#: counts the separators U+001C-U+001F and U+0085, which the contract lets through.
_NON_SPACE = re.compile("[^\t\n\v\f\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]")


def _limits(info: ValidationInfo) -> Settings:
    settings = info.context["settings"] if info.context else None
    assert isinstance(settings, Settings)
    return settings


class UIChatRequest(GenerationOptions):
    """The body of POST /api/chat: what the AI SDK's DefaultChatTransport sends (note 12), with
    chatsvc's generation options beside it (the transport's `body` option adds them)."""

    id: str  # the chat's, chosen by the page: it names the chat's stream for a resume
    messages: list[ai_sdk.UIMessage]
    trigger: Literal["submit-message", "regenerate-message"]
    messageId: str | None = None

    @field_validator("id")
    @classmethod
    def _chat_id(cls, value: str) -> str:
        if not CHAT_ID_PATTERN.fullmatch(value):
            raise ValueError("must be 1 to 128 letters, digits or ._:-")
        return value

    @field_validator("messages")
    @classmethod
    def _messages(cls, value: list[ai_sdk.UIMessage], info: ValidationInfo) -> list[ai_sdk.UIMessage]:
        settings = _limits(info)
        if not value or value[-1].role != "user":
            raise ValueError("must end with the user's message")
        if len(value) > settings.MAX_HISTORY + 1:
            raise ValueError(f"must have at most {settings.MAX_HISTORY + 1} messages (MAX_HISTORY earlier turns)")
        try:
            _check_message(value[-1].text, settings)
        except ValueError as exc:
            raise ValueError(f"the last message {exc}") from None
        return value

    def chat_request(self) -> ChatRequest:
        """The same request as POST /chat's: the last message and the turns before it."""
        *earlier, last = self.messages
        return ChatRequest.model_construct(
            message=last.text,
            history=[ChatTurn.model_construct(role=m.role, content=m.text) for m in earlier],
            model=self.model,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
        )


CHAT_ID_PATTERN = REQUEST_ID_PATTERN  # what a log line and a URL path carry as they are


Body = TypeVar("Body", bound=BaseModel)


def parse_chat(body: bytes, settings: Settings) -> tuple[ChatRequest, str | None]:
    """POST /chat's body; it names no chat."""
    return parse_body(ChatRequest, body, settings), None


def parse_ui_chat(body: bytes, settings: Settings) -> tuple[ChatRequest, str | None]:
    """POST /api/chat's body, and the id of its chat."""
    ui_request = parse_body(UIChatRequest, body, settings)
    return ui_request.chat_request(), ui_request.id


def parse_body(model: type[Body], body: bytes, settings: Settings) -> Body:
    """The request body validated, or the one ServiceError that names the first faults."""
    try:
        return model.model_validate_json(body, context={"settings": settings})
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False)
        if any(e["type"] == "json_invalid" for e in errors):
            raise ServiceError("invalid_json", "the body could not be parsed as JSON") from None
        if any(e["type"] == "model_type" and not e["loc"] for e in errors):
            raise ServiceError("validation_error", "body: must be a JSON object") from None
        detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {_short(e['msg'])}" for e in errors[:3])
        raise ServiceError("validation_error", detail) from None


def _short(msg: str) -> str:
    return msg.removeprefix("Value error, ")


def fails_over(error: ServiceError) -> bool:
    """Whether another model server, or this one again, could answer where this one failed (note 22):
    not one that refused the request itself (4xx), nor a deadline of ours."""
    cause = error.__cause__
    if isinstance(cause, openai.APIStatusError):
        return cause.status_code in (401, 403, 408, 409, 429) or cause.status_code >= 500
    if isinstance(cause, openai.APIError) and _upstream_error_code(cause.body) in REQUEST_FAULTS:
        return False  # an in-band error that blames the request, as some servers send a 400's
    return error.code in ("upstream_error", "upstream_timeout", "upstream_unreachable")


#: In-band error codes (or types) that say the request itself is at fault: every server would say so.
REQUEST_FAULTS = frozenset({"invalid_request_error", "context_length_exceeded", "invalid_value", "bad_request"})


class Failover:
    """One request's way through the model servers (note 22): each that serves its model, in the
    order of UPSTREAMS, skipping those whose breaker is open. A failure before the first content that
    another server could fix moves the stream to the next; after the last, the list is tried again
    after a backoff, at most UPSTREAM_MAX_RETRIES times more (note 1), all within the deadline.
    It owns each attempt's outcome: the breaker and the metrics hear of it once."""

    def __init__(
        self,
        service: Service,
        chat: ChatRequest,
        messages: list[ChatCompletionMessageParam],
        deadline: float,
        span: trace.Span,
    ) -> None:
        self.settings = service.settings
        model = chat.model or self.settings.OPENAI_MODEL
        self.route = [(u, name) for u in service.upstreams if (name := u.server.model_name(model)) is not None]
        self.several = len(service.upstreams) > 1  # with one, errors read as they always have
        self.metrics = service.metrics
        self.deadline = deadline
        self.span = span
        self.body: dict[str, Any] = {
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": int(chat.max_tokens or self.settings.MAX_TOKENS),
        }
        if chat.temperature is not None:
            self.body["temperature"] = chat.temperature
        self.correlation_id = correlation_id.get() or ""
        self.position = 0  # in the route
        self.retries = 0  # rounds after the first
        self.attempts = 0
        self.upstream: Upstream | None = None  # the current attempt's, until its outcome is known
        self.trial = False  # whether that attempt is its breaker's one trial
        self.answering: Upstream | None = None  # the one whose content the client gets
        self.model = ""  # the current upstream's name for the model
        self.last: ServiceError | None = None  # the last failure, which ends the request if none answers
        self.last_name: str | None = None  # the server of the last attempt that failed

    @property
    def first_token_timeout_s(self) -> float | None:
        return None if self.upstream is None else self.upstream.first_token_timeout_s

    async def open(self) -> openai.AsyncStream[ChatCompletionChunk]:
        """The next attempt's stream, response headers in; raises the ServiceError that ends the request."""
        while True:
            while self.position < len(self.route):
                if time.monotonic() >= self.deadline:  # the budget is spent: no server is to blame
                    raise self.out_of_time()
                upstream, self.model = self.route[self.position]
                self.position += 1
                if (trial := upstream.admit()) is None:
                    log.info("upstream_skipped", extra={"upstream": upstream.name, "reason": "circuit_open"})
                    continue
                self.upstream, self.trial = upstream, trial
                try:
                    return await self.request(upstream)
                except UPSTREAM_FAILURES as exc:
                    if isinstance(exc, openai.APIStatusError):
                        _log_upstream_response(exc.response)
                    error = map_upstream_error(exc, self.settings)
                    ours = isinstance(exc, TimeoutError)  # our budget, not the server's own silence
                if not self.failed(error, before_headers=True, ours=ours):
                    raise self.named(error) from error.__cause__
            await anyio.sleep(self.next_round())
            self.retries += 1
            self.position = 0

    async def request(self, upstream: Upstream) -> openai.AsyncStream[ChatCompletionChunk]:
        self.attempts += 1
        remaining = self.deadline - time.monotonic()
        log.debug(  # sizes and settings, never the messages' text
            "upstream_request",
            extra={"attempt": self.attempts, "upstream": upstream.name, "model": self.model,
                   "messages": len(self.body["messages"]), "max_tokens": self.body["max_tokens"],
                   "budget_s": round(remaining, 3)},
        )  # fmt: skip
        if self.span.is_recording():
            self.span.set_attributes({"chatsvc.upstream.name": upstream.name, "server.address": upstream.host or ""})
        started = time.monotonic()
        headers = {"X-Client-Request-Id": self.correlation_id}
        TRACE_CONTEXT.inject(headers)  # the upstream span's traceparent, if any (note 14)
        with anyio.fail_after(remaining):
            # client.post, openai's documented call for any endpoint, with the body we built and
            # validated: `chat.completions.create` would walk it again through openai's type
            # transforms, a third of the client's CPU per request (note 9).
            stream = await upstream.client.post(
                "/chat/completions",
                body={"model": self.model, **self.body},
                cast_to=ChatCompletion,
                stream=True,
                stream_cls=openai.AsyncStream[ChatCompletionChunk],
                options={"headers": headers},
            )
        _log_upstream_response(stream.response)
        log.info(
            "upstream_opened",
            extra={
                "upstream": upstream.name,
                "attempt": self.attempts,
                "retries": self.retries,
                "upstream_request_id": (stream.response.headers.get("x-request-id") or "")[:128] or None,
                "upstream_status": stream.response.status_code,
                "model": self.model,
                "open_ms": round((time.monotonic() - started) * 1000, 1),
            },
        )
        return stream

    def answered(self) -> None:
        """The current attempt's content reached the log (or its answer ended with none): it answers."""
        if self.upstream is not None:
            self.upstream.succeeded()
            self.metrics.upstream_attempts.labels(self.upstream.name, "ok").inc()
            self.answering, self.upstream = self.upstream, None

    def failed(self, error: ServiceError, *, before_headers: bool = False, ours: bool = False) -> bool:
        """The current attempt failed before any content: whether another attempt may follow.
        `ours`: it ran out of the request's budget, which says nothing of the server."""
        upstream = self.upstream
        assert upstream is not None
        self.upstream, self.last_name = None, upstream.name
        self.metrics.upstream_attempts.labels(upstream.name, error.code).inc()
        if ours or not fails_over(error):
            upstream.untried(trial=self.trial)
            return False
        upstream.failed(trial=self.trial)
        self.last = error
        follows = self.position < len(self.route) or self.retries < self.settings.UPSTREAM_MAX_RETRIES
        if self.span.is_recording():
            self.span.add_event("failover", {"chatsvc.upstream.name": upstream.name, "chatsvc.code": error.code})
        log.warning(
            "upstream_failed",
            extra={"upstream": upstream.name, "code": error.code, "detail": error.detail,
                   "phase": "opening" if before_headers else "before_first_content", "next": follows},
        )  # fmt: skip
        return True

    def next_round(self) -> float:
        """Every server has been tried or skipped: the wait before the next round, or the error."""
        if self.last is None:  # every one skipped: their breakers are open
            reopens = min((u.open_until or 0.0 for u, _ in self.route), default=0.0) - time.monotonic()
            detail = "every model server for this model failed recently and is cooling down"
            raise ServiceError("upstream_unavailable", detail, retry_after=max(1.0, reopens))
        cause = self.last.__cause__
        retryable = not isinstance(cause, openai.APIStatusError) or is_retryable(cause)
        wait = _backoff(self.retries, cause if isinstance(cause, Exception) else self.last)
        out_of_time = time.monotonic() + wait >= self.deadline
        if not retryable or self.retries >= self.settings.UPSTREAM_MAX_RETRIES or out_of_time:
            raise self.named(self.last) from cause
        log.info("upstream_retry", extra={"retry": self.retries + 1, "code": self.last.code, "wait_s": round(wait, 3)})
        return wait

    def out_of_time(self) -> ServiceError:
        """The budget ran out between attempts: the last failure, if there was one, says why."""
        if self.last is not None:
            return self.named(self.last)
        return map_upstream_error(TimeoutError(), self.settings)

    def named(self, error: ServiceError) -> ServiceError:
        """The error that ends the request: with several model servers, it says which one failed last
        (by name, never by URL). A new one, not `last`: raised, its traceback holds frames that hold
        this object, which would hold it in a cycle (note 10)."""
        detail = error.detail
        if self.several and self.last_name is not None:
            detail = f"{detail} (upstream {self.last_name}, after {self.attempts} attempts)"
        named = ServiceError(error.code, detail, retry_after=error.retry_after, status=error.status)
        named.__cause__ = error.__cause__
        return named

    def close(self) -> None:
        """The request or stream is over: an attempt whose outcome is unknown (stopped, a deadline)
        says nothing of its server."""
        if self.upstream is not None:
            self.upstream.untried(trial=self.trial)
            self.upstream = None


def _log_upstream_response(response: httpx2.Response) -> None:
    """At DEBUG: the model server's status and headers, and the request's headers as sent (the log
    redaction masks the Authorization header, as any key)."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug(
            "upstream_response",
            extra={"status": response.status_code, "url": str(response.request.url),
                   "request_headers": dict(response.request.headers), "headers": dict(response.headers)},
        )  # fmt: skip


def _backoff(retries: int, exc: Exception) -> float:
    """openai's own schedule: Retry-After when the server gives one, else 0.5 s doubling to 8 s, jittered."""
    if isinstance(exc, openai.APIStatusError) and (after := retry_after_seconds(exc.response.headers)) is not None:
        return after
    return min(0.5 * 2.0**retries, 8.0) * (1 - 0.25 * random.random())


async def close_upstream(stream: openai.AsyncStream[ChatCompletionChunk]) -> None:
    """Give the upstream connection back, cancelled or not, within 5 s."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
        await stream.close()


# --- The relay --------------------------------------------------------------------------------------


class UpstreamFrames:
    """Incremental parser of the upstream's SSE body (note 9): bytes in as they arrive, the `data`
    of each complete event out, in order. Handles the spec's three line endings and events split
    anywhere across reads (inside a UTF-8 sequence too: JSON is decoded per complete event)."""

    MAX_EVENT_BYTES = 16 * 1024 * 1024  # one event this long without an end is not a model talking

    def __init__(self) -> None:
        self.pieces: list[bytes] = []  # the unfinished event, its line ends made \n, as it came
        self.size = 0
        self.cr = False  # the last read ended with \r, held back: perhaps half of a \r\n

    def feed(self, data: bytes) -> list[bytes]:
        # Each read is searched once, and the bytes of an event joined once, when its end comes
        # (note 16): joining the whole buffer to every read was quadratic in an event's length.
        # Most reads are whole events with \n line ends: they pass two searches and one split.
        if self.cr:
            data = b"\r" + data
        if b"\r" in data:
            self.cr = data.endswith(b"\r")
            if self.cr:
                data = data[:-1]
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if pieces := self.pieces:  # an event begun in an earlier read
            if b"\n\n" not in data and not (data[:1] == b"\n" and pieces[-1].endswith(b"\n")):
                if data:
                    pieces.append(data)
                    self.size += len(data)
                if self.size > self.MAX_EVENT_BYTES:
                    raise MalformedStream("an event over MAX_EVENT_BYTES")
                return []
            data = b"".join([*pieces, data])
            self.pieces, self.size = [], 0
        *blocks, rest = data.split(b"\n\n")
        if rest:
            self.pieces, self.size = [rest], len(rest)
            if self.size > self.MAX_EVENT_BYTES:
                raise MalformedStream("an event over MAX_EVENT_BYTES")
        out: list[bytes] = []
        for block in blocks:
            if block.startswith(b"data:") and b"\n" not in block:  # what every server sends
                out.append(block[6:] if block.startswith(b"data: ") else block[5:])
            elif block:
                lines = [
                    line[6:] if line.startswith(b"data: ") else line[5:]
                    for line in block.split(b"\n")
                    if line.startswith(b"data:")
                ]
                if lines:
                    out.append(b"\n".join(lines))
        return out

    def end(self) -> list[bytes]:
        """At the end of the body: a \r held back was a line end of its own."""
        return self.feed(b"\n") if self.cr else []


#: What the relay takes from one chunk of the model server, checked (note 18): its content, its
#: finish_reason and its usage (prompt, completion, total). A plain tuple: this is made for every
#: chunk, and a NamedTuple's constructor, a Python function, cost more than the checks.
UpstreamChunk = tuple[str | None, str | None, tuple[int, int, int] | None]


FINISH_REASON_PATTERN = re.compile(r"[A-Za-z0-9_.\-]{1,64}")  # a name: it is logged and sent on


def parse_chunk(data: bytes, request: httpx2.Request) -> UpstreamChunk:
    """One chunk's JSON, decoded (note 9) and checked here alone (note 18): a field the relay uses
    that has the wrong type is the model server's malformed stream (`upstream_error`); a malformed
    usage is left out (then estimated, note 6); fields the relay does not use are not looked at.
    An in-band error is raised as openai would (note 9)."""
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise MalformedStream("an event that is not JSON") from None
    if not isinstance(chunk, dict):
        raise MalformedStream("an event that is not a JSON object")
    if error := chunk.get("error"):
        message = error.get("message") if isinstance(error, dict) else None
        raise openai.APIError(
            message if isinstance(message, str) else "An error occurred during streaming", request, body=error
        )
    usage = None if (reported := chunk.get("usage")) is None else _upstream_usage(reported)
    choices = chunk.get("choices")
    if choices is None or choices == []:  # the usage chunk has no choice
        return None, None, usage
    if not isinstance(choices, list):
        raise MalformedStream("choices is not a list")
    choice = choices[0]
    if not isinstance(choice, dict):
        raise MalformedStream("a choice is not an object")
    finish_reason = choice.get("finish_reason") or None
    if finish_reason is not None and not (
        isinstance(finish_reason, str) and FINISH_REASON_PATTERN.fullmatch(finish_reason)
    ):
        raise MalformedStream("finish_reason is not a name")
    delta = choice.get("delta")
    if delta is None:
        return None, finish_reason, usage
    if not isinstance(delta, dict):
        raise MalformedStream("delta is not an object")
    content = delta.get("content")
    if content is not None and not isinstance(content, str):
        raise MalformedStream("content is not a string")
    return content or None, finish_reason, usage


def _upstream_usage(usage: object) -> tuple[int, int, int] | None:
    if usage is None:
        return None
    if isinstance(usage, dict):
        prompt, completion, total = (usage.get(key) for key in ("prompt_tokens", "completion_tokens", "total_tokens"))
        # bool is an int to Python, not a count
        if (
            type(prompt) is int
            and type(completion) is int
            and type(total) is int
            and min(prompt, completion, total) >= 0
        ):
            return prompt, completion, total
    log.warning("upstream_usage_ignored", extra={"type": type(usage).__name__})  # note 6: estimated instead
    return None


_json = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode  # as sse-starlette's


def encode_event(stream_id: str, seq: int, name: str, data: dict[str, Any]) -> bytes:
    """One event as sse-starlette's JSONServerSentEvent encodes it, but with the `id:` line last
    (note 11): a client that takes the id as soon as it reads the line has the data by then."""
    return f"event: {name}\r\ndata: {_json(data)}\r\nid: {stream_id}:{seq}\r\n\r\n".encode()


def encode_deltas(stream_id: str, first: int, contents: list[str]) -> list[bytes]:
    """Delta events numbered from `first`, a separate entry each so that a replay can start at any
    of them. orjson encodes a string as the json module does (tests/test_relay_parts.py holds the
    events equal to sse-starlette's), in a fraction of the time: this runs for every delta."""
    sid = stream_id.encode()
    return [
        b'event: delta\r\ndata: {"content":%b}\r\nid: %b:%d\r\n\r\n' % (orjson.dumps(content), sid, first + i)
        for i, content in enumerate(contents)
    ]


#: An estimated usage (note 6) to fill with `%`: the last resort's (note 18).
USAGE_TEMPLATE = (
    b'{"prompt_tokens":%(prompt)d,"completion_tokens":%(completion)d,"total_tokens":%(total)d,"source":"estimated"}'
)


def last_words_event(stream_id: str, body: dict[str, Any]) -> bytes:
    """encode_event's error event, with the estimated usage, as a template that `%` fills with the
    seq and the counts (note 18): encoded when the stream starts, so that its end cannot fail."""
    data = _json(body)[:-1].encode().replace(b"%", b"%%") + b',"usage":' + USAGE_TEMPLATE + b"}"
    return b"event: error\r\ndata: %b\r\nid: %b:%%(seq)d\r\n\r\n" % (data, stream_id.encode())


@dataclass(frozen=True)
class ChatProtocol:
    """One way to speak chat on the wire (note 12): how its request is read and how its stream's
    events are written. The relay (producer, log, followers) is the same for all."""

    path: str
    parse: Callable[[bytes, Settings], tuple[ChatRequest, str | None]]  # the request, its chat's id
    headers: dict[str, str]
    event: Callable[[str, int, str, dict[str, Any]], bytes]  # meta, done, error
    deltas: Callable[[str, int, list[str]], list[bytes]]
    last_words: Callable[[str, dict[str, Any]], bytes]  # an error event's template (note 18)


CHATSVC = ChatProtocol(
    "/chat",
    parse_chat,
    {"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    encode_event,
    encode_deltas,
    last_words_event,
)
#: The AI SDK's UI message stream (ai_sdk.py).
AI_SDK = ChatProtocol(
    "/api/chat",
    parse_ui_chat,
    ai_sdk.HEADERS,
    ai_sdk.encode_chunks,
    ai_sdk.encode_deltas,
    functools.partial(ai_sdk.last_words, usage_template=USAGE_TEMPLATE),
)


#: The most bytes a follower sends at once (note 20): a client that does not read is cut off after
#: SEND_TIMEOUT_S holding this and the transport's buffer (64 KiB), not a whole replay.
WRITE_BYTES = 64 * 1024
ID_LINE_BYTES = 64  # more than any event's `id:` line and the line breaks after it (note 11)


def pieces(entries: list[bytes], start: int, end: int) -> Iterator[bytes]:
    """entries[start:end] as writes of at most WRITE_BYTES (note 20): whole events, joined while
    they fit. An event longer than that goes alone, cut so that its last piece (up to ID_LINE_BYTES
    longer) holds its whole id line: a cut between pieces is then no worse for a resuming client
    than a cut between events."""
    if end - start == 1 and len(entries[start]) <= WRITE_BYTES:  # a live delta: most writes
        yield entries[start]
        return
    events = entries[start:end]
    if sum(map(len, events)) <= WRITE_BYTES:  # deltas that came back to back: no loop over them in Python
        if events:
            yield b"".join(events)
        return
    batch: list[bytes] = []
    size = 0
    for i in range(start, end):
        entry = entries[i]
        if batch and size + len(entry) > WRITE_BYTES:
            yield b"".join(batch)
            batch, size = [], 0
        if len(entry) > WRITE_BYTES:
            cuts = [*range(0, len(entry) - ID_LINE_BYTES, WRITE_BYTES), len(entry)]
            for cut, next_cut in itertools.pairwise(cuts):
                yield entry[cut:next_cut]
        else:
            batch.append(entry)
            size += len(entry)
    if batch:
        yield b"".join(batch)


SEQ = "0|[1-9][0-9]{0,8}"  # an event's number: no sign, no leading zero, bounded
EVENT_ID_PATTERN = re.compile(rf"^([0-9a-f]{{32}}):({SEQ})$")
AFTER_PATTERN = re.compile(rf"^(-1|{SEQ})$")  # ?after=: a seq, or -1 for the start


ChatKey = tuple[bytes | None, str]  # (owner, chat id)


class StreamLog:
    """One stream's events in order, each encoded once (note 11). Its producer alone appends, ending
    with the one terminal event; any number of followers read it from any position."""

    def __init__(
        self, service: Service, stream_id: str, owner: bytes | None, protocol: ChatProtocol, chat: ChatKey | None
    ) -> None:
        self.service = service
        self.stream_id = stream_id
        self.owner = owner  # a digest of the key that started it, or of an AI SDK chat's owner cookie
        self.protocol = protocol  # how its events are encoded: each once, for every follower
        self.chat = chat  # the AI SDK chat it answers, if any
        self.correlation_id = correlation_id.get()  # the request that started it, for lines logged elsewhere
        self.entries: list[bytes] = []
        self.size = 0
        self.reached = 0  # how many events it had before a stop cut it (note 23)
        self.finished_at: float | None = None
        self.delivered = False  # a follower has sent the terminal event
        self.followers = 0
        self.producer: Producer | None = None  # while the stream runs
        self.span_context = trace.INVALID_SPAN_CONTEXT  # its upstream span's, for resumes to link to
        # A broadcast: set() wakes every follower waiting now, clear() at once readies the next wait.
        # A follower checks `entries` and waits with no await in between, so no append is missed.
        self._appended = asyncio.Event()

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    def __len__(self) -> int:
        return len(self.entries)

    def append(self, entries: list[bytes], *, terminal: bool = False) -> None:
        assert not self.finished, "a stream has exactly one terminal event"
        self.entries += entries
        added = sum(map(len, entries))
        self.size += added
        if self.stream_id in self.service.streams:
            self.service.log_bytes += added
        if terminal:
            self.finished_at = time.monotonic()
            self.service.on_finished(self)
        self._appended.set()
        self._appended.clear()
        if self.service.store is not None:  # after the followers: the store never delays them
            self.service.store.mirror(self, entries, added)

    async def follow(self, position: int) -> AsyncIterator[bytes]:
        """The events from `position` on, then each as it is appended, to the terminal one. All that
        arrived since the last send leaves at once (note 3), in writes of at most WRITE_BYTES (note 20)."""
        debug = log.isEnabledFor(logging.DEBUG)  # once: this loop runs for every write
        entries, piece = self.entries, b""
        try:
            while True:
                entries = self.entries  # appended to in place (a cut makes a new list): entries[:end] stay
                if position < (end := len(entries)):
                    whole = self.finished
                    if end - position == 1 and len(entries[position]) <= WRITE_BYTES and not debug:
                        yield entries[position]  # a live delta, most writes: no generator of pieces for it
                    else:
                        for piece in pieces(entries, position, end):
                            if debug:
                                log.debug("client_write", extra={"bytes": len(piece), "events": end - position})
                            yield piece
                    position = end
                    if whole:  # sent: the next call comes once the transport took the last write
                        self.delivered = True
                        if self.service.store is not None:
                            self.service.store.mirror(self, [], 0)  # the AI SDK's 204 on other replicas
                        return
                elif self.finished:  # past a cut (note 23): what it sent after the cut is gone, the end is its end
                    position = end - 1
                else:
                    await self._appended.wait()
        finally:
            # Cancelled (its client left), this frame stays in anyio's cycle until a collection
            # (FollowerResponse says why): it lets go of the log and its events now (note 10).
            del self, entries, piece

    def cut(self, after: int) -> int:
        """End the log after event `after` (note 23), before its terminal event is appended: the
        events after it leave the log, its size and the store's copy. A new list, so that a follower
        part-way through the old one reads on undisturbed. How many events went."""
        assert not self.finished, "the terminal event comes after the cut"
        cut = self.entries[after + 1 :]
        if not cut:
            return 0
        self.reached = len(self.entries)
        self.entries = self.entries[: after + 1]
        size = sum(map(len, cut))
        self.size -= size
        if self.stream_id in self.service.streams:
            self.service.log_bytes -= size
        if self.service.store is not None:
            self.service.store.cut(self, after + 1)
        return len(cut)

    def attach(self) -> None:
        self.followers += 1
        if self.producer is not None and self.producer.keep():
            log.info("stream_reattached", extra={"stream_id": self.stream_id})

    def detach(self, *, too_slow: bool) -> None:
        self.followers -= 1
        if self.followers == 0 and self.producer is not None:
            self.producer.alone(too_slow=too_slow)


def estimated_usage(prompt_chars: int, deltas: int) -> dict[str, Any]:
    """Note 6: four characters a prompt token, one token a delta."""
    prompt = math.ceil(prompt_chars / 4)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": deltas,
        "total_tokens": prompt + deltas,
        "source": "estimated",
    }


EVICTED = ServiceError(
    "overloaded", "the stream was stopped while its client had left, to make room for a client that is connected"
)


#: The last resort's codes and details (note 18).
LAST_WORDS = {
    "internal_error": "the stream failed unexpectedly",
    "shutting_down": "the service stopped before the stream ended",
}


def _flat_usage(usage: dict[str, Any]) -> dict[str, Any]:
    return {
        "prompt_tokens": usage["prompt_tokens"],
        "completion_tokens": usage["completion_tokens"],
        "total_tokens": usage["total_tokens"],
        "usage_source": usage["source"],
    }


class Stop(enum.Enum):
    """Why a producer stops its read before the body ends: set once, by `Producer.stop`."""

    CANCELLED = enum.auto()  # DELETE: `done` with finish_reason "cancelled"
    ABANDONED = enum.auto()  # nobody came back within the grace (note 11)
    TOO_SLOW = enum.auto()  # nobody came back, and the last follower was cut off for not reading (note 8)
    EVICTED = enum.auto()  # its slot went to a client that is here (note 11)


@dataclass(frozen=True, slots=True)
class Finished:
    """The upstream body ended: with a finish_reason, or cut before one came (note 7)."""

    finish_reason: str | None


@dataclass(frozen=True, slots=True)
class Failed:
    """The read failed: the model server's fault or a deadline (map_upstream_error's code; its
    `__cause__` is what broke, if something did)."""

    error: ServiceError


@dataclass(frozen=True, slots=True)
class Stopped:
    reason: Stop


Ending = Finished | Failed | Stopped  # how a read ends: `Producer.read` returns it


def failure_of(ending: Ending) -> ServiceError | None:
    """The model server's failure that this ending is, if it is one: a body cut before its
    finish_reason is one (note 7)."""
    match ending:
        case Failed(error):
            return error
        case Finished(None):
            return ServiceError("upstream_error", "the model server ended the stream before the answer was finished")
    return None


@dataclass(frozen=True, slots=True)
class Outcome:
    """A stream's one outcome, decided by `Producer.outcome_of` and acted on by `Producer.record` alone."""

    code: str  # its label in chatsvc_requests_total and the span's chatsvc.outcome
    line: str  # its log line: request_completed, request_failed or client_disconnected
    level: int
    fields: dict[str, Any]  # the line's own fields; the timings and the usage follow them
    usage: dict[str, Any]
    timings: dict[str, Any]
    finish_reason: str | None = None  # the `done` event's; neither this nor `error`: no terminal event
    error: ServiceError | None = None  # the `error` event's
    exc: BaseException | None = None  # what failed, for the span (note 14)


class Producer:
    """The one reader of a stream's upstream body (note 3). It appends every event to the stream's
    log, decides the one outcome and logs it, and releases the slot and the upstream connection.

    It runs in a task of its own, so that it outlives a dropped client: when the last follower
    leaves, it goes on for RESUME_GRACE_S, then stops unless someone resumed (note 11)."""

    def __init__(
        self,
        service: Service,
        stream_log: StreamLog,
        failover: Failover,
        stream: openai.AsyncStream[ChatCompletionChunk],
        span: trace.Span,
        slot: Slot,
        model: str,
        prompt_chars: int,
        started: float,
        deadline: float,
    ) -> None:
        self.service = service
        self.settings = service.settings
        self.log = stream_log
        self.failover = failover  # which model server answers (note 22)
        self.stream = stream  # the current one's; only its raw response is read (note 9)
        self.resources: AsyncExitStack | None = None  # run()'s: a later upstream's connection joins them
        self.span = span  # the upstream span (note 14)
        self.slot = slot  # given back at the end, or at once when evicted
        stream_log.span_context = span.get_span_context()
        self.model = model
        self.prompt_chars = prompt_chars
        self.started = started
        self.deadline = deadline
        self.deltas = 0
        self.first_token_at: float | None = None
        self.first_token_by = math.inf  # FIRST_TOKEN_TIMEOUT_S's deadline, while no content came
        self.finish_reason: str | None = None
        self.upstream_usage: tuple[int, int, int] | None = None  # prompt, completion, total
        self.outcome: str | None = None  # its code, once record() has logged it
        self.read_scope: anyio.CancelScope | None = None
        self.stop_scope = anyio.CancelScope()  # cancelled by stop()
        self.stopped: Stop | None = None  # why, once stop() has stopped the read
        self.cut_after: int | None = None  # the last event a DELETE's client showed (note 23)
        self.grace_timer: asyncio.TimerHandle | None = None
        self.detached_at = 0.0  # when the last follower left: the first to leave is evicted first
        self.grace_check: asyncio.Task[None] | None = None  # asks the store whether others follow (note 19)
        # Note 18: the end of last resort, encoded now so that writing it cannot fail.
        self.last_words = {
            code: stream_log.protocol.last_words(stream_log.stream_id, ServiceError(code, detail).body())
            for code, detail in LAST_WORDS.items()
        }

    # The stream's life

    async def run(self, resources: AsyncExitStack) -> None:
        """Meta, the deltas as they come, then exactly one terminal event; or, abandoned, nothing more.
        Then `resources` (the slot, the span, the upstream connection) are released."""
        stream_log = self.log
        self.resources = resources
        if self.span is not NO_SPAN:  # this task's own context: its log lines carry the span's ids
            otel_context.attach(trace.set_span_in_context(self.span))
        try:
            meta = {"correlation_id": correlation_id.get(), "model": self.model, "stream_id": stream_log.stream_id}
            stream_log.append([self.event("meta", meta)])
            ending = await self.read()
            if self.cut_after is not None:  # no await from here to the terminal event: nothing comes between
                self.deltas -= stream_log.cut(self.cut_after)  # only deltas follow the meta
            outcome = self.outcome_of(ending)
            self.record(outcome)
            if (terminal := self.terminal_event(outcome)) is not None:
                stream_log.append([terminal], terminal=True)
            if outcome.error is not None and not self.deltas:
                self.service.free_key(stream_log)  # nothing was answered: sent again, it is tried again
        except asyncio.CancelledError:  # shutdown, past its grace (note 4)
            self.last_resort("shutting_down")
            raise
        except Exception:  # a bug of ours, wherever it is: the stream still ends (note 18)
            log.exception("producer_failed")
            self.last_resort("internal_error")
        finally:
            self.keep()  # a grace still running ends with the stream
            self.log.producer = None
            await resources.aclose()

    async def read(self) -> Ending:
        """Read the upstream body until it ends, a deadline passes or stop() stops it. Before the
        first content, a failure another model server could fix moves the read to it (note 22)."""
        with self.stop_scope:
            ending = await self.read_body()
            while (error := failure_of(ending)) is not None and not self.deltas and not self.service.draining:
                if not self.failover.failed(error):
                    break
                if (final := await self.reopen()) is not None:
                    return final
                ending = await self.read_body()
            if isinstance(ending, Finished) and ending.finish_reason is not None:
                self.failover.answered()  # an answer with no content is an answer all the same
        if self.stopped is not None:  # a stop wins, even over a read that ended meanwhile
            return Stopped(self.stopped)
        return ending

    async def reopen(self) -> Failed | None:
        """The next model server's stream in place of the failed one (note 22), within the budget
        and, while draining, the grace (tighten_deadline reaches it here too); or how it failed."""
        await close_upstream(self.stream)
        self.finish_reason, self.upstream_usage = None, None  # the failed attempt's, not the answer's
        self.first_token_by = math.inf
        try:
            with anyio.fail_at(min(self.deadline, self.service.drain_deadline)) as scope:
                self.read_scope = scope
                self.stream = await self.failover.open()
        except ServiceError as final:
            return Failed(final)
        except TimeoutError as exc:
            return self.failure(exc)
        finally:
            self.read_scope = None
        assert self.resources is not None
        self.resources.push_async_callback(close_upstream, self.stream)
        return None

    async def read_body(self) -> Ending:
        """The deltas go to the log as they arrive; how the body ended is returned."""
        frames = UpstreamFrames()
        request = self.stream.response.request
        ended = False  # [DONE] came: what breaks while the rest is drained changes nothing
        try:
            # One deadline for the whole read: the request budget and, while draining, the grace. The
            # idle limit is the client's read timeout, applied to every read.
            debug = log.isEnabledFor(logging.DEBUG)  # once: this loop runs for every read
            with anyio.fail_at(min(self.deadline, self.service.drain_deadline)) as scope:
                self.read_scope = scope
                if not self.deltas and (first_token_s := self.failover.first_token_timeout_s) is not None:
                    self.first_token_by = time.monotonic() + first_token_s  # note 22
                    scope.deadline = min(scope.deadline, self.first_token_by)
                try:
                    async for data in self.stream.response.aiter_bytes():
                        if debug:
                            at_ms = round((time.monotonic() - self.started) * 1000, 1)
                            log.debug("upstream_read", extra={"bytes": len(data), "at_ms": at_ms})
                        if not ended:  # after [DONE]: drain, so the connection can be reused
                            ended = self.take_frames(frames.feed(data), request)
                except (httpx2.RequestError, anyio.EndOfStream) as exc:  # as openai's stream raises them (note 9)
                    raise openai.APIConnectionError(request=request) from exc
                if not ended:
                    self.take_frames(frames.end(), request)
        except UPSTREAM_FAILURES as exc:
            if not ended:
                return self.cut(self.failure(exc))
        finally:
            self.read_scope = None
        return Finished(self.finish_reason)

    def failure(self, exc: Exception) -> Failed:
        """A failure of the read, or of a reopen, in our codes: the deadline that passed, if one did."""
        deadlines = {"deadline": self.deadline, "drain_deadline": self.service.drain_deadline,
                     "first_token_by": self.first_token_by}  # fmt: skip
        return Failed(map_upstream_error(exc, self.settings, streaming=True, **deadlines))

    def cut(self, failed: Failed) -> Ending:
        """A read cut by a deadline (or the idle limit) once a finish_reason has come still has the
        whole answer (note 7)."""
        if failed.error.code in _TIMEOUT_DETAILS and self.finish_reason is not None:
            log.warning(
                "upstream_no_done", extra={"finish_reason": self.finish_reason, "waited_for": failed.error.code}
            )
            return Finished(self.finish_reason)
        return failed

    def take_frames(self, frames: list[bytes], request: httpx2.Request) -> bool:
        """Append the deltas of these frames to the log; note usage and finish_reason. True once
        [DONE] came. The deltas before a bad frame are kept: the error comes after them, as it did
        upstream."""
        contents: list[str] = []
        try:
            for data in frames:
                if data.startswith(b"[DONE]"):
                    return True
                content, finish_reason, usage = parse_chunk(data, request)
                if usage is not None:
                    self.upstream_usage = usage
                if finish_reason is not None and self.finish_reason is None:
                    self.finish_reason = finish_reason
                    self.expect_end()
                if content:
                    contents.append(content)
        finally:
            if contents:
                if self.first_token_at is None:
                    self.on_first_token()
                self.log.append(self.log.protocol.deltas(self.log.stream_id, len(self.log.entries), contents))
                self.deltas += len(contents)
        return False

    def expect_end(self) -> None:
        """A finish_reason came: the answer is whole, wait at most FINISH_WAIT_S more (note 7)."""
        if self.read_scope is not None:
            wait = min(FINISH_WAIT_S, self.settings.IDLE_TIMEOUT_S)
            self.read_scope.deadline = min(self.read_scope.deadline, time.monotonic() + wait)

    def tighten_deadline(self) -> None:
        if self.read_scope is not None:
            self.read_scope.deadline = min(self.read_scope.deadline, self.service.drain_deadline)

    # Followers come and go; DELETE stops (note 11)

    def stop(self, reason: Stop) -> bool:
        """Stop the read, for this one reason. False if the stream has ended or was stopped already."""
        if self.stopped is not None or self.log.finished:
            return False
        self.stopped = reason
        self.stop_scope.cancel()
        return True

    def keep(self) -> bool:
        """A follower is attached, or the stream ended: no grace runs. True if one was running."""
        if self.grace_timer is None:
            return False
        self.grace_timer.cancel()
        self.grace_timer = None
        return True

    def alone(self, *, too_slow: bool) -> None:
        """The last follower left before the end: wait RESUME_GRACE_S for a resume."""
        if self.log.finished:
            return
        self.detached_at = time.monotonic()
        grace = self.settings.RESUME_GRACE_S
        log.info(
            "stream_detached",
            extra={"stream_id": self.log.stream_id, "seq": len(self.log.entries) - 1, "grace_s": grace},
        )
        reason = Stop.TOO_SLOW if too_slow else Stop.ABANDONED  # note 8
        self.grace_timer = asyncio.get_running_loop().call_later(grace, self.grace_over, reason)

    def grace_over(self, reason: Stop) -> None:
        """Nobody came back here within the grace: stop, unless (note 19) others follow elsewhere."""
        self.grace_timer = None
        if self.log.finished or self.stopped is not None:
            return
        if self.service.store is None:
            self.abandon(reason)
        else:
            self.grace_check = asyncio.create_task(self.wait_for_followers_elsewhere(reason))

    async def wait_for_followers_elsewhere(self, reason: Stop) -> None:
        """Followers on other replicas keep the stream's presence key alive in the store: while it
        lives, the grace starts again from its lapse (note 19)."""
        assert self.service.store is not None
        remaining_ms = await self.service.store.followed_elsewhere_ms(self.log.stream_id)
        if self.log.followers or self.grace_timer or self.log.finished or self.stopped is not None:
            return  # resumed here meanwhile (perhaps left again: a new grace runs), or ended
        if remaining_ms:
            grace = remaining_ms / 1000 + self.settings.RESUME_GRACE_S
            self.grace_timer = asyncio.get_running_loop().call_later(grace, self.grace_over, reason)
        else:
            self.abandon(reason)

    async def followed_anywhere(self) -> bool:
        """Whether a client follows this stream, on this replica or (with a store) on another: one
        that nobody follows is detached (note 19)."""
        if self.log.followers:
            return True
        store = self.service.store
        return store is not None and await store.followed_elsewhere_ms(self.log.stream_id) > 0

    def abandon(self, reason: Stop) -> None:
        if self.stop(reason):
            self.service.drop(self.log)  # from now on a resume finds nothing: no follower can attach
            if self.service.store is not None:  # nor on another replica, and a follower there ends
                self.service.store.mark(self.log.stream_id, "abandoned")

    def evict(self) -> None:
        """A new chat needs the slot of this detached stream: stop it and give the slot up now (the
        read ends at its next await). Its log ends with an `overloaded` error, kept for RESUME_TTL_S,
        so that a client that comes back learns how it ended (note 11)."""
        self.keep()
        self.stop(Stop.EVICTED)
        self.slot.release()

    def cancel(self, after: int | None = None) -> None:
        """DELETE: stop the generation; followers get `done` with finish_reason "cancelled". With
        `after`, the last event the client showed, the log ends after it (note 23), also when it
        is the last one now: the read may append one more before the stop reaches it. A seq not yet
        here (named on another replica, where the store's copy may lag) cuts at the last one."""
        seq = len(self.log.entries) - 1
        if self.stop(Stop.CANCELLED):
            if after is not None:
                self.cut_after = min(after, seq)
            log.info("stream_cancelled", extra={"stream_id": self.log.stream_id, "seq": seq, "after": after})

    # The outcome, and the events that carry it

    def outcome_of(self, ending: Ending) -> Outcome:
        """What a stream that ended so comes to: its code, its log line and its terminal event's parts."""
        usage, timings = self.usage(), self.timings()
        path = self.log.protocol.path
        upstream = None if self.failover.answering is None else self.failover.answering.name

        def done(finish_reason: str, code: str) -> Outcome:
            fields = {"status": 200, "finish_reason": finish_reason, "path": path, "upstream": upstream}
            return Outcome(code, "request_completed", logging.INFO, fields, usage, timings, finish_reason=finish_reason)

        def failed(error: ServiceError, exc: BaseException | None, **extra: Any) -> Outcome:
            exception = type(exc).__name__ if exc else None
            fields = {"code": error.code, "status": 200, "exception": exception, "path": path, "upstream": upstream,
                      **extra}  # fmt: skip
            level = logging.ERROR if error.code == "internal_error" else logging.WARNING
            return Outcome(error.code, "request_failed", level, fields, usage, timings, error=error, exc=exc)

        match ending:
            case Finished(None):  # note 7
                error = failure_of(ending)
                assert error is not None
                return failed(self.failover.named(error), None)
            case Finished(str(finish_reason)):
                return done(finish_reason, "ok")
            case Failed(error):
                return failed(error, error.__cause__ or error)
            case Stopped(Stop.CANCELLED):
                return done("cancelled", "cancelled")
            case Stopped(Stop.EVICTED):
                return failed(EVICTED, None, reason="evicted")
            case Stopped(Stop.TOO_SLOW):  # note 8; nobody is left to send an event to
                fields = {
                    "code": "client_too_slow", "status": 200, "exception": "SendTimeoutError", "path": path,
                    "send_timeout_s": self.settings.SEND_TIMEOUT_S,
                }  # fmt: skip
                return Outcome("client_too_slow", "request_failed", logging.WARNING, fields, usage, timings)
            case _:  # abandoned: the answer so far is lost, as a client's leaving says
                return Outcome("client_disconnected", "client_disconnected", logging.INFO, {}, usage, timings)

    def record(self, outcome: Outcome) -> None:
        """The one place where a stream's outcome is logged, counted and put on its span."""
        usage = outcome.usage
        if outcome.error is not None:
            mark_failed(self.span, outcome.code, outcome.exc)
        if self.span.is_recording():
            self.span.set_attributes(
                {
                    "chatsvc.outcome": outcome.code,
                    "gen_ai.usage.input_tokens": usage["prompt_tokens"],
                    "gen_ai.usage.output_tokens": usage["completion_tokens"],
                    "chatsvc.usage.source": usage["source"],
                }
            )
            if outcome.finish_reason is not None:
                self.span.set_attribute("gen_ai.response.finish_reasons", [outcome.finish_reason])
        metrics = self.service.metrics
        metrics.tokens.labels("prompt").inc(usage["prompt_tokens"])
        metrics.tokens.labels("completion").inc(usage["completion_tokens"])
        metrics.requests.labels(outcome.code).inc()
        metrics.duration.observe(time.monotonic() - self.started)
        extra = {**outcome.fields, **outcome.timings, **_flat_usage(usage), "stream_id": self.log.stream_id}
        log.log(outcome.level, outcome.line, extra=extra)
        self.outcome = outcome.code

    def terminal_event(self, outcome: Outcome) -> bytes | None:
        """The event that ends the log, carrying the outcome: None for a stream nobody follows any more."""
        if outcome.finish_reason is not None:
            data = {
                "finish_reason": outcome.finish_reason,
                "usage": outcome.usage,
                **outcome.timings,
                "correlation_id": correlation_id.get(),
                **self.answered_by(),
            }
            return self.event("done", data)
        if outcome.error is not None:
            return self.event("error", {**outcome.error.body(), "usage": outcome.usage})
        return None

    def answered_by(self) -> dict[str, str]:
        """Which model server answered, and its name for the model (note 22): never its URL or key."""
        answering = self.failover.answering
        return {} if answering is None else {"upstream": answering.name, "upstream_model": self.failover.model}

    def event(self, name: str, data: dict[str, Any]) -> bytes:
        return self.log.protocol.event(self.log.stream_id, len(self.log.entries), name, data)

    def on_first_token(self) -> None:
        self.first_token_at = time.monotonic()
        self.failover.answered()  # note 22: from now on this model server answers, or nobody
        if self.first_token_by != math.inf:
            self.first_token_by = math.inf
            if self.read_scope is not None and self.finish_reason is None:  # else it waits for the end (note 7)
                self.read_scope.deadline = min(self.deadline, self.service.drain_deadline)
        ttft = self.first_token_at - self.started
        self.service.metrics.ttft.observe(ttft)
        if self.span.is_recording():
            self.span.add_event("first_token")
            self.span.set_attribute("gen_ai.response.time_to_first_chunk", ttft)
        log.info("first_token", extra={"ttft_ms": round(ttft * 1000, 1)})

    def usage(self) -> dict[str, Any]:
        if (counts := self.upstream_usage) is not None:  # checked where it was read (note 18)
            return {
                "prompt_tokens": counts[0],
                "completion_tokens": counts[1],
                "total_tokens": counts[2],
                "source": "upstream",
            }
        return estimated_usage(self.prompt_chars, self.deltas)

    def timings(self) -> dict[str, Any]:
        end = time.monotonic()
        ttft = None if self.first_token_at is None else round((self.first_token_at - self.started) * 1000, 1)
        return {"ttft_ms": ttft, "duration_ms": round((end - self.started) * 1000, 1)}

    def last_resort(self, code: str) -> None:
        """End the stream when its ordinary end failed (a bug of ours) or was cut (shutdown): the
        error event encoded at the start, filled with ints alone, unless the log has its terminal
        event, and the outcome, unless one was recorded. Nothing here can raise (note 18). An error
        with nothing answered frees the stream's Idempotency-Key, as `run` does."""
        usage = estimated_usage(self.prompt_chars, self.deltas)
        if not (self.log.finished or self.stopped in (Stop.ABANDONED, Stop.TOO_SLOW)):
            fill = {b"seq": len(self.log.entries), b"prompt": usage["prompt_tokens"], b"completion": self.deltas}
            self.log.append([self.last_words[code] % {**fill, b"total": usage["total_tokens"]}], terminal=True)
            if not self.deltas:
                self.service.free_key(self.log)
        if self.outcome is None:
            level = logging.ERROR if code == "internal_error" else logging.WARNING
            fields = {"code": code, "status": 200, "path": self.log.protocol.path}
            error = ServiceError(code, LAST_WORDS[code])
            self.record(Outcome(code, "request_failed", level, fields, usage, {}, error=error))


class FollowerResponse(EventSourceResponse):
    """One client's view of a stream: the log from a position, then live to the terminal event. The
    original POST is the first follower; a resume is another (note 11)."""

    def __init__(
        self, service: Service, stream_log: StreamLog | RemoteStream, position: int, *, first: bool = False
    ) -> None:
        settings = service.settings
        super().__init__(
            stream_log.follow(position),
            headers={**stream_log.protocol.headers, STREAM_ID_HEADER: stream_log.stream_id},
            ping=settings.PING_INTERVAL_S,
            ping_message_factory=lambda: ServerSentEvent(comment="ping"),
            send_timeout=settings.SEND_TIMEOUT_S,
            shutdown_event=service.drain_event,
            shutdown_grace_period=settings.SHUTDOWN_GRACE_S + 2,  # note 5
        )
        self.service = service
        self.stream_log = stream_log
        self.first = first  # a new stream's own client (note 20)
        self.send_timeout_s = settings.SEND_TIMEOUT_S

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_end_in_time(message: Message) -> None:
            # sse-starlette bounds every send but the one that ends the body: after a whole answer
            # a client that reads nothing would hold it forever (note 17).
            if message["type"] != "http.response.body" or message.get("more_body", False):
                await send(message)
                return
            with anyio.move_on_after(self.send_timeout) as bounded:
                await send(message)
            if bounded.cancelled_caught:
                raise SendTimeoutError()

        # Counted from here to the end of the response; refused before the first byte (note 20).
        with self.service.followers.admit(self.stream_log.stream_id, first=self.first):
            self.stream_log.attach()
            too_slow = False
            try:
                await super().__call__(scope, receive, send_end_in_time)
            except SendTimeoutError:
                too_slow = True  # note 8
                if abort := (scope.get("extensions") or {}).get(ABORT_EXTENSION):
                    abort["abort"]()  # note 17; without it, the server closes the connection
                log.warning(
                    "follower_cut_off",
                    extra={
                        "stream_id": self.stream_log.stream_id,
                        "path": scope["path"],
                        "send_timeout_s": self.send_timeout_s,
                    },
                )
            finally:
                self.stream_log.detach(too_slow=too_slow)
                # anyio keeps this response in a cycle until a collection (each task its task group
                # cancels holds its frames, which hold the response: tests/test_garbage.py): what it
                # held of the stream goes now, with its last other reference (note 10).
                del self.stream_log, self.body_iterator


# --- The shared store (note 15) ---------------------------------------------------------------------

PROTOCOLS = {protocol.path: protocol for protocol in (CHATSVC, AI_SDK)}  # as a stream's facts name it
T = TypeVar("T")


class RemoteStream(Protocol):
    """A stream produced on another replica, as the store gives it: the face of a StreamLog that a
    FollowerResponse and resume() read (note 15)."""

    @property
    def stream_id(self) -> str: ...
    @property
    def protocol(self) -> ChatProtocol: ...
    @property
    def finished(self) -> bool: ...  # the store's copy holds the terminal event
    @property
    def delivered(self) -> bool: ...
    @property
    def reached(self) -> int: ...  # how many events it had before a stop cut it (note 23)
    @property
    def span_context(self) -> trace.SpanContext: ...
    def __len__(self) -> int: ...  # events in the store's copy so far
    def follow(self, position: int) -> AsyncIterator[bytes]: ...
    def attach(self) -> None: ...
    def detach(self, *, too_slow: bool) -> None: ...


class Store(Protocol):
    """What the core asks of the store that lets any replica resume any stream (note 15):
    RESUME_STORE=redis:// makes it a `redis_store.RedisStore`. Writes are queued, never awaited by
    the live path; a call that needs an answer raises `unavailable` when none comes in time."""

    unavailable: ClassVar[type[Exception]]  # its own: it cannot import ours; ask_store maps it

    async def start(self) -> None: ...  # the lifespan's start: its writer and listener begin
    async def stop(self) -> None: ...  # after the producers: what is queued is written, then it closes
    async def answers(self) -> bool: ...  # for /readyz
    def announce(  # a new stream's facts, while its upstream opens; the task's result: the failure
        self,
        stream_id: str,
        owner: bytes | None,
        protocol: ChatProtocol,
        chat: ChatKey | None,
        span_context: trace.SpanContext,
        prompt_tokens: int,
    ) -> asyncio.Task[BaseException | None]: ...
    def mirror(self, stream_log: StreamLog, entries: list[bytes], size: int) -> None: ...  # appended, or delivered
    def cut(self, stream_log: StreamLog, length: int) -> None: ...  # its first `length` events kept (note 23)
    def give_up(self, stream_log: StreamLog, reason: str, exc: BaseException | None) -> None: ...  # unresumable
    def mark(self, stream_id: str, state: str) -> None: ...  # a new state for its facts: "abandoned"
    async def followed_elsewhere_ms(self, stream_id: str) -> int: ...  # presence elsewhere lasts (note 19)
    async def find(self, stream_id: str, owner: bytes | None) -> RemoteStream | None: ...  # checked as ours
    async def find_chat(self, chat: ChatKey) -> str | None: ...  # the chat's latest stream, on any replica
    async def delivered(self, stream_id: str) -> bool: ...  # its terminal event sent, on any replica
    async def cancel(self, stream_id: str, after: int | None) -> None: ...  # DELETE: its producing replica stops it
    # An Idempotency-Key, named by a digest: taken with `value` if free (or holding `replaced`), for
    # as long as a stream may open: None; else what it holds. Settled (queued): the key holding
    # `held` now holds `value`, for as long as the stream may be kept, or with None is free again.
    async def claim(self, name: str, value: str, replaced: str | None) -> str | None: ...
    def settle(self, name: str, held: str, value: str | None) -> None: ...


def open_store(service: Service) -> Store | None:
    """The store that RESUME_STORE names, with what it needs from the core; redis-py is imported
    only for a Redis store (note 15)."""
    settings = service.settings
    if settings.redis_url is None:
        return None
    from redis_store import RedisStore

    return RedisStore(
        settings.redis_url,
        settings,
        service.metrics,
        PROTOCOLS,
        error_body=lambda code, detail: ServiceError(code, detail).body(),
        pieces=pieces,
        on_cancel=service.cancel_here,
    )


async def ask_store(store: Store, answer: Awaitable[T]) -> T:
    """The store's answer; none in time is 503 `resume_unavailable` (note 15), here and nowhere else."""
    try:
        return await answer
    except store.unavailable as exc:
        raise ServiceError("resume_unavailable", str(exc), retry_after=2) from None


def stream_not_found() -> ServiceError:
    return ServiceError("stream_not_found", "no stream with this id is running or kept")


def check_store(settings: Settings) -> None:
    """RESUME_STORE=redis://...: that Redis answers before the service starts; exit 2 if not."""
    if settings.redis_url is None:
        return
    from redis_store import StoreUnavailable, check_redis

    try:
        check_redis(settings.redis_url, settings.CONNECT_TIMEOUT_S)
    except StoreUnavailable as exc:
        exit_misconfigured(f"RESUME_STORE: Redis does not answer ({exc})", "RESUME_STORE")


# --- Admission and drain: the service's state -------------------------------------------------------


IDLE_GC_INTERVAL_S = 1.0  # a full collection when idle walks few objects: a few ms
IDLE_GC_DELAY_S = 0.05  # after the last stream and follower: their connections close meanwhile


class Followers:
    """The clients following streams in this process, in all and by stream (note 20)."""

    def __init__(self, settings: Settings, on_none: Callable[[], None]) -> None:
        self.limit = settings.max_followers
        self.per_stream = settings.MAX_FOLLOWERS_PER_STREAM
        self.total = 0
        self.by_stream: dict[str, int] = {}
        self.on_none = on_none  # called when the last follower ends

    def check(self, stream_id: str | None) -> None:
        """Refuse a follower (of this stream; None: of a new one) that would pass a limit."""
        if stream_id is not None and self.by_stream.get(stream_id, 0) >= self.per_stream:
            raise ServiceError(
                "too_many_followers",
                f"{self.per_stream} clients follow this stream (MAX_FOLLOWERS_PER_STREAM)",
                retry_after=1,
            )
        if self.total >= self.limit:
            raise ServiceError(
                "too_many_followers", f"{self.limit} clients follow streams here (MAX_FOLLOWERS)", retry_after=1
            )

    @contextmanager
    def admit(self, stream_id: str, *, first: bool = False) -> Iterator[None]:
        """Count a follower for as long as the block runs, or refuse it. `first`: a new stream's own
        client, whose room start_chat checked before asking the model: refusing it now would leave
        a stream that nobody follows, and the overshoot is bounded by the chats opening meanwhile."""
        if not first:
            self.check(stream_id)
        # No await between the check and the count: concurrent followers cannot overshoot.
        self.total += 1
        self.by_stream[stream_id] = self.by_stream.get(stream_id, 0) + 1
        try:
            yield
        finally:
            self.total -= 1
            if self.by_stream[stream_id] == 1:
                del self.by_stream[stream_id]
            else:
                self.by_stream[stream_id] -= 1
            if self.total == 0:
                self.on_none()


class Slot:
    """One of MAX_CONCURRENT_STREAMS, as Service.take_slot hands it out: released once, however often
    release() is called (at a stream's end, or at once when it is evicted)."""

    def __init__(self, service: Service) -> None:
        self.service: Service | None = service

    def release(self) -> None:
        if self.service is not None:
            service, self.service = self.service, None
            service.release_slot()


def _same_owner(a: bytes | None, b: bytes | None) -> bool:
    if a is None or b is None:
        return a is b
    return secrets.compare_digest(a, b)


#: How often a request that found its Idempotency-Key taken on another replica, by a request still
#: opening its stream, asks the store again: no event crosses replicas for it, and the path is rare.
CLAIM_POLL_S = 0.05


class Claim:
    """An Idempotency-Key, as the first request that came with it holds it: its name (a digest of
    the key, its owner and protocol), the digest of that request, and the stream it opens. Settled
    once the stream started, or once the opening failed and the key is free again."""

    def __init__(self, name: str, request: str, stream_id: str) -> None:
        self.name = name
        self.stream_id = stream_id
        self.opening = f"{request} {stream_id}"  # as the store holds it while the stream opens
        self.stream_log: StreamLog | None = None  # once started
        self.settled = asyncio.Event()

    @property
    def held(self) -> str:
        """What the key holds: the request's digest, its stream, and whether that has started."""
        return self.opening if self.stream_log is None else f"{self.opening} started"


class Service:
    """The state one app shares across requests: settings, the upstream client, slots, the stream
    logs and their producers, drain."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.health_client = httpx2.AsyncClient(timeout=settings.CONNECT_TIMEOUT_S)
        self.tracing = Tracing()  # started by the lifespan (note 14)
        self.worker_metrics = join_worker_metrics()  # note 13
        self.metrics = Metrics(workers=self.worker_metrics)
        self.upstreams = [Upstream(server, settings, self.metrics) for server in settings.upstreams]  # note 22
        self.store = open_store(self)  # note 15
        self.metrics.observe(self.metrics.log_bytes, self.held_log_bytes)
        self.metrics.observe(self.metrics.detached, lambda: sum(p.grace_timer is not None for p in self.producers))
        self.metrics.max_streams.set(settings.MAX_CONCURRENT_STREAMS)
        self.metrics.grace.set(settings.SHUTDOWN_GRACE_S)
        self.metrics.observe(self.metrics.drain_seconds, self.drain_seconds)
        # Every running stream's producer and its task, kept until the task is done (asyncio keeps
        # only weak references to tasks): the drain tightens their deadlines, shutdown cancels them.
        self.producers: dict[Producer, asyncio.Task[None]] = {}
        self.streams: dict[str, StreamLog] = {}  # every resumable stream, by id
        self.chats: dict[ChatKey, StreamLog] = {}  # each AI SDK chat's latest stream (note 12)
        # The Idempotency-Keys taken here, by name and by their stream's id: while the stream opens,
        # then as long as its log is kept.
        self.claims: dict[str, Claim] = {}
        self.claim_of: dict[str, Claim] = {}
        self.finished: dict[str, StreamLog] = {}  # the finished ones, oldest first (dicts keep order)
        self.log_bytes = 0  # held by the logs in `streams`
        self.buffer_bytes = int(settings.RESUME_BUFFER_MB * 1024 * 1024)
        self.slots_in_use = 0  # streams (detached ones too) plus requests still opening one
        self.followers = Followers(settings, self.plan_idle_collection)
        self.draining = False
        self.drain_deadline = math.inf
        self._drain_event: anyio.Event | None = None
        self._drained: anyio.Event | None = None
        self.last_full_gc = 0.0
        self.idle_collection: asyncio.TimerHandle | None = None

    @property
    def drain_event(self) -> anyio.Event:
        # Created on first use, inside the event loop, which anyio.Event needs.
        if self._drain_event is None:
            self._drain_event = anyio.Event()
        return self._drain_event

    def begin_drain(self) -> None:
        """Stop taking chats and give every stream SHUTDOWN_GRACE_S to finish (note 4)."""
        if self.draining:
            return
        self.draining = True
        self.drain_deadline = time.monotonic() + self.settings.SHUTDOWN_GRACE_S
        self.drain_event.set()
        log.info("draining", extra={"active_streams": len(self.producers), "grace_s": self.settings.SHUTDOWN_GRACE_S})
        for producer in list(self.producers):
            producer.tighten_deadline()

    def drain_seconds(self) -> float:
        """How long the drain has run (0 before one): its deadline is SHUTDOWN_GRACE_S after its start."""
        if not self.draining:
            return 0.0
        return time.monotonic() - (self.drain_deadline - self.settings.SHUTDOWN_GRACE_S)

    async def wait_drained(self) -> None:
        """Until the last stream has ended, or the grace (and a margin for final events) is over."""
        if self.slots_in_use:
            self._drained = anyio.Event()
            with anyio.move_on_after(self.settings.SHUTDOWN_GRACE_S + 2):
                await self._drained.wait()

    async def close_clients(self) -> None:
        for upstream in self.upstreams:
            await upstream.client.close()
        await self.health_client.aclose()

    async def upstream_ready(self) -> bool:
        """Whether any model server may take a request (for /readyz): its breaker not open, and its
        health URL (UPSTREAM_HEALTH_URL, or its `health_url`), if it has one, answering 2xx within
        CONNECT_TIMEOUT_S."""
        ready = [upstream for upstream in self.upstreams if upstream.ready]
        # All at once: a probe's own timeout must not add up one CONNECT_TIMEOUT_S per server.
        answers = await asyncio.gather(*(self.answers(upstream.server.health_url) for upstream in ready))
        return any(answers)

    async def answers(self, health_url: str | None) -> bool:
        if health_url is None:
            return True
        try:
            response = await self.health_client.get(health_url)
        except httpx2.HTTPError:
            return False
        return response.is_success

    async def take_slot(self) -> Slot:
        limit = self.settings.MAX_CONCURRENT_STREAMS
        if self.slots_in_use >= limit:
            await self.evict_detached()
        # No await between the checks and the increment: concurrent requests cannot overshoot.
        if self.slots_in_use >= limit:
            raise ServiceError("overloaded", f"{limit} streams are in progress", retry_after=1)
        self.trim()
        if self.log_bytes > self.buffer_bytes:  # only live streams are left in the logs (note 11)
            raise ServiceError("overloaded", "the running streams fill RESUME_BUFFER_MB", retry_after=1)
        self.slots_in_use += 1
        self.metrics.active.inc()
        return Slot(self)

    async def evict_detached(self) -> None:
        """Make room for a client that is here: stop the stream whose client left first (note 11).
        None goes when every slot holds a stream with a follower, here or, with a store, on another
        replica (note 19: its grace runs here all the same), or a request still opening one."""
        detached = sorted((p for p in self.producers if p.grace_timer is not None), key=lambda p: p.detached_at)
        for producer in detached:
            if self.store is not None and await producer.followed_anywhere():
                continue
            if self.slots_in_use < self.settings.MAX_CONCURRENT_STREAMS:
                return  # a slot came free meanwhile
            if producer.grace_timer is not None:  # still detached after the await
                producer.evict()
                return

    def release_slot(self) -> None:
        self.slots_in_use -= 1
        self.metrics.active.dec()
        if self.slots_in_use == 0:
            if self._drained is not None:
                self._drained.set()
            self.plan_idle_collection()

    def plan_idle_collection(self) -> None:
        """Note 10: the full collection left to idle moments runs once no stream and no follower is
        in flight, IDLE_GC_DELAY_S after the last, when their sockets have closed; at most once every
        IDLE_GC_INTERVAL_S."""
        if self.slots_in_use or self.followers.total or self.idle_collection is not None:
            return
        if time.monotonic() - self.last_full_gc > IDLE_GC_INTERVAL_S:
            self.idle_collection = asyncio.get_running_loop().call_later(IDLE_GC_DELAY_S, self._collect_if_idle)

    def _collect_if_idle(self) -> None:
        self.idle_collection = None
        if self.slots_in_use or self.followers.total:
            return  # work came meanwhile: the next idle moment
        self.last_full_gc = time.monotonic()
        self.metrics.collect_when_idle()

    # The stream logs (note 11)

    def start_stream(
        self,
        stream_id: str,
        owner: bytes | None,
        protocol: ChatProtocol,
        chat: ChatKey | None,
        make_producer: Callable[[StreamLog], Producer],
        resources: AsyncExitStack,
    ) -> StreamLog:
        """A new stream's log, and its producer running in a task of its own: it outlives the request.
        The producer takes the stream's resources (slot, span, upstream connection) over from
        `resources` as its task starts: until then they are the caller's to release."""
        stream_log = StreamLog(self, stream_id, owner, protocol, chat)
        self.streams[stream_log.stream_id] = stream_log
        if chat is not None:
            self.chats[chat] = stream_log
        producer = make_producer(stream_log)
        stream_log.producer = producer
        if (claim := self.claim_of.get(stream_id)) is not None:
            self.settle(claim, stream_log)
        task = asyncio.create_task(producer.run(resources.pop_all()))  # with the request's context
        self.producers[producer] = task
        task.add_done_callback(lambda _: self.producers.pop(producer, None))
        return stream_log

    async def find_stream(self, stream_id: str, owner: bytes | None) -> StreamLog | RemoteStream:
        """The stream with this id, started with this key (another key's stream is not revealed):
        this replica's own if it holds it, else the store's copy (note 15)."""
        self.trim()
        stream_log = self.streams.get(stream_id)
        if stream_log is not None:
            if not _same_owner(stream_log.owner, owner):
                raise stream_not_found()
            return stream_log
        if self.store is None:
            raise stream_not_found()
        remote = await ask_store(self.store, self.store.find(stream_id, owner))
        if remote is None:  # none, another key's, or abandoned (note 19)
            raise stream_not_found()
        return remote

    async def find_kept(self, stream_id: str, owner: bytes | None) -> StreamLog | RemoteStream | None:
        """find_stream, with None for a stream that is not (or no longer) kept."""
        try:
            return await self.find_stream(stream_id, owner)
        except ServiceError as exc:
            if exc.code == "stream_not_found":
                return None
            raise

    async def find_chat_stream(self, chat_id: str, owner: bytes | None) -> StreamLog | RemoteStream | None:
        """The chat's latest stream, if it is kept (note 12). The key that started the chat is part
        of its name, so another key's chat is not even looked at. With a store, the store says which
        stream is the latest: it may have started on another replica."""
        self.trim()
        if self.store is None:
            return self.chats.get((owner, chat_id))
        stream_id = await ask_store(self.store, self.store.find_chat((owner, chat_id)))
        if stream_id is None or (stream_log := await self.find_kept(stream_id, owner)) is None:
            return None  # none, or expired between the two look-ups
        if isinstance(stream_log, StreamLog) and stream_log.finished and not stream_log.delivered:
            # To a follower on another replica?
            stream_log.delivered = await ask_store(self.store, self.store.delivered(stream_id))
        return stream_log

    def cancel_here(self, stream_id: str, request_id: str | None, after: int | None) -> None:
        """A DELETE on another replica named this stream (note 15), and perhaps the last event its
        client showed (note 23): stop it if it runs here, logged with that request's correlation id."""
        stream_log = self.streams.get(stream_id)
        if stream_log is not None and stream_log.producer is not None:
            token = correlation_id.set(request_id)
            try:
                stream_log.producer.cancel(after)
            finally:
                correlation_id.reset(token)

    def on_finished(self, stream_log: StreamLog) -> None:
        if stream_log.stream_id in self.streams:
            self.finished[stream_log.stream_id] = stream_log
            self.trim()

    def drop(self, stream_log: StreamLog) -> None:
        """Forget a stream: it can no longer be resumed (followers reading it keep their reference)."""
        if self.streams.pop(stream_log.stream_id, None) is not None:
            self.log_bytes -= stream_log.size
        self.finished.pop(stream_log.stream_id, None)
        if stream_log.chat is not None and self.chats.get(stream_log.chat) is stream_log:
            del self.chats[stream_log.chat]
        if (claim := self.claim_of.get(stream_log.stream_id)) is not None:
            self.forget(claim)

    def trim(self) -> None:
        """Drop finished logs past RESUME_TTL_S, and the oldest finished ones while over RESUME_BUFFER_MB."""
        expired = time.monotonic() - self.settings.RESUME_TTL_S
        while self.finished:  # oldest first: it runs on every admission, so it looks no further
            oldest = next(iter(self.finished.values()))
            assert oldest.finished_at is not None
            if oldest.finished_at > expired and self.log_bytes <= self.buffer_bytes:
                break
            self.drop(oldest)

    def held_log_bytes(self) -> float:
        self.trim()
        return self.log_bytes

    # Idempotency-Keys

    async def claim(
        self,
        name: str,
        request: str,
        stream_id: str,
        owner: bytes | None,
        deadline: float,
        resources: AsyncExitStack,
    ) -> StreamLog | RemoteStream | None:
        """Take the Idempotency-Key `name` for the stream `stream_id` that this request opens: None
        once taken (`resources` frees it if the stream never starts). Taken already by the same
        request: the stream it started; while that stream still opens, wait (until `deadline`) for
        it to start, then follow it, or to fail, then take the key. Taken by another request: 422.
        With a store, the store holds the keys of every replica (note 15)."""
        with anyio.move_on_at(deadline):
            return await self._claim(name, request, stream_id, owner, resources)
        if self.store is not None:  # in case the store took the key just as the wait ran out
            self.store.settle(name, f"{request} {stream_id}", None)
        raise ServiceError(
            "upstream_timeout", f"the request that came first with this {IDEMPOTENCY_KEY_HEADER} is still opening"
        )

    async def _claim(
        self, name: str, request: str, stream_id: str, owner: bytes | None, resources: AsyncExitStack
    ) -> StreamLog | RemoteStream | None:
        replaced = None  # what the store holds for a stream that is over: the key is free
        while True:
            self.trim()
            claim = self.claims.get(name)
            if claim is not None:
                held: str | None = claim.held
            elif self.store is not None:
                held = await ask_store(self.store, self.store.claim(name, f"{request} {stream_id}", replaced))
            else:
                held = None
            if held is None:
                claim = self.claims[name] = self.claim_of[stream_id] = Claim(name, request, stream_id)
                resources.callback(self.release, claim)
                return None
            held_request, held_stream, *started = held.split(" ")
            found: StreamLog | RemoteStream | None = None
            if claim is not None:  # here, a started stream's claim goes with its log (`drop`)
                found = claim.stream_log
            elif started and (found := await self.find_kept(held_stream, owner)) is None:
                replaced = held  # expired, or abandoned (note 11): the key goes with its stream
                continue
            if not secrets.compare_digest(held_request, request):
                raise ServiceError("idempotency_key_reused", f"{IDEMPOTENCY_KEY_HEADER} came with another request")
            if found is not None:
                return found
            if claim is not None:  # opening here: until it starts or fails
                await claim.settled.wait()
                replaced = claim.opening  # failed: free, though the store may not have heard yet
            else:  # opening on another replica
                await asyncio.sleep(CLAIM_POLL_S)

    def settle(self, claim: Claim, stream_log: StreamLog) -> None:
        """The key's stream started: requests waiting for it follow it."""
        claim.stream_log = stream_log
        claim.settled.set()
        if self.store is not None:
            self.store.settle(claim.name, claim.opening, claim.held)

    def free_key(self, stream_log: StreamLog) -> None:
        """The stream ended with an error before any content: its key is free, so that the request,
        sent again as the error says, is tried again rather than given the error again. Followers
        attached by the key have it already."""
        if (claim := self.claim_of.get(stream_log.stream_id)) is not None:
            self.forget(claim)
            if self.store is not None:
                self.store.settle(claim.name, claim.held, None)

    def forget(self, claim: Claim) -> None:
        """The key no longer names this claim's stream here (the store is told by the caller)."""
        if self.claims.get(claim.name) is claim:
            del self.claims[claim.name]
        self.claim_of.pop(claim.stream_id, None)

    def release(self, claim: Claim) -> None:
        """The key's stream never started: the key is free, for the requests waiting for it too."""
        if claim.stream_log is not None:
            return
        self.forget(claim)
        claim.settled.set()
        if self.store is not None:
            self.store.settle(claim.name, claim.opening, None)


# --- Endpoints --------------------------------------------------------------------------------------


def service_of(request: Request) -> Service:
    service = request.app.state.service
    assert isinstance(service, Service)
    return service


async def chat(request: Request) -> Response:
    """POST /chat: a new stream, or (with Last-Event-ID, as fetch-event-source retries) a resume."""
    if (last_event_id := request.headers.get("last-event-id")) is not None:
        stream_id, _, _ = last_event_id.partition(":")
        return await resume(request, stream_id, "post")  # the body is not run again (note 11)
    return await start_chat(request, CHATSVC)


async def ai_sdk_chat(request: Request) -> Response:
    """POST /api/chat: a new stream, for the AI SDK's DefaultChatTransport (note 12)."""
    return await start_chat(request, AI_SDK)


async def start_chat(request: Request, protocol: ChatProtocol) -> Response:
    """A new stream: the checks, the upstream opened, then its producer and the first follower."""
    started = time.monotonic()
    service = service_of(request)
    settings = service.settings
    deadline = started + settings.REQUEST_TIMEOUT_S

    if service.draining:
        raise ServiceError("shutting_down", "the service is draining and takes no new chats", retry_after=5)
    owner = authorize(request, settings)
    if not settings.configured:
        raise ServiceError("not_configured", "none of OPENAI_API_KEY, OPENAI_BASE_URL and UPSTREAMS is set")
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise ServiceError("unsupported_media_type", f"got {media_type[:64] or 'no content type'!r}")
    try:
        body = await request.body()
    except ClientDisconnect:
        # The client left before sending the body it announced: nobody is there to answer.
        log.info("client_disconnected", extra={"path": protocol.path, "while": "reading the request body"})
        return Response(status_code=400)
    chat_request, chat_id = protocol.parse(body, settings)
    minted = None
    if chat_id is not None and owner is None:  # a chat the client named is its browser's (note 21)
        owner, minted = browser_owner(request)
    idempotency = idempotency_key(request, protocol, owner)

    messages = chat_request.messages(settings.SYSTEM_PROMPT)
    prompt_chars = sum(len(str(m.get("content", ""))) for m in messages)
    extra: dict[str, Any] = {**text_fingerprint(chat_request.message), "history_turns": len(chat_request.history)}
    if chat_id is not None:
        extra["chat_id"] = chat_id
    if settings.LOG_CONTENT:
        extra["content"] = request.app.state.redactor.content(chat_request.message)
    log.info("chat_request", extra=extra)

    service.followers.check(None)  # its client is a follower: refused before the model is asked (note 20)
    model = chat_request.model or settings.OPENAI_MODEL
    stream_id = secrets.token_hex(16)  # note 11
    chat = None if chat_id is None else (owner, chat_id)
    # Each resource is released from the moment it is taken, however the opening ends; the producer
    # takes them over when the stream starts.
    async with AsyncExitStack() as resources:
        if idempotency is not None:  # sent again? then the stream the first request started (or starts)
            digest = request_digest(chat_request, chat_id)
            earlier = await service.claim(idempotency, digest, stream_id, owner, deadline, resources)
            if earlier is not None:  # logged by its name's first digits: the key may say something of its user
                return rejoin(service, earlier, 0, "idempotent", "idempotent_replay", idempotency_key=idempotency[:12])
        slot = await service.take_slot()
        resources.callback(slot.release)
        span = service.tracing.upstream_span(
            model,
            max_tokens=int(chat_request.max_tokens or settings.MAX_TOKENS),
            temperature=chat_request.temperature,
            server_address=None,  # each attempt's, as it is made (note 22)
        )
        resources.callback(span.end)
        failover = Failover(service, chat_request, messages, deadline, span)
        resources.callback(failover.close)
        try:
            announced = None
            if service.store is not None:
                # Note 15: every replica can find the stream before its id is out, at no cost to the live path.
                prompt_tokens = math.ceil(prompt_chars / 4)  # note 6: the estimate, should the stream be lost (note 19)
                announced = service.store.announce(
                    stream_id, owner, protocol, chat, span.get_span_context(), prompt_tokens
                )
                resources.callback(announced.cancel)
            token = otel_context.attach(trace.set_span_in_context(span)) if span is not NO_SPAN else None
            try:
                stream = await failover.open()
            finally:
                if token is not None:
                    otel_context.detach(token)
            resources.push_async_callback(close_upstream, stream)
            span.set_attribute("chatsvc.upstream.retries", failover.retries)
            store_failure = await announced if announced is not None else None
        except BaseException as exc:
            mark_failed(span, exc.code if isinstance(exc, ServiceError) else "internal_error", exc)
            raise
        stream_log = service.start_stream(
            stream_id,
            owner,
            protocol,
            chat,
            lambda stream_log: Producer(
                service, stream_log, failover, stream, span, slot, model, prompt_chars, started, deadline
            ),
            resources,
        )
    if store_failure is not None and service.store is not None:
        service.store.give_up(stream_log, "failed", store_failure)
    response = FollowerResponse(service, stream_log, 0, first=True)
    if minted is not None:
        set_owner_cookie(response, request, minted)
    return response


def idempotency_key(request: Request, protocol: ChatProtocol, owner: bytes | None) -> str | None:
    """The name of the request's Idempotency-Key, if it sent one: a digest of the key, its owner and
    its protocol, so that no other owner's key, nor the other protocol's, is the same key; a store
    holds the name, never the key."""
    key = request.headers.get(IDEMPOTENCY_KEY_HEADER)
    if key is None:
        return None
    if IDEMPOTENCY_KEY_PATTERN.fullmatch(key) is None:
        raise ServiceError("validation_error", f"{IDEMPOTENCY_KEY_HEADER}: 1 to 255 printable ASCII characters")
    scope = f"chatsvc idempotency key\0{protocol.path}\0{owner.hex() if owner else ''}\0".encode()
    return hashlib.sha256(scope + key.encode()).hexdigest()


def request_digest(chat_request: ChatRequest, chat_id: str | None) -> str:
    """What makes two requests the same request: the parsed body (and the AI SDK's chat), not its bytes."""
    return hashlib.sha256(f"{chat_id or ''}\0{chat_request.model_dump_json()}".encode()).hexdigest()


def rejoin(
    service: Service, stream_log: StreamLog | RemoteStream, position: int, outcome: str, line: str, **fields: Any
) -> Response:
    """A client for a stream that runs or is kept, from `position`: a resume, or a request sent again
    with its Idempotency-Key (from the start). Refused, as the response would be (note 20), before
    it is counted as `outcome`, linked to the stream's trace (note 14) and logged as `line`."""
    service.followers.check(stream_log.stream_id)
    service.metrics.resumes.labels(outcome).inc()
    trace.get_current_span().add_link(stream_log.span_context)
    log.info(line, extra={"stream_id": stream_log.stream_id, **fields})
    return FollowerResponse(service, stream_log, position)


async def follow_stream(request: Request) -> Response:
    """GET /chat/streams/{stream_id}: replay after Last-Event-ID (or ?after=), then follow live."""
    return await resume(request, request.path_params["stream_id"], "get")


async def delete_stream(request: Request) -> Response:
    """DELETE /chat/streams/{stream_id}: stop the generation; idempotent. With Last-Event-ID or
    ?after=, the stored answer ends after that event (note 23)."""
    service = service_of(request)
    owner = authorize(request, service.settings)
    stream_log = await service.find_stream(request.path_params["stream_id"], owner)
    await stop_stream(service, stream_log, _last_seq(request, stream_log))
    return Response(status_code=204)


async def stop_stream(service: Service, stream_log: StreamLog | RemoteStream, after: int | None = None) -> None:
    """DELETE: the producer stops, here or (through the store) on the replica running it; a stream
    that has ended stays as it is. A cut keeps the meta (`after` -1): it holds no text."""
    if after is not None:
        after = max(after, 0)
    if isinstance(stream_log, StreamLog):
        if stream_log.producer is not None:
            stream_log.producer.cancel(after)
    elif not stream_log.finished and service.store is not None:
        await ask_store(service.store, service.store.cancel(stream_log.stream_id, after))


async def ai_sdk_follow(request: Request) -> Response:
    """GET /api/chat/{chat_id}/stream: the AI SDK's reconnectToStream. The chat's stream replayed
    from its start (the SDK's default, resumeStreamIsReplay), then live; 204 when the chat has no
    stream that a client has not received whole (note 12)."""
    service = service_of(request)
    owner = authorize(request, service.settings)
    if owner is None:  # without its cookie, a new owner: it has started no chat (note 21)
        owner, _ = browser_owner(request)
    try:
        stream_log = await service.find_chat_stream(request.path_params["chat_id"], owner)
    except ServiceError as exc:
        if exc.code == "resume_unavailable":
            service.metrics.resumes.labels("unavailable").inc()
        raise
    if stream_log is None or stream_log.delivered:
        service.metrics.resumes.labels("not_found" if stream_log is None else "finished").inc()
        return Response(status_code=204)
    return rejoin(service, stream_log, 0, "resumed", "stream_resumed", from_seq=0, via="ai-sdk")


async def ai_sdk_delete(request: Request) -> Response:
    """DELETE /api/chat/{chat_id}/stream: stop the chat's stream; idempotent."""
    service = service_of(request)
    owner = authorize(request, service.settings)
    if owner is None:  # without its cookie, a new owner: it has started no chat (note 21)
        owner, _ = browser_owner(request)
    if (stream_log := await service.find_chat_stream(request.path_params["chat_id"], owner)) is not None:
        await stop_stream(service, stream_log)
    return Response(status_code=204)


async def resume(request: Request, stream_id: str, via: str) -> Response:
    """A follower from the position that Last-Event-ID or ?after= names; 204 when the terminal event
    was delivered already, which tells an EventSource to stop reconnecting (note 11)."""
    service = service_of(request)
    metrics = service.metrics
    try:
        owner = authorize(request, service.settings)
        stream_log = await service.find_stream(stream_id, owner)
        after = _last_seq(request, stream_log)
    except ServiceError as exc:
        if exc.code in ("stream_not_found", "resume_unavailable"):
            metrics.resumes.labels("not_found" if exc.code == "stream_not_found" else "unavailable").inc()
        raise
    position = 0 if after is None else after + 1
    if stream_log.finished and position >= len(stream_log):
        metrics.resumes.labels("finished").inc()
        return Response(status_code=204, headers={STREAM_ID_HEADER: stream_id})
    return rejoin(service, stream_log, position, "resumed", "stream_resumed", from_seq=position, via=via)


def _last_seq(request: Request, stream_log: StreamLog | RemoteStream) -> int | None:
    """The last seq the client has (to resume after, or to stop at): from Last-Event-ID, else
    ?after= (-1: none yet), else None. An id of another stream or a seq not yet sent is malformed:
    404, never a guess."""
    last_event_id = request.headers.get("last-event-id")
    after = request.query_params.get("after")
    if last_event_id is not None:
        match = EVENT_ID_PATTERN.fullmatch(last_event_id)
        if match is None or match[1] != stream_log.stream_id:
            raise ServiceError("stream_not_found", "Last-Event-ID does not name an event of this stream")
        seq = int(match[2])
    elif after is not None:
        if not AFTER_PATTERN.fullmatch(after):
            raise ServiceError("stream_not_found", "after must be the seq of an event of this stream")
        seq = int(after)
    else:
        return None
    # A live stream's copy in the store may be behind what its client has: the follower waits for it.
    if not (isinstance(stream_log, StreamLog) or stream_log.finished):
        return seq
    if seq < len(stream_log):
        return seq
    if seq >= stream_log.reached:
        raise ServiceError("stream_not_found", f"this stream has sent no event {seq} yet")
    # Cut by a stop (note 23), and this client had an event the cut removed: what the log kept, and
    # its end, come next. (The `done` took the seq of the first event removed: that seq is the end's,
    # and 204 follows it, which tells an EventSource to stop.)
    return len(stream_log) - 2


def authorize(request: Request, settings: Settings) -> bytes | None:
    """Check the bearer key when SERVICE_API_KEYS is set; return a digest of it, which binds the
    streams it starts to it (none without keys: then the unguessable stream id is the capability)."""
    keys = settings.service_keys
    if not keys:
        return None
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    presented = token.strip().encode() if scheme.lower() == "bearer" else b""
    # Compare against every key, so the time taken does not say which key was close.
    matched = False
    for key in keys:
        matched |= secrets.compare_digest(presented, key)
    if not matched:
        raise ServiceError("unauthorized", "no valid bearer token in the Authorization header")
    return hmac.new(settings.owner_key, presented, "sha256").digest()


OWNER_COOKIE = "chatsvc_owner"
OWNER_TOKEN_PATTERN = re.compile(r"[0-9a-f]{32}")  # as minted: secrets.token_hex(16)


def browser_owner(request: Request) -> tuple[bytes, str | None]:
    """The owner of the AI SDK chats a browser starts, without SERVICE_API_KEYS (note 21): a digest
    of its owner cookie. A request without a well-formed one is a new owner; its token is returned
    for the response to set."""
    token = request.cookies.get(owner_cookie_name(request), "")
    minted = None
    if OWNER_TOKEN_PATTERN.fullmatch(token) is None:
        token = minted = secrets.token_hex(16)
    # 128 random bits: a digest without a key cannot be turned back into a token.
    return hashlib.sha256(b"chatsvc chat owner\0" + token.encode()).digest(), minted


def owner_cookie_name(request: Request) -> str:
    """Over https, the __Host- prefix: the browser takes such a cookie only with Secure and Path=/
    and without Domain, so no sibling subdomain can set one for this host (note 21)."""
    return f"__Host-{OWNER_COOKIE}" if request.scope["scheme"] == "https" else OWNER_COOKIE


def set_owner_cookie(response: Response, request: Request, token: str) -> None:
    """A session cookie (note 21 says why), never readable by the page's scripts."""
    secure = request.scope["scheme"] == "https"
    response.set_cookie(owner_cookie_name(request), token, path="/", secure=secure, httponly=True, samesite="lax")


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """200 when configured, not draining, and a model server is ready (note 22: its breaker closed,
    its health URL answering); otherwise 503, the code saying which."""
    service = service_of(request)
    settings = service.settings
    if service.draining:
        raise ServiceError("shutting_down", "the service is draining", retry_after=5)
    if not settings.configured:
        raise ServiceError("not_configured", "none of OPENAI_API_KEY, OPENAI_BASE_URL and UPSTREAMS is set")
    if service.store is not None and not await service.store.answers():
        raise ServiceError("resume_unavailable", "RESUME_STORE does not answer", retry_after=2)
    if not await service.upstream_ready():
        detail = (
            "no model server is ready: each has its circuit breaker open or fails its health URL"
            " (UPSTREAM_HEALTH_URL, or health_url in UPSTREAMS)"
        )
        raise ServiceError("upstream_unreachable", detail, status=503)
    return JSONResponse({"status": "ready", "model": settings.OPENAI_MODEL})


async def metrics(request: Request) -> Response:
    service = service_of(request)
    workers = service.worker_metrics
    registry = service.metrics.registry if workers is None else workers.registry()  # note 13
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


async def page(request: Request) -> Response:
    chat_page: ChatPage = request.app.state.page
    return HTMLResponse(chat_page.html, headers=chat_page.headers)


async def openapi(request: Request) -> Response:
    return JSONResponse(request.app.state.openapi)


# --- The app ----------------------------------------------------------------------------------------

Endpoint = Callable[[Request], Awaitable[Response]]


class MethodRoute(Route):
    """A path with one endpoint for each method it documents; any other method, HEAD included, is
    405 with all of them in Allow (note 16). Starlette's Route adds HEAD wherever GET is."""

    def __init__(self, path: str, endpoints: Mapping[str, Endpoint], *, max_body_size: int | None = None) -> None:
        super().__init__(path, MethodDispatch(endpoints), methods=list(endpoints), max_body_size=max_body_size)
        self.methods = set(endpoints)


class MethodDispatch:
    """The ASGI app of a `MethodRoute`: the request goes to its method's endpoint (the route has
    answered 405 for any other)."""

    def __init__(self, endpoints: Mapping[str, Endpoint]) -> None:
        self.apps = {method: request_response(endpoint) for method, endpoint in endpoints.items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.apps[scope["method"]](scope, receive, send)


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or load_settings()
    service = Service(settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Drain on the first signal (note 4), or when sse-starlette sees the server shutting down.
        restore_signals = drain_on_signals(service)
        service.tracing.start(os.environ)
        if service.store is not None:
            await service.store.start()
        tune_gc()  # before the pause metric starts: its start-up collection stalls no stream
        gc.callbacks.append(service.metrics.on_gc)
        log.info(
            "service_started",
            extra={
                "model": settings.OPENAI_MODEL,
                "upstreams": [upstream.name for upstream in service.upstreams],
                "configured": settings.configured,
                "auth": bool(settings.service_keys),
            },
        )
        try:
            # The lifespan's own tasks, ended when it ends, before anything they use is closed.
            async with anyio.create_task_group() as background:
                background.start_soon(_drain_when_told, service)
                background.start_soon(service.metrics.watch_loop_lag)
                if service.worker_metrics is not None:  # note 13: scrape-time gauges, every second
                    background.start_soon(service.worker_metrics.publish_live)
                try:
                    yield
                finally:
                    restore_signals()
                    background.cancel_scope.cancel()
        finally:
            tasks = list(service.producers.values())  # only those outliving the drain (note 4)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if service.store is not None:
                await service.store.stop()
            gc.callbacks.remove(service.metrics.on_gc)
            await service.close_clients()
            await service.tracing.stop()
            if service.worker_metrics is not None:
                service.worker_metrics.leave()
            log.info("service_stopped")

    routes = [
        MethodRoute("/chat", {"POST": chat}, max_body_size=settings.MAX_BODY_BYTES),  # note 2
        MethodRoute("/chat/streams/{stream_id}", {"GET": follow_stream, "DELETE": delete_stream}),
        MethodRoute("/api/chat", {"POST": ai_sdk_chat}, max_body_size=settings.MAX_BODY_BYTES),  # note 2
        MethodRoute("/api/chat/{chat_id}/stream", {"GET": ai_sdk_follow, "DELETE": ai_sdk_delete}),
        MethodRoute("/healthz", {"GET": healthz}),
        MethodRoute("/readyz", {"GET": readyz}),
        MethodRoute("/metrics", {"GET": metrics}),
        MethodRoute("/openapi.json", {"GET": openapi}),
    ]
    if settings.SERVE_PAGE:
        routes.append(MethodRoute("/", {"GET": page}))
    middleware = [
        Middleware(
            RequestContextMiddleware,
            max_body_bytes=settings.MAX_BODY_BYTES,
            body_timeout_s=settings.BODY_TIMEOUT_S,
            tracing=service.tracing,
        )
    ]
    if settings.CORS_ALLOW_ORIGINS:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.CORS_ALLOW_ORIGINS),
                # The owner cookie of an AI SDK chat (note 21), for origins named here only: with `*`,
                # Starlette would echo any origin, and any site could read its visitors' chats.
                allow_credentials="*" not in settings.CORS_ALLOW_ORIGINS,
                allow_methods=["GET", "POST", "DELETE"],
                allow_headers=[
                    "Authorization",
                    "Content-Type",
                    "Last-Event-ID",
                    REQUEST_ID_HEADER,
                    IDEMPOTENCY_KEY_HEADER,
                ],
                expose_headers=[REQUEST_ID_HEADER, STREAM_ID_HEADER, "Retry-After"],
            )
        )
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={Exception: render_error, HTTPException: render_error, ServiceError: render_error},
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.openapi = load_openapi(
        models=settings.allowed_models,
        max_message_chars=settings.MAX_MESSAGE_CHARS,
        max_history=settings.MAX_HISTORY,
        max_tokens=settings.MAX_TOKENS,
    )
    app.state.page = ChatPage.load() if settings.SERVE_PAGE else None
    app.state.redactor = Redactor(settings.secrets)
    return app


#: Collector thresholds (note 10): young collections every 5,000 allocations, not 700, and middle
#: ones after 4 of those, so that none walks more than some 20,000 live objects (under 50 ms);
#: full collections almost only when idle.
GC_THRESHOLDS = (5_000, 4, 1000)


def tune_gc() -> None:
    """The objects alive at start-up (modules, classes, the app: most of the heap) are moved out of
    the collector's reach, so that no collection walks them again (note 10)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def _drain_when_told(service: Service) -> None:
    await service.drain_event.wait()
    service.begin_drain()


def drain_on_signals(service: Service) -> Callable[[], None]:
    """Put a handler for SIGTERM and SIGINT in front of the server's: the first signal drains, then
    hands itself to the server's handler; a second goes to it at once (note 4). Returns what puts
    the server's handlers back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # only the main thread can catch signals
    loop = asyncio.get_running_loop()
    servers: dict[int, Any] = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    drains: list[asyncio.Task[None]] = []  # the one drain, once a signal came

    def pass_on(sig: int, frame: FrameType | None) -> None:
        handler = servers[sig]
        if callable(handler):
            handler(sig, frame)
        else:  # no server's handler (SIG_DFL): the signal does what it would have done
            signal.signal(sig, handler)
            signal.raise_signal(sig)

    async def drain(sig: int) -> None:
        service.begin_drain()
        await service.wait_drained()
        pass_on(sig, None)

    def start_drain(sig: int) -> None:
        if not drains:
            drains.append(loop.create_task(drain(sig)))

    def on_signal(sig: int, frame: FrameType | None) -> None:
        if drains:  # a second signal: stop now
            pass_on(sig, frame)
        else:  # a signal handler runs between two bytecodes: hand over to the loop
            loop.call_soon_threadsafe(start_drain, sig)

    for sig in servers:
        signal.signal(sig, on_signal)

    def restore() -> None:
        for sig, handler in servers.items():
            if signal.getsignal(sig) is on_signal:
                signal.signal(sig, handler)

    return restore


# --- Launcher ---------------------------------------------------------------------------------------


def app_from_environment() -> Starlette:
    """The app from the environment, with logging configured: what each worker of `python chatsvc.py`
    runs (uvicorn calls it as the app's factory) and what `chatsvc:app` builds on its first call."""
    settings = load_settings()
    check_store(settings)
    configure_logging(settings.LOG_LEVEL, settings.secrets, settings.log_format)
    return create_app(settings)


class LazyApp:
    """`chatsvc:app`, for `uvicorn chatsvc:app` and any other ASGI server: the app from the environment,
    built on the first call (the server's lifespan), so that importing this module reads no settings and
    builds nothing (note 4 says what plain uvicorn changes for shutdown)."""

    def __init__(self) -> None:
        self.app: Starlette | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.app is None:
            try:
                self.app = app_from_environment()
            except SystemExit as exc:  # a bad configuration, said on stderr
                if scope["type"] != "lifespan":
                    raise
                # Raised, it would read to the server as a lifespan it need not run: it would serve on.
                await receive()  # lifespan.startup
                await send({"type": "lifespan.startup.failed", "message": f"invalid configuration (exit {exc})"})
                return
        await self.app(scope, receive, send)


app = LazyApp()


def main() -> None:
    """`python chatsvc.py`: one process, or with WORKERS > 1 uvicorn's supervisor and as many
    workers, each draining by itself (note 4). Exits 0 after a drain, 1 if the server did not start."""
    settings = load_settings()
    check_store(settings)
    configure_logging(settings.LOG_LEVEL, settings.secrets, settings.log_format)
    options: dict[str, Any] = {
        "host": settings.HOST,
        "port": settings.PORT,
        "log_config": None,  # ours, from logging_conf
        "access_log": False,  # request_received / request_completed say more, with the correlation id
        "timeout_graceful_shutdown": int(settings.SHUTDOWN_GRACE_S) + 5,
        "lifespan": "on",
        "headers_timeout_s": settings.HEADERS_TIMEOUT_S,  # note 17
        "timeout_response": headers_timeout_response,
    }
    # uvicorn re-raises the signal it caught once it has shut down, so that the previous handler
    # runs; with the default one the process would die "by SIGTERM" (143) after a clean drain.
    # A drained service has done its job: exit 0. (A worker's own exit is its supervisor's affair.)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    if settings.WORKERS > 1:
        # Each worker builds the app from the same environment, and configures logging before uvicorn
        # logs. Named by this module's own name: in a worker, multiprocessing has already loaded this
        # script as `__main__`, and "chatsvc" would load it a second time.
        factory = f"{__name__}:{app_from_environment.__name__}"
        config = ServerConfig(factory, factory=True, workers=settings.WORKERS, **options)
        Multiprocess(config, sockets=[config.bind_socket()]).run()
        return
    server = uvicorn.Server(ServerConfig(create_app(settings), **options))
    server.run()
    if not server.started:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
