"""Server time of one warm call per executor: Lua hello versus WASM hello, side by side.

    .venv/bin/python bench/bench_executors.py [--calls 500]

Times `Dispatcher.run_one` (what a NATS or HTTP call costs inside the server, without the
network) for examples/hello.lua and for examples/wasm/hello.c built to WASI with the
`ziglang` package. Reports medians and p99 in microseconds.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import msgscript  # noqa: E402
from _wasm_build import build_wasm  # noqa: E402


def timed(dispatcher: msgscript.Dispatcher, script: msgscript.Script, calls: int) -> list[float]:
    call = msgscript.Call(script.subject, b"John", deadline=time.monotonic() + 3600)
    for _ in range(20):  # warm: compiled code and runtimes cached
        assert not dispatcher.run_one(script, call).error
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        dispatcher.run_one(script, call)
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=500)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="msgscript-bench-"))
    try:
        build_wasm(ROOT / "examples/wasm/hello.c", tmp / "hello.wasm")
        shutil.copy(ROOT / "examples/wasm/hello.lua", tmp / "wasm.lua")
        store = msgscript.FileStore(str(tmp))
        shutil.copy(ROOT / "examples/hello.lua", tmp / "hello.lua")
        store.scan()
        services = msgscript.Services(store=store)
        executors = {n: msgscript.EXECUTORS[n](services) for n in ("lua", "wasm")}
        dispatcher = msgscript.Dispatcher(store, executors, workers=1)
        print(f"{'executor':<10}{'p50 µs':>10}{'p99 µs':>10}")
        for script in store.all_scripts():
            times = sorted(timed(dispatcher, script, args.calls))
            print(f"{script.executor:<10}{statistics.median(times) * 1e6:>10.1f}"
                  f"{times[int(len(times) * 0.99)] * 1e6:>10.1f}")
        dispatcher.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
