"""gopher-lua-libs v0.5.0's own tests of `strings` and `yaml`, run through a real msgscript server.

gopher-lua-libs tests each module with a Lua file of global `Test*` functions that take a Go
`testing.T` (`t:Run`, `t:Errorf`, ...) and its `assert`/`require` helpers, plus Go examples with
the output they print. The assertions below are those of v0.5.0's `strings/test/test_api.lua`,
`strings/example_test.go`, `yaml/test/test_api.lua` and `yaml/example_test.go`, written in our own
words from the research notes (not copied), with the same idioms the originals use: assertion
messages built with string.format("%s", ...) from tables and from nil, evaluated even when the
assertion passes, which is what made three of the strings tests fail before string.format took
any value. Each Test* function is its own pytest case, run in a script over NATS.
"""

from __future__ import annotations

import json

import pytest
from conftest import MsgscriptProcess, Nats, write_script

# A stand-in for Go's testing.T and gopher-lua-libs' assert/require helpers (our own code).
HARNESS = r"""
local T = {}
T.__index = T
local FATAL = {}
local function new_t(name) return setmetatable({name = name, failures = {}, skipped = false}, T) end
function T:Errorf(fmt, ...) self.failures[#self.failures + 1] = string.format(fmt, ...) end
function T:Error(...)
  local parts = {}
  for i = 1, select("#", ...) do parts[#parts + 1] = tostring((select(i, ...))) end
  self.failures[#self.failures + 1] = table.concat(parts, " ")
end
function T:Fatalf(fmt, ...) self:Errorf(fmt, ...) error(FATAL, 0) end
function T:Fatal(...) self:Error(...) error(FATAL, 0) end
function T:Log() end
function T:Logf() end
function T:Skip() self.skipped = true error(FATAL, 0) end
-- every call runs in a fresh temporary working directory of its own, removed when it ends
function T:TempDir() return "." end
function T:Run(name, fn)
  local sub = new_t(self.name .. "/" .. name)
  local ok, err = pcall(fn, sub)
  if not ok and err ~= FATAL then sub.failures[#sub.failures + 1] = "error: " .. tostring(err) end
  for _, f in ipairs(sub.failures) do self.failures[#self.failures + 1] = sub.name .. ": " .. f end
  return #sub.failures == 0
end

local function message(...)
  local n = select("#", ...)
  if n == 0 then return "" end
  return " (" .. (n == 1 and tostring((...)) or string.format(...)) .. ")"
end
local function same(a, b)
  if type(a) ~= "table" or type(b) ~= "table" then return a == b end
  for k, v in pairs(a) do if not same(v, b[k]) then return false end end
  for k in pairs(b) do if a[k] == nil then return false end end
  return true
end
local function checks(fail)
  local C = {}
  function C:Equal(t, expected, actual, ...)
    if not same(expected, actual) then
      fail(t, "expected %s, got %s%s", require("inspect")(expected), require("inspect")(actual), message(...))
      return false
    end
    return true
  end
  function C:NotEqual(t, a, b, ...)
    if same(a, b) then fail(t, "did not expect %s%s", require("inspect")(a), message(...)) return false end
    return true
  end
  function C:True(t, v, ...) return C:Equal(t, true, v, ...) end
  function C:False(t, v, ...) return C:Equal(t, false, v, ...) end
  function C:Nil(t, v, ...) return C:Equal(t, nil, v, ...) end
  function C:NotNil(t, v, ...)
    if v == nil then fail(t, "expected a value%s", message(...)) return false end
    return true
  end
  function C:NoError(t, err, ...)
    if err ~= nil then fail(t, "unexpected error %s%s", tostring(err), message(...)) return false end
    return true
  end
  function C:Error(t, err, ...)
    if err == nil then fail(t, "expected an error%s", message(...)) return false end
    return true
  end
  function C:ErrorContains(t, err, text, ...)
    if err == nil or not tostring(err):find(text, 1, true) then
      fail(t, "expected an error containing %q, got %s%s", text, tostring(err), message(...))
      return false
    end
    return true
  end
  function C:Contains(t, s, text, ...)
    if not tostring(s):find(text, 1, true) then
      fail(t, "%q does not contain %q%s", tostring(s), text, message(...))
      return false
    end
    return true
  end
  return C
end
local assert_ = checks(function(t, ...) t:Errorf(...) end)
local require_ = checks(function(t, ...) t:Fatalf(...) end)
package.preload["assert"] = function() return assert_ end
package.preload["require"] = function() return require_ end

-- what the Go examples print: print() into a buffer, compared with their "// Output:" text
local printed = {}
function print(...)
  local parts = {}
  for i = 1, select("#", ...) do parts[#parts + 1] = tostring((select(i, ...))) end
  printed[#printed + 1] = table.concat(parts, "\t")
end
function Example(t, expected, fn)
  printed = {}
  fn()
  local got = table.concat(printed, "\n")
  if got ~= expected then t:Errorf("example printed %q, expected %q", got, expected) end
end

function OnMessage(subject, payload)
  local json = require("json")
  local names = {}
  for name, v in pairs(_G) do
    if type(name) == "string" and name:match("^Test") and type(v) == "function" then names[#names + 1] = name end
  end
  table.sort(names)
  local report = {}
  for _, name in ipairs(names) do
    if payload == "" or payload == name then
      local t = new_t(name)
      local ok, err = pcall(_G[name], t)
      if not ok and err ~= FATAL then t.failures[#t.failures + 1] = "error: " .. tostring(err) end
      report[name] = {failures = t.failures, skipped = t.skipped}
    end
  end
  return json.encode(report)
end
"""

