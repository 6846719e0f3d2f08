"""Server time of one warm call per executor: Lua hello versus WASM hello, side by side.

    .venv/bin/python bench/bench_executors.py [--calls 500]
    MSGSCRIPT=/path/to/other/msgscript.py .venv/bin/python bench/bench_executors.py

Times the executor's run (what a NATS or HTTP call costs inside the server, without the
network; `Dispatcher.run_one` before the Scheduler rewrite) for examples/hello.lua and for
examples/wasm/hello.c built to WASI with the `ziglang` package. Reports medians and p99 in
microseconds.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common  # bench/ is on sys.path when this file is run

ROOT = _common.ROOT
sys.path[:0] = [str(_common.server_script().parent), str(ROOT / "tests")]  # $MSGSCRIPT picks another copy
import msgscript  # noqa: E402
from _wasm_build import build_wasm  # noqa: E402


def call_one(store, executors):
    """(run(script, call), close()): the server's own call path, without the network."""
    if hasattr(msgscript, "Dispatcher"):  # msgscript.py before the Scheduler rewrite
        dispatcher = msgscript.Dispatcher(store, executors, workers=1)
        return lambda script, call: dispatcher.run_one(script, call).error, dispatcher.close

    def run(script, call):
        executors[script.executor].run(script, call)  # raises on an error
    return run, lambda: [e.close() for e in executors.values()]


def timed(run, script: msgscript.Script, calls: int) -> list[float]:
    call = msgscript.Call(script.subject, b"John", deadline=time.monotonic() + 3600)
    for _ in range(20):  # warm: compiled code and runtimes cached
        assert not run(script, call)
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        run(script, call)
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
        run, close = call_one(store, executors)
        print(f"{'executor':<10}{'p50 µs':>10}{'p99 µs':>10}")
        for script in store.all_scripts():
            times = sorted(timed(run, script, args.calls))
            print(f"{script.executor:<10}{statistics.median(times) * 1e6:>10.1f}"
                  f"{times[int(len(times) * 0.99)] * 1e6:>10.1f}")
        close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
