"""msgscript against bare baselines, side by side in one run: server CPU per message and throughput.

    .venv/bin/python bench/bench.py [--nats] [--http] [--rounds 3] [--seconds 5] [--clients 2]
    MSGSCRIPT_FLAGS="-workers 2" .venv/bin/python bench/bench.py    # extra server flags

NATS: the hello script through msgscript against a bare nats-py asyncio responder answering the
same with `await msg.respond(...)`, both on one nats-server. Each round, load-generator processes
(--clients, default 2, sharing the in-flight requests: a single nats-py process tops out below
what the bare responder can answer) keep 64 requests in flight for --seconds;
the server's CPU (utime + stime from /proc/<pid>/stat) over the round divided by the messages
answered is its CPU per message. Then 2,000 sequential requests (one at a time) give p50/p99.

HTTP: an HTTP-mode hello through msgscript against a bare stdlib ThreadingHTTPServer (HTTP/1.1,
keep-alive, Content-Length, one write per response) under `wrk -t2 -c16`; CPU per request from
/proc likewise.

Rounds alternate bare, msgscript, bare, msgscript, ...; the table has the medians and the ratios
msgscript / bare beside the targets. Without --nats or --http, both run.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys

import _common as c

HELLO = """--* subject: bench.hello
--* name: hello
function OnMessage(subject, payload) return "Hello, " .. payload end
"""
HTTP_HELLO = """--* subject: bench.web
--* name: web
--* http: true
function GET(url, body) return "Hello", 200, {["Content-Type"] = "text/plain"} end
"""
BARE_NATS = """
import asyncio, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1])
    async def cb(msg):
        await msg.respond(b"Hello, " + msg.data)
    await nc.subscribe("bare.hello", queue="bare", cb=cb)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""
BARE_HTTP = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
RESPONSE = b"HTTP/1.1 200 OK\\r\\nContent-Type: text/plain\\r\\nContent-Length: 5\\r\\n\\r\\nHello"
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    disable_nagle_algorithm = True
    def do_GET(self):
        self.wfile.write(RESPONSE)  # status line, headers and body in one write
    def log_message(self, *a): pass
class Server(ThreadingHTTPServer):
    daemon_threads = True
    def handle_error(self, request, client_address): pass  # wrk resets its connections at the end
