"""The NATS store (`-backend nats`, `cli -b nats`), its locks and the `kv` module, on one real nats-server with
JetStream; msgscript servers and the CLI run as subprocesses, as a user runs them."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from _nats_cluster import JetStreamServer, Proxy
from _wasm_build import build_wasm, have_zig
from conftest import LOCKED, MSGSCRIPT, MsgscriptProcess, Nats, wait_until, write_script

import msgscript

ROOT = Path(__file__).resolve().parent.parent


# --- fixtures and helpers ------------------------------------------------------------------

@pytest.fixture(scope="module")
def js_server():
    server = JetStreamServer()
    yield server
    server.close()


def jetstream(url: str, work):
    """Run `await work(js)` on a fresh connection (its own event loop)."""
    import nats

    async def go():
        nc = await nats.connect(url)
        try:
            return await work(nc.jetstream(timeout=5))
        finally:
            await nc.close()

    return asyncio.run(go())


@pytest.fixture
def js(js_server):
    """The module's JetStream server, running, without the store's buckets or the tests' kv buckets."""
    if not js_server.running:
        js_server.start()

    async def clean(jsm):
        deadline = time.monotonic() + 10
        while True:  # JetStream answers a moment after the port opens
            try:
                names = await jsm.streams_info()
                break
            except Exception:  # noqa: BLE001
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        for info in names:
            await jsm.delete_stream(info.config.name)

    jetstream(js_server.url, clean)
    return js_server


def cli(url: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*MSGSCRIPT, "cli", "-b", "nats", "-u", url, *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd)


