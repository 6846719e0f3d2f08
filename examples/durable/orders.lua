--* subject: shop.orders
--* name: record_order
--* stream: SHOP
--* retry: 1s, 5s, 30s
--* deadletter: shop.orders.failed
-- Each order arrives once per attempt until this script succeeds. A delivery can repeat (a server
-- died mid-call), so the work is made idempotent with the message id: an order already recorded
-- under that id is not recorded again.
local json = require("json")

function OnMessage(subject, payload, msg)
  local order, err = json.decode(payload)
  if not order then error("not an order: " .. err) end
  if not order.item or not order.qty then error("an order needs an item and a qty") end
  local dir = os.getenv("ORDERS_DIR") or "/tmp"
  local path = dir .. "/order-" .. msg.id:gsub("[^%w_-]", "_") .. ".json"
  if io.open(path, "r") then return "already recorded" end
  local f = assert(io.open(path, "w"))
  f:write(json.encode({item = order.item, qty = order.qty, attempt = msg.attempt}))
  f:close()
  return "recorded"
end
