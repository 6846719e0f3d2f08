"""The etcd store and clustering, end to end: real etcd, real nats-server, msgscript servers as subprocesses."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import time

import nats.errors
import pytest
import requests
from conftest import LOCKED, MSGSCRIPT, wait_until, write_script

import msgscript


def go_value(subject: str, name: str, content: str, libraries=None, is_html=False, executor="lua") -> str:
    """A script value exactly as the Go original writes it."""
    return json.dumps({"content": base64.b64encode(content.encode()).decode(), "executor": executor,
                       "is_html": is_html, "libraries": libraries, "name": name, "subject": subject})


def put_script(etcd, subject: str, name: str, content: str, **kw) -> None:
    etcd.put(f"msgscript/scripts/{subject}/{name}", go_value(subject, name, content, **kw))


def echo(prefix: str) -> str:
    return f'function OnMessage(subject, payload) return "{prefix}" .. payload end'




def reply(nats_client, subject, data=b"", timeout=2.0) -> bytes:
    return nats_client.request(subject, data, timeout=timeout).data


def served(nats_client, subject: str, data: bytes, expected: bytes) -> bool:
    try:
        return reply(nats_client, subject, data, 1.0) == expected
    except Exception:  # noqa: BLE001 - no responders, a timeout: not served (yet)
        return False


def etcd_server_flags(etcd) -> tuple[str, ...]:
    return ("-backend", "etcd", "-etcdurl", etcd.endpoint)


# --- the Lua module -------------------------------------------------------------------------

def run_lua(src, *args, endpoints, timeout=5):
    services = msgscript.Services(etcd_endpoints=list(endpoints))
    msgscript.load_plugins([str(msgscript.BUNDLED_PLUGINS)], services.modules)
    script = msgscript.Script("t.sub", "t", src)
    runner = msgscript.LuaRunner(script, src, services, 64 * 2**20)
    ok, *values = runner.call("OnMessage", time.monotonic() + timeout, *args)
    return values


def test_lua_module_put_get_delete(etcd):
    out = run_lua("""local etcd = require("etcd")
