"""plugins/_patterns.lua: Lua 5.1's string.find/match/gmatch/gsub in Lua, compared with the C ones.

Every comparison runs the same call with the real string library and with the Lua version in one
plain lupa.lua51 runtime (no sandbox) and wants the same values, or the same error message.
"""

from __future__ import annotations

import time
from pathlib import Path

import lupa.lua51 as lupa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SOURCE = (Path(__file__).resolve().parent.parent / "plugins" / "_patterns.lua").read_bytes()

# The comparison harness: `...` is the Lua version's table.
HARNESS = rb"""
local P = ...
local S = string
local function pack(...) return {n = select("#", ...), ...} end

-- All that a call gives: {pcall's results} for find/match/gsub; for gmatch the results of
-- pcall(gmatch) and then of each pcall(iterator) until it gives nothing or fails.
local function run(lib, kind, args)
  if kind ~= "gmatch" then return {pack(pcall(lib[kind], unpack(args, 1, args.n)))} end
  local r = pack(pcall(lib.gmatch, unpack(args, 1, args.n)))
  if not r[1] then return {r} end
  local it, out = r[2], {}
  for _ = 1, 100 do
    local v = pack(pcall(it))
    out[#out + 1] = v
    if not v[1] or v.n == 1 then break end
  end
  return out
end

local function same(x, y)
  if #x ~= #y then return false end
  for i = 1, #x do
    local a, b = x[i], y[i]
    if a.n ~= b.n then return false end
    for j = 1, a.n do
      if type(a[j]) ~= type(b[j]) or a[j] ~= b[j] then return false end
    end
  end
  return true
end

local function show(v)
  if type(v) == "string" then return S.format("%q", v) end
  return tostring(v)
end

local function describe(kind, args, x, y)
  local a = {}
  for i = 1, args.n do a[i] = show(args[i]) end
  local function calls(t)
    local r = {}
    for i = 1, #t do
      local v = {}
      for j = 1, t[i].n do v[j] = show(t[i][j]) end
      r[i] = "(" .. table.concat(v, ", ") .. ")"
    end
    return table.concat(r, " ")
  end
  return kind .. "(" .. table.concat(a, ", ") .. "): C " .. calls(x) .. " Lua " .. calls(y)
end

local H = {}

-- nil when both agree, else a description
function H.compare(kind, args)
  local x, y = run(S, kind, args), run(P, kind, args)
  if same(x, y) then return nil end
  return describe(kind, args, x, y)
end

local REPL_TABLE = {a = "X", b = false, ["("] = 7, ["1"] = {}, [1] = "P1", [2] = true, ab = "Y"}
local REPL_FUNCS = {
  function(...) return select("#", ...) .. ":" .. table.concat({...}, ",") end,
  function(c) if c == "a" then return false end if c == "b" then return {} end return c end,
  function() return nil end,
  function(c) return c == "0" and 1.5 or "<" end,
}
function H.compare_gsub(s, p, rk, rs, has_n, n)
  local repl = rs
  if rk == 1 then repl = REPL_TABLE elseif rk >= 2 then repl = REPL_FUNCS[rk - 1] end
  if has_n then return H.compare("gsub", pack(s, p, repl, n)) end
  return H.compare("gsub", pack(s, p, repl))
end

-- The hand-written cases: {failures}, {every error message of the C functions}
function H.check_cases(cases)
  local failures, errors = {}, {}
  for _, c in ipairs(cases) do
    local msg = H.compare(c.kind, c.args)
    if msg then failures[#failures + 1] = msg end
    for _, r in ipairs(run(S, c.kind, c.args)) do
      if r[1] == false then errors[#errors + 1] = tostring(r[2]) end
    end
  end
  return failures, errors
end

-- The same call written on line 2 of a chunk ("=case"), to compare the position prefix and the
-- function name of error messages.
function H.at_line(kind, form, args)
  local line
  if form == "field" then
    line = "local r = lib." .. kind .. "(unpack(args, 1, args.n))"
  elseif form == "method" then  -- the first argument is the object
    line = "local o = {" .. kind .. " = lib." .. kind .. "} local r = o:" .. kind .. "(unpack(args, 1, args.n))"
  elseif form == "local" then
    line = "local " .. kind .. "_alias = lib." .. kind .. " local r = " .. kind .. "_alias(unpack(args, 1, args.n))"
  elseif form == "for" then
    line = "for a in lib.gmatch(unpack(args, 1, args.n)) do end"
  end
  local src = "local lib, args = ...\n" .. line .. "\nreturn true"
  local f = assert(loadstring(src, "=case"))
  local _, c = pcall(f, S, args)
  local _, l = pcall(f, P, args)
  return tostring(c), tostring(l)
end

function H.string_method(code)  -- `code` run with strings' methods from C, then from Lua
  local f = assert(loadstring(code, "=case"))
  local mt = getmetatable("")
  local _, c = pcall(f)
  mt.__index = P
  local _, l = pcall(f)
  mt.__index = S
  return tostring(c), tostring(l)
end

H.pack = pack
return H
"""

