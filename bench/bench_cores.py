"""Every core: a CPU-bound script of about 0.5 ms, the server on one core and then on two (taskset).

    .venv/bin/python bench/bench_cores.py [--rounds 3] [--seconds 5] [--inflight 32] [--ms 0.5]

Two msgscript servers run the same script (a Lua arithmetic loop calibrated to take about --ms
milliseconds in bare lupa): one pinned to core 0 (`taskset -c 0`), one allowed cores 0 and 1.
Each round keeps --inflight NATS requests in flight against one of them from a load-generator
process for --seconds; rounds alternate 1 core, 2 cores, 1 core, ... Reported: messages per
second (medians), the ratio 2 cores / 1 core (target ≥ 1.6), the server's CPU (% of one core)
and the client's and nats-server's CPU beside it (they share the machine). A quick script runs
inline on the event loop; one that computes goes to the worker pool while the loop is busy, so
that its calls run in parallel (lupa releases the GIL while Lua runs).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import lupa.lua51

import _common as c

LOOP = "local s = 0 for i = 1, {n} do s = s + i % 7 * 2 end return tostring(s)"


def calibrate(ms: float) -> int:
    """Iterations of LOOP that take about `ms` milliseconds in bare lupa."""
    lua = lupa.lua51.LuaRuntime()
    n = 10000
    while True:
        f = lua.eval(f"function() {LOOP.format(n=n)} end")
        f()
        t = time.perf_counter()
        for _ in range(20):
            f()
        took = (time.perf_counter() - t) / 20 * 1e3
        if took > ms / 4:
            return max(1000, int(n * ms / took))
        n *= 4


def side(procs, url, subject, pid, args, expect):
    def measure():
        clients = c.start_clients(procs, "nats-load", (url, subject, "x", expect, args.seconds, args.inflight))
        r = c.run_clients(clients, [pid], procs.nats_pid)
        client = r["clients"][0]
        return {"rate": r["answered"] / r["wall"], "server_pct": r["cpu"] / r["wall"] * 100,
                "client_pct": client["cpu"] / client["elapsed"] * 100,
                "broker_pct": r["broker_cpu"] / r["wall"] * 100, "bad": r["errors"] + r["wrong"]}
    return measure


def show(r):
    bad = f"; {r['bad']} errors/wrong" if r["bad"] else ""
    return (f"{r['rate']:>7,.0f} msg/s  CPU % of a core: server {r['server_pct']:.0f}, client {r['client_pct']:.0f}, "
            f"nats-server {r['broker_pct']:.0f}{bad}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--inflight", type=int, default=32, help="requests in flight")
    ap.add_argument("--ms", type=float, default=0.5, help="milliseconds one call computes (in bare lupa)")
    args = ap.parse_args()
    if not shutil.which("taskset") or (os.cpu_count() or 1) < 2:
        sys.exit("needs taskset and at least 2 cores")
    n = calibrate(args.ms)
    body = f"function OnMessage(subject, payload) {LOOP.format(n=n)} end\n"
    lua = lupa.lua51.LuaRuntime()
    lua.execute(body)
    expect = str(lua.globals().OnMessage("x", "x"))
    with c.Procs() as procs:
        url = procs.nats()
        servers = {}
        for name, cpus in (("1 core", "0"), ("2 cores", "0,1")):
            subject = f"cores.c{cpus.replace(',', '')}"
            scripts = procs.script_dir(subject, {"cpu.lua": f"--* subject: {subject}\n--* name: cpu\n{body}"})
            server = procs.msgscript(scripts, url, ready=lambda p, s=subject: c.nats_request_once(url, s, b"x")
                                     == expect.encode())
            os.sched_setaffinity(server.pid, {int(x) for x in cpus.split(",")})
            for task in os.listdir(f"/proc/{server.pid}/task"):  # every thread, those started already too
                os.sched_setaffinity(int(task), {int(x) for x in cpus.split(",")})
            servers[name] = (subject, server)
        print(f"{args.rounds} rounds × {args.seconds:g} s, {args.inflight} in flight; one call: {n:,} loop "
              f"iterations (about {args.ms:g} ms in bare lupa)", flush=True)
        res = c.alternate(args.rounds, {name: side(procs, url, subject, server.pid, args, expect)
                                        for name, (subject, server) in servers.items()}, show)
    one, two = c.med(res["1 core"], "rate"), c.med(res["2 cores"], "rate")
    rows = [["throughput", c.fmt(one, "msg/s"), c.fmt(two, "msg/s"), f"{two / one:.2f}", c.check(two / one, ">=", 1.6)]]
    for what, key in (("server", "server_pct"), ("client", "client_pct"), ("nats-server", "broker_pct")):
        rows.append([f"{what} CPU (% of a core)", f"{c.med(res['1 core'], key):.0f}",
                     f"{c.med(res['2 cores'], key):.0f}", "", ""])
    c.report(f"a {args.ms:g} ms script, server on 1 core then 2 (taskset), medians of {args.rounds} rounds",
             ["measure", "1 core", "2 cores", "ratio", "target"], rows)


if __name__ == "__main__":
    main()
