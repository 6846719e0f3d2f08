"""Durable (JetStream) and scheduled (cron) scripts, against real nats-servers with JetStream.

The module shares one `nats-server -js` and, for the tests that do not stop or kill servers,
a pair of msgscript servers watching one script directory: a test drops its scripts there
(subjects, streams and consumers are the test's own) and they are removed afterwards.
Scripts record what they did by appending a line to a file (io.open), so a record survives a
server killed right after it.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests
from conftest import MsgscriptProcess, free_port, wait_port, wait_until

import msgscript

# JetStream's ack wait (`-ack-wait`, default 30s) for servers whose messages must come back
# after a kill -9 within the test.
ACK_WAIT = 2.0
ACK_WAIT_FLAGS = ("-ack-wait", f"{ACK_WAIT:g}s")


# --- helpers ---------------------------------------------------------------------------------

class JetStreamServer:
    """`nats-server -js -sd DIR` on a free loopback port; optionally one node of a cluster."""

    def __init__(self, store_dir: Path, name: str = "", cluster_port: int = 0, routes: tuple[int, ...] = ()):
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        args = [msgscript.find_nats_server(), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(store_dir)]
        if cluster_port:
            args += ["-cluster", f"nats://127.0.0.1:{cluster_port}", "--cluster_name", "test", "--server_name", name,
                     "--routes", ",".join(f"nats://127.0.0.1:{p}" for p in routes)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, proc=self.proc)

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)


class Client:
    """A nats-py connection and its JetStream context, on an event loop in its own thread
    (so subscriptions keep receiving while the test waits)."""

    def __init__(self, *urls: str):
        import nats

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.nc = self.run(nats.connect(servers=list(urls), max_reconnect_attempts=-1, reconnect_time_wait=0.2))
        self.js = self.nc.jetstream(timeout=5)

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def add_stream(self, name: str, *subjects: str, replicas: int = 1):
        return self.run(self.js.add_stream(name=name, subjects=list(subjects), num_replicas=replicas))

    def stream(self, name: str):
        return self.run(self.js.stream_info(name))

    def publish(self, subject: str, data: bytes) -> int:
        """A JetStream publish; returns the stream sequence of its PubAck."""
        return self.run(self.js.publish(subject, data)).seq

    def consumer(self, stream: str, name: str):
        return self.run(self.js.consumer_info(stream, name))

    def request(self, subject: str, data: bytes = b"", timeout: float = 5):
        return self.run(self.nc.request(subject, data, timeout=timeout))

    def subscribe(self, subject: str) -> list:
        """Core messages on `subject`, appended to the returned list as they come."""
        got: list = []

        async def sub():
            async def cb(msg):
                got.append(msg)
            await self.nc.subscribe(subject, cb=cb)
            await self.nc.flush()

        self.run(sub())
        return got

    def gather(self, subject: str, data: bytes = b"", wait: float = 0.5) -> list:
        """Every reply to one request within `wait` seconds (several servers answer $SRV.*)."""
        async def ask():
            got = []

            async def cb(msg):
                got.append(msg)
            inbox = self.nc.new_inbox()
            sub = await self.nc.subscribe(inbox, cb=cb)
            await self.nc.publish(subject, data, reply=inbox)
            await asyncio.sleep(wait)
            await sub.unsubscribe()
            return got

        return self.run(ask())

    def close(self) -> None:
        try:
            self.run(self.nc.close(), 10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


def lua_script(subject: str, name: str, body: str, **headers: str) -> str:
    lines = [f"--* subject: {subject}", f"--* name: {name}", *(f"--* {k}: {v}" for k, v in headers.items())]
    return "\n".join(lines) + "\n" + body


def recorder(path: Path) -> str:
    """Lua defining record(...): appends its arguments as one tab-separated line to `path`."""
    return (f"local function record(...)\n"
            f"  local f = assert(io.open([[{path}]], 'a'))\n"
            f"  f:write(table.concat({{...}}, '\\t') .. '\\n')\n"
            f"  f:close()\n"
            f"end\n")


def records(path: Path) -> list[list[str]]:
    """The complete lines a recorder wrote, split at tabs."""
    if not path.exists():
        return []
    return [line.split("\t") for line in path.read_text().split("\n")[:-1]]


def first_column(path: Path) -> list[str]:
    return [r[0] for r in records(path)]


def running(server: MsgscriptProcess, subject: str, name: str, timeout: float = 20) -> None:
    """Wait until `server` consumes for the script (log: 'script S/N runs from ...')."""
    server.wait_log(f"script {subject}/{name} runs from", timeout)


def serve(start_server, url: str, script_dir: Path, *flags: str, node: str = "a") -> MsgscriptProcess:
    """`msgscript server -script DIR -natsurl URL FLAGS`; its scripts see os.getenv('NODE') == node."""
    return start_server("-script", str(script_dir), "-natsurl", url, *flags, nats=False, env={"NODE": node})


def drained(client: Client, stream: str, consumer: str) -> bool:
    info = client.consumer(stream, consumer)
    return info.num_pending == 0 and info.num_ack_pending == 0


class Pair:
    """Two msgscript servers (NODE a and b) on one JetStream server, serving one script directory."""

    def __init__(self, url: str, base: Path):
        self.dir = base / "scripts"
        self.dir.mkdir()
        self.servers = [MsgscriptProcess(["-script", str(self.dir), "-natsurl", url], base, {"NODE": node})
                        for node in ("a", "b")]
        self.files: list[Path] = []

    def add(self, filename: str, text: str, wait: tuple[str, str] | None = None) -> Path:
        """Write a script; with `wait` (subject, name), wait until both servers consume for it."""
        path = self.dir / filename
        path.write_text(text)
        self.files.append(path)
        if wait:
            for server in self.servers:
                running(server, *wait)
        return path

    def remove_added(self) -> None:
        for path in self.files:
            path.unlink(missing_ok=True)
        self.files.clear()
        time.sleep(1)  # the servers drop the scripts' consumers within a second


@pytest.fixture(scope="module")
def jetstream(tmp_path_factory):
    server = JetStreamServer(tmp_path_factory.mktemp("jetstream"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def js(jetstream):
    client = Client(jetstream.url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def shared_pair(jetstream, tmp_path_factory):
    pair = Pair(jetstream.url, tmp_path_factory.mktemp("pair"))
    yield pair
    for server in pair.servers:
        server.stop()


@pytest.fixture
def pair(shared_pair):
    yield shared_pair
    shared_pair.remove_added()


# --- retries and dead letters ----------------------------------------------------------------

def test_failed_message_is_retried_then_acked(pair, js, tmp_path):
    js.add_stream("T1", "t1.work")
    seen = tmp_path / "seen"
    # The first attempt of each message fails (its counter file is new); the second succeeds.
    pair.add("retry.lua", lua_script("t1.work", "retry", recorder(seen) + f"""
