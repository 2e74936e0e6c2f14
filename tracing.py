"""Traces through OpenTelemetry's SDK, switched on by its own variables (chatsvc note 14).

chatsvc itself uses only OpenTelemetry's API, which does nothing without an SDK: the propagator,
the current span, and `trace.INVALID_SPAN` where tracing is off. This module decides from the
environment whether tracing is configured and only then imports the SDK and the OTLP/HTTP exporter
and builds the tracer provider; the app's `Tracing` hands out its spans.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import anyio
from opentelemetry import context as otel_context
from opentelemetry import trace
from starlette.types import Scope

log = logging.getLogger("chatsvc")


def tracing_configured(environ: Mapping[str, str]) -> bool:
    """OpenTelemetry's own switches: an OTLP endpoint, unless the SDK is disabled or the exporter is `none`."""
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    disabled = environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
    return bool(endpoint) and not disabled and environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() != "none"


class Tracing:
    """The app's tracer: None until `start` finds OpenTelemetry's variables set, and then the SDK's.
    Without it every span is `trace.INVALID_SPAN`, whose every method does nothing."""

    def __init__(self) -> None:
        self.tracer: trace.Tracer | None = None
        self._provider: Any = None  # the SDK's TracerProvider, whose shutdown flushes the spans

    def start(self, environ: Mapping[str, str]) -> None:
        if not tracing_configured(environ):
            return
        # Imported here: with tracing off the SDK is never loaded, so it costs nothing.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create()  # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: "chatsvc"}))
        provider = TracerProvider(resource=resource)  # the sampler from OTEL_TRACES_SAMPLER
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self._provider = provider
        self.tracer = provider.get_tracer("chatsvc")
        log.info("tracing_started", extra={"exporter": "otlp/http"})

    async def stop(self) -> None:
        """Export what is queued (the exporter's own timeouts bound it), off the event loop."""
        if self._provider is not None:
            await anyio.to_thread.run_sync(self._provider.shutdown)
            self._provider, self.tracer = None, None

    def server_span(self, scope: Scope, parent: otel_context.Context | None) -> trace.Span:
        if self.tracer is None:
            return trace.INVALID_SPAN
        method = scope["method"]
        return self.tracer.start_span(
            method, context=parent, kind=trace.SpanKind.SERVER, attributes={"http.request.method": method}
        )

    def upstream_span(
        self, model: str, *, max_tokens: int, temperature: float | None, server_address: str | None
    ) -> trace.Span:
        """The upstream call's span, a child of the current (server) span: GenAI conventions."""
        if self.tracer is None:
            return trace.INVALID_SPAN
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": "openai",
            "gen_ai.request.model": model,
            "gen_ai.request.max_tokens": max_tokens,
            "gen_ai.request.stream": True,
        }
        if temperature is not None:
            attributes["gen_ai.request.temperature"] = temperature
        if server_address:
            attributes["server.address"] = server_address
        return self.tracer.start_span(f"chat {model}", kind=trace.SpanKind.CLIENT, attributes=attributes)