# Hand-written cases, each `C(kind, args...)`.
CASES = rb"""
local cases = {}
local ERR = {}
local function C(kind, ...) cases[#cases + 1] = {kind = kind, args = {n = select("#", ...), ...}} end
local all = {}
for c = 0, 255 do all[#all + 1] = string.char(c) end
all = table.concat(all)

-- character classes, against every byte
for _, cl in ipairs({"a", "c", "d", "l", "p", "s", "u", "w", "x", "z"}) do
  for _, k in ipairs({cl, cl:upper()}) do
    C("gsub", all, "%" .. k, "")
    C("gsub", all, "[%" .. k .. "]", "")
    C("gsub", all, "[^%" .. k .. "]", "")
    C("find", all, "%" .. k .. "+")
    C("match", all, "(%" .. k .. "*)$")
  end
end
C("gsub", all, ".", "x")
C("gsub", all, "[a-fP-T]", "")
C("gsub", all, "[^a-z]", "")
C("gsub", all, "[%a_][%w_]*", "<%0>")
C("gsub", all, "%%", "!")
C("gsub", all, "%]", "!")
C("gsub", all, "%.", "!")
C("find", "a\0b", "%z")
C("find", "a\0b", "[%z]")
C("find", "a\0b", "%Z+")
C("match", "hello\0world", ".+")

-- sets
C("match", "x]y", "[]]")
C("match", "x]y", "[^]]+")
C("match", "a-b", "[a-]+")
C("match", "a-b", "[-a]+")
C("match", "z-a", "[z-a]")
C("match", "]%", "[%]%%]+")
C("match", "abc^", "[%^b]+")
C("match", "^abc", "[^^]+")
C("match", "a.b", "[.]")
C("match", "a1b2", "[%d]")
C("match", "ab12", "[%a%d]+")
C("match", "abc", "[a-c-]+")
C("match", "a-c", "[a%-c]+")
C("match", "[x]", "%[(.)%]")

-- anchors
C("find", "abc", "^b")
C("find", "abc", "^a")
C("match", "abc", "^(a)")
C("gsub", "aaa", "^a", "b")
C("gsub", "aaa", "^", "b")
C("find", "a^b", "a^b")
C("find", "abc", "c$")
C("find", "abc", "b$")
C("find", "a$b", "a$b")
C("find", "abc", "^abc$")
C("find", "", "^$")
C("match", "abc", "$")
C("gsub", "abc", "$", "!")
C("gsub", "abc", "^$", "!")
C("gmatch", "^a^a", "^a")
C("gmatch", "aaa", "^a")
C("gmatch", "abc", "$")

-- quantifiers and backtracking
C("match", "aaab", "a*")
C("match", "aaab", "a+")
C("match", "aaab", "a-b")
C("match", "aaab", "a-")
C("match", "aaab", "a?a?b")
C("match", "b", "a?b")
C("match", "aaab", "a+b")
C("match", "xyz", "a*")
C("match", "xyz", "a+")
C("match", "<a><b>", "<(.-)>")
C("match", "<a><b>", "<(.*)>")
C("match", "one two  three", "(%S+)%s+(%S+)$")
C("find", string.rep("a", 20), string.rep("a-", 5) .. "b")
C("find", string.rep("a", 20), string.rep("a*", 5) .. "$")
C("match", "aaa", "a-$")
C("match", "[[x]]", "%[(=*)%[(.-)%]%1%]")
C("find", "*?+-", "*")
C("find", "a*", "a%*")
C("match", "x+-?", "[+-?]+")

-- captures
C("find", "hello world", "(o)(.)(w)")
C("match", "hello", "()ll()")
C("find", "hello", "()")
C("match", "hello", "()")
C("match", "hello", "(h)(e)(l)(l)(o)")
C("match", "hello", "((h)(e))")
C("match", "key = value", "(%w+)%s*=%s*(%w+)")
C("match", "abcabc", "(abc)%1")
C("match", "abcabd", "(abc)%1")
C("match", "xyyx", "(x)(y)%2%1")
C("match", "aa", "(a*)%1")
C("match", "abab", "()(a)%2")
C("match", "a", "()%1")
C("match", "aaa", "(a)%1*")
C("gsub", "hello world", "(o)", "[%1]")
C("gmatch", "a=1, b=2, c=3", "(%w+)=(%w+)")
C("gmatch", "abc", "()")
C("gmatch", "abc", "(a)()")
C("match", string.rep("a", 32), string.rep("(a)", 32))

-- %b and %f
C("match", "f(a(b)c)d", "%b()")
C("match", "f(a(b)c", "%b()")
C("match", "((x)", "%b()")
C("match", "[[x]]", "%b[]")
C("match", "aXbXc", "%bXX")
C("gsub", "a(b)c(d(e))", "%b()", "")
C("match", "abab", "%bab+")
C("find", "THE (quick) fox", "%f[%a]%a+")
C("find", "THE (quick) fox", "%f[%a]%a+", 5)
C("gsub", "THE (quick) fox", "%f[%a]", "|")
C("gsub", "THE (quick) fox", "%f[%A]", "|")
C("gsub", "hello", "%f[%z]", "|")
C("gsub", "hello", "%f[%Z]", "|")
C("find", "a\0b", "%f[%z]")
C("find", "", "%f[%z]")
C("find", "", "%f[%Z]")
C("gsub", "the cat in the hat", "%f[%w]%w+", string.upper)

-- find: init, plain, the plain path
for _, init in ipairs({1, 2, 3, 4, 5, 6, 0, -1, -2, -3, -4, -10, 2.7, -1.5, "2", " 3 ", "0x2",
                        1e300, -1e300, 0 / 0, 1 / 0, -1 / 0, 2 ^ 53, 2 ^ 63, -2 ^ 63}) do
  C("find", "abcab", "b", init)
  C("find", "abcab", "b()", init)
  C("find", "abcab", "", init)
  C("match", "abcab", ".", init)
  C("match", "abcab", "^.", init)
  C("gmatch", "abcab", "b")
end
C("find", "abc", "b", nil)
C("find", "abc", "b", nil, true)
C("find", "a.b", ".", 1, true)
C("find", "a.b", ".", 1, false)
C("find", "a.b", ".", 1, 0)
C("find", "a.b", ".", 1, "")
C("find", "a(b", "(", 1, true)
C("find", "a%b", "%", 1, true)
C("find", "a[b", "[", 1, 1)
C("find", "abc", "", 10)
C("find", "abc", "", 4)
C("find", "abc", "", 3)
C("find", "", "")
C("find", "", "a")
C("find", "aaa", "aa", 2)
C("find", "abcabc", "cab")
C("find", "abcabc", "cac")
C("find", "abc", "abcd")
C("find", "a\0b\0c", "\0c")
C("find", "a\0b\0c", "b\0")
C("find", "a.b", "\0.")
C("find", "x.b", "x\0.", 1)
C("match", "abc", "b\0zzz")
C("gsub", "abc", "b\0", "!")
C("gmatch", "abab", "b\0a")
C("find", "hello world", "o w")
C("find", "hello world", "o w", -5)
C("find", "hello world", "l", -3, true)

-- numbers for strings
C("find", 12345, 3)
C("find", 1.5, ".")
C("match", 1e100, "%d+")
C("match", 2 ^ 53, "%d+")
C("match", -0.0, ".*")
C("match", "1e+100", 1e100)
C("gsub", 12345, "%d", {["1"] = "one", ["5"] = 5})
C("gsub", "abc", "b", 42)
C("gsub", "a2c", 2, "two")
C("gmatch", 123, "%d")
C("gsub", "abc", "%w", 1.25)

-- gsub replacements
C("gsub", "hello world", "o", "0")
C("gsub", "hello world", "(o)", "%1%1")
C("gsub", "hello world", "o", "%0%0")
C("gsub", "hello world", "o", "%1")
C("gsub", "hello world", "(o)", "%2")
C("gsub", "hello world", "()o", "%1")
C("gsub", "hello", "l", "%%")
C("gsub", "hello", "l", "%x")
C("gsub", "hello", "l", "%")
C("gsub", "hello", "l", "a%")
C("gsub", "hello", "l", "%a%")
C("gsub", "hello", "(l)(l)", "%2%1%0%%%9")
C("gsub", "hello", "(l)(l)", "%3")
C("gsub", "hello", "", "-")
C("gsub", "abc", "%w*", "x")
C("gsub", "abc", "%w-", "x")
C("gsub", "abc d", "%w*", "<%0>")
C("gsub", "", "", "x")
C("gsub", "", "x*", "y")
C("gsub", "abc", "b*", "-")
C("gsub", "hello", ".", {h = "H", e = false, l = 1, o = "O"})
C("gsub", "hello", "(.)(.)", {he = "!", h = "?"})
C("gsub", "hello", "()", {[1] = "one", [3] = "three"})
C("gsub", "hello", "l", {l = {}})
C("gsub", "hello", "l", {l = true})
C("gsub", "hello", "l", setmetatable({}, {__index = function(_, k) return k:upper() end}))
C("gsub", "hello", "(l)", function(c) return c:upper() end)
C("gsub", "hello", "(l)()", function(c, p) return p end)
C("gsub", "hello", "l", function() return nil end)
C("gsub", "hello", "l", function() return false end)
C("gsub", "hello", "l", function() return 1, 2 end)
C("gsub", "hello", "l", function() return print end)
C("gsub", "hello", "l", function() return coroutine.create(function() end) end)
C("gsub", "hello", "l", function() error("from the replacement") end)
C("gsub", "hello", "l", function() error(ERR) end)
C("gsub", "hello", "x*", function(m) return "[" .. m .. "]" end)
C("gsub", "hello world", "%w+", "%0 %0", 1)
for _, n in ipairs({0, -1, 1, 2, 3, 2.5, -2.5, "2", 2 ^ 32, 2 ^ 32 + 1, 2 ^ 31, 1e300, 0 / 0, 1 / 0}) do
  C("gsub", "hello world", "o", "0", n)
  C("gsub", "abc", "", "-", n)
end
C("gsub", "abc", "%", "x", 0)
C("gsub", "abc", "(", "x", 0)
C("gsub", "abc", "x", "y", nil)

-- errors in patterns
C("find", "abc", "%")
C("find", "abc", "a%")
C("match", "abc", "[a")
C("match", "abc", "[")
C("match", "abc", "[^")
C("match", "abc", "[%")
C("match", "abc", "[%]")
C("match", "abc", "[]")
C("match", "abc", "[^]")
C("match", "", "x[")
C("find", "abc", "%1")
C("find", "abc", "(a)%2")
C("find", "abc", "(a%1)")
C("find", "abc", "%0")
C("find", "abc", "x%1")
C("find", "abc", ")")
C("match", "abc", ")")
C("match", "abc", "a)")
C("match", "abc", "x)")
C("find", "abc", ".)")
C("find", "abc", "(a")
C("match", "abc", "(a")
C("match", "abc", "a(")
C("gmatch", "abc", "(a")
C("gsub", "abc", "(a", "x")
C("gsub", "abc", "(a", "%1")
C("find", "abc", "%f")
C("find", "abc", "%fa")
C("find", "abc", "%f[a")
C("find", "abc", "%b")
C("find", "abc", "%ba")
C("find", "abc", "a%bx")
C("find", "abc", "x%b")
C("match", string.rep("a", 40), string.rep("(a)", 33))
C("match", "b", string.rep("(a)", 33))
C("find", "abc", "%")
C("gmatch", "abc", "%")
C("gmatch", "", "%")
C("gsub", "abc", "[", "")
C("gsub", "abc", "%g", "")

-- errors in arguments
C("find")
C("find", "a")
C("find", "a", nil)
C("find", {}, "a")
C("find", "a", {})
C("find", "a", "a", "x")
C("find", "a", "a", {})
C("find", "a", "a", true)
C("find", nil, nil)
C("match", "a")
C("match", true, "a")
C("match", "a", "a", "1x")
C("gmatch")
C("gmatch", "a")
C("gmatch", print, "a")
C("gsub", "a", "a")
C("gsub", "a", "a", nil)
C("gsub", "a", "a", true)
C("gsub", "a", "a", "b", "x")
C("gsub", "a", "a", "b", {})
C("gsub", "a", "a", nil, "x")
C("gsub", {}, "a", "b")
C("gsub", "a", nil, "b")
return cases
"""

