"""`ioutil`: read_file/write_file/copy/copyn as gopher-lua-libs v0.5.0 exposes them."""

import os

# copy/copyn talk to any Lua object with :read(n) / :write(s) (io files, strings readers
# and builders...), so they are written in Lua.
_LUA = """
local M = ...
local CHUNK = 32768

local function pump(writer, reader, limit)
  local left = limit
  while left == nil or left > 0 do
    local chunk, err = reader:read(left and math.min(left, CHUNK) or CHUNK)
    if chunk == nil or chunk == "" then
      if err ~= nil then return tostring(err) end
      if left ~= nil then return "EOF" end
      return nil
    end
    local ok, werr = writer:write(chunk)
    if ok == nil and werr ~= nil then return tostring(werr) end
    if left then left = left - #chunk end
  end
end

local function guarded(writer, reader, limit)
  local ok, err = pcall(pump, writer, reader, limit)
  if not ok then return tostring(err) end
  return err
end

function M.copy(writer, reader)
  return guarded(writer, reader, nil)
end

function M.copyn(writer, reader, n)
  if type(n) ~= "number" then error("bad argument #3 to copyn (number expected, got " .. type(n) .. ")", 2) end
  return guarded(writer, reader, math.floor(n))
end
return M
"""


def os_error(op, path, exc):
    """An OSError worded like Go's *PathError."""
    reason = exc.strerror or str(exc)
    return f"{op} {path}: {reason[:1].lower()}{reason[1:]}"


def _data(value):
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value).encode()
    raise TypeError(f"bad argument (string expected, got {type(value).__name__})")


def read_file(path):
    """The whole file as a string, or nil, err."""
    path = _data(path).decode("utf-8", "surrogateescape")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        return None, os_error("open", path, e)


def write_file(path, data):
    """Write (truncating, mode 0644); nothing on success, err on failure."""
    path, data = _data(path).decode("utf-8", "surrogateescape"), _data(data)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError as e:
        return os_error("open", path, e)
    return None


def _load(ctx):
    return ctx.lua.execute(_LUA, ctx.module({"read_file": read_file, "write_file": write_file}))


def lua_modules():
    """Modules this plugin provides."""
    return {"ioutil": _load}
