-- tcp's connection objects around the Python functions in `py`.
local py = ...
local state = setmetatable({}, {__mode = "k"})
local FIELDS = {dialTimeout = true, writeTimeout = true, readTimeout = true, closeTimeout = true}

local function check(self, name)
  local st = state[self]
  if st == nil then
    error("bad argument #1 to '" .. name .. "' (tcp connection expected, got " .. type(self) .. ")", 3)
  end
  return st
end

local methods = {}
function methods.write(self, ...) call(py.write, check(self, "write"), ...) end
function methods.read(self, ...)
  local st = check(self, "read")
  if select("#", ...) == 0 then return call(py.read, st, 1024) end
  return call(py.read, st, (...))
end
function methods.close(self) call(py.close, check(self, "close")) end

local Conn = class(methods, {
  __index = function(self, k)
    if FIELDS[k] then return py.__index(check(self, "__index"), k) end
    return methods[k]
  end,
  __newindex = function(self, k, v)
    if FIELDS[k] then call(py.__newindex, check(self, "__newindex"), k, v) end  -- other keys are ignored, as in Go
  end,
})

return function(addr, timeout)
  local st, err = call(py.open, addr, timeout)
  if st == nil then return nil, err end
  local conn = setmetatable({}, Conn)
  state[conn] = st
  return conn
end
