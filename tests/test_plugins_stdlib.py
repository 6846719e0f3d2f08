"""The bundled gopher-lua-libs-style plugins, driven from Lua scripts as users write them."""

import json
import os
import platform
import re
import socket
import threading
import time

import pytest

import msgscript


from conftest import run_lua as run  # noqa: E402


def lua(body, *args, timeout=5, memory=64 * 2**20):
    """Run `body` as the body of OnMessage(...) and return its results."""
    return run(f"function OnMessage(...)\n{body}\nend", *args, timeout=timeout, memory=memory)


def test_all_bundled_plugins_load():
    modules = {}
    failed = msgscript.load_plugins([str(msgscript.BUNDLED_PLUGINS)], modules)
    mine = ("strings", "time", "filepath", "ioutil", "runtime", "crypto", "cmd", "inspect", "yaml",
            "log", "storage", "hello", "tac", "tcp")
    assert failed == []
    for name in mine + ("loglevel",):
        assert name in modules


def test_hello():
    assert lua('return require("hello").print()') == [b"Hello from a Python plugin!"]


# strings ######################################################################

def test_strings_functions():
    out = lua("""
      local s = require("strings")
      local parts = s.split("a,b,c", ",")
      local chars = s.split("héj", "")
      local f = s.fields("  a \\t b\\n c  ")
      return #parts, parts[3], #s.split("", ","), s.split("", ",")[1], #chars, chars[2],
             #f, f[1] .. f[2] .. f[3],
             s.has_prefix("hello", "he"), s.has_suffix("hello", "lo"), s.contains("hello", "ell"),
             s.contains("hello", "xyz"), s.trim("xxhixyx", "xy"), s.trim_space("  \\t hi \\n"),
             s.trim_prefix("prefix-body", "prefix-"), s.trim_suffix("body.lua", ".lua"), s.split(123, 2)[1]
    """)
    assert out == [3, b"c", 1, b"", 3, "é".encode(), 3, b"abc", True, True, True, False, b"hi", b"hi",
                   b"body", b"body", b"1"]


def test_strings_reader_formats():
    out = lua("""
      local s = require("strings")
      local r = s.new_reader("line1\\nline2\\n42 rest")
      local l1, l2 = r:read("*l"), r:read()
      local n = r:read("*n")
      local three, rest = r:read(3), r:read("*a")
      local eof_a, eof_l, eof_n, eof_num, zero = r:read("*a"), r:read("*l"), r:read("*n"), r:read(4), r:read(0)
      r:close()
      return l1, l2, n, type(n), three, rest, eof_a, eof_l, eof_n, eof_num, zero,
             getmetatable(r) == s.Reader
    """)
    assert out == [b"line1", b"line2", 42, b"number", b" re", b"st", b"", None, 0, None, b"", True]


def test_strings_reader_unknown_format_raises():
    ok, err = lua('local ok, e = pcall(function() require("strings").new_reader("x"):read("*z") end) '
                  'return ok, e')
    assert ok is False and b"unknown fmt string" in err


def test_strings_builder():
    out = lua("""
      local s = require("strings")
      local b = s.new_builder()
      local ret = select("#", b:write("a", 1, "b"))
      b:write("c")
      local text = b:string()
      b:close()
      return ret, text, getmetatable(b) == s.Builder, pcall(b.write, b, {})
    """)
    assert out[:4] == [0, b"a1bc", True, False]


# time #########################################################################

def test_time_documented_values():
    out = lua("""
      local t = require("time")
      return t.parse("Dec  2 03:33:05 2018", "Jan  2 15:04:05 2006"),
             t.parse("Dec  2 03:33:05 2018", "Jan  2 15:04:05 2006", "Asia/Shanghai"),
             t.format(1543721585, "Jan  2 15:04:05 2006", "Europe/Moscow")
    """)
    assert out == [1543721585, 1543721585 - 8 * 3600, b"Dec  2 06:33:05 2018"]


def test_time_now_and_formats():
    before = time.time()
    unix, nano, rfc, default, frac = lua("""
      local t = require("time")
      return t.unix(), t.unix_nano(), t.format(1543721585.25, "2006-01-02T15:04:05.000Z07:00", "UTC"),
             t.format(0, nil, "UTC"), t.parse("2018-12-02T03:33:05.5+03:00", "2006-01-02T15:04:05Z07:00")
    """)
    assert before - 1 < unix < time.time() + 1 and isinstance(unix, float)
    assert abs(nano / 1e9 - unix) < 1 and isinstance(nano, int)
    assert rfc == b"2018-12-02T03:33:05.250Z"
    assert default == b"Thu Jan 1 00:00:00 +0000 UTC 1970"
    assert frac == 1543721585.5 - 3 * 3600


