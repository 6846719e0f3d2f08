"""Libraries (`--* require:`) and plugins (`-plugin DIR`) as a server user sees them."""

from __future__ import annotations

import time

import requests
from conftest import write_script


def wait_for(check, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.1)


def test_libraries_prepend_in_order_and_hot_reload(start_server, tmp_path, nats_client):
    scripts, libs = tmp_path / "scripts", tmp_path / "libs"
    scripts.mkdir()
    libs.mkdir()
    write_script(libs, "first.lua", "--* name: first\nfunction greet(x) return 'v1 ' .. x end\n")
    write_script(libs, "second.lua", "function shout(x) return string.upper(greet(x)) end\n")
    write_script(scripts, "s.lua", """--* subject: lib.user
--* name: user
--* require: first
--* require: second
function OnMessage(_, p) return shout(p) end
""")
    start_server("-script", str(scripts), "-library", str(libs))
    assert nats_client.request("lib.user", b"hi").data == b"V1 HI"
    write_script(libs, "first.lua", "--* name: first\nfunction greet(x) return 'v2 ' .. x end\n")
    wait_for(lambda: nats_client.request("lib.user", b"hi").data == b"V2 HI")


def test_missing_library_loads_the_script_without_it_and_warns_once(start_server, tmp_path, nats_client):
    write_script(tmp_path, "needs.lua", """--* subject: lib.needs
--* name: needs
--* require: nowhere
function OnMessage() return helper and "with it" or "without it" end
""")
    write_script(tmp_path, "fine.lua", "--* subject: lib.fine\n--* name: fine\nfunction OnMessage() return 'ok' end\n")
    srv = start_server("-script", str(tmp_path))
    assert nats_client.request("lib.needs", b"").data == b"without it"
    assert nats_client.request("lib.needs", b"").data == b"without it"
    assert srv.log.count("requires library 'nowhere', which does not exist: it runs without it") == 1
    assert nats_client.request("lib.fine", b"").data == b"ok"
    assert requests.get(f"{srv.base}/lib.fine").status_code == 200


def test_user_plugin_and_broken_plugin(start_server, tmp_path, nats_client):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "greeter.py").write_text('''
def _load(ctx):
    def greet(name):
        return "hi " + name, None
    return {"greet": greet, "version": 3}

def lua_modules():
    return {"greeter": _load}
''')
    (plugins / "broken.py").write_text("import no_such_module_anywhere\n")
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    write_script(scripts, "p.lua", """--* subject: plug.in
--* name: p
local g = require("greeter")
local hello = require("hello")
function OnMessage(_, p)
  local text, err = g.greet(p)
  return text .. " v" .. g.version .. " " .. tostring(err) .. " / " .. hello.print()
end
""")
    srv = start_server("-script", str(scripts), "-plugin", str(plugins))
    assert "broken.py" in srv.log and "no_such_module_anywhere" in srv.log
    assert nats_client.request("plug.in", b"bob").data == b"hi bob v3 nil / Hello from a Python plugin!"
