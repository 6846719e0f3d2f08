-- The kv module's Lua side: bucket objects around the Python functions of plugins/kv.py.
local py = ...
local state = setmetatable({}, {__mode = "k"})

local function check(self, name)
  local st = state[self]
  if st == nil then
    error("bad argument #1 to '" .. name .. "' (kv bucket expected, got " .. type(self) .. ")", 3)
  end
  return st
end

local methods = {}
for _, name in ipairs({"get", "put", "create", "update", "keys"}) do
  local f = py[name]
  methods[name] = function(self, ...) return call(f, check(self, name), ...) end
end
-- delete answers like etcd.delete: nil, or err
methods.delete = function(self, ...) return (call(py.delete, check(self, "delete"), ...)) end
local Bucket = class(methods, {__newindex = readonly_error})

local M = {}
function M.bucket(...)
  local st, err = call(py.bucket, ...)
  if st == nil then return nil, err end
  local bucket = setmetatable({}, Bucket)
  state[bucket] = st
  return bucket
end
return M
