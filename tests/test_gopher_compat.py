"""Scripts written for the Go original (gopher-lua, Lua 5.1) run unchanged, and `-compat go`
speaks its HEAD wire formats. Every test drives a real msgscript server (subprocess) over real
NATS and HTTP, and checks what a user of the Go original would see."""

from __future__ import annotations

import base64
import http.server
import json
import os
import signal
import subprocess
import threading
import time

import nats.errors
import pytest
import requests
from conftest import MSGSCRIPT, MsgscriptProcess, Nats, free_port, wait_port, wait_until, write_script


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def lines_of(data: bytes) -> dict[str, str]:
    """`label=value` lines (as the scripts below answer) as a dict."""
    out = {}
    for line in data.decode().split("\n"):
        label, _, value = line.partition("=")
        out[label] = value
    return out


def collect_replies(client: Nats, subject: str, data: bytes, wait: float = 1.5) -> list:
    """Every reply one message gets within `wait` seconds (a plain request sees only the first)."""
    async def run():
        inbox = client.nc.new_inbox()
        sub = await client.nc.subscribe(inbox)
        await client.nc.publish(subject, data, reply=inbox)
        msgs = []
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                msgs.append(await sub.next_msg(left))
            except nats.errors.TimeoutError:
                break
        await sub.unsubscribe()
        return msgs

    return client.run(run())


# --- scripts of the default-mode server ------------------------------------------------------

LUA51 = r"""--* subject: gc.lua51
--* name: lua51
function OnMessage(subject, payload)
  local out = {}
  local function put(label, ...)
    local parts = {}
    for i = 1, select("#", ...) do parts[#parts + 1] = tostring((select(i, ...))) end
    out[#out + 1] = label .. "=" .. table.concat(parts, " ")
  end
  put("escape", "http:\/\/x")
  put("division", "total: " .. 10/2)
  put("power", tostring(2^2))
  local steps = {}
  for i = 1, 2, 0.5 do steps[#steps + 1] = tostring(i) end
  put("float_for", table.concat(steps, " "))
  put("format_d", string.format("%d", 3.7))
  put("atan2", string.format("%.6f", math.atan2(1, 1)))
  put("log10", math.log10(1000))
  put("pow", math.pow(2, 10))
  put("mod", math.mod(7, 3), math.mod(-7, 3))
  put("hyperbolic", math.cosh(0), math.sinh(0), math.tanh(0))
  put("frexp", math.frexp(8))
  put("ldexp", math.ldexp(0.5, 4))
  local function reads_x() return x end
  setfenv(reads_x, {x = "from env"})
  put("setfenv", reads_x(), getfenv(reads_x).x)
  put("getfenv", getfenv(1) == _G, getfenv() == _G)
  put("unpack", unpack({"a", "b", "c"}))
  put("getn", table.getn({10, 20, 30, 40}))
  put("setenv", os.setenv("GC_SETENV_PROBE", "set by lua"), os.getenv("GC_SETENV_PROBE"))
  return table.concat(out, "\n")
end
"""

CLOCK = """--* subject: gc.clock
--* name: clock
function OnMessage() return string.format("%.6f", os.clock()) end
"""

# gopher-lua knows goto; Lua 5.1 does not: the one known difference.
GOTO = """--* subject: gc.goto
--* name: uses_goto
function OnMessage(subject, payload)
  for i = 1, 3 do
    if i == 2 then goto continue end
    ::continue::
  end
  return "never"
end
"""

# pcall every module function with bad arguments; each error must be a plain Lua string.
ERRORS = r"""--* subject: gc.errors
--* name: errors
local json, http, re, lfs = require("json"), require("http"), require("re"), require("lfs")
local strings, time, crypto, yaml = require("strings"), require("time"), require("crypto"), require("yaml")
local filepath, template, widgets = require("filepath"), require("template"), require("widgets")
local mustache = template.choose("mustache")
local checks = {
  {"json.decode", json.decode},
  {"http.get", http.get},
  {"http.request", http.request},
  {"re.find", re.find},
  {"re.match_bad_pattern", re.match, "abc", "("},
  {"lfs.attributes", lfs.attributes},
  {"lfs.mkdir", lfs.mkdir},
  {"strings.split", strings.split},
  {"time.parse", time.parse},
  {"crypto.md5", crypto.md5},
  {"crypto.sha256_table", crypto.sha256, {}},
  {"yaml.decode", yaml.decode},
  {"filepath.basename", filepath.basename},
  {"template.render", mustache.render, mustache},
  {"plugin.lua_error", widgets.broken},
  {"plugin.value_error", widgets.buggy},
}
function OnMessage(subject, payload)
  local out = {}
  for _, check in ipairs(checks) do
    local ok, e = pcall(check[2], unpack(check, 3))
    local text = type(e) == "string" and ("failed: " .. e) or ("not a string: " .. type(e))
    out[#out + 1] = check[1] .. "=" .. tostring(ok) .. "|" .. type(e) .. "|" .. text
  end
  return table.concat(out, "\n")
end
"""