# strings/test/test_api.lua and strings/example_test.go, in our words
STRINGS_TESTS = r"""
local strings = require("strings")
local inspect = require("inspect")
local assert = require("assert")
local require_ = require("require")
local s = "hello world"

function TestSplit(t)
  local parts = strings.split(s, " ")
  assert:Equal(t, 2, #parts)
  assert:Equal(t, "hello", parts[1])
  assert:Equal(t, "world", parts[2])
end

function TestHasPrefixAndSuffix(t)
  assert:True(t, strings.has_prefix(s, "hello"))
  assert:True(t, strings.has_suffix(s, "world"))
end

function TestTrim(t)
  -- trim takes a cutset: every character of it, from both ends
  assert:Equal(t, "hello ", strings.trim(s, "world"))
  assert:Equal(t, "world", strings.trim(s, "hello "))
  assert:Equal(t, "world", strings.trim_prefix(s, "hello "))
  assert:Equal(t, "hello world", strings.trim_suffix(s, "hello "))
end

function TestContains(t)
  assert:True(t, strings.contains(s, "hello "))
end

function TestReader(t)
  local text = '{"name": "reader", "n": 1}'
  local r = strings.new_reader(text)
  assert:Equal(t, text, r:read("*a"))
end

-- the originals build their messages with string.format("%s") of two tables, evaluated even
-- when the comparison holds
function TestReaderMetatable(t)
  local got = getmetatable(strings.new_reader(""))
  assert:True(t, got == strings.Reader, string.format("'%s' ~= '%s'", got, strings.Reader))
end

function TestBuilderMetatable(t)
  local got = getmetatable(strings.new_builder())
  assert:True(t, got == strings.Builder, string.format("'%s' ~= '%s'", got, strings.Builder))
end

function TestBuilder(t)
  local b = strings.new_builder()
  b:write("foo", "bar", 123)
  assert:Equal(t, "foobar123", b:string())
end

-- four subtests; the message names a global that is never set (nil) and is formatted anyway
function TestTrimSpace(t)
  for _, input in ipairs({"foo bar    ", "   foo bar", "   foo bar   ", "foo bar"}) do
    t:Run(string.format("%q", input), function(t)
      local got = strings.trim_space(input)
      assert:Equal(t, "foo bar", got, string.format([[expected "%s"; got "%s"]], expected_trimmed, got))
    end)
  end
end

function TestFields(t)
  local got = strings.fields("a b c d")
  assert:Equal(t, 4, #got)
  assert:Equal(t, {"a", "b", "c", "d"}, got)
end

function TestReaderLines(t)
  local cases = {
    {"single line\n", {"single line"}},
    {"single line", {"single line"}},
    {"foo bar\nbaz\n", {"foo bar", "baz"}},
  }
  for _, case in ipairs(cases) do
    t:Run(case[1], function(t)
      local r = strings.new_reader(case[1])
      for _, line in ipairs(case[2]) do
        require_:Equal(t, line, r:read("*l"))
      end
      assert:Nil(t, r:read("*l"))
    end)
  end
end

function TestExamples(t)
  Example(t, '{ "a", "b", "c", "d" }', function() print(inspect(strings.split("a b c d", " "))) end)
  Example(t, "true", function() print(strings.has_prefix("abcd", "a")) end)
  Example(t, "true", function() print(strings.has_suffix("abcd", "d")) end)
  Example(t, "abc", function() print(strings.trim("abcd", "d")) end)
  Example(t, "abcd", function() print(strings.trim_prefix("abcd", "d")) end)
  Example(t, "abc", function() print(strings.trim_suffix("abcd", "d")) end)
  Example(t, "true", function() print(strings.contains("abcd", "bc")) end)
end
"""

