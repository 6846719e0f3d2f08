-- log's logger objects around the Python functions in `py`.
local M, py = ...
local state = setmetatable({}, {__mode = "k"})
local getinfo = debug.getinfo

local function check(self, fname)
  local st = state[self]
  if st == nil then error("bad argument #1 to '" .. fname .. "' (logger_ud expected, got " .. type(self) .. ")", 3) end
  return st
end

-- "chunk:line:" of the script line that called the logger method (gopher-lua's L.Where(1))
local function where()
  local info = getinfo(3, "Sl")
  if info and info.currentline and info.currentline > 0 then
    return info.short_src .. ":" .. info.currentline .. ":"
  end
  return ""
end

local Logger
Logger, M.Logger = class({
  print = function(self, ...) call(py.print, check(self, "print"), where(), ...) end,
  println = function(self, ...) call(py.println, check(self, "println"), where(), ...) end,
  printf = function(self, fmt, ...) call(py.printf, check(self, "printf"), where(), fmt, ...) end,
  set_prefix = function(self, prefix) call(py.set_prefix, check(self, "set_prefix"), prefix) end,
  set_flags = function(self, flags) call(py.set_flags, check(self, "set_flags"), flags) end,
  set_output = function(self, output) return call(py.set_output, check(self, "set_output"), output) end,
  close = function(self) return call(py.close, check(self, "close")) end,
}, {__newindex = readonly_error})  -- loglevel's loggers are shared by every call: not to be changed

function M.new(...)
  local st = call(py.new, ...)
  local logger = setmetatable({}, Logger)
  state[logger] = st
  return logger
end
return M
