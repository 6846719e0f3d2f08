local inspect = {_VERSION = "inspect.lua 3.1.0 (msgscript)"}

-- KEY and METATABLE (and the module's metatable) are shared by every call: kept unchangeable
local function marker(name)
  local function change() error("attempt to change " .. name, 2) end
  return setmetatable({}, {__tostring = function() return name end, __newindex = change, __metatable = false})
end
inspect.KEY = marker("inspect.KEY")
inspect.METATABLE = marker("inspect.METATABLE")

-- string escapes ---------------------------------------------------------------
local named = {["\a"] = "\\a", ["\b"] = "\\b", ["\f"] = "\\f", ["\n"] = "\\n",
               ["\r"] = "\\r", ["\t"] = "\\t", ["\v"] = "\\v"}

local function control(c, padded)
  local b = c:byte()
  if b >= 32 then return nil end
  if named[c] then return named[c] end
  return padded and string.format("\\%03d", b) or "\\" .. b
end

local function quote(s)
  s = s:gsub("\\", "\\\\")
  -- before a digit a numeric escape needs all three digits to stay unambiguous
  s = s:gsub("(%c)%f[0-9]", function(c) return control(c, true) end)
  s = s:gsub("%c", function(c) return control(c, false) end)
  if s:find('"', 1, true) and not s:find("'", 1, true) then return "'" .. s .. "'" end
  return '"' .. s:gsub('"', '\\"') .. '"'
end

-- key ordering -------------------------------------------------------------------
local type_rank = {number = 1, boolean = 2, string = 3, table = 4, ["function"] = 5, userdata = 6, thread = 7}

local function key_before(a, b)
  local ta, tb = type(a), type(b)
  if ta == tb and (ta == "string" or ta == "number") then return a < b end
  local ra, rb = type_rank[ta], type_rank[tb]
  if ra and rb then return ra < rb end
  if ra or rb then return ra ~= nil end
  return ta < tb
end

local function sequence_length(t)
  local n = 0
  while rawget(t, n + 1) ~= nil do n = n + 1 end
  return n
end

local function other_keys(t, seq_len)
  local keys = {}
  for k in next, t do
    local in_sequence = type(k) == "number" and k >= 1 and k <= seq_len and math.floor(k) == k
    if not in_sequence then keys[#keys + 1] = k end
  end
  table.sort(keys, key_before)
  return keys
end

-- the process option ---------------------------------------------------------------
local function extend(path, ...)
  local out = {unpack(path)}
  for i = 1, select("#", ...) do out[#out + 1] = (select(i, ...)) end
  return out
end

local function process_all(process, item, path, seen)
  if item == nil then return nil end
  if seen[item] ~= nil then return seen[item] end
  local result = process(item, path)
  if type(result) ~= "table" then return result end
  local copy = {}
  seen[item] = copy
  for k, v in next, result do
    local new_key = process_all(process, k, extend(path, k, inspect.KEY), seen)
    if new_key ~= nil then
      copy[new_key] = process_all(process, v, extend(path, new_key), seen)
    end
  end
  local mt = process_all(process, getmetatable(result), extend(path, inspect.METATABLE), seen)
  if type(mt) == "table" then setmetatable(copy, mt) end
  return copy
end

-- rendering ------------------------------------------------------------------------
local function count_tables(v, counts)
  if type(v) ~= "table" then return end
  counts[v] = (counts[v] or 0) + 1
  if counts[v] > 1 then return end
  for k, x in next, v do
    count_tables(k, counts)
    count_tables(x, counts)
  end
  count_tables(getmetatable(v), counts)
end

local function render(root, depth, newline, indent)
  local out, counts, ids, last_id = {}, {}, {}, {}
  count_tables(root, counts)

  local function id_of(v)
    if ids[v] == nil then
      local t = type(v)
      last_id[t] = (last_id[t] or 0) + 1
      ids[v] = last_id[t]
    end
    return tostring(ids[v])
  end

  local value

  local function line(level)
    out[#out + 1] = newline .. string.rep(indent, level)
  end

  local function key(k, level)
    if type(k) == "string" and k:match("^[_%a][_%a%d]*$") then
      out[#out + 1] = k
    else
      out[#out + 1] = "["
      value(k, level)
      out[#out + 1] = "]"
    end
  end

  local function table_body(t, level)
    if counts[t] > 1 then out[#out + 1] = "<" .. id_of(t) .. ">" end
    local seq_len = sequence_length(t)
    local keys = other_keys(t, seq_len)
    local mt = getmetatable(t)
    out[#out + 1] = "{"
    local items = 0
    for i = 1, seq_len do
      out[#out + 1] = (items > 0 and ", " or " ")
      value(rawget(t, i), level + 1)
      items = items + 1
    end
    for _, k in ipairs(keys) do
      if items > 0 then out[#out + 1] = "," end
      line(level + 1)
      key(k, level + 1)
      out[#out + 1] = " = "
      value(rawget(t, k), level + 1)
      items = items + 1
    end
    if type(mt) == "table" then
      if items > 0 then out[#out + 1] = "," end
      line(level + 1)
      out[#out + 1] = "<metatable> = "
      value(mt, level + 1)
    end
    if #keys > 0 or type(mt) == "table" then
      line(level)
    elseif seq_len > 0 then
      out[#out + 1] = " "
    end
    out[#out + 1] = "}"
  end

  value = function(v, level)
    local t = type(v)
    if t == "string" then
      out[#out + 1] = quote(v)
    elseif t == "number" or t == "boolean" or t == "nil" then
      out[#out + 1] = tostring(v)
    elseif t ~= "table" then
      out[#out + 1] = "<" .. t .. " " .. id_of(v) .. ">"
    elseif v == inspect.KEY or v == inspect.METATABLE then
      out[#out + 1] = tostring(v)
    elseif ids[v] ~= nil then
      out[#out + 1] = "<table " .. ids[v] .. ">"
    elseif level >= depth then
      out[#out + 1] = "{...}"
    else
      table_body(v, level)
    end
  end

  value(root, 0)
  return table.concat(out)
end

function inspect.inspect(root, options)
  options = options or {}
  if options.process then
    root = process_all(options.process, root, {}, {})
  end
  return render(root, options.depth or math.huge, options.newline or "\n", options.indent or "  ")
end

return setmetatable(inspect, {__call = function(_, root, options) return inspect.inspect(root, options) end,
                              __metatable = false})
