--* subject: example.libs.web
--* name: web
--* http: true
--* require: web
-- Every kind of route of the web.lua router library (examples/libs/web.lua). Try it with
--   msgscript cli devhttp examples/web.lua -l examples/libs
--   curl localhost:7634/example.libs.web/json
local json = require("json")
local router = Router.new()

-- Plain text: a template without tags, with our own Content-Type.
router:get("/plain", function(req, _)
  return "Hello, World!", {}, 200, { ["Content-Type"] = "text/plain" }
end)

-- JSON: no template, so the data is sent as JSON.
router:get("/json", function(req, _)
  return nil, { name = "John" }, 200
end)

-- A path parameter rendered through a mustache template (HTML-escaped).
router:get("/path/<foo>", function(req, _)
  return [[
<p>{{ param }}</p>
]], { param = req.params.foo }, 200
end)

-- POST with a JSON body.
router:post("/post", function(req, _)
  local doc = json.decode(req.body)
  if type(doc) ~= "table" or doc.name == nil then
    return "", { error = "a JSON body with a name is required" }, 400
  end
  return [[ Hello {{ name }}! ]], { name = doc.name }, 200
end)

-- Query parameters: /search?q=lua&page=2
router:get("/search", function(req, _)
  local page = tonumber(req.query.page) or 1
  return "", { query = req:query("q") or "", page = page }, 200
end)

-- PUT replaces an item from a JSON body.
router:put("/items/<id>", function(req, body)
  local item = json.decode(body) or {}
  item.id = req:path("id")
  return "", item, 200
end)

-- PATCH updates fields sent as a form: color=red&size=L
router:patch("/items/<id>", function(req, _)
  return "", { id = req.params.id, changed = req.form }, 200
end)

-- DELETE answers with a status and a header of its own.
router:delete("/items/<id>", function(req, _)
  return "", { deleted = req.params.id }, 200, { ["X-Deleted"] = req.params.id }
end)
