"""Where calls run: quick scripts inline on the event loop, anything that blocks on workers,
and neither ever holds up the other (functional guarantees with generous margins, not timings)."""

from __future__ import annotations

import asyncio
import socket
import sys
import time

import pytest
import requests
from conftest import ROOT, MsgscriptProcess, write_script

SCRIPTS = {
    "hello.lua": """--* subject: sched.hello
--* name: hello
function OnMessage(subject, payload) return "hello " .. payload end
""",
    "sleepy.lua": """--* subject: sched.sleepy
--* name: sleepy
local time = require("time")
function OnMessage(subject, payload) time.sleep(3) return "slept" end
""",
    # quick (and run inline) until asked to sleep: the server must move it off the event loop
    "turns.lua": """--* subject: sched.turns
--* name: turns
function OnMessage(subject, payload)
  if payload == "slow" then require("time").sleep(2) return "slow" end
  return "quick"
end
""",
    "count.lua": """--* subject: sched.count
--* name: count
function OnMessage(subject, payload)
  local n = 0
  for i = 1, 1000 do n = n + i end
  return tostring(n)
end
""",
    "utf8.lua": """--* subject: sched.utf8
--* name: utf8
function OnMessage() error("h\u00e9llo \u2713", 0) end
""",
    "loop.lua": """--* subject: sched.loop
--* name: loop
--* timeout: 500ms
function OnMessage() local ok = pcall(function() while true do end end) while true do end end
""",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory, nats_server):
    d = tmp_path_factory.mktemp("sched")
    for name, text in SCRIPTS.items():
        write_script(d, name, text)
    proc = MsgscriptProcess(["-script", str(d), "-natsurl", nats_server.url, "-workers", "2"], d)
    yield proc
    proc.stop()


async def _gather_requests(nc, subject: str, n: int, payload: bytes = b"", timeout: float = 10):
    return await asyncio.gather(*[nc.request(subject, payload, timeout=timeout) for _ in range(n)],
                                return_exceptions=True)


def test_hello_answers_at_once_while_twenty_slow_calls_run(server, nats_client):
    """20 calls of a 3 s sleeping script in flight: a hello on another subject is still answered within 1 s."""
    loop, nc = nats_client.loop, nats_client.nc
    slow = loop.create_task(_gather_requests(nc, "sched.sleepy", 20, timeout=20))
    loop.run_until_complete(asyncio.sleep(0.5))  # the slow calls are running now
    for _ in range(5):
        started = time.monotonic()
        assert nats_client.request("sched.hello", b"B", timeout=1).data == b"hello B"
        assert time.monotonic() - started < 1.0
    answered = requests.post(f"{server.base}/sched.hello", data=b"H", timeout=1)
    assert answered.status_code == 200
    replies = loop.run_until_complete(slow)
    assert [r.data for r in replies] == [b"slept"] * 20


def test_script_that_turns_blocking_never_stalls_the_loop(server, nats_client):
    """100 quick calls (run inline), then the same script starts sleeping: other subjects keep answering."""
    for _ in range(100):
        assert nats_client.request("sched.turns", b"quick").data == b"quick"
    metrics = requests.get(f"{server.base}/metrics", timeout=5).text
    assert 'msgscript_inline_moves_total{script="turns",subject="sched.turns"} 0.0' in metrics
    loop, nc = nats_client.loop, nats_client.nc
    slow = loop.create_task(_gather_requests(nc, "sched.turns", 5, b"slow", timeout=10))
    loop.run_until_complete(asyncio.sleep(0.2))
    for _ in range(5):
        started = time.monotonic()
        assert nats_client.request("sched.hello", b"x", timeout=1).data == b"hello x"
        assert time.monotonic() - started < 1.0
    assert [r.data for r in loop.run_until_complete(slow)] == [b"slow"] * 5
    metrics = requests.get(f"{server.base}/metrics", timeout=5).text
    assert 'msgscript_inline_moves_total{script="turns",subject="sched.turns"} 1.0' in metrics


def test_timeout_of_a_loop_started_inline_still_fires(server, nats_client):
    """A loop inside pcall, then outside it, in a script that starts inline: 504 at its 500 ms limit."""
    started = time.monotonic()
    msg = nats_client.request("sched.loop", b"", timeout=5)
    assert msg.headers["Nats-Service-Error-Code"] == "504"
    assert time.monotonic() - started < 3
    assert nats_client.request("sched.hello", b"after").data == b"hello after"


def test_quick_scripts_run_inline_and_stay_there(server, nats_client):
    for _ in range(50):
        assert nats_client.request("sched.count", b"").data == b"500500"
    metrics = requests.get(f"{server.base}/metrics", timeout=5).text
    assert 'msgscript_inline_moves_total{script="count",subject="sched.count"} 0.0' in metrics
    assert 'msgscript_calls_total{script="count",subject="sched.count"}' in metrics


