"""Configuration: typed, from the environment and .env, secrets hidden, bad values stop the start."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import anyio
import httpx
import pytest

import chatsvc
from tests.fake_model import FakeModel
from tests.helpers import ROOT, Service, StartService

BAD_VALUES = [
    ("MAX_TOKENS", "lots"),
    ("MAX_TOKENS", "0"),
    ("LOG_LEVEL", "LOUD"),
    ("PORT", "70000"),
    ("REQUEST_TIMEOUT_S", "-1"),
    ("LOG_CONTENT", "perhaps"),
    ("MAX_BODY_BYTES", "10"),
    ("MAX_FOLLOWERS", "255"),  # fewer than MAX_CONCURRENT_STREAMS (256): a stream's own client is one
    ("MAX_FOLLOWERS_PER_STREAM", "0"),
    ("HEADERS_TIMEOUT_S", "0"),
    ("BODY_TIMEOUT_S", "-5"),
    ("BREAKER_FAILURES", "-1"),
    ("UPSTREAMS", '[{"name": "a"'),  # not JSON
    ("UPSTREAMS", '[{"name": "a", "base_url": "ftp://x/v1", "api_key": "sk-never-printed-123456"}]'),
    ("UPSTREAMS", '[{"name": "a b", "base_url": "http://127.0.0.1:9/v1"}]'),  # a name is a metric label
    (
        "UPSTREAMS",
        '[{"name": "a", "base_url": "http://127.0.0.1:9/v1"}, {"name": "a", "base_url": "http://[::1]:9/v1"}]',
    ),
    ("UPSTREAMS", '[{"name": "a", "base_url": "http://127.0.0.1:9/v1", "models": ["not-allowed"]}]'),
    ("UPSTREAMS", '[{"name": "a", "base_url": "http://127.0.0.1:9/v1", "timeout": 5}]'),  # a misspelt field
]


@pytest.fixture(scope="module")
def bad_starts(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], tuple[int, str, str]]:
    """`python chatsvc.py` with each bad value, all started at once (each exits as soon as it has
    read its settings): the exit status, stdout and stderr of each."""
    cwd = tmp_path_factory.mktemp("bad-values")
    started = {
        (name, value): subprocess.Popen(
            [sys.executable, str(ROOT / "chatsvc.py")],
            # UPSTREAMS stands in place of OPENAI_*: with both, that alone would be the message.
            env={"PATH": "/usr/bin:/bin", name: value}
            | ({} if name == "UPSTREAMS" else {"OPENAI_API_KEY": "sk-never-printed-123456"}),
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, value in BAD_VALUES
    }
    results = {}
    for case, proc in started.items():
        stdout, stderr = proc.communicate(timeout=60)
        results[case] = (proc.returncode, stdout, stderr)
    return results


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
def test_bad_value_exits_2_with_a_three_part_message(
    bad_starts: dict[tuple[str, str], tuple[int, str, str]], name: str, value: str
) -> None:
    returncode, stdout, stderr = bad_starts[name, value]

    assert returncode == 2
    message = json.loads(stderr)
    assert set(message) == {"error", "detail", "action"}
    assert message["detail"].startswith(name)
    assert "Traceback" not in stderr
    assert "sk-never-printed" not in stderr + stdout


def test_upstreams_stand_in_place_of_openai_settings_not_beside_them() -> None:
    listed = [{"name": "a", "base_url": "http://127.0.0.1:9/v1"}]
    with pytest.raises(ValueError, match="set either UPSTREAMS or OPENAI_BASE_URL, not both"):
        chatsvc.Settings(UPSTREAMS=listed, OPENAI_BASE_URL="http://127.0.0.1:9/v1", _env_file=None)
    settings = chatsvc.Settings(UPSTREAMS=listed, _env_file=None)
    assert settings.configured
    assert [server.name for server in settings.upstreams] == ["a"]
    assert [server.name for server in chatsvc.Settings(_env_file=None).upstreams] == ["default"]


def test_the_default_model_must_be_served_too() -> None:
    """A request that names no model asks for OPENAI_MODEL, also when ALLOWED_MODELS leaves it out."""
    listed = [{"name": "a", "base_url": "http://127.0.0.1:9/v1", "models": ["m1"]}]
    with pytest.raises(ValueError, match="no upstream serves the model 'gpt-4o-mini'"):
        chatsvc.Settings(UPSTREAMS=listed, ALLOWED_MODELS="m1", _env_file=None)


def test_bad_value_stops_uvicorn_chatsvc_app_with_the_message(tmp_path: Path) -> None:
    """`uvicorn chatsvc:app` builds the app when the server starts its lifespan: a bad value stops the
    server there with the same three-part message, as any app whose startup failed (uvicorn exits 3),
    instead of serving on without the app."""
    uvicorn = [sys.executable, "-m", "uvicorn", "chatsvc:app", "--app-dir", str(ROOT), "--port", "0"]
    env = {"PATH": "/usr/bin:/bin", "MAX_TOKENS": "lots"}
    result = subprocess.run(uvicorn, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30, check=False)

    assert result.returncode == 3
    messages = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert [set(message) for message in messages] == [{"error", "detail", "action"}]
    assert messages[0]["detail"].startswith("MAX_TOKENS")
    assert "Application startup failed" in result.stderr
    assert "Traceback" not in result.stderr


def test_dotenv_file_in_the_working_directory_is_read(tmp_path: Path, fake_model: FakeModel) -> None:
    (tmp_path / ".env").write_text(f"OPENAI_MODEL=model-from-dotenv\nOPENAI_BASE_URL={fake_model.base_url}\n")
    svc = Service({}, tmp_path).start()
    try:
        assert httpx.get(f"{svc.url}/readyz").json() == {"status": "ready", "model": "model-from-dotenv"}
    finally:
        svc.stop()


def test_environment_wins_over_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("OPENAI_MODEL=from-file\n")
    monkeypatch.setenv("OPENAI_MODEL", "from-env")
    assert chatsvc.Settings(_env_file=tmp_path / ".env").OPENAI_MODEL == "from-env"


def test_secrets_never_show_in_repr() -> None:
    settings = chatsvc.Settings(
        _env_file=None, OPENAI_API_KEY="sk-hidden-value-987", SERVICE_API_KEYS="svc-hidden-1,svc-hidden-2"
    )
    assert "hidden" not in repr(settings)
    assert "hidden" not in str(settings.model_dump())
    assert settings.service_keys == (b"svc-hidden-1", b"svc-hidden-2")


def test_comma_lists_are_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALLOWED_MODELS", " a , b,,c ")
    monkeypatch.setenv("CORS_ALLOW_ORIGINS", "https://x.example")
    settings = chatsvc.Settings(_env_file=None)
    assert settings.allowed_models == ("a", "b", "c")
    assert settings.CORS_ALLOW_ORIGINS == ("https://x.example",)


def test_env_example_lists_exactly_the_settings() -> None:
    text = (ROOT / ".env.example").read_text()
    listed = re.findall(r"^([A-Z_]+)=", text, flags=re.MULTILINE)
    assert sorted(listed) == sorted(chatsvc.Settings.model_fields)
    assert len(listed) == len(set(listed))
    defaults = chatsvc.Settings(_env_file=None)
    for name, value in re.findall(r"^([A-Z_]+)=(.+)$", text, flags=re.MULTILINE):
        assert str(getattr(defaults, name)).lower().removesuffix(".0") == value.lower(), name


def test_cors_is_off_by_default_and_on_when_configured(service: Service, start_service: StartService) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in httpx.options(f"{service.url}/chat", headers=preflight).headers

    svc: Service = start_service(CORS_ALLOW_ORIGINS="https://app.example")
    response = httpx.options(f"{svc.url}/chat", headers=preflight)
    assert response.headers["access-control-allow-origin"] == "https://app.example"
    chat = httpx.post(f"{svc.url}/chat", json={"message": "hi"}, headers={"Origin": "https://app.example"})
    assert "x-request-id" in chat.headers["access-control-expose-headers"].lower()
    # The AI SDK's request from a page on another origin: JSON, and the key.
    ai_sdk = {**preflight, "Access-Control-Request-Headers": "content-type,authorization"}
    response = httpx.options(f"{svc.url}/api/chat", headers=ai_sdk)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://app.example"


def test_cors_allows_credentials_for_the_named_origins_only() -> None:
    """Bug: a page on another origin could not carry an AI SDK chat's owner cookie (note 21): no
    Access-Control-Allow-Credentials. Fix: allowed for the origins CORS_ALLOW_ORIGINS names; never
    with `*`, for which Starlette would echo any origin, so that any site could read a visitor's chats.
    (Headers only: the app in process, its lifespan not run.)"""
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}

    async def ask(origins: str, origin: str) -> list[httpx.Response]:
        app = chatsvc.create_app(chatsvc.Settings(CORS_ALLOW_ORIGINS=origins, _env_file=None))
        headers = {"Origin": origin, "Cookie": "chatsvc_owner=" + "0" * 32}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return [
                await client.options("/api/chat", headers={**preflight, **headers}),
                await client.get("/api/chat/c/stream", headers=headers),  # the resume: the cookie's answer
            ]

    for response in anyio.run(ask, "https://app.example", "https://app.example"):
        assert response.status_code in (200, 204)
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        assert response.headers["access-control-allow-credentials"] == "true"
    for response in anyio.run(ask, "*", "https://elsewhere.example"):
        assert response.status_code in (200, 204)
        assert response.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in response.headers
