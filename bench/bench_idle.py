"""Idle CPU and start-up time with many scripts in a file store: 2,000 scripts against 5.

    .venv/bin/python bench/bench_idle.py [--scripts 2000] [--rounds 3] [--seconds 10]

Each round starts a fresh server (-log info) on a file-store directory of N hello scripts, each on
its own subject, and measures:

- ready: from spawning the process until GET /readyz answers 200, if the server has that endpoint
  (a 404 means it does not; the target then applies to the next signal); and, noted as well,
  until the log has the line with "serving" and a NATS request on the last subject answers;
- all answered: from spawning until every one of the N subjects has answered a NATS request
  (all subjects are swept, 64 requests in flight, once the ready signal is seen; the ones that
  did not answer are asked again); a second sweep, warm, shows what the sweep itself costs;
- idle CPU: after 2 s of settling, the server's utime + stime (/proc/<pid>/stat) over --seconds
  of idleness, as a percentage of one core; plus RSS and threads at the end.

Rounds alternate 5 scripts, N scripts, 5, N, ... Targets: idle ≤ 1 % of a core and ready in
≤ 1 s, with N = 2,000.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import time

import _common as c

SCRIPT = """--* subject: idle.s{i:05d}
--* name: s{i}
function OnMessage(subject, payload) return "ok {i}" end
"""


async def sweep(url: str, n: int, deadline: float) -> None:
    """Ask every subject until each has answered once (or the deadline passes)."""
    import nats

    nc = await nats.connect(url)
    left, sem = set(range(n)), asyncio.Semaphore(64)

    async def ask(i):
        async with sem:
            try:
                if (await nc.request(f"idle.s{i:05d}", b"", timeout=2)).data == f"ok {i}".encode():
                    left.discard(i)
            except Exception:  # noqa: BLE001 -- not subscribed yet
                await asyncio.sleep(0.05)
    try:
        while left and time.monotonic() < deadline:
            await asyncio.gather(*(ask(i) for i in sorted(left)))
    finally:
        await nc.close()
    if left:
        raise SystemExit(f"{len(left)} of {n} subjects never answered (first: idle.s{min(left):05d})")


def poll_signals(p, url: str, n: int, t0: float, state: dict) -> bool:
    """Note when each ready signal is first seen (seconds after t0); true once both are known."""
    if "readyz" not in state:
        try:
            status = c.http_get(f"http://127.0.0.1:{p.port}/readyz", 1)[0]
        except OSError:
            status = None  # not listening yet
        if status == 200:
            state["readyz"] = time.monotonic() - t0
        elif status == 404:  # no such endpoint: the log line and the last subject decide
            state["readyz"] = None
    if "log" not in state and "serving" in p.log.read_text(errors="replace"):
        try:
            if c.nats_request_once(url, f"idle.s{n - 1:05d}", b"", 0.5) == f"ok {n - 1}".encode():
                state["log"] = time.monotonic() - t0
        except Exception:  # noqa: BLE001 -- not subscribed yet
            pass
    return "readyz" in state and "log" in state


def side(procs, url: str, n: int, seconds: float):
    scripts = procs.script_dir(f"scripts-{n}", {f"s{i:05d}.lua": SCRIPT.format(i=i) for i in range(n)})

    def measure():
        port = c.free_port()
        log = procs.tmp / f"msgscript-{port}.log"
        with open(log, "wb") as f:
            t0 = time.monotonic()
            p = procs.spawn([*c.server_command(), "server", "-script", scripts, "-port", port,
                             "-natsurl", url, "-log", "info", *c.server_flags()], stdout=f, stderr=subprocess.STDOUT)
        p.log, p.port, state = log, port, {}
        c.wait_until(lambda: poll_signals(p, url, n, t0, state), 60, f"msgscript with {n} scripts", p, step=0.01)
        asyncio.run(sweep(url, n, time.monotonic() + 60))
        answered = time.monotonic() - t0
        t1 = time.monotonic()
        asyncio.run(sweep(url, n, time.monotonic() + 60))  # again, warm: what the sweep itself takes
        warm = time.monotonic() - t1
        time.sleep(2)
        cpu0, w0 = c.cpu_seconds(p.pid), time.monotonic()
        time.sleep(seconds)
        idle = (c.cpu_seconds(p.pid) - cpu0) / (time.monotonic() - w0) * 100
        status = c.proc_status(p.pid)
        procs.stop(p)
        return {"readyz": state["readyz"], "log": state["log"], "answered": answered, "warm": warm, "idle": idle,
                "rss": status["rss"] / 2**20, "threads": status["threads"]}
    return measure


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scripts", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10, help="idle window per round")
    args = ap.parse_args()
    with c.Procs() as procs:
        url = procs.nats()
        names = {5: "5 scripts", args.scripts: f"{args.scripts:,} scripts"}
        print(f"{args.rounds} rounds; each: start, sweep all subjects, settle 2 s, {args.seconds:g} s idle", flush=True)
        res = c.alternate(args.rounds, {names[n]: side(procs, url, n, args.seconds) for n in names},
                          lambda r: f"ready: /readyz {r['readyz'] or 0:.2f} s, log+last subject {r['log']:.2f} s; "
                                    f"all answered {r['answered']:.2f} s "
                                    f"(warm sweep {r['warm']:.2f} s), "
                                    f"idle {r['idle']:.2f} % of a core, RSS {r['rss']:.0f} MiB, {r['threads']} threads")
    small, big = res[names[5]], res[names[args.scripts]]
    has_readyz = big[0]["readyz"] is not None  # else the log line and last subject are the signal

    def line(label, key, unit, limit=None, spec=".2f"):
        if small[0][key] is None:
            return [label, "n/a", "n/a", "", ""]
        lo, hi = c.med(small, key), c.med(big, key)
        target = c.check(hi, "<=", limit[0]).replace("×", limit[1]) if limit else ""
        return [label, f"{lo:{spec}}{unit}", f"{hi:{spec}}{unit}", f"{hi / max(lo, 0.01):.2f}", target]

    rows = [line("ready: GET /readyz answers 200", "readyz", " s", (1, " s") if has_readyz else None),
            line('ready: log line "serving" and the last subject answers', "log", " s",
                 None if has_readyz else (1, " s")),
            line("every subject answered", "answered", " s"),
            line(f"idle CPU over {args.seconds:g} s", "idle", " % of a core", (1, " %")),
            line("RSS when idle", "rss", " MiB", spec=".0f"), line("threads when idle", "threads", "", spec=".0f")]
    c.report(f"start-up and idle cost, file store, medians of {args.rounds} rounds",
             ["measure", names[5], names[args.scripts], "ratio", "target"], rows,
             ["Times are from spawning the server process (Python start-up and imports included). \"Every "
              "subject answered\" includes each script's first (cold) call and the sweep itself; a second, warm "
              f"sweep of the {args.scripts:,} subjects took {c.med(big, 'warm'):.2f} s (median)."])


if __name__ == "__main__":
    main()