def test_time_format_uses_server_zone_without_location(monkeypatch):
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    assert lua('return require("time").format(0, "15:04 MST")') == [b"09:00 JST"]


def test_time_errors():
    out = lua("""
      local t = require("time")
      local v1, e1 = t.parse("not a date", "2006-01-02")
      local v2, e2 = t.parse("2018-02-30", "2006-01-02")
      local v3, e3 = t.format(0, "2006", "Nowhere/City")
      return v1, type(e1), v2, type(e2), v3, type(e3), pcall(t.sleep, "x")
    """)
    assert out[:7] == [None, b"string", None, b"string", None, b"string", False]


def test_time_sleep_sleeps_and_is_bounded_by_the_deadline():
    start = time.monotonic()
    assert lua('require("time").sleep(0.2) return "ok"') == [b"ok"]
    assert 0.18 < time.monotonic() - start < 1.5
    start = time.monotonic()
    with pytest.raises(Exception, match="timed out"):
        lua('require("time").sleep(30) return "never"', timeout=0.5)
    assert time.monotonic() - start < 2


# filepath #####################################################################

def test_filepath_lexical_functions():
    out = lua("""
      local fp = require("filepath")
      local d, f = fp.split("/foo/bar/baz")
      local list = fp.split_list("/bin:/usr/bin")
      return fp.basename("/a/b.txt"), fp.clean("a//b/../c/."), fp.dir("/a/b/c"), fp.ext("x/y.tar.gz"),
             fp.from_slash("a/b"), fp.to_slash("a/b"), fp.volume_name("/a"), fp.join("a", "b", 3, "../c"),
             fp.join(), fp.is_abs("/x"), fp.is_abs("x"), fp.separator(), fp.list_separator(), d, f,
             #list, list[2]
    """)
    assert out == [b"b.txt", b"a/c", b"/a/b", b".gz", b"a/b", b"a/b", b"", b"a/b/c", b"", True, False,
                   b"/", b":", b"/foo/bar/", b"baz", 2, b"/usr/bin"]


def test_filepath_match_and_rel_conventions():
    out = lua("""
      local fp = require("filepath")
      local m1 = fp.match("*.lua", "x.lua")
      local m2, e2 = fp.match("[", "x")
      local r1 = fp.rel("/a/b", "/a/c/d")
      local r2, e2b = fp.rel("/a", "b")
      return m1, fp.match("a/*", "a/b/c"), m2, type(e2), r1, r2, type(e2b)
    """)
    assert out == [True, False, False, b"string", b"../c/d", b"", b"string"]


def test_filepath_glob_abs_eval_symlinks(tmp_path):
    for name in ("b.txt", "a.txt", ".hidden.txt", "c.md"):
        (tmp_path / name).write_text("x")
    os.symlink(tmp_path / "a.txt", tmp_path / "link")
    out = lua("""
      local fp, lfs = require("filepath"), require("lfs")
      local g = fp.glob(... .. "/*.txt")
      local none = fp.glob(... .. "/*.nothing")
      local bad, err = fp.glob("[")
      local ev = fp.eval_symlinks(... .. "/link")
      local missing, merr = fp.eval_symlinks(... .. "/missing")
      -- relative paths are the call's working directory's
      local cwd = lfs.currentdir()
      lfs.link(... .. "/a.txt", "link", true)
      lfs.mkdir("sub")
      return #g, g[1], g[3], type(none), #none, bad, type(err), fp.abs("sub/../x") == cwd .. "/x", ev, missing,
             type(merr), fp.eval_symlinks("link"), fp.eval_symlinks("sub/../sub"), table.concat(fp.glob("*"), ",")
    """, str(tmp_path).encode())
    base = str(tmp_path).encode()
    assert out == [3, base + b"/.hidden.txt", base + b"/b.txt", b"table", 0, None, b"string", True,
                   base + b"/a.txt", b"", b"string", base + b"/a.txt", b"sub", b"link,sub"]


# ioutil #######################################################################

