"""The circuit breaker of one model server (note 22), by itself: only the one trial after a
cool-down closes or reopens it, whatever other attempts in flight report meanwhile."""

from __future__ import annotations

import time
from collections.abc import Iterator

import anyio
import pytest

import chatsvc
from metrics import Metrics

COOLDOWN_S = 0.05


@pytest.fixture
def upstream() -> Iterator[chatsvc.Upstream]:
    settings = chatsvc.Settings(
        OPENAI_BASE_URL="http://127.0.0.1:9/v1", BREAKER_FAILURES=1, BREAKER_COOLDOWN_S=COOLDOWN_S, _env_file=None
    )
    server = chatsvc.Upstream(settings.upstreams[0], settings, Metrics())
    yield server
    anyio.run(server.client.close)


def cool_down() -> None:
    time.sleep(COOLDOWN_S * 1.5)  # the cool-down is a stretch of time: there is no event to await


def test_an_attempt_admitted_before_the_breaker_opened_cannot_free_the_trial(upstream: chatsvc.Upstream) -> None:
    earlier = upstream.admit()  # a long stream, admitted while closed
    assert earlier is False
    upstream.failed(trial=False)  # another attempt fails: open
    assert upstream.admit() is None
    cool_down()
    assert upstream.admit() is True  # the trial
    upstream.untried(trial=earlier)  # the earlier attempt ends without a word on the server
    assert upstream.admit() is None, "a second trial while the first is in flight"


def test_a_failed_trial_reopens_for_a_whole_cool_down(upstream: chatsvc.Upstream) -> None:
    upstream.failed(trial=False)
    cool_down()
    assert upstream.admit() is True
    upstream.untried(trial=False)  # a stale attempt's word changes nothing
    upstream.failed(trial=True)
    assert upstream.admit() is None
    assert not upstream.ready


def test_an_answering_trial_closes_it(upstream: chatsvc.Upstream) -> None:
    upstream.failed(trial=False)
    cool_down()
    assert upstream.admit() is True
    upstream.succeeded()
    assert upstream.admit() is False
    assert upstream.ready


def test_a_trial_that_said_nothing_lets_the_next_request_try(upstream: chatsvc.Upstream) -> None:
    upstream.failed(trial=False)
    cool_down()
    assert upstream.admit() is True
    upstream.untried(trial=True)  # stopped by its client before the first content
    assert upstream.admit() is True
