"""The core server, driven as a user drives it: script files, NATS requests, HTTP requests."""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import json
import shutil
import time
from pathlib import Path

import pytest
import requests
from conftest import ROOT, NatsServer, wait_until, write_script

EXAMPLES = ROOT / "examples"

HELLO = """--* subject: funcs.hello
--* name: hello
function OnMessage(subject, payload)
  return "Processed subject: " .. subject .. " with payload: " .. payload
end
"""


@pytest.fixture
def examples_dir(tmp_path):
    d = tmp_path / "scripts"
    d.mkdir()
    for f in EXAMPLES.glob("*.lua"):
        shutil.copy(f, d)
    return d


@pytest.fixture
def examples_server(start_server, examples_dir):
    return start_server("-script", str(examples_dir))


def error_of(msg):
    return (msg.headers or {}).get("Nats-Service-Error"), (msg.headers or {}).get("Nats-Service-Error-Code")




# --- the README's examples -------------------------------------------------------------------

def test_hello_over_nats(examples_server, nats_client):
    msg = nats_client.request("funcs.hello", b"John")
    assert msg.data == b"Processed subject: funcs.hello with payload: John"
    assert not msg.headers  # one script: its string as is, like the original


def test_hello_over_http_is_json_keyed_by_name(examples_server):
    r = requests.post(f"{examples_server.base}/funcs.hello", data=b"John")
    assert r.status_code == 200
    doc = r.json()
    assert set(doc) == {"hello"}
    assert doc["hello"]["http_code"] == 200 and doc["hello"]["error"] == "" and doc["hello"]["is_html"] is False
    assert base64.b64decode(doc["hello"]["payload"]) == b"Processed subject: funcs.hello with payload: John"


def test_http_mode_script_sets_body_status_and_headers(examples_server):
    r = requests.post(f"{examples_server.base}/http.hello", data="John")
    assert (r.status_code, r.text, r.headers["Content-Type"]) == (200, "Hello, John!", "text/plain")


def test_json_example(examples_server, nats_client):
    assert nats_client.request("example.json", b'{"name": "John"}').data == b"Hello, John!"


def test_failing_example_reports_lua_error(examples_server, nats_client):
    r = requests.get(f"{examples_server.base}/example.failing")
    assert r.status_code == 500
    assert "attempt to call global 'someUndefinedFunction' (a nil value)" in r.json()["failing"]["error"]
    text, code = error_of(nats_client.request("example.failing", b"x"))
    assert code == "500" and "someUndefinedFunction" in text
    assert nats_client.request("funcs.hello", b"still").data.endswith(b"still")


# --- HTTP front ---------------------------------------------------------------------------

def test_http_url_passed_to_verb_function(start_server, tmp_path):
    write_script(tmp_path, "echo.lua", """--* subject: web.echo
--* name: echo
--* http: true
function GET(url, body) return "url=" .. url end
function PUT(url, body) return "put " .. body, 201, {["X-Thing"] = "yes"} end
""")
    srv = start_server("-script", str(tmp_path))
    assert requests.get(f"{srv.base}/web.echo").text == "url=/"
    assert requests.get(f"{srv.base}/web.echo/a/b?x=1&y=2").text == "url=/a/b?x=1&y=2"
    r = requests.get(f"{srv.base}/web.echo")
    assert r.headers["Content-Type"] == "text/html"
    r = requests.put(f"{srv.base}/web.echo", data="it")
    assert (r.status_code, r.text, r.headers["X-Thing"]) == (201, "put it", "yes")
    r = requests.delete(f"{srv.base}/web.echo")
    assert r.status_code == 405 and "DELETE" in r.text