function OnMessage()
  assert(etcd.put("test/a", "one") == nil)
  assert(etcd.put("test/b", "two\\0bytes") == nil)
  assert(etcd.put("test/bb", 3) == nil)
  local kvs, err = etcd.get("test/", true)
  assert(err == nil)
  local parts = {}
  for _, kv in ipairs(kvs) do parts[#parts + 1] = kv:getKey() .. "=" .. kv:getValue() end
  local one = etcd.get("test/b", false)
  local none, none_err = etcd.get("test/nothing", false)
  assert(etcd.delete("test/a") == nil)
  local after = etcd.get("test/", true)
  local made = EtcdKV.new("k", "v")
  return table.concat(parts, ","), #one, tostring(none) .. tostring(none_err), #after, made:getKey() .. made:getValue()
end""", endpoints=[etcd.endpoint])
    assert out == [b"test/a=one,test/b=two\0bytes,test/bb=3", 1, b"nilnil", 2, b"kv"]
    assert etcd.get("test/", prefix=True) == {"test/b": "two\0bytes", "test/bb": "3"}


def test_lua_module_reports_unreachable_etcd_as_err():
    out = run_lua("""local etcd = require("etcd")
function OnMessage()
  local v, err = etcd.get("x", false)
  return tostring(v), err, etcd.put("x", "y"), etcd.delete("x")
end""", endpoints=["127.0.0.1:1"])
    assert out[0] == b"nil"
    assert all(b"cannot reach etcd at 127.0.0.1:1" in e for e in out[1:])


# --- the store and locks, in process -----------------------------------------------------

def test_store_fails_over_to_the_next_endpoint_and_follows_changes(etcd):
    put_script(etcd, "fo.echo", "echo", echo("x"))
    store = msgscript.EtcdStore(["127.0.0.1:1", f"http://{etcd.endpoint}"])
    store.start()
    try:
        assert [s.name for s in store.scripts("fo.echo")] == ["echo"]
        put_script(etcd, "fo.two", "two", echo("y"))
        wait_until(lambda: store.scripts("fo.two"), timeout=1.5)
    finally:
        store.stop()


def test_unreachable_etcd_is_a_one_line_config_error():
    store = msgscript.EtcdStore(["127.0.0.1:1"])
    with pytest.raises(msgscript.ConfigError, match="^cannot reach etcd at 127.0.0.1:1: Connection refused$"):
        store.load()


def test_lock_waits_until_its_deadline_then_times_out(etcd):
    locks = msgscript.EtcdStore([etcd.endpoint]).locks()
    other = msgscript.EtcdStore([etcd.endpoint]).locks()  # another server
    script = msgscript.Script("l.s", "locked", "", lock=True)
    try:
        with locks.hold(script, msgscript.Call("x", deadline=time.monotonic() + 1)):
            assert list(etcd.get("msgscript/locks/l.s/locked"))
            started = time.monotonic()
            with pytest.raises(msgscript.ScriptTimeout, match="timed out waiting for its lock"), \
                    other.hold(script, msgscript.Call("x", deadline=time.monotonic() + 0.3)):
                pass
            assert 0.25 < time.monotonic() - started < 1
        # released: the other takes it at once
        with other.hold(script, msgscript.Call("x", deadline=time.monotonic() + 1)):
            pass
        assert etcd.get("msgscript/locks/", prefix=True) == {}
    finally:
        locks.close()
        other.close()


def test_lock_without_etcd_fails_the_call_instead_of_running_unlocked():
    locks = msgscript.EtcdStore(["127.0.0.1:1"]).locks()
    script = msgscript.Script("l.s", "locked", "", lock=True)
    with pytest.raises(msgscript.MsgscriptError, match="cannot take its lock: cannot reach etcd"), \
            locks.hold(script, msgscript.Call("x", deadline=time.monotonic() + 1)):
        pytest.fail("ran without its lock")


# --- serving from etcd ---------------------------------------------------------------------

def test_go_format_data_is_served_over_nats_and_http(etcd, start_server, nats_client):
    etcd.put("msgscript/libs/greet", 'function greet(who) return "hello " .. who end')
    put_script(etcd, "funcs.hello", "hello", "function OnMessage(subject, payload) return greet(payload) end",
               libraries=["greet"])
    put_script(etcd, "funcs.hdr", "hdr", "--* require: greet\nfunction OnMessage(s, p) return greet(p) .. '!' end")
    put_script(etcd, "web.page", "page", 'function GET(url, body) return "<p>" .. url .. "</p>", 201, {} end',
               is_html=True)
    etcd.put("msgscript/scripts/bad.value/bad", "this is not JSON")
    srv = start_server(*etcd_server_flags(etcd))

    assert reply(nats_client, "funcs.hello", b"John") == b"hello John"
    assert reply(nats_client, "funcs.hdr", b"Ann") == b"hello Ann!"
    r = requests.post(f"{srv.base}/funcs.hello", data=b"Bob")
    assert base64.b64decode(r.json()["hello"]["payload"]) == b"hello Bob"
    r = requests.get(f"{srv.base}/web.page/x?y=1")
    assert (r.status_code, r.text) == (201, "<p>/x?y=1</p>")
    assert "msgscript/scripts/bad.value/bad" in srv.log  # a bad value is logged by key and skipped
    assert requests.get(f"{srv.base}/bad.value").status_code == 404


def test_watch_add_update_delete_within_a_second(etcd, start_server, nats_client):
    put_script(etcd, "watch.one", "one", echo("v1:"))
    srv = start_server(*etcd_server_flags(etcd))
    assert reply(nats_client, "watch.one", b"x") == b"v1:x"

    put_script(etcd, "watch.two", "two", echo("two:"))  # a new subject: subscribed
    wait_until(lambda: served(nats_client, "watch.two", b"y", b"two:y"), timeout=1.5)
    srv.wait_log("subscribed to watch.two", 1)

    put_script(etcd, "watch.one", "one", echo("v2:"))  # an update
    wait_until(lambda: served(nats_client, "watch.one", b"x", b"v2:x"), timeout=1.5)

    etcd.etcdctl("del", "msgscript/scripts/watch.one/one")  # a delete: unsubscribed
    srv.wait_log("unsubscribed from watch.one", 1.5)
    with pytest.raises(nats.errors.NoRespondersError):
        reply(nats_client, "watch.one", b"x", 0.5)
    assert requests.get(f"{srv.base}/watch.one").status_code == 404

    etcd.put("msgscript/libs/lib", 'function tag() return "L1" end')  # a library edit reaches its users
    put_script(etcd, "watch.lib", "lib", "function OnMessage() return tag() end", libraries=["lib"])
    wait_until(lambda: served(nats_client, "watch.lib", b"", b"L1"), timeout=1.5)
    etcd.put("msgscript/libs/lib", 'function tag() return "L2" end')
    wait_until(lambda: served(nats_client, "watch.lib", b"", b"L2"), timeout=1.5)


def test_keys_sharing_only_a_prefix_with_a_subject_are_not_served_for_it(etcd, start_server, nats_client):
    put_script(etcd, "funcs.h", "x", echo("h:"))
    put_script(etcd, "funcs.hello", "y", echo("hello:"))
    etcd.put("msgscript/scripts/funcs.hello/a/b", go_value("funcs.hello", "a/b", echo("deep:")))
    srv = start_server(*etcd_server_flags(etcd))
    r = requests.post(f"{srv.base}/funcs.hello", data=b"1").json()
    assert set(r) == {"y"}
    r = requests.post(f"{srv.base}/funcs.h", data=b"1").json()
    assert set(r) == {"x"}
    assert reply(nats_client, "funcs.hello", b"2") == b"hello:2"
    assert reply(nats_client, "funcs.h", b"3") == b"h:3"


def test_etcd_outage_keeps_serving_logs_once_and_resyncs(etcd, start_server, nats_client):
    put_script(etcd, "outage.echo", "echo", echo("before:"))
    srv = start_server(*etcd_server_flags(etcd))
    assert reply(nats_client, "outage.echo", b"1") == b"before:1"

    etcd.stop()
    srv.wait_log("etcd unreachable", 3)
    for _ in range(6):  # several retries happen meanwhile (back-off up to 2 s)
        assert reply(nats_client, "outage.echo", b"2") == b"before:2"
        assert requests.post(f"{srv.base}/outage.echo", data=b"3").status_code == 200
        time.sleep(0.5)
    assert srv.log.count("etcd unreachable") == 1

    etcd.start()
    put_script(etcd, "outage.echo", "echo", echo("after:"))
    put_script(etcd, "outage.new", "new", echo("new:"))
    wait_until(lambda: served(nats_client, "outage.echo", b"4", b"after:4"), timeout=6)
    wait_until(lambda: served(nats_client, "outage.new", b"5", b"new:5"), timeout=2)
    srv.wait_log("is back", 1)
    assert srv.log.count("etcd unreachable") == 1


def test_start_while_etcd_is_down_serves_once_it_answers(etcd, start_server, nats_client):
    put_script(etcd, "boot.echo", "echo", echo("boot:"))
    etcd.stop()
    srv = start_server(*etcd_server_flags(etcd))  # starts, with its NATS and HTTP fronts up
    assert "serving no scripts until etcd answers" in srv.log
    assert requests.get(f"{srv.base}/boot.echo").status_code == 404
    etcd.start()
    wait_until(lambda: served(nats_client, "boot.echo", b"1", b"boot:1"), timeout=6)


# --- the CLI -------------------------------------------------------------------------------

def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*MSGSCRIPT, "cli", *args], capture_output=True, text=True, timeout=30, cwd=cwd)


def assert_one_line_error(out: subprocess.CompletedProcess, *words: str) -> None:
    assert out.returncode != 0, out.stdout
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    for word in words:
        assert word in out.stderr


def test_cli_add_list_rm_round_trip(etcd, tmp_path):
    ep = etcd.endpoint
    f = write_script(tmp_path, "hello.lua", "--* subject: cli.hello\n--* name: hello\n--* require: web\n"
                     "function OnMessage(s, p) return p end\n")
    assert_one_line_error(cli("-e", ep, "add", str(f)), "requires the library web")  # not in the store yet
    etcd.put("msgscript/libs/web", "function route() end")
    out = cli("-e", ep, "add", str(f))
    assert out.returncode == 0, out.stderr
    doc = json.loads(etcd.get("msgscript/scripts/cli.hello/hello")["msgscript/scripts/cli.hello/hello"])
    assert doc == {"content": base64.b64encode(b"function OnMessage(s, p) return p end").decode(),
                   "executor": "lua", "is_html": False, "libraries": ["web"], "name": "hello",
                   "subject": "cli.hello"}

    bare = write_script(tmp_path, "bare.lua", "function OnMessage(s, p) return 'bare' end\n")
    assert cli("-e", ep, "add", "-s", "cli.other.subject", "-n", "n2", str(bare)).returncode == 0
    assert "msgscript/scripts/cli.other.subject/n2" in etcd.get("msgscript/scripts/", prefix=True)

    out = cli("-e", ep, "list")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["Subject", "Name"]
    assert [line.split() for line in lines[1:]] == [["cli.hello", "hello"], ["cli.other.subject", "n2"]]
    assert len({line.rindex(word) for line, word in zip(lines, ["Name", "hello", "n2"], strict=True)}) == 1

    assert cli("-e", ep, "ls").stdout == out.stdout
    assert cli("-e", ep, "rm", "-s", "cli.other.subject", "-n", "n2").returncode == 0
    assert list(etcd.get("msgscript/scripts/", prefix=True)) == ["msgscript/scripts/cli.hello/hello"]
    assert_one_line_error(cli("-e", ep, "rm", "-s", "cli.other.subject", "-n", "n2"), "n2")


def test_cli_add_keeps_this_projects_headers(etcd, tmp_path):
    """`lock`, `timeout` and `memory` have no field in the Go JSON: they must survive inside the content."""
    f = write_script(tmp_path, "locked.lua", "--* subject: cli.locked\n--* name: locked\n--* lock: true\n"
                     "--* timeout: 2s\nfunction OnMessage(s, p) return p end\n")
    assert cli("-e", etcd.endpoint, "add", str(f)).returncode == 0
    value = etcd.get("msgscript/scripts/cli.locked/locked")["msgscript/scripts/cli.locked/locked"]
    script = msgscript.script_from_json(value, "msgscript/scripts/cli.locked/locked")
    assert (script.lock, script.timeout) == (True, 2.0)


def test_cli_lib_add_list_rm(etcd, tmp_path):
    ep = etcd.endpoint
    one = write_script(tmp_path, "one.lua", "function one() return 1 end\n")
    libdir = tmp_path / "libs"
    (libdir / "sub").mkdir(parents=True)
    write_script(libdir, "two.lua", "--* name: second\nfunction two() return 2 end\n")
    write_script(libdir / "sub", "three.lua", "function three() return 3 end\n")

    assert cli("-e", ep, "lib", "add", str(one)).returncode == 0
    assert etcd.get("msgscript/libs/one") == {"msgscript/libs/one": "function one() return 1 end"}
    assert_one_line_error(cli("-e", ep, "lib", "add", str(libdir)), "-r")
    out = cli("-e", ep, "lib", "add", "-r", str(libdir))
    assert out.returncode == 0, out.stderr
    assert sorted(etcd.get("msgscript/libs/", prefix=True)) == [
        "msgscript/libs/one", "msgscript/libs/second", "msgscript/libs/three"]
    assert cli("-e", ep, "lib", "list").stdout.split() == ["one", "second", "three"]
    assert cli("-e", ep, "lib", "rm", "second").returncode == 0
    assert sorted(etcd.get("msgscript/libs/", prefix=True)) == ["msgscript/libs/one", "msgscript/libs/three"]
    assert_one_line_error(cli("-e", ep, "lib", "rm", "second"), "second")


def test_cli_errors_are_one_line(etcd, tmp_path):
    f = write_script(tmp_path, "ok.lua", "--* subject: a.b\n--* name: n\nfunction OnMessage() end\n")
    assert_one_line_error(cli("-e", "127.0.0.1:1", "list"), "cannot reach etcd", "127.0.0.1:1")
    assert_one_line_error(cli("-e", "127.0.0.1:1", "add", str(f)), "cannot reach etcd")
    assert_one_line_error(cli("-e", etcd.endpoint, "add", str(tmp_path / "missing.lua")), "missing.lua")
    noheaders = write_script(tmp_path, "noheaders.lua", "function OnMessage() end\n")
    assert_one_line_error(cli("-e", etcd.endpoint, "add", str(noheaders)), "subject")
    assert etcd.get("msgscript/", prefix=True) == {}


def test_cli_file_backend_explains_editing_the_directory(tmp_path):
    f = write_script(tmp_path, "ok.lua", "--* subject: a.b\n--* name: n\nfunction OnMessage() end\n")
    for args in (["add", str(f)], ["rm", "-s", "a.b", "-n", "n"], ["lib", "add", str(f)], ["lib", "rm", "x"]):
        assert_one_line_error(cli("-b", "file", *args, cwd=tmp_path), "editing")
    out = cli("-b", "file", "list", cwd=tmp_path)  # listing reads the directory
    assert out.returncode == 0 and out.stdout.split() == ["Subject", "Name", "a.b", "n"], out.stderr
    out = cli("-b", "file", "lib", "list", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout == "", out.stderr


# --- clustering ----------------------------------------------------------------------------

MARKED_ECHO = """--* subject: cluster.echo
--* name: echo
local time = require("time")
function OnMessage(subject, payload)
  if SLEEP then time.sleep(SLEEP) end
  return os.getenv("MARKER") .. ":" .. payload
end
"""


async def _requests(nc, subject: str, count: int, spread: float = 0.0, timeout: float = 15.0) -> list:
    async def one(i):
        await asyncio.sleep(spread * i / count)
        try:
            return (await nc.request(subject, str(i).encode(), timeout=timeout)).data.decode()
        except Exception as e:  # noqa: BLE001 - a lost request is what the test counts
            return f"lost: {type(e).__name__}"

    return await asyncio.gather(*(one(i) for i in range(count)))


def _check_all_answered_once(replies: list[str]) -> dict[str, int]:
    """Every request i answered with '<marker>:i'; returns the count per marker."""
    per_server: dict[str, int] = {}
    for i, text in enumerate(replies):
        marker, _, payload = text.partition(":")
        assert payload == str(i), f"request {i}: {text}"
        per_server[marker] = per_server.get(marker, 0) + 1
    return per_server


def test_two_servers_share_requests_and_sigterm_loses_none(etcd, start_server, nats_client):
    etcd.put("msgscript/scripts/cluster.echo/echo", go_value("cluster.echo", "echo", MARKED_ECHO))
    a = start_server(*etcd_server_flags(etcd), env={"MARKER": "A"})
    b = start_server(*etcd_server_flags(etcd), env={"MARKER": "B"})
    counts = _check_all_answered_once(nats_client.run(_requests(nats_client.nc, "cluster.echo", 500)))
    assert set(counts) == {"A", "B"}, counts  # each request ran exactly once, on one of them

    slow = MARKED_ECHO.replace("local time", "SLEEP = 0.05\nlocal time")
    etcd.put("msgscript/scripts/cluster.echo/echo", go_value("cluster.echo", "echo", slow))
    for srv in (a, b):
        wait_until(lambda srv=srv: srv.log.count("etcd: msgscript/scripts/cluster.echo/echo updated") >= 1, 2)

    async def load_then_sigterm():
        pending = asyncio.ensure_future(_requests(nats_client.nc, "cluster.echo", 400, spread=1.5))
        await asyncio.sleep(0.5)  # A has requests running and queued
        a.proc.terminate()
        return await pending

    replies = nats_client.run(load_then_sigterm())
    counts = _check_all_answered_once(replies)
    assert counts.get("A", 0) > 0 and counts.get("B", 0) > 0, counts
    assert a.proc.wait(30) == 0
    assert "stopped" in a.log


def _assert_no_overlap(replies: list[str]) -> dict[str, int]:
    runs = []
    for text in replies:
        marker, start, end = text.split()
        runs.append((int(start), int(end), marker))
    runs.sort()
    for (_, end, m1), (start, _, m2) in zip(runs, runs[1:], strict=False):
        assert start >= end, f"runs overlap: {m1} ended at {end}, {m2} started at {start}"
    return {m: sum(1 for r in runs if r[2] == m) for m in {r[2] for r in runs}}


def test_lock_true_never_overlaps_across_two_servers(etcd, start_server, nats_client):
    etcd.put("msgscript/scripts/lock.test/locked", go_value("lock.test", "locked", LOCKED))
    start_server(*etcd_server_flags(etcd), env={"MARKER": "A"})
    start_server(*etcd_server_flags(etcd), env={"MARKER": "B"})
    replies = nats_client.run(_requests(nats_client.nc, "lock.test", 40, timeout=20))
    assert not [r for r in replies if r.startswith("lost")], replies
    counts = _assert_no_overlap(replies)
    assert set(counts) == {"A", "B"}, counts
    assert etcd.get("msgscript/locks/", prefix=True) == {}  # released on completion


def test_lock_true_on_the_file_backend_is_local(start_server, nats_client, tmp_path):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    write_script(scripts, "locked.lua", LOCKED)
    start_server("-script", str(scripts))
    replies = nats_client.run(_requests(nats_client.nc, "lock.test", 20, timeout=20))
    assert not [r for r in replies if r.startswith("lost")], replies
    assert _assert_no_overlap(replies) == {"-": 20}

