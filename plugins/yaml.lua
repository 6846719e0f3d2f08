-- yaml's decoder and encoder objects: they read from / write to any Lua object with :read / :write.
local M, py = ...
local state = setmetatable({}, {__mode = "k"})

local function get(self, kind, fname)
  local st = state[self]
  if st == nil or st.kind ~= kind then
    error("bad argument #1 to '" .. fname .. "' (yaml." .. kind .. " expected, got " .. type(self) .. ")", 3)
  end
  return st
end

local Decoder, Encoder
Decoder, M.Decoder = class({
  decode = function(self)
    local st = get(self, "Decoder", "decode")
    if not st.loaded then
      local ok, data = pcall(st.reader.read, st.reader, "*a")
      st.loaded = true
      if not ok then return nil, tostring(data) end
      py.feed(st.py, data or "")
    end
    return py.next_document(st.py)
  end,
  set_strict = function(self, strict)
    py.set_strict(get(self, "Decoder", "set_strict").py, strict)
  end,
})

Encoder, M.Encoder = class({
  encode = function(self, value)
    local st = get(self, "Encoder", "encode")
    local text, err = py.encode(value)
    if text == nil then return err end
    if st.count > 0 then text = "---\n" .. text end
    local ok, werr = st.writer:write(text)
    if ok == nil and werr ~= nil then return tostring(werr) end
    st.count = st.count + 1
  end,
})

function M.new_decoder(reader)
  local d = setmetatable({}, Decoder)
  state[d] = {kind = "Decoder", reader = reader, py = py.new_stream()}
  return d
end

function M.new_encoder(writer)
  local e = setmetatable({}, Encoder)
  state[e] = {kind = "Encoder", writer = writer, count = 0}
  return e
end
return M
