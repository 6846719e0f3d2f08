"""WASM and podman scripts end to end: a real `msgscript server` over NATS and HTTP, and `msgscript cli dev`."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
from _podman import missing_tools, start_podman_service
from _wasm_build import build_wasm, have_zig
from conftest import MSGSCRIPT, ROOT, write_script

WASM_EXAMPLES = ROOT / "examples" / "wasm"

LOOP_C = "int main(void) { volatile unsigned long n = 0; for (;;) n++; }\n"
VERSION_C = '#include <stdio.h>\nint main(void) { printf("%s"); return 0; }\n'


# Fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def wasm_build(tmp_path_factory):
    """The example modules and a looping module, compiled once per session."""
    if not have_zig():
        pytest.skip("the ziglang package is not installed (needed to compile C to wasm32-wasi)")
    out = tmp_path_factory.mktemp("wasm-e2e")
    for name in ("hello", "http"):
        build_wasm(WASM_EXAMPLES / f"{name}.c", out / f"{name}.wasm")
    (out / "loop.c").write_text(LOOP_C)
    build_wasm(out / "loop.c", out / "loop.wasm")
    return out


@pytest.fixture
def wasm_dir(tmp_path, wasm_build):
    """A script directory as a user lays it out: examples/wasm/*.lua next to their built modules."""
    d = tmp_path / "scripts"
    d.mkdir()
    for f in (*WASM_EXAMPLES.glob("*.lua"), *wasm_build.glob("*.wasm")):
        shutil.copy(f, d)
    write_script(d, "loop.lua", "--* subject: funcs.wasmloop\n--* name: wasmloop\n--* executor: wasm\n"
                                "--* timeout: 300ms\nloop.wasm\n")
    return d


@pytest.fixture(scope="session")
def podman_service(tmp_path_factory):
    """A private podman API service with a local busybox image: (socket_url, image)."""
    reason = missing_tools()
    if reason:
        pytest.skip(reason)
    url, image, stop = start_podman_service(tmp_path_factory.mktemp("podman-e2e"))
    yield url, image
    stop()


def podman_script(directory: Path, name: str, image: str, shell: str, timeout: str = "30s") -> Path:
    """A podman script file (subject pod.NAME) running `sh -c shell` in `image`."""
    command = shell.replace("\\", "\\\\").replace('"', '\\"')
    return write_script(directory, f"{name}.lua",
                        f"--* subject: pod.{name}\n--* name: {name}\n--* executor: podman\n"
                        f'--* timeout: {timeout}\n{{"image": "{image}", "command": ["sh", "-c", "{command}"]}}\n')


@pytest.fixture
def pod_dir(tmp_path, podman_service):
    """Podman scripts: an echo of stdin and the environment, and a failing container."""
    _, image = podman_service
    d = tmp_path / "pods"
    d.mkdir()
    podman_script(d, "echo", image, 'echo "stdin=$(cat) subject=$SUBJECT payload=$PAYLOAD"')
    podman_script(d, "fail", image, "echo partial; echo disk on fire >&2; exit 3")
    return d


def error_of(msg) -> tuple[str | None, str | None]:
    headers = msg.headers or {}
    return headers.get("Nats-Service-Error"), headers.get("Nats-Service-Error-Code")


def dev(*args, env=None, cwd=None, timeout=60) -> subprocess.CompletedProcess:
    """`msgscript cli dev ...` as a user types it."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([*MSGSCRIPT, "cli", "dev", *map(str, args)], capture_output=True, env=full_env,
                          cwd=cwd, timeout=timeout)


# WASM -------------------------------------------------------------------------------------------


def test_wasm_hello_over_nats_and_http(start_server, wasm_dir, nats_client):
    server = start_server("-script", str(wasm_dir))
    msg = nats_client.request("funcs.wasmhello", b"Ada")
    assert error_of(msg) == (None, None)
    assert msg.data == b"Hello, Ada! (subject funcs.wasmhello)"

    resp = requests.post(f"{server.base}/funcs.wasmhello", data=b"Grace", timeout=10)
    assert resp.status_code == 200
    doc = resp.json()
    assert list(doc) == ["wasmhello"]
    assert doc["wasmhello"]["error"] == ""
    assert base64.b64decode(doc["wasmhello"]["payload"]) == b"Hello, Grace! (subject funcs.wasmhello)"


def test_wasm_http_mode_result_sets_status_headers_and_html(start_server, wasm_dir):
    server = start_server("-script", str(wasm_dir))
    resp = requests.get(f"{server.base}/funcs.wasmhttp/some/page?x=1", timeout=10)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "text/html"
    assert resp.headers["X-Powered-By"] == "wasm"
    assert resp.text == "<h1>Hello from WASM</h1><p>GET /some/page?x=1</p>"

    resp = requests.post(f"{server.base}/funcs.wasmhttp", data=b"x", timeout=10)
    assert resp.status_code == 200
    assert resp.text == "<h1>Hello from WASM</h1><p>POST /</p>"


def test_wasm_module_rebuilt_on_disk_is_picked_up(start_server, wasm_dir, nats_client, tmp_path):
    write_script(wasm_dir, "version.lua", "--* subject: funcs.version\n--* name: version\n--* executor: wasm\n"
                                          "version.wasm\n")
    src = tmp_path / "version.c"
    src.write_text(VERSION_C % "version one")
    build_wasm(src, wasm_dir / "version.wasm")
    start_server("-script", str(wasm_dir))
    assert nats_client.request("funcs.version").data == b"version one"

    src.write_text(VERSION_C % "version two")  # same length: only the mtime tells the builds apart
    build_wasm(src, wasm_dir / "version.wasm")
    deadline = time.monotonic() + 5
    while (reply := nats_client.request("funcs.version").data) != b"version two" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert reply == b"version two"


def test_wasm_infinite_loop_times_out_and_server_keeps_serving(start_server, wasm_dir, nats_client):
    server = start_server("-script", str(wasm_dir))
    started = time.monotonic()
    msg = nats_client.request("funcs.wasmloop", b"", timeout=10)
    assert time.monotonic() - started < 3
    error, code = error_of(msg)
    assert code == "504"
    assert "timed out" in error

    started = time.monotonic()
    resp = requests.get(f"{server.base}/funcs.wasmloop", timeout=10)
    assert time.monotonic() - started < 3
    assert resp.status_code == 504
    assert "timed out" in resp.json()["wasmloop"]["error"]

    assert nats_client.request("funcs.wasmhello", b"again").data == b"Hello, again! (subject funcs.wasmhello)"
    assert requests.get(f"{server.base}/funcs.wasmhttp", timeout=10).status_code == 200


# Podman -----------------------------------------------------------------------------------------


def test_podman_script_over_nats_and_http(start_server, pod_dir, podman_service, nats_client):
    server = start_server("-script", str(pod_dir), env={"CONTAINER_HOST": podman_service[0]})
    msg = nats_client.request("pod.echo", b"Bob", timeout=30)
    assert error_of(msg) == (None, None)
    assert msg.data == b"stdin=Bob subject=pod.echo payload=Bob\n"

    resp = requests.post(f"{server.base}/pod.echo", data=b"Eve", timeout=30)
    assert resp.status_code == 200
    assert base64.b64decode(resp.json()["echo"]["payload"]) == b"stdin=Eve subject=pod.echo payload=Eve\n"


def test_failing_container_is_a_500_with_its_stderr(start_server, pod_dir, podman_service, nats_client):
    server = start_server("-script", str(pod_dir), env={"CONTAINER_HOST": podman_service[0]})
    msg = nats_client.request("pod.fail", b"", timeout=30)
    error, code = error_of(msg)
    assert code == "500"
    assert "disk on fire" in error
    assert "exit status 3" in error

    resp = requests.get(f"{server.base}/pod.fail", timeout=30)
    assert resp.status_code == 500
    assert "disk on fire" in resp.json()["fail"]["error"]


def test_container_past_its_timeout_is_a_504_and_server_keeps_serving(start_server, pod_dir, podman_service,
                                                                      nats_client):
    podman_script(pod_dir, "slow", podman_service[1], "sleep 30", timeout="1s")
    start_server("-script", str(pod_dir), env={"CONTAINER_HOST": podman_service[0]})
    started = time.monotonic()
    msg = nats_client.request("pod.slow", b"", timeout=20)
    assert time.monotonic() - started < 10
    error, code = error_of(msg)
    assert code == "504"
    assert "timed out" in error
    assert nats_client.request("pod.echo", b"next", timeout=30).data == b"stdin=next subject=pod.echo payload=next\n"


def test_missing_podman_socket_server_starts_and_lua_still_serves(start_server, tmp_path, nats_client):
    d = tmp_path / "scripts"
    d.mkdir()
    podman_script(d, "echo", "localhost/msgscript-busybox:latest", "cat")
    shutil.copy(ROOT / "examples" / "hello.lua", d)
    missing = tmp_path / "nowhere" / "podman.sock"
    server = start_server("-script", str(d), env={"CONTAINER_HOST": f"unix://{missing}"})

    msg = nats_client.request("pod.echo", b"x", timeout=10)
    error, code = error_of(msg)
    assert code == "500"
    assert "podman is unavailable" in error
    assert str(missing) in error

    msg = nats_client.request("funcs.hello", b"still here")
    assert error_of(msg) == (None, None)
    assert b"still here" in msg.data
    assert requests.get(f"{server.base}/pod.echo", timeout=10).status_code == 500
    # the reason once, then one warning per failed call (naming the script and the transport)
    assert server.log.count("podman scripts will fail") == 1, server.log
    assert "script pod.echo/echo failed (NATS, status 500): podman is unavailable" in server.log
    assert "script pod.echo/echo failed (HTTP, status 500): podman is unavailable" in server.log


# cli dev ----------------------------------------------------------------------------------------


def test_cli_dev_runs_a_wasm_script(wasm_dir, tmp_path):
    # run from elsewhere: the module path is relative to the script file, not the working directory
    proc = dev(wasm_dir / "hello.lua", "-i", "Linus", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"Hello, Linus! (subject funcs.wasmhello)\n"

    proc = dev(wasm_dir / "http.lua", "-i", "", "-m", "POST", cwd=tmp_path)  # HTTP mode: the result's body
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"<h1>Hello from WASM</h1><p>POST /</p>\n"

    proc = dev(wasm_dir / "loop.lua", "-i", "", cwd=tmp_path)
    assert proc.returncode != 0
    assert b"timed out" in proc.stderr


def test_cli_dev_runs_a_podman_script(pod_dir, podman_service):
    env = {"CONTAINER_HOST": podman_service[0]}
    proc = dev(pod_dir / "echo.lua", "-i", "Ken", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"stdin=Ken subject=pod.echo payload=Ken\n"

    proc = dev(pod_dir / "fail.lua", "-i", "", env=env)
    assert proc.returncode != 0
    assert b"disk on fire" in proc.stderr