EXPECTED_ERRORS = [
    "malformed pattern (ends with '%')",
    "malformed pattern (missing ']')",
    "invalid capture index",
    "invalid pattern capture",
    "unfinished capture",
    "missing '[' after '%f' in pattern",
    "unbalanced pattern",
    "too many captures",
    "invalid replacement value (a table)",
    "invalid replacement value (a boolean)",
    "invalid replacement value (a function)",
    "invalid replacement value (a thread)",
    "bad argument #1 to '?' (string expected, got no value)",
    "bad argument #2 to '?' (string expected, got no value)",
    "bad argument #2 to '?' (string expected, got nil)",
    "bad argument #1 to '?' (string expected, got table)",
    "bad argument #3 to '?' (number expected, got string)",
    "bad argument #3 to '?' (number expected, got boolean)",
    "bad argument #1 to '?' (string expected, got function)",
    "bad argument #3 to '?' (string/function/table expected)",
    "bad argument #4 to '?' (number expected, got string)",
    "from the replacement",
]


@pytest.fixture(scope="module")
def lua():
    runtime = lupa.LuaRuntime(encoding=None)
    patterns = runtime.execute(SOURCE)
    harness = runtime.execute(HARNESS, patterns)
    return runtime, patterns, harness


def test_returns_the_four_functions(lua):
    runtime, patterns, _ = lua
    assert sorted(k.decode() for k in patterns) == ["find", "gmatch", "gsub", "match"]
    assert all(runtime.eval("type")(f) == b"function" for f in patterns.values())


