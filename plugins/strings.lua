-- strings' Reader and Builder live in Lua: their state never needs to cross into Python.
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
