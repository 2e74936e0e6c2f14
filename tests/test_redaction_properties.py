"""Property tests for the redaction: generated keys, tokens, e-mail addresses and configured
secrets, put in any part of any record (message, arguments, extra fields at any nesting, dict keys,
exception messages) with any text around them, never reach the output."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pythonjsonlogger.json import JsonFormatter

from logging_conf import MASK, Redactor, _mask_emails, configure_logging

CONFIGURED = "cfg-secret-Zq81xWm4Lp"

keys = st.from_regex(r"sk-(proj-)?[A-Za-z0-9_\-]{20,60}", fullmatch=True)
bearers = st.from_regex(r"[A-Za-z0-9._~+/=\-]{8,60}", fullmatch=True).map(lambda token: f"Bearer {token}")
emails = st.from_regex(r"[a-z0-9._%+\-]{1,20}@[a-z0-9\-]{1,15}\.(com|org|net|io|de)", fullmatch=True)
secrets = st.one_of(keys, bearers, emails, st.just(CONFIGURED))
around = st.text(alphabet=st.characters(codec="ascii", exclude_categories=["Cc"]), max_size=20)


def nest(value: Any) -> st.SearchStrategy[Any]:
    """The value, wrapped in up to four levels of lists and dicts under generated keys."""
    return st.recursive(
        st.just(value),
        lambda inner: st.one_of(
            st.lists(inner, min_size=1, max_size=2),
            st.dictionaries(st.text(max_size=6), inner, min_size=1, max_size=2),
        ),
        max_leaves=4,
    )


@pytest.fixture(scope="module")
def output() -> Iterator[io.StringIO]:
    configure_logging("DEBUG", secrets=[CONFIGURED])
    (handler,) = [h for h in logging.getLogger().handlers if isinstance(h.formatter, JsonFormatter)]
    assert isinstance(handler, logging.StreamHandler)
    buffer = io.StringIO()
    handler.setStream(buffer)
    yield buffer
    logging.getLogger().removeHandler(handler)


def secret_parts(secret: str) -> list[str]:
    """What must not appear: the secret, and for a bearer token the token alone."""
    return [secret, secret.removeprefix("Bearer ")]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(secret=secrets, before=around, after=around, data=st.data())
def test_no_secret_reaches_the_output(output: io.StringIO, secret: str, before: str, after: str, data: Any) -> None:
    # The text around may hold what is asked not to appear (a token of 8 zeros after "00000000"):
    # then the output rightly holds it too. Found by hypothesis on 2026-12-02.
    assume(not any(part in before or part in after for part in secret_parts(secret)))
    text = f"{before}{secret}{after}"
    log = logging.getLogger(data.draw(st.sampled_from(["chatsvc", "uvicorn.error", "openai", "some.lib"])))
    where = data.draw(st.sampled_from(["message", "argument", "extra", "key", "exception"]))
    output.seek(0)
    output.truncate()

    if where == "message":
        log.warning(text)
    elif where == "argument":
        log.warning("value: %s", data.draw(nest(text)))
    elif where == "extra":
        log.warning("event", extra={"field": data.draw(nest(text))})
    elif where == "key":
        log.warning("event", extra={"field": {text: 1}})
    else:
        try:
            raise ValueError(text)
        except ValueError:
            log.exception("failed")

    written = output.getvalue()
    assert written  # the record was written
    for part in secret_parts(secret):
        assert part not in written, (where, written)


# Linear time: the e-mail search, and adversarial texts of 64 KiB (logging_conf note 4) -----------

EMAIL_AS_ONE_PATTERN = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}")


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="ab1._-+@ :/x", max_size=40))
def test_emails_are_masked_exactly_where_the_one_pattern_matches(text: str) -> None:
    """The linear search finds what the single (quadratic) pattern finds, no more, no less."""
    assert _mask_emails(text) == EMAIL_AS_ONE_PATTERN.sub(MASK, text)


ADVERSARIAL = [
    "a@" * 32 * 1024,
    "a" * 64 * 1024 + "@",
    "@" + "a." * 32 * 1024,
    "a@" + "a." * 32 * 1024 + "1",
    "sk-" * 21 * 1024,
    "bearer " * 9 * 1024 + " " * 1024,
    "Authorization: " + "a" * 64 * 1024 + ",",
    "api_key=" * 8 * 1024,
    "a_" * 32 * 1024 + "@x.io",
]


@pytest.mark.parametrize("hostile", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_a_secret_after_64_kib_of_near_misses_is_still_masked(hostile: str) -> None:
    redactor = Redactor()
    for secret in ("jane.doe@example.com", "sk-" + "k" * 24, "Bearer tok3n-tok3n"):
        masked = redactor.text(f"{hostile} {secret} tail")
        assert secret.removeprefix("Bearer ") not in masked
        assert masked.endswith(" tail")
