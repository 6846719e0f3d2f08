"""Numbers and values as text, as gopher-lua (the Go original's engine) writes them.

The expected strings are those measured with gopher-lua v1.1.1 (research notes on issue 20, §1
and §2). tostring, print, io.write, file:write, string.format("%s") and the modules that write
numbers agree with them; `..` and table.concat convert in C and keep Lua 5.1's %.14g (a
documented difference, checked here too so that the README stays true).
"""

from __future__ import annotations

import math
import random
import struct

import pytest
from conftest import run_lua, write_script

import msgscript

# value (as Lua source) -> what gopher-lua's tostring gives
NUMBERS = [
    ("10/2", "5"),
    ("2^53", "9007199254740992"),
    ("2^53 + 1", "9007199254740992"),
    ("2^62", "4611686018427387904"),
    ("2^63", "9.223372036854776e+18"),
    ("-2^63", "-9223372036854775808"),
    ("2^64", "1.8446744073709552e+19"),
    ("1e15", "1000000000000000"),
    ("1e16", "10000000000000000"),
    ("1e18", "1000000000000000000"),
    ("1e19", "1e+19"),
    ("1e21", "1e+21"),
    ("1e100", "1e+100"),
    ("0.1 + 0.2", "0.30000000000000004"),
    ("1/3", "0.3333333333333333"),
    ("math.pi", "3.141592653589793"),
    ("-(0.0)", "0"),
    ("0/0", "NaN"),
    ("1/0", "+Inf"),
    ("-1/0", "-Inf"),
    ("1e-4", "0.0001"),
    ("1e-5", "1e-05"),
    ("123456.5", "123456.5"),
    ("1234567.5", "1.2345675e+06"),
    ("123456789.5", "1.234567895e+08"),
    ("1e6 + 0.5", "1.0000005e+06"),
    ("5e-324", "5e-324"),
    ("1.7976931348623157e308", "1.7976931348623157e+308"),
    ("12345678901234567890", "1.2345678901234567e+19"),
]


def lua(src: str, *args):
    return [v.decode() if isinstance(v, bytes) else v for v in run_lua(src, *args)]


@pytest.mark.parametrize("expr, expected", NUMBERS)
def test_tostring_writes_numbers_as_gopher_lua(expr, expected):
    # each value in a chunk of its own: Lua 5.1 shares one constant for 0 and -0 within a chunk
    (text,) = lua(f"function OnMessage() return tostring({expr}) end")
    assert text == expected


@pytest.mark.parametrize("expr, expected", NUMBERS)
def test_format_s_io_write_and_file_write_agree_with_tostring(expr, expected, tmp_path):
    target = tmp_path / "out.txt"
    (text,) = lua(f"""function OnMessage(path)
      local x = {expr}
      local f = assert(io.open(path, "w"))
      f:write(x, "|")
      io.output(f)
      io.write(x, "|", "s")
      f:close()
      local t = {{}}
      return string.format("%s", x) .. "/" .. string.format("%5s|%-3s|", x, x)
    end""", str(target).encode())
    assert text == f"{expected}/{expected:>5}|{expected:<3}|"
    assert target.read_text() == f"{expected}|{expected}|s"


def test_many_random_numbers_match_go_shortest_formatting():
    """Random doubles (every exponent, powers of two, subnormals): Lua's text equals Go's rule,
    computed here from Python's shortest repr (msgscript.lua_number_text)."""
    rng = random.Random(20)
    values = [struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0] for _ in range(4000)]
    values = [v for v in values if v == v]
    values += [2.0 ** e for e in range(-1074, 1024, 7)] + [-(2.0 ** e) for e in range(-1074, 1024, 11)]
    values += [round(rng.uniform(-1e7, 1e7), rng.randint(0, 9)) for _ in range(2000)]
    values += [rng.random() * 10 ** rng.randint(-30, 30) for _ in range(2000)]
    data = "\n".join(repr(v) for v in values).encode()
    (out,) = lua("""function OnMessage(data)
      local out = {}
      for v in data:gmatch("[^\\n]+") do
        out[#out + 1] = tostring(tonumber(v)) .. " " .. string.format("%g", tonumber(v))
      end
      return table.concat(out, "\\n")
    end""", data)
    got = out.split("\n")
    wrong = [(v, line) for v, line in zip(values, got, strict=True)
             if line != f"{msgscript.lua_number_text(v)} {msgscript.go_float_text(v)}"]
    assert wrong == [], wrong[:5]


def test_python_side_writes_numbers_as_gopher_lua():
    assert [msgscript.lua_number_text(v) for v in (5, 2.0**53, 2.0**63, -(2.0**63), 0.1 + 0.2, 1234567.5, 1e-5,
                                                    math.nan, math.inf, -math.inf, -0.0)] == [
        "5", "9007199254740992", "9.223372036854776e+18", "-9223372036854775808", "0.30000000000000004",
        "1.2345675e+06", "1e-05", "NaN", "+Inf", "-Inf", "0"]