def ok(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 0, out.stderr
    return out.stdout


def kv_value(url: str, bucket: str, key: str) -> bytes | None:
    import nats.js.errors

    async def get(jsm):
        try:
            return (await (await jsm.key_value(bucket)).get(key)).value
        except nats.js.errors.NotFoundError:
            return None

    return jetstream(url, get)


@pytest.fixture
def servers(tmp_path):
    """servers(url, marker="", *flags) -> a `msgscript server -backend nats` process; all stopped after the test."""
    started = []

    def start(url: str, marker: str = "", *flags: str) -> MsgscriptProcess:
        data = tmp_path / f"data-{len(started)}"
        proc = MsgscriptProcess(["-backend", "nats", "-natsurl", url, "-data", str(data), *flags], tmp_path,
                                {"MARKER": marker})
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def answer(client: Nats, subject: str, payload: bytes = b"x", timeout: float = 1.0) -> str:
    try:
        return client.request(subject, payload, timeout).data.decode()
    except Exception as e:  # noqa: BLE001 - no responders, a timeout: what the test looks at
        return f"failed: {type(e).__name__}"


def echo(subject: str, name: str, prefix: str, extra: str = "") -> str:
    return (f"--* subject: {subject}\n--* name: {name}\n{extra}"
            f'function OnMessage(subject, payload) return "{prefix}" .. payload end\n')


# --- the CLI -------------------------------------------------------------------------------

def test_cli_add_list_rm_and_libraries(js, tmp_path):
    write_script(tmp_path, "hello.lua", echo("funcs.hello", "hello", "hi ", "--* timeout: 3s\n--* require: util\n"))
    write_script(tmp_path, "odd.lua", echo("funcs.odd", "odd name/with.slash.", "?"))
    libs = tmp_path / "libs"
    libs.mkdir()
    write_script(libs, "util.lua", "function twice(s) return s .. s end\n")
    write_script(libs, "web.lua", "--* name: web/router\nlocal M = {} return M\n")

    out = cli(js.url, "add", "hello.lua", cwd=tmp_path)  # its library is not there yet
    assert (out.returncode, out.stderr) == (1, "error: hello.lua requires the library util, not in the store: add "
                                               "it first with msgscript cli lib add\n")
    assert ok(cli(js.url, "lib", "add", "-r", "libs", cwd=tmp_path)).count("added library") == 2
    assert ok(cli(js.url, "add", "hello.lua", cwd=tmp_path)) == "added funcs.hello/hello\n"
    ok(cli(js.url, "add", "odd.lua", cwd=tmp_path))
    rows = [line.split(None, 1) for line in ok(cli(js.url, "list")).splitlines()]
    assert rows == [["Subject", "Name"], ["funcs.hello", "hello"], ["funcs.odd", "odd name/with.slash."]]
    assert ok(cli(js.url, "lib", "list")).split() == ["util", "web/router"]

    # The etcd store's values, in KV keys that any subject and name fit in.
    value = json.loads(kv_value(js.url, "msgscript_scripts", "funcs.hello/hello"))
    assert value == {"content": base64.b64encode(b'--* timeout: 3s\nfunction OnMessage(subject, payload) '
                                                 b'return "hi " .. payload end').decode(),
                     "executor": "lua", "is_html": False, "libraries": ["util"], "name": "hello",
                     "subject": "funcs.hello"}
    assert kv_value(js.url, "msgscript_scripts", "funcs.odd/odd=20name=2Fwith.slash=2E") is not None
    assert kv_value(js.url, "msgscript_libs", "util") == b"function twice(s) return s .. s end"
    assert kv_value(js.url, "msgscript_libs", "web=2Frouter") == b"local M = {} return M"

    assert ok(cli(js.url, "rm", "-s", "funcs.odd", "-n", "odd name/with.slash.")) == \
        "removed funcs.odd/odd name/with.slash.\n"
    assert ok(cli(js.url, "lib", "rm", "web/router")) == "removed library web/router\n"
    assert ok(cli(js.url, "ls")).split() == ["Subject", "Name", "funcs.hello", "hello"]
    assert ok(cli(js.url, "lib", "ls")).split() == ["util"]

    out = cli(js.url, "rm", "-s", "funcs.odd", "-n", "nothing")
    assert out.returncode == 2
    assert out.stderr == f"error: no script funcs.odd/nothing in bucket msgscript_scripts at {js.url}\n"
    out = cli(js.url, "lib", "rm", "nothing")
    assert out.returncode == 2 and out.stderr.startswith("error: no library nothing in bucket msgscript_libs")


def test_cli_bucket_flags_and_one_line_errors(js, tmp_path):
    write_script(tmp_path, "a.lua", echo("a.b", "a", ""))
    ok(cli(js.url, "--scripts-bucket", "team_scripts", "--replicas", "1", "add", "a.lua", cwd=tmp_path))
    assert kv_value(js.url, "team_scripts", "a.b/a") is not None
    assert ok(cli(js.url, "list")).split() == ["Subject", "Name"]  # the default bucket is another one
    assert ok(cli(js.url, "list", "--scripts-bucket", "team_scripts")).split() == ["Subject", "Name", "a.b", "a"]

    out = cli(js.url, "--scripts-bucket", "bad.name", "list")
    assert (out.returncode, out.stderr) == (2, "error: bucket name 'bad.name' may only have letters, digits, _ and -\n")
    out = cli("nats://127.0.0.1:1", "list")
    assert out.returncode == 2 and out.stderr.startswith("error: cannot connect to NATS at nats://127.0.0.1:1"), \
        out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_cli_export_import_between_file_and_nats(js, tmp_path):
    src = tmp_path / "src"
    (src / "libs").mkdir(parents=True)
    write_script(src, "hello.lua", echo("funcs.hello", "hello", "hi ", "--* require: greet\n--* lock: true\n"
                                                                         "--* retry: 2s, 10s\n"))
    write_script(src, "page.lua", "--* subject: web.page\n--* name: page\n--* http: true\n--* memory: 8MiB\n"
                                  "function OnMessage(subject, payload) return payload end\n")
    write_script(src, "other.lua", echo("funcs.other", "hello", "other "))  # the same name on another subject
    write_script(src / "libs", "greet.lua", "function greet(who) return 'hello ' .. who end\n")

    assert ok(cli(js.url, "import", str(src))) == f"imported 3 scripts and 1 libraries from {src}\n"
    out = tmp_path / "out"
    assert ok(cli(js.url, "export", str(out))) == f"exported 3 scripts and 1 libraries to {out}\n"
    assert sorted(p.name for p in out.iterdir()) == ["funcs.other.hello.lua", "hello.lua", "libs", "page.lua"]

    def scripts_of(directory):
        scripts, libraries = msgscript.read_script_dir(directory)
        return {s.key: dataclasses_fields(s) for s in scripts}, libraries

    assert scripts_of(out) == scripts_of(src)
    # and the exported directory is what the file store serves
    store = msgscript.FileStore(str(out), str(out / "libs"))
    store.scan()
    assert [s.name for s in store.scripts("funcs.hello")] == ["hello"] and store.libraries() == ["greet"]

    # file -> file: import into a script directory writes the same layout
    target = tmp_path / "target"
    target.mkdir()
    res = subprocess.run([*MSGSCRIPT, "cli", "-b", "file", "--script-dir", str(target), "import", str(out)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert scripts_of(target) == scripts_of(src)


def dataclasses_fields(script: msgscript.Script) -> tuple:
    return (script.subject, script.name, script.content, script.executor, script.http, script.libraries,
            script.timeout, script.memory, script.lock, script.retry)


def test_cli_import_refuses_a_broken_directory_before_writing_anything(js, tmp_path):
    write_script(tmp_path, "good.lua", echo("a.good", "good", ""))
    write_script(tmp_path, "bad.lua", "--* subject: a.bad\n--* name: bad\nfunction OnMessage( end\n")
    out = cli(js.url, "import", str(tmp_path))
    assert out.returncode == 2 and out.stderr.startswith(f"error: {tmp_path}/bad.lua:3: Lua syntax error"), out.stderr
    assert ok(cli(js.url, "list")).split() == ["Subject", "Name"]


def test_etcd_to_nats_moves_the_values_unchanged(js, etcd_server, tmp_path, servers):
    etcd_server.etcdctl("del", "--prefix", "msgscript/")
    go_value = json.dumps({"content": base64.b64encode(b'function OnMessage(s, p) return greet(p) end').decode(),
                           "executor": "lua", "is_html": False, "libraries": ["greet"], "name": "hello",
                           "subject": "funcs.hello"})
    etcd_server.put("msgscript/scripts/funcs.hello/hello", go_value)
    etcd_server.put("msgscript/libs/greet", "function greet(who) return 'hello ' .. who end")
    out = subprocess.run([*MSGSCRIPT, "cli", "-b", "etcd", "-e", etcd_server.endpoint, "export", str(tmp_path / "d")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    ok(cli(js.url, "import", str(tmp_path / "d")))
    assert json.loads(kv_value(js.url, "msgscript_scripts", "funcs.hello/hello")) == json.loads(go_value)
    assert kv_value(js.url, "msgscript_libs", "greet") == b"function greet(who) return 'hello ' .. who end"
    servers(js.url)
    client = Nats(js.url)
    try:
        assert answer(client, "funcs.hello", b"etcd") == "hello etcd"
    finally:
        client.close()


# --- serving ---------------------------------------------------------------------------------

def test_server_follows_adds_edits_and_deletes_within_a_second(js, tmp_path, servers):
    server = servers(js.url)
    assert "NATS store at" in server.log and "0 scripts, 0 libraries" in server.log
    client = Nats(js.url)
    try:
        libs = tmp_path / "libs"
        libs.mkdir()
        write_script(libs, "greet.lua", "function greet(who) return 'hello ' .. who end\n")
        ok(cli(js.url, "lib", "add", str(libs / "greet.lua")))
        write_script(tmp_path, "hello.lua", "--* subject: funcs.hello\n--* name: hello\n--* require: greet\n"
                                            "function OnMessage(s, p) return greet(p) end\n")
        ok(cli(js.url, "add", "hello.lua", cwd=tmp_path))
        wait_until(lambda: answer(client, "funcs.hello", b"you") == "hello you", 1.0)

        write_script(libs, "greet.lua", "function greet(who) return 'hi ' .. who end\n")  # a library edit
        ok(cli(js.url, "lib", "add", str(libs / "greet.lua")))
        wait_until(lambda: answer(client, "funcs.hello", b"you") == "hi you", 1.0)

        write_script(tmp_path, "hello.lua", echo("funcs.hello", "hello", "edited "))
        ok(cli(js.url, "add", "hello.lua", cwd=tmp_path))
        wait_until(lambda: answer(client, "funcs.hello", b"you") == "edited you", 1.0)

        ok(cli(js.url, "rm", "-s", "funcs.hello", "-n", "hello"))
        wait_until(lambda: answer(client, "funcs.hello").startswith("failed"), 1.0)
        assert "nats: msgscript_scripts/funcs.hello/hello removed" in server.log
    finally:
        client.close()


def test_a_broken_script_keeps_its_last_good_version(js, tmp_path, servers):
    write_script(tmp_path, "hello.lua", echo("funcs.hello", "hello", "good "))
    ok(cli(js.url, "add", "hello.lua", cwd=tmp_path))
    server = servers(js.url)
    client = Nats(js.url)
    try:
        assert answer(client, "funcs.hello") == "good x"
        # `cli add` refuses it; another tool (or the Go CLI) writes it all the same
        broken = msgscript.Script("funcs.hello", "hello", "function OnMessage( end")
        jetstream(js.url, lambda jsm: _put(jsm, "msgscript_scripts", "funcs.hello/hello",
                                           msgscript.script_to_json(broken).encode()))
        server.wait_log("Lua syntax error", 2)
        assert "skipping msgscript_scripts/funcs.hello/hello:" in server.log
        assert answer(client, "funcs.hello") == "good x"
        # a value that is not a script at all (written by another tool) is skipped the same way
        jetstream(js.url, lambda jsm: _put(jsm, "msgscript_scripts", "funcs.hello/hello", b"{not json"))
        server.wait_log("funcs.hello/hello: not a msgscript script value", 2)
        assert answer(client, "funcs.hello") == "good x"
        write_script(tmp_path, "hello.lua", echo("funcs.hello", "hello", "fixed "))
        ok(cli(js.url, "add", "hello.lua", cwd=tmp_path))
        wait_until(lambda: answer(client, "funcs.hello") == "fixed x", 1.0)
    finally:
        client.close()


async def _put(jsm, bucket: str, key: str, value: bytes) -> None:
    await (await jsm.key_value(bucket)).put(key, value)


def test_watch_catches_up_with_what_changed_during_an_outage(js, tmp_path, servers):
    """The server reaches NATS through a proxy that is cut: NATS keeps taking edits, the server sees none; once the
    proxy is back, the server reads everything again (added, edited and removed scripts)."""
    for name, prefix in (("kept", "old "), ("gone", "gone ")):
        write_script(tmp_path, f"{name}.lua", echo(f"funcs.{name}", name, prefix))
        ok(cli(js.url, "add", f"{name}.lua", cwd=tmp_path))
    proxy = Proxy(js.port)
    client = Nats(js.url)
    try:
        server = servers(proxy.url)
        assert answer(client, "funcs.kept") == "old x"
        proxy.cut()
        wait_until(lambda: answer(client, "funcs.kept").startswith("failed"), 5)  # its subscriptions went with it
        write_script(tmp_path, "kept.lua", echo("funcs.kept", "kept", "new "))
        write_script(tmp_path, "added.lua", echo("funcs.added", "added", "added "))
        for name in ("kept", "added"):
            ok(cli(js.url, "add", f"{name}.lua", cwd=tmp_path))
        ok(cli(js.url, "rm", "-s", "funcs.gone", "-n", "gone"))
        time.sleep(1)
        proxy.restore()
        wait_until(lambda: answer(client, "funcs.kept") == "new x", 10)
        assert answer(client, "funcs.added") == "added x"
        assert answer(client, "funcs.gone").startswith("failed")
        assert "reading everything again" in server.log
    finally:
        client.close()
        proxy.close()


def test_server_survives_a_nats_restart_and_follows_later_edits(js, tmp_path, servers):
    write_script(tmp_path, "hello.lua", echo("funcs.hello", "hello", "before "))
    ok(cli(js.url, "add", "hello.lua", cwd=tmp_path))
    server = servers(js.url)
    js.stop()
    time.sleep(0.5)
    js.start()
    client = Nats(js.url)
    try:
        wait_until(lambda: answer(client, "funcs.hello") == "before x", 15)
        write_script(tmp_path, "hello.lua", echo("funcs.hello", "hello", "after "))
        wait_until(lambda: cli(js.url, "add", "hello.lua", cwd=tmp_path).returncode == 0, 15)
        wait_until(lambda: answer(client, "funcs.hello") == "after x", 5)
        assert "NATS store: reconnected" in server.log
    finally:
        client.close()


def test_server_on_nats_without_jetstream_says_why_and_is_not_ready(tmp_path, nats_server):
    """The conftest's nats-server has no JetStream: the server starts, serves nothing, says why in one line,
    and /readyz tells a load balancer to keep away."""
    import requests

    server = MsgscriptProcess(["-backend", "nats", "-natsurl", nats_server.url, "-data", str(tmp_path / "d")],
                              tmp_path)
    try:
        assert "JetStream is not available on the NATS server (is it started with -js?)" in server.log
        reply = requests.get(f"{server.base}/readyz", timeout=5)
        assert reply.status_code == 503 and "scripts not loaded yet" in reply.text
        assert "Traceback" not in server.log
    finally:
        server.stop()


def test_one_box_with_the_embedded_nats(tmp_path):
    """No -natsurl: the server starts its own NATS with JetStream in -data, and the NATS store works on it."""
    import re

    data = tmp_path / "data"
    server = MsgscriptProcess(["-backend", "nats", "-data", str(data)], tmp_path)
    try:
        url = re.search(r"started embedded NATS server at (nats://[\d.:]+)", server.log).group(1)
        write_script(tmp_path, "hello.lua", echo("funcs.hello", "hello", "one box "))
        ok(cli(url, "add", "hello.lua", cwd=tmp_path))
        client = Nats(url)
        try:
            wait_until(lambda: answer(client, "funcs.hello") == "one box x", 2)
        finally:
            client.close()
        assert (data / "jetstream").is_dir()
    finally:
        server.stop()


def test_a_password_in_the_nats_url_stays_out_of_the_log_and_errors(tmp_path):
    import tempfile

    port, store = msgscript.free_port(), tempfile.mkdtemp(prefix="msgscript-js-auth-")
    proc = subprocess.Popen([msgscript.find_nats_server(), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", store,
                             "--user", "app", "--pass", "s3cretpw"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        msgscript.wait_for_port("127.0.0.1", port, 15, proc)
        url = f"nats://app:s3cretpw@127.0.0.1:{port}"
        write_script(tmp_path, "hello.lua", echo("funcs.hello", "hello", "hi "))
        wait_until(lambda: cli(url, "add", "hello.lua", cwd=tmp_path).returncode == 0, 10)
        server = MsgscriptProcess(["-backend", "nats", "-natsurl", url, "-data", str(tmp_path / "d")], tmp_path)
        try:
            assert f"NATS store at nats://127.0.0.1:{port}: 1 scripts" in server.log
        finally:
            server.stop()
        assert "s3cretpw" not in server.log
        out = cli(url, "rm", "-s", "funcs.nothing", "-n", "x")
        assert out.returncode == 2 and "s3cretpw" not in out.stderr and f"127.0.0.1:{port}" in out.stderr
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(store, ignore_errors=True)


# --- locks -------------------------------------------------------------------------------------

def test_nats_locks_wait_until_the_deadline_then_time_out(js):
    a, b = (msgscript.NatsStore(msgscript.NatsOptions(js.url)) for _ in range(2))  # two servers
    script = msgscript.Script("l.s", "locked", "", lock=True)
    try:
        with a.locks().hold(script, msgscript.Call("x", deadline=time.monotonic() + 2)):
            assert kv_value(js.url, "msgscript_locks", "l.s/locked")
            started = time.monotonic()
            with pytest.raises(msgscript.ScriptTimeout, match="timed out waiting for its lock"), \
                    b.locks().hold(script, msgscript.Call("x", deadline=time.monotonic() + 0.3)):
                pass
            assert 0.25 < time.monotonic() - started < 1
        started = time.monotonic()
        with b.locks().hold(script, msgscript.Call("x", deadline=time.monotonic() + 1)):  # released: taken at once
            assert time.monotonic() - started < 0.2
        assert kv_value(js.url, "msgscript_locks", "l.s/locked") is None
    finally:
        a.stop()
        b.stop()


def test_a_lock_held_longer_than_its_ttl_is_refreshed(js):
    a, b = (msgscript.NatsStore(msgscript.NatsOptions(js.url)) for _ in range(2))
    script = msgscript.Script("l.s", "long", "", lock=True)
    try:
        with a.locks().hold(script, msgscript.Call("x", deadline=time.monotonic() + 30)):
            time.sleep(msgscript.LOCK_TTL + 2)
            with pytest.raises(msgscript.ScriptTimeout), \
                    b.locks().hold(script, msgscript.Call("x", deadline=time.monotonic() + 0.5)):
                pass
    finally:
        a.stop()
        b.stop()


def test_locks_without_nats_fail_the_call_instead_of_running_unlocked():
    store = msgscript.NatsStore(msgscript.NatsOptions("nats://127.0.0.1:1"))
    script = msgscript.Script("l.s", "locked", "", lock=True)
    try:
        with pytest.raises(msgscript.MsgscriptError,
                           match="^script locked: cannot take its lock: NATS at nats://127.0.0.1:1: "), \
                store.locks().hold(script, msgscript.Call("x", deadline=time.monotonic() + 1)):
            pytest.fail("ran without its lock")
    finally:
        store.stop()


def test_lock_true_never_overlaps_across_two_servers(js, tmp_path, servers):
    write_script(tmp_path, "locked.lua", LOCKED)
    ok(cli(js.url, "add", "locked.lua", cwd=tmp_path))
    servers(js.url, "A")
    servers(js.url, "B")
    client = Nats(js.url)
    try:
        async def requests():
            return await asyncio.gather(*(client.nc.request("lock.test", b"", timeout=20) for _ in range(40)))

        runs = sorted(tuple(map(int, r.data.decode().split()[1:])) + (r.data.decode()[0],)
                      for r in client.run(requests()))
    finally:
        client.close()
    for (_, end, _m1), (start, _, _m2) in zip(runs, runs[1:], strict=False):
        assert start >= end, "two runs of a locked script overlapped"
    assert {r[2] for r in runs} == {"A", "B"}
    assert kv_value(js.url, "msgscript_locks", "lock.test/locked") is None  # released


# --- WASM modules in the object store --------------------------------------------------------------

@pytest.fixture(scope="module")
def hello_wasm(tmp_path_factory):
    if not have_zig():
        pytest.skip("the ziglang package is not installed (needed to compile C to wasm32-wasi)")
    out = tmp_path_factory.mktemp("wasm-nats")
    return build_wasm(ROOT / "examples" / "wasm" / "hello.c", out / "hello.wasm")


def test_wasm_module_travels_through_the_object_store(js, tmp_path, servers, hello_wasm):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    shutil.copy(ROOT / "examples" / "wasm" / "hello.lua", scripts)
    shutil.copy(hello_wasm, scripts)
    ok(cli(js.url, "add", "hello.lua", cwd=scripts))
    digest = hashlib.sha256(hello_wasm.read_bytes()).hexdigest()
    value = json.loads(kv_value(js.url, "msgscript_scripts", "funcs.wasmhello/wasmhello"))
    content = base64.b64decode(value["content"])
    assert content == f"nats-object://msgscript_wasm/sha256-{digest}".encode()
    shutil.rmtree(scripts)  # no server needs the file

    server = servers(js.url)
    client = Nats(js.url)
    try:
        assert answer(client, "funcs.wasmhello", b"object store", 5) == "Hello, object store! (subject funcs.wasmhello)"
    finally:
        client.close()
    assert (tmp_path / "data-0" / "wasm" / f"{digest}.wasm").read_bytes() == hello_wasm.read_bytes()
    assert "fetched wasm module" in server.log

    out = tmp_path / "exported"
    ok(cli(js.url, "export", str(out)))
    assert (out / "wasmhello.wasm").read_bytes() == hello_wasm.read_bytes()
    assert (out / "wasmhello.lua").read_text().endswith("--* executor: wasm\nwasmhello.wasm\n")

    # a script that refers to a module the bucket does not have keeps its last good version
    value["content"] = base64.b64encode(b"nats-object://msgscript_wasm/sha256-missing").decode()
    key = "funcs.wasmhello/wasmhello"
    jetstream(js.url, lambda jsm: _put(jsm, "msgscript_scripts", key, json.dumps(value).encode()))
    server.wait_log("module nats-object://msgscript_wasm/sha256-missing not found", 3)
    client = Nats(js.url)
    try:
        assert answer(client, "funcs.wasmhello", b"still", 5) == "Hello, still! (subject funcs.wasmhello)"
    finally:
        client.close()


def test_adding_a_wasm_script_without_its_module_is_a_one_line_error(js, tmp_path):
    write_script(tmp_path, "w.lua", "--* subject: w.x\n--* name: w\n--* executor: wasm\nmissing.wasm\n")
    out = cli(js.url, "add", "w.lua", cwd=tmp_path)
    assert out.returncode == 2 and out.stderr == f"error: w.lua: wasm module {tmp_path}/missing.wasm not found\n"


# --- the kv module ---------------------------------------------------------------------------------

class Bridge:
    """The server's NATS connection as the kv module reaches it: a NatsBridge on a loop of its own thread."""

    def __init__(self, url: str):
        import nats

        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        nc = asyncio.run_coroutine_threadsafe(nats.connect(url), self.loop).result(5)
        self.bridge = msgscript.NatsBridge(nc, self.loop)

    def close(self):
        asyncio.run_coroutine_threadsafe(self.bridge.nc.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)


def run_kv(bridge: Bridge | None, src: str, timeout: float = 5, memory: int = 64 * 2**20):
    services = msgscript.Services()
    services.nats = bridge.bridge if bridge else None
    msgscript.load_plugins([], services.modules)
    script = msgscript.Script("t.sub", "t", src)
    runner = msgscript.LuaRunner(script, src, services, memory)
    _found, *values = runner.call("OnMessage", time.monotonic() + timeout)
    return [runner.ctx.to_python(v) for v in values]


@pytest.fixture
def bridge(js):
    b = Bridge(js.url)
    yield b
    b.close()


def test_kv_get_put_create_update_delete_keys(bridge):
    out = run_kv(bridge, """local kv = require("kv")
function OnMessage()
  local b = assert(kv.bucket("t_state"))
  local missing, missing_err = b:get("k")
  local r1 = b:put("k", "one")
  local v1, rev1 = b:get("k")
  local c, c_err = b:create("k", "again")
  local r2 = b:update("k", "two", r1)
  local u, u_err = b:update("k", "three", r1)
  local created = b:create("fresh", 42)
  local del_err = b:delete("fresh")
  local gone = b:get("fresh")
  local recreated = b:create("fresh", "back")
  b:put("a.b", "x")
  return tostring(missing) .. tostring(missing_err), v1, rev1 == r1, tostring(c), c_err, r2 > r1, tostring(u), u_err,
         type(created), tostring(del_err), tostring(gone), type(recreated), b:keys()
end""")
    assert out == ["nilnil", "one", True, "nil", "create k: key exists", True, "nil",
                   "update k: revision 1 is not the latest", "number", "nil", "nil", "number", ["a.b", "fresh", "k"]]


def test_kv_bucket_options_and_bad_arguments(bridge, js):
    out = run_kv(bridge, """local kv = require("kv")
function OnMessage()
  local b, err = kv.bucket("t_opts", {history = 5, ttl = "90s", replicas = 1})
  local r = {tostring(err)}
  for _, args in ipairs({{"t_x", {history = 65}}, {"t_x", {ttl = "soon"}}, {"t_x", {colour = 1}}, {"t_x", 7}, {nil}}) do
    local ok, e = pcall(kv.bucket, args[1], args[2])
    r[#r + 1] = e
  end
  local none, bad_name = kv.bucket("no.dots")
  local theirs, reserved = kv.bucket("msgscript_scripts")
  local _, bad_key = b:get("a key")
  local ok, bad_self = pcall(b.get, "not a bucket", "k")
  local ok2, bad_rev = pcall(b.update, b, "k", "v", "latest")
  return r, tostring(none), bad_name, bad_key, bad_self, bad_rev, tostring(theirs), reserved
end""")
    assert out[6:] == ["nil", "kv.bucket msgscript_scripts: bucket names starting with msgscript_ are the server's "
                              "(scripts, locks)"]
    assert out[0] == ["nil", "bad argument #2 to 'bucket' (history must be a whole number from 1 to 64)",
                      "bad argument #2 to 'bucket' (ttl must be a duration such as 30s or 1h, got 'soon')",
                      "bad argument #2 to 'bucket' (unknown option 'colour' (use history, ttl or replicas))",
                      "bad argument #2 to 'bucket' (table expected, got number)",
                      "bad argument #1 to 'bucket' (string expected, got nil)"]
    assert out[1:4] == ["nil", "kv.bucket no.dots: invalid bucket name 'no.dots' (letters, digits, _ and - only)",
                        "get a key: invalid key 'a key' (letters, digits and - / _ = . only; no dot at either end)"]
    assert "bad argument #1 to 'get' (kv bucket expected, got string)" in out[4]
    assert "bad argument #3 to 'update' (number expected, got string)" in out[5]

    async def config(jsm):
        return (await jsm.stream_info("KV_t_opts")).config

    cfg = jetstream(js.url, config)
    assert (cfg.max_msgs_per_subject, cfg.max_age, cfg.num_replicas) == (5, 90.0, 1)


def test_kv_keys_and_bucket_names_too_long_for_a_subject_are_refused(bridge):
    """A key or a bucket name is part of a NATS subject: nats-server drops a connection (the server's own, shared
    by every script) whose command line passes 4 KiB. Refused first, the connection keeps serving."""
    out = run_kv(bridge, """local kv = require("kv")
function OnMessage()
  local b = assert(kv.bucket("t_long"))
  local _, long_key = b:get(string.rep("k", 2^17))
  local _, long_put = b:put(string.rep("k", 513), "v")
  local none, long_name = kv.bucket(string.rep("b", 2^17))
  local fits = string.rep("k", 512)
  b:put(fits, "kept")
  return long_key, long_put, tostring(none), long_name, (b:get(fits))
end""")
    assert out[0].endswith("invalid key 'kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk'... (longer than 512 bytes)"), out[0][:200]
    assert "(longer than 512 bytes)" in out[1] and len(out[1]) < 200, out[1][:200]
    assert out[2:] == ["nil", f"kv.bucket {'b' * 32}...: invalid bucket name (longer than 256 bytes)", "kept"]


def test_kv_values_must_fit_in_the_scripts_memory(bridge, js):
    async def fill(jsm):
        kv = await jsm.create_key_value(bucket="t_big")
        await kv.put("big", b"x" * 900_000)
        await asyncio.gather(*(kv.put(f"key-{i:05d}-" + "k" * 200, b"") for i in range(3000)))

    jetstream(js.url, fill)
    out = run_kv(bridge, """local kv = require("kv")
function OnMessage()
  local b = assert(kv.bucket("t_big"))
  local v, err = b:get("big")
  local keys, keys_err = b:keys()
  return tostring(v), err, tostring(keys), keys_err
end""", memory=msgscript.MIN_MEMORY)
    assert out[0] == "nil" and out[1].startswith("get big: value of about 900064 bytes does not fit in the "
                                                 "script's memory limit (1 MiB)")
    assert out[2] == "nil" and out[3].startswith("keys: the keys do not fit in the script's memory limit")
    # with room, the same calls work
    out = run_kv(bridge, """local kv = require("kv")
function OnMessage()
  local b = assert(kv.bucket("t_big"))
  return #b:get("big"), #b:keys()
end""")
    assert out == [900_000, 3001]


def test_kv_value_larger_than_the_nats_max_payload_is_an_error(bridge):
    out = run_kv(bridge, """local kv = require("kv")
function OnMessage()
  local b = assert(kv.bucket("t_payload"))
  return b:put("k", string.rep("x", 2 * 1024 * 1024))
end""")
    assert out == [None, "put k: value of 2097152 bytes is larger than the NATS server allows "
                         "(1048576 bytes a message)"]


def test_kv_calls_end_at_the_scripts_deadline():
    """A NATS server that stops answering (SIGSTOP) holds no call past its script's deadline."""
    server = JetStreamServer()
    b = Bridge(server.url)
    try:
        made = 'function OnMessage() return (require("kv").bucket("t_slow")) ~= nil end'
        wait_until(lambda: run_kv(b, made) == [True], 10)
        server.proc.send_signal(19)  # SIGSTOP
        started = time.monotonic()
        out = run_kv(b, """local kv = require("kv")
function OnMessage()
  local bucket = assert(kv.bucket("t_slow"))
  return bucket:get("k")
end""", timeout=0.5)
        took = time.monotonic() - started
        assert out == [None, "get k: timeout"] and took < 1.0, (out, took)
    finally:
        server.proc.send_signal(18)  # SIGCONT
        b.close()
        server.close()


def test_kv_without_nats_is_an_error_not_a_crash():
    out = run_kv(None, """local kv = require("kv")
function OnMessage()
  local b, err = kv.bucket("t_none")
  return tostring(b), err
end""")
    assert out == ["nil", "kv.bucket t_none: not connected to NATS"]


def test_the_kv_examples_of_the_module_docs_work(bridge):
    doc = (ROOT / "docs" / "modules.md").read_text()
    section = doc[doc.index("\n## kv\n"):doc.index("\n## strings\n")]
    counter, limiter = [block.split("```")[0] for block in section.split("```lua\n")[1:]]
    assert [run_kv(bridge, counter)[0] for _ in range(3)] == ["call number 1", "call number 2", "call number 3"]
    limiter = limiter.replace("function OnMessage(subject, payload)",
                              "function OnMessage(subject, payload)\n  payload = PAYLOAD")
    for client in ("key one", "key two"):  # the second, should the minute turn during the first
        minute = int(time.time() // 60)
        replies = [run_kv(bridge, limiter.replace("PAYLOAD", repr(client)))[0] for _ in range(12)]
        if int(time.time() // 60) == minute:
            break
    assert replies == ["ok"] * 10 + ["rate limited"] * 2


def test_nats_failures_are_worded_for_people():
    import nats.errors
    import nats.js.errors as errors

    worded = [msgscript.nats_reason(e) for e in (
        errors.KeyNotFoundError(), errors.KeyDeletedError(), errors.KeyWrongLastSequenceError(),
        errors.BucketNotFoundError(), errors.NoKeysError(), errors.ServiceUnavailableError(),
        errors.APIError(code=400, err_code=10058, description="stream name already in use"),
        nats.errors.TimeoutError(), nats.errors.NoServersError())]
    assert worded == ["not found", "not found", "wrong last revision", "not found", "no keys found",
                      "JetStream is not available on the NATS server (is it started with -js?)",
                      "stream name already in use", "timeout", "not connected"]
