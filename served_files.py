"""What chatsvc serves from its files: chat.html with a Content-Security-Policy of its own, and
openapi.yaml (read with PyYAML) with this deployment's values. Both are read once, at start."""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ChatPage:
    """chat.html with its headers: a Content-Security-Policy that allows exactly its own inline
    script and style (by hash), talks only to this origin, and loads nothing from anywhere."""

    html: str
    headers: dict[str, str]

    @classmethod
    def load(cls) -> ChatPage:
        html = (HERE / "chat.html").read_text(encoding="utf-8")
        scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.DOTALL)
        styles = re.findall(r"<style>(.*?)</style>", html, flags=re.DOTALL)
        policy = "; ".join(
            [
                "default-src 'none'",
                "script-src " + " ".join(map(_csp_hash, scripts)),
                "style-src " + " ".join(map(_csp_hash, styles)),
                "connect-src 'self'",
                "base-uri 'none'",
                "form-action 'none'",
                "frame-ancestors 'none'",
            ]
        )
        headers = {
            "Content-Security-Policy": policy,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache",
        }
        return cls(html, headers)


def _csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


def load_openapi(
    *, models: tuple[str, ...], max_message_chars: int, max_history: int, max_tokens: int
) -> dict[str, Any]:
    """openapi.yaml with this deployment's values: the models it allows and its limits, so that the
    served contract is exact (the file documents the defaults)."""
    spec = yaml.safe_load((HERE / "openapi.yaml").read_text(encoding="utf-8"))
    assert isinstance(spec, dict)
    schemas = spec["components"]["schemas"]
    fields = schemas["ChatRequest"]["properties"]
    fields["model"]["enum"] = [*models, None]
    fields["message"]["maxLength"] = max_message_chars
    fields["history"]["maxItems"] = max_history
    fields["max_tokens"]["maximum"] = max_tokens
    schemas["ChatTurn"]["properties"]["content"]["maxLength"] = max_message_chars
    schemas["UIChatRequest"]["properties"]["messages"]["maxItems"] = max_history + 1
    schemas["UITextPart"]["properties"]["text"]["maxLength"] = max_message_chars
    return spec
