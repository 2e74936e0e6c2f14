"""Logging for chatsvc: one record per line on stdout, with the request's correlation id (and trace
and span ids, when it has a trace) and secrets masked on every record, ours and the libraries'
alike. JSON for machines (the default wherever stdout is not a terminal: containers, CI, files), or
one readable line for people.

Both filters sit on the *handler*, not on our logger: a filter on a logger sees only that logger's
own records, while uvicorn's, openai's and httpx's records reach the handler through propagation.

Notes (docs/design.md, "Logging", explains each at length):
1. Library loggers that can print bodies at DEBUG (sse-starlette's chunks, openai's request options)
   stay at INFO whatever LOG_LEVEL says: their copies would be neither truncated nor PII-masked.
   docs/design.md#logging-note-1-content-bearing-library-loggers-stay-at-info
2. Redaction masks, in the message, every extra field and tracebacks: configured secrets, `sk-` keys,
   bearer tokens, Authorization headers, e-mail addresses; in logged content phone numbers too.
   docs/design.md#logging-note-2-what-redaction-masks
3. httpx's INFO line per upstream request is left out unless LOG_LEVEL=DEBUG: our own lines say the
   same with the correlation id, and each line costs CPU on the event loop.
   docs/design.md#logging-note-3-httpxs-request-lines-only-at-debug
4. No text costs the redaction more than time linear in its length (it runs on the event loop, on
   what clients send): e-mails are found from each `@`, other patterns are possessive.
   docs/design.md#logging-note-4-redaction-in-linear-time
"""

from __future__ import annotations

import hashlib
import json
import logging
import logging.config
import re
import time
from collections.abc import Iterable
from contextvars import ContextVar
from typing import Any

from opentelemetry import trace
from pythonjsonlogger.core import RESERVED_ATTRS

#: The id of the request being served; set by the middleware at the top of every request.
correlation_id: ContextVar[str | None] = ContextVar("correlation_id", default=None)

MASK = "[REDACTED]"
CONTENT_LOG_CHARS = 200

# Always masked, whatever the level (see note 2); e-mail addresses too (`_mask_emails`). Each
# pattern starts at a literal and its runs are possessive (`++`): a failed attempt gives nothing
# back, so every pattern costs time linear in the text (note 4).
_SECRET_PATTERNS = [
    # Key-length sk- strings wherever they stand; shorter ones only at a word start ("task-group").
    re.compile(r"sk-[A-Za-z0-9_\-]{20,}+|\bsk-[A-Za-z0-9_\-]{6,}+"),
    re.compile(r"(?i)bearer\s++[A-Za-z0-9._~+/=\-]{4,}+"),
    re.compile(r"(?i)(authorization[\"']?\s*+[:=]\s*+[\"']?)(?:[A-Za-z]++\s++)?[^\s\"',}]++"),
    re.compile(r"(?i)(api[_-]?key[\"']?\s*+[:=]\s*+[\"']?)[^\s\"',}]++"),
]
# An e-mail address is `[local]+@[domain]+.[letters]{2,}`. Searched as that one pattern, every
# start inside a run of local-part characters scans to the run's end again: quadratic in a path
# like /aaaa...@. So a match starts only where the run does (the character before cannot be in a
# local part) and takes the run possessively; `_mask_emails` tries the one other place a match
# can start, right after the previous one.
_LOCAL = r"[A-Za-z0-9._%+\-]"
_EMAIL_TAIL = re.compile(_LOCAL + r"++@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}")
_EMAIL = re.compile(r"(?<!" + _LOCAL + ")" + _EMAIL_TAIL.pattern)
# Masked in logged content (LOG_CONTENT=true) as well. Not everywhere: it would eat IP addresses.
_PII_PATTERNS = [
    re.compile(r"(?<!\w)\+?\d[\d\s().\-]{7,}\d(?!\w)"),
]

# Attributes every LogRecord has; anything else on a record came from `extra=` and is redacted too.
_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}

# Loggers whose DEBUG records carry request or response bodies (note 1).
CONTENT_BEARING_LOGGERS = ("openai", "httpx", "httpx2", "httpcore", "httpcore2", "sse_starlette")
# Content-bearing too, and quieter still: their INFO line per request shows only at DEBUG (note 3).
HTTPX_LOGGERS = ("httpx", "httpx2")


class Redactor:
    """Masks secrets (and, for logged content, PII) in strings and nested structures."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so that a secret containing another is masked whole.
        self.secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def text(self, value: str) -> str:
        for secret in self.secrets:
            value = value.replace(secret, MASK)
        if "@" in value:
            value = _mask_emails(value)
        if _may_hold_secret(value):
            for pattern in _SECRET_PATTERNS:
                value = pattern.sub(_mask_keeping_prefix, value)
        return value

    def content(self, value: str) -> str:
        """A user's or the model's text, for LOG_CONTENT=true: truncated, then masked."""
        value = self.text(value[:CONTENT_LOG_CHARS])
        for pattern in _PII_PATTERNS:
            value = pattern.sub(MASK, value)
        return value

    def any(self, value: Any, depth: int = 0) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if depth > 8:
            return MASK  # deeper than anything we log: refuse rather than walk it
        if isinstance(value, dict):
            return {self.text(str(k)): self.any(v, depth + 1) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self.any(v, depth + 1) for v in value]
        if value is None or isinstance(value, bool | int | float):
            return value
        return self.text(str(value))


def _mask_emails(value: str) -> str:
    """Every e-mail address masked: the same matches as substituting the one pattern
    `[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\\.[A-Za-z]{2,}`, in time linear in `value`."""
    out: list[str] = []
    done = 0  # where the last match ended: the next starts no earlier
    while True:
        # Where a match ended inside a run of local-part characters, the rest of the run may start one.
        match = _EMAIL_TAIL.match(value, done) if done else None
        match = match or _EMAIL.search(value, done)
        if match is None:
            return "".join(out) + value[done:] if out else value
        out += (value[done : match.start()], MASK)
        done = match.end()


def _may_hold_secret(value: str) -> bool:
    """False only when no _SECRET_PATTERNS can match: each needs one of these substrings. Most of
    what we log has none, and the regular expressions were most of a log line's cost."""
    if "sk-" in value:
        return True
    # The two letters that case-insensitive matching takes for "i" but lower() does not turn into it.
    low = value.lower().replace("\u0131", "i").replace("\u0307", "")
    return "bearer" in low or "authorization" in low or ("api" in low and "key" in low)


