--* subject: shop.report
--* name: hourly_report
--* cron: @every 30s
-- Runs every 30 seconds on exactly one server of the cluster, and publishes a small report.
local nats = require("nats")

function OnMessage(subject, payload, tick)
  local count = 0
  local dir = os.getenv("ORDERS_DIR") or "/tmp"
  local p = io.popen("ls " .. dir .. " 2>/dev/null")
  for name in p:lines() do
    if name:match("^order%-") then count = count + 1 end
  end
  p:close()
  nats.publish("shop.reports", "orders recorded: " .. count .. " (tick " .. tick.tick .. ")")
  return ""
end