def test_ioutil_read_write_copy(tmp_path):
    src, dst = str(tmp_path / "src.txt"), str(tmp_path / "dst.txt")
    out = lua("""
      local ioutil, strings = require("ioutil"), require("strings")
      local src, dst = ...
      local w = ioutil.write_file(src, "hello\\0world")
      local data = ioutil.read_file(src)
      local missing, err = ioutil.read_file(src .. ".missing")
      local werr = ioutil.write_file("/nonexistent-dir/x", "y")
      local b = strings.new_builder()
      local c1 = ioutil.copy(b, strings.new_reader(string.rep("x", 70000)))
      local b2 = strings.new_builder()
      local c2 = ioutil.copyn(b2, strings.new_reader("abcdef"), 4)
      local c3 = ioutil.copyn(strings.new_builder(), strings.new_reader("ab"), 4)
      local f = io.open(dst, "w")
      local c4 = ioutil.copy(f, strings.new_reader("to a file"))
      f:close()
      return w, data, missing, type(err), type(werr), c1, #b:string(), c2, b2:string(), c3, c4,
             ioutil.read_file(dst)
    """, src.encode(), dst.encode())
    assert out == [None, b"hello\0world", None, b"string", b"string", None, 70000, None, b"abcd", b"EOF", None,
                   b"to a file"]
    assert oct(os.stat(src).st_mode & 0o777) == "0o644"


def test_ioutil_read_file_refuses_files_over_the_memory_cap(tmp_path):
    big = tmp_path / "big"
    big.write_bytes(b"x" * (6 * 2**20))
    value, err = lua("return require('ioutil').read_file(...)", str(big).encode(), memory=4 * 2**20)
    assert value is None and b"memory limit" in err
    # files that report no size (/proc) are read, within the same bound
    status = lua("return require('ioutil').read_file('/proc/self/status')")[0]
    assert status.startswith(b"Name:")


# runtime, crypto ##############################################################

def test_runtime_uses_go_names():
    goos, goarch = lua('local r = require("runtime") return r.goos(), r.goarch()')
    assert goos == b"linux"
    expected = {"x86_64": b"amd64", "aarch64": b"arm64"}.get(platform.machine(), platform.machine().encode())
    assert goarch == expected


def test_crypto_digests():
    assert lua('local c = require("crypto") return c.md5("hello"), c.sha256("")') == [
        b"5d41402abc4b2a76b9719d911017c592", b"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"]


# cmd ##########################################################################

def test_cmd_exec_results():
    out = lua("""
      local cmd = require("cmd")
      local ok = cmd.exec("echo out; echo err >&2")
      local bad = cmd.exec("exit 3")
      local killed = cmd.exec("kill -9 $$")
      return ok.status, ok.stdout, ok.stderr, bad.status, killed.status
    """)
    assert out == [0, b"out\n", b"err\n", 3, -1]


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_cmd_exec_timeout_kills_the_process_group(tmp_path):
    pidfile = tmp_path / "pid"
    start = time.monotonic()
    out = lua('return require("cmd").exec("sleep 30 & echo $! > ' + str(pidfile) + '; wait", 1)')
    assert out == [None, b"execute timeout"]
    assert time.monotonic() - start < 3
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 2
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


def test_cmd_exec_output_is_bounded_by_the_memory_cap():
    start = time.monotonic()
    value, err = lua('return require("cmd").exec("head -c 50000000 /dev/zero")', memory=8 * 2**20)
    assert value is None and b"memory limit" in err and time.monotonic() - start < 3


def test_cmd_exec_is_bounded_by_the_script_deadline():
    start = time.monotonic()
    with pytest.raises(Exception, match="timed out"):
        lua('local r, err = require("cmd").exec("sleep 30") while true do end', timeout=0.5)
    assert time.monotonic() - start < 3


# inspect ######################################################################

def test_inspect_documented_example_and_options():
    out = lua("""
      local inspect = require("inspect")
      local shared = {1}
      local t = setmetatable({shared, shared, ["a b"] = "q\\"", f = print, n = 1.5}, {__index = {}})
      return inspect({a = {b = 2}}, {newline = "", indent = ""}),
             inspect.inspect({1, 2, {3}}),
             inspect({a = {b = {c = 1}}}, {depth = 1}),
             inspect({x = 1, y = {z = 2}}),
             inspect(t),
             inspect({"a\\nb", 'say "hi"', [10] = true}, {newline = " ", indent = ""}),
             inspect({a = 1, b = 2}, {process = function(item, path)
               if path[#path] ~= inspect.KEY and item == 2 then return nil end
               return item
             end}),
             tostring(inspect.KEY), tostring(inspect.METATABLE)
    """)
    assert out[0] == b"{a = {b = 2}}"
    assert out[1] == b"{ 1, 2, { 3 } }"
    assert out[2] == b"{\n  a = {...}\n}"
    assert out[3] == b"{\n  x = 1,\n  y = {\n    z = 2\n  }\n}"
    assert out[4] == (b'{ <1>{ 1 }, <table 1>,\n  ["a b"] = \'q"\',\n  f = <function 1>,\n  n = 1.5,\n'
                      b"  <metatable> = {\n    __index = {}\n  }\n}")
    assert out[5] == b"{ \"a\\nb\", 'say \"hi\"', [10] = true }"
    assert out[6] == b"{\n  a = 1\n}"
    assert out[7:] == [b"inspect.KEY", b"inspect.METATABLE"]