def test_hand_written_cases(lua):
    runtime, _, harness = lua
    failures, errors = harness.check_cases(runtime.execute(CASES))
    assert list(failures.values()) == []
    messages = [e.decode() for e in errors.values()]
    missing = [m for m in EXPECTED_ERRORS if not any(m in e for e in messages)]
    assert missing == []


@pytest.mark.parametrize(
    "kind, form, args",
    [
        ("find", "field", "'abc', '%'"),
        ("find", "field", "{}, 'a'"),
        ("find", "field", "'a'"),
        ("find", "field", "'a', 'a', 'x'"),
        ("find", "method", "'a'"),
        ("find", "method", "'a', {}"),
        ("find", "local", "{}"),
        ("match", "field", "'abc', '(a'"),
        ("match", "field", "'abc', '[a'"),
        ("match", "method", "'abc', '%f'"),
        ("gsub", "field", "'abc', 'b', true"),
        ("gsub", "field", "'abc', 'b', 'x', 'y'"),
        ("gsub", "field", "'abc', '(b)', '%2'"),
        ("gsub", "field", "'abc', 'b', {b = {}}"),
        ("gsub", "field", "'abc', 'b', function() return {} end"),
        ("gsub", "method", "'abc', 'b'"),
        ("gsub", "local", "'abc', 'b', {b = true}"),
        ("gmatch", "field", "nil, 'b'"),
        ("gmatch", "for", "'abc', '(b'"),
        ("gmatch", "for", "'abc', '%b'"),
        ("gmatch", "for", "'abc', 'b%1'"),
    ],
)
def test_error_position_and_name(lua, kind, form, args):
    """Called from a line of a script, the messages are the C ones, position prefix and all."""
    runtime, _, harness = lua
    c, mine = harness.at_line(kind.encode(), form.encode(), runtime.eval(f"{{n = select('#', {args}), {args}}}"))
    assert c.startswith(b"case:2:")
    assert mine == c


