"""The chat page at GET /, driven in headless Chromium (Debian's chromium and chromium-driver, put
there by tests/install-debian.sh) against chatsvc and the fake model."""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.webdriver import Chrome as WebDriver  # Chromium's driver: it has get_log()
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from tests import chromium
from tests.fake_model import FakeModel, expected_text
from tests.helpers import ROOT, UI_STREAM_END, Service, StartService, follow, text_of, ui_chunks, ui_text_of

pytestmark = pytest.mark.slow

SCREENSHOT = ROOT / "docs" / "chat-page.png"


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    yield from chromium.browser(tmp_path_factory)


@pytest.fixture
def page(browser: WebDriver, service: Service) -> WebDriver:
    browser.get(f"{service.url}/")
    browser.execute_script("sessionStorage.clear()")  # the page keeps the conversation there
    browser.get(f"{service.url}/")
    chromium.console(browser)  # start each test with an empty console
    return browser


def ask(driver: WebDriver, message: str) -> None:
    box = driver.find_element(By.ID, "message")
    box.send_keys(message)
    box.send_keys(Keys.ENTER)


def last_answer(driver: WebDriver) -> Any:
    return driver.find_elements(By.CSS_SELECTOR, ".turn.assistant")[-1]


def wait(driver: WebDriver, condition: Any, timeout: float = 20) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.02).until(condition)


def answer_text(driver: WebDriver) -> str:
    # textContent, not .text: the exact characters inserted, not a rendering of them.
    text: str = last_answer(driver).find_element(By.CSS_SELECTOR, ".content").get_attribute("textContent")
    return text


def finished(driver: WebDriver) -> bool:
    return bool(last_answer(driver).find_elements(By.CSS_SELECTOR, ".meta"))


def test_answer_streams_in_and_ends_with_usage(page: WebDriver) -> None:
    message = "fake:deltas=30,delay=0.1"
    ask(page, message)

    # Watch the answer while it streams: it must grow before the stream is over.
    seen: list[str] = []
    while not finished(page):
        text = answer_text(page)
        if text and (not seen or text != seen[-1]):
            seen.append(text)
        time.sleep(0.02)  # sampling the page as it renders: the growth itself is what is measured
    assert len(seen) >= 3, seen
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(seen))

    assert answer_text(page) == expected_text(message)
    note = last_answer(page).find_element(By.CSS_SELECTOR, ".meta").text
    assert re.search(r"30 tokens \(upstream\), first token [\d.]+ ms, [\d.]+ ms in all · stop", note), note
    assert page.switch_to.active_element.get_attribute("id") == "message"  # focus back for the next turn
    assert not [entry for entry in chromium.console(page) if entry["level"] == "SEVERE"]


def test_history_is_sent_with_the_next_message(page: WebDriver, fake_model: FakeModel) -> None:
    ask(page, "first question")
    wait(page, finished)
    ask(page, "second question")
    wait(page, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".meta")) == 2)

    messages = fake_model.last().body["messages"]
    assert [m["content"] for m in messages[1:]] == [
        "first question",
        expected_text("first question"),
        "second question",
    ]


@pytest.mark.parametrize(
    ("message", "code"),
    [("fake:deltas=5,die_after=2", "upstream_error"), ("fake:status=401", "upstream_auth")],
    ids=["mid-stream", "before-the-stream"],
)
def test_errors_show_their_three_parts_and_the_correlation_id(
    page: WebDriver, service: Service, message: str, code: str
) -> None:
    ask(page, message)
    error = wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, ".turn.error"))[-1]

    text = error.text
    for label in ("Error", "Why", "What to do", "Code", "Correlation id"):
        assert label in text
    assert code in text
    correlation_id = error.find_element(By.CSS_SELECTOR, ".correlation-id").text
    assert re.fullmatch(r"[0-9a-f-]{36}", correlation_id)
    assert service.wait_for_log("request_failed", correlation_id)["code"] == code


