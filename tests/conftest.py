"""Shared fixtures: real nats-server (and etcd, podman) started once per session,
and msgscript server processes started the way a user starts them."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import msgscript  # noqa: E402


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With MSGSCRIPT_NO_SKIP=1 (set by test.sh in CI) a skipped test is a failed test."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("MSGSCRIPT_NO_SKIP") == "1" and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where every dependency must be present: {reason}"


# How a user runs it: the msgscript command (here through this interpreter and the checkout).
MSGSCRIPT = [sys.executable, str(ROOT / "msgscript.py")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> int:
    """SIGTERM, then SIGKILL if it has not exited within `timeout`; its exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def wait_port(port: int, timeout: float = 15, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened")


def run_lua(src, *args, plugin_dirs=(), fname="OnMessage", timeout=5, python=False, memory=64 * 2**20):
    """Run a Lua source's `fname(*args)` with the bundled plugins, as the server would.

    Returns the results as a list: Lua values (strings as bytes), or, with `python`,
    converted to Python values (tables to dicts/lists, bytes to str).
    """
    services = msgscript.Services()
    msgscript.load_plugins([str(d) for d in plugin_dirs], services.modules)
    script = msgscript.Script("t.sub", "t", src)
    runner = msgscript.LuaRunner(script, src, services, memory)
    _found, *values = runner.call(fname, time.monotonic() + timeout, *args)
    return [runner.ctx.to_python(v) for v in values] if python else values


def wait_until(check, timeout=5.0, interval=0.05):
    """The first truthy value of check(); exceptions count as "not yet" until the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
            if value:
                return value
        except Exception:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError("condition never became true")
        time.sleep(interval)


class NatsServer:
    """A real nats-server on a free loopback port; restartable on the same port."""

    def __init__(self):
        self.binary = msgscript.find_nats_server()
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen([self.binary, "-a", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, proc=self.proc)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope="session")
def nats_server():
    server = NatsServer()
    yield server
    server.stop()


class MsgscriptProcess:
    """`msgscript server ...` as a subprocess, with its log kept for assertions."""

    def __init__(self, args: list[str], cwd: Path, env: dict | None = None, command: list[str] | None = None):
        self.port = free_port()
        self.log_path = cwd / f"server-{self.port}.log"
        self.logfile = open(self.log_path, "wb")  # noqa: SIM115 - kept open for the process's lifetime
        full_env = dict(os.environ, PYTHONUNBUFFERED="1")
        full_env.pop("NATS_URL", None)
        full_env.update(env or {})
        self.proc = subprocess.Popen([*(command or MSGSCRIPT), "server", "-port", str(self.port), *args], cwd=cwd,
                                     stdout=self.logfile, stderr=subprocess.STDOUT, env=full_env)
        self.base = f"http://127.0.0.1:{self.port}"
        try:
            wait_port(self.port, 20, self.proc)
            self.wait_log("serving", 20)
        except (RuntimeError, AssertionError) as e:
            raise RuntimeError(f"msgscript server did not start ({e}); its log ends:\n{self.log[-2000:]}") from None

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log}")
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in server log:\n{self.log}")

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.logfile.close()
        return self.proc.returncode


@pytest.fixture
def start_server(tmp_path, nats_server):
    """start_server(script_dir, *flags, nats=True) -> MsgscriptProcess; stopped after the test."""
    started = []

    def start(*args, nats=True, env=None, cwd=None):
        flags = list(args)
        if nats:
            flags += ["-natsurl", nats_server.url]
        proc = MsgscriptProcess(flags, Path(cwd or tmp_path), env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture(scope="session")
def etcd_server():
    """One real etcd for the session (tests/_etcd.py), on free loopback ports."""
    from _etcd import EtcdServer

    try:
        server = EtcdServer()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    yield server
    server.close()


@pytest.fixture
def etcd(etcd_server):
    """The session's etcd, running (a test may have stopped it), with nothing under msgscript/ or test/."""
    if etcd_server.proc.poll() is not None:
        etcd_server.start()
    etcd_server.etcdctl("del", "--prefix", "msgscript/")
    etcd_server.etcdctl("del", "--prefix", "test/")
    return etcd_server


# a script with `--* lock: true` whose answer says who ran it and when (the lock tests of every store)
LOCKED = """--* subject: lock.test
--* name: locked
--* lock: true
local time = require("time")
function OnMessage(subject, payload)
  local started = time.unix_nano()
  time.sleep(0.02)
  return (os.getenv("MARKER") or "-") .. " " .. string.format("%.0f %.0f", started, time.unix_nano())
end
"""


def write_script(directory: Path, filename: str, text: str) -> Path:
    path = directory / filename
    path.write_text(text)
    return path


class Nats:
    """A synchronous nats-py client for tests (its own event loop)."""

    def __init__(self, url: str):
        import nats

        self.loop = asyncio.new_event_loop()
        self.nc = self.run(nats.connect(url))

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def request(self, subject: str, data: bytes = b"", timeout: float = 5, headers=None):
        return self.run(self.nc.request(subject, data, timeout=timeout, headers=headers))

    def close(self):
        self.run(self.nc.close())
        self.loop.close()


@pytest.fixture
def nats_client(nats_server):
    client = Nats(nats_server.url)
    yield client
    client.close()
