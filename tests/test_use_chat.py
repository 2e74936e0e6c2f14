"""React's useChat (@ai-sdk/react) in headless Chromium, talking to chatsvc's POST /api/chat itself:
tests/js/use_chat/page.jsx, written as docs/ai-sdk.md tells a page to be written, bundled here with
esbuild and served from another loopback origin, as a product page would be, with
CORS_ALLOW_ORIGINS naming it. The two origins differ only in their ports, so they are one site:
the owner cookie (SameSite=Lax) travels with `credentials: "include"`."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from selenium.webdriver import Chrome as WebDriver  # Chromium's driver: it has get_log()
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from tests import chromium
from tests.fake_model import FakeModel, expected_text
from tests.helpers import UI_STREAM_END, Service, StartService, iter_ui_chunks, ui_text_of
from tests.test_js_clients import JS

pytestmark = pytest.mark.slow

PAGE = JS / "use_chat"
SLOW_STOP = "fake:deltas=600,delay=0.005,usage=0"  # fast enough that deltas are on their way at the stop


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # a line on stderr per request is noise in the test's output


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The page, bundled with esbuild, served from a loopback origin of its own."""
    root = tmp_path_factory.mktemp("use_chat")
    esbuild = [
        str(JS / "node_modules" / ".bin" / "esbuild"), str(PAGE / "page.jsx"), "--bundle", "--format=esm",
        "--jsx=automatic", '--define:process.env.NODE_ENV="production"', f"--outfile={root / 'page.js'}",
        "--log-level=warning",
    ]  # fmt: skip
    built = subprocess.run(esbuild, cwd=JS, capture_output=True, text=True, timeout=60, check=False)
    assert built.returncode == 0, built.stderr
    shutil.copy(PAGE / "index.html", root)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, name="use-chat-site")
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


@pytest.fixture(scope="module")
def chatsvc(start_module_service: StartService, site: str) -> Service:
    svc: Service = start_module_service(CORS_ALLOW_ORIGINS=site, RESUME_GRACE_S="30")
    return svc


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    yield from chromium.browser(tmp_path_factory)


@pytest.fixture
def page(browser: WebDriver, site: str, chatsvc: Service, request: pytest.FixtureRequest) -> WebDriver:
    """The page on a chat of this test's own, its first resume (nothing to resume) settled."""
    browser.get(f"{site}/?{urlencode({'chat': request.node.name, 'chatsvc': chatsvc.url})}")
    wait(browser, lambda d: reconnects(d) == ["none"])
    chromium.console(browser)  # start each test with an empty console
    return browser


def wait(driver: WebDriver, condition: Any, timeout: float = 30) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.02).until(condition)


def attribute(element: WebElement, name: str) -> str:
    value = element.get_attribute(name)
    assert value is not None, f"no {name}"
    return value


def role(driver: WebDriver, name: str) -> str:
    # textContent, not .text: the exact characters React rendered, not a layout of them.
    return attribute(driver.find_element(By.CSS_SELECTOR, f"[data-role={name}]"), "textContent")


def reconnects(driver: WebDriver) -> list[str]:
    """What each reconnect of useChat's transport found: "none" (204) or "stream"."""
    return role(driver, "reconnects").split()


def messages(driver: WebDriver) -> list[tuple[str, str]]:
    """The conversation as the page shows it: (role, text) of each message."""
    shown = driver.find_elements(By.CSS_SELECTOR, "li[data-role]")
    return [(attribute(m, "data-role"), attribute(m, "textContent")) for m in shown]


def last_answer(driver: WebDriver) -> WebElement | None:
    answers = driver.find_elements(By.CSS_SELECTOR, "li[data-role=assistant]")
    return answers[-1] if answers else None


def answer(driver: WebDriver) -> str:
    """The last answer's text; "" before there is one."""
    last = last_answer(driver)
    return "" if last is None else attribute(last, "textContent")


def metadata(driver: WebDriver) -> Any:
    """The last answer's `message.metadata`, as useChat holds it."""
    last = last_answer(driver)
    assert last is not None
    return json.loads(attribute(last, "data-metadata"))


def ask(driver: WebDriver, message: str) -> None:
    driver.find_element(By.CSS_SELECTOR, "[data-role=input]").send_keys(message)
    driver.find_element(By.CSS_SELECTOR, "[data-role=send]").click()


def shows_answer(text: str) -> Any:
    """The page shows `text` as the last answer, and the chat is ready for the next message."""
    return lambda d: role(d, "status") == "ready" and answer(d) == text


def owner_cookie(driver: WebDriver) -> dict[str, Any]:
    """chatsvc's owner cookie, as the browser keeps it: cookies do not tell ports apart, so the
    page's origin on the same host sees the one that chatsvc's origin set."""
    cookie = driver.get_cookie("chatsvc_owner")
    assert cookie is not None, "the browser kept no owner cookie"
    return cookie