def test_html_in_an_answer_is_shown_as_text(page: WebDriver) -> None:
    hostile = "<script>window.pwned=1</script>|<img src=x onerror=window.pwned=2>|<b>bold</b>"
    ask(page, f"fake:text={hostile}")
    wait(page, finished)

    assert answer_text(page) == hostile.replace("|", "")
    assert page.execute_script("return window.pwned") is None
    assert not page.find_elements(By.CSS_SELECTOR, "#log img, #log b, #log script")


def test_stop_closes_the_upstream_connection(page: WebDriver, service: Service, fake_model: FakeModel) -> None:
    ask(page, "fake:deltas=10,stall_after=2")
    wait(page, lambda d: answer_text(d) == "w0 w1 ")
    upstream = fake_model.last()

    page.find_element(By.ID, "stop").click()

    assert upstream.closed.wait(5), "the model server's connection stayed open after Stop"
    wait(page, lambda d: "Stopped." in last_answer(d).text)
    assert "cancelled" in last_answer(page).text  # the done event of the DELETE the page sent
    assert service.wait_for_log("stream_cancelled")
    assert page.find_element(By.ID, "send").is_enabled()
    assert not page.find_element(By.ID, "stop").is_enabled()


#: What the answer shows, its stream id, and a click on Stop, in one task of the page: no delta is
#: shown in between.
SHOWN_THEN_STOP = """
const answers = document.querySelectorAll(".turn.assistant .content");
const shown = answers[answers.length - 1].textContent;
const streamId = JSON.parse(sessionStorage.getItem("chatsvc")).pending.streamId;
document.getElementById("stop").click();
return [shown, streamId];
"""


def test_a_stop_and_a_reload_show_exactly_what_was_shown_at_the_stop(page: WebDriver, service: Service) -> None:
    """Note 22: the page names the last event it showed in its DELETE, and shows nothing after it.
    A fast answer, so that deltas are on their way (and appended) while the DELETE is."""
    ask(page, "fake:deltas=600,delay=0.005,usage=0")
    wait(page, lambda d: len(answer_text(d).split()) >= 20)
    shown, stream_id = page.execute_script(SHOWN_THEN_STOP)

    wait(page, lambda d: "Stopped." in last_answer(d).text)
    assert answer_text(page) == shown
    assert "cancelled" in last_answer(page).text
    # The service's answer, as any resume (a reload during the stop, another tab) replays it.
    replay = follow(service, stream_id)
    assert text_of(replay) == shown
    assert replay[-1].data["finish_reason"] == "cancelled"
    assert replay[-1].data["usage"]["completion_tokens"] == len(shown.split())

    page.refresh()  # the stopped answer stays in the conversation, as it was shown
    wait(page, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".turn")) == 2)
    assert answer_text(page) == shown
    assert not [entry for entry in chromium.console(page) if entry["level"] == "SEVERE"]


def test_reload_mid_answer_resumes_and_shows_the_whole_answer(page: WebDriver, fake_model: FakeModel) -> None:
    message = "fake:deltas=40,delay=0.05"
    ask(page, "first question")
    wait(page, finished)
    ask(page, message)
    wait(page, lambda d: len(answer_text(d).split()) >= 3)
    seen = len(fake_model.requests)

    page.refresh()  # the fetch dies with the page; the service keeps the stream for RESUME_GRACE_S

    wait(page, finished)
    assert answer_text(page) == expected_text(message)
    assert "stop" in last_answer(page).text  # the done event's finish_reason
    assert len(fake_model.requests) == seen  # resumed, not asked again
    turns = page.find_elements(By.CSS_SELECTOR, ".turn")
    assert [t.find_element(By.CSS_SELECTOR, ".content").text for t in turns[:2]] == [
        "first question",
        expected_text("first question"),
    ]
    page.refresh()  # the answer is over: the page shows the conversation and resumes nothing
    wait(page, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".turn")) == 4)
    assert answer_text(page) == expected_text(message)


