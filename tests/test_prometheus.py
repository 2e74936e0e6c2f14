"""The alert rules in deploy/prometheus/ and a real Prometheus (Debian's, which `make test`
installs with tests/install-debian.sh) scraping a running chatsvc: `promtool check rules`
and `promtool test rules` pass, every metric a rule names is one chatsvc exports, and after some
traffic Prometheus's own HTTP API answers the request counter and a histogram quantile, with
every rule evaluated without error."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.helpers import ROOT, Service, StartService, free_port, scrape, wait_until_answers

RULES_DIR = ROOT / "deploy" / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert shutil.which("promtool"), "promtool is missing: bash tests/install-debian.sh (make test runs it)"
    return subprocess.run(["promtool", *args], cwd=RULES_DIR, capture_output=True, text=True, timeout=60, check=False)


def test_the_rules_are_valid_and_their_unit_tests_pass() -> None:
    checked = promtool("check", "rules", "rules.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 8 rules found" in checked.stdout
    tested = promtool("test", "rules", "rules.test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    config = promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr


def test_every_rule_has_a_unit_test() -> None:
    rules = yaml.safe_load((RULES_DIR / "rules.yml").read_text())["groups"][0]["rules"]
    tests = yaml.safe_load((RULES_DIR / "rules.test.yml").read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case["exp_alerts"]}
    assert tested == {rule["alert"] for rule in rules}


def test_the_rules_name_only_metrics_that_chatsvc_exports(service: Service) -> None:
    service.chat({"message": "hi"})  # so that the labelled series exist
    exported = {name for name in scrape(service).names if name.startswith("chatsvc_")}
    named = set(re.findall(r"\bchatsvc_\w+", (RULES_DIR / "rules.yml").read_text()))
    assert named <= exported, named - exported


@pytest.fixture
def prometheus(start_service: StartService, tmp_path: Path) -> Iterator[tuple[str, Service]]:
    """A chatsvc of its own (so that its counts are exactly this test's) and a Prometheus that
    scrapes it every second, with the rules loaded."""
    assert shutil.which("prometheus"), "prometheus is missing: bash tests/install-debian.sh (make test runs it)"
    svc: Service = start_service()
    shutil.copy(RULES_DIR / "rules.yml", tmp_path / "rules.yml")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["rules.yml"],
        "scrape_configs": [{"job_name": "chatsvc", "static_configs": [{"targets": [f"127.0.0.1:{svc.port}"]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with (tmp_path / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(
            ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            cwd=tmp_path, stdout=log, stderr=log,
        )  # fmt: skip
    try:
        wait_until_answers(f"http://127.0.0.1:{port}/-/ready", 60, proc)
        yield f"http://127.0.0.1:{port}", svc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def query(prometheus_url: str, expr: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def query_until(prometheus_url: str, expr: str, done: Any, limit: float = 30) -> list[dict[str, Any]]:
    """Until the answer satisfies `done`: Prometheus scrapes every second, so this polls."""
    deadline = time.monotonic() + limit
    while not done(result := query(prometheus_url, expr)):
        assert time.monotonic() < deadline, f"{expr}: {result}"
        time.sleep(0.2)
    return result


@pytest.mark.slow
def test_a_real_prometheus_scrapes_chatsvc(prometheus: tuple[str, Service]) -> None:
    url, svc = prometheus
    sent = 12
    for _ in range(sent):
        assert svc.chat({"message": "fake:deltas=3"})[0].status_code == 200
    assert svc.chat({"message": ""})[0].status_code == 422  # a refusal is a chat's outcome too
    assert httpx.post(f"{svc.url}/nowhere").status_code == 404  # not a chat: not counted

    ok = 'sum(chatsvc_requests_total{job="chatsvc", code="ok"})'
    counted = query_until(url, ok, lambda r: r and float(r[0]["value"][1]) >= sent)
    assert float(counted[0]["value"][1]) == sent
    refused = query_until(url, 'sum by (code) (chatsvc_requests_total{code!="ok"})', lambda r: r)
    assert [(r["metric"]["code"], r["value"][1]) for r in refused] == [("validation_error", "1")]
    # Over the counts since start: a rate would need traffic across two scrapes.
    p50 = 'histogram_quantile(0.5, sum by (le) (chatsvc_time_to_first_token_seconds_bucket{job="chatsvc"}))'
    quantile = query_until(url, p50, lambda r: r and r[0]["value"][1] != "NaN")
    assert 0 < float(quantile[0]["value"][1]) <= 0.05  # the fake model answers at once: the first bucket

    def evaluated(groups: list[dict[str, Any]]) -> bool:
        rules = [rule for group in groups for rule in group["rules"]]
        return len(rules) == 8 and all(rule.get("lastEvaluation", "").startswith("20") for rule in rules)

    deadline = time.monotonic() + 30
    while not evaluated(groups := httpx.get(f"{url}/api/v1/rules", timeout=10).json()["data"]["groups"]):
        assert time.monotonic() < deadline, groups
        time.sleep(0.2)
    rules = [rule for group in groups for rule in group["rules"]]
    assert {rule["health"] for rule in rules} == {"ok"}, [(r["name"], r.get("lastError")) for r in rules]
    assert {rule["state"] for rule in rules} == {"inactive"}  # a healthy service fires nothing
