"""What an operator relies on: admin access rules, /metrics, /healthz and /readyz, traces, systemd notify.

Every test drives a real `msgscript server` process over real HTTP and NATS connections. A
"remote" client is one that connects to the machine's own non-loopback address, which is what
the server sees from any other host.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
import secrets
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests
from _otlp import OtlpReceiver, otlp_receiver, trace_tree  # noqa: F401 - otlp_receiver is a fixture
from conftest import ROOT, MsgscriptProcess, Nats, NatsServer, wait_until, write_script
from prometheus_client.parser import text_string_to_metric_families

# --- scripts ---------------------------------------------------------------------------------

MARKER = "SOURCE-MARKER-7f3a9c"  # appears only in script sources: a response containing it leaks source

HELLO = f"""--* subject: ops.hello
--* name: hello
-- {MARKER}
function OnMessage(subject, payload)
  return "Hello, " .. payload
end
"""

FAIL = f"""--* subject: ops.fail
--* name: fail
-- {MARKER}
function OnMessage(subject, payload)
  error("boom on purpose")
end
"""

LOOP = f"""--* subject: ops.loop
--* name: loop
--* timeout: 500ms
-- {MARKER}
function OnMessage(subject, payload)
  while true do end
end
"""

SLEEPY = f"""--* subject: ops.sleepy
--* name: sleepy
-- {MARKER}
function OnMessage(subject, payload)
  require("time").sleep(1.5)
  return "rested"
end
"""


def reload_script(version: str) -> str:
    return f"""--* subject: ops.reload
--* name: reload
function OnMessage(subject, payload)
  return "{version}"
end
"""




def admin_paths(subject: str = "ops.hello") -> tuple[str, ...]:
    return "/_/", "/_/list", f"/_/subject/{subject}", f"/_/info/{subject}/hello"


# --- helpers ---------------------------------------------------------------------------------

def write_atomic(directory: Path, filename: str, text: str) -> None:
    """Replace a script in one step, so the store's poll never sees a half-written file."""
    tmp = directory / f".{filename}.tmp"
    tmp.write_text(text)
    os.replace(tmp, directory / filename)


def get(url: str, **kw) -> requests.Response:
    """A GET that ignores proxy settings of the environment (the tests talk to this machine)."""
    with requests.Session() as s:
        s.trust_env = False
        return s.get(url, timeout=kw.pop("timeout", 10), **kw)


def remote(srv: MsgscriptProcess, ip: str, path: str, **kw) -> requests.Response:
    return get(f"http://{ip}:{srv.port}{path}", **kw)


def one_line(text: str) -> bool:
    return len(text.strip().splitlines()) == 1


class Scrape:
    """One GET /metrics, parsed with prometheus-client's own parser."""

    def __init__(self, base: str):
        r = get(f"{base}/metrics")
        assert r.status_code == 200, r.text
        assert r.headers["Content-Type"].startswith("text/plain"), r.headers
        self.text = r.text
        self.families = {f.name: f for f in text_string_to_metric_families(r.text)}
        self.samples = {}
        for family in self.families.values():
            for s in family.samples:
                self.samples[(s.name, tuple(sorted(s.labels.items())))] = s.value

    def get(self, name: str, **labels):
        return self.samples.get((name, tuple(sorted(labels.items()))))

    def value(self, name: str, **labels) -> float:
        v = self.get(name, **labels)
        assert v is not None, f"no sample {name}{labels} in:\n{self.text}"
        return v

    def type_of(self, family: str) -> str:
        assert family in self.families, f"no metric family {family} in:\n{self.text}"
        return self.families[family].type

    def buckets(self, **labels) -> list[tuple[float, float]]:
        out = []
        for (name, lbls), v in self.samples.items():
            d = dict(lbls)
            if name == "msgscript_call_duration_seconds_bucket" and all(d.get(k) == x for k, x in labels.items()):
                out.append((float(d["le"]), v))
        return sorted(out)


def _connectable(ip: str) -> bool:
    """True when a listener on all interfaces can be reached through `ip` from this machine."""
    with socket.socket() as listener:
        listener.bind(("0.0.0.0", 0))
        listener.listen(1)
        try:
            socket.create_connection((ip, listener.getsockname()[1]), 2).close()
            return True
        except OSError:
            return False