def test_http_errors_404_400_413(examples_server):
    base = examples_server.base
    assert requests.get(f"{base}/no.such.subject").status_code == 404
    assert requests.get(f"{base}/funcs.hello/%2F..%2Fetc").status_code == 400
    conn = http.client.HTTPConnection("127.0.0.1", examples_server.port)
    conn.putrequest("GET", "/funcs.hello/../../etc/passwd", skip_host=False)
    conn.endheaders()
    assert conn.getresponse().status == 400
    assert requests.get(f"{base}/bad%20subject").status_code == 400
    assert requests.get(f"{base}/a..b").status_code == 400
    r = requests.post(f"{base}/funcs.hello", data=b"x" * (8 * 2**20 + 1))
    assert r.status_code == 413
    with socketpair_raw(examples_server.port) as s:
        s.sendall(b"POST /funcs.hello HTTP/1.1\r\nHost: x\r\nContent-Length: banana\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    with socketpair_raw(examples_server.port) as s:
        s.sendall(b"NONSENSE\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    assert requests.post(f"{base}/funcs.hello", data=b"ok").status_code == 200


class socketpair_raw:
    def __init__(self, port):
        import socket

        self.s = socket.create_connection(("127.0.0.1", port), 5)

    def __enter__(self):
        return self.s

    def __exit__(self, *exc):
        self.s.close()


def test_exactly_8mib_body_is_accepted(examples_server):
    r = requests.post(f"{examples_server.base}/funcs.hello", data=b"x" * (8 * 2**20))
    assert r.status_code == 200


def test_keep_alive_reuses_one_connection(examples_server):
    conn = http.client.HTTPConnection("127.0.0.1", examples_server.port)
    for i in range(20):
        conn.request("POST", "/http.hello", body=f"n{i}")
        r = conn.getresponse()
        assert r.read() == f"Hello, n{i}!".encode()
    sock = conn.sock
    conn.request("POST", "/http.hello", body="last")
    conn.getresponse().read()
    assert conn.sock is sock


def test_admin_pages_escape_source(start_server, tmp_path):
    write_script(tmp_path, "x.lua", """--* subject: adm.x
--* name: x<y>
-- <script>alert(1)</script>
function OnMessage() return "" end
""")
    srv = start_server("-script", str(tmp_path))
    assert "msgscript" in requests.get(f"{srv.base}/_/").text
    assert "adm.x" in requests.get(f"{srv.base}/_/list").text
    assert "x&lt;y&gt;" in requests.get(f"{srv.base}/_/subject/adm.x").text
    page = requests.get(f"{srv.base}/_/info/adm.x/x%3Cy%3E").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>" not in page
    assert requests.get(f"{srv.base}/_/info/adm.x/nope").status_code == 404


# --- NATS front ---------------------------------------------------------------------------

def test_several_scripts_on_one_subject_each_reply(start_server, tmp_path, nats_client):
    for name in ("one", "two"):
        write_script(tmp_path, f"{name}.lua", f"""--* subject: multi.sub
--* name: {name}
function OnMessage(s, p) return "{name}:" .. p end
""")
    srv = start_server("-script", str(tmp_path))

    async def collect():
        inbox = nats_client.nc.new_inbox()
        sub = await nats_client.nc.subscribe(inbox)
        await nats_client.nc.publish("multi.sub", b"x", reply=inbox)
        msgs = [await sub.next_msg(5), await sub.next_msg(5)]
        return {m.headers["Msgscript-Name"]: m.data for m in msgs}

    assert nats_client.run(collect()) == {"one": b"one:x", "two": b"two:x"}
    doc = requests.post(f"{srv.base}/multi.sub", data="y").json()
    assert {k: base64.b64decode(v["payload"]) for k, v in doc.items()} == {"one": b"one:y", "two": b"two:y"}


def test_envelope_message_gets_go_style_reply(examples_server, nats_client):
    env = {"subject": "funcs.hello", "payload": base64.b64encode(b"Env").decode(), "method": "POST",
           "url": "/", "async": False, "executor": "lua", "raw": False}
    doc = json.loads(nats_client.request("funcs.hello", json.dumps(env).encode()).data)
    assert doc["error"] == "" and doc["is_html"] is False
    [res] = doc["script_result"]
    assert base64.b64decode(res["payload"]) == b"Processed subject: funcs.hello with payload: Env"
    env["async"] = True
    assert json.loads(nats_client.request("funcs.hello", json.dumps(env).encode()).data) == {}
    env2 = dict(env, subject="http.hello", method="GET", **{"async": False})
    doc = json.loads(nats_client.request("http.hello", json.dumps(env2).encode()).data)
    assert doc["is_html"] is True and base64.b64decode(doc["script_result"][0]["payload"]) == b"Hello, Env!"


def test_malformed_envelope_is_a_raw_payload(examples_server, nats_client):
    data = b'{"payload": "not base64!!", "oops'
    assert nats_client.request("funcs.hello", data).data.endswith(data)
    data = b'{"payload": "%%%"}'
    assert nats_client.request("funcs.hello", data).data.endswith(data)


def test_non_utf8_and_empty_payloads(start_server, tmp_path, nats_client):
    write_script(tmp_path, "echo.lua", """--* subject: bin.echo
--* name: echo
function OnMessage(s, p) return p end
""")
    srv = start_server("-script", str(tmp_path))
    blob = bytes(range(256)) * 4
    assert nats_client.request("bin.echo", blob).data == blob
    assert nats_client.request("bin.echo", b"").data == b""
    doc = requests.post(f"{srv.base}/bin.echo", data=blob).json()
    assert base64.b64decode(doc["echo"]["payload"]) == blob


def test_unknown_subject_over_nats_is_404(start_server, tmp_path, nats_client):
    write_script(tmp_path, "a.lua", HELLO)
    start_server("-script", str(tmp_path))
    import nats.errors

    with pytest.raises(nats.errors.NoRespondersError):  # not subscribed at all
        nats_client.request("funcs.nobody", b"x", timeout=1)


def test_non_string_returns_give_empty_payload_and_warning(start_server, tmp_path, nats_client):
    for name, value in (("num", "42"), ("nil", "nil"), ("tbl", "{1, 2}")):
        write_script(tmp_path, f"{name}.lua", f"""--* subject: ret.{name}
--* name: {name}
function OnMessage() return {value} end
""")
    srv = start_server("-script", str(tmp_path))
    for name in ("num", "nil", "tbl"):
        msg = nats_client.request(f"ret.{name}", b"")
        assert msg.data == b"" and error_of(msg) == (None, None)
    srv.wait_log("Script returned no response")


def test_discovery_ping_info_stats(examples_server, nats_client):
    nats_client.request("funcs.hello", b"count me")
    info = json.loads(nats_client.request("$SRV.INFO.msgscript", b"").data)
    assert {"funcs.hello", "http.hello"} <= {e["subject"] for e in info["endpoints"]}
    stats = json.loads(nats_client.request("$SRV.STATS", b"").data)
    hello = next(e for e in stats["endpoints"] if e["subject"] == "funcs.hello")
    assert hello["num_requests"] >= 1 and hello["queue_group"] == "msgscript"
    assert json.loads(nats_client.request("$SRV.PING", b"").data)["name"] == "msgscript"


# --- store: directory scan and hot reload --------------------------------------------------

def test_bad_scripts_are_skipped_with_their_file_named(start_server, tmp_path, nats_client):
    write_script(tmp_path, "good.lua", HELLO)
    write_script(tmp_path, "nosubject.lua", "--* name: x\nfunction OnMessage() return 'x' end\n")
    write_script(tmp_path, "noname.lua", "--* subject: x.y\nfunction OnMessage() return 'x' end\n")
    write_script(tmp_path, "syntax.lua", "--* subject: syn.tax\n--* name: s\nfunction OnMessage( return end\n")
    write_script(tmp_path, "badsubj.lua", "--* subject: bad subject\n--* name: b\n")
    srv = start_server("-script", str(tmp_path))
    for f in ("nosubject.lua", "noname.lua", "syntax.lua", "badsubj.lua"):
        assert f in srv.log
    assert "missing required header '--* subject" in srv.log
    assert nats_client.request("funcs.hello", b"ok").data.endswith(b"ok")


def test_hot_reload_add_edit_delete(start_server, tmp_path, nats_client):
    write_script(tmp_path, "a.lua", HELLO)
    srv = start_server("-script", str(tmp_path))
    write_script(tmp_path, "b.lua", "--* subject: hot.b\n--* name: b\nfunction OnMessage() return 'v1' end\n")
    assert wait_until(lambda: nats_client.request("hot.b", b"", timeout=0.5).data == b"v1")
    write_script(tmp_path, "b.lua", "--* subject: hot.b\n--* name: b\nfunction OnMessage() return 'v2!' end\n")
    assert wait_until(lambda: nats_client.request("hot.b", b"", timeout=0.5).data == b"v2!")
    # a broken edit keeps the last good version serving
    write_script(tmp_path, "b.lua", "--* subject: hot.b\n--* name: b\nfunction OnMessage( end\n")
    srv.wait_log("Lua syntax error")
    assert nats_client.request("hot.b", b"").data == b"v2!"
    (tmp_path / "b.lua").unlink()
    wait_until(lambda: requests.get(f"{srv.base}/hot.b").status_code == 404)


# --- isolation, timeouts, memory, limits ----------------------------------------------------

def test_globals_do_not_leak_between_messages(start_server, tmp_path, nats_client):
    write_script(tmp_path, "g.lua", """--* subject: iso.g
--* name: g
counter = (counter or 0) + 1
function OnMessage()
  seen = (seen or 0) + 1
  return tostring(counter) .. "/" .. tostring(seen)
end
""")
    start_server("-script", str(tmp_path))
    assert {nats_client.request("iso.g", b"").data for _ in range(10)} == {b"1/1"}


def test_infinite_loop_is_stopped_even_under_pcall(start_server, tmp_path, nats_client):
    write_script(tmp_path, "loop.lua", """--* subject: slow.loop
--* name: loop
--* timeout: 300ms
function OnMessage()
  while true do pcall(function() while true do end end) end
end
""")
    write_script(tmp_path, "ok.lua", HELLO)
    srv = start_server("-script", str(tmp_path))
    msg = nats_client.request("slow.loop", b"", timeout=5)
    text, code = error_of(msg)
    assert code == "504" and "timed out" in text
    r = requests.get(f"{srv.base}/slow.loop")
    assert r.status_code == 504
    for _ in range(3):  # the workers are reusable and others keep being served
        assert nats_client.request("funcs.hello", b"a").data.endswith(b"a")
    assert error_of(nats_client.request("slow.loop", b""))[1] == "504"


def test_http_timeout_query_parameter(start_server, tmp_path):
    write_script(tmp_path, "spin.lua", """--* subject: slow.spin
--* name: spin
function OnMessage() while true do end end
""")
    srv = start_server("-script", str(tmp_path), "-http-timeout", "3s")
    started = time.monotonic()
    r = requests.get(f"{srv.base}/slow.spin?_timeout=200ms")
    assert r.status_code == 504 and time.monotonic() - started < 2.5


def test_memory_limit(start_server, tmp_path, nats_client):
    write_script(tmp_path, "bomb.lua", """--* subject: mem.bomb
--* name: bomb
--* memory: 8MiB
function OnMessage()
  local t = {}
  for i = 1, 1e8 do t[i] = string.rep("x", 64) .. i end
end
""")
    write_script(tmp_path, "ok.lua", HELLO)
    start_server("-script", str(tmp_path))
    text, code = error_of(nats_client.request("mem.bomb", b"", timeout=10))
    assert code == "500" and "memory limit" in text
    assert nats_client.request("funcs.hello", b"b").data.endswith(b"b")


def test_over_the_inflight_limit_answers_429(start_server, tmp_path, nats_client):
    write_script(tmp_path, "slow.lua", """--* subject: slow.busy
--* name: busy
function OnMessage()
  local t = os.time()
  while os.time() - t < 2 do end
  return "done"
end
""")
    srv = start_server("-script", str(tmp_path), "-max-inflight", "2")
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda _: requests.get(f"{srv.base}/slow.busy").status_code, range(6)))
    assert codes.count(429) >= 1 and codes.count(200) >= 1
    msg = nats_client.request("slow.busy", b"")  # nothing in flight any more: served again
    assert msg.data == b"done" and error_of(msg) == (None, None)


