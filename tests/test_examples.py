"""Every file in examples/ runs end to end through a real `msgscript server`, called the way the README and the
examples' own comments say, with the output they promise.

Calls go through `msgscript cli request` / `cli publish` and curl-like HTTP requests, as a user makes them.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from _podman import missing_tools, podman_env, start_podman_service
from _wasm_build import have_zig
from conftest import MSGSCRIPT, ROOT, Nats, free_port, wait_port, wait_until

EXAMPLES = ROOT / "examples"


def cli(*args, env=None, stdin=None, timeout=60) -> subprocess.CompletedProcess:
    """`msgscript cli ARGS...` as a user types it (no NATS_URL unless given)."""
    full = dict(os.environ)
    full.pop("NATS_URL", None)
    full.update(env or {})
    return subprocess.run([*MSGSCRIPT, "cli", *map(str, args)], capture_output=True, text=True, env=full,
                          input=stdin, timeout=timeout)


def every_example() -> set[Path]:
    return {p for p in EXAMPLES.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


# Each example file and the test that runs it; a new example without a test fails the first test.
COVERED = {
    "hello.lua": "test_the_lua_examples_answer_as_the_readme_says",
    "http_hello.lua": "test_the_lua_examples_answer_as_the_readme_says",
    "json.lua": "test_the_lua_examples_answer_as_the_readme_says",
    "failing.lua": "test_the_lua_examples_answer_as_the_readme_says",
    "web.lua": "test_the_lua_examples_answer_as_the_readme_says (every route: test_web_e2e.py)",
    "libs/web.lua": "test_the_lua_examples_answer_as_the_readme_says (every route: test_web_e2e.py)",
    "durable/orders.lua": "test_the_durable_examples_record_orders_once_and_report_them",
    "durable/report.lua": "test_the_durable_examples_record_orders_once_and_report_them",
    "wasm/hello.c": "test_the_wasm_examples_built_with_their_script_answer",
    "wasm/http.c": "test_the_wasm_examples_built_with_their_script_answer",
    "wasm/hello.lua": "test_the_wasm_examples_built_with_their_script_answer",
    "wasm/http.lua": "test_the_wasm_examples_built_with_their_script_answer",
    "wasm/build.sh": "test_the_wasm_examples_built_with_their_script_answer",
    "podman/hello.lua": "test_the_podman_example_greets_from_a_container",
    "prometheus.yml": "test_the_prometheus_example_scrapes_the_metrics_path",
}


def test_every_example_file_has_an_end_to_end_test():
    files = {str(p.relative_to(EXAMPLES)) for p in every_example() if not p.name.endswith(".wasm")}
    assert files == set(COVERED), f"examples without a test: {files - set(COVERED)}; gone: {set(COVERED) - files}"


# examples/*.lua -------------------------------------------------------------------------------------


def test_the_lua_examples_answer_as_the_readme_says(start_server, nats_server):
    srv = start_server("-script", str(EXAMPLES), "-library", str(EXAMPLES / "libs"))
    url = ("-u", nats_server.url)

    hello = cli("request", *url, "funcs.hello", "John")
    assert (hello.returncode, hello.stdout, hello.stderr) == (0, "Processed subject: funcs.hello with payload: John\n",
                                                              "")
    piped = cli("request", *url, "funcs.hello", "-", stdin="from stdin")
    assert piped.stdout == "Processed subject: funcs.hello with payload: from stdin\n"

    # the README's curls
    r = requests.post(f"{srv.base}/funcs.hello", data=b"John", timeout=10)
    assert base64.b64decode(r.json()["hello"]["payload"]) == b"Processed subject: funcs.hello with payload: John"
    r = requests.post(f"{srv.base}/http.hello", data=b"John", timeout=10)
    assert (r.status_code, r.text, r.headers["Content-Type"]) == (200, "Hello, John!", "text/plain")
    assert requests.get(f"{srv.base}/http.hello", data=b"Ann", timeout=10).text == "Hello, Ann!"
    assert requests.get(f"{srv.base}/example.libs.web/json", timeout=10).json() == {"name": "John"}

    assert cli("request", *url, "example.json", '{"name": "John"}').stdout == "Hello, John!\n"
    bad = cli("request", *url, "example.json", "not json")
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr.startswith(f"error: {EXAMPLES / 'json.lua'}:9: payload is not JSON: ")
    assert bad.stderr.endswith(" (code 500)\n") and len(bad.stderr.splitlines()) == 1

    # failing.lua: the error names the file and the line of the call (headers counted)
    failing = cli("request", *url, "example.failing", "x")
    assert failing.returncode == 1 and failing.stdout == ""
    assert failing.stderr == (f"error: {EXAMPLES / 'failing.lua'}:5: attempt to call global 'someUndefinedFunction' "
                              f"(a nil value) (code 500)\n")
    r = requests.get(f"{srv.base}/example.failing", timeout=10)
    assert r.status_code == 500
    assert r.json()["failing"]["error"] == (f"{EXAMPLES / 'failing.lua'}:5: attempt to call global "
                                            f"'someUndefinedFunction' (a nil value)")
    srv.wait_log("script example.failing/failing failed (HTTP, status 500)")
    srv.wait_log("script example.failing/failing failed (NATS, status 500)")


def test_web_example_under_devhttp_as_its_comment_says():
    """examples/web.lua: `msgscript cli devhttp examples/web.lua -l examples/libs`, then curl .../json."""
    port = free_port()
    proc = subprocess.Popen([*MSGSCRIPT, "cli", "devhttp", "examples/web.lua", "-l", "examples/libs", "--port",
                             str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_port(port, 20, proc)
        assert requests.get(f"http://127.0.0.1:{port}/example.libs.web/json", timeout=10).json() == {"name": "John"}
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_prometheus_example_scrapes_the_metrics_path(start_server, tmp_path):
    import yaml

    config = yaml.safe_load((EXAMPLES / "prometheus.yml").read_text())
    job = config["scrape_configs"][0]
    path = job.get("metrics_path", "/metrics")
    (tmp_path / "scripts").mkdir()
    srv = start_server("-script", str(tmp_path / "scripts"))
    r = requests.get(f"http://127.0.0.1:{srv.port}{path}", timeout=10)
    assert r.status_code == 200 and "msgscript_scripts" in r.text
    assert any(t.endswith(":7643") for c in job["static_configs"] for t in c["targets"])


# examples/durable -----------------------------------------------------------------------------------


def test_the_durable_examples_record_orders_once_and_report_them(start_server, tmp_path):
    """orders.lua records each order once per message id; report.lua, every 30 s, publishes how many there are.

    The server runs as the README starts it, on the embedded NATS (here on a port of its own).
    """
    orders = tmp_path / "orders"
    orders.mkdir()
    port = free_port()
    url = ("-u", f"nats://127.0.0.1:{port}")
    srv = start_server("-script", str(EXAMPLES / "durable"), "-create-streams", "-nats-port", str(port),
                       "-data", str(tmp_path / "data"), nats=False, env={"ORDERS_DIR": str(orders)})
    srv.wait_log("script shop.orders/record_order runs from stream SHOP")
    srv.wait_log("created stream MSGSCRIPT_CRON")
    reports = Nats(f"nats://127.0.0.1:{port}")
    try:
        sub = reports.run(reports.nc.subscribe("shop.reports"))
        reports.run(reports.nc.flush())

        sent = cli("publish", *url, "shop.orders", '{"item": "pen", "qty": 2}', "-H", "Nats-Msg-Id: order-1")
        assert (sent.returncode, sent.stdout, sent.stderr) == (0, "stream SHOP sequence 1\n", "")
        recorded = orders / "order-order-1.json"
        wait_until(recorded.exists, timeout=10)
        assert json.loads(recorded.read_text()) == {"attempt": 1, "item": "pen", "qty": 2}

        again = cli("publish", *url, "shop.orders", '{"item": "pen", "qty": 2}', "-H", "Nats-Msg-Id: order-1")
        assert again.returncode == 0 and "duplicate" in again.stdout

        # a redelivery of the same message (as after a server died mid-call) is not recorded again
        redelivered = cli("dev", EXAMPLES / "durable" / "orders.lua", "-i", '{"item": "pen", "qty": 2}',
                          "-H", "Nats-Msg-Id: order-1", "--attempt", "2", env={"ORDERS_DIR": str(orders)})
        assert (redelivered.returncode, redelivered.stdout) == (0, "already recorded\n"), redelivered.stderr
        assert json.loads(recorded.read_text())["attempt"] == 1

        # report.lua runs at the next multiple of 30 s (io.popen lists the orders)
        deadline = time.monotonic() + 70
        while True:
            msg = reports.run(sub.next_msg(timeout=max(0.1, deadline - time.monotonic())))
            text = msg.data.decode()
            assert re.fullmatch(r"orders recorded: \d+ \(tick \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\)", text), text
            if text.startswith("orders recorded: 1 "):
                break
    finally:
        reports.close()
    assert "failed" not in srv.log, srv.log


# examples/wasm --------------------------------------------------------------------------------------


def test_the_wasm_examples_built_with_their_script_answer(start_server, tmp_path, nats_server):
    if not have_zig():
        pytest.skip("the ziglang package is not installed (pip install '.[wasm-build]')")
    wasm = tmp_path / "wasm"
    shutil.copytree(EXAMPLES / "wasm", wasm)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHON": sys.executable,
           "HOME": os.environ.get("HOME", str(tmp_path))}
    built = subprocess.run(["sh", str(wasm / "build.sh")], capture_output=True, text=True, timeout=300, env=env)
    assert built.returncode == 0, built.stderr
    assert built.stdout.split("\n")[:2] == ["built hello.wasm", "built http.wasm"]
    srv = start_server("-script", str(wasm))

    hello = cli("request", "-u", nats_server.url, "funcs.wasmhello", "Ada")
    assert (hello.returncode, hello.stdout) == (0, "Hello, Ada! (subject funcs.wasmhello)\n"), hello.stderr
    r = requests.post(f"{srv.base}/funcs.wasmhello", data=b"Ada", timeout=10)  # the README's curl
    assert base64.b64decode(r.json()["wasmhello"]["payload"]) == b"Hello, Ada! (subject funcs.wasmhello)"
    r = requests.put(f"{srv.base}/funcs.wasmhttp/some/page", timeout=10)
    assert (r.status_code, r.headers["Content-Type"], r.headers["X-Powered-By"]) == (200, "text/html", "wasm")
    assert r.text == "<h1>Hello from WASM</h1><p>PUT /some/page</p>"


# examples/podman ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def busybox_as_docker_hub(tmp_path_factory):
    """A private podman service whose local busybox image also carries the name the example pulls
    (no registry is reachable from the test machines)."""
    reason = missing_tools()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("podman-examples")
    url, image, stop = start_podman_service(root)
    subprocess.run(["podman", "tag", image, "docker.io/library/busybox:latest"], env=podman_env(root), check=True,
                   capture_output=True, timeout=60)
    yield url
    stop()


def test_the_podman_example_greets_from_a_container(start_server, busybox_as_docker_hub, nats_server):
    start_server("-script", str(EXAMPLES / "podman"), env={"CONTAINER_HOST": busybox_as_docker_hub})
    out = cli("request", "-u", nats_server.url, "-t", "30s", "funcs.podmanhello", "Ada")
    assert (out.returncode, out.stdout) == (0, "Hello from a container, Ada! (subject funcs.podmanhello)\n"), \
        out.stderr