function OnMessage(subject, payload)
  local path = [[{tmp_path}]] .. "/attempts-" .. payload
  local f, n = io.open(path, "r"), 0
  if f then n = tonumber(f:read("*a")); f:close() end
  f = assert(io.open(path, "w")); f:write(tostring(n + 1)); f:close()
  if n == 0 then error("first attempt of " .. payload .. " fails") end
  record(payload, os.getenv("NODE"))
  return "done"
end
""", stream="T1", retry="200ms, 200ms"), wait=("t1.work", "retry"))
    ids = [f"m{i}" for i in range(5)]
    seqs = [js.publish("t1.work", i.encode()) for i in ids]

    wait_until(lambda: len(records(seen)) >= len(ids), 15)
    wait_until(lambda: drained(js, "T1", "msgscript_t1_work__retry"), 10)
    time.sleep(0.5)  # nothing more comes
    assert sorted(first_column(seen)) == ids  # each succeeded exactly once
    assert [(tmp_path / f"attempts-{i}").read_text() for i in ids] == ["2"] * len(ids)
    info = js.consumer("T1", "msgscript_t1_work__retry")
    assert (info.num_pending, info.num_ack_pending, info.num_redelivered) == (0, 0, 0)
    assert info.ack_floor.stream_seq == max(seqs)
    log = "".join(s.log for s in pair.servers)
    assert "first attempt of m0 fails" in log


def test_always_failing_message_goes_to_dead_letter_with_its_error(pair, js, tmp_path):
    js.add_stream("T2", "t2.>")
    attempts = tmp_path / "attempts"
    body = recorder(attempts) + """
function OnMessage(subject, payload)
  record(payload)
  error("cannot handle " .. payload)