# (format, arguments as Lua source) -> gopher-lua's result (§2 of the notes), or a pattern
FORMATS = [
    ('"%s", nil', "nil"),
    ('"%s|%s", true, false', "true|false"),
    ('"%s", 1e15', "1000000000000000"),
    ('"%s", 1/3', "0.3333333333333333"),
    ('"%d|%d", 3.7, -3.7', "3|-3"),
    ('"%d", 2^63', "-9223372036854775808"),
    ('"%d|%d", "12", "x"', "12|0"),
    ('"%s %s", 1', "1 %!s(MISSING)"),
    ('"%d and %5.2f", 7', "7 and %!f(MISSING)"),
    ('"%q", 1/3', '"0.3333333333333333"'),
    ('"%q|%q", nil, true', '"nil"|"true"'),
    ('"%g|%g|%g|%g", 100000, 1000000, 1234567.5, 2^53', "100000|1e+06|1.2345675e+06|9.007199254740992e+15"),
    ('"%G|%+g|%08g|%-6g|", 1e-7, 5, -2.5, 1.5', "1E-07|+5|-00002.5|1.5   |"),
    ('"%.14g", 2^53', "9.007199254741e+15"),
    ('"%.3f|%5.1f|%5.1f|%e", 0/0, 1/0, -1/0, 1/0', "NaN| +Inf| -Inf|+Inf"),
    ('"%v|%v|%v|%F", 1.5, "x", nil, 2.5', "1.5|x|nil|2.500000"),
    ('"%5.2s|%x|%#x|%c|%5.1f|%e", "abcdef", 255, 255, 65, 3.14159, 12345.678',
     "   ab|ff|0xff|A|  3.1|1.234568e+04"),
    ('"100%% %s", "sure"', "100% sure"),
    ('"no conversion"', "no conversion"),
]


@pytest.mark.parametrize("args, expected", FORMATS)
def test_string_format_as_gopher_lua(args, expected):
    (text,) = lua(f"function OnMessage() return string.format({args}) end")
    assert text == expected


def test_format_s_of_tables_functions_threads_by_address_without_tostring():
    (text,) = lua("""function OnMessage()
      local t = setmetatable({}, {__tostring = function() return "custom" end})
      local co = coroutine.create(function() end)
      return table.concat({string.format("%s", {}), string.format("%s", print), string.format("%s", co),
        string.format("%s", t), tostring(t), string.format("%q", {}), string.format("%s", OnMessage)}, "\\n")
    end""")
    table, function, thread, custom_table, custom, quoted, lua_function = text.split("\n")
    assert table.startswith("table: 0x") and custom_table.startswith("table: 0x")
    assert function.startswith("function: ") and lua_function.startswith("function: ")
    assert thread.startswith("thread: 0x")
    assert custom == "custom"  # tostring (and print) use __tostring, as gopher-lua's do
    assert quoted.startswith('"table: 0x') and quoted.endswith('"')


def test_format_errors_that_stay_errors():
    (text,) = lua("""function OnMessage()
      local out = {}
      for _, args in ipairs({{"%d", {}}, {"%z", 1}, {"%f", "abc"}}) do
        local ok, e = pcall(string.format, args[1], args[2])
        out[#out + 1] = tostring(ok) .. ":" .. e
      end
      local ok, e = pcall(function() local s = string.format("%d", nil, 2) return s end)
      out[#out + 1] = e
      local ok2, e2 = pcall(tostring)
      out[#out + 1] = e2
      return table.concat(out, "\\n")
    end""")
    assert text.split("\n") == [
        "false:bad argument #2 to 'format' (number expected, got table)",
        "false:invalid option '%z' to 'format'",
        "false:bad argument #2 to 'format' (number expected, got string)",
        "bad argument #2 to 'format' (number expected, got nil)",  # nil given, not missing
        "bad argument #1 to 'tostring' (value expected)",
    ]


def test_concatenation_and_table_concat_keep_lua51_text():
    """`..` and table.concat convert numbers in C (%.14g): the documented difference and its workarounds."""
    (text,) = lua("""function OnMessage()
      return table.concat({2^53 .. "", table.concat({0.1 + 0.2, 1e15}, ","),
        tostring(2^53) .. "", string.format("%d", 2^53), string.format("%s", 0.1 + 0.2)}, "|")
    end""")
    assert text == "9.007199254741e+15|0.3,1e+15|9007199254740992|9007199254740992|0.30000000000000004"


def test_modules_write_numbers_as_gopher_lua():
    (text,) = lua("""function OnMessage()
      local inspect, strings, json = require("inspect"), require("strings"), require("json")
      local b = strings.new_builder()
      b:write("a", 1.5, 1e15, 2^63)
      return table.concat({inspect({1e15, 2^63, 1/3}), b:string(), json.encode({1e15, 0.1 + 0.2}),
        strings.split(2^53, "0")[1]}, "\\n")
    end""")
    assert text.split("\n") == ["{ 1000000000000000, 9.223372036854776e+18, 0.3333333333333333 }",
                                "a1.510000000000000009.223372036854776e+18",
                                "[1000000000000000,0.30000000000000004]", "9"]


def test_print_and_http_mode_bodies_through_the_server(start_server, tmp_path):
    import requests

    write_script(tmp_path, "show.lua", """--* subject: gotext.show
--* name: show
--* http: true
function GET(url, body)
  print("printed:", 2^53, 0.1 + 0.2, 1234567.5, nil, true)
  return 2^53, 200, {["X-Ratio"] = 1/3}
end
""")
    srv = start_server("-script", str(tmp_path))
    r = requests.get(f"{srv.base}/gotext.show", timeout=10)
    assert r.status_code == 200
    assert r.text == "9007199254740992"
    assert r.headers["X-Ratio"] == "0.3333333333333333"
    srv.wait_log("printed:\t9007199254740992\t0.30000000000000004\t1.2345675e+06\tnil\ttrue")
