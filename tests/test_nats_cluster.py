"""A cluster on NATS alone: three real nats-server nodes with JetStream (R3 buckets), two msgscript servers with
`-backend nats`, scripts added with the CLI; a node killed under load, kv counters from both servers, a lock
left by a server killed with SIGKILL."""

from __future__ import annotations

import asyncio
import concurrent.futures
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests
from _nats_cluster import NatsCluster
from conftest import MSGSCRIPT, MsgscriptProcess, free_port, wait_until, write_script

import msgscript


@pytest.fixture(scope="module")
def cluster():
    c = NatsCluster()
    yield c
    c.close()


@pytest.fixture
def nodes(cluster):
    """The cluster with every node running (a test that killed one gets it back)."""
    if len(cluster.live) < len(cluster.nodes):
        for node in cluster.nodes:
            if not node.running:
                node.start()
        cluster.wait_ready()
    return cluster


def jetstream(url: str, work):
    import nats

    async def go():
        nc = await nats.connect(url.split(","))
        try:
            return await work(nc.jetstream(timeout=5))
        finally:
            await nc.close()

    return asyncio.run(go())


def cli(url: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*MSGSCRIPT, "cli", "-b", "nats", "-u", url, *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd)


def add(url: str, directory: Path, filename: str, text: str, timeout: float = 30) -> None:
    """Write a script and add it with the CLI, retrying while the cluster elects leaders."""
    write_script(directory, filename, text)
    out = wait_until(lambda: (r := cli(url, "add", filename, cwd=directory)).returncode == 0 and r, timeout, 0.5)
    assert out.stdout.startswith("added ")


@pytest.fixture
def servers(tmp_path):
    started = []

    def start(url: str, marker: str) -> MsgscriptProcess:
        proc = MsgscriptProcess(["-backend", "nats", "-natsurl", url, "-data", str(tmp_path / f"data-{marker}"),
                                 "-http-timeout", "30s"], tmp_path, {"MARKER": marker})
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def post(server: MsgscriptProcess, subject: str, body: str = "", timeout: float = 5) -> str:
    reply = requests.post(f"{server.base}/{subject}", data=body, timeout=timeout)
    return f"{reply.status_code} {reply.text}"


ECHO = """--* subject: c.echo
--* name: echo
--* http: true
function POST(url, body) return os.getenv("MARKER") .. " VERSION " .. body, 200 end
"""


def replicas(url: str, stream: str) -> int:
    async def info(jsm):
        return (await jsm.stream_info(stream)).config.num_replicas

    return jetstream(url, info)


def test_scripts_added_with_the_cli_are_served_by_two_servers(nodes, tmp_path, servers):
    add(nodes.url, tmp_path, "echo.lua", ECHO.replace("VERSION", "v1"))
    a, b = servers(nodes.url, "A"), servers(nodes.url, "B")
    assert post(a, "c.echo", "x") == "200 A v1 x" and post(b, "c.echo", "x") == "200 B v1 x"
    assert replicas(nodes.url, "KV_msgscript_scripts") == 3 and replicas(nodes.url, "KV_msgscript_libs") == 3
    add(nodes.url, tmp_path, "echo.lua", ECHO.replace("VERSION", "v2"))
    for server, marker in ((a, "A"), (b, "B")):
        wait_until(lambda server=server, marker=marker: post(server, "c.echo", "x") == f"200 {marker} v2 x", 1.0)


COUNTER = """--* subject: kv.count
--* name: count
--* http: true
local kv = require("kv")
function POST(url, body)
  local b, err = kv.bucket("t_counter")
  if not b then return err, 500 end
  for attempt = 1, 200 do
    local value, rev = b:get("n")
    if value == nil and rev ~= nil then return rev, 500 end
    local ok
    if value == nil then ok = b:create("n", "1") else ok = b:update("n", tostring(tonumber(value) + 1), rev) end
    if ok then return os.getenv("MARKER") .. " " .. attempt, 200 end
  end
  return "gave up", 500
end
"""


def test_kv_counter_increments_from_two_servers_lose_none(nodes, tmp_path, servers):
    add(nodes.url, tmp_path, "count.lua", COUNTER)
    a, b = servers(nodes.url, "A"), servers(nodes.url, "B")
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda i: post((a, b)[i % 2], "kv.count", timeout=30), range(1000)))
    assert all(r.startswith("200 ") for r in replies), [r for r in replies if not r.startswith("200 ")][:5]
    assert {r.split()[1] for r in replies} == {"A", "B"}
    retried = sum(1 for r in replies if r.split()[2] != "1")

    async def final(jsm):
        return (await (await jsm.key_value("t_counter")).get("n")).value

    assert jetstream(nodes.url, final) == b"1000", f"{retried} calls retried"
    assert replicas(nodes.url, "KV_t_counter") == 3
    print(f"1000 increments, {retried} of them retried after a conflict")


LOCKED = """--* subject: lock.slow
--* name: slow
--* lock: true
--* http: true
--* timeout: 60s
local time = require("time")
function POST(url, body)
  if body == "hold" then time.sleep(50) end
  return os.getenv("MARKER") .. " got it", 200
end
"""


