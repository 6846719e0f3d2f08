"""Side-by-side benchmark: msgscript versus bare baselines, in one run on one nats-server.

    .venv/bin/python bench/bench.py [--requests 3000] [--seconds 5]

NATS: the hello script through msgscript versus a bare nats-py echo responder (the floor for
a Python NATS responder): sequential round trips (p50/p99) and throughput with 64 requests
in flight.  HTTP (wrk, keep-alive, 1 and 16 connections): an HTTP-mode hello through
msgscript versus a bare stdlib ThreadingHTTPServer echo.  Prints medians of --rounds runs
and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import msgscript  # noqa: E402

HELLO = """--* subject: bench.hello
--* name: hello
function OnMessage(subject, payload)
  return "Hello, " .. payload .. "!"
end
"""
HTTP_HELLO = """--* subject: bench.web
--* name: web
--* http: true
function GET(url, body)
  return "Hello, world!", 200, {["Content-Type"] = "text/plain"}
end
"""
BARE_NATS = """
import asyncio, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1])
    async def cb(msg):
        await msg.respond(b"Hello, " + msg.data + b"!")
    await nc.subscribe("bare.hello", queue="bare", cb=cb)
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""
BARE_HTTP = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def do_GET(self):
        body = b"Hello, world!"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
ThreadingHTTPServer.daemon_threads = True
print("ready", flush=True)
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} never opened")


async def nats_latency(nc, subject: str, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        await nc.request(subject, b"bench", timeout=5)
        times.append(time.perf_counter() - t)
    return times


async def nats_throughput(nc, subject: str, n: int, inflight: int = 64) -> float:
    sem = asyncio.Semaphore(inflight)

    async def one():
        async with sem:
            await nc.request(subject, b"bench", timeout=10)

    t = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    return n / (time.perf_counter() - t)


def wrk(url: str, connections: int, seconds: int) -> tuple[float, int]:
    out = subprocess.run(["wrk", "-t", str(min(connections, 2)), "-c", str(connections), "-d", f"{seconds}s", url],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return rps, int(non2xx.group(1)) if non2xx else 0


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=3000, help="round trips per latency run")
    ap.add_argument("--rounds", type=int, default=3, help="runs per measurement (medians are reported)")
    ap.add_argument("--seconds", type=int, default=5, help="wrk duration per run")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="msgscript-bench-"))
    (tmp / "hello.lua").write_text(HELLO)
    (tmp / "web.lua").write_text(HTTP_HELLO)
    procs = []
    try:
        nats_port, ms_port, bare_http_port = free_port(), free_port(), free_port()
        nats_url = f"nats://127.0.0.1:{nats_port}"
        procs.append(subprocess.Popen([msgscript.find_nats_server(), "-a", "127.0.0.1", "-p", str(nats_port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(nats_port)
        extra = os.environ.get("MSGSCRIPT_FLAGS", "").split()  # e.g. MSGSCRIPT_FLAGS="-workers 2"
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "msgscript.py"), "server", "-script", str(tmp),
                                       "-natsurl", nats_url, "-port", str(ms_port), "-log", "warn", *extra]))
        for code, arg in ((BARE_NATS, nats_url), (BARE_HTTP, str(bare_http_port))):
            procs.append(subprocess.Popen([sys.executable, "-c", code, arg], stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL))
            procs[-1].stdout.readline()
        wait_port(ms_port)
        time.sleep(1)
        results = asyncio.run(run_nats(nats_url, args))
        if shutil.which("wrk"):
            for conns in (1, 16):
                for name, url in (("bare", f"http://127.0.0.1:{bare_http_port}/x"),
                                  ("msgscript", f"http://127.0.0.1:{ms_port}/bench.web")):
                    runs = [wrk(url, conns, args.seconds) for _ in range(args.rounds)]
                    results[f"http_rps_c{conns}_{name}"] = statistics.median(r[0] for r in runs)
                    results[f"http_non2xx_c{conns}_{name}"] = sum(r[1] for r in runs)
        else:
            print("wrk not found (apt-get install wrk): HTTP part skipped")
        report(results)
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)


async def run_nats(url: str, args) -> dict:
    import nats

    nc = await nats.connect(url)
    out: dict[str, float] = {}
    for subject in ("bare.hello", "bench.hello"):
        await nats_latency(nc, subject, 300)  # warm up
    lat = {"bare": [], "msgscript": []}
    tput = {"bare": [], "msgscript": []}
    for _ in range(args.rounds):  # alternate so both see the same machine noise
        for name, subject in (("bare", "bare.hello"), ("msgscript", "bench.hello")):
            lat[name].append(await nats_latency(nc, subject, args.requests))
            tput[name].append(await nats_throughput(nc, subject, args.requests * 2))
    for name in lat:
        out[f"nats_p50_{name}"] = statistics.median(pct(r, 0.5) for r in lat[name]) * 1e6
        out[f"nats_p99_{name}"] = statistics.median(pct(r, 0.99) for r in lat[name]) * 1e6
        out[f"nats_rps_{name}"] = statistics.median(tput[name])
    await nc.close()
    return out


def report(r: dict) -> None:
    print(f"\nmachine: {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    print(f"{'measure':<40}{'bare':>12}{'msgscript':>12}{'ratio':>8}")
    rows = [("NATS round trip p50 (µs)", "nats_p50"), ("NATS round trip p99 (µs)", "nats_p99"),
            ("NATS throughput, 64 in flight (req/s)", "nats_rps"),
            ("HTTP keep-alive, 1 conn (req/s)", "http_rps_c1"), ("HTTP keep-alive, 16 conns (req/s)", "http_rps_c16")]
    for label, key in rows:
        if f"{key}_bare" in r:
            bare, ms = r[f"{key}_bare"], r[f"{key}_msgscript"]
            print(f"{label:<40}{bare:>12.0f}{ms:>12.0f}{ms / bare:>8.2f}")
    for conns in (1, 16):
        if f"http_non2xx_c{conns}_msgscript" in r:
            print(f"non-2xx responses, {conns} conn(s): bare {r[f'http_non2xx_c{conns}_bare']}, "
                  f"msgscript {r[f'http_non2xx_c{conns}_msgscript']}")


if __name__ == "__main__":
    main()
