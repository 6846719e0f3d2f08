--* subject: example.json
--* name: json
-- Decodes a JSON payload such as {"name": "John"}.
local json = require("json")

function OnMessage(_, payload)
  local data, err = json.decode(payload)
  if data == nil then
    error("payload is not JSON: " .. err)
  end
  return "Hello, " .. data.name .. "!"
end
