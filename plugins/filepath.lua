-- filepath.join passes each argument through Lua's tostring, as the original does.
local join = ...
return function(...)
  local parts = {}
  for i = 1, select("#", ...) do parts[i] = tostring((select(i, ...))) end
  return join(parts)
end
