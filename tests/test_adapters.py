"""The two places msgscript uses a library's private internals, checked against the installed versions.

NatsWire takes our subscriptions' messages from nats-py's parser and writes replies into its buffer;
LupaState reads a lupa runtime's lua_State to stop a long Lua step from the watchdog thread. Both are
pinned in pyproject.toml to the versions tested here: when an upgrade breaks them, these tests say so
by name, and the server falls back (nats-py's public API; the count hook alone).
"""

from __future__ import annotations

import sys
import threading
import time

import msgscript
import pytest
from conftest import MsgscriptProcess, write_script


def test_installed_nats_py_has_what_natswire_needs():
    from nats.aio.client import Client, __version__

    missing = msgscript.NatsWire.missing(Client())
    assert missing == [], (f"nats-py {__version__} lacks {missing}: NatsWire would fall back to the public "
                           f"API (slower); update NatsWire and the pin in pyproject.toml")


def test_installed_lupa_layout_is_the_one_lupastate_reads():
    import lupa

    runner = msgscript.LuaRunner(msgscript.Script("t.s", "t", ""), "", msgscript.Services(), 64 * 2**20)
    assert msgscript.LUPA.lib is not None and runner.state, \
        f"lupa {lupa.__version__}: LupaState cannot find a runtime's lua_State (tested: {msgscript.LupaState.TESTED})"


def test_a_long_lua_step_is_stopped_from_another_thread_at_once():
    """One instruction of a few milliseconds, repeated: the count hook alone would see the deadline only
    every 10,000 instructions (tens of seconds here); the watchdog's trip stops it at the deadline."""
    services = msgscript.Services()
    scheduler = msgscript.Scheduler(msgscript.Store(), services)
    try:
        src = ('function OnMessage() local big = string.rep("x", 2^22) '
               'while true do local s = big .. "y" end end')
        runner = msgscript.LuaRunner(msgscript.Script("t.s", "t", src), src, services, 64 * 2**20)
        started = time.monotonic()
        with pytest.raises(Exception, match="timed out"):
            runner.call("OnMessage", time.monotonic() + 0.5, b"t.s", b"")
        assert time.monotonic() - started < 0.7
    finally:
        scheduler.close()


BLOCKED_READ = """
import os, signal, sys, threading, time
sys.path.insert(0, sys.argv[1])
import msgscript
read_end, write_end = os.pipe()  # stdin: a pipe nobody writes to, kept open
os.dup2(read_end, 0)
signal.signal(msgscript.WAKE_SIGNAL, lambda *_: None)  # as Server.run does
services = msgscript.Services()
scheduler = msgscript.Scheduler(msgscript.Store(), services)
out = {}
def worker():
    src = "function OnMessage() return io.read() end"
    runner = msgscript.LuaRunner(msgscript.Script("t.s", "t", src), src, services, 64 * 2**20)
    started = time.monotonic()
    try:
        runner.call("OnMessage", time.monotonic() + 0.5, b"t.s", b"")
        out["error"] = "no error"
    except Exception as e:
        out["error"] = str(e).split(chr(10))[0]
    out["took"] = time.monotonic() - started
thread = threading.Thread(target=worker)
thread.start()
thread.join(5)
print(out.get("error"), round(out.get("took", 99), 2), thread.is_alive(), sep="|")
"""


def test_a_worker_blocked_in_a_system_call_is_interrupted_at_its_deadline(tmp_path):
    """A C read that never returns (a script's io.read on a silent pipe): the watchdog's signal ends it,
    the hook stops the script, the thread is free again."""
    import subprocess

    root = str(msgscript.Path(msgscript.__file__).parent)
    out = subprocess.run([sys.executable, "-c", BLOCKED_READ, root], capture_output=True, text=True, timeout=30)
    error, took, alive = out.stdout.strip().split("|")
    assert "timed out" in error and float(took) < 0.8 and alive == "False", (out.stdout, out.stderr)


ROOT = str(msgscript.Path(msgscript.__file__).parent)
CALLBACKS = [sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); "
             "import msgscript; msgscript.NatsWire.enabled = False; sys.exit(msgscript.main())"]


def test_the_public_api_path_serves_raw_envelope_and_several_scripts(tmp_path, nats_server, nats_client):
    """Where nats-py's internals differ, the server uses nats-py's callbacks and publish: the same answers."""
    write_script(tmp_path, "a.lua", '--* subject: pub.x\n--* name: a\nfunction OnMessage(s, p) return "a" .. p end\n')
    write_script(tmp_path, "b.lua", '--* subject: pub.y\n--* name: b\nfunction OnMessage(s, p) return "b" .. p end\n')
    write_script(tmp_path, "c.lua", '--* subject: pub.y\n--* name: c\nfunction OnMessage(s, p) return "c" .. p end\n')
    proc = MsgscriptProcess(["-script", str(tmp_path), "-natsurl", nats_server.url], tmp_path, command=CALLBACKS)
    try:
        assert nats_client.request("pub.x", b"1").data == b"a1"
        envelope = nats_client.request("pub.x", b'{"payload": "Mg=="}').data
        assert b'"script_result"' in envelope and b"YTI=" in envelope  # base64 of "a2"
        replies = []
        done = threading.Event()

        async def gather():
            inbox = nats_client.nc.new_inbox()
            sub = await nats_client.nc.subscribe(inbox)
            await nats_client.nc.publish("pub.y", b"3", reply=inbox)
            for _ in range(2):
                msg = await sub.next_msg(timeout=5)
                replies.append((msg.headers or {}).get("Msgscript-Name", "") + ":" + msg.data.decode())
            done.set()
        nats_client.run(gather())
        assert done.is_set() and sorted(replies) == ["b:b3", "c:c3"]
    finally:
        assert proc.stop() == 0
