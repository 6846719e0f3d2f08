"""Soak: one msgscript server under mixed NATS and HTTP load for --minutes; nothing may be lost or grow.

    .venv/bin/python bench/soak.py [--minutes 10]

Scripts: hello (NATS), an HTTP-mode hello, one that errors, one that times out (`--* timeout:
200ms`, an endless loop) and a memory bomb (`--* memory: 16MiB`, strings concatenated in a loop).
Clients, concurrently: 8 NATS requesters and 4 HTTP keep-alive connections sending hello with
every 10th request to the erroring script; one NATS and one HTTP lane sending timeout and memory
bomb requests one after another with short pauses. Every reply is checked: the right answer, or
the expected error (NATS: Nats-Service-Error-Code 500 for the error and the memory bomb, 504 for
the timeout; HTTP: status 500 and 504; the error message naming the error, the time-out or the
memory). A request with no answer at all within 10 s is lost.

Every 10 s the server's VmRSS and Threads are read from /proc/<pid>/status. At the end: requests,
replies, lost replies and wrong answers per kind, and RSS and threads in the first minute (the
highest sample up to 60 s, or up to half of a run shorter than 2 minutes: memory-bomb calls
make RSS swing), at the end, and the highest after that. Exits non-zero if a reply was lost or
wrong, or if at the end RSS is over 110 % or threads over +4 of the first minute's values.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import sys
import threading
import time
from collections import Counter

import _common as c

SCRIPTS = {
    "hello.lua": '--* subject: soak.hello\n--* name: hello\n'
                 'function OnMessage(subject, payload) return "Hello, " .. payload end\n',
    "web.lua": '--* subject: soak.web\n--* name: web\n--* http: true\n'
               'function POST(url, body) return "Hello, " .. body, 200, {["Content-Type"] = "text/plain"} end\n',
    "error.lua": '--* subject: soak.error\n--* name: error\n'
                 'function OnMessage(subject, payload) error("soak: deliberate error") end\n',
    "timeout.lua": '--* subject: soak.timeout\n--* name: timeout\n--* timeout: 200ms\n'
                   'function OnMessage(subject, payload) while true do end end\n',
    "memory.lua": '--* subject: soak.memory\n--* name: memory\n--* memory: 16MiB\n'
                  'function OnMessage(subject, payload)\n'
                  '  local parts, s = {}, "x"\n'
                  '  while true do s = s .. s .. payload; parts[#parts + 1] = s end\n'
                  'end\n',
}
NATS_CODE = {"error": "500", "timeout": "504", "memory": "500"}
HTTP_STATUS = {"error": 500, "timeout": 504, "memory": 500}
ERROR_TEXT = {"error": "deliberate error", "timeout": "time", "memory": "memory"}  # in the error message
SLOW = ["timeout", "memory", "memory", "memory"]


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.sent, self.replies, self.lost, self.wrong = Counter(), Counter(), Counter(), Counter()
        self.examples: list[str] = []

    def add(self, key, ok: bool | None, what: str = "") -> None:
        with self.lock:
            self.sent[key] += 1
            if ok is None:
                self.lost[key] += 1
            else:
                self.replies[key] += 1
                if not ok:
                    self.wrong[key] += 1
            if not ok and len(self.examples) < 10:
                self.examples.append(f"{key[0]} {key[1]}: {what}")


def http_lane(port: int, kinds, pause: float, stop: threading.Event, tally: Tally, lane: int) -> None:
    conn, i = None, 0
    while not stop.is_set():
        kind = kinds[i % len(kinds)]
        i += 1
        body = f"h{lane}-{i}"
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("POST", "/soak.web" if kind == "hello" else f"/soak.{kind}", body=body)
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            tally.add(("HTTP", kind), None, f"{type(e).__name__}: {e}")
            conn = None
            continue
        if kind == "hello":
            ok = resp.status == 200 and data == f"Hello, {body}".encode()
        else:
            ok = resp.status == HTTP_STATUS[kind] and ERROR_TEXT[kind] in data.decode(errors="replace")
        tally.add(("HTTP", kind), ok, f"status {resp.status}, body {data[:80]!r}")
        if pause:
            stop.wait(pause)


async def nats_lane(nc, kinds, pause: float, stop: threading.Event, tally: Tally, lane: int) -> None:
    i = 0
    while not stop.is_set():
        kind = kinds[i % len(kinds)]
        i += 1
        payload = f"n{lane}-{i}"
        try:
            msg = await nc.request(f"soak.{kind}", payload.encode(), timeout=10)
        except Exception as e:  # noqa: BLE001 -- timeout, no responders: no answer at all
            tally.add(("NATS", kind), None, f"{type(e).__name__}: {e}")
            continue
        headers = msg.headers or {}
        if kind == "hello":
            ok = msg.data == f"Hello, {payload}".encode() and "Nats-Service-Error" not in headers
        else:
            ok = (headers.get("Nats-Service-Error-Code") == NATS_CODE[kind]
                  and ERROR_TEXT[kind] in headers.get("Nats-Service-Error", ""))
        tally.add(("NATS", kind), ok, f"data {msg.data[:80]!r}, headers {headers}")
        if pause:
            await asyncio.sleep(pause)


async def soak(args, procs, server, url) -> tuple[Tally, list]:
    import nats

    tally, stop, samples = Tally(), threading.Event(), []
    nc = await nats.connect(url)
    threads = [threading.Thread(target=http_lane, args=(server.port, ["hello"] * 9 + ["error"], 0, stop, tally, n))
               for n in range(4)]
    threads.append(threading.Thread(target=http_lane, args=(server.port, SLOW, 0.25, stop, tally, 99)))
    for t in threads:
        t.start()
    lanes = [nats_lane(nc, ["hello"] * 9 + ["error"], 0, stop, tally, n) for n in range(8)]
    lanes.append(nats_lane(nc, SLOW, 0.25, stop, tally, 99))
    tasks = [asyncio.ensure_future(lane) for lane in lanes]
    t0, duration = time.monotonic(), args.minutes * 60
    while (elapsed := time.monotonic() - t0) < duration:
        await asyncio.sleep(min(10, duration - elapsed))
        status = c.proc_status(server.pid)
        samples.append((time.monotonic() - t0, status["rss"], status["threads"]))
        with tally.lock:
            sent, lost, wrong = sum(tally.sent.values()), sum(tally.lost.values()), sum(tally.wrong.values())
        print(f"  {samples[-1][0]:6.0f} s  RSS {status['rss'] / 2**20:6.1f} MiB  {status['threads']:3d} threads  "
              f"{sent:,} requests, {lost} lost, {wrong} wrong", flush=True)
    stop.set()
    await asyncio.gather(*tasks)
    for t in threads:
        await asyncio.get_running_loop().run_in_executor(None, t.join)
    await nc.close()
    return tally, samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10)
    args = ap.parse_args()
    with c.Procs(prefix="msgscript-soak-") as procs:
        url = procs.nats()
        server = procs.msgscript(procs.script_dir("scripts", SCRIPTS), url,
                                 ready=lambda p: c.nats_request_once(url, "soak.hello", b"x") == b"Hello, x")
        print(f"soak: {args.minutes:g} min against one server (pid {server.pid})", flush=True)
        tally, samples = asyncio.run(soak(args, procs, server, url))
        alive = server.poll() is None
    base_t = min(60, args.minutes * 30)  # minute 1, or half of a shorter run
    first = [smp for smp in samples if smp[0] <= base_t + 1] or samples[:1]
    later = [smp for smp in samples if smp[0] > first[-1][0]] or samples[-1:]
    base_rss, base_threads = max(smp[1] for smp in first), max(smp[2] for smp in first)
    end = samples[-1]
    keys = sorted(tally.sent)
    rows = [[" ".join(k), f"{tally.sent[k]:,}", f"{tally.replies[k]:,}", tally.lost[k], tally.wrong[k]] for k in keys]
    rows.append(["all", f"{sum(tally.sent.values()):,}", f"{sum(tally.replies.values()):,}",
                 sum(tally.lost.values()), sum(tally.wrong.values())])
    rss_ok, threads_ok = end[1] <= base_rss * 1.10, end[2] <= base_threads + 4
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    notes = [c.table(["server", f"max up to {first[-1][0]:.0f} s", f"at the end ({end[0]:.0f} s)",
                      f"max after {first[-1][0]:.0f} s", "limit at the end"],
                     [["RSS", mib(base_rss), mib(end[1]), mib(max(smp[1] for smp in later)),
                       f"≤ {mib(base_rss * 1.1)} {'✓' if rss_ok else '✗'}"],
                      ["threads", base_threads, end[2], max(smp[2] for smp in later),
                       f"≤ {base_threads + 4} {'✓' if threads_ok else '✗'}"]])]
    if tally.examples:
        notes.append("first failures:\n" + "\n".join(f"- {e}" for e in tally.examples))
    if not alive:
        notes.append("the server exited during the soak")
    c.report(f"soak, {args.minutes:g} min, one server", ["requests", "sent", "replies", "lost", "wrong"], rows, notes)
    failed = sum(tally.lost.values()) or sum(tally.wrong.values()) or not rss_ok or not threads_ok or not alive
    print("\nFAILED" if failed else "\nOK: nothing lost, nothing wrong, no growth")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