# yaml #########################################################################

def test_yaml_encode_rules():
    out = lua("""
      local yaml = require("yaml")
      local shared = {}
      local bad, err = yaml.encode({f = print})
      local cyc, cerr = yaml.encode({a = shared, b = shared})
      return yaml.encode({a = {b = 1}}), yaml.encode({}), yaml.encode({[0] = "z", [1] = "o"}),
             yaml.encode({b = {1, 2.0, 2.5}, a10 = true, a2 = "x", [3] = "n"}), yaml.encode("plain"),
             bad, type(err), cyc, type(cerr), pcall(yaml.encode)
    """)
    assert out[0] == b"a:\n  b: 1\n"
    assert out[1] == b"[]\n"
    assert out[2] == b"0: z\n1: o\n"
    assert out[3] == b"3: n\na2: x\na10: true\nb:\n- 1\n- 2\n- 2.5\n"
    assert out[4] == b"plain\n"
    assert out[5:10] == [None, b"string", None, b"string", False]


def test_yaml_decode():
    out = lua("""
      local yaml = require("yaml")
      local v = yaml.decode("a: 1\\nb: [1, null, 3]\\nc: 1.5\\nd: 2001-12-14\\n1: one\\ne: ~\\n")
      local bad, err = yaml.decode("a: [")
      return v.a, tostring(v.a), #v.b, v.b[2], v.c, v.d, v[1], v.e, bad, type(err), yaml.decode("")
    """)
    assert out == [1, b"1", 2, 3, 1.5, b"2001-12-14", b"one", None, None, b"string", None]


def test_yaml_stream_decoder_and_encoder():
    out = lua("""
      local yaml, strings = require("yaml"), require("strings")
      local d = yaml.new_decoder(strings.new_reader("a: 1\\n---\\nb: 2\\n"))
      local one, two = d:decode(), d:decode()
      local none, eof = d:decode()
      local strict = yaml.new_decoder(strings.new_reader("a: 1\\na: 2\\n"))
      strict:set_strict(true)
      local dup, derr = strict:decode()
      local b = strings.new_builder()
      local e = yaml.new_encoder(b)
      local r1 = e:encode({x = 1})
      e:encode({2})
      return one.a, two.b, none, eof, dup, type(derr), r1, b:string()
    """)
    assert out == [1, 2, None, b"EOF", None, b"string", None, b"x: 1\n---\n- 2\n"]


def test_yaml_alias_bomb_is_nil_err_not_a_crash():
    levels = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        levels.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    bomb = "\n".join(levels) + "\n"  # under 1 KiB of text, 9^9 strings once expanded
    start = time.monotonic()
    out = lua("""
      local yaml, strings = require("yaml"), require("strings")
      local v, err = yaml.decode(...)
      local d = yaml.new_decoder(strings.new_reader(...))
      local v2, err2 = d:decode()
      local small = yaml.decode("x: &x [1, 2]\\ny: *x\\n")
      return v, err, v2, err2, small.y[2]
    """, bomb.encode(), timeout=5)
    assert out[0] is None and b"memory limit" in out[1] and out[2] is None and b"memory limit" in out[3]
    assert out[4] == 2  # ordinary aliases still work
    assert time.monotonic() - start < 3


def test_yaml_errors_read_like_go():
    out = lua("""
      local yaml = require("yaml")
      local v, err = yaml.decode("a: [1, 2")
      local r, rerr = yaml.decode("a: &a [*a]")
      return v, err, r, rerr, pcall(yaml.decode)
    """)
    assert out[0] is None and out[1].startswith(b"yaml: line ") and b"Python" not in out[1]
    assert out[2] is None and out[3] == b"yaml: anchor value contains itself"
    assert out[4] is False and out[5] == b"bad argument #1 to 'decode' (string expected, got nil)"


