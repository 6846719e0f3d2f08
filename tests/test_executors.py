"""The WASM and podman executors, called directly with real modules and a real podman service."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import msgscript

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _podman import missing_tools, podman_env, start_podman_service  # noqa: E402
from _wasm_build import build_wasm, have_zig  # noqa: E402

executors = msgscript

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "wasm"

C_PROGRAMS = {
    "env": r"""
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char **argv) {
    char in[256]; size_t n = fread(in, 1, sizeof in - 1, stdin); in[n] = 0;
    printf("subject=%s payload=%s method=%s url=%s argv0=%s stdin=%s",
           getenv("SUBJECT"), getenv("PAYLOAD"), getenv("METHOD"), getenv("URL"), argv[0], in);
    return 0;
}""",
    "stderr": r"""
#include <stdio.h>
int main(void) { printf("partial"); fprintf(stderr, "something went wrong\n"); return 0; }""",
    "exit3": r"""
#include <stdio.h>
int main(void) { printf("bye"); return 3; }""",
    "loop": r"""
int main(void) { volatile unsigned long n = 0; for (;;) n++; }""",
    "bomb": r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
static char *volatile keep;  /* so the optimiser cannot drop the allocations */
int main(void) {
    for (;;) {
        char *p = malloc(1 << 20);
        if (!p) { fputs("out of memory\n", stderr); return 1; }
        memset(p, 1, 1 << 20);
        keep = p;
    }
}""",
    "version1": r"""
#include <stdio.h>
int main(void) { printf("version one"); return 0; }""",
    "version2": r"""
#include <stdio.h>
int main(void) { printf("version two, which is longer"); return 0; }""",
}


# WASM -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wasm_dir(tmp_path_factory):
    """Every test module compiled once: examples/wasm/*.c and the programs above."""
    if not have_zig():
        pytest.skip("the ziglang package is not installed (needed to compile C to wasm32-wasi)")
    out = tmp_path_factory.mktemp("wasm")
    for src in EXAMPLES.glob("*.c"):
        build_wasm(src, out / f"{src.stem}.wasm")
    for name, code in C_PROGRAMS.items():
        (out / f"{name}.c").write_text(code)
        build_wasm(out / f"{name}.c", out / f"{name}.wasm")
    return out


@pytest.fixture
def wasm():
    executor = executors.WasmExecutor(msgscript.Services())
    yield executor
    executor.close()


def wasm_script(directory: Path, module: str, **headers) -> msgscript.Script:
    """A wasm script file in `directory` naming `module` relative to itself."""
    path = directory / f"{Path(module).stem}.lua"
    extra = "".join(f"--* {k}: {v}\n" for k, v in headers.items())
    path.write_text(f"--* subject: wasm.{Path(module).stem}\n--* name: {Path(module).stem}\n"
                    f"--* executor: wasm\n{extra}{module}\n")
    return msgscript.parse_script(path.read_text(), str(path))


def call(payload: bytes = b"", timeout: float = 5, **kw) -> msgscript.Call:
    return msgscript.Call(kw.pop("subject", "wasm.test"), payload, deadline=time.monotonic() + timeout, **kw)


def test_wasm_stdout_is_the_payload(wasm, wasm_dir):
    result = wasm.run(wasm_script(wasm_dir, "hello.wasm"), call(b"Ada", subject="funcs.wasmhello"))
    assert (result.error, result.payload) == ("", b"Hello, Ada! (subject funcs.wasmhello)")
    assert result.http_code == 200


def test_wasm_example_scripts_find_their_module_next_to_them(wasm, wasm_dir):
    for name in ("hello.lua", "http.lua"):
        shutil.copy(EXAMPLES / name, wasm_dir / name)  # beside the built .wasm, as build.sh leaves them
    hello = msgscript.parse_script((wasm_dir / "hello.lua").read_text(), str(wasm_dir / "hello.lua"))
    assert wasm.run(hello, call(b"you")).payload.startswith(b"Hello, you!")
    http = msgscript.parse_script((wasm_dir / "http.lua").read_text(), str(wasm_dir / "http.lua"))
    assert http.http and wasm.run(http, call(method="GET", url="/")).is_html


def test_wasm_call_without_deadline(wasm, wasm_dir):
    result = wasm.run(wasm_script(wasm_dir, "hello.wasm"), msgscript.Call("wasm.hello", b"Bo"))
    assert result.payload.startswith(b"Hello, Bo!")


