"""Real SSE clients that nobody here wrote, from npm (tests/js/package.json and its lockfile, which
`make test` installs with `npm ci`), resuming through a proxy that cuts the connection (note 11):

- @microsoft/fetch-event-source, the most used SSE client that can POST: its own retry repeats the
  POST with Last-Event-ID. It takes an event's id as soon as it reads the `id:` line, so chatsvc
  sends that line last, after the data: a cut anywhere before it leaves the previous id.
- eventsource, the WHATWG EventSource as browsers implement it, on GET /chat/streams/{id}: it
  reconnects by itself, and stops when the service answers 204 after the terminal event.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cutting_proxy import CutAt, CuttingProxy, at_marker
from tests.fake_model import FakeModel, expected_text
from tests.helpers import ROOT, Service, StartService, iter_sse

pytestmark = pytest.mark.slow

JS = ROOT / "tests" / "js"
ANSWER = "fake:deltas=40,delay=0.05"  # 2 s: the cut falls while the model still talks

CUTS: dict[str, CutAt] = {
    # The third delta's bytes: before them, inside its data line, inside its id line.
    "between-events": at_marker(b"event: delta", 3, 0),
    "inside-the-data-line": at_marker(b"event: delta", 3, len(b'event: delta\r\ndata: {"con')),
    "inside-the-id-line": at_marker(b"\r\nid: ", 4, 10),
}


def node(script: str, *args: str) -> dict[str, Any]:
    assert (JS / "node_modules").is_dir(), "run `npm ci --prefix tests/js` (make test does)"
    done = subprocess.run(
        ["node", str(JS / script), *args], cwd=JS, capture_output=True, text=True, timeout=90, check=False
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.fixture(scope="module")
def chatsvc(start_module_service: StartService) -> Service:
    svc: Service = start_module_service(RESUME_GRACE_S="30", PING_INTERVAL_S="0.2")  # pings between events too
    return svc


@pytest.fixture
def proxy(request: pytest.FixtureRequest, chatsvc: Service) -> Iterator[CuttingProxy]:
    cutting = CuttingProxy(chatsvc.port, CUTS[request.param]).start()
    yield cutting
    cutting.stop()


def assert_whole_once(events: list[dict[str, Any]], message: str) -> None:
    """The answer exactly once: contiguous ids from 0, the text whole, one terminal event, last."""
    stream_id = events[0]["data"]["stream_id"]
    assert [e["id"] for e in events] == [f"{stream_id}:{i}" for i in range(len(events))]
    assert "".join(e["data"]["content"] for e in events if e["event"] == "delta") == expected_text(message)
    assert [e["event"] for e in events].count("done") + [e["event"] for e in events].count("error") == 1
    assert events[-1]["event"] == "done"


@pytest.mark.parametrize("proxy", list(CUTS), indirect=True)
def test_fetch_event_source_resumes_a_cut_post_by_its_own_retry(
    proxy: CuttingProxy, chatsvc: Service, fake_model: FakeModel
) -> None:
    seen = len(fake_model.requests)
    result = node("fetch_event_source.mjs", f"http://127.0.0.1:{proxy.port}/chat", ANSWER)

    assert proxy.cut_done.is_set()
    assert result["statuses"] == [200, 200]  # cut once, resumed once
    assert result["errors"] == 1
    assert_whole_once(result["events"], ANSWER)
    assert len(fake_model.requests) == seen + 1  # one generation: the retry resumed it
    stream_id = result["events"][0]["data"]["stream_id"]
    resumed = [r for r in chatsvc.logs() if r["event"] == "stream_resumed" and r.get("stream_id") == stream_id]
    assert [r["via"] for r in resumed] == ["post"]


@pytest.mark.parametrize("proxy", ["inside-the-data-line"], indirect=True)
def test_eventsource_resumes_a_cut_follow_and_stops_after_the_terminal_event(
    proxy: CuttingProxy, chatsvc: Service, fake_model: FakeModel
) -> None:
    seen = len(fake_model.requests)
    # The chat starts elsewhere (a tab that closed at once); EventSource follows it from the start.
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", f"{chatsvc.url}/chat", json={"message": ANSWER}, headers={"X-Request-ID": "es-1"}) as r,
    ):
        stream_id = r.headers["x-stream-id"]
        assert next(iter_sse(r)).event == "meta"
    chatsvc.wait_for_log("stream_detached", "es-1")

    result = node("eventsource.mjs", f"http://127.0.0.1:{proxy.port}/chat/streams/{stream_id}")

    assert proxy.cut_done.is_set()
    assert_whole_once(result["events"], ANSWER)
    path = f"/chat/streams/{stream_id}"
    seen_here = [
        (r["event"], r.get("status"), r.get("from_seq"))
        for r in chatsvc.logs()
        if r.get("path") == path or r.get("stream_id") == stream_id
    ]
    assert result["opens"] == 2, "\n".join(map(str, seen_here))  # the first connection, and the resume after the cut
    # A completion names the route's template; the arrival, the path it came with.
    ids = {r["correlation_id"] for r in chatsvc.logs() if r["event"] == "request_received" and r.get("path") == path}
    answered = [r["status"] for r in chatsvc.logs() if r["event"] == "request_completed" and r["correlation_id"] in ids]
    assert answered == [204]  # and a last request, after the terminal event: then it stopped
    assert len(fake_model.requests) == seen + 1
    records = [r for r in chatsvc.logs() if r.get("stream_id") == stream_id and r["event"] == "stream_resumed"]
    assert len(records) == 2  # the first follow (from the start) and the resume after the cut
    assert records[0]["from_seq"] == 0
    assert records[1]["from_seq"] > 0


def test_the_js_clients_are_pinned_by_the_lockfile() -> None:
    """npm ci installs exactly what package-lock.json names: the versions these tests ran against."""
    lock = json.loads((JS / "package-lock.json").read_text())
    manifest = json.loads((JS / "package.json").read_text())
    for name, version in manifest["dependencies"].items():
        assert lock["packages"][f"node_modules/{name}"]["version"] == version
        installed = json.loads(Path(JS / "node_modules" / name / "package.json").read_text())
        assert installed["version"] == version
