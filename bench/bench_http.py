"""msgscript's HTTP-mode hello against nginx + lua-nginx-module, side by side in one run.

    .venv/bin/python bench/bench_http.py [--rounds 3] [--seconds 5]
    MSGSCRIPT_FLAGS="-workers 2" .venv/bin/python bench/bench_http.py    # extra server flags

The same answer three ways, each one process serving on its own port:

- nginx: one process (worker_processes 1, master_process off, daemon off: the process started is
  the one that serves), access_log off, `load_module` of ndk and ngx_http_lua_module, a location
  answering `Hello` (text/plain, Content-Length 5) from `content_by_lua_block`, keep-alive with no
  cap on the requests per connection (nginx's default closes one every 1,000);
- msgscript: `msgscript.py server` on a file store with the HTTP-mode hello of bench.py (Lua,
  `--* http: true`, GET returns "Hello", 200, text/plain) and a nats-server of its own, as
  bench.py starts it; the request is GET http://127.0.0.1:<port>/bench.web;
- msgscript on uvloop's event loop (MSGSCRIPT_LOOP=uvloop), the same script on another server,
  so the effect of uvloop shows (the run says which loop each server has mapped: uvloop is used
  only where it is installed; asyncio's own loop is the default).

Each round runs `wrk -t1 -c16 -d<seconds>s` against one side; rounds alternate nginx, msgscript,
msgscript on uvloop, nginx, ... The server's CPU per request is its utime + stime (from
/proc/<pid>/stat) over the round divided by the requests wrk counted; wrk's own CPU is read too
(a client at 100 % of a core caps the throughput it reports). Every round must answer 200 only:
wrk's "Non-2xx or 3xx responses" and "Socket errors" lines are reported. The table has the
medians and the ratios msgscript / nginx; target: throughput ≥ 0.45× nginx's.

Needs Debian's nginx, libnginx-mod-http-lua and wrk (apt-get install -y nginx libnginx-mod-http-lua wrk).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import _common as c

HTTP_HELLO = """--* subject: bench.web
--* name: web
--* http: true
function GET(url, body) return "Hello", 200, {["Content-Type"] = "text/plain"} end
"""
SUBJECT, ANSWER = "bench.web", b"Hello"
NGINX_CONF = """worker_processes 1;
master_process off;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
{modules}
events {{
    worker_connections 1024;
}}
http {{
    access_log off;
    keepalive_requests 1000000000;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location = /{subject} {{
            default_type text/plain;
            content_by_lua_block {{
                ngx.header.content_length = 5
                ngx.print("Hello")
            }}
        }}
    }}
}}
"""
MODULE_DIRS = ("/usr/lib/nginx/modules", "/usr/share/nginx/modules", "/usr/lib64/nginx/modules")


def nginx_modules() -> list[Path]:
    """The .so files to load for content_by_lua: ndk (the lua module needs it first), then lua."""
    for d in map(Path, MODULE_DIRS):
        lua = d / "ngx_http_lua_module.so"
        if lua.exists():
            ndk = d / "ndk_http_module.so"
            return [ndk, lua] if ndk.exists() else [lua]
    sys.exit("ngx_http_lua_module.so not found under " + ", ".join(MODULE_DIRS)
             + ": apt-get install -y libnginx-mod-http-lua")


def start_nginx(procs: c.Procs) -> object:
    """nginx on a free port, one process serving, its files in the run's temp dir."""
    port, tmp = c.free_port(), procs.tmp / "nginx"
    tmp.mkdir()
    modules = "\n".join(f"load_module {m};" for m in nginx_modules())
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, modules=modules, port=port, subject=SUBJECT))
    p = procs.spawn([shutil.which("nginx"), "-p", tmp, "-e", tmp / "nginx-error.log", "-c", conf],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    p.log, p.port = tmp / "nginx-error.log", port
    c.wait_until(lambda: c.port_open(port), 20, f"nginx on port {port}", p)
    return p


def event_loop_of(pid: int) -> str:
    """Which event loop a server runs: uvloop when its extension is mapped, else asyncio's."""
    with open(f"/proc/{pid}/maps") as f:
        return "uvloop" if "/uvloop/" in f.read() else "asyncio"


def wrk_side(url: str, pid: int, seconds: int):
    """One round: wrk -t1 -c16 for `seconds`; the server's CPU over it from /proc, wrk's from rusage."""
    def measure():
        cpu0, child0 = c.cpu_seconds(pid), resource.getrusage(resource.RUSAGE_CHILDREN)
        run = subprocess.run(["wrk", "-t1", "-c16", f"-d{seconds}s", url], capture_output=True, text=True)
        cpu, child = c.cpu_seconds(pid) - cpu0, resource.getrusage(resource.RUSAGE_CHILDREN)
        out = run.stdout
        if run.returncode != 0 or "requests in" not in out:
            sys.exit(f"wrk failed (exit status {run.returncode}):\n{out}{run.stderr}")
        requests = int(re.search(r"(\d+) requests in", out).group(1))
        rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
        sock = re.search(r"Socket errors:.*", out)
        errors = "; ".join(filter(None, [f"non-2xx {non2xx.group(1)}" if non2xx else "",
                                         sock.group(0) if sock else ""]))
        elapsed = requests / rate if rate else seconds
        wrk_cpu = (child.ru_utime + child.ru_stime) - (child0.ru_utime + child0.ru_stime)
        return {"rate": rate, "cpu_us": cpu / max(requests, 1) * 1e6, "requests": requests, "errors": errors,
                "server_pct": cpu / elapsed * 100, "wrk_pct": wrk_cpu / elapsed * 100,
                "load": os.getloadavg()[0]}
    return measure


def show(r) -> str:
    return (f"{r['requests']:>8,} requests {r['rate']:>7,.0f} req/s {r['cpu_us']:6.1f} µs CPU/req  "
            f"(CPU % of a core: server {r['server_pct']:.0f}, wrk {r['wrk_pct']:.0f}; load {r['load']:.2f})  "
            f"{r['errors'] or 'all 200'}")


def row(label: str, res: dict, key: str, unit: str, target=None) -> list:
    nginx, ms, std = (c.med(res[side], key) for side in ("nginx", "msgscript", "uvloop"))
    return [label, c.fmt(nginx, unit), c.fmt(ms, unit), f"{ms / nginx:.2f}",
            c.check(ms / nginx, *target) if target else "", c.fmt(std, unit), f"{std / nginx:.2f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds per side (medians are reported)")
    ap.add_argument("--seconds", type=float, default=5, help="length of each sustained wrk round (whole seconds)")
    args = ap.parse_args()
    for tool, package in (("wrk", "wrk"), ("nginx", "nginx libnginx-mod-http-lua")):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found: apt-get install -y {package}")
    seconds = max(1, round(args.seconds))
    load0 = os.getloadavg()
    with c.Procs() as procs:
        nats_url = procs.nats()
        scripts = procs.script_dir("scripts", {"web.lua": HTTP_HELLO})
        def ready(p):
            return c.http_get(f"http://127.0.0.1:{p.port}/{SUBJECT}")[0] == 200
        server = procs.msgscript(scripts, nats_url, ready=ready)
        std = procs.msgscript(scripts, nats_url, ready=ready, env={"MSGSCRIPT_LOOP": "uvloop"})
        nginx = start_nginx(procs)
        pids = {"nginx": nginx.pid, "msgscript": server.pid, "uvloop": std.pid}
        ports = {"nginx": nginx.port, "msgscript": server.port, "uvloop": std.port}
        for name, port in ports.items():
            answer = c.http_get(f"http://127.0.0.1:{port}/{SUBJECT}")
            if answer != (200, ANSWER):
                c.die(f"{name}'s hello on port {port} answered {answer}", nginx if name == "nginx" else None)
        loops = {name: event_loop_of(pids[name]) for name in ("msgscript", "uvloop")}
        print(f"HTTP hello: {args.rounds} rounds × {seconds} s of wrk -t1 -c16 per side; msgscript on "
              f"{loops['msgscript']}'s loop, the other on {loops['uvloop']}'s; load {load0[0]:.2f}", flush=True)
        sides = {name: wrk_side(f"http://127.0.0.1:{ports[name]}/{SUBJECT}", pids[name], seconds) for name in pids}
        res = c.alternate(args.rounds, sides, show)
    load1 = os.getloadavg()
    rows = [row("throughput, wrk -t1 -c16", res, "rate", "req/s", (">=", 0.45)),
            row("server CPU per request", res, "cpu_us", "µs"),
            row("server CPU, % of a core", res, "server_pct", "%"),
            row("wrk's CPU, % of a core", res, "wrk_pct", "%")]
    errors = [f"{name} round {i + 1}: {r['errors']}" for name, side in res.items()
              for i, r in enumerate(side) if r["errors"]]
    notes = [f"Event loops: msgscript on {loops['msgscript']}'s, the last column on {loops['uvloop']}'s "
             f"(MSGSCRIPT_LOOP=uvloop)." + ("" if loops["uvloop"] == "uvloop" else
                                            " uvloop is not installed: both msgscript columns are asyncio's."),
             "wrk errors: " + ("; ".join(errors) if errors else "none (every response 200, no socket errors)"),
             f"Load average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in load0)} at the start, "
             f"{' '.join(f'{x:.2f}' for x in load1)} at the end ({os.cpu_count()} cores)."]
    c.report(f"msgscript / nginx + lua, HTTP hello, medians of {args.rounds} rounds of {seconds} s",
             ["measure", "nginx + lua", "msgscript", "ratio", "target", "msgscript on uvloop", "ratio"],
             rows, notes)


if __name__ == "__main__":
    main()