def test_wasm_environment_argv_and_stdin(wasm, wasm_dir):
    script = wasm_script(wasm_dir, "env.wasm")
    result = wasm.run(script, call(b"p\xc3\xa9", subject="wasm.env", method="POST", url="/a?b=1"))
    assert result.payload.decode() == "subject=wasm.env payload=pé method=POST url=/a?b=1 argv0=env stdin=pé"


def test_wasm_json_result_object_sets_status_headers_and_html(wasm, wasm_dir):
    result = wasm.run(wasm_script(wasm_dir, "http.wasm", http="true"), call(method="PUT", url="/x"))
    assert result.error == ""
    assert result.payload == b"<h1>Hello from WASM</h1><p>PUT /x</p>"
    assert result.headers == {"Content-Type": "text/html", "X-Powered-By": "wasm"}
    assert result.is_html is True and result.http_code == 200


def outcome(executor, script, c):
    """The Result of a call, failures included: executors raise them, the scheduler turns them into results."""
    try:
        return executor.run(script, c)
    except msgscript.MsgscriptError as e:
        return msgscript.Result.failure(e)


def test_json_that_is_not_a_result_object_stays_the_payload():
    out = b'{"name": "ada", "payload": "x"}'
    assert executors.result_from_output(out).payload == out
    with pytest.raises(msgscript.ScriptError) as raised:
        executors.result_from_output(b'{"http_code": 418, "error": "teapot", "payload": ""}')
    err = msgscript.Result.failure(raised.value)
    assert (err.http_code, err.error, err.status) == (418, "teapot", 418)


def test_wasm_stderr_is_an_error(wasm, wasm_dir):
    result = outcome(wasm, wasm_script(wasm_dir, "stderr.wasm"), call())
    assert result.error == "something went wrong" and result.status == 500


def test_wasm_nonzero_exit_is_an_error(wasm, wasm_dir):
    result = outcome(wasm, wasm_script(wasm_dir, "exit3.wasm"), call())
    assert result.error == "exit status 3" and result.status == 500


def test_wasm_infinite_loop_times_out_and_the_next_call_works(wasm, wasm_dir):
    started = time.monotonic()
    with pytest.raises(msgscript.ScriptTimeout, match="timed out"):
        wasm.run(wasm_script(wasm_dir, "loop.wasm"), call(timeout=0.3))
    assert 0.25 < time.monotonic() - started < 1.5
    assert wasm.run(wasm_script(wasm_dir, "hello.wasm"), call(b"again")).payload.startswith(b"Hello, again!")


def test_wasm_memory_bomb_hits_the_limit(wasm, wasm_dir):
    result = outcome(wasm, wasm_script(wasm_dir, "bomb.wasm", memory="24MiB"), call())
    assert result.error.startswith("exceeded memory limit (24 MiB)")
    assert "out of memory" in result.error
    result = outcome(wasm, wasm_script(wasm_dir, "hello.wasm", memory="1MiB"), call())  # needs 16 MiB to start
    assert result.error.startswith("exceeded memory limit (1 MiB)")
    assert wasm.run(wasm_script(wasm_dir, "hello.wasm"), call(b"still")).payload.startswith(b"Hello, still!")


def test_wasm_module_edited_on_disk_is_recompiled(wasm, wasm_dir, tmp_path):
    module = tmp_path / "fn.wasm"
    shutil.copy(wasm_dir / "version1.wasm", module)
    script = wasm_script(tmp_path, "fn.wasm")
    assert wasm.run(script, call()).payload == b"version one"
    assert wasm.run(script, call()).payload == b"version one"
    shutil.copy(wasm_dir / "version2.wasm", module)
    assert wasm.run(script, call()).payload == b"version two, which is longer"


def test_wasm_missing_or_broken_module_is_a_clear_error(wasm, tmp_path):
    with pytest.raises(msgscript.MsgscriptError, match="nothere.wasm: No such file"):
        wasm.run(wasm_script(tmp_path, "nothere.wasm"), call())
    (tmp_path / "junk.wasm").write_bytes(b"\0asm garbage")
    with pytest.raises(msgscript.MsgscriptError, match="does not compile"):
        wasm.run(wasm_script(tmp_path, "junk.wasm"), call())


def test_wasm_calls_from_many_threads(wasm, wasm_dir):
    script = wasm_script(wasm_dir, "env.wasm")
    results, errors = [], []

    def worker(i):
        try:
            for j in range(20):
                results.append(wasm.run(script, call(f"{i}-{j}".encode())).payload.endswith(f"stdin={i}-{j}".encode()))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 160 and all(results)