def test_over_the_inflight_limit_is_refused_at_once(nats_server, tmp_path, nats_client):
    write_script(tmp_path, "sleepy.lua", SCRIPTS["sleepy.lua"].replace("sched.sleepy", "sched.limit.sleepy"))
    write_script(tmp_path, "hello.lua", SCRIPTS["hello.lua"].replace("sched.hello", "sched.limit"))
    proc = MsgscriptProcess(["-script", str(tmp_path), "-natsurl", nats_server.url, "-max-inflight", "3"], tmp_path)
    try:
        loop, nc = nats_client.loop, nats_client.nc
        slow = loop.create_task(_gather_requests(nc, "sched.limit.sleepy", 3, timeout=20))
        loop.run_until_complete(asyncio.sleep(0.5))
        started = time.monotonic()
        refused = nats_client.request("sched.limit", b"x", timeout=2)
        assert refused.headers["Nats-Service-Error-Code"] == "429"
        r = requests.post(f"{proc.base}/sched.limit", data=b"x", timeout=2)
        assert r.status_code == 429
        assert time.monotonic() - started < 1.5
        loop.run_until_complete(slow)
        assert nats_client.request("sched.limit", b"y").data == b"hello y"
    finally:
        proc.stop()


# The server with nats-py's own callbacks and publish: where nats-py's internals differ from what
# NatsWire expects, this is the path it takes.
CALLBACKS = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); import msgscript; "
             "msgscript.NatsWire.enabled = False; sys.exit(msgscript.main())"]


@pytest.mark.parametrize("path", ["direct", "callbacks"])
def test_both_reply_paths_answer_every_request(path, nats_server, tmp_path, nats_client):
    """Many requests in flight, an error reply with its headers, a slow call beside quick ones, drain."""
    write_script(tmp_path, "hello.lua", SCRIPTS["hello.lua"].replace("sched.hello", "paths.hello"))
    write_script(tmp_path, "fail.lua", '--* subject: paths.fail\n--* name: fail\n'
                 'function OnMessage() error("no\\nway") end\n')
    write_script(tmp_path, "sleepy.lua", SCRIPTS["sleepy.lua"].replace("sched.sleepy", "paths.sleepy"))
    proc = MsgscriptProcess(["-script", str(tmp_path), "-natsurl", nats_server.url], tmp_path,
                            command=None if path == "direct" else CALLBACKS)
    try:
        loop, nc = nats_client.loop, nats_client.nc
        slow = loop.create_task(nc.request("paths.sleepy", b"", timeout=10))
        payloads = [str(i).encode() for i in range(2000)]
        async def all_at_once():
            return await asyncio.gather(*[nc.request("paths.hello", p, timeout=10) for p in payloads])
        replies = loop.run_until_complete(all_at_once())
        assert [r.data for r in replies] == [b"hello " + p for p in payloads]
        failed = nats_client.request("paths.fail")
        assert failed.data == b""
        assert failed.headers["Nats-Service-Error-Code"] == "500"
        assert "no" in failed.headers["Nats-Service-Error"] and "\n" not in failed.headers["Nats-Service-Error"]
        assert not slow.done()
        assert proc.stop() == 0  # SIGTERM while the slow call runs: it is still answered
        assert loop.run_until_complete(slow).data == b"slept"
        assert "lost" not in proc.log
    finally:
        proc.stop()


def test_error_text_keeps_its_utf8(server, nats_client):
    msg = nats_client.request("sched.utf8")
    assert msg.headers["Nats-Service-Error"] == "h\u00e9llo \u2713"
    r = requests.post(f"{server.base}/sched.utf8", data=b"", timeout=5)
    assert r.json()["utf8"]["error"] == "h\u00e9llo \u2713"


def test_message_with_a_reply_subject_that_is_not_utf8_does_not_cut_the_connection(server, nats_server, nats_client):
    """nats-py ends its read loop on such a message (with headers, or without): the server must drop it and go on."""
    host, port = nats_server.url.rpartition("/")[2].split(":")
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        raw.recv(4096)  # INFO
        raw.sendall(b'CONNECT {"verbose":false,"headers":true}\r\n'
                    b"HPUB sched.hello bad.\xff.reply 12 13\r\nNATS/1.0\r\n\r\nx\r\n"
                    b"PUB sched.hello bad.\xfe 1\r\nx\r\nPING\r\n")
        assert b"PONG" in raw.recv(4096)
    for i in range(20):  # the queue group spreads them: each must reach a live subscription
        assert nats_client.request("sched.hello", str(i).encode(), timeout=2).data == f"hello {i}".encode()
    server.wait_log("not UTF-8")
