"""The remaining differences from the Go original that README's "Differences from the Go original"
lists, one test each where no other test file covers the line (the README names the test of every
line), and a check that every line of that section names tests that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import requests
from conftest import ROOT, run_lua, write_script

import msgscript


def lua(src: str, *args):
    return [v.decode() if isinstance(v, bytes) else v for v in run_lua(src, *args)]


# --- the README section names a test for every line ----------------------------------------------------

def differences_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Differences from the Go original")
    end = text.index("\n## ", start + 10)
    return text[start:end]


def test_every_difference_line_names_tests_that_exist():
    section = differences_section()
    lines = [line for line in re.split(r"\n(?=- )", section) if line.startswith("- ")]
    assert len(lines) > 20
    missing, unknown = [], []
    for line in lines:
        names = re.findall(r"<!-- tests?: ([^>]*)-->", line)
        if not names:
            missing.append(line[:100])
            continue
        for ref in ", ".join(names).replace(",", " ").split():
            file, _, test = ref.partition("::")
            path = ROOT / "tests" / file
            if not path.is_file() or not re.search(rf"^def {re.escape(test)}\(", path.read_text(), re.M):
                unknown.append(ref)
    assert missing == [], "README difference lines without a test:\n" + "\n".join(missing)
    assert unknown == [], f"README names tests that do not exist: {unknown}"


# --- the Lua engine ------------------------------------------------------------------------------------------

def test_each_call_has_its_own_working_directory_for_io_os_and_commands(tmp_path):
    out = []
    for _ in range(2):
        (here, pwd, listing) = lua("""function OnMessage()
          local f = assert(io.open("note.txt", "w")) f:write("mine") f:close()
          local p = io.popen("pwd") local pwd = p:read("*l") p:close()
          local q = io.popen("ls") local listing = q:read("*a") q:close()
          os.rename("note.txt", "kept.txt")
          return io.open("kept.txt"):read("*a"), pwd, listing
        end""")
        out.append((here, pwd, listing))
    (a, pwd_a, ls_a), (b, pwd_b, ls_b) = out
    assert a == b == "mine"
    assert pwd_a != pwd_b and "msgscript-call-" in pwd_a  # a fresh directory per call...
    assert ls_a == ls_b == "note.txt\n"  # ...that starts empty
    assert not Path(pwd_a).exists() and not (Path.cwd() / "kept.txt").exists()  # removed when the call ends


def test_modules_resolve_relative_paths_in_the_calls_directory():
    (cwd, pwd) = lua("""function OnMessage()
      local p = io.popen("pwd") local pwd = p:read("*l") p:close()
      return require("lfs").currentdir(), pwd
    end""")
    assert cwd == pwd


def test_lua51_number_parsing_and_math_huge():
    assert lua("""function OnMessage()
      return tonumber("1e5"), "017" + 0, tostring(math.huge == 1/0), tostring(tonumber("0x1F"))
    end""") == [100000, 17, "true", "31"]


def test_a_chunk_with_negative_zero_makes_one_over_zero_negative():
    """Lua 5.1's constant folding shares 0 and -0 in one chunk (gopher-lua: +Inf)."""
    assert lua("function OnMessage() local z = -0.0 local inf = 1/0 return tostring(inf) end") == ["-Inf"]
    assert lua("function OnMessage() local inf = 1/0 return tostring(inf) end") == ["+Inf"]


def test_gopher_lua_only_globals_are_missing_and_exit_raises():
    assert lua("""function OnMessage()
      local listed = "string not listed"
      for k in pairs(_G) do if k == "string" then listed = "string listed" end end
      return tostring(_GOPHER_LUA_VERSION), tostring(channel), type(collectgarbage("count")),
        select(2, pcall(module, "m")), select(2, pcall(os.exit, 1)), listed
    end""") == ["nil", "nil", "number", "module() is not supported: return the module's table instead",
                "os.exit is not available to scripts", "string not listed"]


def test_files_written_are_buffered_until_flushed_or_closed():
    assert lua("""function OnMessage()
      local f = io.open("buffered.txt", "w") f:write("data")
      local before = io.open("buffered.txt"):read("*a")
      f:flush()
      return before, io.open("buffered.txt"):read("*a")
    end""") == ["", "data"]


@pytest.mark.parametrize("args, ours", [
    ('"%d", "12.5"', "12"),  # gopher-lua: 12.5 (a numeric string is written as it is)
    ('"%x", -1', "ffffffffffffffff"),  # Go: -1
    ('"%c", 200', "\udcc8"),  # Go: È (UTF-8); here the byte 200
    ('"[%5s]", "é"', "[   é]"),  # Go counts runes: 4 spaces
    ('"%q", "a\\nb"', '"a\\\nb"'),  # Go: "a\\nb" (strconv.Quote)
    ('"%d|%d", 1, 2, 3', "1|2"),  # Go: 1|2%!(EXTRA lua.LNumber=3)
])
def test_string_format_differences_kept(args, ours):
    (got,) = run_lua(f"function OnMessage() return string.format({args}) end")
    assert got.decode("utf-8", "surrogateescape") == ours


@pytest.mark.parametrize("args, error", [('"%b", 5', "invalid option '%b' to 'format'"),
                                         ('"%t", true', "invalid option '%t' to 'format'"),
                                         ('"%d", {}', "number expected, got table")])
def test_string_format_verbs_and_types_lua_refuses(args, error):
    (got,) = lua(f"function OnMessage() return select(2, pcall(string.format, {args})) end")
    assert error in got


# --- the server --------------------------------------------------------------------------------------------------

def test_an_unknown_executor_header_skips_the_script(start_server, tmp_path, nats_client):
    write_script(tmp_path, "perl.lua", "--* subject: godiff.perl\n--* name: perl\n--* executor: perl\n"
                                       "function OnMessage() return 'lua after all' end\n")
    write_script(tmp_path, "ok.lua", "--* subject: godiff.ok\n--* name: ok\nfunction OnMessage() return 'ok' end\n")
    srv = start_server("-script", str(tmp_path))
    assert nats_client.request("godiff.ok", b"").data == b"ok"
    assert "unknown executor 'perl'" in srv.log
    assert requests.get(f"{srv.base}/godiff.perl", timeout=5).status_code == 404


def test_favicon_and_logo_are_not_served(start_server, tmp_path):
    write_script(tmp_path, "ok.lua", "--* subject: godiff.ok\n--* name: ok\nfunction OnMessage() return 'ok' end\n")
    srv = start_server("-script", str(tmp_path))
    for path in ("/favicon.ico", "/logo.webp"):
        assert requests.get(srv.base + path, timeout=5).status_code == 404


def test_an_empty_envelope_subject_on_etcd_runs_nothing():
    """Go's etcd store lists every script of every subject under the empty subject and runs them all."""
    class EtcdLike(msgscript.Store):
        kind = "etcd"

    assert msgscript.go_not_found(EtcdLike(), "") == b'{"script_result":null,"is_html":false}'
    assert msgscript.go_not_found(msgscript.Store(), "x") == (
        b'{"script_result":null,"is_html":false,"error":"failed to get scripts for subject: script not found for '
        b'subject: x"}')