def test_erroring_script_under_200_concurrent_requests(start_server, tmp_path):
    write_script(tmp_path, "err.lua", """--* subject: err.always
--* name: err
function OnMessage() error("nope") end
""")
    write_script(tmp_path, "ok.lua", HELLO)
    srv = start_server("-script", str(tmp_path))
    with concurrent.futures.ThreadPoolExecutor(200) as pool:
        responses = list(pool.map(lambda _: requests.get(f"{srv.base}/err.always", timeout=30), range(200)))
    assert {r.status_code for r in responses} == {500}
    assert all("nope" in r.json()["err"]["error"] for r in responses)
    assert "Traceback" not in srv.log
    assert requests.post(f"{srv.base}/funcs.hello", data="alive").status_code == 200


def test_two_scripts_run_at_the_same_time(start_server, tmp_path):
    for name in ("p1", "p2"):
        write_script(tmp_path, f"{name}.lua", f"""--* subject: par.run
--* name: {name}
local time = require("time")
function OnMessage()
  local start = time.unix()
  local x = 0
  while time.unix() - start < 0.4 do x = x + 1 end
  return string.format("%.6f %.6f", start, time.unix())
end
""")
    srv = start_server("-script", str(tmp_path))
    doc = requests.get(f"{srv.base}/par.run").json()
    (a0, a1), (b0, b1) = [map(float, base64.b64decode(v["payload"]).split()) for v in doc.values()]
    assert a0 < b1 and b0 < a1, "the two scripts did not overlap"