end
"""
    default_dl = js.subscribe("msgscript.deadletter.t2.default")
    custom_dl = js.subscribe("t2dead.custom")
    pair.add("dl_default.lua", lua_script("t2.default", "dl1", body, stream="T2", retry="200ms, 200ms"),
             wait=("t2.default", "dl1"))
    pair.add("dl_custom.lua", lua_script("t2.custom", "dl2", body, stream="T2", retry="100ms",
                                         deadletter="t2dead.custom"), wait=("t2.custom", "dl2"))
    seq_default = js.publish("t2.default", b"order-1")
    seq_custom = js.publish("t2.custom", b"order-2")

    wait_until(lambda: default_dl and custom_dl, 15)
    for got, seq, subject, name, tries, payload in ((default_dl, seq_default, "t2.default", "dl1", 3, "order-1"),
                                                    (custom_dl, seq_custom, "t2.custom", "dl2", 2, "order-2")):
        msg = got[0]
        assert msg.data == payload.encode()
        h = msg.headers or {}
        assert h.get("Msgscript-Script") == f"{subject}/{name}"
        assert h.get("Msgscript-Attempts") == str(tries)
        assert f"cannot handle {payload}" in h.get("Msgscript-Error", "")
        assert h.get("Msgscript-Stream") == "T2"
        assert h.get("Msgscript-Sequence") == str(seq)
        assert h.get("Msgscript-Subject") == subject
    time.sleep(1.5)  # terminated: no further attempt, no second dead letter
    counts = collections.Counter(first_column(attempts))
    assert counts == {"order-1": 3, "order-2": 2}
    assert (len(default_dl), len(custom_dl)) == (1, 1)
    for name in ("msgscript_t2_default__dl1", "msgscript_t2_custom__dl2"):
        info = js.consumer("T2", name)
        assert (info.num_pending, info.num_ack_pending) == (0, 0), name


def test_editing_the_retry_header_reaches_the_shared_consumer(pair, js, tmp_path):
    """The consumer is updated when a script's retry header changes (JetStream keeps its old config otherwise)."""
    js.add_stream("T2E", "t2e.work")
    attempts = tmp_path / "attempts"
    body = recorder(attempts) + """
function OnMessage(subject, payload)
  record(payload)
  error("no")
end
"""
    dead = js.subscribe("msgscript.deadletter.t2e.work")
    path = pair.add("edited.lua", lua_script("t2e.work", "edited", body, stream="T2E", retry="none"),
                    wait=("t2e.work", "edited"))
    js.publish("t2e.work", b"before")
    wait_until(lambda: dead, 15)
    assert dead[0].headers["Msgscript-Attempts"] == "1"
    path.write_text(path.read_text().replace("retry: none", "retry: 200ms, 200ms, 200ms"))
    for server in pair.servers:
        wait_until(lambda server=server: server.log.count("script t2e.work/edited runs from") == 2, 15)
    js.publish("t2e.work", b"after")
    wait_until(lambda: len(dead) == 2, 20)
    assert (dead[1].data, dead[1].headers["Msgscript-Attempts"]) == (b"after", "4")
    assert collections.Counter(first_column(attempts)) == {"before": 1, "after": 4}


# --- several servers -------------------------------------------------------------------------

def test_two_servers_share_a_stream_each_message_once(pair, js, tmp_path):
    js.add_stream("T3", "t3.jobs")
    seen = tmp_path / "seen"
    pair.add("share.lua", lua_script("t3.jobs", "share", recorder(seen) + """
function OnMessage(subject, payload)
  record(payload, os.getenv("NODE"))
  return "ok"
end
""", stream="T3"), wait=("t3.jobs", "share"))
    ids = [f"job{i}" for i in range(500)]
    for i in ids:
        js.publish("t3.jobs", i.encode())

    wait_until(lambda: len(records(seen)) >= len(ids), 30)
    wait_until(lambda: drained(js, "T3", "msgscript_t3_jobs__share"), 10)
    time.sleep(0.5)
    rows = records(seen)
    counts = collections.Counter(r[0] for r in rows)
    assert set(counts) == set(ids), f"lost: {sorted(set(ids) - set(counts))[:10]}"
    assert [i for i, n in counts.items() if n > 1] == []
    nodes = collections.Counter(r[1] for r in rows)
    assert set(nodes) == {"a", "b"}, f"one server did all the work: {nodes}"


