"""The kv module's cost per call, and how fast an edit reaches a server with the NATS store and the etcd store.

    .venv/bin/python bench/bench_kv.py [--rounds 3] [--seconds 5] [--inflight 16] [--edits 10] [--no-etcd]

Part 1, kv get and put, side by side in one run on one `nats-server -js`:

- msgscript: a server (file store) with two scripts, `b:get("k")` and `b:put("k", payload)` on a bucket
  `bench` (kv.bucket per call, as a script does);
- bare: one nats-py process answering the same subjects with the same operation on the same bucket
  (a task per request, so its requests overlap as the server's do);
- etcd (unless --no-etcd or no etcd binary): the same server's scripts doing `etcd.get` / `etcd.put`.

Each round and side: latency at one request in flight (p50, p99 over --requests requests), then a load of
--inflight requests in flight for --seconds: throughput and CPU per call of the answering process
(utime + stime from /proc/<pid>/stat; nats-server's own CPU is the same for every side and not counted).
Rounds alternate the sides; medians of the rounds are reported.

Part 2, reload latency of an edit: a server with `-backend nats` (on the same nats-server) and one with
`-backend etcd`, one script each. For --edits edits per store, alternating: (a) `msgscript cli add` of a new
version, timed from the start of the command until a NATS request gets the new version's answer (the CLI's
own start-up, about half a second of Python imports, is most of it); (b) the value written straight into
the store (nats-py kv.put / etcd put), timed from the write until the new answer: the watch's latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time

import _common as c

sys.path.insert(0, str(c.ROOT / "tests"))

KV_SCRIPTS = {
    "get.lua": """--* subject: bench.kv.get
--* name: get
local kv = require("kv")
function OnMessage(subject, payload)
  local value, err = kv.bucket("bench"):get("k")
  return value or err
end
""",
    "put.lua": """--* subject: bench.kv.put
--* name: put
local kv = require("kv")
function OnMessage(subject, payload)
  local rev, err = kv.bucket("bench"):put("k", payload)
  return rev and "ok" or err
end
""",
    "etcdget.lua": """--* subject: bench.etcd.get
--* name: etcdget
local etcd = require("etcd")
function OnMessage(subject, payload)
  local kvs, err = etcd.get("bench/k", false)
  return kvs and kvs[1]:getValue() or err
end
""",
    "etcdput.lua": """--* subject: bench.etcd.put
--* name: etcdput
local etcd = require("etcd")
function OnMessage(subject, payload)
  return etcd.put("bench/k", payload) or "ok"
end
""",
}
BARE = """
import asyncio, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1])
    kv = await nc.jetstream().key_value("bench")
    async def get(msg):
        await msg.respond((await kv.get("k")).value)
    async def put(msg):
        await kv.put("k", msg.data)
        await msg.respond(b"ok")
    def spawn(handler):
        async def cb(msg):
            asyncio.ensure_future(handler(msg))
        return cb
    await nc.subscribe("bench.bare.get", cb=spawn(get))
    await nc.subscribe("bench.bare.put", cb=spawn(put))
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""
VALUE = b"v" * 100


# -- part 1 -------------------------------------------------------------------------------------

CLIENT = """
import asyncio, json, sys, time, nats
async def main(url, subject, expect, requests, seconds, inflight):
    nc = await nats.connect(url)
    data = b"v" * 100
    for _ in range(100):
        await nc.request(subject, data, timeout=10)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    bad, times = 0, []
    for _ in range(int(requests)):
        t = time.perf_counter()
        reply = await nc.request(subject, data, timeout=10)
        times.append(time.perf_counter() - t)
        bad += reply.data != expect.encode()
    times.sort()
    print(json.dumps({"p50": times[len(times) // 2], "p99": times[int(len(times) * 0.99)]}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    answered, end = 0, time.perf_counter() + float(seconds)
    async def worker():
        nonlocal answered, bad
        while time.perf_counter() < end:
            reply = await nc.request(subject, data, timeout=10)
            answered += 1
            bad += reply.data != expect.encode()
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(int(inflight))))
    print(json.dumps({"answered": answered, "bad": bad, "elapsed": time.perf_counter() - t0}), flush=True)
    await nc.close()
asyncio.run(main(*sys.argv[1:]))
"""