def test_warm_wasm_calls_repeat_without_growing_state(wasm, wasm_dir):
    """200 warm calls give the same answer (speed is measured by bench/bench_executors.py)."""
    script = wasm_script(wasm_dir, "hello.wasm")
    outputs = {wasm.run(script, call(b"again")).payload for _ in range(200)}
    assert len(outputs) == 1 and b"again" in outputs.pop()


# Podman -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def podman_service(tmp_path_factory):
    """A private podman API service with a local busybox image: (socket_url, image, root)."""
    reason = missing_tools()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("podman")
    url, image, stop = start_podman_service(root)
    yield url, image, root
    stop()


@pytest.fixture
def podman(podman_service):
    executor = executors.PodmanExecutor(msgscript.Services(), url=podman_service[0])
    yield executor
    executor.close()


def podman_script(image: str, command: list[str], **extra) -> msgscript.Script:
    content = json.dumps({"image": image, "command": command, **extra})
    return msgscript.Script("pod.test", "pod", content, executor="podman")


def containers(root: Path) -> str:
    """`podman ps -a` on the test service's storage."""
    out = subprocess.run(["podman", "ps", "-a", "--format", "{{.ID}} {{.Command}}"], env=podman_env(root),
                         capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


def test_podman_stdout_is_the_payload(podman, podman_service):
    _, image, root = podman_service
    result = podman.run(podman_script(image, ["echo", "hello from busybox"]), call())
    assert (result.error, result.payload) == ("", b"hello from busybox\n")
    assert containers(root) == ""  # removed after the call


def test_podman_example_script(podman, podman_service):
    path = ROOT / "examples" / "podman" / "hello.lua"
    script = msgscript.parse_script(path.read_text(), str(path))
    content = json.loads(script.content)
    content["image"] = podman_service[1]  # the example names docker.io's busybox; no registry is reachable here
    script.content = json.dumps(content)
    result = podman.run(script, call(b"Ada", subject=script.subject))
    assert result.payload == b"Hello from a container, Ada! (subject funcs.podmanhello)\n"


def test_podman_payload_on_stdin_and_environment(podman, podman_service):
    image = podman_service[1]
    script = podman_script(image, ["sh", "-c", 'cat; echo " $SUBJECT|$PAYLOAD|$METHOD|$URL"'])
    result = podman.run(script, call(b"in put", subject="pod.env", method="GET", url="/q"))
    assert result.payload == b"in put pod.env|in put|GET|/q\n"


def test_podman_large_payload_streams_through_stdin(podman, podman_service):
    payload = os.urandom(300_000).hex().encode()  # 600 kB: more than a pipe buffer, too big for $PAYLOAD
    result = podman.run(podman_script(podman_service[1], ["sh", "-c", 'wc -c; echo "${#PAYLOAD}"']), call(payload))
    assert result.payload.split() == [b"600000", b"0"]


def test_podman_stderr_is_the_error(podman, podman_service):
    result = outcome(podman, podman_script(podman_service[1], ["sh", "-c", "echo out; echo broken >&2"]), call())
    assert (result.error, result.payload, result.status) == ("broken", b"out\n", 500)


def test_podman_nonzero_exit_is_an_error(podman, podman_service):
    result = outcome(podman, podman_script(podman_service[1], ["sh", "-c", "exit 7"]), call())
    assert result.error == "exit status 7" and result.status == 500


def test_podman_timeout_kills_and_removes_the_container(podman, podman_service):
    _, image, root = podman_service
    started = time.monotonic()
    with pytest.raises(msgscript.ScriptTimeout):
        podman.run(podman_script(image, ["sleep", "30"]), call(timeout=1.5))
    assert time.monotonic() - started < 5
    assert containers(root) == ""


def test_podman_call_without_deadline(podman, podman_service):
    result = podman.run(podman_script(podman_service[1], ["cat"]), msgscript.Call("pod.test", b"no rush"))
    assert result.payload == b"no rush"


def test_podman_close_kills_running_containers(podman_service):
    _, image, root = podman_service
    executor = executors.PodmanExecutor(msgscript.Services(), url=podman_service[0])
    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(_run_catching(executor, image)))
    worker.start()
    deadline = time.monotonic() + 10
    while not containers(root) and time.monotonic() < deadline:
        time.sleep(0.05)
    executor.close()
    worker.join(15)
    assert not worker.is_alive() and "shutting down" in outcome[0]
    assert containers(root) == ""


def _run_catching(executor, image) -> str:
    try:
        return executor.run(podman_script(image, ["sleep", "30"]), call(timeout=20)).error
    except msgscript.MsgscriptError as e:
        return str(e)