# tac ##########################################################################

def test_tac_reads_lines_from_the_end(tmp_path):
    path = tmp_path / "data.txt"
    path.write_bytes(b"first\r\n\nthird\n" + b"".join(b"line %d\n" % i for i in range(2000)) + b"last")
    out = lua("""
      local tac = require("tac")
      local scanner, err = tac.open(...)
      local lines = {}
      while true do
        local line = scanner:line()
        if line == nil then break end
        lines[#lines + 1] = line
      end
      scanner:close()
      local none, oerr = tac.open(... .. ".missing")
      return err, #lines, lines[1], lines[2], lines[2001], lines[#lines - 2], lines[#lines - 1], lines[#lines],
             none, oerr
    """, str(path).encode())
    assert out[:8] == [None, 2004, b"last", b"line 1999", b"line 0", b"third", b"", b"first"]
    assert out[8] is None and b"no such file or directory" in out[9]


def test_tac_trailing_newline_empty_file_and_long_lines(tmp_path):
    (tmp_path / "a").write_bytes(b"1\n2\n3\n")
    (tmp_path / "empty").write_bytes(b"")
    (tmp_path / "long").write_bytes(b"top\n" + b"x" * 9000 + b"\nafter\nend\n")
    out = lua("""
      local tac, dir = require("tac"), ...
      local function all(name)
        local s = tac.open(dir .. "/" .. name)
        local out = {}
        for line in function() return s:line() end do out[#out + 1] = line end
        s:close()
        return table.concat(out, ",")
      end
      return all("a"), all("empty"), all("long")
    """, str(tmp_path).encode())
    assert out == [b"3,2,1", b"", b"end,after"]  # a line over 8 KiB ends the scan, as in the original


def test_tac_reads_only_the_end_of_a_huge_file(tmp_path):
    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.truncate(8 * 2**30)  # 8 GiB of holes: reading it all would take far longer than the deadline
        f.seek(0, 2)
        f.write(b"\nthe end\n")
    start = time.monotonic()
    assert lua("local s = require('tac').open(...) return s:line(), s:line()", str(path).encode(),
               memory=8 * 2**20) == [b"the end", None]
    assert time.monotonic() - start < 2


# tcp ##########################################################################

