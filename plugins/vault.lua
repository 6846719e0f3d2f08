-- vault's client objects around the Python functions in `py`.
local py = ...
local state = setmetatable({}, {__mode = "k"})

local function check(self, name)
  local st = state[self]
  if st == nil then
    error("bad argument #1 to '" .. name .. "' (VaultKV expected, got " .. type(self) .. ")", 3)
  end
  return st
end

-- As in Go: read, list and new return two values (value, nil or nil, err), write and delete one.
local methods = {}
for _, name in ipairs({"read", "list"}) do
  local f = py[name]
  methods[name] = function(self, ...)
    local value, err = call(f, check(self, name), ...)
    return value, err
  end
end
for _, name in ipairs({"write", "delete"}) do
  local f = py[name]
  methods[name] = function(self, ...) return (call(f, check(self, name), ...)) end
end
local Client = class(methods, {__newindex = readonly_error})

local M = {}
function M.new(...)
  local st, err = call(py.new, ...)
  if st == nil then return nil, err end
  local client = setmetatable({}, Client)
  state[client] = st
  return client, nil
end
return M
