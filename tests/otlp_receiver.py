"""A loopback OTLP/HTTP trace receiver: it decodes what the real exporter sends (opentelemetry-proto's
ExportTraceServiceRequest, protobuf over HTTP) into plain spans, as a collector would. The tests
run it in a thread; bench/run.py runs it as a process of its own (`--port N`; GET /spans counts).
"""

from __future__ import annotations

import argparse
import gzip
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


@dataclass
class Span:
    name: str
    kind: str  # "SERVER", "CLIENT", ...
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    links: list[tuple[str, str]]  # (trace_id, span_id)
    status: str  # "UNSET", "OK", "ERROR"
    status_message: str
    resource: dict[str, Any] = field(default_factory=dict)


class OTLPReceiver:
    def __init__(self, port: int = 0) -> None:
        self.spans: list[Span] = []
        self.requests = 0
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces" or self.headers.get("content-type") != "application/x-protobuf":
                    self.send_response(404)
                    self.end_headers()
                    return
                receiver.take(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def do_GET(self) -> None:
                answer = str(len(receiver.spans)).encode()
                self.send_response(200 if self.path == "/spans" else 404)
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> OTLPReceiver:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def take(self, request: ExportTraceServiceRequest) -> None:
        spans = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    spans.append(
                        Span(
                            name=s.name,
                            kind=s.SpanKind.Name(s.kind).removeprefix("SPAN_KIND_"),
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            attributes=_attributes(s.attributes),
                            events=[(e.name, _attributes(e.attributes)) for e in s.events],
                            links=[(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                            status=s.status.StatusCode.Name(s.status.code).removeprefix("STATUS_CODE_"),
                            status_message=s.status.message,
                            resource=resource,
                        )
                    )
        with self._changed:
            self.spans += spans
            self.requests += 1
            self._changed.notify_all()

    def wait_for(self, found: Callable[[list[Span]], Any], timeout: float = 15) -> Any:
        """The first truthy `found(spans)`, re-asked after each export; AssertionError at the timeout."""
        with self._changed:
            result = self._changed.wait_for(lambda: found(self.spans), timeout)
        if not result:
            raise AssertionError(f"not exported within {timeout} s; spans: {[s.name for s in self.spans]}")
        return result

    def trace(self, trace_id: str) -> list[Span]:
        with self._changed:
            return [s for s in self.spans if s.trace_id == trace_id]


def _attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in pairs}


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, kind) if kind else None


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    OTLPReceiver(parser.parse_args().port).server.serve_forever()
