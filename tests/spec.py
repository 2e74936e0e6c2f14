"""openapi.yaml as a validator: the tests check real responses and events against it."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import yaml

SPEC_PATH = Path(__file__).resolve().parent.parent / "openapi.yaml"


@cache
def spec() -> dict[str, Any]:
    loaded = yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def validate(schema_name: str, instance: Any) -> None:
    """Validate against components.schemas[schema_name], resolving $refs within the document."""
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": spec()["components"]}
    jsonschema.Draft202012Validator(schema).validate(instance)


def assert_error_response(response: httpx.Response, status: int, code: str) -> None:
    """An HTTP error: this status, the error body with this code, and the id the response carries."""
    assert response.status_code == status, response.text
    assert_error(response.json(), code, response.headers["x-request-id"])


def assert_error(body: Any, code: str, correlation_id: str | None = None) -> None:
    """An error body in the one shape, with this code (and id)."""
    validate("ErrorBody", body)
    assert body["code"] == code, body
    if correlation_id is not None:
        assert body["correlation_id"] == correlation_id
    assert "Traceback" not in body["detail"]
