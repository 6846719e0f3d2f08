-- The arrays json.decode made with holes (null elements), and their lengths, for json.encode: a weak
-- table keyed by the array. Shared by the modules that read or write JSON (json, storage).
local lengths = setmetatable({}, {__mode = "k"})
local function holey(t, n) lengths[t] = n; return t end
local function holey_len(t) return lengths[t] end
return holey, holey_len