def _own_addresses() -> list[str]:
    found = []
    try:
        out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True,
                             text=True, timeout=10).stdout
        found += re.findall(r"\binet (\d+\.\d+\.\d+\.\d+)/", out)
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            found.append(s.getsockname()[0])
    except OSError:
        pass
    return [ip for ip in dict.fromkeys(found) if not ipaddress.ip_address(ip).is_loopback]


@pytest.fixture(scope="module")
def remote_ip():
    """A non-loopback address of this machine; a dummy interface is made when there is none."""
    for ip in _own_addresses():
        if _connectable(ip):
            yield ip
            return
    ip = "10.77.0.1"
    for cmd in (["ip", "link", "add", "msgtest", "type", "dummy"], ["ip", "addr", "add", f"{ip}/32", "dev", "msgtest"],
                ["ip", "link", "set", "msgtest", "up"]):
        subprocess.run(cmd, check=True, capture_output=True, timeout=10)
    try:
        assert _connectable(ip)
        yield ip
    finally:
        subprocess.run(["ip", "link", "del", "msgtest"], capture_output=True, timeout=10)


def _module_server(tmp_path_factory, name: str, scripts: dict[str, str], *flags: str, nats_url: str,
                   env: dict | None = None) -> tuple[MsgscriptProcess, Path]:
    cwd = tmp_path_factory.mktemp(name)
    script_dir = cwd / "scripts"
    script_dir.mkdir()
    for filename, text in scripts.items():
        write_script(script_dir, filename, text)
    return MsgscriptProcess(["-script", str(script_dir), *flags, "-natsurl", nats_url], cwd, env), script_dir


@pytest.fixture(scope="module")
def ops(tmp_path_factory, nats_server):
    """The default server (admin pages and metrics for local clients only), shared by the module."""
    srv, script_dir = _module_server(
        tmp_path_factory, "ops", {"hello.lua": HELLO, "fail.lua": FAIL, "loop.lua": LOOP, "sleepy.lua": SLEEPY,
                                  "reload.lua": reload_script("v1")},
        "-workers", "2", nats_url=nats_server.url)
    srv.script_dir = script_dir
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def admin_public(tmp_path_factory, nats_server):
    srv, _ = _module_server(tmp_path_factory, "pub", {"hello.lua": HELLO.replace("ops.hello", "pub.hello")},
                            "-admin", "public", "-metrics", "off", nats_url=nats_server.url)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def admin_off(tmp_path_factory, nats_server):
    srv, _ = _module_server(tmp_path_factory, "off", {"hello.lua": HELLO.replace("ops.hello", "off.hello")},
                            "-admin", "off", "-metrics", "public", nats_url=nats_server.url)
    yield srv
    srv.stop()


# --- admin pages -----------------------------------------------------------------------------

def test_admin_pages_answer_loopback_clients_only_by_default(ops, remote_ip):
    for path in admin_paths():
        r = get(ops.base + path)
        assert r.status_code == 200, (path, r.status_code, r.text)
        assert r.headers["Content-Type"].startswith("text/html"), path
        r = remote(ops, remote_ip, path)
        assert r.status_code == 403, (path, r.status_code, r.text)
        assert one_line(r.text) and "local" in r.text and "-admin public" in r.text, r.text
        assert MARKER not in r.text
    assert "ops.hello" in get(ops.base + "/_/list").text
    assert 'href="/_/info/ops.hello/hello"' in get(ops.base + "/_/subject/ops.hello").text
    assert MARKER in get(ops.base + "/_/info/ops.hello/hello").text  # the admin sees the source
    # IPv6 loopback is loopback too
    r = get(f"http://[::1]:{ops.port}/_/list")
    assert r.status_code == 200 and "ops.hello" in r.text


def test_script_source_never_reaches_a_remote_client(ops, remote_ip):
    spoof = {"X-Forwarded-For": "127.0.0.1", "X-Real-IP": "127.0.0.1", "Forwarded": "for=127.0.0.1",
             "Host": f"127.0.0.1:{ops.port}"}
    targets = ["/_/info/ops.hello/hello", "/_/info/ops.hello/hello/", "/_//info/ops.hello/hello",
               "/_/./info/ops.hello/hello", "/%5F/info/ops.hello/hello", "/_%2Finfo/ops.hello/hello",
               "/_/info/ops.hello/hello?raw=1", "/_/info/ops.fail/fail", "/_/info/ops.loop/loop"]
    for target in targets:
        for headers in ({}, spoof):
            r = remote(ops, remote_ip, target, headers=headers)
            assert r.status_code != 200 and MARKER not in r.text, (target, headers, r.status_code, r.text)
    # calling the scripts (the non-admin use of the server) answers with results, not sources
    for subject in ("ops.hello", "ops.fail"):
        r = remote(ops, remote_ip, f"/{subject}")
        assert MARKER not in r.text and MARKER not in base64.b64decode(
            next(iter(r.json().values()))["payload"]).decode(), r.text


