"""The probes, /metrics, /openapi.json, and the spec checked against the app itself."""

from __future__ import annotations

import typing

import httpx
import pytest
from starlette.routing import Route

import ai_sdk
import chatsvc
from tests.fake_model import FakeModel
from tests.helpers import Metrics, Service, StartService, free_port, iter_sse, scrape, text_of
from tests.spec import assert_error_response, spec, validate


@pytest.fixture(scope="module")
def configured(start_module_service: StartService, fake_model: FakeModel) -> Service:
    """One service for the cases that need settings of their own but no process of their own: small
    limits and two models (in /openapi.json), an allowed origin (CORS), a health URL that answers."""
    return start_module_service(
        ALLOWED_MODELS="m1,m2",
        MAX_MESSAGE_CHARS="100",
        MAX_HISTORY="3",
        MAX_TOKENS="9",
        CORS_ALLOW_ORIGINS="https://app.example",
        UPSTREAM_HEALTH_URL=f"{fake_model.base_url}/models",
    )


def test_healthz_is_ok_and_never_calls_the_model(service: Service, fake_model: FakeModel) -> None:
    before = len(fake_model.requests)
    response = httpx.get(f"{service.url}/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert len(fake_model.requests) == before


def test_readyz_when_configured(service: Service) -> None:
    response = httpx.get(f"{service.url}/readyz")
    assert response.status_code == 200
    assert response.json()["status"] == "ready"


def test_not_configured_service_says_so(start_service: StartService) -> None:
    bare: Service = start_service(OPENAI_BASE_URL="<unset>", OPENAI_API_KEY="<unset>")

    ready = httpx.get(f"{bare.url}/readyz")
    assert_error_response(ready, 503, "not_configured")
    assert "OPENAI_API_KEY" in ready.json()["action"]
    chat = httpx.post(f"{bare.url}/chat", json={"message": "hi"})
    assert_error_response(chat, 503, "not_configured")
    assert httpx.get(f"{bare.url}/healthz").status_code == 200


def test_readyz_asks_the_health_url_when_one_is_set(
    start_service: StartService, configured: Service, fake_model: FakeModel
) -> None:
    dead: Service = start_service(UPSTREAM_HEALTH_URL=f"http://127.0.0.1:{free_port()}/v1/models")
    ready = httpx.get(f"{dead.url}/readyz")
    assert_error_response(ready, 503, "upstream_unreachable")
    assert "UPSTREAM_HEALTH_URL" in ready.json()["detail"]

    assert httpx.get(f"{configured.url}/readyz").status_code == 200  # its health URL answers
    wrong: Service = start_service(UPSTREAM_HEALTH_URL=f"{fake_model.base_url}/no-such-thing")
    assert_error_response(httpx.get(f"{wrong.url}/readyz"), 503, "upstream_unreachable")


def test_metrics_count_outcomes_tokens_and_timings(service: Service) -> None:
    before = scrape(service)
    service.chat({"message": "fake:deltas=4"})
    service.chat({"message": "fake:deltas=4,die_after=1"})
    response = httpx.get(f"{service.url}/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    after = Metrics.parse(response.text)
    for name, labels, grew_by in [
        ("chatsvc_requests_total", {"code": "ok"}, 1),
        ("chatsvc_requests_total", {"code": "upstream_error"}, 1),
        ("chatsvc_tokens_total", {"kind": "completion"}, 5),
        ("chatsvc_time_to_first_token_seconds_count", {}, 2),
        ("chatsvc_stream_duration_seconds_count", {}, 2),
    ]:
        grew = after.value(name, default=0, **labels) - before.value(name, default=0, **labels)
        assert grew == grew_by, (name, labels)
    prompt = [m.value("chatsvc_tokens_total", default=0, kind="prompt") for m in (before, after)]
    assert prompt[1] > prompt[0]
    assert after.value("chatsvc_active_streams") == 0


def test_openapi_json_is_the_yaml_with_this_deployments_values(configured: Service) -> None:
    served = httpx.get(f"{configured.url}/openapi.json").json()
    fields = served["components"]["schemas"]["ChatRequest"]["properties"]

    assert fields["model"]["enum"] == ["m1", "m2", None]
    assert fields["message"]["maxLength"] == 100
    assert fields["history"]["maxItems"] == 3
    assert fields["max_tokens"]["maximum"] == 9
    assert served["components"]["schemas"]["ChatTurn"]["properties"]["content"]["maxLength"] == 100
    for name in ("model", "message", "history", "max_tokens"):
        fields[name] = spec()["components"]["schemas"]["ChatRequest"]["properties"][name]
    schemas = served["components"]["schemas"]
    assert schemas["UIChatRequest"]["properties"]["messages"]["maxItems"] == 4  # MAX_HISTORY and the new one
    assert schemas["UITextPart"]["properties"]["text"]["maxLength"] == 100
    for name in ("ChatTurn", "UIChatRequest", "UITextPart"):
        schemas[name] = spec()["components"]["schemas"][name]
    assert served == spec()  # and nothing else differs from the file


def test_unknown_path_and_wrong_method_use_the_error_body(service: Service) -> None:
    missing = httpx.get(f"{service.url}/v1/chat/completions")
    assert_error_response(missing, 404, "not_found")

    wrong = httpx.put(f"{service.url}/chat", json={"message": "hi"})
    assert_error_response(wrong, 405, "method_not_allowed")
    assert wrong.headers["allow"] == "POST"


# The spec against the app -------------------------------------------------------------------------


def app_routes() -> set[tuple[str, str]]:
    app = chatsvc.create_app(chatsvc.Settings(_env_file=None))
    routes = set()
    for route in app.routes:
        assert isinstance(route, Route)
        for method in route.methods or ():
            if method != "HEAD":
                routes.add((route.path, method.lower()))
    return routes


def test_spec_documents_exactly_the_apps_endpoints() -> None:
    documented = {(path, method) for path, ops in spec()["paths"].items() for method in ops}
    assert documented == app_routes()


def test_spec_lists_exactly_the_error_codes() -> None:
    assert set(spec()["components"]["schemas"]["ErrorCode"]["enum"]) == set(chatsvc.ERRORS)


def test_spec_documents_every_status_chat_can_answer() -> None:
    documented = {int(s) for s in spec()["paths"]["/chat"]["post"]["responses"]}
    possible = {kind.status for kind in chatsvc.ERRORS.values()}  # 404: a Last-Event-ID of no stream
    assert possible | {200, 204} == documented  # 204: a resume of a stream that was delivered whole


def test_spec_documents_every_status_the_ai_sdk_route_can_answer() -> None:
    documented = {int(s) for s in spec()["paths"]["/api/chat"]["post"]["responses"]}
    possible = {kind.status for kind in chatsvc.ERRORS.values()} - {404}  # it resumes no stream by id
    assert possible | {200} == documented


def test_spec_ui_request_schema_matches_the_models() -> None:
    schemas = spec()["components"]["schemas"]
    defaults = chatsvc.Settings(_env_file=None)
    request = schemas["UIChatRequest"]

    assert set(request["properties"]) == set(chatsvc.UIChatRequest.model_fields)
    assert request["required"] == [n for n, f in chatsvc.UIChatRequest.model_fields.items() if f.is_required()]
    assert request["properties"]["messages"]["maxItems"] == defaults.MAX_HISTORY + 1
    assert request["properties"]["id"]["pattern"] == chatsvc.CHAT_ID_PATTERN.pattern
    assert set(schemas["UIMessage"]["properties"]) == set(ai_sdk.UIMessage.model_fields)
    assert set(schemas["UITextPart"]["properties"]) == set(ai_sdk.UITextPart.model_fields)
    roles = schemas["UIMessage"]["properties"]["role"]["enum"]
    assert roles == list(typing.get_args(ai_sdk.UIMessage.model_fields["role"].annotation))


def test_spec_request_schema_matches_the_model_and_defaults() -> None:
    schema = spec()["components"]["schemas"]["ChatRequest"]
    defaults = chatsvc.Settings(_env_file=None)

    assert set(schema["properties"]) == set(chatsvc.ChatRequest.model_fields)
    assert schema["required"] == ["message"]
    assert schema["additionalProperties"] is False
    assert schema["properties"]["message"]["maxLength"] == defaults.MAX_MESSAGE_CHARS
    assert schema["properties"]["history"]["maxItems"] == defaults.MAX_HISTORY
    assert schema["properties"]["max_tokens"]["maximum"] == defaults.MAX_TOKENS
    roles = spec()["components"]["schemas"]["ChatTurn"]["properties"]["role"]["enum"]
    assert roles == list(typing.get_args(chatsvc.ChatTurn.model_fields["role"].annotation))


def test_spec_documents_every_event(service: Service) -> None:
    events = spec()["paths"]["/chat"]["post"]["responses"]["200"]["content"]["text/event-stream"]["x-events"]
    assert set(events) == {"meta", "delta", "done", "error"}

    _, ok = service.chat({"message": "hi"})
    _, failed = service.chat({"message": "fake:deltas=3,die_after=1"})
    for event in ok + failed:
        assert event.event is not None
        validate(events[event.event]["$ref"].rsplit("/", 1)[-1], event.data)


@pytest.mark.parametrize("code", sorted(chatsvc.ERRORS))
def test_every_error_code_renders_a_valid_body(code: str) -> None:
    error = chatsvc.ServiceError(code, "detail")
    validate("ErrorBody", {**error.body(), "correlation_id": "x"})


# Methods: each route answers exactly what the spec documents ------------------------------------

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
PATH_VALUES = {"{stream_id}": "0123456789abcdef0123456789abcdef", "{chat_id}": "no-such-chat"}


def concrete(path: str) -> str:
    for name, value in PATH_VALUES.items():
        path = path.replace(name, value)
    return path


def test_every_route_answers_exactly_its_documented_methods(service: Service) -> None:
    """Bug: Starlette adds HEAD to every GET route, and the stream routes took any method but GET
    for DELETE, so HEAD /chat/streams/{id} stopped the stream. Fix: each route answers the methods
    openapi.yaml documents, every other one (HEAD included) 405 with Allow and the error body."""
    for path, operations in spec()["paths"].items():
        documented = {method.upper() for method in operations}
        for method in METHODS:
            response = httpx.request(method, f"{service.url}{concrete(path)}")
            if method in documented:
                assert response.status_code != 405, (method, path)
                continue
            assert response.status_code == 405, (method, path, response.status_code)
            assert {m.strip() for m in response.headers["allow"].split(",")} == documented, (method, path)
            if method != "HEAD":  # a HEAD answer has no body
                assert_error_response(response, 405, "method_not_allowed")


def test_head_leaves_a_live_stream_running(service: Service) -> None:
    """Bug: HEAD /chat/streams/{id} stopped the generation (handled as DELETE). Fix: 405."""
    body = {"message": "fake:deltas=6,delay=0.05"}
    with httpx.stream("POST", f"{service.url}/chat", json=body, timeout=10) as response:
        events = iter_sse(response)
        meta = next(events)
        assert meta.event == "meta"
        stream_id = response.headers["x-stream-id"]
        for path in (f"/chat/streams/{stream_id}", f"/chat/streams/{stream_id}?after=0"):
            assert httpx.head(f"{service.url}{path}").status_code == 405
        rest = list(events)
    assert rest[-1].event == "done"
    assert rest[-1].data["finish_reason"] == "stop"
    assert text_of(rest) == "".join(f"w{i} " for i in range(6))


def test_cors_preflight_still_answers_for_every_documented_method(configured: Service) -> None:
    svc = configured
    for method, path in (("POST", "/chat"), ("DELETE", "/chat/streams/x"), ("GET", "/chat/streams/x")):
        preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": method}
        response = httpx.options(f"{svc.url}{path}", headers=preflight)
        assert response.status_code == 200, (method, path)
        assert response.headers["access-control-allow-origin"] == "https://app.example"
    plain = httpx.options(f"{svc.url}/chat")  # no preflight: a method like any other
    assert_error_response(plain, 405, "method_not_allowed")
