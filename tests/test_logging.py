"""Logs: one JSON object per line with the agreed fields, the agreed events, no user text by default,
and no secret at any level, the libraries' records included; for a terminal, one readable line."""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import re
import select
import signal
import subprocess
import sys
from datetime import datetime
from typing import Any

import httpx
import pytest
from pythonjsonlogger.json import JsonFormatter

from logging_conf import MASK, ConsoleFormatter, RedactionFilter, Redactor, configure_logging, correlation_id
from tests.helpers import ROOT, Service, StartService, free_port, wait_until_answers

PRIVATE_MESSAGE = "my private words about the merger, call +1 415 555 0100 or mail jane.doe@example.com"


def test_every_line_is_json_with_the_common_fields(service: Service) -> None:
    service.chat({"message": "hi"}, {"X-Request-ID": "fields-1"})
    service.wait_for_log("request_completed", "fields-1")

    records = service.logs()  # raises if any line is not JSON
    assert records
    for record in records:
        assert {"timestamp", "level", "logger", "event", "correlation_id"} <= set(record), record
        assert datetime.fromisoformat(record["timestamp"]).utcoffset().total_seconds() == 0  # type: ignore[union-attr]
        assert "color_message" not in record


def test_a_request_writes_our_five_lines_and_no_copy_of_them_from_httpx(service: Service) -> None:
    """At INFO, httpx's own line per upstream request is left out (logging_conf note 3): it repeats
    upstream_opened, and every line costs CPU per stream."""
    service.chat({"message": "hi"}, {"X-Request-ID": "five-1"})
    service.wait_for_log("request_completed", "five-1")

    mine = [r for r in service.logs() if r["correlation_id"] == "five-1"]
    assert [r["event"] for r in mine] == [
        "request_received", "chat_request", "upstream_opened", "first_token", "request_completed"
    ]  # fmt: skip


def test_request_events_carry_their_fields(service: Service) -> None:
    service.chat({"message": "fake:deltas=3"}, {"X-Request-ID": "ev-1"})
    completed = service.wait_for_log("request_completed", "ev-1")

    assert completed["status"] == 200
    assert completed["finish_reason"] == "stop"
    assert completed["completion_tokens"] == 3
    assert completed["total_tokens"] == completed["prompt_tokens"] + 3
    assert completed["usage_source"] == "upstream"
    assert completed["duration_ms"] >= completed["ttft_ms"] > 0
    assert service.wait_for_log("first_token", "ev-1")["ttft_ms"] > 0
    opened = service.wait_for_log("upstream_opened", "ev-1")
    assert opened["retries"] == 0


def test_failures_are_logged_with_code_status_and_exception(service: Service) -> None:
    service.chat({"message": "fake:deltas=3,die_after=1"}, {"X-Request-ID": "fail-1"})
    failed = service.wait_for_log("request_failed", "fail-1")
    assert failed["code"] == "upstream_error"
    assert failed["status"] == 200
    assert failed["exception"] == "APIConnectionError"

    service.chat({"message": ""}, {"X-Request-ID": "fail-2"})
    failed = service.wait_for_log("request_failed", "fail-2")
    assert (failed["code"], failed["status"], failed["exception"]) == ("validation_error", 422, "ServiceError")


def test_user_text_is_not_logged_by_default(service: Service) -> None:
    service.chat({"message": PRIVATE_MESSAGE}, {"X-Request-ID": "priv-1"})
    request = service.wait_for_log("chat_request", "priv-1")

    assert request["message_chars"] == len(PRIVATE_MESSAGE)
    assert re.fullmatch(r"[0-9a-f]{12}", request["message_sha256"])
    assert "merger" not in service.output()


def test_log_content_logs_truncated_masked_text(start_service: StartService) -> None:
    svc: Service = start_service(LOG_CONTENT="true")
    svc.chat({"message": PRIVATE_MESSAGE + " token sk-abcdef123456789 " + "x" * 500}, {"X-Request-ID": "content-1"})
    logged = svc.wait_for_log("chat_request", "content-1")["content"]

    assert logged.startswith("my private words about the merger")
    assert len(logged) < 260
    assert "jane.doe@example.com" not in logged
    assert "555 0100" not in logged
    assert MASK in logged