@pytest.mark.parametrize(
    "code",
    [
        b"local s = 'abc' local r = s:find({})",
        b"local s = 'abc' local r = s:find('(')",
        b"local s = 'abc' local r = s:gsub('b', true)",
        b"local s = 'abc' for x in s:gmatch('%') do end",
        b"local s = 'abc' local r = s:match('b', 'x')",
    ],
)
def test_string_methods(lua, code):
    _, _, harness = lua
    c, mine = harness.string_method(code)
    assert c.startswith(b"case:1:")
    assert mine == c


def test_wrapper_frames_argument(lua):
    """Loaded with 1, the functions report errors at the caller of a (non-tail-calling) wrapper."""
    runtime, _, _ = lua
    wrapped = runtime.execute(SOURCE, 1)
    code = rb"""
local P = ...
local function pack(...) return {n = select("#", ...), ...} end
local lib = {}
for _, name in ipairs({"find", "match", "gsub", "gmatch"}) do
  local f = P[name]
  lib[name] = function(...) local r = pack(f(...)) return unpack(r, 1, r.n) end
end
local results = {}
for _, src in ipairs({"local r = lib.find('abc', '[')", "local r = lib.gsub('abc', 'b', true)",
                      "local r = lib.match({}, 'b')", "local o = {find = lib.find} local r = o:find({})"}) do
  local f = assert(loadstring("local lib = ...\n" .. src, "=case"))
  local _, err = pcall(f, lib)
  results[#results + 1] = err
end
return results
"""
    results = list(runtime.execute(code, wrapped).values())
    assert results == [
        b"case:2: malformed pattern (missing ']')",
        b"case:2: bad argument #3 to 'gsub' (string/function/table expected)",
        b"case:2: bad argument #1 to 'match' (string expected, got table)",
        b"case:2: calling 'find' on bad self (string expected, got table)",
    ]


