"""`strings`: Go's strings package as gopher-lua-libs v0.5.0 exposes it, plus Reader and Builder."""

import re

from msgscript import check_string, opt_string, pure

from msgscript import INLINE_SIZE, PRELUDE


# Go's unicode.IsSpace set (Python's str.isspace also counts \x1c-\x1f, Go does not).
_GO_SPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
    "\u2028\u2029\u202f\u205f\u3000"
_FIELDS = re.compile("[" + re.escape(_GO_SPACE) + "]+")

# Reader and Builder live in Lua: their state never needs to cross into Python.
_LUA = PRELUDE + r"""
local M = ...
local state = setmetatable({}, {__mode = "k"})

local function check(self, kind, fname)
  local st = state[self]
  if st == nil or st.kind ~= kind then
    error(string.format("bad argument #1 to '%s' (strings.%s expected, got %s)", fname, kind, type(self)), 3)
  end
  return st
end

local function str_arg(v, i, fname)
  local t = type(v)
  if t == "string" then return v end
  if t == "number" then return tostring(v) end
  error(string.format("bad argument #%d to '%s' (string expected, got %s)", i, fname, t), 3)
end

local function read_number(st)
  local s, pos = st.s, st.pos
  local start = s:match("^%s*()", pos)
  if start > #s then st.pos = start; return 0 end
  local num = s:match("^[%+%-]?%d*%.?%d*", start)
  local exp = s:match("^[eE][%+%-]?%d+", start + #num)
  if exp then num = num .. exp end
  local value = tonumber(num)
  if value == nil then return nil end
  st.pos = start + #num
  return value
end

local function read_one(st, fmt)
  local s, pos = st.s, st.pos
  if type(fmt) == "number" then
    if fmt <= 0 then return "" end
    if pos > #s then return nil end
    local chunk = s:sub(pos, pos + math.floor(fmt) - 1)
    st.pos = pos + #chunk
    return chunk
  end
  -- the Lua 5.2+ spellings without "*" are accepted too
  local f = type(fmt) == "string" and fmt:gsub("^%*", ""):sub(1, 1) or ""
  if f == "a" then
    st.pos = #s + 1
    return s:sub(pos)
  elseif f == "l" or f == "L" then
    if pos > #s then return nil end
    local nl = s:find("\n", pos, true)
    local stop = nl or #s
    st.pos = stop + 1
    if nl and f == "l" then stop = stop - 1 end
    return s:sub(pos, stop)
  elseif f == "n" then
    return read_number(st)
  end
  error("unknown fmt string", 3)
end

local Reader, Builder
Reader, M.Reader = class({
  read = function(self, ...)
    local st = check(self, "Reader", "read")
    local n = select("#", ...)
    if n == 0 then return read_one(st, "*l") end
    local out = {}
    for i = 1, n do
      out[i] = read_one(st, (select(i, ...)))
      if out[i] == nil then return unpack(out, 1, i) end
    end
    return unpack(out, 1, n)
  end,
  close = function(self) check(self, "Reader", "close") end,
})

Builder, M.Builder = class({
  write = function(self, ...)
    local st = check(self, "Builder", "write")
    for i = 1, select("#", ...) do
      st.parts[#st.parts + 1] = str_arg((select(i, ...)), i, "write")
    end
  end,
  string = function(self)
    local st = check(self, "Builder", "string")
    local s = table.concat(st.parts)
    st.parts = {s}
    return s
  end,
  close = function(self) check(self, "Builder", "close") end,
})

function M.new_reader(s)
  local r = setmetatable({}, Reader)
  state[r] = {kind = "Reader", s = str_arg(s, 1, "new_reader"), pos = 1}
  return r
end
function M.new_builder()
  local b = setmetatable({}, Builder)
  state[b] = {kind = "Builder", parts = {}}
  return b
end
return M
"""


@pure
def split(s=None, sep=None):
    """Go strings.Split: an empty separator splits into characters."""
    s, sep = check_string(s, 1), opt_string(sep, 2, "")
    return list(s) if sep == "" else s.split(sep)


@pure
def fields(s=None):
    """Go strings.Fields: split around runs of white space."""
    return [f for f in _FIELDS.split(check_string(s, 1)) if f]


@pure
def has_prefix(s=None, prefix=None):
    """True if s starts with prefix."""
    return check_string(s, 1).startswith(check_string(prefix, 2))


@pure
def has_suffix(s=None, suffix=None):
    """True if s ends with suffix."""
    return check_string(s, 1).endswith(check_string(suffix, 2))


@pure
def contains(s=None, sub=None):
    """True if sub is within s."""
    return check_string(sub, 2) in check_string(s, 1)


@pure
def trim(s=None, cutset=None):
    """Remove any of the characters in cutset from both ends."""
    return check_string(s, 1).strip(check_string(cutset, 2))


@pure
def trim_space(s=None):
    """Remove leading and trailing white space."""
    return check_string(s, 1).strip(_GO_SPACE)


@pure
def trim_prefix(s=None, prefix=None):
    """s without the leading prefix, if present."""
    return check_string(s, 1).removeprefix(check_string(prefix, 2))


@pure
def trim_suffix(s=None, suffix=None):
    """s without the trailing suffix, if present."""
    return check_string(s, 1).removesuffix(check_string(suffix, 2))


def _load(ctx):
    def big(s) -> None:
        if isinstance(s, str) and len(s) > INLINE_SIZE:
            ctx.move_to_worker()

    @pure
    def split_(s=None, sep=None):
        big(s)
        return split(s, sep)

    @pure
    def fields_(s=None):
        big(s)
        return fields(s)

    members = {
        "split": split_, "fields": fields_, "has_prefix": has_prefix, "has_suffix": has_suffix,
        "contains": contains, "trim": trim, "trim_space": trim_space, "trim_prefix": trim_prefix,
        "trim_suffix": trim_suffix,
    }
    return ctx.lua.execute(_LUA, ctx.module(members), name="=strings")


def lua_modules():
    """Modules this plugin provides."""
    return {"strings": _load}