class EchoServer:
    """A real TCP server on 127.0.0.1: each connection gets back what it sends, per line, in upper case,
    except "close" (the server closes) and "quiet" (it says nothing and waits)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def handle(self, conn):
        with conn, conn.makefile("rb") as lines:
            for line in lines:
                if line.strip() == b"close":
                    conn.sendall(b"bye 42\n3.5 rest")
                    return
                if line.strip() == b"quiet":
                    time.sleep(5)
                    return
                conn.sendall(line.upper())

    def close(self):
        self.sock.close()


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


def test_tcp_write_read_fields_and_close(echo):
    out = lua("""
      local tcp = require("tcp")
      local conn, err = tcp.open(...)
      local nothing = select("#", conn:write("ping\\n", "pong", 2, "\\n"))
      local l1, l2 = conn:read("*l"), conn:read("*l")
      local fields = {conn.dialTimeout, conn.writeTimeout, conn.readTimeout, conn.closeTimeout}
      conn.readTimeout = 0.5
      conn.other = "ignored"
      conn:write("abcdef\\n")
      local three = conn:read(3)
      local rest = conn:read()          -- 1024 bytes at most: what has arrived
      conn:write("close\\n")
      local word, n = conn:read(4), conn:read("*n")
      local all = conn:read("*a")
      local eof = conn:read("*l")
      conn:close()
      local ok, cerr = pcall(conn.read, conn, 5)
      return err, nothing, l1, l2, fields[1], fields[2], fields[3], fields[4], conn.readTimeout, conn.other,
             three, rest, word, n, all, eof, ok, cerr
    """, f"127.0.0.1:{echo.port}".encode())
    assert out[:10] == [None, 0, b"PING", b"PONG2", 5, 1, 1, 1, 0.5, None]
    assert out[10:16] == [b"ABC", b"DEF\n", b"bye ", 42, b"\n3.5 rest", None]
    assert out[16] is False and b"use of closed network connection" in out[17]


def test_tcp_open_errors_are_nil_err():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    out = lua("""
      local tcp = require("tcp")
      local c1, e1 = tcp.open(...)
      local c2, e2 = tcp.open("no-port-here")
      return c1, e1, c2, e2, pcall(tcp.open)
    """, f"127.0.0.1:{port}".encode())
    assert out[0] is None and b"connection refused" in out[1] and out[1].startswith(b"dial tcp ")
    assert out[2] is None and b"missing port" in out[3]
    assert out[4] is False and out[5].endswith(b"bad argument #1 to 'open' (string expected, got nil)")


def test_tcp_read_timeout_raises(echo):
    start = time.monotonic()
    out = lua("""
      local conn = require("tcp").open(...)
      conn.readTimeout = 0.3
      conn:write("quiet\\n")
      return pcall(conn.read, conn, "*l")
    """, f"127.0.0.1:{echo.port}".encode())
    assert out[0] is False and b"i/o timeout" in out[1] and time.monotonic() - start < 2


def test_tcp_waits_end_at_the_script_deadline(echo):
    start = time.monotonic()
    with pytest.raises(Exception, match="timed out"):
        lua("""
          local conn = require("tcp").open(...)
          conn.readTimeout = 60
          conn:write("quiet\\n")
          conn:read("*a")
          while true do end
        """, f"127.0.0.1:{echo.port}".encode(), timeout=0.5)
    assert time.monotonic() - start < 2


# error texts ##################################################################

@pytest.mark.parametrize("call, message", [
    ('require("strings").split()', "bad argument #1 to 'split' (string expected, got nil)"),
    ('require("strings").new_builder():write({})', "bad argument #1 to 'write' (string expected, got table)"),
    ('require("crypto").md5(true)', "bad argument #1 to 'md5' (string expected, got boolean)"),
    ('require("filepath").basename()', "bad argument #1 to 'basename' (string expected, got nil)"),
    ('require("filepath").rel("a")', "bad argument #2 to 'rel' (string expected, got nil)"),
    ('require("ioutil").write_file("/tmp/x")', "bad argument #2 to 'write_file' (string expected, got nil)"),
    ('require("ioutil").copyn(io.stdout, io.stdin, "x")', "bad argument #3 to 'copyn' (number expected, got string)"),
    ('require("ioutil").copy(print, io.stdin)', "bad argument #1 to 'copy' (writer expected, got function)"),
    ('require("ioutil").copy(io.stdout, {})', "bad argument #2 to 'copy' (reader expected, got table)"),
    ('require("time").sleep("x")', "bad argument #1 to 'sleep' (number expected, got string)"),
    ('require("time").format({})', "bad argument #1 to 'format' (number expected, got table)"),
    ('require("cmd").exec(nil)', "bad argument #1 to 'exec' (string expected, got nil)"),
    ('require("cmd").exec("true", "soon")', "bad argument #2 to 'exec' (number expected, got string)"),
    ('require("yaml").encode()', "bad argument #1 to 'encode' (value expected)"),
    ('require("log").new():set_flags(1)', "bad argument #1 to 'set_flags' (table expected, got number)"),
    ('require("log").new():printf()', "bad argument #1 to 'printf' (string expected, got nil)"),
    ('require("storage").open()', "bad argument #1 to 'open' (string expected, got nil)"),
    ('require("tac").open({})', "bad argument #1 to 'open' (string expected, got table)"),
    ('require("strings").new_reader("x").read()', "bad argument #1 to 'read' (strings.Reader expected, got nil)"),
])
def test_bad_arguments_read_like_lua(call, message):
    ok, err = lua(f"return pcall(function() return {call} end)")
    assert ok is False and err.decode().endswith(message)


def test_module_functions_look_like_lua_functions():
    out = lua("""
      local names = {}
      for _, m in ipairs({"json", "strings", "time", "filepath", "ioutil", "crypto", "yaml", "log", "storage",
                          "tac", "tcp", "cmd", "template", "scrape", "mysql", "sqlite3", "runtime", "hello"}) do
        for k, v in pairs(require(m)) do
          if type(v) ~= "function" and type(v) ~= "table" and type(v) ~= "string" and type(v) ~= "boolean" then
            names[#names + 1] = m .. "." .. k .. ":" .. type(v)
          elseif type(v) == "function" and not tostring(v):match("^function: ") then
            names[#names + 1] = m .. "." .. k .. "=" .. tostring(v)
          end
        end
      end
      return table.concat(names, " "), tostring(require("json").encode)
    """)
    assert out[0] == b"" and out[1].startswith(b"function: ")


# state shared by calls ########################################################

def test_module_objects_and_their_methods_cannot_be_changed_for_later_calls(tmp_path):
    src = """
    function OnMessage(change, path)
      local storage, template = require("storage"), require("template")
      local log, inspect = require("log"), require("inspect")
      local s, e = storage.open(path), template.choose("mustache")
      if change then
        for _, f in ipairs({
          function() s.get = function() return "pwned" end end,
          function() getmetatable(s).__index.get = function() return "pwned" end end,
          function() e.render = function() return "pwned" end end,
          function() getmetatable(e).__index.render = function() return "pwned" end end,
          function() getmetatable(log.new("/dev/null")).__index.printf = error end,
          function() require("loglevel").INFO.println = error end,
          function() inspect.KEY.x = 1 end,
          function() setmetatable(s, nil) end,
        }) do pcall(f) end
        rawset(s, "get", function() return "pwned" end)  -- this object is this call's own
        return "changed"
      end
      s:set("k", "v")
      return (s:get("k")), e:render("{{x}}", {x = 1}), s == storage.open(path), tostring(inspect.KEY.x),
             select("#", log.new("/dev/null"):printf("%d", 1))
    end
    """
    services = msgscript.Services()
    msgscript.load_plugins([], services.modules)
    runner = msgscript.LuaRunner(msgscript.Script("t.sub", "t", src), src, services, 64 * 2**20)
    path = str(tmp_path / "s.json").encode()
    expected = (True, b"v", b"1", True, b"nil", 0)
    assert runner.call("OnMessage", time.monotonic() + 5, False, path) == expected
    assert runner.call("OnMessage", time.monotonic() + 5, True, path)[1:] == (b"changed",)
    assert runner.call("OnMessage", time.monotonic() + 5, False, path) == expected


# log / loglevel ###############################################################

def test_log_to_file_matches_the_original(tmp_path):
    path = str(tmp_path / "test.log")
    run(f"""
      local log = require("log")
      function OnMessage()
        local info = log.new("{path}")
        info:print(1, 2)
        info:set_prefix("[INFO] ")
        info:printf("%d %.2f", 1, 2.2)
        info:set_flags({{longfile = true}})
        info:print("ok")
        info:println("a", 1)
        info:close()
        info:print("after close is dropped")
      end
    """)
    with open(path) as f:
        assert f.read() == "1 2\n[INFO] 1 2.20\n[INFO] t:9: ok\n[INFO] t:10: a 1\n"


def test_log_formatting_and_flags(capfd):
    out = lua("""
      local log = require("log")
      local l = log.new("STDOUT", "p: ")
      l:print("ok", 1.2, 3, 4, true)
      l:printf("%s|%5.1f|%x|%v|%q|%d", "s", 3.14159, 255, 1e6 + 0.5, "q", 7)
      l:set_flags({date = true, time = true, utc = true})
      l:println("dated")
      local e = l:set_output("/nonexistent-dir/x.log")
      return type(e), pcall(l.set_flags, l, {date = "yes"}), select("#", log.new("/nonexistent-dir/y.log"))
    """)
    assert out[:2] == [b"string", False] and out[-1] == 1
    lines = capfd.readouterr().out.splitlines()
    assert lines[0] == "p: ok1.2 3 4 true"
    assert lines[1] == 'p: s|  3.1|ff|1.0000005e+06|"q"|7'
    assert re.fullmatch(r"p: \d{4}/\d\d/\d\d \d\d:\d\d:\d\d dated", lines[2])


def test_loglevel(capfd):
    out = lua("""
      local ll = require("loglevel")
      local default_level = ll.get_level()
      ll.DEBUG:print("hidden")
      ll.INFO:print("shown")
      ll.set_level("debug")
      ll.DEBUG:print("now shown")
      ll.set_level("ERROR")
      ll.WARN:print("hidden again")
      local ok = pcall(ll.set_level, "LOUD")
      return default_level, ll.get_level(), ok, ll.default_output(), type(ll.new)
    """)
    assert out == [b"INFO", b"ERROR", False, b"STDERR", b"function"]
    err = capfd.readouterr().err
    assert "[INFO] " in err and "shown" in err and "[DEBUG] " in err and "now shown" in err
    assert "hidden" not in err


# storage ######################################################################

def test_storage_set_get_ttl_and_file_format(tmp_path):
    path = str(tmp_path / "db.json")
    out = lua("""
      local storage = require("storage")
      local s, err = storage.open(...)
      local same = storage.open(...)
      s:set("k", {a = 1, list = {1, 2}})
      s:set("n", 5)
      s:set("short", "x", 0.05)
      local v, found = s:get("k")
      local missing, mfound = s:get("nope")
      local short_before = s:get("short")
      local t0 = os.clock()
      while os.clock() - t0 < 0.1 do end
      local short_after, sfound = s:get("short")
      local keys = s:keys()
      local dump = s:dump()
      local bad = s:set("f", print)
      local sync = s:sync()
      return err, s == same, v.a, v.list[2], found, missing, mfound, short_before, short_after, sfound,
             #keys, dump.n, dump.short, type(bad), sync, s:close(), pcall(s.set, s, "k", 1, "ttl")
    """, path.encode())
    assert out[:16] == [None, True, 1, 2, True, None, False, b"x", None, False, 3, 5, None, b"string", None,
                        None]
    assert out[16] is False
    with open(path) as f:
        data = json.load(f)["data"]
    assert sorted(data) == ["k", "n"]
    import base64
    assert json.loads(base64.b64decode(data["k"]["value"])) == {"a": 1, "list": [1, 2]}
    assert data["n"]["max_valid_at"] > time.time_ns()


def test_storage_shared_between_scripts_and_reloaded(tmp_path):
    path = str(tmp_path / "shared.json")
    lua('local s = require("storage").open(...) s:set("greeting", "hi") s:close()', path.encode())
    assert lua('return require("storage").open(...):get("greeting")', path.encode()) == [b"hi", True]
    # a file written by someone else (the original's format) is read on open
    other = str(tmp_path / "other.json")
    import base64
    with open(other, "w") as f:
        json.dump({"data": {"x": {"value": base64.b64encode(b'[1,null,2]').decode(),
                                  "max_valid_at": time.time_ns() + 10**12}}}, f)
    assert lua('local v = require("storage").open(...):get("x") return #v, v[2]', other.encode()) == [2, 2]
    assert lua('return require("storage").open("x", "badger")') == [None, b"driver not found"]


def test_storage_stores_json_results_with_holes_and_reports_errors_as_values(tmp_path):
    out = lua("""
      local storage, json = require("storage"), require("json")
      local s = storage.open(...)
      local err = s:set("holes", json.decode('[1, null, 3]'))
      local v = s:get("holes")
      local bad = s:set("f", {print})
      local none, nerr = storage.open("/nonexistent-dir/x.json")
      return err, #v, v[2], bad, none, nerr, pcall(s.set, s, "k", 1, "ttl")
    """, str(tmp_path / "s.json").encode())
    assert out[:5] == [None, 2, 3, b"cannot encode function to JSON", None]  # nulls dropped on the way back
    assert b"no such file or directory" in out[5] and b"Errno" not in out[5]
    assert out[6] is False and out[7].endswith(b"bad argument #3 to 'set' (number expected, got string)")


def test_storage_is_one_store_per_path_across_threads(tmp_path):
    path = str(tmp_path / "threads.json")
    script = """
      local path, prefix = ...
      local s = require("storage").open(path)
      for i = 1, 50 do s:set(prefix .. i, i) end
    """
    errors = []

    def worker(name):
        try:
            lua(script, path.encode(), name.encode())
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(f"w{i}-",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert lua('local s = require("storage").open(...) s:sync() return #s:keys(), s:get("w3-50")',
               path.encode()) == [200, 50, True]
    with open(path) as f:
        assert len(json.load(f)["data"]) == 200


def test_infinities_and_nan_where_a_count_or_a_character_is_expected(echo, tmp_path):
    """A number with no integer value is a script's mistake, answered as Lua and Go do, never an internal error."""
    out = lua("""
      local conn = require("tcp").open(...)
      conn:write("abc\\n")
      local a, b = conn:read(-1/0), conn:read(0/0)
      local c = conn:read(1/0)                 -- what has arrived
      conn:close()
      local l = require("log").new(select(2, ...))
      l:printf("%d %x %b %c %c|", 1/0, 0/0, -1/0, 2^70, 65)
      return a, b, c
    """, f"127.0.0.1:{echo.port}".encode(), str(tmp_path / "log").encode())
    assert out == [b"", b"", b"ABC\n"]
    assert (tmp_path / "log").read_text().strip() == (
        "%!d(lua.LNumber=+Inf) %!x(lua.LNumber=NaN) %!b(lua.LNumber=-Inf) \ufffd A|")