# yaml/test/test_api.lua and yaml/example_test.go, in our words
YAML_TESTS = r"""
local yaml = require("yaml")
local strings = require("strings")
local inspect = require("inspect")
local assert = require("assert")
local require_ = require("require")

function TestDecode(t)
  local result, err = yaml.decode("a:\n  b: 1\n")
  require_:NoError(t, err)
  assert:Equal(t, 1, result.a.b)
  local ok, e = pcall(yaml.decode)
  assert:False(t, ok)
  assert:Contains(t, e, "string expected, got nil")
end

function TestEncode(t)
  local text, err = yaml.encode({a = {b = 1}})
  require_:NoError(t, err)
  assert:Equal(t, "a:\n  b: 1\n", text)
end

function TestEncodeSequence(t)
  assert:Equal(t, "- foo\n- bar\n- baz\n", (yaml.encode({"foo", "bar", "baz"})))
end

function TestEncodeZeroBasedIsMapping(t)
  assert:Equal(t, "0: foo\n1: bar\n2: baz\n", (yaml.encode({[0] = "foo", [1] = "bar", [2] = "baz"})))
end

function TestEncodeMixed(t)
  assert:Equal(t, "bar:\n- 1\n- 2\n- 3.45\nfoo: bar\n", (yaml.encode({foo = "bar", bar = {1, 2, 3.45}})))
end

function TestEncodeFunction(t)
  local _, err = yaml.encode(function() end)
  assert:ErrorContains(t, err, "cannot encode values with function in them")
  local ok, e = pcall(yaml.encode)
  assert:False(t, ok)
  assert:Contains(t, e, "value expected")
end

-- a table that holds a table whose key is the first table: an error naming a nested table
function TestEncodeCycle(t)
  local t1 = {}
  local t2 = {t1 = t1}
  t1[t2] = t2
  local _, err = yaml.encode(t1)
  assert:ErrorContains(t, err, "nested table")
end

function TestEncoderToFile(t)
  local path = t:TempDir() .. "/out.yaml"
  local f = io.open(path, "w")
  assert:Nil(t, yaml.new_encoder(f):encode({foo = "bar", bar = "baz"}))
  f:close()
  local r = io.open(path, "r")
  local back, err = yaml.decode(r:read("*a"))
  r:close()
  require_:NoError(t, err)
  assert:Equal(t, {foo = "bar", bar = "baz"}, back)
end

function TestEncoderToBuilder(t)
  local b = strings.new_builder()
  assert:Nil(t, yaml.new_encoder(b):encode({abc = "def", num = 123, arr = {1, 2, 3}}))
  assert:Equal(t, "abc: def\narr:\n- 1\n- 2\n- 3\nnum: 123", strings.trim(b:string(), "\n"))
end

function TestDecoderFromFileAndReader(t)
  local path = t:TempDir() .. "/in.yaml"
  local f = io.open(path, "w")
  f:write("abc: def\nnum: 123\n")
  f:close()
  local from_file = io.open(path, "r")
  for name, source in pairs({file = from_file, reader = strings.new_reader("abc: def\nnum: 123\n")}) do
    t:Run(name, function(t)
      local value, err = yaml.new_decoder(source):decode()
      require_:NoError(t, err)
      assert:Equal(t, "def", value.abc)
      assert:Equal(t, 123, value.num)
    end)
  end
  from_file:close()
end

function TestDecoderDocuments(t)
  local d = yaml.new_decoder(strings.new_reader("abc: def\n---\nnum: 123\n"))
  local first, err1 = d:decode()
  require_:NoError(t, err1)
  assert:Equal(t, {abc = "def"}, first)
  local second, err2 = d:decode()
  require_:NoError(t, err2)
  assert:Equal(t, {num = 123}, second)
end

function TestEncoderDocuments(t)
  local b = strings.new_builder()
  local e = yaml.new_encoder(b)
  assert:Nil(t, e:encode({abc = "def"}))
  assert:Nil(t, e:encode({num = 123}))
  assert:Equal(t, "abc: def\n---\nnum: 123\n", b:string())
end

function TestExamples(t)
  Example(t, "{a = {b = 1}}", function()
    local result = yaml.decode("a:\n  b: 1\n")
    print(inspect(result, {newline = "", indent = ""}))
  end)
  Example(t, "a:\n  b: 1\n", function() print(yaml.encode({a = {b = 1}})) end)
end
"""


def lua_test_names(source: str) -> list[str]:
    import re

    return sorted(set(re.findall(r"^function (Test\w+)\(t\)", source, re.M)))


@pytest.fixture(scope="module")
def libs_server(tmp_path_factory, nats_server):
    root = tmp_path_factory.mktemp("gopher_libs")
    scripts = root / "scripts"
    scripts.mkdir()
    write_script(scripts, "strings.lua", "--* subject: libs.strings\n--* name: strings\n" + HARNESS + STRINGS_TESTS)
    write_script(scripts, "yaml.lua", "--* subject: libs.yaml\n--* name: yaml\n" + HARNESS + YAML_TESTS)
    proc = MsgscriptProcess(["-script", str(scripts), "-natsurl", nats_server.url], root)
    client = Nats(nats_server.url)
    yield client
    client.close()
    proc.stop()


def run_test(client: Nats, subject: str, name: str) -> dict:
    reply = client.request(subject, name.encode(), timeout=10)
    assert not (reply.headers or {}).get("Nats-Service-Error"), reply.headers
    return json.loads(reply.data)[name]


@pytest.mark.parametrize("name", lua_test_names(STRINGS_TESTS))
def test_gopher_lua_libs_strings(libs_server, name):
    result = run_test(libs_server, "libs.strings", name)
    assert result["failures"] == [], result
    assert not result["skipped"]


@pytest.mark.parametrize("name", lua_test_names(YAML_TESTS))
def test_gopher_lua_libs_yaml(libs_server, name):
    result = run_test(libs_server, "libs.yaml", name)
    assert result["failures"] == [], result
    assert not result["skipped"]