USER_PLUGIN = '''"""A user plugin whose functions fail: one the documented way, one by a plain Python bug."""
import msgscript


def _load(ctx):
    def broken():
        raise msgscript.LuaError("the widget is broken")

    def buggy():
        raise ValueError("invalid widget count")

    return {"broken": broken, "buggy": buggy}


def lua_modules():
    return {"widgets": _load}
'''

REQUIRE = """--* subject: gc.require
--* name: require
function OnMessage(subject, payload)
  local mymod, sub, onpath = require("mymod"), require("pkg.sub"), require("onpath")
  return table.concat({"mymod=" .. mymod.greet(payload), "sub=" .. sub.name, "onpath=" .. onpath.where(),
                       "loads=" .. tostring(mymod_loads), "seen=" .. tostring(mymod.seen())}, "\\n")
end
"""

MYMOD = """-- a Lua file module found through the -library directory
mymod_loads = (mymod_loads or 0) + 1
local M = {}
function M.greet(who) return "hello " .. who end
function M.seen() return mymod_loads end
return M
"""

PKG_SUB = 'return {name = "pkg.sub from " .. "the library directory"}\n'
ONPATH = 'local M = {}\nfunction M.where() return "found on LUA_PATH" end\nreturn M\n'

PUBLISH = """--* subject: gc.publish
--* name: publish
local nats = require("nats")
function OnMessage(subject, prefix)
  local sent = {
    {"float_whole", 2.0}, {"float_frac", 2.5}, {"quotient", 10/2},
    {"table", {1, 2}}, {"boolean", true}, {"nil", nil}, {"text", "plain"},
  }
  for _, item in ipairs(sent) do
    local ok, err = nats.publish(prefix .. "." .. item[1], item[2])
    if not ok then error("publish " .. item[1] .. ": " .. tostring(err)) end
  end
  nats.publish(prefix .. ".done", "done")
  return "published"
end
"""

TWO_A = """--* subject: gc.two
--* name: alpha
function OnMessage(subject, payload) return "alpha got " .. payload end
"""
TWO_B = """--* subject: gc.two
--* name: beta
function OnMessage(subject, payload) error("beta refuses " .. payload) end
"""

# --- my own takes on the Go original's examples ----------------------------------------------

EX_HELLO = """--* subject: gc.ex.hello
--* name: hello
function OnMessage(subject, payload)
  return "Hello " .. payload .. ", this is " .. subject
end
"""

EX_SITE = r"""--* subject: gc.ex.site
--* name: site
--* http: true
local json = require("json")
local function page(title, body)
  return "<!doctype html><html><head><title>" .. title .. "</title></head><body><h1>" .. title
    .. "</h1>" .. body .. "</body></html>"
end
local routes = {
  ["/"] = function() return page("Home", "<p>Welcome to the shop.</p>") end,
  ["/about"] = function() return page("About", "<p>Run by scripts.</p>") end,
  ["/api/stock"] = function()
    return json.encode({apples = 3}), 200, {["Content-Type"] = "application/json"}
  end,
}
function GET(url, body)
  local path, query = url:match("^([^?]*)%??(.*)$")
  local route = routes[path]
  if route then return route() end
  if path == "/greet" then
    local name = query:match("name=([^&]*)") or "stranger"
    return page("Greeting", "<p>Hi " .. name .. "</p>")
  end
  return page("Not found", "<p>nothing at " .. path .. "</p>"), 404
end
function POST(url, body)
  if url ~= "/contact" then return "no form here", 404, {["Content-Type"] = "text/plain"} end
  local form = json.decode(body)
  return page("Thanks", "<p>We will write to " .. form.email .. "</p>"), 201
end
"""