def test_admin_public_opens_the_pages_and_metrics_off_is_404(admin_public, remote_ip):
    for path in admin_paths("pub.hello"):
        r = remote(admin_public, remote_ip, path)
        assert r.status_code == 200, (path, r.status_code, r.text)
    assert MARKER in remote(admin_public, remote_ip, "/_/info/pub.hello/hello").text
    for r in (get(admin_public.base + "/metrics"), remote(admin_public, remote_ip, "/metrics")):
        assert r.status_code == 404, (r.status_code, r.text)
        assert one_line(r.text) and "msgscript_" not in r.text


def test_admin_off_is_404_for_everyone_and_metrics_public_opens_metrics(admin_off, remote_ip):
    for path in admin_paths("off.hello"):
        for r in (get(admin_off.base + path), remote(admin_off, remote_ip, path)):
            assert r.status_code == 404, (path, r.status_code, r.text)
            assert one_line(r.text) and MARKER not in r.text
    r = remote(admin_off, remote_ip, "/metrics")
    assert r.status_code == 200, r.text
    families = {f.name for f in text_string_to_metric_families(r.text)}
    assert {"msgscript_calls", "msgscript_nats_connected"} <= families
    # health endpoints are not admin pages: still there
    assert get(admin_off.base + "/healthz").status_code == 200


def test_readme_page_is_rendered_html_with_working_contents_links(ops):
    r = get(ops.base + "/_/")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    page = r.text
    readme = (ROOT / "README.md").read_text()
    assert "<table>" in page and "<strong>" in page, page[:2000]
    assert "**" not in re.sub(r"<pre>.*?</pre>|<code>.*?</code>", "", page, flags=re.S)  # bold is rendered
    links = re.findall(r'href="#([^"]+)"', page)
    assert "writing-scripts" in links, links
    assert re.search(r'<h2 id="writing-scripts">Writing scripts</h2>', page), \
        re.findall(r"<h2[^>]*>[^<]*</h2>", page)
    ids = set(re.findall(r'<h[1-6] id="([^"]+)"', page))
    missing = [link for link in links if link not in ids]
    assert not missing, f"contents links without a heading: {missing}; heading ids: {sorted(ids)}"
    assert set(re.findall(r"\]\(#([^)]+)\)", readme)) <= ids  # every in-page link of the README lands


# --- metrics ---------------------------------------------------------------------------------

def test_metrics_answer_loopback_clients_only_by_default(ops, remote_ip):
    r = get(ops.base + "/metrics")
    assert r.status_code == 200 and "version=0.0.4" in r.headers["Content-Type"], r.headers
    r = remote(ops, remote_ip, "/metrics")
    assert r.status_code == 403, (r.status_code, r.text)
    assert one_line(r.text) and "-metrics public" in r.text and "msgscript_" not in r.text, r.text


