"""The cost of writing numbers as gopher-lua does: msgscript's tostring and string.format against Lua 5.1's C ones.

    .venv/bin/python bench/bench_tostring.py [--rounds 5] [--n 200000] [--core DIR]

Each case is a Lua loop of --n iterations calling one function. The bare side runs it in a plain
lupa.lua51 runtime (C tostring, C string.format: %.14g); the msgscript side in a LuaRunner, the
sandbox every script runs in, whose tostring and string.format write numbers as gopher-lua does
(sandbox: "Values as text"). An empty loop is timed on each side and subtracted, so the figures are
nanoseconds per call of the function itself (process CPU time, rounds alternating bare / msgscript,
medians). Values: small integers, short floats (i + 0.5), floats that need 17 digits (i / 3).
--core DIR runs the msgscript side with the msgscript.py (and plugins/) of another checkout, to
compare with the sandbox before this change (C tostring behind the same wrappers).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

_core = sys.argv[sys.argv.index("--core") + 1] if "--core" in sys.argv else str(Path(__file__).resolve().parent.parent)
sys.path.insert(0, _core)

import lupa.lua51  # noqa: E402

import msgscript  # noqa: E402

CASES = {
    "empty loop": "local x = i",
    "tostring(integer)": "local x = tostring(i)",
    "tostring(i + 0.5)": "local x = tostring(i + 0.5)",
    "tostring(i / 3)": "local x = tostring(i / 3)",
    "tostring(string)": "local x = tostring(s)",
    'format("%d", i)': 'local x = format("%d", i)',
    'format("%s", i)': 'local x = format("%s", i)',
    'format("%.2f", i / 3)': 'local x = format("%.2f", i / 3)',
    'format("%s=%s", s, s)': 'local x = format("%s=%s", s, s)',
    'format("%s", i / 3)': 'local x = format("%s", i / 3)',
}


def source(body: str) -> str:
    return (f"function OnMessage(subject, payload)\n  local n, s, format = tonumber(payload), 'text', string.format\n"
            f"  for i = 1, n do {body} end\n  return 'done'\nend\n")


def bare_runner(body: str):
    lua = lupa.lua51.LuaRuntime(encoding=None)
    lua.execute(source(body))
    on_message = lua.globals().OnMessage
    return lambda n: on_message(b"bench", str(n).encode())


def msgscript_runner(body: str):
    services = msgscript.Services()
    msgscript.load_plugins([], services.modules)
    script = msgscript.Script("bench.tostring", "tostring", source(body))
    runner = msgscript.LuaRunner(script, script.content, services, msgscript.DEFAULT_MEMORY)
    return lambda n: runner.call(b"OnMessage", time.monotonic() + 60, b"bench", str(n).encode())


def timed(run, n: int) -> float:
    start = time.process_time()
    run(n)
    return time.process_time() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--core", help="the checkout whose msgscript.py the msgscript side runs")
    args = ap.parse_args()
    sides = {"bare": bare_runner, "msgscript": msgscript_runner}
    runs = {(side, case): make(body) for side, make in sides.items() for case, body in CASES.items()}
    for run in runs.values():
        run(1000)  # warm up
    seconds: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    for _ in range(args.rounds):
        for case in CASES:
            for side in sides:
                seconds[(side, case)].append(timed(runs[(side, case)], args.n))
    per_call = {key: statistics.median(v) / args.n * 1e9 for key, v in seconds.items()}
    print(f"msgscript from {msgscript.__file__}")
    print(f"{args.n} calls per loop, {args.rounds} rounds, median ns per call (empty loop subtracted)")
    print(f"{'case':<26}{'bare':>10}{'msgscript':>12}{'ratio':>8}")
    for case in CASES:
        bare, ours = per_call[("bare", case)], per_call[("msgscript", case)]
        if case != "empty loop":
            bare -= per_call[("bare", "empty loop")]
            ours -= per_call[("msgscript", "empty loop")]
        print(f"{case:<26}{bare:>10.0f}{ours:>12.0f}{ours / bare if bare > 0 else float('nan'):>8.2f}")


if __name__ == "__main__":
    main()
