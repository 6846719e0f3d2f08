"""A real OTLP/gRPC trace receiver for tests: the opentelemetry-proto TraceService on a grpcio server.

    receiver = OtlpGrpcReceiver()   # .endpoint is "127.0.0.1:PORT", as Go's OTEL_ENDPOINT takes it
    spans = receiver.wait_for(lambda spans: any(s.kind == "SERVER" for s in spans), timeout=10)

Spans are the records of _otlp.py (same wait_for / clear / spans as its OTLP/HTTP receiver).
"""

from __future__ import annotations

import threading
from concurrent import futures

from _otlp import OtlpReceiver, decode


class OtlpGrpcReceiver(OtlpReceiver):
    """The gRPC twin of _otlp.OtlpReceiver, without TLS (as the Go original dials its endpoint)."""

    def __init__(self):  # noqa: D107 - no OTLP/HTTP server here, only the span store of the base class
        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        self._spans = []
        self.errors = []
        self._cond = threading.Condition()
        self.requests = 0
        receiver = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):  # noqa: N802 - the gRPC method's name
                spans = decode(request.SerializeToString())
                with receiver._cond:
                    receiver.requests += 1
                    receiver._spans.extend(spans)
                    receiver._cond.notify_all()
                return trace_service_pb2.ExportTraceServiceResponse()

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"127.0.0.1:{self.port}"
        self.url = f"grpc://{self.endpoint}"  # for messages only
        self._server.start()

    def stop(self) -> None:
        self._server.stop(grace=None)
