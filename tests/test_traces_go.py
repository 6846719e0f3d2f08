"""Traces switched on and sent where the Go original's environment says (issue 20, item 5).

Go: TELEMETRY_TRACES set to anything turns traces on; OTEL_ENDPOINT `host:port` is an OTLP/gRPC
endpoint dialled without TLS (`tempo:4317`); without it spans are printed on standard output. Here
a real OTLP/gRPC receiver (grpcio with the opentelemetry-proto service) and the server's real stdout.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import threading

import pytest
import requests
from _otlp import trace_tree
from _otlp_grpc import OtlpGrpcReceiver
from conftest import MSGSCRIPT, Nats, free_port, wait_port, wait_until, write_script

HELLO = """--* subject: gotrace.hello
--* name: hello
function OnMessage(subject, payload) return "Hello, " .. payload end
"""

CALLER = """--* subject: gotrace.caller
--* name: caller
local nats = require("nats")
function OnMessage(subject, payload)
  local reply, err = nats.request("gotrace.peer", payload, 5)
  if err then error(err) end
  return "peer said " .. reply
end
"""

OTEL_VARIABLES = ("OTEL_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                  "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "TELEMETRY_TRACES")


@pytest.fixture
def grpc_receiver():
    receiver = OtlpGrpcReceiver()
    yield receiver
    receiver.stop()


@pytest.fixture
def clean_env(monkeypatch):
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def server_span(path: str):
    return lambda spans: any(s.kind == "SERVER" and s.attributes.get("url.path") == path for s in spans)


def test_any_telemetry_traces_value_and_a_host_port_endpoint_export_over_grpc(start_server, tmp_path, grpc_receiver,
                                                                               nats_client, clean_env):
    write_script(tmp_path, "hello.lua", HELLO)
    # "0": Go tests the variable for being non-empty, nothing else
    srv = start_server("-script", str(tmp_path), env={"TELEMETRY_TRACES": "0", "OTEL_ENDPOINT": grpc_receiver.endpoint})
    assert requests.post(f"{srv.base}/gotrace.hello", data=b"g", timeout=10).text
    assert nats_client.request("gotrace.hello", b"n").data == b"Hello, n"
    spans = grpc_receiver.wait_for(lambda spans: server_span("/gotrace.hello")(spans) and any(
        s.kind == "CONSUMER" and s.attributes.get("messaging.destination.name") == "gotrace.hello" for s in spans), 30)
    server = next(s for s in spans if s.kind == "SERVER")
    assert server.service_name == "msgscript"
    trace = [s for s in spans if s.trace_id == server.trace_id]
    assert any(s.attributes.get("msgscript.script") == "hello" and s.parent_span_id == server.span_id
               for s in trace), str(trace_tree(trace))


def test_standard_variables_with_the_grpc_protocol_also_export_over_grpc(start_server, tmp_path, grpc_receiver,
                                                                         clean_env):
    write_script(tmp_path, "hello.lua", HELLO)
    srv = start_server("-script", str(tmp_path), env={
        "TELEMETRY_TRACES": "1", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{grpc_receiver.endpoint}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})
    assert requests.post(f"{srv.base}/gotrace.hello", data=b"p", timeout=10).status_code == 200
    grpc_receiver.wait_for(server_span("/gotrace.hello"), 30)


def test_without_an_endpoint_spans_are_printed_as_json_on_stdout(tmp_path, nats_server, clean_env):
    write_script(tmp_path, "hello.lua", HELLO)
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", TELEMETRY_TRACES="1")
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen([*MSGSCRIPT, "server", "-script", str(tmp_path), "-port", str(port),
                                 "-natsurl", nats_server.url], cwd=tmp_path, stdout=stdout, stderr=stderr, env=env)
        try:
            wait_port(port, 20, proc)
            wait_until(lambda: "serving" in err.read_text(), 20)
            assert requests.post(f"http://127.0.0.1:{port}/gotrace.hello", data=b"o", timeout=10).status_code == 200
        finally:
            proc.terminate()
            proc.wait(30)
    text = out.read_text()
    decoder, spans, pos = json.JSONDecoder(), [], 0
    while (start := text.find("{", pos)) >= 0:  # one indented JSON object per span
        span, pos = decoder.raw_decode(text, start)
        spans.append(span)
    server = [s for s in spans if s["name"] == "POST /gotrace.hello"]
    assert len(server) == 1, text[:3000]
    assert server[0]["kind"] == "SpanKind.SERVER"
    assert server[0]["resource"]["attributes"]["service.name"] == "msgscript"
    assert any(s["attributes"].get("msgscript.script") == "hello" for s in spans)
    assert '"name"' not in err.read_text()  # the log stays on stderr, spans on stdout


def test_a_grpc_endpoint_without_the_grpc_exporter_is_a_one_line_error(tmp_path, nats_server, clean_env):
    blocker = tmp_path / "site"
    blocker.mkdir()
    # as if the optional package were not installed: importing it fails
    (blocker / "sitecustomize.py").write_text(
        "import sys\nsys.modules['opentelemetry.exporter.otlp.proto.grpc'] = None\n")
    env = dict(os.environ, PYTHONPATH=str(blocker), TELEMETRY_TRACES="1", OTEL_ENDPOINT="tempo:4317")
    proc = subprocess.run([*MSGSCRIPT, "server", "-script", str(tmp_path), "-port", str(free_port()),
                           "-natsurl", nats_server.url], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "opentelemetry-exporter-otlp-proto-grpc" in lines[0] and "msgscript[grpc]" in lines[0], lines[0]
    assert "OTEL_ENDPOINT=tempo:4317" in lines[0]


def test_baggage_and_traceparent_travel_on_with_a_scripts_nats_request(start_server, tmp_path, grpc_receiver,
                                                                       nats_server, clean_env):
    """Go propagates W3C trace context and baggage: an incoming baggage header reaches the script's requests."""
    write_script(tmp_path, "caller.lua", CALLER)
    srv = start_server("-script", str(tmp_path), env={"TELEMETRY_TRACES": "1", "OTEL_ENDPOINT": grpc_receiver.endpoint})
    peer = Nats(nats_server.url)
    seen = []

    async def answer(msg):
        seen.append(dict(msg.headers or {}))
        await msg.respond(b"pong")

    try:
        peer.run(peer.nc.subscribe("gotrace.peer", cb=answer))
        peer.run(peer.nc.flush())
        trace_id = secrets.token_hex(16)
        thread = threading.Thread(target=lambda: peer.run(asyncio.sleep(3)))  # the peer answers meanwhile
        thread.start()
        r = requests.post(f"{srv.base}/gotrace.caller", data=b"ping", timeout=10, headers={
            "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01", "baggage": "tenant=acme"})
        thread.join()
        assert r.status_code == 200, r.text
    finally:
        peer.close()
    assert seen and seen[0].get("baggage") == "tenant=acme", seen
    assert seen[0]["traceparent"].split("-")[1] == trace_id
