-- storage's objects: every open gives a new object (nothing a call does to it outlives the call);
-- objects of one store are equal.
local M, py = ...
local state = setmetatable({}, {__mode = "k"})
local function check(self, name)
  local st = state[self]
  if st == nil then error("bad argument #1 to '" .. name .. "' (storage_ud expected, got " .. type(self) .. ")", 3) end
  return st
end
local methods = {}
for _, name in ipairs({"set", "get", "keys", "dump", "sync", "close"}) do
  local f = py[name]
  methods[name] = function(self, ...) return call(f, check(self, name), ...) end
end
-- Every open gives a new object (nothing a call does to it outlives the call); objects of one
-- store are equal.
local Storage
Storage, M.Storage = class(methods, {
  __newindex = readonly_error,
  __eq = function(a, b) return py.identity(state[a]) == py.identity(state[b]) end,
})
function M.open(path, driver)
  local store, err = call(py.open, path, driver)
  if store == nil then return nil, err end
  local obj = setmetatable({}, Storage)
  state[obj] = store
  return obj
end
return M