server = Server(("127.0.0.1", int(sys.argv[1])), H)
print("ready", flush=True)
server.serve_forever()
"""
PAYLOAD, ANSWER = "bench", "Hello, bench"
INFLIGHT, SEQUENTIAL = 64, 2000


def nats_side(procs, url, subject, pid, args):
    """One round of one side: sustained load, then sequential latency."""
    def measure():
        per = INFLIGHT // args.clients
        clients = c.start_clients(procs, "nats-load", *[(url, subject, PAYLOAD, ANSWER, args.seconds, per)]
                                  * args.clients)
        load = c.run_clients(clients, [pid], procs.nats_pid)
        seq = c.run_clients(c.start_clients(procs, "nats-latency", (url, subject, PAYLOAD, ANSWER, args.sequential)),
                            [pid])
        bad = load["errors"] + load["wrong"] + seq["errors"] + seq["wrong"]
        return {"rate": load["answered"] / load["wall"], "cpu_us": load["cpu"] / max(load["answered"], 1) * 1e6,
                "answered": load["answered"], "client_cpu": load["client_cpu_pct"], "bad": bad,
                "server_pct": load["cpu"] / load["wall"] * 100, "broker_pct": load["broker_cpu"] / load["wall"] * 100,
                "p50": seq["clients"][0]["p50"] * 1e6, "p99": seq["clients"][0]["p99"] * 1e6}
    return measure


def wrk_side(url, pid, seconds):
    def measure():
        cpu0 = c.cpu_seconds(pid)
        out = subprocess.run(["wrk", "-t2", "-c16", f"-d{seconds}s", url], capture_output=True, text=True,
                             check=True).stdout
        cpu = c.cpu_seconds(pid) - cpu0
        requests = int(re.search(r"(\d+) requests in", out).group(1))
        non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
        sock = re.search(r"Socket errors:.*", out)
        errors = (f"non-2xx {non2xx.group(1)}; " if non2xx else "") + (sock.group(0) if sock else "")
        rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        return {"rate": rate, "cpu_us": cpu / max(requests, 1) * 1e6, "requests": requests, "errors": errors,
                "server_pct": cpu / (requests / rate) * 100 if rate else 0.0}
    return measure


def show_nats(r):
    bad = f"; {r['bad']} errors/wrong" if r["bad"] else ""
    return (f"{r['answered']:>7,} answered {r['rate']:>7,.0f} msg/s {r['cpu_us']:6.1f} µs CPU/msg  "
            f"p50 {r['p50']:5.0f} µs  p99 {r['p99']:5.0f} µs  (CPU % of a core: server {r['server_pct']:.0f}, "
            f"nats-server {r['broker_pct']:.0f}, busiest client {r['client_cpu']:.0f}{bad})")


def show_http(r):
    return (f"{r['requests']:>7,} requests {r['rate']:>7,.0f} req/s {r['cpu_us']:6.1f} µs CPU/req  "
            f"(server at {r['server_pct']:.0f} % of a core)  {r['errors'] or 'no errors'}")


def row(label, results, key, unit, target=None, side="msgscript"):
    bare, ms = c.med(results["bare"], key), c.med(results[side], key)
    return [label, c.fmt(bare, unit), c.fmt(ms, unit), f"{ms / bare:.2f}",
            c.check(ms / bare, *target) if target else ""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nats", action="store_true", help="run the NATS part")
    ap.add_argument("--http", action="store_true", help="run the HTTP part")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per side (medians are reported)")
    ap.add_argument("--seconds", type=float, default=5, help="length of each sustained round")
    ap.add_argument("--clients", type=int, default=2, choices=(1, 2, 4),
                    help="load-generator processes sharing the 64 in-flight NATS requests (default 2: one "
                         "nats-py process does not saturate the bare responder)")
    ap.add_argument("--sequential", type=int, default=SEQUENTIAL, help="sequential requests per latency round")
    ap.add_argument("--loops", action="store_true",
                    help="also run msgscript on uvloop's event loop (MSGSCRIPT_LOOP=uvloop) beside asyncio's own")
    ap.add_argument("--against", metavar="CHECKOUT",
                    help="also run another checkout's msgscript (e.g. a git worktree of an older commit): before/after")
    args = ap.parse_args()
    if not args.nats and not args.http:
        args.nats = args.http = True
    if args.http and not shutil.which("wrk"):
        sys.exit("wrk not found: apt-get install -y wrk (or run with --nats)")
    rows, notes = [], []
    with c.Procs() as procs:
        url = procs.nats()
        scripts = procs.script_dir("scripts", {"hello.lua": HELLO, "web.lua": HTTP_HELLO})
        def ready(p):
            return c.nats_request_once(url, "bench.hello", b"x") == b"Hello, x" and \
                c.http_get(f"http://127.0.0.1:{p.port}/bench.web")[0] == 200
        server = procs.msgscript(scripts, url, ready=ready)
        other = None
        if args.against:  # the same hello on another subject, from another checkout
            other_scripts = procs.script_dir("other", {"hello.lua": HELLO.replace("bench.hello", "other.hello")})
            other = procs.msgscript(other_scripts, url, checkout=args.against,
                                    ready=lambda p: c.nats_request_once(url, "other.hello", b"x") == b"Hello, x")
        std = None
        if args.loops:  # the same hello on another subject, on uvloop's event loop
            std_scripts = procs.script_dir("std", {"hello.lua": HELLO.replace("bench.hello", "std.hello")})
            std = procs.msgscript(std_scripts, url, env={"MSGSCRIPT_LOOP": "uvloop"},
                                  ready=lambda p: c.nats_request_once(url, "std.hello", b"x") == b"Hello, x")
        if args.nats:
            bare = procs.python(BARE_NATS, url)
            print(f"NATS: {args.rounds} rounds × {args.seconds:g} s, {INFLIGHT} in flight from {args.clients} "
                  f"client process(es), then {args.sequential} sequential requests", flush=True)
            sides = {"bare": nats_side(procs, url, "bare.hello", bare.pid, args),
                     "msgscript": nats_side(procs, url, "bench.hello", server.pid, args)}
            if std:
                sides["uvloop"] = nats_side(procs, url, "std.hello", std.pid, args)
            if other:
                sides["against"] = nats_side(procs, url, "other.hello", other.pid, args)
            res = c.alternate(args.rounds, sides, show_nats)
            rows += [row("NATS server CPU per message", res, "cpu_us", "µs", ("<=", 1.5)),
                     row(f"NATS throughput, {INFLIGHT} in flight", res, "rate", "msg/s", (">=", 0.9)),
                     row("NATS sequential round trip p50", res, "p50", "µs", ("<=", 1.2)),
                     row("NATS sequential round trip p99", res, "p99", "µs")]
            if other:
                rows += [row(f"NATS server CPU per message, {args.against}", res, "cpu_us", "µs", None, "against"),
                         row(f"NATS throughput, {args.against}", res, "rate", "msg/s", None, "against")]
            if std:
                rows += [row("NATS server CPU per message, uvloop's loop", res, "cpu_us", "µs", ("<=", 1.5),
                             "uvloop"),
                         row(f"NATS throughput, {INFLIGHT} in flight, uvloop's loop", res, "rate", "msg/s",
                             (">=", 0.9), "uvloop")]
            busy = max(r["client_cpu"] for side in res.values() for r in side)
            notes.append(f"NATS load: {INFLIGHT} requests in flight from {args.clients} nats-py client process(es), "
                         f"the busiest at {busy:.0f} % of a core"
                         + (" (one process cannot saturate the bare responder)." if args.clients > 1 else "."))
            bad = sum(r["bad"] for side in res.values() for r in side)
            if bad:
                notes.append(f"NATS: {bad} requests failed or got a wrong answer")
        if args.http:
            bare_port = c.free_port()
            bare_pid = procs.python(BARE_HTTP, str(bare_port)).pid
            for port in (bare_port, server.port):
                if c.http_get(f"http://127.0.0.1:{port}/bench.web") != (200, b"Hello"):
                    sys.exit(f"HTTP hello on port {port} answered {c.http_get(f'http://127.0.0.1:{port}/bench.web')}")
            print(f"HTTP: {args.rounds} rounds × {args.seconds:g} s of wrk -t2 -c16", flush=True)
            seconds = max(1, round(args.seconds))
            sides = {"bare": wrk_side(f"http://127.0.0.1:{bare_port}/bench.web", bare_pid, seconds),
                     "msgscript": wrk_side(f"http://127.0.0.1:{server.port}/bench.web", server.pid, seconds)}
            res = c.alternate(args.rounds, sides, show_http)
            rows += [row("HTTP server CPU per request", res, "cpu_us", "µs", ("<=", 1.2)),
                     row("HTTP throughput, wrk -t2 -c16", res, "rate", "req/s", (">=", 1.0))]
            errors = [f"{name} round {i + 1}: {r['errors']}" for name, side in res.items()
                      for i, r in enumerate(side) if r["errors"]]
            notes.append("wrk errors: " + ("; ".join(errors) if errors else "none (no non-2xx, no socket errors)"))
    c.report(f"msgscript / bare, medians of {args.rounds} rounds of {args.seconds:g} s",
             ["measure", "bare", "msgscript", "ratio", "target"], rows, notes)


if __name__ == "__main__":
    main()