#: What the AI SDK's DefaultChatTransport does in a page (fetch with its default credentials,
#: same-origin): POST /api/chat, read until the first text delta, then drop the request.
SEND_AND_DROP = """
const [message, done] = arguments;
(async () => {
  const abort = new AbortController();
  const body = {id: "browser-chat", trigger: "submit-message",
                messages: [{id: "u1", role: "user", parts: [{type: "text", text: message}]}]};
  const sent = await fetch("/api/chat", {method: "POST", headers: {"content-type": "application/json"},
                                         body: JSON.stringify(body), signal: abort.signal});
  const reader = sent.body.getReader(), decoder = new TextDecoder();
  let read = "";
  while (!read.includes("text-delta")) read += decoder.decode((await reader.read()).value, {stream: true});
  abort.abort();
  done({status: sent.status, cookies: document.cookie});
})().catch((err) => done({error: String(err)}));
"""
#: ... and its reconnectToStream.
RECONNECT = """
const done = arguments[0];
fetch("/api/chat/browser-chat/stream").then(async (r) => done({status: r.status, text: await r.text()}),
                                            (err) => done({error: String(err)}));
"""


def test_a_same_origin_ai_sdk_chat_resumes_with_its_owner_cookie(page: WebDriver, service: Service) -> None:
    """Chromium keeps the owner cookie that POST /api/chat sets and sends it with the reconnect, with
    no code in the page; the page's scripts cannot read it; without it the chat is not there (note 21)."""
    message = "fake:deltas=30,delay=0.05"
    page.set_script_timeout(30)
    sent = page.execute_async_script(SEND_AND_DROP, message)
    assert sent == {"status": 200, "cookies": ""}  # HttpOnly: not in document.cookie
    stranger = httpx.get(f"{service.url}/api/chat/browser-chat/stream", timeout=30)  # the id alone
    assert (stranger.status_code, stranger.content) == (204, b"")
    resumed = page.execute_async_script(RECONNECT)
    assert resumed["status"] == 200, resumed
    chunks = [c for c in ui_chunks(resumed["text"]) if c != UI_STREAM_END]
    assert ui_text_of(chunks) == expected_text(message)
    assert chunks[-1]["type"] == "finish"


def test_page_is_usable_at_320_px_and_labelled(page: WebDriver) -> None:
    for field in ("message", "key"):
        assert page.find_elements(By.CSS_SELECTOR, f"label[for={field}]")
    page.set_window_size(320, 640)
    try:
        inner = page.execute_script("return document.documentElement.clientWidth")
        wide = page.execute_script("return document.documentElement.scrollWidth")
        assert wide <= inner, f"the page scrolls sideways at 320 px ({wide} > {inner})"
        ask(page, "Hello! What can you do?")
        wait(page, finished)
        if os.environ.get("UPDATE_SCREENSHOT") == "1":  # refresh the README's picture
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.set_window_size(900, 700)
            page.save_screenshot(str(SCREENSHOT))
    finally:
        page.set_window_size(900, 700)


def test_page_is_served_with_a_strict_csp(service: Service) -> None:
    response = httpx.get(f"{service.url}/")
    policy = response.headers["content-security-policy"]

    assert response.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in policy
    assert "connect-src 'self'" in policy
    assert "unsafe-inline" not in policy
    assert "http" not in policy  # nothing from any other origin
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=", response.text)  # nothing fetched at all


def test_page_can_be_turned_off(start_service: StartService) -> None:
    svc: Service = start_service(SERVE_PAGE="false")
    response = httpx.get(f"{svc.url}/")
    assert response.status_code == 404
    assert httpx.get(f"{svc.url}/healthz").status_code == 200


def test_screenshot_in_the_readme_exists() -> None:
    assert SCREENSHOT.exists()
    assert Path(ROOT / "README.md").read_text().count("docs/chat-page.png") == 1