def test_podman_missing_image_is_a_clear_error(podman):
    with pytest.raises(msgscript.MsgscriptError, match="podman: cannot pull image localhost/nosuchimage:1: "):
        podman.run(podman_script("localhost/nosuchimage:1", ["true"]), call(timeout=20))
    with pytest.raises(msgscript.ScriptTimeout, match="pulling image"):  # the pull is bounded by the deadline
        podman.run(podman_script("localhost/nosuchimage:1", ["true"]), call(timeout=0.5))


def test_podman_bind_mounts(podman, podman_service, tmp_path):
    (tmp_path / "data.txt").write_text("mounted")
    script = podman_script(podman_service[1], ["cat", "/data/data.txt"], mounts=[f"{tmp_path}:/data:ro"])
    assert podman.run(script, call()).payload == b"mounted"


def test_podman_without_socket_starts_and_fails_clearly(tmp_path, caplog):
    url = f"unix://{tmp_path}/absent.sock"
    executor = executors.PodmanExecutor(msgscript.Services(), url=url)  # must not raise
    assert "podman is unavailable" not in caplog.text  # no warning before a podman script runs
    with pytest.raises(msgscript.MsgscriptError, match=f"podman is unavailable: no API socket at {url}"):
        executor.run(podman_script("busybox", ["true"]), call())
    assert "podman is unavailable" in caplog.text
    executor.close()


def test_podman_socket_location_follows_the_environment():
    find = executors.podman_socket_url
    assert find({"CONTAINER_HOST": "unix:///x.sock"}) == "unix:///x.sock"
    assert find({"XDG_RUNTIME_DIR": "/run/user/7"}, exists=lambda p: True) == "unix:///run/user/7/podman/podman.sock"
    assert find({"XDG_RUNTIME_DIR": "/run/user/7"}, exists=lambda p: False) == "unix:///run/podman/podman.sock"
    assert find({}) == "unix:///run/podman/podman.sock"


def test_podman_content_maps_to_a_container_spec(tmp_path):
    content = {
        "image": "busybox", "command": ["id"], "privileged": True, "user": "1000", "groups": ["wheel", 10],
        "mounts": ["./data:/data:ro,z", "cache:/cache", {"type": "tmpfs", "destination": "/scratch",
                                                          "options": ["size=1m"]}],
    }
    script = msgscript.Script("pod.test", "pod", json.dumps(content), executor="podman",
                              path=str(tmp_path / "pod.lua"))
    spec = executors.container_spec(script, call(b"x" * 70_000, subject="pod.test", method="GET", url="/u"))
    assert spec["env"] == {"SUBJECT": "pod.test", "PAYLOAD": "", "METHOD": "GET", "URL": "/u"}  # too big for env
    assert (spec["image"], spec["command"], spec["privileged"], spec["user"], spec["groups"]) == (
        "busybox", ["id"], True, "1000", ["wheel", "10"])
    assert spec["mounts"] == [
        {"type": "bind", "source": str(tmp_path / "data"), "destination": "/data", "options": ["ro", "z"]},
        {"type": "tmpfs", "source": "", "destination": "/scratch", "options": ["size=1m"]},
    ]
    assert spec["volumes"] == [{"Name": "cache", "Dest": "/cache", "Options": []}]


def test_bad_podman_content_is_a_clear_error(podman):
    bad = msgscript.Script("pod.test", "pod", "{not json", executor="podman")
    with pytest.raises(msgscript.MsgscriptError, match="not valid JSON"):
        podman.run(bad, call())
    with pytest.raises(msgscript.MsgscriptError, match="needs an \"image\""):
        podman.run(msgscript.Script("pod.test", "pod", "{}", executor="podman"), call())


def test_podman_container_that_ignores_its_stdin(podman, podman_service):
    """A payload the container never reads is no error: podman's complaint about it is not the script's stderr."""
    script = podman_script(podman_service[1], ["/bin/echo", "ok"])
    results = [outcome(podman, script, call(b"x")) for _ in range(20)]
    assert [(r.error, r.payload) for r in results] == [("", b"ok\n")] * 20
    big = [outcome(podman, script, call(b"y" * 2**20)) for _ in range(3)]
    assert [(r.error, r.payload) for r in big] == [("", b"ok\n")] * 3
    fails = podman_script(podman_service[1], ["sh", "-c", "echo bad >&2; exit 7"])
    failing = outcome(podman, fails, call(b"z" * 2**20))
    assert failing.error == "exit status 7: bad"
