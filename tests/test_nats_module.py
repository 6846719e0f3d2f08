"""The `nats` Lua module: publishing and calling other scripts from a script."""

from __future__ import annotations

import subprocess

from conftest import MSGSCRIPT, write_script


def test_publish_and_request_between_scripts(start_server, tmp_path, nats_client):
    write_script(tmp_path, "upper.lua", """--* subject: svc.upper
--* name: upper
function OnMessage(_, p) return string.upper(p) end
""")
    write_script(tmp_path, "caller.lua", """--* subject: svc.caller
--* name: caller
local nats = require("nats")
function OnMessage(_, p)
  local ok, err = nats.publish("svc.events", "called with " .. p)
  assert(ok == true and err == nil, err)
  local reply, rerr = nats.request("svc.upper", p, 2)
  assert(rerr == nil, rerr)
  local none, nerr = nats.request("svc.nobody", "x", 0.3)
  return reply .. "|" .. tostring(none) .. "|" .. tostring(nerr ~= nil)
end
""")
    start_server("-script", str(tmp_path))

    async def go():
        sub = await nats_client.nc.subscribe("svc.events")
        reply = await nats_client.nc.request("svc.caller", b"hey", timeout=5)
        event = await sub.next_msg(2)
        return reply.data, event.data

    assert nats_client.run(go()) == (b"HEY|nil|true", b"called with hey")


def test_request_to_a_failing_script_returns_nil_err(start_server, tmp_path, nats_client):
    write_script(tmp_path, "bad.lua", "--* subject: svc.bad\n--* name: bad\nfunction OnMessage() error('boom') end\n")
    write_script(tmp_path, "c.lua", """--* subject: svc.c
--* name: c
function OnMessage()
  local r, err = require("nats").request("svc.bad", "", 2)
  return tostring(r) .. " " .. err
end
""")
    start_server("-script", str(tmp_path))
    data = nats_client.request("svc.c", b"").data
    assert data.startswith(b"nil ") and b"boom" in data and b"500" in data


def test_cli_dev_without_nats_gets_not_connected(tmp_path):
    script = write_script(tmp_path, "p.lua", """--* subject: dev.p
--* name: p
function OnMessage(_, p)
  local ok, err = require("nats").publish("x", p)
  return tostring(ok) .. " " .. err
end
""")
    p = subprocess.run([*MSGSCRIPT, "cli", "dev", str(script), "-i", "x"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "false Not connected to NATS"


def test_cli_dev_with_natsurl_publishes(tmp_path, nats_server, nats_client):
    script = write_script(tmp_path, "p.lua", """--* subject: dev.p
--* name: p
function OnMessage(_, p)
  local ok, err = require("nats").publish("dev.events", "from dev: " .. p)
  return tostring(ok) .. " " .. tostring(err)
end
""")

    async def go():
        sub = await nats_client.nc.subscribe("dev.events")
        await nats_client.nc.flush()
        p = subprocess.run([*MSGSCRIPT, "cli", "-u", nats_server.url, "dev", str(script), "-i", "hey"],
                           capture_output=True, text=True, timeout=60)
        return p, (await sub.next_msg(5)).data

    p, event = nats_client.run(go())
    assert p.returncode == 0 and p.stdout.strip() == "true nil", p.stderr
    assert event == b"from dev: hey"


def test_cli_dev_with_unreachable_nats_is_one_line(tmp_path):
    script = write_script(tmp_path, "q.lua", "--* subject: dev.q\n--* name: q\nfunction OnMessage() return 'x' end\n")
    p = subprocess.run([*MSGSCRIPT, "cli", "-u", "nats://127.0.0.1:1", "dev", str(script), "-i", "x"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "cannot connect to NATS" in p.stderr and "Traceback" not in p.stderr
