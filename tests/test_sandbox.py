"""A script must not escape its limits, reach Python, or take the server down."""

from __future__ import annotations

import time

import pytest
import requests
from conftest import write_script

ESCAPES = {
    "coroutine": "coroutine.wrap(function() while true do end end)()",
    "resume": "coroutine.resume(coroutine.create(function() while true do end end))",
    "xpcall": "xpcall(function() while true do end end, function() while true do end end)",
    "loadloop": 'load("while true do end")()',
}


@pytest.fixture(scope="module")
def sandbox_server(tmp_path_factory, nats_server):
    from conftest import MsgscriptProcess

    d = tmp_path_factory.mktemp("sandbox")
    for name, body in ESCAPES.items():
        write_script(d, f"{name}.lua", f"--* subject: esc.{name}\n--* name: {name}\n--* timeout: 300ms\n"
                                       f"function OnMessage() {body} end\n")
    write_script(d, "debug.lua", "--* subject: esc.debug\n--* name: debug\n"
                                 "function OnMessage() require('debug').sethook() while true do end end\n")
    write_script(d, "exit.lua", "--* subject: esc.exit\n--* name: exit\nfunction OnMessage() os.exit(3) end\n")
    write_script(d, "dump.lua", """--* subject: esc.dump
--* name: dump
function OnMessage()
  local has_python = pcall(require, "python")
  local has_g = pcall(require, "_G")
  return tostring(string.dump) .. " " .. tostring(has_python) .. " " .. tostring(has_g) .. " "
    .. tostring(getmetatable(_G)) .. " " .. tostring(python)
end
""")
    write_script(d, "gc.lua", """--* subject: esc.gc
--* name: gc
function OnMessage()
  setmetatable({}, {__gc = function() while true do end end}) collectgarbage()
  return tostring(newproxy)
end
""")
    write_script(d, "status.lua", """--* subject: esc.status
--* name: status
--* http: true
function GET(url) if url == "/204" then return "body", 204 end return "x", 99999 end
function POST() return "x", 200, "not a table" end
""")
    write_script(d, "ok.lua", "--* subject: esc.ok\n--* name: ok\nfunction OnMessage(_, p) return 'ok ' .. p end\n")
    proc = MsgscriptProcess(["-script", str(d), "-natsurl", nats_server.url], d)
    yield proc
    proc.stop()


@pytest.mark.parametrize("name", sorted(ESCAPES))
def test_loops_are_stopped_at_the_deadline(sandbox_server, nats_client, name):
    msg = nats_client.request(f"esc.{name}", b"", timeout=5)
    assert msg.headers["Nats-Service-Error-Code"] == "504", msg.headers
    assert "timed out" in msg.headers["Nats-Service-Error"]
    assert nats_client.request("esc.ok", b"still").data == b"ok still"


def test_os_exit_does_not_stop_the_server(sandbox_server, nats_client):
    msg = nats_client.request("esc.exit", b"")
    assert "os.exit is not available" in msg.headers["Nats-Service-Error"]
    assert sandbox_server.proc.poll() is None
    assert nats_client.request("esc.ok", b"x").data == b"ok x"


def test_no_bytecode_no_python_no_shared_globals_metatable(sandbox_server, nats_client):
    assert nats_client.request("esc.dump", b"").data == b"nil false false false nil"


def test_the_debug_library_has_no_sethook(sandbox_server, nats_client):
    msg = nats_client.request("esc.debug", b"")
    assert "attempt to call field 'sethook' (a nil value)" in msg.headers["Nats-Service-Error"]


def test_finalizers_cannot_run_unbounded(sandbox_server, nats_client):
    # Lua 5.1 runs no __gc on tables, and newproxy (userdata with finalizers) is gone
    msg = nats_client.request("esc.gc", b"", timeout=5)
    assert msg.data == b"nil" and not msg.headers
    assert nats_client.request("esc.ok", b"x").data == b"ok x"


def test_bad_http_status_and_headers_from_a_script(sandbox_server):
    base = sandbox_server.base
    r = requests.get(f"{base}/esc.status/204")
    assert r.status_code == 204 and r.content == b""
    r = requests.get(f"{base}/esc.status/bad")
    assert r.status_code == 500 and "invalid HTTP status" in r.text
    r = requests.post(f"{base}/esc.status")
    assert r.status_code == 200 and r.text == "x"


def test_timeout_query_cannot_disable_or_lengthen(sandbox_server):
    base = sandbox_server.base
    assert requests.get(f"{base}/esc.ok?_timeout=nan").status_code == 400
    assert requests.get(f"{base}/esc.ok?_timeout=-1s").status_code == 400
    assert requests.get(f"{base}/esc.ok?_timeout=1s").status_code == 200
    started = time.monotonic()  # the script's own 300ms limit still applies
    assert requests.get(f"{base}/esc.loadloop?_timeout=10s", timeout=10).status_code == 504
    assert time.monotonic() - started < 3
