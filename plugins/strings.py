"""`strings`: Go's strings package as gopher-lua-libs v0.5.0 exposes it, plus Reader and Builder."""

import re

# Go's unicode.IsSpace set (Python's str.isspace also counts \x1c-\x1f, Go does not).
_GO_SPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
    "\u2028\u2029\u202f\u205f\u3000"
_FIELDS = re.compile("[" + re.escape(_GO_SPACE) + "]+")

# Reader and Builder live in Lua: their state never needs to cross into Python.
_LUA = r"""
local M = ...
local state = setmetatable({}, {__mode = "k"})

local function check(self, kind)
  local st = state[self]
  if st == nil or st.kind ~= kind then error("strings." .. kind .. " expected", 3) end
  return st
end

local function str_arg(v, i, fname)
  local t = type(v)
  if t == "string" then return v end
  if t == "number" then return tostring(v) end
  error(string.format("bad argument #%d to %s (string expected, got %s)", i, fname, t), 3)
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
  -- Lua 5.4 spells the formats without "*"; accept both
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

local Reader = {__name = "strings.Reader"}
Reader.__index = {
  read = function(self, ...)
    local st = check(self, "Reader")
    local n = select("#", ...)
    if n == 0 then return read_one(st, "*l") end
    local out = {}
    for i = 1, n do
      out[i] = read_one(st, (select(i, ...)))
      if out[i] == nil then return table.unpack(out, 1, i) end
    end
    return table.unpack(out, 1, n)
  end,
  close = function(self) check(self, "Reader") end,
}

local Builder = {__name = "strings.Builder"}
Builder.__index = {
  write = function(self, ...)
    local st = check(self, "Builder")
    for i = 1, select("#", ...) do
      st.parts[#st.parts + 1] = str_arg((select(i, ...)), i, "write")
    end
  end,
  string = function(self)
    local st = check(self, "Builder")
    local s = table.concat(st.parts)
    st.parts = {s}
    return s
  end,
  close = function(self) check(self, "Builder") end,
}

M.Reader, M.Builder = Reader, Builder
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


def _text(value, name="argument"):
    """A Lua string argument (numbers accepted, like gopher-lua's CheckString)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise TypeError(f"bad {name} (string expected, got {type(value).__name__})")


def split(s, sep=""):
    """Go strings.Split: an empty separator splits into characters."""
    s, sep = _text(s), _text(sep)
    return list(s) if sep == "" else s.split(sep)


def fields(s):
    """Go strings.Fields: split around runs of white space."""
    return [f for f in _FIELDS.split(_text(s)) if f]


def has_prefix(s, prefix):
    """True if s starts with prefix."""
    return _text(s).startswith(_text(prefix))


def has_suffix(s, suffix):
    """True if s ends with suffix."""
    return _text(s).endswith(_text(suffix))


def contains(s, sub):
    """True if sub is within s."""
    return _text(sub) in _text(s)


def trim(s, cutset):
    """Remove any of the characters in cutset from both ends."""
    return _text(s).strip(_text(cutset))


def trim_space(s):
    """Remove leading and trailing white space."""
    return _text(s).strip(_GO_SPACE)


def trim_prefix(s, prefix):
    """s without the leading prefix, if present."""
    return _text(s).removeprefix(_text(prefix))


def trim_suffix(s, suffix):
    """s without the trailing suffix, if present."""
    return _text(s).removesuffix(_text(suffix))


def _load(ctx):
    members = {
        "split": split, "fields": fields, "has_prefix": has_prefix, "has_suffix": has_suffix,
        "contains": contains, "trim": trim, "trim_space": trim_space, "trim_prefix": trim_prefix,
        "trim_suffix": trim_suffix,
    }
    return ctx.lua.execute(_LUA, ctx.module(members))


def lua_modules():
    """Modules this plugin provides."""
    return {"strings": _load}