def test_call_metrics_count_calls_errors_timeouts_and_durations(ops, nats_client):
    hello, fail, loop = ({"subject": f"ops.{n}", "script": n} for n in ("hello", "fail", "loop"))
    before = Scrape(ops.base)  # other tests of the module call these scripts too: count what this one adds

    def was(name, **labels):
        return before.get(name, **labels) or 0

    for i in range(3):
        assert get(f"{ops.base}/ops.hello", data=b"x").status_code == 200
        assert requests.post(f"{ops.base}/ops.hello", data=f"http{i}", timeout=10).status_code == 200
    for i in range(2):
        assert nats_client.request("ops.hello", f"nats{i}".encode()).data == f"Hello, nats{i}".encode()
    for _ in range(2):
        r = requests.post(f"{ops.base}/ops.fail", data=b"x", timeout=10)
        assert r.status_code == 500 and "boom on purpose" in r.json()["fail"]["error"], r.text
    r = requests.post(f"{ops.base}/ops.loop", data=b"x", timeout=20)
    assert r.status_code == 504, (r.status_code, r.text)

    m = Scrape(ops.base)

    def added(name, **labels):
        return (m.get(name, **labels) or 0) - was(name, **labels)

    assert m.type_of("msgscript_calls") == "counter"
    assert added("msgscript_calls_total", **hello) == 8
    assert added("msgscript_calls_total", **fail) == 2
    assert added("msgscript_calls_total", **loop) == 1
    assert m.get("msgscript_errors_total", **hello, code="500") in (None, 0)
    assert added("msgscript_errors_total", **fail, code="500") == 2
    assert added("msgscript_errors_total", **loop, code="504") == 1
    assert m.get("msgscript_errors_total", **loop, code="500") in (None, 0)
    assert added("msgscript_timeouts_total", **loop) == 1
    assert m.value("msgscript_timeouts_total", **fail) == 0
    assert m.value("msgscript_timeouts_total", **hello) == 0

    assert m.type_of("msgscript_call_duration_seconds") == "histogram"
    for labels in (hello, fail, loop):
        buckets = m.buckets(**labels)
        assert buckets and buckets[-1][0] == float("inf"), buckets
        counts = [n for _, n in buckets]
        assert counts == sorted(counts), f"buckets are not cumulative: {buckets}"
        assert counts[-1] == m.value("msgscript_call_duration_seconds_count", **labels) \
            == m.value("msgscript_calls_total", **labels)
        assert m.value("msgscript_call_duration_seconds_sum", **labels) >= 0
    assert added("msgscript_call_duration_seconds_count", **hello) == 8
    # the timed-out call ran until its 500ms deadline: its duration is in a bucket at or above that
    loops = m.value("msgscript_calls_total", **loop)
    assert m.value("msgscript_call_duration_seconds_sum", **loop) >= 0.45 * loops
    assert all(n == 0 for le, n in m.buckets(**loop) if le < 0.45), m.buckets(**loop)
    assert added("msgscript_call_duration_seconds_sum", **loop) < 30  # counted once, not many times over

    assert m.type_of("msgscript_worker_threads") == "gauge"
    assert 2 <= m.value("msgscript_worker_threads") <= 64  # -workers 2, default -max-workers 64
    assert m.value("msgscript_lua_runtimes") >= 1
    assert m.value("msgscript_nats_connected") == 1
    assert m.value("msgscript_nats_reconnects_total") == 0
    assert m.value("msgscript_inflight_calls") == 0
    assert m.value("msgscript_store_reloads_total") >= 5  # the five scripts, loaded at start
    assert m.value("msgscript_store_load_errors_total") == 0


def test_inflight_gauge_counts_a_call_in_progress(ops):
    out = {}
    worker = threading.Thread(target=lambda: out.update(r=requests.post(f"{ops.base}/ops.sleepy", timeout=20)))
    worker.start()
    try:
        wait_until(lambda: Scrape(ops.base).value("msgscript_inflight_calls") >= 1, timeout=10)
    finally:
        worker.join(20)
    assert out["r"].status_code == 200, out["r"].text
    wait_until(lambda: Scrape(ops.base).value("msgscript_inflight_calls") == 0, timeout=10)


def test_store_reload_and_load_error_metrics(ops):
    before = Scrape(ops.base)
    reloads = before.value("msgscript_store_reloads_total")
    errors = before.value("msgscript_store_load_errors_total")

    def payload():
        r = requests.post(f"{ops.base}/ops.reload", timeout=10)
        return base64.b64decode(r.json()["reload"]["payload"]).decode()

    assert payload() == "v1"
    write_atomic(ops.script_dir, "reload.lua", reload_script("version 2"))
    wait_until(lambda: payload() == "version 2", timeout=15)
    assert Scrape(ops.base).value("msgscript_store_reloads_total") >= reloads + 1
    assert Scrape(ops.base).value("msgscript_store_load_errors_total") == errors

    write_atomic(ops.script_dir, "reload.lua", reload_script("broken") + "\nfunction (\n")
    wait_until(lambda: Scrape(ops.base).value("msgscript_store_load_errors_total") >= errors + 1, timeout=15)
    assert "reload.lua" in ops.log
    assert payload() == "version 2"  # the last good version keeps serving
    time.sleep(2)  # several polls of the unchanged broken file: counted once, not on every poll
    assert Scrape(ops.base).value("msgscript_store_load_errors_total") == errors + 1

    write_atomic(ops.script_dir, "reload.lua", reload_script("v1"))
    wait_until(lambda: payload() == "v1", timeout=15)


