"""`ioutil`: read_file/write_file/copy/copyn as gopher-lua-libs v0.5.0 exposes them."""

import os

from msgscript import check_string

# copy/copyn talk to any Lua object with :read(n) / :write(s) (io files, strings readers
# and builders, tcp connections...), so they are written in Lua.
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

local function check(v, n, method, fname)
  local t = type(v)
  local ok, m = pcall(function() return (t == "table" or t == "userdata") and v[method] end)
  if not (ok and m) then
    local what = method == "read" and "reader" or "writer"
    error("bad argument #" .. n .. " to '" .. fname .. "' (" .. what .. " expected, got " .. t .. ")", 3)
  end
end

function M.copy(writer, reader)
  check(writer, 1, "write", "copy")
  check(reader, 2, "read", "copy")
  return guarded(writer, reader, nil)
end

function M.copyn(writer, reader, n)
  check(writer, 1, "write", "copyn")
  check(reader, 2, "read", "copyn")
  if type(n) ~= "number" then error("bad argument #3 to 'copyn' (number expected, got " .. type(n) .. ")", 2) end
  return guarded(writer, reader, math.floor(n))
end
return M
"""


def os_error(op, path, exc):
    """An OSError worded like Go's *PathError: "open /x: no such file or directory"."""
    reason = exc.strerror or str(exc)
    return f"{op} {path}: {reason[:1].lower()}{reason[1:]}"


def _load(ctx):
    def read_file(path=None):
        """The whole file as a string, or nil, err (also for a file larger than the memory cap allows)."""
        path = check_string(path, 1)
        limit = ctx.max_bytes()
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size <= limit:
                    data = f.read(limit + 1)  # files in /proc report size 0: bound the read itself too
                else:
                    data = None
        except IsADirectoryError as e:
            return None, os_error("read", path, e)
        except OSError as e:
            return None, os_error("open", path, e)
        if data is None or len(data) > limit:
            return None, f"read {path}: file larger than the script's memory limit allows ({limit} bytes)"
        return data

    def write_file(path=None, data=None):
        """Write (truncating, mode 0644); nothing on success, err on failure."""
        path, data = check_string(path, 1), check_string(data, 2).encode("utf-8", "surrogateescape")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except OSError as e:
            return os_error("open", path, e)
        return None

    return ctx.lua.execute(_LUA, ctx.module({"read_file": read_file, "write_file": write_file}), name="=ioutil")


def lua_modules():
    """Modules this plugin provides."""
    return {"ioutil": _load}