def test_a_lock_held_by_a_killed_server_expires_within_its_ttl(nodes, tmp_path, servers):
    add(nodes.url, tmp_path, "slow.lua", LOCKED)
    a, b = servers(nodes.url, "A"), servers(nodes.url, "B")
    threading.Thread(target=lambda: _quietly(post, a, "lock.slow", "hold", 60), daemon=True).start()

    async def held(jsm):
        try:
            return (await (await jsm.key_value("msgscript_locks")).get("lock.slow/slow")).value
        except Exception:  # noqa: BLE001 - not yet
            return None

    wait_until(lambda: jetstream(nodes.url, held), 10)
    assert replicas(nodes.url, "KV_msgscript_locks") == 3
    a.proc.kill()  # SIGKILL: no chance to release anything
    killed = time.monotonic()
    assert post(b, "lock.slow", "quick", 30) == "200 B got it"
    waited = time.monotonic() - killed
    # the lock was refreshed at most LOCK_TTL/3 before the kill: B waited for it to expire, and no longer
    assert msgscript.LOCK_TTL * 2 / 3 - 1 < waited < msgscript.LOCK_TTL + 2, waited
    print(f"the killed server's lock expired {waited:.2f}s after the kill (TTL {msgscript.LOCK_TTL}s)")


def _quietly(func, *args):
    try:
        func(*args)
    except Exception:  # noqa: BLE001 - the server it waits on is killed
        pass


def test_a_node_killed_under_load(nodes, tmp_path, servers):
    """HTTP load on both servers while the node leading the scripts bucket is killed: every request is answered;
    NATS requests are answered again once clients have moved; a later edit reaches both servers. (Last in
    the file: a node that has just restarted loses some answers to fresh connections for a few seconds.)"""
    add(nodes.url, tmp_path, "echo.lua", ECHO.replace("VERSION", "v1"))
    a, b = servers(nodes.url, "A"), servers(nodes.url, "B")

    async def leader(jsm):
        return (await jsm.stream_info("KV_msgscript_scripts")).cluster.leader

    victim = next(n for n in nodes.nodes if n.name == jetstream(nodes.url, leader))
    results: list[tuple[float, str]] = []
    stop = threading.Event()

    def load(server):
        session = requests.Session()
        for i in range(100_000):  # bounded: at most 10 s of requests (see below)
            if stop.is_set():
                return
            try:
                text = session.post(f"{server.base}/c.echo", data=str(i), timeout=5).text
            except requests.RequestException as e:
                text = f"failed: {type(e).__name__}"
            results.append((time.monotonic(), text))

    threads = [threading.Thread(target=load, args=(s,)) for s in (a, b)]
    for t in threads:
        t.start()
    time.sleep(2)
    killed_at = time.monotonic()
    victim.kill()
    time.sleep(4)
    stop.set()
    for t in threads:
        t.join(10)
    after = [text for at, text in results if at > killed_at]
    assert len(after) > 100, len(after)
    failed = [text for _, text in results if " v1 " not in text]
    assert not failed, failed[:5]

    survivors = ",".join(n.url for n in nodes.live)
    client_async = asyncio.new_event_loop()

    async def request():
        import nats

        nc = await nats.connect(survivors.split(","))
        try:
            return (await nc.request("c.echo", b"", timeout=1)).data.decode()
        finally:
            await nc.close()

    try:
        wait_until(lambda: client_async.run_until_complete(request()) is not None, 15)  # answered: served
    finally:
        client_async.close()

    edited = time.monotonic()
    add(survivors, tmp_path, "echo.lua", ECHO.replace("VERSION", "v2"))  # retried while JetStream fails over
    written = time.monotonic()
    for server, marker in ((a, "A"), (b, "B")):
        wait_until(lambda server=server, marker=marker: post(server, "c.echo", "x") == f"200 {marker} v2 x", 15)
    print(f"edit after the kill: `cli add` succeeded {written - edited:.2f}s after it was first tried, both servers "
          f"answered with it {time.monotonic() - written:.2f}s later")


def test_a_cluster_of_embedded_nats_servers_one_command_per_node(tmp_path):
    """Three msgscript servers, each with its embedded NATS joined to the others' (-nats-cluster, -nats-routes):
    no NATS server started apart, a script added through one node is served by all three, on R3 buckets."""
    routes, clients = [free_port() for _ in range(3)], [free_port() for _ in range(3)]
    procs = []
    try:
        for i in range(3):
            others = ",".join(f"nats://127.0.0.1:{routes[j]}" for j in range(3) if j != i)
            procs.append(MsgscriptProcess(
                ["-backend", "nats", "-replicas", "3", "-data", str(tmp_path / f"data-{i}"),
                 "-nats-port", str(clients[i]), "-nats-cluster", f"nats://127.0.0.1:{routes[i]}",
                 "-nats-routes", others, "-nats-name", f"node-{i}"], tmp_path, {"MARKER": f"N{i}"}))
        url = f"nats://127.0.0.1:{clients[1]}"
        add(url, tmp_path, "echo.lua", ECHO.replace("VERSION", "v1"), timeout=60)
        for i, proc in enumerate(procs):
            wait_until(lambda proc=proc, i=i: post(proc, "c.echo", "x") == f"200 N{i} v1 x", 30, 0.2)
        assert replicas(url, "KV_msgscript_scripts") == 3
    finally:
        for proc in procs:
            proc.stop()
