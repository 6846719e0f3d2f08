"""The built-in Lua modules json, http, re and lfs, used from Lua as scripts use them."""

from __future__ import annotations

import base64
import gzip
import json
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import msgscript

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))



from conftest import run_lua as run  # noqa: E402


def lua(module: str, body: str, *args, timeout=5):
    """Run `body` as the body of OnMessage(...) with `module` required as M."""
    return run(f'local M = require("{module}")\nfunction OnMessage(...)\n{body}\nend', *args, timeout=timeout)


###############################################################################
# json ########################################################################
###############################################################################


@pytest.mark.parametrize(
    "expr, expected",
    [
        ('{b=1, a={1, 2, 3}, c="x"}', '{"a":[1,2,3],"b":1,"c":"x"}'),
        ("{}", "[]"),
        ('{a={}, b=true, c=false}', '{"a":[],"b":true,"c":false}'),
        ("nil", "null"),
        ("1", "1"),
        ("1.0", "1"),
        ("1.5", "1.5"),
        ("-0.25", "-0.25"),
        ("1e20", "100000000000000000000"),
        ("1e21", "1e+21"),
        ("1e-6", "0.000001"),
        ("1e-7", "1e-7"),
        ("123456789012345678", "123456789012345680"),  # a double, printed as Go prints that float64
        ('"<a href=\'x\'>&</a>"', '"\\u003ca href=\'x\'\\u003e\\u0026\\u003c/a\\u003e"'),
        ('"line\\nsep\\226\\128\\168"', '"line\\nsep\\u2028"'),  # U+2028 in Lua 5.1 decimal escapes
        ('"bad \\255 byte"', '"bad \ufffd byte"'),
        ('"tab\\t\\1"', '"tab\\t\\u0001"'),
    ],
)
def test_json_encode_follows_go(expr, expected):
    assert lua("json", f"return M.encode({expr})") == [expected.encode()]


@pytest.mark.parametrize(
    "expr, error",
    [
        ("{[1]=1, [3]=3}", "sparse array"),
        ('{1, 2, x="y"}', "mixed or invalid key types"),
        ("{[true]=1}", "mixed or invalid key types"),
        ("{f=print}", "cannot encode function to JSON"),
        ("0/0", "unsupported value"),
        ("math.huge", "unsupported value"),
        ("(function() local co = coroutine.create(function() coroutine.yield() end) coroutine.resume(co) "
         "return co end)()", "cannot encode thread to JSON"),  # started: lupa hands a fresh one over as a function
    ],
)
def test_json_encode_errors_are_nil_err(expr, error):
    value, err = lua("json", f"return M.encode({expr})")
    assert value is None and error in err.decode()


def test_json_encode_without_argument_raises():
    ok, err = lua("json", "local ok, err = pcall(M.encode) return ok, tostring(err)")
    assert ok is False and b"value expected" in err


def test_json_encode_fails_on_cycles_but_not_on_shared_tables():
    out = lua("json", "local s = {1} local c = {} c.me = c return M.encode({a=s, b={s}}), select(2, M.encode(c))")
    assert out == [b'{"a":[1],"b":[[1]]}', b"cannot encode recursively nested tables to JSON"]


def test_json_encode_accepts_sequences_built_backwards():
    assert lua("json", "local t = {} for i = 5, 1, -1 do t[i] = i end return M.encode(t)") == [b"[1,2,3,4,5]"]


def test_json_decode_objects_arrays_and_scalars():
    src = """
    local t = M.decode('{"a": 1, "b": [true, "x", 2.5], "c": null, "d": {"e": "\\\\u00e9"}}')
    local keys = 0 for _ in pairs(t) do keys = keys + 1 end
    return t.a, tostring(t.a), t.b[1], t.b[2], t.b[3], #t.b, t.c, t.d.e, keys
    """
    assert lua("json", src) == [1, b"1", True, b"x", 2.5, 3, None, "é".encode(), 3]


def test_json_decode_null_is_one_nil():
    assert lua("json", 'return select("#", M.decode("null")), M.decode("null")') == [1, None]


def test_json_decode_accepts_numbers_as_text():
    assert lua("json", "return M.decode(42)") == [42]


