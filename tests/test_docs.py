"""The README and docs/ hold up: every relative link and #anchor resolves, no page carries the
project's history (issue numbers, commit hashes, session words), `.env.example` and the README's
configuration table list the same variables, and the README's curl example gives the stream it
shows, event by event, against a running chatsvc."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ROOT, Service

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6}) +(.+?) *$", re.M)
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
#: What belongs in `git log`, not in a page a user reads.
HISTORY = {
    "an issue number": re.compile(r"\bissues? #?\d+|\bPR #?\d+|(?<![\w/.-])#\d{1,5}\b", re.I),
    "a commit hash": re.compile(
        r"(?<![\w-])(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])(?:[0-9a-f]{7,12}|[0-9a-f]{40})(?![\w-])"
    ),
    "session words": re.compile(r"\bblocked\b|closing note|\bsession history\b|maintainers' call", re.I),
}


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to -."""
    text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {anchor(m.group(2)) for m in HEADING.finditer(text)}


def links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text())
    return [m.group(1) or m.group(2) for m in LINK.finditer(text)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists() or (fragment and resolved.suffix == ".md" and fragment not in anchors(resolved)):
            broken.append(target)
    assert broken == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_page_carries_the_projects_history(page: Path) -> None:
    text = page.read_text()
    found = {what: pattern.findall(text) for what, pattern in HISTORY.items()}
    assert {what: hits for what, hits in found.items() if hits} == {}


def test_the_history_patterns_catch_what_they_are_for() -> None:
    caught = "fixed in issue 12, see #40 and 3a55b5b; blocked, as the closing note says"
    assert all(pattern.search(caught) for pattern in HISTORY.values())
    stream_id = "7447bd3f27fef8768f376d501b06dfc9"  # the README's example ids are not hashes
    uuid = "399e6dea-b624-4096-9935-882256a66ba2"  # nor the correlation ids
    assert not any(pattern.search(f"id: {stream_id}:3 {uuid} docs/api.md#errors") for pattern in HISTORY.values())


def readme_table_variables() -> set[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", section, re.M))


def env_example_variables() -> set[str]:
    text = (ROOT / ".env.example").read_text()
    return set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", text, re.M))


def test_env_example_and_the_configuration_table_list_the_same_variables() -> None:
    assert readme_table_variables() == env_example_variables()
    assert len(readme_table_variables()) > 30


def sse_blocks(text: str) -> list[dict[str, str]]:
    events = []
    for block in re.split(r"\r?\n\r?\n", text.strip()):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line.startswith(":"):
                continue
            name, _, value = line.partition(": ")
            fields[name] = value
        if fields:
            events.append(fields)
    return events


def shape(event: dict[str, str]) -> tuple[str, Any]:
    """An event's name and the names of its data's fields (and of usage's), not their values."""
    data = json.loads(event["data"])
    return event["event"], sorted((k, sorted(v) if isinstance(v, dict) else None) for k, v in data.items())


def test_the_readme_curl_example_gives_the_stream_it_shows(service: Service) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## A stream", 1)[1]
    command = re.search(r"```sh\n(curl .+?)\n```", section, re.S)
    shown = re.search(r"```text\n(.+?)\n```", section, re.S)
    assert command
    assert shown
    argv = [a.replace("http://127.0.0.1:8000", service.url) for a in shlex.split(command.group(1))]
    answer = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout

    expected, got = sse_blocks(shown.group(1)), sse_blocks(answer)
    assert [shape(e) for e in got] == [shape(e) for e in expected]
    stream_id = got[0]["id"].split(":")[0]
    assert [e["id"] for e in got] == [f"{stream_id}:{seq}" for seq in range(len(got))]
    assert [e["data"] for e in got if e["event"] == "delta"] == [e["data"] for e in expected if e["event"] == "delta"]