def test_kill_9_one_of_two_servers_loses_no_message(start_server, jetstream, js, tmp_path, record_property):
    js.add_stream("T4", "t4.jobs")
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    seen = tmp_path / "seen"
    (scripts / "slowish.lua").write_text(lua_script("t4.jobs", "slowish", recorder(seen) + """
function OnMessage(subject, payload)
  require("time").sleep(0.02)
  record(payload, os.getenv("NODE"))
  return "ok"
end
""", stream="T4"))
    # Two calls at a time per server: 500 messages take a few seconds, so the kill lands mid-way.
    flags = ("-workers", "2", "-max-workers", "2", *ACK_WAIT_FLAGS)
    victim = serve(start_server, jetstream.url, scripts, *flags, node="a")
    survivor = serve(start_server, jetstream.url, scripts, *flags, node="b")
    for server in (victim, survivor):
        running(server, "t4.jobs", "slowish")
    ids = [f"job{i}" for i in range(500)]
    for i in ids:
        js.publish("t4.jobs", i.encode())
    wait_until(lambda: sum(r[1] == "a" for r in records(seen)) >= 60, 30, 0.01)
    victim.stop(signal.SIGKILL)
    done_at_kill = len(records(seen))
    assert done_at_kill < len(ids), "the kill came too late: everything was done already"

    wait_until(lambda: set(ids) <= set(first_column(seen)), ACK_WAIT + 30)
    wait_until(lambda: drained(js, "T4", "msgscript_t4_jobs__slowish"), 10)
    counts = collections.Counter(first_column(seen))
    duplicates = sum(n - 1 for n in counts.values())
    record_property("duplicates", duplicates)
    print(f"kill -9 after {done_at_kill} of {len(ids)} messages: {duplicates} processed twice "
          f"(redelivered after the ack wait)")
    assert set(counts) == set(ids)


# --- schedules -------------------------------------------------------------------------------

def test_cron_every_second_runs_once_per_tick_across_two_servers(pair, tmp_path):
    runs = tmp_path / "runs"
    pair.add("tick.lua", lua_script("t5.tick", "tick", recorder(runs) + """
function OnMessage(subject, payload)
  record(subject, "[" .. payload .. "]", os.getenv("NODE"), string.format("%.3f", require("time").unix()))
  return ""
end
""", cron="@every 1s"), wait=("t5.tick", "tick"))
    for server in pair.servers:
        server.wait_log("t5.tick/tick runs from schedule '@every 1s'")
    start, before = time.time(), len(records(runs))
    time.sleep(10)
    during = len(records(runs)) - before  # ticks in the window: 10; the first and last may fall either side
    time.sleep(1.5)
    rows = records(runs)
    assert 9 <= during <= 11, f"{during} runs in 10 ticks: {rows}"
    assert {(r[0], r[1]) for r in rows} == {("t5.tick", "[]")}  # OnMessage(subject, "")
    times = sorted(float(r[3]) for r in rows if float(r[3]) >= start)
    seconds = collections.Counter(int(t) for t in times)
    assert max(seconds.values()) <= 2 and sum(n > 1 for n in seconds.values()) <= 1, f"ticks ran twice: {times}"


def test_cron_headers_five_fields_timezone_and_errors(pair):
    pair.add("paris.lua", lua_script("t5b.paris", "paris", "function OnMessage() return '' end",
                                     cron="30 4 * * 1-5", timezone="Europe/Paris"), wait=("t5b.paris", "paris"))
    pair.add("hourly.lua", lua_script("t5b.hourly", "hourly", "function OnMessage() return '' end",
                                      cron="@hourly"), wait=("t5b.hourly", "hourly"))
    pair.add("badzone.lua", lua_script("t5b.bad", "badzone", "function OnMessage() return '' end",
                                       cron="@daily", timezone="Mars/Olympus"))
    pair.add("badcron.lua", lua_script("t5b.bad2", "badcron", "function OnMessage() return '' end",
                                       cron="every minute"))
    server = pair.servers[0]
    server.wait_log("badzone.lua")
    server.wait_log("badcron.lua")
    lines = server.log.splitlines()
    zone = next(line for line in lines if "badzone.lua" in line)
    assert "Mars/Olympus" in zone and "time zone" in zone
    cron = next(line for line in lines if "badcron.lua" in line)
    assert "every minute" in cron and "cron" in cron