EX_IO = r"""--* subject: gc.ex.io
--* name: io
function OnMessage(subject, payload)
  local path, text = payload:match("^([^\n]*)\n(.*)$")
  local missing, err = io.open(path .. ".missing", "r")
  if missing ~= nil then return "a missing file opened" end
  local out = assert(io.open(path, "w"))
  out:write(text)
  out:close()
  local back = assert(io.open(path, "r"))
  local content = back:read("*a")
  back:close()
  local more = assert(io.open(path, "a"))
  more:write("\nsecond line")
  more:close()
  local count = 0
  for _ in io.lines(path) do count = count + 1 end
  return "read=" .. content .. "\nlines=" .. count .. "\nmissing=" .. err
end
"""

EX_PUSHOVER = """--* subject: gc.ex.notify
--* name: pushover
local http, json = require("http"), require("json")
function OnMessage(subject, payload)
  local message = json.decode(payload)
  local body = json.encode({
    token = os.getenv("NOTIFY_TOKEN"), user = os.getenv("NOTIFY_USER"),
    title = message.title, message = message.text, priority = 1,
  })
  local resp, err = http.post(os.getenv("NOTIFY_API") .. "/1/messages.json", {
    body = body, headers = {["Content-Type"] = "application/json"},
  })
  if not resp then error("notification failed: " .. err) end
  if resp.status_code ~= 200 then error("notification refused: " .. resp.status_code) end
  return "sent " .. json.decode(resp.body).request
end
"""

EX_HELLO_PLUGIN = """--* subject: gc.ex.plugin
--* name: hello_plugin
local hello = require("hello")
function OnMessage(subject, payload)
  return hello.print()
end
"""


