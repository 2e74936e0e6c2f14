"""Fixtures: the fake model server, and chatsvc run for real (`python chatsvc.py`, uvicorn and all)
in a child process, because streaming behaviour (disconnects, pings, timeouts, SIGTERM) cannot be
seen through TestClient, which buffers whole bodies. A chatsvc process lives as long as the fixture
that started it: the test's (`start_service`) or the module's (`start_module_service`), so that only
a few run at once."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.fake_model import FakeModel
from tests.helpers import Service, StartService

STOP_LIMIT_S = 5


@pytest.fixture(scope="session")
def fake_model() -> Iterator[FakeModel]:
    fake = FakeModel().start()
    yield fake
    fake.stop()


@contextmanager
def services(fake_model: FakeModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartService]:
    """A `StartService` against the fake model; every process it started is stopped on the way out."""
    started: list[Service] = []

    def start(**env: str) -> Service:
        # The fake model fails on purpose, test after test: no breaker, unless a test asks for one.
        settings = {
            "OPENAI_BASE_URL": fake_model.base_url,
            "OPENAI_API_KEY": "sk-test-key-not-real-000000",
            "BREAKER_FAILURES": "0",
            **env,
        }
        settings = {k: v for k, v in settings.items() if v != "<unset>"}
        service = Service(settings, tmp_path_factory.mktemp("svc"))
        started.append(service)
        return service.start()

    try:
        yield start
    finally:
        running = [s for s in started if s.proc is not None]
        for service in running:  # all told at once, so that their drains overlap
            service.signal()
        for service in running:
            # A stream a test left open would hold the drain for SHUTDOWN_GRACE_S; nothing is
            # asserted after the test, so that is not waited for.
            service.exited(timeout=STOP_LIMIT_S)


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that starts chatsvc processes of its own is slow: a start takes 3-15 s on a busy
    2-core machine. `make check` leaves such tests out; module fixtures share theirs."""
    for item in items:
        if "start_service" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def start_service(fake_model: FakeModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartService]:
    """Start chatsvc processes for this test alone: they are stopped when it ends (and the test is
    marked slow)."""
    with services(fake_model, tmp_path_factory) as start:
        yield start


@pytest.fixture(scope="module")
def start_module_service(fake_model: FakeModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartService]:
    """Start chatsvc processes for a module's fixtures: they are stopped when the module ends."""
    with services(fake_model, tmp_path_factory) as start:
        yield start


@pytest.fixture(scope="session")
def service(fake_model: FakeModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The shared service, against the fake model: one process for the whole session, for every
    test that needs no settings of its own."""
    with services(fake_model, tmp_path_factory) as start:
        yield start(ALLOWED_MODELS="gpt-4o-mini,other-model", SYSTEM_PROMPT="You are terse.")
