"""A real OTLP/HTTP trace receiver for tests: `POST /v1/traces` (protobuf, optionally gzip), spans kept as records.

    receiver = OtlpReceiver()       # or the session fixture: from _otlp import otlp_receiver
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url}
    spans = receiver.wait_for(lambda spans: any(s.kind == "SERVER" for s in spans), timeout=10)
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status as PbStatus


@dataclass
class Span:
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str  # 16 hex digits, or "" for a root span
    name: str
    kind: str  # "SERVER", "CLIENT", "CONSUMER", "PRODUCER", "INTERNAL" or "UNSPECIFIED"
    attributes: dict
    status_code: str  # "UNSET", "OK" or "ERROR"
    status_message: str
    start_ns: int
    end_ns: int
    resource: dict = field(default_factory=dict)  # resource attributes, e.g. {"service.name": "msgscript"}
    scope: str = ""  # instrumentation scope name
    events: list = field(default_factory=list)  # [(name, attributes)], e.g. ("exception", {...})

    @property
    def service_name(self) -> str:
        return self.resource.get("service.name", "")

    def __str__(self) -> str:
        status = f"{self.status_code} {self.status_message}".strip()
        return f"{self.name} [{self.kind} {status}] span={self.span_id} service={self.service_name!r} {self.attributes}"


def any_value(v):
    """An OTLP AnyValue as a Python value (arrays as lists, kvlists as dicts)."""
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return attributes(v.kvlist_value.values)
    return getattr(v, kind) if kind else None


def attributes(key_values) -> dict:
    return {kv.key: any_value(kv.value) for kv in key_values}


def decode(body: bytes) -> list[Span]:
    """The spans of a serialized ExportTraceServiceRequest."""
    request = ExportTraceServiceRequest.FromString(body)
    spans = []
    for rs in request.resource_spans:
        resource = attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                spans.append(Span(
                    trace_id=s.trace_id.hex(), span_id=s.span_id.hex(), parent_span_id=s.parent_span_id.hex(),
                    name=s.name, kind=PbSpan.SpanKind.Name(s.kind).removeprefix("SPAN_KIND_"),
                    attributes=attributes(s.attributes),
                    status_code=PbStatus.StatusCode.Name(s.status.code).removeprefix("STATUS_CODE_"),
                    status_message=s.status.message, start_ns=s.start_time_unix_nano, end_ns=s.end_time_unix_nano,
                    resource=resource, scope=ss.scope.name,
                    events=[(e.name, attributes(e.attributes)) for e in s.events]))
    return spans


class TraceTree(dict):
    """trace id -> its spans in start order; str() is an indented tree by parent links."""

    def __str__(self) -> str:
        lines = []
        for trace_id, spans in self.items():
            lines.append(f"trace {trace_id}")
            ids = {s.span_id for s in spans}
            children: dict[str, list[Span]] = {}
            for s in spans:  # a span whose parent did not arrive is shown as a root
                children.setdefault(s.parent_span_id if s.parent_span_id in ids else "", []).append(s)
            _walk(children, "", 1, lines)
        return "\n".join(lines) if lines else "(no spans)"


def _walk(children: dict, parent: str, depth: int, lines: list) -> None:
    for s in children.get(parent, []):
        orphan = f" (parent {s.parent_span_id} not received)" if depth == 1 and s.parent_span_id else ""
        lines.append("  " * depth + str(s) + orphan)
        _walk(children, s.span_id, depth + 1, lines)


def trace_tree(spans) -> TraceTree:
    tree = TraceTree()
    for s in sorted(spans, key=lambda s: s.start_ns):
        tree.setdefault(s.trace_id, []).append(s)
    return tree


class OtlpReceiver:
    """An OTLP/HTTP trace receiver on a free 127.0.0.1 port; `.url` is "http://127.0.0.1:PORT"."""

    def __init__(self):
        self._spans: list[Span] = []
        self.errors: list[str] = []  # rejected requests, shown in wait_for's failure message
        self._cond = threading.Condition()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.traces_endpoint = self.url + "/v1/traces"
        threading.Thread(target=self._server.serve_forever, name="otlp-receiver", daemon=True).start()

    def _handler(self):
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the exporters' sessions expect

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path.split("?")[0] != "/v1/traces":
                    return self.reply(404, f"no such path {self.path}")
                if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/x-protobuf":
                    return self.reply(415, f"unsupported Content-Type {self.headers.get('Content-Type')!r}")
                try:
                    encoding = self.headers.get("Content-Encoding", "").lower()
                    if encoding == "gzip":
                        body = gzip.decompress(body)
                    elif encoding == "deflate":
                        body = zlib.decompress(body)
                    spans = decode(body)
                except Exception as e:  # noqa: BLE001 - a bad request is reported, not raised in the server thread
                    return self.reply(400, f"undecodable body ({e!r})")
                with receiver._cond:
                    receiver._spans.extend(spans)
                    receiver._cond.notify_all()
                self.reply(200, body=ExportTraceServiceResponse().SerializeToString())

            def reply(self, code: int, error: str = "", body: bytes = b""):
                if error:
                    with receiver._cond:
                        receiver.errors.append(f"{self.command} {self.path}: {code} {error}")
                    body = error.encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/x-protobuf" if code == 200 else "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        return Handler

    @property
    def spans(self) -> list[Span]:
        """A copy of the spans received so far, in arrival order."""
        with self._cond:
            return list(self._spans)

    def wait_for(self, predicate, timeout: float = 10) -> list[Span]:
        """The spans once predicate(spans) is true; AssertionError with what arrived after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                spans = list(self._spans)
                if predicate(spans):
                    return spans
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    errors = "".join(f"\nrejected: {e}" for e in self.errors)
                    raise AssertionError(f"spans at {self.url} did not satisfy the condition within {timeout}s; "
                                         f"{len(spans)} arrived:\n{trace_tree(spans)}{errors}")
                self._cond.wait(remaining)

    def clear(self) -> None:
        with self._cond:
            self._spans.clear()
            self.errors.clear()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="session")
def otlp_receiver():
    """One OtlpReceiver for the session; call .clear() or filter by trace id in each test."""
    receiver = OtlpReceiver()
    yield receiver
    receiver.stop()
