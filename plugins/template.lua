-- The template engine has no state: each choose() gives a new read-only object (so nothing one call
-- does to it reaches another), and they are all equal, as the original's one shared engine.
local methods = ...
local Engine = class(methods, {__newindex = readonly_error, __eq = function() return true end})
return function() return setmetatable({}, Engine) end
