"""Escapes and stalls a review found after the first hostile-input round, each sent to a real
server: the server must refuse them, stay responsive, and keep later calls unaffected."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time

import pytest
import requests
from conftest import ROOT, MsgscriptProcess, write_script

EVAL = """--* subject: hard.eval
--* name: eval
function OnMessage(subject, payload) return tostring(assert(loadstring(payload))()) end
"""
JSON = """--* subject: hard.json
--* name: json
local json = require("json")
function OnMessage(subject, payload) return json.encode({n = #payload}) end
"""
SLOW = """--* subject: hard.slow
--* name: slow
function OnMessage() require("time").sleep(0.3) return "slow" end
"""
HELLO = "--* subject: hard.hello\n--* name: hello\nfunction OnMessage(s, p) return 'hello ' .. p end\n"
STREAMED = "--* subject: hard.streamed\n--* name: streamed\n--* stream: HARDNONE\nfunction OnMessage() end\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory, nats_server):
    base = tmp_path_factory.mktemp("hard")
    scripts = base / "scripts"
    scripts.mkdir()
    for name, text in (("eval.lua", EVAL), ("json.lua", JSON), ("slow.lua", SLOW), ("hello.lua", HELLO),
                       ("streamed.lua", STREAMED)):
        write_script(scripts, name, text)
    # a relative -script directory, as the README's quick start gives it
    proc = MsgscriptProcess(["-script", "scripts", "-natsurl", nats_server.url], base)
    yield proc
    proc.stop()


def run(server, lua: str, timeout: float = 10) -> requests.Response:
    return requests.post(f"{server.base}/hard.eval", data=lua.encode(), timeout=timeout)


def payload(r: requests.Response) -> str:
    import base64

    return base64.b64decode(r.json()["eval"]["payload"]).decode()


def error(r: requests.Response) -> str:
    return r.json()["eval"]["error"]


def test_bytecode_stays_out_even_with_a_replaced_string_byte(server):
    lua = textwrap.dedent("""
        string.byte = function() return 0 end  -- the sandbox's check must not use the script's copy
        local f, err = loadstring(string.char(27) .. "Lua\\81\\0\\1\\4\\8\\4\\8\\0")
        return tostring(f) .. " " .. tostring(err)
    """)
    assert payload(run(server, lua)) == "nil attempt to load a binary chunk"


def test_shared_tables_do_not_carry_over(server):
    planted = textwrap.dedent("""
        local ok1 = pcall(function() io.stdout.__index.planted = true end)
        local ok2 = pcall(function() rawset(getmetatable(EtcdKV.new("k", "v")) or {}, "x", 1) end)
        io.output(io.tmpfile and io.stderr or io.stdout)
        return tostring(io.stdout.__index) .. " " .. tostring(ok1)
    """)
    assert payload(run(server, planted)) == "nil false"
    seen = textwrap.dedent("""
        return tostring(io.stdout.planted) .. " " .. tostring(io.output() == io.stdout) .. " " ..
               tostring(EtcdKV.new("k", "v"):getKey())
    """)
    assert payload(run(server, seen)) == "nil true k"


def test_rawset_cannot_change_a_modules_read_only_table(server):
    lua = 'local B = require("strings").Builder return tostring(pcall(rawset, B, "new", 1))'
    assert payload(run(server, lua)) == "false"
    assert payload(run(server, 'return type(require("strings").new_builder)')) == "function"


def test_a_huge_string_rep_is_refused_and_an_empty_one_is_immediate(server):
    started = time.monotonic()
    r = run(server, 'return #string.rep("", 2^31 - 1)')
    assert payload(r) == "0" and time.monotonic() - started < 2
    r = run(server, 'return #string.rep("x", 2^40)')
    assert "resulting string too large" in error(r)


def test_quadratic_plain_find_is_linear(server):
    lua = 'local s = string.rep("a", 4000000) local n = string.rep("a", 20000) .. "b" ' \
          'return tostring(s:find(n, 1, true))'
    started = time.monotonic()
    assert payload(run(server, lua, timeout=20)) == "nil"
    assert time.monotonic() - started < 5  # C's search is quadratic here (minutes)


def test_a_script_at_its_memory_cap_cannot_freeze_the_server(tmp_path, nats_server):
    """Fill the cap from Lua (catching each error), then ask Python functions for error texts."""
    write_script(tmp_path, "fill.lua", """--* subject: hard.fill
--* name: fill
--* memory: 8MiB
local json = require("json")
function OnMessage()
  local keep, piece = {}, string.rep("x", 4096)
  while pcall(function() keep[#keep + 1] = piece .. #keep end) do end
  local fails = 0
  for i = 1, 300 do if not pcall(json.decode) then fails = fails + 1 end end
  for i = 1, 50 do pcall(string.find, string.rep("a", 100), string.rep("a-", 12) .. "b") end
  return tostring(fails)
end
""")
    write_script(tmp_path, "hello.lua", HELLO.replace("hard.hello", "hard.fill.hello"))
    proc = MsgscriptProcess(["-script", str(tmp_path), "-natsurl", nats_server.url, "-timeout", "5s"], tmp_path)
    try:
        r = requests.post(f"{proc.base}/hard.fill", timeout=30)
        assert r.status_code in (200, 500, 504)
        assert requests.post(f"{proc.base}/hard.fill.hello", data=b"x", timeout=5).status_code == 200
    finally:
        assert proc.stop(timeout=10) == 0


def test_many_pipelined_requests_behind_a_slow_one_are_all_answered(server):
    n = 2000
    burst = b"POST /hard.slow HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n" + \
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * n
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(burst)
        got = b""
        while got.count(b"HTTP/1.1 ") < n + 1:
            chunk = s.recv(1 << 20)
            assert chunk, f"closed after {got.count(b'HTTP/1.1 ')} answers"
            got += chunk
    assert got.count(b"HTTP/1.1 200 OK") == n + 1
    assert time.monotonic() - started < 20
    assert requests.post(f"{server.base}/hard.hello", data=b"x", timeout=2).status_code == 200


def test_lfs_chdir_does_not_unload_the_scripts(server):
    assert payload(run(server, 'require("lfs").chdir("/") return "moved"')) == "moved"
    time.sleep(1.5)  # a rescan after the move must still find every script
    assert requests.post(f"{server.base}/hard.hello", data=b"x", timeout=5).status_code == 200
    assert "hard.hello" in requests.get(f"{server.base}/_/list", timeout=5).text


def test_a_script_that_requires_a_module_runs_inline(server):
    for _ in range(20):
        assert requests.post(f"{server.base}/hard.json", data=b"abc", timeout=5).status_code == 200
    metrics = requests.get(f"{server.base}/metrics", timeout=5).text
    assert 'msgscript_inline_moves_total{script="json",subject="hard.json"} 0.0' in metrics


def test_http_does_not_run_stream_scripts(server):
    assert requests.post(f"{server.base}/hard.streamed", timeout=5).status_code == 404


def test_a_memory_cap_too_small_for_lua_is_refused_at_load(tmp_path):
    write_script(tmp_path, "tiny.lua", "--* subject: hard.tiny\n--* name: tiny\n--* memory: 100k\n")
    out = subprocess.run([sys.executable, str(ROOT / "msgscript.py"), "cli", "dev", str(tmp_path / "tiny.lua"),
                          "-i", "x"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "below the 1 MiB a Lua runtime needs" in out.stderr


def test_etcd_values_of_the_wrong_shape_are_errors_not_crashes():
    import json

    import msgscript

    for doc in ({"executor": 3}, {"libraries": "web"}, {"executor": "perl"}, {"libraries": [1]}):
        value = json.dumps({"content": "", "subject": "a.b", "name": "n", **doc})
        with pytest.raises(msgscript.ConfigError):
            msgscript.script_from_json(value, "msgscript/scripts/a.b/n", ("a.b", "n"))