# --- availability ----------------------------------------------------------------------------

def test_message_published_while_no_server_runs_is_processed_later(start_server, jetstream, js, tmp_path):
    js.add_stream("T6", "t6.mail")
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    seen = tmp_path / "seen"
    (scripts / "mail.lua").write_text(lua_script("t6.mail", "mail", recorder(seen) + """
function OnMessage(subject, payload) record(payload); return "sent" end
""", stream="T6"))
    js.publish("t6.mail", b"before-any-server")
    server = serve(start_server, jetstream.url, scripts)
    wait_until(lambda: first_column(seen) == ["before-any-server"], 15)
    wait_until(lambda: drained(js, "T6", "msgscript_t6_mail__mail"), 10)
    server.stop()

    js.publish("t6.mail", b"while-it-was-down")
    assert first_column(seen) == ["before-any-server"]
    serve(start_server, jetstream.url, scripts)
    wait_until(lambda: len(records(seen)) >= 2, 15)
    time.sleep(0.5)
    assert first_column(seen) == ["before-any-server", "while-it-was-down"]  # the first is not run again


def test_missing_stream_is_that_scripts_error_and_create_streams_creates_it(start_server, jetstream, js, tmp_path):
    js.add_stream("T7_OK", "t7.ok")
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    seen = tmp_path / "seen"
    body = recorder(seen) + "function OnMessage(subject, payload) record(subject, payload); return 'ok' end"
    (scripts / "missing.lua").write_text(lua_script("t7.missing", "missing", body, stream="T7_MISSING"))
    (scripts / "ok.lua").write_text(lua_script("t7.ok", "ok", body, stream="T7_OK"))
    (scripts / "core.lua").write_text(lua_script("t7.core", "core", 'function OnMessage(s, p) return "hi " .. p end'))

    server = serve(start_server, jetstream.url, scripts)
    running(server, "t7.ok", "ok")
    server.wait_log("script t7.missing/missing cannot run: stream T7_MISSING does not exist")
    line = next(x for x in server.log.splitlines() if "cannot run: stream T7_MISSING" in x)
    assert "-create-streams" in line
    assert js.request("t7.core", b"there").data == b"hi there"
    r = requests.post(f"{server.base}/t7.core", data=b"http")
    assert base64.b64decode(r.json()["core"]["payload"]) == b"hi http"
    js.publish("t7.ok", b"fine")
    wait_until(lambda: ["t7.ok", "fine"] in records(seen), 10)
    page = requests.get(f"{server.base}/_/info/t7.missing/missing")
    assert page.status_code == 200 and "T7_MISSING does not exist" in page.text
    server.stop()

    server = serve(start_server, jetstream.url, scripts, "-create-streams")
    running(server, "t7.missing", "missing")
    assert "created stream T7_MISSING" in server.log
    assert js.stream("T7_MISSING").config.subjects == ["t7.missing"]
    js.publish("t7.missing", b"now it exists")
    wait_until(lambda: ["t7.missing", "now it exists"] in records(seen), 10)


def test_embedded_nats_has_jetstream_kept_in_data_dir(start_server, tmp_path):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    data = tmp_path / "data"
    seen = tmp_path / "seen"

    def embedded_url(server):
        m = re.search(r"started embedded NATS server at (nats://[\d.]+:\d+)", server.log)
        assert m, server.log
        return m.group(1)

    server = start_server("-script", str(scripts), "-data", str(data), nats=False)
    client = Client(embedded_url(server))
    try:
        client.add_stream("EMB", "emb.>")
        (scripts / "emb.lua").write_text(lua_script("emb.job", "emb", recorder(seen) + """
function OnMessage(subject, payload) record(payload); return "ok" end
""", stream="EMB"))
        running(server, "emb.job", "emb")
        client.publish("emb.job", b"one")
        wait_until(lambda: first_column(seen) == ["one"], 10)
        wait_until(lambda: drained(client, "EMB", "msgscript_emb_job__emb"), 10)
    finally:
        client.close()
    server.stop()
    assert any(data.rglob("*")), "nothing stored in the -data directory"

    server = start_server("-script", str(scripts), "-data", str(data), nats=False)
    client = Client(embedded_url(server))
    try:
        running(server, "emb.job", "emb")
        assert client.stream("EMB").state.messages == 1  # the stream and its message survived the restart
        client.publish("emb.job", b"two")
        wait_until(lambda: len(records(seen)) >= 2, 10)
        time.sleep(0.5)
        assert first_column(seen) == ["one", "two"]  # "one" stayed acknowledged
    finally:
        client.close()