def test_depth_limit(lua):
    """The one deliberate difference: Lua 5.2's MAXCCALLS. C 5.1 recurses as deep as the pattern."""
    runtime, patterns, _ = lua
    code = rb"""
local P = ...
local s, p = string.rep("a", 300), string.rep("a?", 300)
local c = {pcall(string.find, s, p)}
local l = {pcall(P.find, s, p)}
local ok = {pcall(P.find, s, string.rep("a?", 199))}
return c[1], c[2], c[3], l[1], l[2], ok[1], ok[3]
"""
    assert runtime.execute(code, patterns) == (True, 1, 300, False, b"pattern too complex", True, 199)


###############################################################################
# Random patterns ############################################################
###############################################################################

TOKENS = [*"ab%().[]^$*+-?01"] * 3 + [
    "%a", "%d", "%s", "%w", "%A", "%S", "%z", "%p", "%b()", "%bab", "%f[a]", "%f[%s]", "%f[^a]",
    "%1", "%2", "%0", "[a-b]", "[^a]", "[%a]", "[]]", "[^%d(]", "[a-]", "(a)", "()", ".-", "a*",
    "%%", "%.", "\0",
]  # fmt: skip
patterns = st.lists(st.sampled_from(TOKENS), max_size=8).map("".join).filter(lambda p: len(p) <= 12).map(str.encode)
subjects = st.text(alphabet="aab()01 ^$%.-\0", max_size=12).map(str.encode)
repls = st.text(alphabet="ab%0129x", max_size=5).map(str.encode)


