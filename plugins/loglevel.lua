-- loglevel: one logger per level, those below the current level write to /dev/null.
local log = require("log")
local LEVELS = {DEBUG = 0, INFO = 1, WARN = 2, ERROR = 3}
local loglevel = {
  levels = readonly(LEVELS),
  defaultOutput = "STDERR",
  _level = "INFO",
}
for k, v in pairs(log) do loglevel[k] = v end  -- log's functions are reachable too (the original's __index)

local function level_name(level)
  local name = type(level) == "string" and level:upper() or nil
  if name == nil or LEVELS[name] == nil then error("illegal level " .. tostring(level), 3) end
  return name
end

local function output_for(level)
  if LEVELS[level] >= LEVELS[loglevel._level] then return loglevel.defaultOutput end
  return "/dev/null"
end

local function apply()
  for level in pairs(LEVELS) do loglevel[level]:set_output(output_for(level)) end
end

for level in pairs(LEVELS) do
  loglevel[level] = log.new(output_for(level), "[" .. level .. "] ", {date = true})
end

function loglevel.get_level() return loglevel._level end
function loglevel.set_level(level)
  loglevel._level = level_name(level)
  apply()
end
function loglevel.default_output() return loglevel.defaultOutput end
function loglevel.set_default_output(output)
  loglevel.defaultOutput = output
  apply()
end
return loglevel