def test_a_message_through_use_chat_shows_the_models_answer(
    page: WebDriver, chatsvc: Service, fake_model: FakeModel
) -> None:
    message = "fake:deltas=5"
    ask(page, message)

    wait(page, shows_answer(expected_text(message)))
    assert messages(page) == [("user", message), ("assistant", expected_text(message))]
    meta = metadata(page)
    assert meta["finish_reason"] == "stop"
    last = last_answer(page)
    assert last is not None
    assert attribute(last, "data-id") == meta["stream_id"]  # the message's id is its stream's
    assert role(page, "error") == ""
    cookie = owner_cookie(page)  # set by chatsvc's cross-origin answer, kept by the browser
    assert (cookie["httpOnly"], cookie["sameSite"]) == (True, "Lax")
    assert not [entry for entry in chromium.console(page) if entry["level"] == "SEVERE"]

    ask(page, "second question")  # the next turn sends the conversation that useChat holds
    wait(page, shows_answer(expected_text("second question")))
    sent = fake_model.last().body["messages"]
    assert [(m["role"], m["content"]) for m in sent] == [
        ("user", message),
        ("assistant", expected_text(message)),
        ("user", "second question"),
    ]
    assert fake_model.last().body["max_tokens"] == 500  # the transport's body: chatsvc's options


def test_a_reload_mid_answer_resumes_and_shows_the_whole_answer_once(
    page: WebDriver, chatsvc: Service, fake_model: FakeModel, request: pytest.FixtureRequest
) -> None:
    """`resume: true`: after a reload, useChat reconnects with GET /api/chat/{id}/stream, which
    replays the answer from its start and follows it live; the replay takes the place of the part
    the page had kept (the message id is the stream id), so the answer is there once, whole."""
    message = "fake:deltas=300,delay=0.02"  # 6 s: still on its way at the reload
    ask(page, message)
    wait(page, lambda d: len(answer(d).split()) >= 5)
    asked = len(fake_model.requests)
    # The cookie that the browser keeps owns the chat: with it, the stream is there; without it, not.
    stream = f"{chatsvc.url}/api/chat/{request.node.name}/stream"
    with httpx.stream("GET", stream, cookies={"chatsvc_owner": owner_cookie(page)["value"]}, timeout=30) as owned:
        assert owned.status_code == 200
        assert next(iter_ui_chunks(owned))["type"] == "start"
    assert httpx.get(stream, timeout=30).status_code == 204

    page.refresh()  # the POST dies with the page; chatsvc keeps the stream for RESUME_GRACE_S

    wait(page, shows_answer(expected_text(message)))
    assert reconnects(page) == ["stream"]  # resumed: the answer was still on its way at the reload
    assert messages(page) == [("user", message), ("assistant", expected_text(message))]
    assert metadata(page)["finish_reason"] == "stop"
    assert len(fake_model.requests) == asked  # resumed, not asked again
    assert not [entry for entry in chromium.console(page) if entry["level"] == "SEVERE"]


#: What the answer shows, and a click on Stop, in one task of the page: no delta is shown in between.
SHOWN_THEN_STOP = """
const answers = document.querySelectorAll("li[data-role=assistant]");
const shown = answers[answers.length - 1].textContent;
document.querySelector("[data-role=stop]").click();
return shown;
"""


def test_a_stop_with_the_documented_handler_shows_what_chatsvc_keeps(
    page: WebDriver, chatsvc: Service, fake_model: FakeModel, request: pytest.FixtureRequest
) -> None:
    """docs/ai-sdk.md's stop handler in useChat: DELETE, awaited, and the stream left to end with
    chatsvc's `abort` chunk, so the page shows exactly the answer that chatsvc keeps, which another
    tab of the same browser, following the chat, sees too. A fast answer, so that deltas are on
    their way while the DELETE is."""
    ask(page, SLOW_STOP)
    wait(page, lambda d: len(answer(d).split()) >= 20)
    upstream = fake_model.last()
    stream = f"{chatsvc.url}/api/chat/{request.node.name}/stream"
    cookies = {"chatsvc_owner": owner_cookie(page)["value"]}
    with httpx.Client(timeout=30, cookies=cookies) as tab, tab.stream("GET", stream) as other_tab:
        assert other_tab.status_code == 200
        shown_at_stop = page.execute_script(SHOWN_THEN_STOP)
        wait(page, lambda d: role(d, "stopped") == "204" and role(d, "status") == "ready")
        followed = [c for c in iter_ui_chunks(other_tab) if c != UI_STREAM_END]

    assert upstream.closed.wait(5), "the model server's connection stayed open after the stop"
    shown = answer(page)
    assert shown.startswith(shown_at_stop)
    assert len(shown.split()) < 600  # stopped
    assert role(page, "error") == ""
    assert ui_text_of(followed) == shown  # what chatsvc keeps
    assert followed[-1] == {"type": "abort", "reason": "cancelled"}
    assert metadata(page)["usage"]["completion_tokens"] == len(shown.split())
    # The page read its stream to the end: a reload's reconnect finds nothing left to send.
    assert httpx.get(stream, cookies=cookies, timeout=30).status_code == 204

    page.refresh()
    wait(page, lambda d: reconnects(d) == ["none"])
    assert messages(page) == [("user", SLOW_STOP), ("assistant", shown)]
    assert not [entry for entry in chromium.console(page) if entry["level"] == "SEVERE"]