def _mask_keeping_prefix(match: re.Match[str]) -> str:
    # Keep "Authorization: " or "api_key=" so the line still says what was there.
    prefix = match.group(1) if match.re.groups else ""
    return prefix + MASK


class CorrelationIdFilter(logging.Filter):
    """Copies the current request's correlation id onto every record, and its trace's ids when it has
    one: OpenTelemetry keeps the current span in the context, as we keep the correlation id."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.correlation_id = correlation_id.get()
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            record.trace_id = format(span.trace_id, "032x")
            record.span_id = format(span.span_id, "016x")
        return True


class RedactionFilter(logging.Filter):
    """Masks secrets in the message, the extra fields and the traceback of every record (note 2)."""

    def __init__(self, name: str = "", redactor: Redactor | None = None) -> None:
        super().__init__(name)
        self.redactor = redactor or Redactor()

    def filter(self, record: logging.LogRecord) -> bool:
        redact = self.redactor
        record.msg = redact.text(record.getMessage())
        record.args = None
        if record.exc_info:
            # Render the traceback here so that the formatter prints our masked copy.
            record.exc_text = redact.text(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = redact.text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact.text(record.stack_info)
        for key, value in list(record.__dict__.items()):
            if key not in _RECORD_ATTRS and key not in _OURS:
                setattr(record, key, redact.any(value))
        return True


_OURS = frozenset({"correlation_id", "trace_id", "span_id"})  # set by our filter: nothing to mask


def text_fingerprint(text: str) -> dict[str, Any]:
    """What we log of a user's text by default: its length and a short hash, never the text."""
    return {"message_chars": len(text), "message_sha256": hashlib.sha256(text.encode()).hexdigest()[:12]}


class ConsoleFormatter(logging.Formatter):
    """One line per record for a terminal: time, level, event, correlation id, then the fields as
    key=value. The same records as JSON, after the same filters (so masked alike)."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRS and k not in _NOT_FIELDS}
        when = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        rid = getattr(record, "correlation_id", None) or "-"
        line = f"{when} {record.levelname:<7} {record.getMessage()} [{rid}]"
        line += "".join(f" {key}={_console_value(value)}" for key, value in fields.items())
        if record.exc_text:
            line += "\n" + record.exc_text
        return line


_NOT_FIELDS = frozenset({"correlation_id", "color_message"})


def _console_value(value: Any) -> str:
    if isinstance(value, str) and value and not any(c.isspace() or c in '"=' for c in value):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def configure_logging(level: str = "INFO", secrets: Iterable[str] = (), log_format: str = "json") -> None:
    """`log_format`: "json" or "console" (chatsvc's LOG_FORMAT, "auto" resolved by its caller)."""
    library_level = _at_least("INFO", level)  # note 1
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "filters": {
                "correlation_id": {"()": CorrelationIdFilter},
                "redaction": {"()": RedactionFilter, "redactor": Redactor(secrets)},
            },
            "formatters": {
                "json": {
                    "()": "pythonjsonlogger.json.JsonFormatter",
                    # pid: with several workers, which one wrote the line.
                    "fmt": ["levelname", "name", "message", "correlation_id", "process"],
                    "rename_fields": {"levelname": "level", "name": "logger", "message": "event", "process": "pid"},
                    "timestamp": "timestamp",
                    # uvicorn's ANSI-coloured copy of the message is noise in JSON.
                    "reserved_attrs": [*RESERVED_ATTRS, "color_message"],
                },
                "console": {"()": ConsoleFormatter},
            },
            "handlers": {
                "stdout": {
                    "class": "logging.StreamHandler",
                    "stream": "ext://sys.stdout",
                    "formatter": log_format,
                    "filters": ["correlation_id", "redaction"],
                }
            },
            "root": {"level": level, "handlers": ["stdout"]},
            "loggers": {
                # uvicorn's own config gives these handlers of their own; send them through ours.
                "uvicorn": {"level": level, "handlers": [], "propagate": True},
                "uvicorn.error": {"level": level, "handlers": [], "propagate": True},
                "uvicorn.access": {"level": level, "handlers": [], "propagate": True},
                **{name: {"level": library_level} for name in CONTENT_BEARING_LOGGERS if name not in HTTPX_LOGGERS},
                **{name: {"level": _quiet_httpx(level)} for name in HTTPX_LOGGERS},  # notes 1 and 3
            },
        }
    )


def _quiet_httpx(level: str) -> str:
    """WARNING at LOG_LEVEL=INFO and above; at DEBUG its request lines show, at INFO (note 1)."""
    return "INFO" if logging.getLevelName(level) < logging.INFO else _at_least("WARNING", level)


def _at_least(floor: str, level: str) -> str:
    return floor if logging.getLevelName(level) < logging.getLevelName(floor) else level