# --- health ----------------------------------------------------------------------------------

def test_healthz_and_readyz_answer_everyone(ops, admin_off, remote_ip):
    for srv in (ops, admin_off):
        for r in (get(srv.base + "/healthz"), remote(srv, remote_ip, "/healthz")):
            assert r.status_code == 200, (r.status_code, r.text)
        for r in (get(srv.base + "/readyz"), remote(srv, remote_ip, "/readyz")):
            assert r.status_code == 200 and r.text.strip() == "ready", (r.status_code, r.text)


def test_readyz_is_503_while_nats_is_down_and_recovers(start_server, tmp_path, remote_ip):
    own = NatsServer()
    client = None
    try:
        write_script(tmp_path, "hello.lua", HELLO)
        srv = start_server("-script", str(tmp_path), "-natsurl", own.url, nats=False)
        assert get(srv.base + "/readyz").text.strip() == "ready"
        m = Scrape(srv.base)
        assert m.value("msgscript_nats_connected") == 1 and m.value("msgscript_nats_reconnects_total") == 0

        own.stop()
        wait_until(lambda: get(srv.base + "/readyz").status_code == 503, 15)
        r = get(srv.base + "/readyz")
        assert r.status_code == 503, r.text
        assert one_line(r.text) and "NATS" in r.text, r.text
        r = remote(srv, remote_ip, "/readyz")
        assert r.status_code == 503 and "NATS" in r.text, (r.status_code, r.text)
        assert get(srv.base + "/healthz").status_code == 200  # alive: a supervisor must not restart it
        assert remote(srv, remote_ip, "/healthz").status_code == 200
        assert Scrape(srv.base).value("msgscript_nats_connected") == 0
        r = requests.post(f"{srv.base}/ops.hello", data=b"offline", timeout=10)  # HTTP needs no NATS
        assert r.status_code == 200, r.text
        assert srv.proc.poll() is None

        own.start()
        wait_until(lambda: get(srv.base + "/readyz").status_code == 200, 30)
        assert get(srv.base + "/readyz").text.strip() == "ready"
        m = Scrape(srv.base)
        assert m.value("msgscript_nats_connected") == 1
        assert m.value("msgscript_nats_reconnects_total") == 1
        client = Nats(own.url)
        reply = wait_until(lambda: client.request("ops.hello", b"back", timeout=2), 15)
        assert reply.data == b"Hello, back"
    finally:
        if client is not None:
            client.close()
        own.stop()


def test_readyz_is_not_ready_while_draining(start_server, tmp_path, remote_ip):
    write_script(tmp_path, "slow.lua", """--* subject: ops.slowweb
--* name: slow
--* http: true
function GET() require("time").sleep(2.5) return "finished", 200 end
""")
    srv = start_server("-script", str(tmp_path))
    assert get(srv.base + "/readyz").status_code == 200
    out = {}
    worker = threading.Thread(target=lambda: out.update(r=get(f"{srv.base}/ops.slowweb", timeout=30)))
    worker.start()
    try:
        wait_until(lambda: Scrape(srv.base).value("msgscript_inflight_calls") >= 1, timeout=10)
        srv.proc.send_signal(signal.SIGTERM)
        srv.wait_log("stopping", 10)
        assert srv.proc.poll() is None  # still finishing the slow call
        for url in (srv.base + "/readyz", f"http://{remote_ip}:{srv.port}/readyz"):
            try:
                r = get(url, timeout=5)
            except requests.ConnectionError:
                continue  # refused: a load balancer takes it out of rotation just the same
            assert r.status_code == 503 and "draining" in r.text, (url, r.status_code, r.text)
    finally:
        worker.join(30)
    assert out["r"].status_code == 200 and out["r"].text == "finished"
    assert srv.proc.wait(20) == 0


