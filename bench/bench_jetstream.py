"""JetStream-triggered throughput: 2 msgscript servers against 2 bare nats-py pull consumers.

    .venv/bin/python bench/bench_jetstream.py [--messages 50000] [--rounds 3] [--batch 100] [--bare-only]

Starts `nats-server -js -sd TMPDIR`, creates stream BENCH (subjects bench.js.>) and runs, side by
side on it:

- msgscript: 2 servers (-natsurl) serving a hello script with `--* stream: BENCH` on
  bench.js.hello; they share one durable pull consumer, which they create (its name is found by
  listing the stream's consumers) and which acks each message after success;
- bare: 2 processes pulling from one durable consumer ("bare") with nats-py, fetching --batch
  messages at a time and acking each.

A side's consumer is paused (JetStream consumer pause) except during its own rounds. Each round:
purge the stream, publish --messages to bench.js.hello, wait until the side's two processes are
quiet, resume its consumer and poll the consumer info until num_pending + num_ack_pending == 0
with every message acked, then pause it again. The clock starts at the first delivery after the
resume (pull requests that waited through the pause are not served; the next one is), and
throughput is the messages still unacked then / time until drained; CPU per message is the two
processes' utime + stime (/proc/<pid>/stat) over that same time.
Rounds alternate bare, msgscript, ... Target: throughput ≥ 0.8× bare.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import _common as c

STREAM = "BENCH"
SCRIPT = """--* subject: bench.js.hello
--* name: hello
--* stream: BENCH
function OnMessage(subject, payload) return "Hello, " .. payload end
"""
BARE_WORKER = """
import asyncio, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1])
    sub = await nc.jetstream().pull_subscribe("bench.js.>", durable=sys.argv[2], stream="BENCH")
    print("ready", flush=True)
    while True:
        try:
            msgs = await sub.fetch(int(sys.argv[3]), timeout=1)
        except (nats.errors.TimeoutError, asyncio.TimeoutError):  # nothing to fetch (or paused)
            continue
        for msg in msgs:
            reply = b"Hello, " + msg.data  # the same work as the hello script
            await msg.ack()