PASTED_SECRETS = "my key is sk-usertyped0123456789abc and my token Bearer eyJpYXQiOjE3MDB9.c2lnbmF0dXJl"


@pytest.mark.parametrize("log_content", ["false", "true"])
def test_debug_run_never_prints_a_key_or_token(start_service: StartService, log_content: str) -> None:
    """At DEBUG, and with LOG_CONTENT=true (which lets the libraries log request bodies and logs the
    user's text), no configured key, no pasted key and no token reaches stdout or stderr."""
    key = "sk-unique-test-key-3f9a8b7c6d5e4f3a2b1c"
    service_key = "svc-key-9e8d7c6b5a4f"
    svc: Service = start_service(
        LOG_LEVEL="DEBUG", LOG_CONTENT=log_content, OPENAI_API_KEY=key, SERVICE_API_KEYS=service_key, IDLE_TIMEOUT_S="1"
    )
    auth = {"Authorization": f"Bearer {service_key}"}
    client_saw: list[str] = []  # error bodies and events: the grep covers what clients get too
    for message in [
        PRIVATE_MESSAGE,
        PASTED_SECRETS,
        "fake:deltas=3,die_after=1",
        "fake:status=401",  # the fake's error message holds an sk- key
        f"fake:status=500,fail_times=1,key=debug-{log_content}",  # one failed attempt, then the retry
        "fake:deltas=2,error_after=1",
        "fake:deltas=3,stall_after=1",
    ]:
        response, events = svc.chat({"message": message}, auth)
        client_saw.append(response.text if events == [] else json.dumps([e.data for e in events]))
    response, _ = svc.chat({"message": "hi"}, {"Authorization": "Bearer wrong-key-guess-123"})
    client_saw.append(response.text)
    svc.stop()

    output = svc.output() + "\n".join(client_saw)
    assert "upstream_auth" in output  # the scenarios did fail as intended
    assert "request_completed" in output  # the run did log
    # The exchange with the model server, at DEBUG: the request, its answer with both sets of
    # headers (the Authorization header with the key, masked), every read, every write, the retry.
    debug_events = {r["event"] for r in svc.logs()}
    assert {"upstream_request", "upstream_response", "upstream_read", "client_write", "upstream_retry"} <= debug_events
    sent_headers = [r["request_headers"] for r in svc.logs() if r["event"] == "upstream_response"]
    assert sent_headers
    assert all(h["authorization"] == f"Bearer {MASK}" for h in sent_headers)
    statuses = {r["status"] for r in svc.logs() if r["event"] == "upstream_response"}
    assert {200, 401, 500} <= statuses  # the stream, the refusal and the failed attempt before the retry
    for leaked in (key, service_key, "wrong-key-guess-123", "sk-leakedkey123456", "Bearer s", "Bearer eyJ"):
        assert leaked not in output
    for part in ("sk-usertyped0123456789abc", "eyJpYXQiOjE3MDB9", "jane.doe@example.com"):
        assert part not in output
    if log_content == "false":
        assert "merger" not in output
    else:
        assert "merger" in output  # content logging is on: the text is there, masked


# The redaction filter itself, on any record --------------------------------------------------------


@pytest.fixture(params=["json", "console"])
def captured(request: pytest.FixtureRequest) -> Any:
    """Our handler, as configure_logging sets it up (in each format), writing to a buffer."""
    configure_logging("DEBUG", secrets=["exact-secret-value-42"], log_format=request.param)
    formatter = JsonFormatter if request.param == "json" else ConsoleFormatter
    ours = [h for h in logging.getLogger().handlers if isinstance(h.formatter, formatter)]
    assert len(ours) == 1
    handler = ours[0]
    assert isinstance(handler, logging.StreamHandler)
    buffer = io.StringIO()
    handler.setStream(buffer)
    yield buffer.getvalue
    logging.getLogger().removeHandler(handler)


@pytest.mark.parametrize(
    "secret",
    ["sk-proj-abcdefghijklmnop", "exact-secret-value-42", "Bearer eyJhbGciOiJIUzI1NiJ9.e30.abc"],
)
def test_redaction_covers_message_args_extras_and_tracebacks(captured: Any, secret: str) -> None:
    log = logging.getLogger("some.library")
    log.warning("key is %s", secret)
    log.info("nested", extra={"payload": {"headers": [{"authorization": secret}], "deep": {"a": {"b": secret}}}})
    try:
        raise ValueError(f"bad key {secret}")
    except ValueError:
        log.exception("failed")
    out = captured()

    assert out.count(MASK) >= 4
    assert secret not in out
    assert secret.split()[-1] not in out