def measure(procs: c.Procs, url: str, subject: str, expect: str, pid: int, args) -> dict:
    client = procs.python(CLIENT, url, subject, expect, str(args.requests), str(args.seconds), str(args.inflight))
    client.stdin.write("go\n")
    client.stdin.flush()
    latency = json.loads(client.stdout.readline())
    cpu0, t0 = c.cpu_seconds(pid), time.perf_counter()
    client.stdin.write("go\n")
    client.stdin.flush()
    load = json.loads(client.stdout.readline())
    wall, cpu = time.perf_counter() - t0, c.cpu_seconds(pid) - cpu0
    procs.stop(client)
    if load["bad"]:
        raise SystemExit(f"{subject}: {load['bad']} wrong answers")
    return {"p50": latency["p50"] * 1e6, "p99": latency["p99"] * 1e6, "rate": load["answered"] / wall,
            "cpu_us": cpu / load["answered"] * 1e6}


def part1(procs: c.Procs, url: str, etcd, args) -> list[list]:
    async def setup():
        import nats

        nc = await nats.connect(url)
        kv = await nc.jetstream().create_key_value(bucket="bench")
        await kv.put("k", VALUE)
        await nc.close()

    asyncio.run(setup())
    flags = ["-etcdurl", etcd.endpoint] if etcd else []
    if etcd:
        etcd.put("bench/k", VALUE.decode())
    server = procs.msgscript(procs.script_dir("kv-scripts", KV_SCRIPTS), url, flags=flags)
    bare = procs.python(BARE, url)
    sides = {"bare nats-py": ("bench.bare", bare.pid), "msgscript kv": ("bench.kv", server.pid)}
    if etcd:
        sides["msgscript etcd"] = ("bench.etcd", server.pid)
    rows = []
    for op in ("get", "put"):
        expect = VALUE.decode() if op == "get" else "ok"
        print(f"{op}: {args.rounds} rounds, {args.requests} requests one at a time, then {args.seconds:g} s with "
              f"{args.inflight} in flight", flush=True)
        results = c.alternate(args.rounds, {
            name: (lambda prefix=prefix, pid=pid, op=op, expect=expect:
                   measure(procs, url, f"{prefix}.{op}", expect, pid, args))
            for name, (prefix, pid) in sides.items()},
            show=lambda r: f"p50 {r['p50']:6.0f} µs  p99 {r['p99']:6.0f} µs  {r['rate']:7,.0f} calls/s  "
                           f"{r['cpu_us']:6.1f} µs CPU/call")
        base = c.med(results["bare nats-py"], "cpu_us")
        for name, rs in results.items():
            rows.append([f"{op}: {name}", c.fmt(c.med(rs, "p50"), "µs"), c.fmt(c.med(rs, "p99"), "µs"),
                         c.fmt(c.med(rs, "rate"), "/s"), c.fmt(c.med(rs, "cpu_us"), "µs"),
                         f"{c.med(rs, 'cpu_us') / base:.2f}"])
    return rows


# -- part 2 -------------------------------------------------------------------------------------

def script(name: str, version: int) -> str:
    return (f"--* subject: bench.reload.{name}\n--* name: reload\n"
            f'function OnMessage(s, p) return "v{version}" end\n')


def wait_reply(loop, nc, name: str, version: int) -> float:
    """Poll (every millisecond) until the server of `name` answers with `version`; when it did (perf_counter)."""
    want, deadline = f"v{version}".encode(), time.perf_counter() + 30
    while time.perf_counter() < deadline:
        try:
            if loop.run_until_complete(nc.request(f"bench.reload.{name}", b"", timeout=1)).data == want:
                return time.perf_counter()
        except Exception:  # noqa: BLE001 - not yet
            pass
        time.sleep(0.001)
    raise SystemExit(f"{name}: version {version} never answered")