asyncio.run(main())
"""
PAUSED = "2099-01-01T00:00:00Z"


async def consumer_state(js, name):
    info = await js.consumer_info(STREAM, name)
    return info.num_pending + info.num_ack_pending, info


def quiet(pids, limit: float = 10) -> float:
    """Wait (up to `limit` s) until `pids` use < 5 % of a core over 100 ms; return the CPU they used meanwhile."""
    start, deadline = c.cpu_total(pids), time.monotonic() + limit
    while time.monotonic() < deadline:
        before = c.cpu_total(pids)
        time.sleep(0.1)
        if c.cpu_total(pids) - before < 0.005:
            break
    return c.cpu_total(pids) - start


async def find_consumer(js, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        names = [ci.name for ci in await js.consumers_info(STREAM) if ci.name != "bare"]
        if len(names) > 1:
            raise SystemExit(f"expected the msgscript servers to share one durable consumer on {STREAM}, "
                             f"found {len(names)}: {', '.join(names)}")
        if names:
            return names[0]
        await asyncio.sleep(0.2)
    raise SystemExit(f"FAILED: the msgscript servers created no consumer on stream {STREAM} within {timeout:g} s "
                     "(does this server support `--* stream:` scripts?)")


async def run(args) -> None:
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig

    with c.Procs() as procs:
        url = procs.nats(jetstream=True)
        nc = await nats.connect(url)
        js = nc.jetstream()
        await js.add_stream(name=STREAM, subjects=["bench.js.>"])
        await js.add_consumer(STREAM, ConsumerConfig(durable_name="bare", ack_policy=AckPolicy.EXPLICIT))
        await js.pause_consumer(STREAM, "bare", PAUSED)
        bare = [procs.python(BARE_WORKER, url, "bare", str(args.batch)) for _ in range(2)]
        sides = {"bare": {"pids": [p.pid for p in bare], "consumer": "bare"}}
        if not args.bare_only:
            scripts = procs.script_dir("scripts", {"hello.lua": SCRIPT})
            servers = [procs.msgscript(scripts, url) for _ in range(2)]
            sides["msgscript"] = {"pids": [p.pid for p in servers], "consumer": None, "procs": servers}

        async def measure(name):
            side = sides[name]
            if side["consumer"] is None:  # created by the servers at start-up
                side["consumer"] = await find_consumer(js, args.timeout)
                await js.pause_consumer(STREAM, side["consumer"], PAUSED)
            consumer, pids = side["consumer"], side["pids"]
            await js.purge_stream(STREAM)
            for i in range(args.messages):
                await nc.publish("bench.js.hello", b"m%d" % i)
            await nc.flush()
            while (await js.stream_info(STREAM)).state.messages < args.messages:
                await asyncio.sleep(0.05)
            last_seq = (await js.stream_info(STREAM)).state.last_seq
            side["fill_cpu"] = side.get("fill_cpu", 0) + quiet(pids)  # CPU spent while paused: should be ~0
            pending, info = await consumer_state(js, consumer)
            if pending != args.messages:
                raise SystemExit(f"{name}: consumer {consumer} has {pending} messages pending, not {args.messages}")
            delivered, deadline = info.delivered.consumer_seq, time.monotonic() + args.timeout
            await js.resume_consumer(STREAM, consumer)
            # Pull requests that waited while the consumer was paused are not served on resume: delivery
            # starts with the next pull request. So the clock starts at the first delivery seen.
            while info.delivered.consumer_seq == delivered and time.monotonic() < deadline:
                await asyncio.sleep(0.002)
                pending, info = await consumer_state(js, consumer)
            cpu0, t0, counted = c.cpu_total(pids), time.perf_counter(), pending
            while pending or info.ack_floor.stream_seq < last_seq:
                if time.monotonic() > deadline:
                    raise SystemExit(f"FAILED: {name} did not drain stream {STREAM} within {args.timeout:g} s: "
                                     f"consumer {consumer}: {info.num_pending} pending, {info.num_ack_pending} "
                                     f"unacked, ack floor {info.ack_floor.stream_seq} of {last_seq}, "
                                     f"{info.num_redelivered} redelivered")
                await asyncio.sleep(0.02)
                pending, info = await consumer_state(js, consumer)
            wall, cpu = time.perf_counter() - t0, c.cpu_total(pids) - cpu0
            await js.pause_consumer(STREAM, consumer, PAUSED)
            return {"rate": counted / wall, "cpu_us": cpu / counted * 1e6, "wall": wall,
                    "redelivered": info.num_redelivered}

        print(f"{args.rounds} rounds of {args.messages:,} messages per side, 2 processes per side", flush=True)
        res = {name: [] for name in sides}
        for r in range(args.rounds):  # A B A B, as c.alternate, but the measurements are coroutines
            for name in sides:
                res[name].append(out := await measure(name))
                print(f"  round {r + 1}/{args.rounds} {name:<10} {out['rate']:>8,.0f} msg/s  "
                      f"{out['cpu_us']:6.1f} µs CPU/msg  {out['wall']:.2f} s  {out['redelivered']} redelivered",
                      flush=True)
        await nc.close()
    rows = [[name, c.fmt(c.med(rs, "rate"), "msg/s"), c.fmt(c.med(rs, "cpu_us"), "µs")] for name, rs in res.items()]
    notes = [f"{name}: its 2 processes used {side['fill_cpu'] * 1e3:.0f} ms CPU in all while the stream was filled "
             "with their consumer paused" for name, side in sides.items()]
    if "msgscript" in res:
        ratio = c.med(res["msgscript"], "rate") / c.med(res["bare"], "rate")
        cpu_ratio = c.med(res["msgscript"], "cpu_us") / c.med(res["bare"], "cpu_us")
        rows.append(["ratio msgscript / bare", f"{ratio:.2f} ({c.check(ratio, '>=', 0.8)})", f"{cpu_ratio:.2f}"])
    c.report(f"JetStream pull consumers, 2 processes a side, medians of {args.rounds} rounds of "
             f"{args.messages:,} messages", ["side", "throughput", "CPU per message"], rows, notes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=50000,
                    help="messages published per round (50,000: a few seconds of draining)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=100, help="fetch batch of the bare consumers")
    ap.add_argument("--timeout", type=float, default=60, help="seconds a side may take to drain a round")
    ap.add_argument("--bare-only", action="store_true", help="run the bare side only (no msgscript servers)")
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