# --- NATS server lifecycle -----------------------------------------------------------------

def test_embedded_nats_when_no_url(start_server, tmp_path, monkeypatch):
    write_script(tmp_path, "a.lua", HELLO)
    srv = start_server("-script", str(tmp_path), nats=False)
    srv.wait_log("started embedded NATS server at nats://127.0.0.1:")
    url = srv.log.split("started embedded NATS server at ")[1].split()[0]
    from conftest import Nats

    client = Nats(url)
    try:
        assert client.request("funcs.hello", b"emb").data.endswith(b"emb")
    finally:
        client.close()
    port = int(url.rsplit(":", 1)[1])
    srv.stop()
    import socket

    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), 0.5)


def test_survives_nats_restart(start_server, tmp_path):
    from conftest import Nats

    own = NatsServer()
    try:
        write_script(tmp_path, "a.lua", HELLO)
        srv = start_server("-script", str(tmp_path), "-natsurl", own.url, "-workers", "1", "-max-workers", "1",
                           nats=False)
        client = Nats(own.url)
        assert client.request("funcs.hello", b"before").data.endswith(b"before")
        client.close()
        own.stop()
        srv.wait_log("disconnected from NATS")
        own.start()
        srv.wait_log("reconnected to NATS", 15)
        time.sleep(0.5)  # the server's subscriptions are sent again right after the reconnect
        client = Nats(own.url)
        try:  # the first request after the restart is answered (no reply lost on a stale connection)
            assert client.request("funcs.hello", b"back", timeout=3).data.endswith(b"back")
        finally:
            client.close()
    finally:
        own.stop()