# --- observability ---------------------------------------------------------------------------

def test_stats_and_admin_page_show_pending_and_redelivered(start_server, jetstream, js, tmp_path):
    js.add_stream("T9", "t9.>")
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    hold = tmp_path / "hold"
    hold.touch()
    # Every call waits while the file `hold` exists: the messages the server has not taken stay pending.
    (scripts / "slow.lua").write_text(lua_script("t9.slow", "slow", f"""
local function held()
  local f = io.open([[{hold}]], "r")
  if f then f:close() end
  return f ~= nil
end
function OnMessage(subject, payload)
  while held() do require("time").sleep(0.05) end
  return "ok"
end
""", stream="T9"))
    (scripts / "flaky.lua").write_text(lua_script("t9.flaky", "flaky", """
function OnMessage(subject, payload) error("not today") end
""", stream="T9", retry="300ms, 1m"))
    server = serve(start_server, jetstream.url, scripts, "-workers", "1", "-max-workers", "2",
                   "-drain-timeout", "1s")
    running(server, "t9.slow", "slow")
    running(server, "t9.flaky", "flaky")
    js.publish("t9.flaky", b"x")  # fails, is redelivered after 300 ms, fails again: then waits 1 min
    backlog = 3 * msgscript.DURABLE_BATCH  # more than a server takes in at once: some stay pending
    for i in range(backlog):
        js.publish("t9.slow", b"%d" % i)
    slow_consumer, flaky_consumer = "msgscript_t9_slow__slow", "msgscript_t9_flaky__flaky"
    wait_until(lambda: js.consumer("T9", slow_consumer).num_pending > 0 and
               js.consumer("T9", flaky_consumer).num_redelivered == 1, 10)

    def durable_stats() -> dict[str, dict]:
        for reply in js.gather("$SRV.STATS.msgscript"):
            entries = {e["subject"]: e for e in json.loads(reply.data).get("durable", [])}
            if "t9.slow" in entries:
                return entries
        return {}

    def backlog_shown():
        entries = durable_stats()
        return entries if entries["t9.slow"]["pending"] > 0 and entries["t9.flaky"]["redelivered"] == 1 else None

    try:
        entries = wait_until(backlog_shown, 12, 0.3)
    except AssertionError:
        raise AssertionError(f"$SRV.STATS shows {durable_stats()} while JetStream has num_pending="
                             f"{js.consumer('T9', slow_consumer).num_pending} for t9.slow and num_redelivered="
                             f"{js.consumer('T9', flaky_consumer).num_redelivered} for t9.flaky") from None
    slow, flaky = entries["t9.slow"], entries["t9.flaky"]
    assert (slow["name"], slow["stream"], slow["consumer"]) == ("slow", "T9", slow_consumer)
    assert 0 < slow["pending"] <= js.consumer("T9", slow_consumer).num_pending + 2
    assert (flaky["name"], flaky["stream"], flaky["consumer"]) == ("flaky", "T9", flaky_consumer)

    def admin_row(subject, name, key):
        page = requests.get(f"{server.base}/_/info/{subject}/{name}")
        assert page.status_code == 200
        m = re.search(rf"<th>{key}</th><td>([^<]*)</td>", page.text)
        assert m, f"no {key} row on /_/info/{subject}/{name}: {page.text}"
        return m.group(1)

    assert int(admin_row("t9.slow", "slow", "pending")) > 0
    assert admin_row("t9.slow", "slow", "stream") == "T9"
    assert int(admin_row("t9.flaky", "flaky", "redelivered")) == 1
    assert admin_row("t9.flaky", "flaky", "retry") == "0.3s, 60s"

    hold.unlink()  # the backlog drains; the stats follow
    wait_until(lambda: drained(js, "T9", slow_consumer), 30)
    slow = wait_until(lambda: (e := durable_stats()["t9.slow"])["pending"] == 0 and e, 15)
    assert slow["acked"] == backlog


# --- a NATS cluster --------------------------------------------------------------------------

