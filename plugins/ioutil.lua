-- ioutil.copy and copyn talk to any Lua object with :read(n) / :write(s) (io files, strings readers
-- and builders, tcp connections...), so they are written in Lua.
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