def test_bad_flags_and_missing_dirs_are_one_line_errors(tmp_path):
    import subprocess
    import sys

    for args in (["server", "-nosuchflag"], ["server", "-script", str(tmp_path / "missing")],
                 ["server", "-timeout", "soon"], ["bogus"]):
        p = subprocess.run([sys.executable, str(ROOT / "msgscript.py"), *args], capture_output=True, text=True,
                           timeout=30, input="")
        assert p.returncode != 0
        assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_examples_dir_has_the_readme_examples():
    names = {p.name for p in Path(EXAMPLES).glob("*.lua")}
    assert {"hello.lua", "http_hello.lua", "json.lua", "failing.lua"} <= names


def test_error_reply_keeps_a_keep_alive_connection_usable(examples_server):
    conn = http.client.HTTPConnection("127.0.0.1", examples_server.port)
    for target, status in (("/bad%20subject", 400), ("/no.such.subject", 404)):
        conn.request("POST", target, body=b"a b c d\r\n" * 100)
        r = conn.getresponse()
        r.read()
        assert r.status == status
    conn.request("POST", "/http.hello", body=b"again")
    assert conn.getresponse().read() == b"Hello, again!"


def test_sigterm_finishes_http_requests_in_flight_and_refuses_new_ones(start_server, tmp_path):
    import signal
    import socket
    import threading

    write_script(tmp_path, "slow.lua", """--* subject: slow.web
--* name: slow
--* http: true
function GET() require("time").sleep(0.8) return "finished", 200 end
""")
    srv = start_server("-script", str(tmp_path))
    session = requests.Session()
    assert session.get(f"{srv.base}/_/list", timeout=5).status_code == 200  # a keep-alive connection
    out = {}
    worker = threading.Thread(target=lambda: out.update(r=session.get(f"{srv.base}/slow.web", timeout=10)))
    worker.start()
    time.sleep(0.3)
    srv.proc.send_signal(signal.SIGTERM)
    srv.wait_log("stopping")
    time.sleep(0.2)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", srv.port), 1).close()
    worker.join(10)
    assert out["r"].status_code == 200 and out["r"].text == "finished"
    assert out["r"].headers.get("Connection") == "close"
    assert srv.proc.wait(10) == 0
