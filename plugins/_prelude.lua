-- Helpers for a module's Lua code, put before it by LuaContext.execute_file (and PRELUDE).
-- A module is loaded once per Lua runtime and each call gets a shallow copy of its table, so a table
-- *inside* a module (an object's metatable, a table of constants) is shared by every call of the
-- script. These helpers keep such tables out of a script's reach, so that nothing one call changes
-- outlives it, and make errors from Python functions point at the script's line.
local function readonly_error() error("attempt to change a read-only table of a module", 2) end

-- A view of `t` that scripts can read but not change.
local function readonly(t)
  return setmetatable({}, {__index = t, __newindex = readonly_error, __metatable = false})
end

-- The metatable for a module's objects, and what getmetatable(obj) gives scripts (the module
-- field they compare with): a read-only view, so the methods cannot be swapped.
local function class(methods, fields)
  local public = readonly({__index = readonly(methods)})
  local mt = {__index = methods, __metatable = public}
  for k, v in pairs(fields or {}) do mt[k] = v end
  return mt, public
end

-- Calls a Python function so that its errors point at the script's line, not at this module's.
local function call(f, ...)
  local r = {pcall(f, ...)}
  if not r[1] then error(r[2], 3) end
  return unpack(r, 2, table.maxn(r))
end
