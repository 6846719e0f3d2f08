"""Server CPU per call of a CPU-bound Lua script: msgscript against bare lupa, side by side.

    .venv/bin/python bench/bench_lua_cpu.py [--rounds 3] [--seconds 5] [--callers 4]

The script is a 1,000,000-iteration arithmetic loop in OnMessage. msgscript side: --callers
NATS requests in flight for --seconds from a load-generator process; CPU per call is the server's
utime + stime (/proc/<pid>/stat) over the round divided by the calls answered. Bare side: the same
OnMessage in a plain lupa LuaRuntime (no sandbox) in a separate process calling it in a loop for
--seconds, its CPU per call read from /proc the same way: lupa.lua51 without a hook, lupa.lua51
with msgscript's hook (a count hook every LUA_INSTRUCTION_CHECK instructions that asks a Python
function whether the deadline has passed, as the sandbox's does), and lupa.lua54 without a hook.
Rounds alternate the four sides. Prints medians and the ratios msgscript / bare lua51 (target
≤ 1.2×), / bare lua51 with the same hook (what the sandbox and the call cost beyond the time
check) and / the fastest bare side.
"""

from __future__ import annotations

import argparse
import os
import time

import lupa.lua51
import lupa.lua54

import _common as c
from msgscript import LUA_INSTRUCTION_CHECK

HOOK_EVERY = LUA_INSTRUCTION_CHECK  # how often the sandbox's hook looks at the clock

LOOP = """function OnMessage(subject, payload)
  local s = 0 for i = 1, 1000000 do s = s + i % 7 * 2 end return tostring(s)
end
"""
SCRIPT = "--* subject: bench.cpu\n--* name: cpu\n" + LOOP
BARE_LUA = """
import importlib, sys, time
lua = importlib.import_module("lupa." + sys.argv[1]).LuaRuntime()
if len(sys.argv) > 3:  # msgscript's time check: a count hook every N instructions asks Python for the clock
    deadline = time.monotonic() + 1e9
    lua.execute("local expired, n = ...; debug.sethook(function() if expired() then error('timeout') end end, '', n)",
                lambda: time.monotonic() > deadline, int(sys.argv[3]))
lua.execute(sys.argv[2])
on_message = lua.globals().OnMessage
on_message("bench.cpu", "x")
print("ready", flush=True)
for line in sys.stdin:  # "SECONDS": call in a loop that long, print the count
    calls, end = 0, time.perf_counter() + float(line)
    while time.perf_counter() < end:
        on_message("bench.cpu", "x")
        calls += 1
    print(calls, flush=True)
"""


def bare_side(proc, seconds):
    def measure():
        cpu0, t0 = c.cpu_seconds(proc.pid), time.perf_counter()
        proc.stdin.write(f"{seconds}\n")
        proc.stdin.flush()
        calls = int(proc.stdout.readline())
        cpu, wall = c.cpu_seconds(proc.pid) - cpu0, time.perf_counter() - t0
        return {"cpu_ms": cpu / calls * 1e3, "rate": calls / wall, "calls": calls, "cores": cpu / wall}
    return measure


def msgscript_side(procs, url, pid, args, expect):
    def measure():
        clients = c.start_clients(procs, "nats-load", (url, "bench.cpu", "x", expect, args.seconds, args.callers))
        r = c.run_clients(clients, [pid])
        if r["errors"] or r["wrong"]:
            raise SystemExit(f"msgscript: {r['errors']} failed and {r['wrong']} wrong replies in a round")
        return {"cpu_ms": r["cpu"] / r["answered"] * 1e3, "rate": r["answered"] / r["wall"], "calls": r["answered"],
                "cores": r["cpu"] / r["wall"]}
    return measure


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--callers", type=int, default=4, help="NATS requests in flight on the msgscript side")
    args = ap.parse_args()
    with c.Procs() as procs:
        url = procs.nats()
        bare = {}
        for version in ("lua51", "lua54"):
            bare[version] = procs.python(BARE_LUA, version, LOOP)
        bare["hooked"] = procs.python(BARE_LUA, "lua51", LOOP, str(HOOK_EVERY))
        answers = set()  # what the loop returns in Lua 5.1 and in 5.4 (msgscript runs one of them)
        for lua in (lupa.lua51.LuaRuntime(), lupa.lua54.LuaRuntime()):
            lua.execute(LOOP)
            answers.add(lua.globals().OnMessage("bench.cpu", "x"))
        server = procs.msgscript(procs.script_dir("scripts", {"cpu.lua": SCRIPT}), url,
                                 ready=lambda p: c.nats_request_once(url, "bench.cpu", b"x", 30).decode() in answers)
        expect = c.nats_request_once(url, "bench.cpu", b"x", 30).decode()
        print(f"{args.rounds} rounds × {args.seconds:g} s per side; msgscript with {args.callers} callers "
              f"over NATS", flush=True)
        res = c.alternate(args.rounds, {"bare 5.1": bare_side(bare["lua51"], args.seconds),
                                        "bare 5.1+hook": bare_side(bare["hooked"], args.seconds),
                                        "bare 5.4": bare_side(bare["lua54"], args.seconds),
                                        "msgscript": msgscript_side(procs, url, server.pid, args, expect)},
                          lambda r: f"{r['cpu_ms']:7.2f} ms CPU/call  {r['rate']:7.1f} calls/s  ({r['calls']} calls)")
    cpu = {name: c.med(rs, "cpu_ms") for name, rs in res.items()}
    fastest = min(("bare 5.1", "bare 5.4"), key=cpu.get)
    ratio = cpu["msgscript"] / cpu[fastest]
    def line(label, name, target=""):
        return [label, c.fmt(cpu[name], "ms"), c.fmt(c.med(res[name], "rate"), "calls/s"),
                f"{cpu['msgscript'] / cpu[name]:.2f}", target]
    vs51 = cpu["msgscript"] / cpu["bare 5.1"]
    rows = [line("bare lupa lua51, no hook", "bare 5.1", f"≤ 1.2× {'✓' if vs51 <= 1.2 else '✗'}"),
            line(f"bare lupa lua51, hook every {HOOK_EVERY:,} instructions", "bare 5.1+hook"),
            line("bare lupa lua54, no hook" + (" (fastest bare)" if fastest == "bare 5.4" else ""), "bare 5.4"),
            [f"msgscript ({args.callers} callers over NATS)", c.fmt(cpu["msgscript"], "ms"),
             c.fmt(c.med(res["msgscript"], "rate"), "calls/s"), "", f"fastest bare {ratio:.2f}×"]]
    cores = c.med(res["msgscript"], "cores")
    c.report(f"CPU per call of a 1,000,000-iteration Lua loop, medians of {args.rounds} rounds of {args.seconds:g} s",
             ["side", "CPU per call", "calls/s", "msgscript / this side", "target"], rows,
             [f"calls/s: the bare side is one thread; msgscript ran {args.callers} calls at a time and used "
              f"{cores * 100:.0f} % of a core (median), on a {os.cpu_count()}-core machine."])


if __name__ == "__main__":
    main()
