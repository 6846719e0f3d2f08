"""The reproducers of issue 18, each its own test, measured as test_bounded_cost.py measures a call
(tests/_bounded.py): the answer within limit + 100 ms, a hello on another subject within 100 ms
meanwhile, RSS growth under cap + 64 MiB, nothing left behind. Every call runs in a script with
`--* timeout: 1s` and `--* memory: 16MiB`, inline (a fresh script) and on a worker (a lock script).

Already covered elsewhere, not repeated here:
- silent sockets do not lock clients or /healthz out: test_hostile.py::test_beyond_max_connections_new_ones_get_503
  (a newcomer takes the place of a connection that has not sent a byte);
- a Lua pattern that backtracks in C: test_hostile.py::test_a_pathological_lua_pattern_is_stopped_at_the_deadline;
- JSON encode of a result over the cap: test_hostile.py::test_json_encode_of_a_result_over_the_memory_cap;
- the YAML alias bomb: test_hostile.py::test_yaml_decode_of_an_alias_bomb.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import time

import pytest
import requests

from _bounded import CAP, LIMIT, RSS_SLACK, Peers, Target, reset_peak, status
from conftest import MSGSCRIPT

MODES = ("inline", "worker")
TIMING = {"event loop held", "late answer"}


@pytest.fixture(scope="module")
def peers():
    p = Peers()
    tree = p.dir / "tree"  # 40 x 500 files, and a file whose name is 80 a's
    for d in range(40):
        (tree / f"d{d}").mkdir(parents=True)
        for f in range(500):
            (tree / f"d{d}" / f"f{f}.txt").touch()
    (p.dir / ("a" * 80)).touch()
    for path in [tree, *tree.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    yield p
    p.close()


DECODE = f"""--* subject: bc.decode
--* name: decode
--* timeout: {LIMIT:g}s
--* memory: {CAP // 2**20}MiB
function OnMessage(_, payload)
  local v, err = require("json").decode(payload)
  return tostring(err or #v)
end
"""

SLOW = """--* subject: bc.slow
--* name: slow
--* timeout: 10s
function OnMessage(_, payload) require("time").sleep(tonumber(payload) or 0.5) return "slow" end
"""


@pytest.fixture(scope="module")
def target(nats_server):
    t = Target(None, nats_server.url, scripts=200, extra={"decode.lua": DECODE, "slow.lua": SLOW})
    yield t
    t.close()


def bounded(target: Target, mode: str, lua: str) -> str:
    """Run `lua` in `mode`: every promise kept (a miss of a time bound alone must repeat twice more, as in
    test_bounded_cost.retry_timing); the answer."""
    m = target.measure(mode, lua)
    problems = m.problems()
    if problems and all(cls in TIMING for cls, _ in problems):
        for _ in range(2):
            again = target.measure(mode, lua)
            if not again.problems():
                return m.reply
            problems += [(cls, f"again: {detail}") for cls, detail in again.problems()]
    assert not problems, "\n".join(f"{cls}: {detail}" for cls, detail in problems) + f"\n{m.summary()}\n{lua}"
    return m.reply


def pcall_text(expr: str) -> str:
    """Lua returning what `expr` gave, or its error (the call must not fail as a whole)."""
    return (f"local r = {{pcall(function() return {expr} end)}}\n"
            "local out = {}\n"
            "for i = 1, math.min(table.maxn(r), 3) do\n"
            "  local v = r[i]\n"
            "  out[i] = type(v) == 'string' and (#v .. ' bytes: ' .. v:sub(1, 100)) or tostring(v)\n"
            "end\n"
            "return table.concat(out, ' | ')")


def answers(target, mode, expr: str, expected: str) -> None:
    """`expr` is bounded (see `bounded`), its pcall_text reply holds `expected`, and the server still answers."""
    reply = bounded(target, mode, pcall_text(expr))
    assert expected in reply, reply
    took, msg = target.client.request("bc.hello", b"later", 3)
    assert msg is not None and msg.data == b"hello later", "the server stopped answering"


# --- the event loop held by long C steps ------------------------------------------------------------

NUMERIC_STRING_COUNTS = {
    "string.rep 1e10": 'string.rep("x", "1e10")',
    "string.rep padded": 'string.rep("abc", "  99999999 ")',
    "method rep hex": '("x"):rep("0x7fffffff")',
    "rep of a rep": 'string.rep("x", "4194304"):rep("3")',
    "table.concat": 'table.concat({}, "", "1", "1e9")',
    "sub": 'string.sub(string.rep("x", 2^20), "1", "1e10")',
    "unpack": 'select("#", unpack({}, "1", "1e8"))',
    "string.char": 'string.char(unpack({}, 1, "1e6"))',
    "format width": 'string.format("%" .. "99" .. "d", 1)',
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("call", sorted(NUMERIC_STRING_COUNTS))
def test_a_string_function_given_a_huge_count_as_a_numeric_string(target, mode, call):
    bounded(target, mode, pcall_text(NUMERIC_STRING_COUNTS[call]))


# C reads these arguments as an int: 2^31 (or NaN, or the same in a string) wrapped to -2^31 there, a loop
# of 2^31 steps inside one C call that neither the hook nor the deadline could stop
INT_WRAPS = {
    "table.insert at 2^31": ('(function() local t = {1} table.insert(t, 2^31, "v") return t[2^31] end)()', "v"),
    "table.insert at a numeric string": ('(function() local t = {} table.insert(t, "2147483648", "v") '
                                         'return t[2^31] end)()', "v"),
    "debug.traceback level 2^31": ('debug.traceback("x", 2^31)', "x\nstack traceback:"),
    "debug.traceback level -2^31": ('#debug.traceback("x", "-2147483648") < 4096', "true"),
    "debug.traceback level NaN": ('#debug.traceback("x", 0/0) < 4096', "true"),
    "table.remove at -2^31": ('select("#", table.remove({1, 2}, -2^31))', "0"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("call", sorted(INT_WRAPS))
def test_a_position_past_the_int_range(target, mode, call):
    expr, expected = INT_WRAPS[call]
    reply = bounded(target, mode, pcall_text(expr))
    assert reply.startswith("true | ") and expected in reply, reply


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("count", ["4 * 2^20", '"4194304"'])
def test_1500_iterations_each_building_a_4_mib_string(target, mode, count):
    bounded(target, mode, f"for i = 1, 1500 do local s = string.rep('x', {count}) end return 'done'")


# --- special files ------------------------------------------------------------------------------------

FILE_CALLS = {
    "io.open():read": 'assert(io.open(PATH)):read("*a")',
    "io.lines": "io.lines(PATH)()",
    "io.input": "io.input(PATH) and io.read()",
    "io.open(w)": 'assert(io.open(PATH, "w")):write("x")',
    "io.output": 'io.output(PATH) and io.write("x")',
    "loadfile": "loadfile(PATH)",
    "dofile": "dofile(PATH)",
    "ioutil.read_file": 'require("ioutil").read_file(PATH)',
    "ioutil.write_file": 'require("ioutil").write_file(PATH, "x")',
    "ioutil.copy": 'require("ioutil").copy(require("strings").new_builder(), assert(io.open(PATH)))',
    "tac.open():line": 'assert(require("tac").open(PATH)):line()',
    "log.new(path):print": 'require("log").new(PATH):print("x")',
    "template render_file": 'require("template").choose("mustache"):render_file(PATH, {})',
    "storage.open():get": 'assert(require("storage").open(PATH)):get("k")',
    "sqlite3 open+query": '(function() local c = require("sqlite3").new() c:open(PATH) '
                          'return c:query("SELECT 1") end)()',
    "yaml decoder on a file": 'require("yaml").new_decoder(assert(io.open(PATH))):decode()',
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("call", sorted(FILE_CALLS))
def test_a_call_that_opens_a_fifo(target, peers, mode, call):
    lua = pcall_text(FILE_CALLS[call].replace("PATH", json.dumps(str(peers.fifo))))
    bounded(target, mode, lua)


@pytest.fixture(scope="module")
def root_target(nats_server):
    """A server running as this user (root here), for the files only root can open: /proc/kmsg blocks a
    reader until the kernel logs something."""
    if os.geteuid() != 0:
        pytest.skip("needs root: /proc/kmsg is readable by root only")
    t = Target(None, nats_server.url, scripts=60, unprivileged=False)
    yield t
    t.close()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("call", ["io.open():read", "io.lines", "ioutil.read_file", "tac.open():line", "loadfile"])
def test_a_call_that_reads_proc_kmsg_as_root(root_target, mode, call):
    drain_kmsg()  # with nothing unread, a read waits for the kernel's next message
    bounded(root_target, mode, pcall_text(FILE_CALLS[call].replace("PATH", '"/proc/kmsg"')))


def drain_kmsg() -> None:
    fd = os.open("/proc/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    try:
        while os.read(fd, 65536):
            pass
    except BlockingIOError:
        pass
    finally:
        os.close(fd)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", ["/dev/tty", "/dev/zero", "/dev/urandom", "/proc/self/mem", "/sys/kernel/notes",
                                  "/proc/self/task"])
@pytest.mark.parametrize("call", ["io.open():read", "ioutil.read_file", "tac.open():line"])
def test_a_call_that_reads_a_device_or_a_kernel_file(target, mode, path, call):
    bounded(target, mode, pcall_text(FILE_CALLS[call].replace("PATH", json.dumps(path))))


def gather(target: Target, requests_: list[tuple[str, bytes]], timeout: float) -> list[tuple[float, object]]:
    """Send NATS requests at once: [(seconds, message or None)]."""
    nc = target.client.nc

    async def one(subject, data):
        started = time.monotonic()
        try:
            msg = await nc.request(subject, data, timeout=timeout)
        except Exception:  # noqa: BLE001 - no answer
            return time.monotonic() - started, None
        return time.monotonic() - started, msg

    async def run():
        return await asyncio.gather(*(one(s, d) for s, d in requests_))

    return target.client.loop.run_until_complete(run())


@pytest.fixture
def wide_target(nats_server):
    """The default pool: 4 workers, up to 64."""
    t = Target(None, nats_server.url, scripts=80, flags=("-workers", "4", "-max-workers", "64"))
    yield t
    t.close()


def hello_within_100_ms(attempt) -> None:
    """attempt() -> the worst hello wait (s) while it ran; a miss of 100 ms must repeat twice more (as
    `bounded` does): the machines this runs on are shared."""
    waits = []
    for _ in range(3):
        waits.append(attempt())
        if waits[-1] <= 0.1:
            return
    pytest.fail(f"a hello waited {', then '.join(f'{w * 1000:.0f} ms' for w in waits)}")


def test_64_calls_opening_fifos_at_once_do_not_pin_the_pool(wide_target, peers):
    t = wide_target
    lua = f'return tostring(require("ioutil").read_file({json.dumps(str(peers.fifo))}))'

    def attempt() -> float:
        reset_peak(t.pid)
        started = time.monotonic()
        with t.probing() as prober:
            answers = gather(t, [(t.subject("worker"), lua.encode()) for _ in range(64)], timeout=5)
            hello, _ = prober.worst(started, time.monotonic())
        late = [(round(took, 2), msg and (msg.data[:60], msg.headers)) for took, msg in answers
                if msg is None or took > LIMIT + 0.1]
        assert not late, f"{len(late)} of 64 calls answered late or not at all: {late[:5]}"
        idle, busy = t.idle(started + LIMIT + 1)
        assert idle, f"not idle {LIMIT + 1:g}s after the calls: {busy}"
        return hello

    hello_within_100_ms(attempt)
    took, msg = t.client.request(t.subject("worker"), b"return 'pool ok'", 3)  # a worker is free
    assert msg is not None and msg.data == b"pool ok" and took < 0.5, (took, msg and msg.headers)
    r = requests.get(f"http://127.0.0.1:{t.port}/readyz", timeout=5)
    assert (r.status_code, r.text.strip()) == (200, "ready"), r.text


def test_readyz_is_503_with_a_reason_while_the_pool_is_saturated(nats_server):
    t = Target(None, nats_server.url, scripts=4, flags=("-workers", "2", "-max-workers", "4"),
               extra={"slow.lua": SLOW.replace("bc.slow", "bc.saturate")})  # not the module target's subject
    try:
        readyz = f"http://127.0.0.1:{t.port}/readyz"
        assert requests.get(readyz, timeout=5).status_code == 200
        nc, loop = t.client.nc, t.client.loop
        futures = [asyncio.ensure_future(nc.request("bc.saturate", b"3", timeout=10), loop=loop) for _ in range(6)]
        loop.run_until_complete(asyncio.sleep(0.1))
        seen = None
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline and seen is None:
            r = requests.get(readyz, timeout=5)
            if r.status_code == 503:
                seen = r.text
            loop.run_until_complete(asyncio.sleep(0.05))
        assert seen is not None, "/readyz never said 503 while 6 calls of 3 s held 4 workers"
        assert "saturated" in seen and "4 of 4" in seen, seen
        loop.run_until_complete(asyncio.gather(*futures, return_exceptions=True))
        r = requests.get(readyz, timeout=5)
        assert (r.status_code, r.text.strip()) == (200, "ready"), r.text
    finally:
        t.close()


# --- work done in Python for a script ------------------------------------------------------------------

TREE_CALLS = {
    "glob tree/*/*": 'require("filepath").glob(TREE .. "/*/*")',
    "glob tree/*/*.txt": 'require("filepath").glob(TREE .. "/*/f1*.txt")',
    "glob /*/*/*/*/*/*": 'require("filepath").glob("/*/*/*/*/*/*")',
    "glob /proc/*/task/*/fd/*": 'require("filepath").glob("/proc/*/task/*/fd/*")',
    "glob /proc/self/root twice": 'require("filepath").glob("/proc/self/root/proc/self/root/*/*/*/*")',
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("call", sorted(TREE_CALLS))
def test_a_path_matching_function_over_a_large_tree(target, peers, mode, call):
    lua = pcall_text("#assert(" + TREE_CALLS[call].replace("TREE", json.dumps(str(peers.dir / "tree"))) + ")")
    bounded(target, mode, lua)


def test_json_decode_of_8_mib_bodies_in_parallel(target):
    body = b"[" + b"1," * ((8 * 2**20 - 1024) // 2) + b"1]"
    url = f"http://127.0.0.1:{target.port}/bc.decode"

    def post(_):
        t0 = time.monotonic()
        r = requests.post(url, data=body, timeout=10)
        return time.monotonic() - t0, r.status_code, r.text[:300]

    import concurrent.futures

    def attempt() -> float:
        before = status(target.pid, "VmRSS")
        reset_peak(target.pid)
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(8) as pool, target.probing() as prober:
            answers = list(pool.map(post, range(8)))
            hello, _ = prober.worst(started, time.monotonic())
        grew = status(target.pid, "VmHWM") - before
        # each call: its body (8 MiB, twice: the request and the payload), its cap, and the slack
        allowed = 8 * (CAP + 16 * 2**20) + RSS_SLACK
        assert grew < allowed, f"RSS grew by {grew / 2**20:.0f} MiB (allowed {allowed / 2**20:.0f} MiB): {answers}"
        slow = [a for a in answers if a[0] > LIMIT + 0.1 + 0.5]  # + the upload of 8 MiB over loopback
        assert not slow, slow
        idle, busy = target.idle(started + LIMIT + 1)
        assert idle, busy
        return hello

    hello_within_100_ms(attempt)


SHARED = {
    "60 levels {t, t}": "local t = {} for i = 1, 60 do t = {t, t} end",
    "60 levels {a = t, b = t}": "local t = {} for i = 1, 60 do t = {a = t, b = t} end",
    "25 levels of 1 KiB strings": 'local t = {string.rep("x", 1024)} for i = 1, 25 do t = {t, t} end',
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("encoder", ["json.encode", "yaml.encode", "inspect.inspect", "storage set"])
@pytest.mark.parametrize("shape", sorted(SHARED))
def test_encoding_a_table_that_shares_subtables(target, peers, mode, encoder, shape):
    call = {"json.encode": 'require("json").encode(t)', "yaml.encode": 'require("yaml").encode(t)',
            "inspect.inspect": 'require("inspect").inspect(t)',
            "storage set": f'assert(require("storage").open({json.dumps(str(peers.work / "s.json"))})):set("k", t)'}
    lua = SHARED[shape] + "\n" + pcall_text(call[encoder])
    bounded(target, mode, lua)


MATCH_CALLS = {
    "match, 14 characters": 'require("filepath").match("*a*a*a*a*a*a*b", string.rep("a", 80))',
    "match, 15 characters": 'require("filepath").match("a*a*a*a*a*a*a*b", string.rep("a", 80))',
    "match, classes": 'require("filepath").match(string.rep("[a-z]*", 8) .. "b", string.rep("a", 80))',
    "glob in a directory": 'require("filepath").glob(DIR .. "/a*a*a*a*a*a*a*a*a*b")',
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("call", sorted(MATCH_CALLS))
def test_a_file_name_pattern_against_80_characters(target, peers, mode, call):
    bounded(target, mode, pcall_text(MATCH_CALLS[call].replace("DIR", json.dumps(str(peers.dir)))))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", ["mappings", "scalars", "nested"])
def test_yaml_decode_of_600_kb(target, mode, shape):
    line = {"mappings": "- {name: item, tags: [a, b, c], size: 12, note: 'some text here'}\\n",
            "scalars": "- a plain scalar that is long enough to count\\n",
            "nested": "- a: {b: {c: {d: [1, 2, {e: f}]}}}\\n"}[shape]
    lua = (f'local line = "{line}" local doc = string.rep(line, math.floor(600 * 1024 / #line))\n'
           + pcall_text('require("yaml").decode(doc)'))
    bounded(target, mode, lua)


# --- HTTP -----------------------------------------------------------------------------------------------

def test_a_connection_that_never_sends_a_byte_is_closed_after_the_header_timeout(target):
    """The header timeout (30 s) counts from the accept, not from the first byte."""
    with socket.create_connection(("127.0.0.1", target.port), 5) as s:
        s.settimeout(40)
        started = time.monotonic()
        try:
            data = s.recv(65536)
        except TimeoutError:
            data = None
        took = time.monotonic() - started
    assert data is not None, "the silent connection was still open after 40 s"
    assert took < 30 + 2, f"closed after {took:.1f}s"
    assert requests.get(f"http://127.0.0.1:{target.port}/healthz", timeout=5).status_code == 200


@pytest.mark.parametrize("path", ["/_/", "/_/list", "/metrics"])
@pytest.mark.parametrize("header", ["Forwarded: for=203.0.113.9", "X-Forwarded-For: 203.0.113.9",
                                    "Forwarded: for=127.0.0.1", "X-Forwarded-For: 127.0.0.1",
                                    "forwarded: for=\"[2001:db8::1]:80\"", "X-Forwarded-For: 127.0.0.1, 203.0.113.9"])
def test_local_pages_refuse_a_request_a_proxy_forwarded(target, path, header):
    """Behind a reverse proxy on the same host every request comes from 127.0.0.1: one that says it was
    forwarded is not local, whatever address it names (without a trusted-proxy setting)."""
    url = f"http://127.0.0.1:{target.port}{path}"
    assert requests.get(url, timeout=5).status_code == 200
    name, _, value = header.partition(": ")
    r = requests.get(url, headers={name: value}, timeout=5)
    assert r.status_code == 403, (r.status_code, r.text[:200])
    assert "\n" not in r.text.strip() and "proxy" in r.text, r.text


def test_a_trusted_proxy_setting_exists():
    """Issue 18: the local-only pages refuse forwarded requests "unless a trusted-proxy setting says
    otherwise"; the refusal's text tells the operator to see -trusted-proxy."""
    out = subprocess.run([*MSGSCRIPT, "server", "--help"], capture_output=True, text=True, timeout=30).stdout
    assert "-trusted-proxy" in out, "msgscript server has no -trusted-proxy flag (the 403 text names it)"


def test_behind_a_trusted_proxy_the_forwarded_client_decides(start_server, tmp_path):
    """With -trusted-proxy naming the proxy (here nginx or Caddy on the same host), a request it forwards
    for a local user reaches /metrics, one it forwards for a remote client gets 403."""
    server = start_server("-script", str(tmp_path), "-trusted-proxy", "127.0.0.1,::1")
    url = f"{server.base}/metrics"
    for header in ({"X-Forwarded-For": "127.0.0.1"}, {"Forwarded": 'for="[::1]:51234"'},
                   {"X-Forwarded-For": "203.0.113.9, 127.0.0.1"}):
        assert requests.get(url, headers=header, timeout=5).status_code == 200, header
    for header in ({"X-Forwarded-For": "203.0.113.9"}, {"Forwarded": "for=203.0.113.9;proto=https"}):
        r = requests.get(url, headers=header, timeout=5)
        assert r.status_code == 403 and "local clients only" in r.text, (header, r.text)
    bad = subprocess.run([*MSGSCRIPT, "server", "-trusted-proxy", "nowhere"], capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "-trusted-proxy" in bad.stderr, bad.stderr


def test_a_100_continue_for_a_pipelined_request_comes_after_the_previous_response(target):
    first = b"POST /bc.slow HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n0.5"
    second = b"POST /bc.hello HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
    with socket.create_connection(("127.0.0.1", target.port), 5) as s:
        s.settimeout(5)
        s.sendall(first + second)
        got = b""
        deadline = time.monotonic() + 5
        while b"100 Continue" not in got and time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            got += chunk
        statuses = re.findall(rb"HTTP/1\.1 (\d{3})", got)
        assert statuses[:2] == [b"200", b"100"], f"expected the first response, then 100 Continue: {got[:400]!r}"
        s.sendall(b"later")
        while got.count(b"HTTP/1.1 ") < 3:
            chunk = s.recv(65536)
            assert chunk, got
            got += chunk
    assert re.findall(rb"HTTP/1\.1 (\d{3})", got) == [b"200", b"100", b"200"], got



# --- found by the generated test (test_bounded_cost.py) -------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("call", ["publish", "request"])
def test_a_huge_nats_subject_does_not_cut_the_servers_connection(target, mode, call):
    """A 128 KiB subject: nats-server drops the connection that sent it ("maximum control line exceeded"),
    which is the server's own, shared by every script."""
    args = '"x"' if call == "publish" else '"x", 0.5'
    bounded(target, mode, pcall_text(f'require("nats").{call}(string.rep("a", 2^17), {args})'))
    time.sleep(1)
    took, msg = target.client.request("bc.hello", b"later", 3)
    assert msg is not None and msg.data == b"hello later", "the server stopped answering"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", ["read", "list", "delete", "write"])
def test_a_vault_server_answering_an_endless_body(target, peers, mode, method):
    args = '"secret/x", {a = 1}, "secret"' if method == "write" else '"secret/x", "secret"'
    lua = pcall_text(f'require("vault").new("http://127.0.0.1:" .. {peers.http_zeros}, "token"):{method}({args})')
    bounded(target, mode, lua)


# Text a script hands a module that becomes a URL, a file name or an error listing: a megabyte of it took
# seconds of URL building (vault) or tens of megabytes of copies (require) before anything refused it
HUGE_NAMES = {
    "vault path": ('require("vault").new("http://127.0.0.1:" .. {silent}, "token"):read(string.rep("a\\n", 2^20), '
                   '"secret")', "path longer than 4096 bytes"),
    "vault mount": ('require("vault").new("http://127.0.0.1:" .. {silent}, "token"):delete(3, string.rep("a\\n", '
                    '2^20))', "mount longer than 4096 bytes"),
    "vault address": ('require("vault").new("http://" .. string.rep("a", 2^20), "token")',
                      "address longer than 4096 bytes"),
    "require": ('require(string.rep("\\192", 2 * 2^20))', "its name is longer than a path"),
    # a bucket name is part of a subject: nats-server would drop the server's own connection (keys: test_nats_store)
    "kv bucket": ('require("kv").bucket(string.rep("a", 2^17))', "longer than 256 bytes"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("call", sorted(HUGE_NAMES))
def test_a_megabyte_name_or_path_given_to_a_module(target, peers, mode, call):
    expr, expected = HUGE_NAMES[call]
    answers(target, mode, expr.format(silent=peers.silent), expected)


# One C or PyYAML step over text that is not ASCII: 50 to 1,500 ns a character, uninterruptible, holding the
# interpreter lock (so the event loop) from a worker, or running on past the deadline (found with BC_SEED=47)
LONG_STEPS = {
    "mysql.escape": ('#require("mysql").escape(string.rep("\\192", 2 * 2^20))', "true | 2097152"),
    "yaml.encode": ('require("yaml").encode(string.rep("\\192", 2 * 2^20))', "takes longer to encode than"),
    "yaml encoder": ('require("yaml").new_encoder(require("strings").new_builder()):encode(string.rep("\\192", '
                     '2 * 2^20))', "takes longer to encode than"),
    "lfs.link with a NUL": ('require("lfs").link("a\\0b", "c", true)', "link: invalid argument"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("call", sorted(LONG_STEPS))
def test_a_long_step_over_text_that_is_not_ascii(target, mode, call):
    answers(target, mode, *LONG_STEPS[call])


# Each of these killed the server (SIGSEGV in Lua 5.1's C code): unpack counts its results in a C int, and
# the C pattern matcher recurses once per quantified item (a hostile review found them)
CRASHES = {
    "unpack 0 .. 2^31-1": ('unpack({}, 0, 2^31 - 1)', "too many results to unpack"),
    "unpack -1 .. 2^31-1": ('unpack({}, -1, 2^31 - 1)', "too many results to unpack"),
    "unpack -2^31 .. -1": ('unpack({}, -2^31, -1)', "too many results to unpack"),
    "unpack -2^31 .. 2^31-1 as strings": ('unpack({}, "-2147483648", "2147483647")', "too many results to unpack"),
    "unpack within the range": ('select("#", unpack({}, 2^31 - 3, 2^31 - 1))', "true | 3"),
    "match with 200k a-": ('string.match("", string.rep("a-", 200000))', "| "),
    "find with 500k a*": ('string.find("", string.rep("a*", 500000))', "| "),
    "gsub with 200k a?": ('string.gsub("b", string.rep("a?", 200000), "")', "| "),
    "gmatch with 200k a-": ('string.gmatch("", string.rep("a-", 200000))()', "| "),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("call", sorted(CRASHES))
def test_what_crashed_lua_51s_c_code(target, mode, call):
    answers(target, mode, *CRASHES[call])


# Found by a hostile review: a decoded key Lua cannot hold (NaN, nil) hung the whole server (lupa's push
# failed outside a protected call); PyYAML's constructors raised what was logged as a traceback; json's
# replacement of a lone surrogate failed in Python; re's groups made RE2's search quadratic (seconds, GiBs)
DECODED = {
    "yaml NaN key": ('tostring(next(require("yaml").decode(".nan: 4")) == nil)', "true | 4 bytes: true"),
    "yaml null key": ('require("yaml").decode("~: 1\\nb: 2").b', "true | 2"),
    "yaml set of NaN": ('type(require("yaml").decode("!!set {.nan}"))', "true | 5 bytes: table"),
    "yaml !!bool maybe": ('select(2, require("yaml").decode("a: !!bool maybe"))', "a value does not match its tag"),
    "yaml !!int": ('select(2, require("yaml").decode("a: !!int"))', "a value does not match its tag"),
    "json lone surrogate": ('#require("json").decode(\'"\\\\ud800"\')', "true | 3"),
    "re 4000 nested groups": ('require("re").find("abc", string.rep("(", 4000) .. string.rep(")", 4000))',
                              "the positions of the regexp's groups of about"),
    "re 1000 groups over 1000 bytes": ('require("re").find(string.rep("a", 1000), string.rep("(a?)", 1000))',
                                       "the positions of the regexp's groups of about"),
    "re 200 groups over 64 KiB": ('require("re").find(string.rep("a", 2^16), string.rep("(a?)", 200))',
                                  "would take longer than the call has left"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("call", sorted(DECODED))
def test_decoded_values_and_patterns_lua_or_re2_cannot_take(target, mode, call):
    answers(target, mode, *DECODED[call])


@pytest.mark.parametrize("mode", MODES)
def test_calling_the_close_hook_of_a_popen_file(target, mode):
    """io.popen(cmd, "w") hands the script a table whose on_close field is the Python function behind
    close(): called with anything but a string it fails inside Python."""
    reply = bounded(target, mode, 'local f = io.popen("cat", "w") return tostring(select(2, pcall(f.on_close, f)))')
    assert "internal error" not in reply, reply


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pattern", ['string.rep("\\192", 2^21)', 'string.rep("*", 2^21)', 'string.rep("[a]", 2^19)'])
def test_a_long_glob_pattern(target, mode, pattern):
    bounded(target, mode, pcall_text(f'require("filepath").glob({pattern})'))


def test_a_postgres_query_of_endless_rows_stops_at_the_deadline(target):
    if not socket_open(5432):
        pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    for mode in MODES:
        bounded(target, mode, pcall_text(
            '(function() local c = require("postgres").new() c:connect("postgres://postgres@127.0.0.1:5432/test") '
            'return c:query("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT n FROM r") end)()'))


def socket_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
        return True
    except OSError:
        return False