@pytest.mark.parametrize("text", ["", "{", "[1,]", "xyz", "NaN", "[1] 2"])
def test_json_decode_errors_are_nil_err(text):
    value, err = lua("json", "return M.decode(...)", text.encode())
    assert value is None and err


def test_json_decode_keeps_null_positions_in_arrays():
    # Lua 5.1's # may stop at any hole; table.maxn finds the last element, and encode writes the
    # holes back (trailing nulls are dropped).
    src = """
    local t = M.decode('[1, null, 3, null]')
    local holes = M.decode('[null, "b", null, null, "e"]')
    return table.maxn(t), t[1], t[2], t[3], t[4], M.encode(t), table.maxn(holes), holes[5], M.encode(holes),
           M.encode(M.decode('[null]')), M.encode(M.decode('{"a": [1, null, 2]}'))
    """
    assert lua("json", src) == [3, 1, None, 3, None, b"[1,null,3]", 5, b"e", b'[null,"b",null,null,"e"]', b"[]",
                                b'{"a":[1,null,2]}']


def test_json_decode_numbers_are_doubles_and_errors_read_like_go():
    src = """
    local big = M.decode("123456789012345678")
    local v1, e1 = M.decode("1e400")
    local v2, e2 = M.decode("[1, x]")
    local v3, e3 = M.decode('{"a": 1')
    return big == 123456789012345680, v1, e1, v2, e2, v3, e3
    """
    assert lua("json", src) == [True, None, b"json: cannot unmarshal number 1e400 into Go value of type float64",
                                None, b"invalid character 'x' looking for beginning of value",
                                None, b"unexpected end of JSON input"]


def _runner(src: str, memory: int = 64 * 2**20) -> msgscript.LuaRunner:
    services = msgscript.Services()
    msgscript.load_plugins([], services.modules)
    return msgscript.LuaRunner(msgscript.Script("t.sub", "t", src), src, services, memory)


def test_json_runs_inline_and_a_big_value_moves_to_a_worker():
    run = _runner('local M = require("json") function OnMessage(n) '
                  'local t = {} for i = 1, n do t[i] = "some text" end return #M.encode(t), M.decode("[1]")[1] end')
    run.call("OnMessage", time.monotonic() + 5, 1)  # the first call loads the module
    assert run.call("OnMessage", time.monotonic() + 5, 10, inline=True)[1:] == (121, 1)
    with pytest.raises(msgscript._MoveToPool):
        run.call("OnMessage", time.monotonic() + 5, 100000, inline=True)
    assert run.call("OnMessage", time.monotonic() + 5, 100000)[1] == 1200001  # on a worker: done


def test_json_encode_of_a_value_larger_than_the_memory_cap_raises_early():
    # one 1 MiB string in 200 places: small in Lua, 200 MiB as JSON
    run = _runner('local M = require("json") function OnMessage() local s = string.rep("x", 2^20) '
                  'local t = {} for i = 1, 200 do t[i] = s end return pcall(M.encode, t) end', memory=16 * 2**20)
    start = time.monotonic()
    ok, err = run.call("OnMessage", time.monotonic() + 10)[1:]
    assert ok is False and b"memory limit" in err and time.monotonic() - start < 2


def test_json_round_trip_of_unicode_and_escapes():
    src = r'return M.encode(M.decode(M.encode({s = "é \"q\" \\ / <\0>"})))'
    assert json.loads(lua("json", src)[0]) == {"s": 'é "q" \\ / <\0>'}


