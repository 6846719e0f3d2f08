"""The first ten minutes of a new user, following the README: each step does what the user does."""

from __future__ import annotations

import base64
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import requests
from conftest import MSGSCRIPT, ROOT, write_script

EXAMPLES = ROOT / "examples"


def cli(*args, cwd=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([*MSGSCRIPT, "cli", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout)


def test_lib_list_on_the_file_store_lists_the_library_directory():
    out = cli("-b", "file", "--library", str(EXAMPLES / "libs"), "lib", "list")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["web"]
    assert out.stderr == ""


def test_list_on_the_file_store_prints_the_table_and_nothing_else():
    out = cli("list", "-b", "file", "--script-dir", str(EXAMPLES), "--library", str(EXAMPLES / "libs"))
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.strip().splitlines()]
    assert rows[0] == ["Subject", "Name"] and ["funcs.hello", "hello"] in rows
    assert out.stderr == ""  # no INFO line per file


def test_list_without_the_library_directory_says_what_web_lacks():
    out = cli("list", "-b", "file", "--script-dir", str(EXAMPLES))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].split() == ["Subject", "Name", "Problem"]
    web = next(line for line in lines if line.startswith("example.libs.web"))
    assert "library web not found (it runs without it)" in web
    assert out.stderr == ""


def test_cli_dev_on_an_http_script_takes_a_path_prints_the_status_and_fails_on_errors():
    web = str(EXAMPLES / "web.lua")
    ok = cli("dev", web, "-l", str(EXAMPLES / "libs"), "-i", "", "-U", "/json")
    assert ok.returncode == 0, ok.stderr
    assert "200 OK" in ok.stderr and '"name"' in ok.stdout
    missing = cli("dev", web, "-l", str(EXAMPLES / "libs"), "-i", "", "--url", "/no/such/page")
    assert missing.returncode == 1
    assert "404 Not Found" in missing.stderr


def test_cli_dev_options_are_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    for option in ("-m METHOD", "-U PATH", "-t TIMEOUT"):
        assert option in readme, option


def test_a_status_a_script_sets_has_its_own_reason_phrase(start_server, tmp_path):
    write_script(tmp_path, "created.lua", """--* subject: first.created
--* name: created
--* http: true
function POST(url, body) return "made", 201 end
function GET(url) return "gone", 410 end
""")
    srv = start_server("-script", str(tmp_path))
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(b"POST /first.created HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 201 Created\r\n")
        s.sendall(b"GET /first.created HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 410 Gone\r\n")


def test_the_readme_wasm_section_works_as_written(start_server, tmp_path):
    """`pip install '.[wasm-build]'` brings the compiler, the build script builds, the serve command serves."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("ziglang") for dep in extras["wasm-build"])
    readme = (ROOT / "README.md").read_text()
    assert "pip install '.[wasm-build]'" in readme and "examples/wasm/build.sh" in readme
    serve = re.search(r"msgscript server (-script examples/wasm\S*)", readme)
    assert serve, "the README names the command that serves the built WASM examples"
    wasm = tmp_path / "wasm"
    subprocess.run(["cp", "-r", str(EXAMPLES / "wasm"), str(wasm)], check=True)
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "HOME": os.environ.get("HOME", str(tmp_path))}
    built = subprocess.run(["sh", str(wasm / "build.sh")], capture_output=True, text=True, timeout=300, env=env)
    assert built.returncode == 0, built.stderr
    srv = start_server("-script", str(wasm))
    r = requests.post(f"{srv.base}/funcs.wasmhello", data=b"Ada", timeout=10)
    assert r.status_code == 200
    assert base64.b64decode(r.json()["wasmhello"]["payload"]).startswith(b"Hello, Ada!")


def test_the_serving_line_names_the_nats_url(start_server, tmp_path, nats_server):
    write_script(tmp_path, "hello.lua", "--* subject: first.hello\n--* name: hello\n"
                                        "function OnMessage(s, p) return p end\n")
    srv = start_server("-script", str(tmp_path))
    serving = next(line for line in srv.log.splitlines() if " serving " in line and "HTTP on port" in line)
    assert f"NATS {nats_server.url}" in serving


def test_an_idle_server_stops_quickly_and_quietly(start_server, tmp_path):
    write_script(tmp_path, "hello.lua", "--* subject: first.quiet\n--* name: hello\n"
                                        "function OnMessage(s, p) return p end\n")
    srv = start_server("-script", str(tmp_path))
    assert "podman" not in srv.log  # no podman script, no podman warning
    started = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    srv.proc.wait(10)
    assert time.monotonic() - started < 1.0
    assert srv.proc.returncode == 0
    assert "disconnected from NATS" not in srv.log and "reconnecting" not in srv.log


def test_script_flag_naming_a_file_says_so(tmp_path):
    script = write_script(tmp_path, "one.lua", "--* subject: a.b\n--* name: one\n")
    out = subprocess.run([*MSGSCRIPT, "server", "-script", str(script)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: script directory {script} is a file: give the directory that holds " \
                                 "the .lua files"


def test_bash_completion_lists_each_flag_once():
    out = cli("completion", "bash")
    assert out.returncode == 0
    for line in out.stdout.splitlines():
        if "words=" in line:
            words = line.split('words="', 1)[1].rsplit('"', 1)[0].split()
            assert len(words) == len(set(words)), line


def test_readme_first_screen_quick_start_before_tests():
    first_screen = "\n".join((ROOT / "README.md").read_text().splitlines()[:40])
    commands = re.findall(r"```sh\n(.*?)```", first_screen, re.S)
    assert "msgscript server" in commands[0] and "./test.sh" in commands[1]
    assert Path(ROOT / "test.sh").is_file()