@settings(max_examples=1500, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["find", "match", "gmatch"]),
    s=subjects,
    p=patterns,
    init=st.one_of(st.none(), st.integers(-14, 14)),
    plain=st.sampled_from([None, False, True]),
)
def test_random_find_match_gmatch(lua, kind, s, p, init, plain):
    _, _, harness = lua
    if kind == "find":
        args = harness.pack(s, p, init, plain)
    elif kind == "match":
        args = harness.pack(s, p, init)
    else:
        args = harness.pack(s, p)
    assert harness.compare(kind.encode(), args) is None


@settings(max_examples=1500, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    s=subjects,
    p=patterns,
    repl_kind=st.sampled_from([0, 0, 0, 1, 2, 3, 4, 5]),
    repl=repls,
    n=st.one_of(st.none(), st.integers(-1, 4)),
)
def test_random_gsub(lua, s, p, repl_kind, repl, n):
    _, _, harness = lua
    assert harness.compare_gsub(s, p, repl_kind, repl, n is not None, n) is None


###############################################################################
# Interruptible ##############################################################
###############################################################################


@pytest.mark.parametrize(
    "call",
    [
        b'P.find(string.rep("a", 60), string.rep("a-", 12) .. "b")',
        b'P.match(string.rep("a", 60), string.rep("a*", 12) .. "b")',
        b'P.gsub(string.rep("a", 60), string.rep("(a-)", 12) .. "b", "")',
        b'P.gmatch(string.rep("a", 60), string.rep("a-", 12) .. "b")()',
        b'P.find(string.rep("a", 1e5), "a*b")',
        b'P.find(string.rep("(", 1e5), "%b()")',
        b'P.find(string.rep("a", 1e6), string.rep("a", 1e4) .. "ba", 1, true)',
    ],
)
def test_the_hook_stops_it(call):
    """A count hook fires inside the Lua matcher, so a deadline hook stops a pathological match."""
    runtime = lupa.LuaRuntime(encoding=None)
    patterns = runtime.execute(SOURCE)
    code = (
        b"""
local P = ...
debug.sethook(function() error("stop") end, "", 100000)
local ok, err = pcall(function() return %s end)
debug.sethook()
return ok, err
"""
        % call
    )
    start = time.monotonic()
    ok, err = runtime.execute(code, patterns)
    assert time.monotonic() - start < 1
    assert ok is False
    assert err.endswith(b"stop")


def test_a_hook_error_passes_unchanged():
    runtime = lupa.LuaRuntime(encoding=None)
    patterns = runtime.execute(SOURCE)
    code = b"""
local P = ...
local STOP = {}
debug.sethook(function() error(STOP) end, "", 1000)
local ok, err = pcall(P.find, string.rep("a", 60), string.rep("a-", 12) .. "b")
debug.sethook()
return ok, rawequal(err, STOP)
"""
    assert runtime.execute(code, patterns) == (False, True)