def test_max_connections_refuses_extra_connections_with_503(start_server, tmp_path):
    write_script(tmp_path, "hello.lua", HELLO)
    srv = start_server("-script", str(tmp_path), "-max-connections", "2")
    request = f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\n\r\n".encode()

    def exchange(sock: socket.socket) -> bytes:
        sock.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data or not data.endswith(b"ok\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        return data

    # the start-up probe's connection is gone once a scrape sees only its own
    wait_until(lambda: Scrape(srv.base).value("msgscript_http_connections") == 1, 10)
    held = [socket.create_connection(("127.0.0.1", srv.port), 5) for _ in range(2)]
    try:
        for s in held:
            s.settimeout(5)
            assert exchange(s).startswith(b"HTTP/1.1 200"), "a keep-alive connection within the limit"
        with socket.create_connection(("127.0.0.1", srv.port), 5) as extra:
            extra.settimeout(5)
            data = b""
            while chunk := extra.recv(4096):
                data += chunk
            assert data.startswith(b"HTTP/1.1 503") and b"too many connections" in data, data
        assert exchange(held[0]).startswith(b"HTTP/1.1 200")  # the held connections still work
        held.pop().close()
        wait_until(lambda: get(srv.base + "/healthz").status_code == 200, 10)
    finally:
        for s in held:
            s.close()


# --- traces ----------------------------------------------------------------------------------

FRONT = """--* subject: optrace.front
--* name: front
local nats = require("nats")
function OnMessage(subject, payload)
  local reply, err = nats.request("optrace.back", payload, 5)
  if err then error(err) end
  return "front got " .. reply
end
"""

BACK = """--* subject: optrace.back
--* name: back
function OnMessage(subject, payload)
  return "back:" .. payload
end
"""


@pytest.fixture(scope="module")
def traced(tmp_path_factory, nats_server, otlp_receiver):  # noqa: F811 - the imported fixture
    srv, _ = _module_server(tmp_path_factory, "traced", {"front.lua": FRONT, "back.lua": BACK},
                            nats_url=nats_server.url,
                            env={"TELEMETRY_TRACES": "1", "OTEL_ENDPOINT": otlp_receiver.url})
    yield srv
    srv.stop()


def _children(spans, parent):
    return [s for s in spans if s.parent_span_id == parent.span_id]


def test_one_trace_spans_http_request_script_and_nats_hop(traced, otlp_receiver):  # noqa: F811
    r = requests.post(f"{traced.base}/optrace.front", data=b"x", timeout=10)
    assert r.status_code == 200, r.text
    assert base64.b64decode(r.json()["front"]["payload"]) == b"front got back:x"

    def complete(spans):
        servers = [s for s in spans if s.kind == "SERVER" and s.attributes.get("url.path") == "/optrace.front"]
        if not servers:
            return False
        trace = [s for s in spans if s.trace_id == servers[0].trace_id]
        return (any(s.kind == "CONSUMER" for s in trace)
                and any(s.attributes.get("msgscript.script") == "back" for s in trace)
                and sum(s.name == "store lookup" for s in trace) >= 2)

    spans = otlp_receiver.wait_for(complete, timeout=30)
    server = next(s for s in spans if s.kind == "SERVER" and s.attributes.get("url.path") == "/optrace.front")
    trace = [s for s in spans if s.trace_id == server.trace_id]
    tree = str(trace_tree(trace))
    assert server.parent_span_id == "", tree
    assert server.attributes.get("http.request.method") == "POST", tree
    assert server.service_name == "msgscript", tree
    assert server.status_code != "ERROR", tree

    under_server = _children(trace, server)
    assert [s.kind for s in under_server if s.name == "store lookup"] == ["INTERNAL"], tree
    fronts = [s for s in under_server if s.attributes.get("msgscript.script") == "front"
              and not s.attributes.get("msgscript.moved_to_worker")]
    assert len(fronts) == 1, tree
    front = fronts[0]
    assert front.attributes.get("msgscript.subject") == "optrace.front", tree
    assert front.attributes.get("msgscript.executor") == "lua", tree
    assert front.status_code != "ERROR", tree

    consumers = [s for s in trace if s.kind == "CONSUMER"]
    assert len(consumers) == 1, tree
    consumer = consumers[0]
    assert consumer.parent_span_id == front.span_id, f"the NATS hop is not under the calling script:\n{tree}"
    assert consumer.attributes.get("messaging.system") == "nats", tree
    assert consumer.attributes.get("messaging.destination.name") == "optrace.back", tree
    under_consumer = _children(trace, consumer)
    assert any(s.name == "store lookup" for s in under_consumer), tree
    backs = [s for s in under_consumer if s.attributes.get("msgscript.script") == "back"
             and not s.attributes.get("msgscript.moved_to_worker")]
    assert len(backs) == 1, tree
    assert backs[0].attributes.get("msgscript.subject") == "optrace.back", tree
    assert backs[0].attributes.get("msgscript.executor") == "lua", tree

    # the request made one trace: no span about these subjects landed in another trace
    related = [s for s in spans if ("optrace.front" in str(s.attributes) or "optrace.back" in str(s.attributes))
               and server.start_ns <= s.start_ns <= server.end_ns]
    assert {s.trace_id for s in related} == {server.trace_id}, str(trace_tree(related))
    for s in trace:  # every parent link resolves inside the trace
        assert s.parent_span_id == "" or s.parent_span_id in {t.span_id for t in trace}, tree
        assert server.start_ns <= s.start_ns and s.end_ns <= server.end_ns + 10**9, tree


def test_incoming_traceparent_makes_the_server_span_a_child(traced, otlp_receiver):  # noqa: F811
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    r = requests.post(f"{traced.base}/optrace.back", data=b"y", timeout=10,
                      headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})
    assert r.status_code == 200, r.text
    spans = otlp_receiver.wait_for(
        lambda spans: any(s.trace_id == trace_id and s.kind == "SERVER" for s in spans)
        and any(s.trace_id == trace_id and s.attributes.get("msgscript.script") == "back" for s in spans), 30)
    trace = [s for s in spans if s.trace_id == trace_id]
    tree = str(trace_tree(trace))
    server = next(s for s in trace if s.kind == "SERVER")
    assert server.parent_span_id == parent_id, tree
    assert server.attributes.get("url.path") == "/optrace.back", tree
    back = next(s for s in trace if s.attributes.get("msgscript.script") == "back")
    assert back.parent_span_id == server.span_id, tree