@pytest.fixture
def cluster(tmp_path):
    """Three JetStream nodes routed to each other on loopback (cluster "test", servers n0..n2)."""
    cluster_ports = [free_port() for _ in range(3)]
    nodes = []
    try:
        for n, port in enumerate(cluster_ports):
            store = tmp_path / f"n{n}"
            store.mkdir()
            nodes.append(JetStreamServer(store, f"n{n}", port, tuple(p for p in cluster_ports if p != port)))
        yield nodes
    finally:
        for node in nodes:
            node.stop(signal.SIGKILL)


def test_cluster_node_loss_core_resumes_and_no_acked_message_is_lost(start_server, cluster, tmp_path):
    nodes = cluster
    urls = [node.url for node in nodes]
    setup = Client(*urls)
    try:
        wait_until(lambda: setup.add_stream("T10", "t10.js", replicas=3), 30, 0.5)
        assert len(setup.stream("T10").cluster.replicas or []) == 2
    finally:
        setup.close()
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    seen = tmp_path / "seen"
    (scripts / "echo.lua").write_text(lua_script("t10.core", "echo", 'function OnMessage(s, p) return "re:" .. p end'))
    (scripts / "job.lua").write_text(lua_script("t10.js", "job", recorder(seen) + """
function OnMessage(subject, payload) record(payload); return "ok" end
""", stream="T10"))
    server = serve(start_server, ",".join(urls), scripts, *ACK_WAIT_FLAGS)
    running(server, "t10.js", "job")
    m = re.search(r"connected to NATS at (nats://[\d.]+:\d+)", server.log)
    assert m, server.log
    victim = next(node for node in nodes if node.url == m.group(1))
    client = Client(*[u for u in urls if u != victim.url])  # the test's own connection survives the kill

    replies: list[tuple[float, float, bool]] = []  # (sent at, answered at, ok)
    acked: list[tuple[float, str]] = []  # (PubAck at, payload)
    stop = asyncio.Event()

    async def core_requests():
        n = 0
        while not stop.is_set():
            n, sent = n + 1, time.monotonic()
            try:
                msg = await client.nc.request("t10.core", b"%d" % n, timeout=0.5)
                replies.append((sent, time.monotonic(), msg.data == b"re:%d" % n))
            except Exception:  # noqa: BLE001 - no answer (yet)
                replies.append((sent, time.monotonic(), False))
            await asyncio.sleep(0.02)

    async def js_publishes():
        n = 0
        while not stop.is_set():
            n += 1
            try:
                await client.js.publish("t10.js", b"p%d" % n, timeout=2)
                acked.append((time.monotonic(), f"p{n}"))
            except Exception:  # noqa: BLE001 - not acked: JetStream may not have it
                pass
            await asyncio.sleep(0.02)

    load = [asyncio.run_coroutine_threadsafe(task(), client.loop) for task in (core_requests, js_publishes)]
    try:
        wait_until(lambda: sum(ok for *_, ok in replies) >= 20 and len(acked) >= 20, 10)
        killed = time.monotonic()
        victim.stop(signal.SIGKILL)
        time.sleep(3)
        # If the stream's leader was on the killed node, publishes fail until the others elect one (seconds).
        wait_until(lambda: sum(t > killed for t, _ in acked) >= 20, 30)
    finally:
        client.loop.call_soon_threadsafe(stop.set)
        for f in load:
            f.result(10)
    try:
        after = [answered for sent, answered, ok in replies if ok and sent > killed]
        assert after, f"no core request answered after the node was killed; log:\n{server.log[-3000:]}"
        print(f"core requests resumed {after[0] - killed:.2f}s after the node was killed")
        assert after[0] - killed <= 2.0, f"core requests resumed {after[0] - killed:.2f}s after the kill"
        first_ack = min(t for t, _ in acked if t > killed) - killed
        print(f"JetStream publishes acked again {first_ack:.2f}s after the kill; {len(acked)} acked in all")
        ids = {i for _, i in acked}
        wait_until(lambda: ids <= set(first_column(seen)), ACK_WAIT + 40, 0.2)
    except AssertionError:
        lost = sorted({i for _, i in acked} - set(first_column(seen)), key=lambda s: int(s[1:]))
        print(f"acked but never processed ({len(lost)} of {len(acked)}): {lost[:20]}")
        raise
    finally:
        client.close()