def test_authorization_header_value_is_masked_whatever_the_scheme() -> None:
    redacted = Redactor().text("headers: {'Authorization': 'Basic dXNlcjpwYXNz'}")
    assert "dXNlcjpwYXNz" not in redacted


@pytest.mark.parametrize(
    "text",
    [
        "AUTHORIZATION: Basic dXNlcjpwYXNz",
        "author\u0130zation=dXNlcjpwYXNz",  # dotted capital I: matches "i" case-insensitively
        "Author\u0131zation: dXNlcjpwYXNz",  # dotless small i: the same
        "BEARER dXNlcjpwYXNz",
        "Api-Key: dXNlcjpwYXNz",
    ],
)
def test_the_quick_check_before_the_patterns_lets_no_spelling_through(text: str) -> None:
    """Redactor skips its patterns for text that cannot match them; every spelling the patterns
    catch must still reach them."""
    assert "dXNlcjpwYXNz" not in Redactor().text(text)


def test_correlation_id_is_on_records_of_any_logger(captured: Any) -> None:
    token = correlation_id.set("ctx-7")
    try:
        logging.getLogger("uvicorn.error").info("hello")
    finally:
        correlation_id.reset(token)
    out = captured()
    assert '"correlation_id": "ctx-7"' in out or "hello [ctx-7]" in out


def test_redacting_a_record_leaves_ordinary_text_alone() -> None:
    record = logging.makeLogRecord({"msg": "served %d requests", "args": (3,), "path": "/chat"})
    assert RedactionFilter(redactor=Redactor(["xyz-secret"])).filter(record)
    assert record.getMessage() == "served 3 requests"
    assert getattr(record, "path", None) == "/chat"


# For people: a terminal gets one readable line per record ------------------------------------------

#: time, level, the message (uvicorn's have spaces), the correlation id in brackets, the fields.
CONSOLE_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) +.+ \[[^\]]+\]")
#: one of our records: its event is one word.
OUR_EVENT = re.compile(r"^\S+ \S+ +([a-z_]+) \[([^\]]+)\](.*)$")


def test_a_terminal_gets_readable_lines(fake_model: Any, tmp_path: Any) -> None:
    """`python chatsvc.py` under a pseudo-terminal (LOG_FORMAT=auto): every line is time, level,
    event, correlation id and the fields, the secrets masked; the same run on a pipe is JSON
    (every other test here reads that)."""
    key = "sk-console-test-key-0123456789abcdef"
    port = free_port()
    env = {"PATH": os.environ["PATH"], "OPENAI_BASE_URL": fake_model.base_url, "OPENAI_API_KEY": key,
           "HOST": "127.0.0.1", "PORT": str(port)}  # fmt: skip
    terminal, child_end = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "chatsvc.py")], cwd=tmp_path, env=env,
        stdin=subprocess.DEVNULL, stdout=child_end, stderr=child_end,
    )  # fmt: skip
    os.close(child_end)
    output = b""
    try:
        wait_until_answers(f"http://127.0.0.1:{port}/healthz", 30, proc)
        body = {"message": f"my key is {key}"}
        with httpx.Client(timeout=30) as client:
            assert client.post(f"http://127.0.0.1:{port}/chat", json=body, headers={"X-Request-ID": "tty-1"}).is_success
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        while select.select([terminal], [], [], 5)[0]:
            try:
                chunk = os.read(terminal, 65536)
            except OSError:  # EIO: the child's end is closed, everything has been read
                break
            if not chunk:
                break
            output += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(terminal)
    lines = output.decode().replace("\r\n", "\n").splitlines()
    assert lines
    assert [line for line in lines if not CONSOLE_LINE.match(line)] == []
    events = {(m[1], m[2]): m[3] for m in map(OUR_EVENT.match, lines) if m}
    assert events[("service_started", "-")].startswith(" model=gpt-4o-mini ")
    assert events[("request_received", "tty-1")] == " method=POST path=/chat"
    assert "status=200" in events[("request_completed", "tty-1")]
    assert key not in output.decode()