def test_otel_exporter_otlp_endpoint_alone_also_exports(start_server, tmp_path, otlp_receiver, monkeypatch):  # noqa: F811
    monkeypatch.delenv("OTEL_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    write_script(tmp_path, "hello.lua", HELLO.replace("ops.hello", "optrace2.hello"))
    srv = start_server("-script", str(tmp_path),
                       env={"TELEMETRY_TRACES": "1", "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.url})
    assert requests.post(f"{srv.base}/optrace2.hello", data=b"z", timeout=10).status_code == 200
    spans = otlp_receiver.wait_for(lambda spans: any(
        s.kind == "SERVER" and s.attributes.get("url.path") == "/optrace2.hello" for s in spans), 30)
    server = next(s for s in spans if s.kind == "SERVER" and s.attributes.get("url.path") == "/optrace2.hello")
    assert server.service_name == "msgscript"
    assert any(s.parent_span_id == server.span_id and s.attributes.get("msgscript.script") == "hello"
               for s in spans), str(trace_tree(s for s in spans if s.trace_id == server.trace_id))


def test_no_spans_without_telemetry_traces(start_server, tmp_path, nats_client, monkeypatch):
    monkeypatch.delenv("TELEMETRY_TRACES", raising=False)
    receiver = OtlpReceiver()
    try:
        write_script(tmp_path, "hello.lua", HELLO.replace("ops.hello", "optrace3.hello"))
        srv = start_server("-script", str(tmp_path),
                           env={"OTEL_ENDPOINT": receiver.url, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url})
        traceparent = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
        assert requests.post(f"{srv.base}/optrace3.hello", data=b"q", timeout=10,
                             headers={"traceparent": traceparent}).status_code == 200
        assert nats_client.request("optrace3.hello", b"q").data == b"Hello, q"
        assert srv.stop() == 0  # a tracing server flushes its spans on exit: none may come
        time.sleep(0.5)
        assert receiver.spans == [] and receiver.errors == [], str(trace_tree(receiver.spans))
    finally:
        receiver.stop()


# --- systemd ---------------------------------------------------------------------------------

def test_systemd_notify_ready_and_stopping(start_server, tmp_path):
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(str(sock_path))
        sock.settimeout(20)
        write_script(tmp_path, "hello.lua", HELLO)
        srv = start_server("-script", str(tmp_path), env={"NOTIFY_SOCKET": str(sock_path)})
        first = sock.recv(4096).decode()
        assert "READY=1" in first.split("\n"), first
        assert get(srv.base + "/healthz").status_code == 200  # ready means serving
        assert requests.post(f"{srv.base}/ops.hello", data=b"sd", timeout=10).status_code == 200
        srv.proc.send_signal(signal.SIGTERM)
        second = sock.recv(4096).decode()
        assert "STOPPING=1" in second.split("\n"), second
        assert srv.proc.wait(20) == 0
    finally:
        sock.close()