class Recorder(http.server.BaseHTTPRequestHandler):
    """A notification API that records what it is sent."""

    requests: list = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.requests.append({"method": "POST", "path": self.path, "headers": dict(self.headers), "body": body})
        answer = json.dumps({"status": 1, "request": "req-42"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def api():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", Recorder.requests
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def client(nats_server):
    c = Nats(nats_server.url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory, nats_server, api):
    """One default-mode server with every script of this module (started once)."""
    root = tmp_path_factory.mktemp("gopher_compat")
    scripts, lib, plugins, luapath = root / "scripts", root / "lib", root / "plugins", root / "luapath"
    for d in (scripts, lib, lib / "pkg", plugins, luapath):
        d.mkdir()
    for name, text in (("lua51.lua", LUA51), ("clock.lua", CLOCK), ("goto_loop.lua", GOTO),
                       ("errors.lua", ERRORS), ("require.lua", REQUIRE), ("publish.lua", PUBLISH),
                       ("two_a.lua", TWO_A), ("two_b.lua", TWO_B), ("hello.lua", EX_HELLO),
                       ("site.lua", EX_SITE), ("io.lua", EX_IO), ("pushover.lua", EX_PUSHOVER),
                       ("hello_plugin.lua", EX_HELLO_PLUGIN)):
        write_script(scripts, name, text)
    write_script(lib, "mymod.lua", MYMOD)
    write_script(lib / "pkg", "sub.lua", PKG_SUB)
    write_script(luapath, "onpath.lua", ONPATH)
    write_script(plugins, "widgets.py", USER_PLUGIN)
    api_url, _ = api
    env = {"LUA_PATH": f"{luapath}/?.lua;;", "NOTIFY_API": api_url, "NOTIFY_TOKEN": "tok-1", "NOTIFY_USER": "usr-2"}
    started = time.monotonic()
    proc = MsgscriptProcess(["-script", str(scripts), "-library", str(lib), "-plugin", str(plugins),
                             "-natsurl", nats_server.url], root, env)
    proc.started = started
    proc.root = root
    yield proc
    proc.stop()


# --- 1. Lua 5.1 semantics, as gopher-lua has them ---------------------------------------------

def test_lua51_semantics_of_go_scripts(site, client):
    got = lines_of(client.request("gc.lua51", b"").data)
    assert got["escape"] == "http://x"
    assert got["division"] == "total: 5"
    assert got["power"] == "4"
    assert got["float_for"] == "1 1.5 2"
    assert got["format_d"] == "3"
    assert got["atan2"] == "0.785398"
    assert got["log10"] == "3"
    assert got["pow"] == "1024"
    assert got["mod"] == "1 -1"  # fmod semantics, as 5.1's math.mod
    assert got["hyperbolic"] == "1 0 0"
    assert got["frexp"] == "0.5 4"
    assert got["ldexp"] == "8"
    assert got["setfenv"] == "from env from env"
    assert got["getfenv"] == "true true"
    assert got["unpack"] == "a b c"
    assert got["getn"] == "4"
    assert got["setenv"] == "true set by lua"


def test_os_clock_is_wall_seconds_since_the_server_started(site, client):
    first = float(client.request("gc.clock", b"").data)
    time.sleep(0.3)  # the server is idle: no CPU time passes, wall time does
    second = float(client.request("gc.clock", b"").data)
    assert 0.25 <= second - first <= 2.0, (first, second)
    assert 0 < first <= time.monotonic() - site.started + 0.5


def test_goto_is_a_syntax_error_naming_the_file_and_the_rest_serves(site, client):
    def logged():
        return [line for line in site.log.splitlines() if "goto_loop.lua" in line and "syntax error" in line.lower()]

    assert wait_until(logged, 5), site.log[-3000:]
    with pytest.raises(nats.errors.NoRespondersError):
        client.request("gc.goto", b"", timeout=2)
    assert client.request("gc.ex.hello", b"Ann").data == b"Hello Ann, this is gc.ex.hello"
    r = requests.get(f"{site.base}/gc.goto", timeout=5)
    assert r.status_code == 404


# --- 2. errors of Python-implemented functions are Lua strings --------------------------------

EXPECTED_ERRORS = {
    "json.decode": "bad argument #1 to 'decode' (string expected, got nil)",
    "http.get": "bad argument #1 to 'get' (string expected, got nil)",
    "http.request": "bad argument #1 to 'request' (string expected, got nil)",
    "re.find": "bad argument #1 to 'find' (string expected, got nil)",
    "re.match_bad_pattern": "missing closing )",  # Go's regexp wording
    "lfs.attributes": "bad argument #1 to 'attributes' (string expected, got nil)",
    "lfs.mkdir": "bad argument #1 to 'mkdir' (string expected, got nil)",
    "strings.split": "bad argument #1 to 'split' (string expected, got nil)",
    "time.parse": "bad argument #1 to 'parse' (string expected, got nil)",
    "crypto.md5": "bad argument #1 to 'md5' (string expected, got nil)",
    "crypto.sha256_table": "bad argument #1 to 'sha256' (string expected, got table)",
    "yaml.decode": "bad argument #1 to 'decode' (string expected, got nil)",
    "filepath.basename": "bad argument #1 to 'basename' (string expected, got nil)",
    "template.render": "to 'render' (string expected, got nil)",
    "plugin.lua_error": "the widget is broken",
    "plugin.value_error": "invalid widget count",
}
PYTHON_WORDS = ("Traceback", "ValueError", "Exception", "Python", "python", "lupa", "NoneType", "<class", "object at")


def test_module_errors_reach_lua_as_plain_strings(site, client):
    got = lines_of(client.request("gc.errors", b"").data)
    assert set(got) == set(EXPECTED_ERRORS)
    for label, expected in EXPECTED_ERRORS.items():
        ok, kind, text = got[label].split("|", 2)
        assert (ok, kind) == ("false", "string"), f"{label}: {got[label]}"
        assert text.startswith("failed: ") and expected in text, f"{label}: {text}"
        assert not any(word in text for word in PYTHON_WORDS), f"{label}: {text}"
    assert got["plugin.lua_error"].split("|", 2)[2] == "failed: the widget is broken"


# --- 3. require of Lua file modules ------------------------------------------------------------

def test_require_finds_library_dir_and_lua_path_modules_without_leaking_globals(site, client):
    for _ in range(3):  # a module's globals start afresh on every call
        got = lines_of(client.request("gc.require", b"Bo").data)
        assert got == {"mymod": "hello Bo", "sub": "pkg.sub from the library directory",
                       "onpath": "found on LUA_PATH", "loads": "1", "seen": "1"}


# --- 4. -compat go and the default formats -----------------------------------------------------

GO_ONE = """--* subject: gcgo.one
--* name: one
function OnMessage(subject, payload) return "one got " .. payload end
"""
GO_TWO_A = TWO_A.replace("gc.two", "gcgo.two")
GO_TWO_B = TWO_B.replace("gc.two", "gcgo.two")
GO_FAIL = """--* subject: gcgo.fail
--* name: fail
function OnMessage(subject, payload) error("always fails") end
"""
GO_SLOW = """--* subject: gcgo.slow
--* name: slow
local time = require("time")
function OnMessage(subject, payload) time.sleep(2) return "slept" end
"""
GO_HTTP = """--* subject: gcgo.web
--* name: web
--* http: true
local answers = {
  ["/string404"] = function() return "gone", "404" end,
  ["/zero"] = function() return "zero is fine", 0 end,
  ["/number"] = function() return 42 end,
  ["/fraction"] = function() return 2.5, 201 end,
  ["/table"] = function() return {1, 2, 3} end,
  ["/headers"] = function() return "h", 200, {["X-Count"] = 3, ["X-Ratio"] = 1.5, ["X-Flag"] = true} end,
}
function GET(url, body) return answers[url]() end
"""


@pytest.fixture(scope="module")
def go_site(tmp_path_factory, nats_server):
    root = tmp_path_factory.mktemp("gopher_compat_go")
    scripts = root / "scripts"
    scripts.mkdir()
    for name, text in (("one.lua", GO_ONE), ("two_a.lua", GO_TWO_A), ("two_b.lua", GO_TWO_B),
                       ("fail.lua", GO_FAIL), ("slow.lua", GO_SLOW), ("web.lua", GO_HTTP)):
        write_script(scripts, name, text)
    proc = MsgscriptProcess(["-script", str(scripts), "-compat", "go", "-http-timeout", "1s",
                             "-natsurl", nats_server.url], root)
    yield proc
    proc.stop()


def go_result(payload: bytes, error: str = "") -> dict:
    return {"http_code": 0, "error": error, "http_headers": None, "is_html": False, "payload": b64(payload)}


def test_compat_go_raw_and_envelope_replies_are_the_head_envelope(go_site, client):
    expected = ('{"script_result":[{"http_code":0,"error":"","http_headers":null,"is_html":false,'
                f'"payload":"{b64("one got Ann")}"}}],"is_html":false}}').encode()
    raw = client.request("gcgo.one", b"Ann")
    assert raw.data == expected
    assert "Nats-Service-Error" not in (raw.headers or {})
    envelope = json.dumps({"subject": "gcgo.one", "payload": b64("Ann"), "method": "", "url": "", "async": False})
    wrapped = client.request("gcgo.one", envelope.encode())
    assert wrapped.data == expected


def test_compat_go_several_scripts_one_reply_with_errors_inside(go_site, client):
    msgs = collect_replies(client, "gcgo.two", b"Cy")
    assert len(msgs) == 1, [m.data for m in msgs]
    assert "Nats-Service-Error" not in (msgs[0].headers or {})
    doc = json.loads(msgs[0].data)
    assert set(doc) == {"script_result", "is_html"} and doc["is_html"] is False
    results = doc["script_result"]
    assert len(results) == 2
    ok = [r for r in results if not r["error"]]
    failed = [r for r in results if r["error"]]
    assert ok == [go_result(b"alpha got Cy")]
    assert len(failed) == 1 and "beta refuses Cy" in failed[0]["error"]
    assert failed[0]["http_code"] == 0 and failed[0]["http_headers"] is None and failed[0]["is_html"] is False

    msg = client.request("gcgo.fail", b"")
    assert "Nats-Service-Error" not in (msg.headers or {})
    (result,) = json.loads(msg.data)["script_result"]
    assert "always fails" in result["error"]


def test_compat_go_http_answers_are_a_json_array_with_status_200(go_site):
    r = requests.post(f"{go_site.base}/gcgo.one", data=b"Di", timeout=5)
    assert r.status_code == 200
    assert r.json() == [go_result(b"one got Di")]

    r = requests.post(f"{go_site.base}/gcgo.two", data=b"Ed", timeout=5)
    assert r.status_code == 200
    results = r.json()
    assert isinstance(results, list) and len(results) == 2
    assert go_result(b"alpha got Ed") in results
    assert any("beta refuses Ed" in x["error"] for x in results)

    r = requests.post(f"{go_site.base}/gcgo.fail", data=b"", timeout=5)
    assert r.status_code == 200  # the Go original answers 200 also when the script failed
    (result,) = r.json()
    assert "always fails" in result["error"]


def test_compat_go_timeout_query_may_lengthen_the_wait(go_site):
    r = requests.get(f"{go_site.base}/gcgo.slow?_timeout=8s", timeout=15)
    assert r.status_code == 200
    assert r.json() == [go_result(b"slept")]
    # without it, -http-timeout (1s) applies: the script does not get to finish
    r = requests.get(f"{go_site.base}/gcgo.slow", timeout=15)
    assert not (r.status_code == 200 and r.json() == [go_result(b"slept")])


def test_http_mode_values_are_converted_like_the_go_original(go_site):
    r = requests.get(f"{go_site.base}/gcgo.web/string404", timeout=5)
    assert (r.status_code, r.text) == (404, "gone")
    r = requests.get(f"{go_site.base}/gcgo.web/zero", timeout=5)
    assert (r.status_code, r.text) == (200, "zero is fine")
    r = requests.get(f"{go_site.base}/gcgo.web/number", timeout=5)
    assert (r.status_code, r.text) == (200, "42")
    r = requests.get(f"{go_site.base}/gcgo.web/fraction", timeout=5)
    assert (r.status_code, r.text) == (201, "2.5")
    r = requests.get(f"{go_site.base}/gcgo.web/table", timeout=5)
    assert (r.status_code, r.text) == (200, "")  # gopher-lua's LVAsString: a table is ""
    r = requests.get(f"{go_site.base}/gcgo.web/headers", timeout=5)
    assert r.status_code == 200
    assert (r.headers["X-Count"], r.headers["X-Ratio"], r.headers["X-Flag"]) == ("3", "1.5", "")


def test_default_nats_format_without_the_flag(site, client):
    msgs = collect_replies(client, "gc.two", b"Fi")
    assert len(msgs) == 2, [(m.data, m.headers) for m in msgs]
    by_name = {m.headers["Msgscript-Name"]: m for m in msgs}
    assert by_name["alpha"].data == b"alpha got Fi"
    assert "Nats-Service-Error" not in by_name["alpha"].headers
    assert by_name["beta"].data == b""
    assert "beta refuses Fi" in by_name["beta"].headers["Nats-Service-Error"]
    assert by_name["beta"].headers["Nats-Service-Error-Code"] == "500"
    assert client.request("gc.ex.hello", b"Gus").data == b"Hello Gus, this is gc.ex.hello"  # raw, no envelope


def test_default_http_format_without_the_flag(site):
    r = requests.post(f"{site.base}/gc.two", data=b"Hal", timeout=5)
    assert r.status_code == 200
    doc = r.json()
    assert set(doc) == {"alpha", "beta"}
    assert doc["alpha"] == {"http_code": 200, "error": "", "http_headers": {}, "is_html": False,
                            "payload": b64("alpha got Hal")}
    assert "beta refuses Hal" in doc["beta"]["error"]


# --- 5. the Go server binary's invocation: flags, no `server` word ------------------------------

def test_flags_without_the_server_word_run_the_server(tmp_path, nats_server, client):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    write_script(scripts, "hello.lua", EX_HELLO.replace("gc.ex.hello", "gcbare.hello"))
    port = free_port()
    log_path = tmp_path / "bare.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("NATS_URL", None)
    with open(log_path, "wb") as logfile:
        proc = subprocess.Popen([*MSGSCRIPT, "-script", str(scripts), "-port", str(port), "-natsurl", nats_server.url],
                                cwd=tmp_path, stdout=logfile, stderr=subprocess.STDOUT, env=env)
        try:
            wait_port(port, 20, proc)
            wait_until(lambda: "serving" in log_path.read_text(errors="replace"), 20)
            assert client.request("gcbare.hello", b"Ivy").data == b"Hello Ivy, this is gcbare.hello"
            r = requests.post(f"http://127.0.0.1:{port}/gcbare.hello", data=b"Jo", timeout=5)
            assert r.status_code == 200 and unb64(r.json()["hello"]["payload"]) == b"Hello Jo, this is gcbare.hello"
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, log_path.read_text(errors="replace")[-2000:]


# --- 6. etcd values written by the Go CLI with empty subject and name ------------------------------

def test_etcd_values_with_empty_subject_and_name_serve_under_their_key(etcd, tmp_path, nats_server, client):
    content = 'function OnMessage(subject, payload) return "etcd says hi to " .. payload end\n'
    value = json.dumps({"content": b64(content), "executor": "lua", "is_html": False, "libraries": None,
                        "name": "", "subject": ""})
    etcd.put("msgscript/scripts/gcetcd.greet/greeter", value)
    proc = MsgscriptProcess(["-backend", "etcd", "-etcdurl", etcd.endpoint, "-natsurl", nats_server.url], tmp_path)
    try:
        assert wait_until(lambda: client.request("gcetcd.greet", b"Kim", timeout=1).data, 10) == \
            b"etcd says hi to Kim"
        r = requests.post(f"{proc.base}/gcetcd.greet", data=b"Lu", timeout=5)
        assert r.status_code == 200
        assert set(r.json()) == {"greeter"}
        assert unb64(r.json()["greeter"]["payload"]) == b"etcd says hi to Lu"
    finally:
        proc.stop()


# --- 7. nats.publish converts non-string payloads as gopher-lua does ------------------------------

def test_nats_publish_converts_payloads_like_gopher_lua(site, client):
    async def run():
        sub = await client.nc.subscribe("gcpub.>")
        await client.nc.flush()
        reply = await client.nc.request("gc.publish", b"gcpub", timeout=5)
        got = {}
        while "done" not in got:
            msg = await sub.next_msg(5)
            got[msg.subject.split(".", 1)[1]] = msg.data
        await sub.unsubscribe()
        return reply.data, got

    reply, got = client.run(run())
    assert reply == b"published"
    assert got == {"float_whole": b"2", "float_frac": b"2.5", "quotient": b"5",
                   "table": b"", "boolean": b"", "nil": b"", "text": b"plain", "done": b"done"}


# --- 8. the Go original's examples, in my own words ---------------------------------------------

def test_example_hello(site, client):
    assert client.request("gc.ex.hello", b"Max").data == b"Hello Max, this is gc.ex.hello"
    r = requests.post(f"{site.base}/gc.ex.hello", data=b"Nia", timeout=5)
    assert r.status_code == 200 and unb64(r.json()["hello"]["payload"]) == b"Hello Nia, this is gc.ex.hello"


def test_example_website(site):
    base = f"{site.base}/gc.ex.site"
    r = requests.get(base, timeout=5)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    assert "<h1>Home</h1>" in r.text and "Welcome to the shop." in r.text
    r = requests.get(f"{base}/about", timeout=5)
    assert r.status_code == 200 and "<h1>About</h1>" in r.text
    r = requests.get(f"{base}/greet?name=Oli", timeout=5)
    assert r.status_code == 200 and "<p>Hi Oli</p>" in r.text
    r = requests.get(f"{base}/api/stock", timeout=5)
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json"
    assert r.json() == {"apples": 3}
    r = requests.get(f"{base}/nowhere", timeout=5)
    assert r.status_code == 404 and "nothing at /nowhere" in r.text
    assert r.headers["Content-Type"].startswith("text/html")
    r = requests.post(f"{base}/contact", data=json.dumps({"email": "pat@example.org"}), timeout=5)
    assert r.status_code == 201 and "We will write to pat@example.org" in r.text
    r = requests.put(base, data=b"x", timeout=5)
    assert r.status_code == 405  # the script defines no PUT


def test_example_io(site, client, tmp_path):
    target = tmp_path / "note.txt"
    got = lines_of(client.request("gc.ex.io", f"{target}\nfirst line".encode()).data)
    assert got["read"] == "first line"
    assert got["lines"] == "2"
    assert "No such file or directory" in got["missing"] and "note.txt.missing" in got["missing"]
    assert target.read_text() == "first line\nsecond line"


def test_example_pushover_notification_posts_json(site, client, api):
    _, recorded = api
    recorded.clear()
    payload = json.dumps({"title": "Disk", "text": "disk is 91% full"}).encode()
    assert client.request("gc.ex.notify", payload).data == b"sent req-42"
    (req,) = recorded
    assert req["method"] == "POST" and req["path"] == "/1/messages.json"
    assert req["headers"]["Content-Type"] == "application/json"
    assert json.loads(req["body"]) == {"token": "tok-1", "user": "usr-2", "title": "Disk",
                                       "message": "disk is 91% full", "priority": 1}


def test_example_hello_plugin(site, client):
    from msgscript_plugins.hello import GREETING

    assert client.request("gc.ex.plugin", b"").data == GREETING.encode()
    wait_until(lambda: GREETING in site.log, 5)  # the plugin also prints it on the server's stdout