def part2(procs: c.Procs, url: str, etcd, args) -> list[list]:
    import nats

    sys.path.insert(0, str(c.ROOT))
    import msgscript

    clis = {"nats": ["cli", "-b", "nats", "-u", url]}
    if etcd:
        clis["etcd"] = ["cli", "-b", "etcd", "-e", etcd.endpoint]
    empty = procs.script_dir("empty", {})
    for name, cli in clis.items():
        path = procs.tmp / f"{name}.lua"
        path.write_text(script(name, 0))
        subprocess.run([*c.server_command(), *cli, "add", path], check=True, capture_output=True)
        flags = ["-backend", name, "-data", procs.tmp / "data"]
        flags += ["-etcdurl", etcd.endpoint] if name == "etcd" else []
        procs.msgscript(empty, url, flags=flags)
    loop = asyncio.new_event_loop()
    nc = loop.run_until_complete(nats.connect(url))
    scripts_kv = loop.run_until_complete(nc.jetstream().key_value("msgscript_scripts"))
    results = {name: {"cli": [], "direct": []} for name in clis}
    version = 0
    print(f"reload: {args.edits} edits per store and way, alternating", flush=True)
    for _ in range(args.edits):
        for name, cli in clis.items():
            version += 1
            path = procs.tmp / f"{name}.lua"
            path.write_text(script(name, version))
            t0 = time.perf_counter()
            subprocess.run([*c.server_command(), *cli, "add", path], check=True, capture_output=True)
            results[name]["cli"].append(wait_reply(loop, nc, name, version) - t0)
            version += 1
            value = msgscript.script_to_json(msgscript.parse_script(script(name, version)))
            t0 = time.perf_counter()
            if name == "nats":
                loop.run_until_complete(scripts_kv.put(f"bench.reload.{name}/reload", value.encode()))
            else:
                etcd.put(f"msgscript/scripts/bench.reload.{name}/reload", value)
            results[name]["direct"].append(wait_reply(loop, nc, name, version) - t0)
    loop.run_until_complete(nc.close())
    loop.close()
    return [[f"{name} store", c.fmt(c.median(rs["cli"]) * 1e3, "ms"), c.fmt(max(rs["cli"]) * 1e3, "ms"),
             c.fmt(c.median(rs["direct"]) * 1e3, "ms"), c.fmt(max(rs["direct"]) * 1e3, "ms")]
            for name, rs in results.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5, help="seconds of load per round and side")
    ap.add_argument("--inflight", type=int, default=16, help="requests in flight during the load")
    ap.add_argument("--requests", type=int, default=1000, help="requests one at a time for the latency")
    ap.add_argument("--edits", type=int, default=10, help="edits per store and way (part 2)")
    ap.add_argument("--no-etcd", action="store_true", help="leave out the etcd module and the etcd store")
    args = ap.parse_args()
    with c.Procs() as procs:
        etcd = None
        if not args.no_etcd:
            from _etcd import EtcdServer

            try:
                etcd = EtcdServer()
            except FileNotFoundError as e:
                print(f"no etcd ({e}); its rows are left out", flush=True)
        try:
            url = procs.nats(jetstream=True)
            rows1 = part1(procs, url, etcd, args)
            rows2 = part2(procs, url, etcd, args)
        finally:
            if etcd:
                etcd.close()
    c.report(f"kv get and put through a msgscript script and from a bare nats-py process, medians of {args.rounds} "
             f"rounds", ["operation: side", "p50, 1 in flight", "p99, 1 in flight",
                         f"throughput, {args.inflight} in flight", "CPU per call", "CPU / bare"], rows1)
    c.report(f"Reload latency of an edit, {args.edits} edits per store", [
        "store", "cli add → new answer, median", "max", "direct write → new answer, median", "max"], rows2)


if __name__ == "__main__":
    main()