###############################################################################
# http ########################################################################
###############################################################################


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, status=200, body=b"", headers=()):
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _echo(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode()
        info = {"method": self.command, "path": self.path, "body": body, "headers": dict(self.headers.items())}
        self._send(200, json.dumps(info).encode(), [("Content-Type", "application/json"), ("X-Multi", "one"),
                                                      ("X-Multi", "two")])

    def _route(self):
        path = self.path.split("?")[0]
        if path == "/status/418":
            return self._send(418, b"teapot")
        if path == "/redirect":
            return self._send(302, b"", [("Location", "/echo?from=redirect")])
        if path == "/redirect307":
            return self._send(307, b"", [("Location", "/echo")])
        if path == "/loop":
            return self._send(302, b"", [("Location", "/loop")])
        if path == "/cookies":
            return self._send(200, b"ok", [("Set-Cookie", "session=abc; Path=/; HttpOnly"), ("Set-Cookie", "b=2")])
        if path == "/slow":
            time.sleep(1.5)
            return self._send(200, b"late")
        if path == "/gzip":
            return self._send(200, gzip.compress(b"unzipped text"), [("Content-Encoding", "gzip")])
        return self._echo()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _route


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def echo(body: bytes) -> dict:
    return json.loads(body)


def test_http_get_response_fields(server):
    src = """
    local r = M.get(...)
    return r.status_code, r.body, r.body_size, r.headers["Content-Type"], r.headers["X-Multi"], r.url, r.nothing
    """
    status, body, size, ctype, multi, url, nothing = lua("http", src, f"{server}/echo?x=1".encode())
    assert (status, size, ctype, multi, url, nothing) == (200, len(body), b"application/json", b"one",
                                                          f"{server}/echo?x=1".encode(), None)
    assert echo(body)["method"] == "GET" and echo(body)["path"] == "/echo?x=1"


@pytest.mark.parametrize("verb", ["post", "put", "patch", "delete"])
def test_http_verbs_send_their_method_and_body(server, verb):
    body = lua("http", f'return M.{verb}(..., {{body = "payload"}}).body', f"{server}/echo".encode())[0]
    assert echo(body)["method"] == verb.upper() and echo(body)["body"] == "payload"


def test_http_head_and_request_upper_cases_method(server):
    out = lua("http", 'return M.head(...).body, M.request("options", ...).status_code', f"{server}/echo".encode())
    assert out[0] == b""  # HEAD: no body
    assert out[1] == 501  # http.server has no do_OPTIONS; the method still went out upper-cased


def test_http_options_query_headers_cookies_form(server):
    src = """
    return M.request("post", ..., {query = "a=1&b=2", form = "x=y", cookies = {c1 = "v1"},
                                   headers = {["content-type"] = "text/plain", ["x-custom"] = "yes"}}).body
    """
    info = echo(lua("http", src, f"{server}/echo?dropped=1".encode())[0])
    assert info["path"] == "/echo?a=1&b=2" and info["body"] == "x=y"
    headers = {k.lower(): v for k, v in info["headers"].items()}
    assert headers["content-type"] == "text/plain" and headers["x-custom"] == "yes" and headers["cookie"] == "c1=v1"


def test_http_form_sets_content_type(server):
    info = echo(lua("http", 'return M.post(..., {form = "a=b"}).body', f"{server}/echo".encode())[0])
    assert {k.lower(): v for k, v in info["headers"].items()}["content-type"] == "application/x-www-form-urlencoded"


def test_http_basic_auth(server):
    info = echo(lua("http", 'return M.get(..., {auth = {user = "u", pass = "p"}}).body', f"{server}/echo".encode())[0])
    assert info["headers"]["Authorization"] == "Basic " + base64.b64encode(b"u:p").decode()
    value, err = lua("http", 'return M.get(..., {auth = {user = "u"}})', f"{server}/echo".encode())
    assert value is None and err == b"auth table must contain no nil user and pass fields"


def test_http_4xx_is_not_an_error(server):
    assert lua("http", "local r, err = M.get(...) return r.status_code, r.body, err",
               f"{server}/status/418".encode()) == [418, b"teapot", None]


def test_http_follows_redirects(server):
    out = lua("http", "local r = M.get(...) return r.status_code, r.url", f"{server}/redirect".encode())
    assert out == [200, f"{server}/echo?from=redirect".encode()]
    body = lua("http", 'return M.post(..., {body = "kept"}).body', f"{server}/redirect307".encode())[0]
    assert echo(body)["method"] == "POST" and echo(body)["body"] == "kept"
    value, err = lua("http", "return M.get(...)", f"{server}/loop".encode())
    assert value is None and b"stopped after 10 redirects" in err


def test_http_response_cookies(server):
    assert lua("http", "local c = M.get(...).cookies return c.session, c.b",
               f"{server}/cookies".encode()) == [b"abc", b"2"]


def test_http_gzip_is_decompressed(server):
    assert lua("http", "local r = M.get(...) return r.body, r.headers['Content-Encoding']",
               f"{server}/gzip".encode()) == [b"unzipped text", None]


@pytest.mark.parametrize("timeout", ["0.3", '"300ms"', "0"])
def test_http_timeout_keeps_fractions(server, timeout):
    t0 = time.monotonic()
    value, err = lua("http", f"return M.get(..., {{timeout = {timeout}}})", f"{server}/slow".encode())
    assert value is None and b"deadline exceeded" in err
    assert time.monotonic() - t0 < 1.2


def test_http_invalid_timeout_string(server):
    value, err = lua("http", 'return M.get(..., {timeout = "soon"})', f"{server}/echo".encode())
    assert value is None and err == b'time: invalid duration "soon"'


def test_http_request_is_bounded_by_script_deadline(server):
    t0 = time.monotonic()
    value, err = lua("http", "return M.get(...)", f"{server}/slow".encode(), timeout=0.4)
    assert value is None and b"deadline exceeded" in err and time.monotonic() - t0 < 1.2


def test_http_unreachable_port_is_nil_err_quickly():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    value, err = lua("http", "return M.get(...)", f"http://127.0.0.1:{port}/".encode())
    assert value is None and b"refused" in err and time.monotonic() - t0 < 1


def test_http_silent_host_stays_within_script_deadline():
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        t0 = time.monotonic()
        value, err = lua("http", "return M.get(...)", f"http://127.0.0.1:{silent.getsockname()[1]}/".encode(),
                         timeout=0.5)
    assert value is None and b"deadline exceeded" in err and time.monotonic() - t0 < 1.5


def test_http_bad_scheme():
    value, err = lua("http", 'return M.get("nowhere")')
    assert value is None and b'unsupported protocol scheme ""' in err


def test_http_request_batch(server):
    src = """
    local url = ...
    local ok = M.request_batch({{"get", url .. "/echo"}, {"post", url .. "/echo", {body = "b"}}})
    local rs, errs = M.request_batch({{"get", "http://127.0.0.1:1/"}, {"get", url .. "/status/418"}, "junk"})
    table.sort(errs)
    return #ok, ok[2].status_code, #rs, rs[1].status_code, #errs, errs[1], errs[2]
    """
    out = lua("http", src, server.encode())
    assert out[:5] == [2, 200, 1, 418, 2] and b"connection refused" in out[5] and out[6] == b"Request must be a table"


def test_http_batch_runs_concurrently(server):
    # the requests run on the scheduler's executor for blocking work, as in the server
    import concurrent.futures

    import msgscript

    services = msgscript.Services(blocking=concurrent.futures.ThreadPoolExecutor(4))
    msgscript.load_plugins([], services.modules)
    src = ('function OnMessage(u) return #require("http").request_batch({{"get", u .. "/slow"}, '
           '{"get", u .. "/slow"}}) end')
    runner = msgscript.LuaRunner(msgscript.Script("t.sub", "t", src), src, services, 64 * 2**20)
    t0 = time.monotonic()
    out = runner.call("OnMessage", time.monotonic() + 5, server.encode())
    assert out == (True, 2) and time.monotonic() - t0 < 2.8
    services.blocking.shutdown()


###############################################################################
# lfs #########################################################################
###############################################################################


def test_lfs_attributes(tmp_path):
    f = tmp_path / "f.txt"
    f.write_bytes(b"12345")
    src = """
    local a = M.attributes(...)
    local keys = {} for k in pairs(a) do keys[#keys + 1] = k end table.sort(keys)
    return a.mode, a.size, a.modification == math.floor(a.modification), table.concat(keys, ","),
           M.attributes(..., "size")
    """
    mode, size, whole_seconds, keys, size2 = lua("lfs", src, str(f).encode())
    assert (mode, size, whole_seconds, size2) == (b"file", 5, True, 5)
    assert keys == b"access,blksize,blocks,change,dev,gid,ino,mode,modification,nlink,rdev,size,uid"
    assert lua("lfs", "return M.attributes(...).mode", str(tmp_path).encode()) == [b"directory"]
    value, err = lua("lfs", "return M.attributes(...)", str(tmp_path / "missing").encode())
    assert value is None and b"no such file or directory" in err


def test_lfs_links_and_symlinkattributes(tmp_path):
    target = tmp_path / "target"
    target.write_text("x")
    src = """
    local dir = ...
    local hard = M.link(dir .. "/target", dir .. "/hard")
    local soft = M.link("target", dir .. "/soft", true)
    local again, err = M.link("target", dir .. "/soft", true)
    local s = M.symlinkattributes(dir .. "/soft")
    return hard, soft, again, err ~= nil, s.mode, s.target, M.attributes(dir .. "/soft", "mode"),
           M.attributes(dir .. "/hard").nlink
    """
    out = lua("lfs", src, str(tmp_path).encode())
    assert out == [True, True, None, True, b"link", str(target).encode(), b"file", 2]


def test_lfs_mkdir_rmdir_dir(tmp_path):
    src = """
    local dir = ...
    local made = M.mkdir(dir .. "/sub")
    local again, err = M.mkdir(dir .. "/sub")
    io.open(dir .. "/sub/a", "w"):close()
    local names = {} for name in M.dir(dir .. "/sub") do names[#names + 1] = name end
    local notdir, nderr = M.rmdir(dir .. "/sub/a")
    local full, ferr = M.rmdir(dir .. "/sub")
    os.remove(dir .. "/sub/a")
    return made, again, err ~= nil, table.concat(names, ","), notdir, nderr, full, ferr ~= nil, M.rmdir(dir .. "/sub")
    """
    out = lua("lfs", src, str(tmp_path).encode())
    assert out == [True, None, True, b"a", None, b"not a directory", None, True, True]
    assert not (tmp_path / "sub").exists()


def test_lfs_dir_raises_and_closes(tmp_path):
    (tmp_path / "f").write_text("")
    src = """
    local dir = ...
    local ok1, e1 = pcall(M.dir, dir .. "/missing")
    local ok2, e2 = pcall(M.dir, dir .. "/f")
    local iter, d = M.dir(dir)
    return ok1, ok2, tostring(e2), iter(), iter(), d:close()
    """
    fds = len(os.listdir("/proc/self/fd"))
    out = lua("lfs", src, str(tmp_path).encode())
    assert out == [False, False, b"not a directory", b"f", None, None]
    assert len(os.listdir("/proc/self/fd")) <= fds


def test_lfs_touch_does_not_create(tmp_path):
    f = tmp_path / "f"
    f.write_text("")
    out = lua("lfs", "local p = ... return M.touch(p, 1000, 2000), M.touch(p .. 'x')", str(f).encode())
    assert out[0] is True and out[1] is None
    assert (f.stat().st_atime, f.stat().st_mtime) == (1000, 2000) and not (tmp_path / "fx").exists()
    assert lua("lfs", "return M.touch(..., 3000), M.attributes(..., 'access'), M.attributes(..., 'modification')",
               str(f).encode()) == [True, 3000, 3000]


def test_lfs_chdir_and_currentdir(tmp_path):
    old = os.getcwd()
    try:
        out = lua("lfs", "local ok = M.chdir(...) return ok, M.currentdir(), M.chdir('/nonexistent/x')",
                  str(tmp_path).encode())
        assert out[:2] == [True, str(tmp_path).encode()] and out[2] is None
    finally:
        os.chdir(old)


@pytest.mark.parametrize("name", ["lock_dir", "lock", "unlock", "setmode"])
def test_lfs_unimplemented_functions_raise(name):
    assert lua("lfs", f"local ok, err = pcall(M.{name}, 'x') return ok, tostring(err)") == [
        False, b"unimplemented function"]


###############################################################################
# argument checking ###########################################################
###############################################################################


@pytest.mark.parametrize(
    "call, message",
    [
        ('require("http").get()', "bad argument #1 to 'get' (string expected, got nil)"),
        ('require("http").request("GET")', "bad argument #2 to 'request' (string expected, got nil)"),
        ('require("json").decode({})', "bad argument #1 to 'decode' (string expected, got table)"),
        ('require("json").encode()', "bad argument #1 to 'encode' (value expected)"),
        ('require("lfs").attributes("/", {})', "bad argument #2 to 'attributes' (string expected, got table)"),
        ('require("lfs").touch("/tmp", "x")', "bad argument #2 to 'touch' (number expected, got string)"),
        ('require("etcd").put()', "bad argument #1 to 'put' (string expected, got nil)"),
    ],
)
def test_bad_arguments_raise_lua_errors(call, message):
    ok, err = run(f"function OnMessage() local ok, err = pcall(function() return {call} end) "
                  "return ok, tostring(err) end")
    assert ok is False and message in err.decode()
