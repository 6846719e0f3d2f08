--* name: web
-- web.lua: a small router for HTTP-mode scripts (`--* http: true` plus `--* require: web`).
--
--   local router = Router.new()
--   router:get("/hello/<name>", function(req, body)
--     return "<p>Hello {{name}}</p>", { name = req.params.name }
--   end)
--
-- How requests reach the router: the server calls the global function named after the HTTP
-- verb, GET(url, body), POST(url, body), ... This library defines those globals once, and they
-- dispatch into the router most recently created with Router.new(), so a script needs no
-- run() call. (The whole script runs again for every request, so that router is always the
-- one the script just built.) A script may still define its own GET etc. after the library.
--
-- A handler is called as handler(req, body) and returns
--   template, data, status, headers
-- * template nil or "": `data` is sent as JSON (require("json").encode), Content-Type
--   application/json;
-- * otherwise the mustache template is rendered with `data` (require("template")), Content-Type
--   text/html.
-- * status defaults to 200; headers are merged over the Content-Type (case-insensitively).
-- * As in the original library, the 4th value may instead be an options table with any of
--   headers, redirect (a 302 to that URL), no_template, header, footer. When the router was
--   made with Router.new(layout), HTML is wrapped in that mustache layout ({{& header}},
--   {{& body}}, {{& footer}}) unless no_template is set.
--
-- req fields: method, url (path and query as received), body, params (path parameters, also
-- req:path(name)), query (a table that is also callable: req:query(name)), form (the body
-- parsed as application/x-www-form-urlencoded, unless it looks like JSON or XML), headers
-- (the request headers when the server passes them, else {}).
-- Unknown path: 404; known path, other verb: 405 with an Allow header. HEAD falls back to GET.

Router = {}
Router.__index = Router

Request = {}
Request.__index = Request

local VERBS = { "GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS" }
local current_router -- the router the verb globals dispatch to: the last one created

local function url_decode(s)
  s = s:gsub("+", " ")
  return (s:gsub("%%(%x%x)", function(hex) return string.char(tonumber(hex, 16)) end))
end

-- "a=1&b=x+y" -> { a = "1", b = "x y" }; a repeated key keeps its last value.
local function parse_urlencoded(s)
  local out = {}
  for pair in (s or ""):gmatch("[^&]+") do
    local key, value = pair:match("^([^=]*)=(.*)$")
    if key == nil then key, value = pair, "" end
    if key ~= "" then out[url_decode(key)] = url_decode(value) end
  end
  return out
end

local function segments(path)
  local out = {}
  for part in path:gmatch("[^/]+") do out[#out + 1] = part end
  return out
end

-- "/a/b/" and "" are "/a/b" and "/".
local function normalize(path)
  if path == "" or path == nil then return "/" end
  if path:sub(1, 1) ~= "/" then path = "/" .. path end
  if #path > 1 and path:sub(-1) == "/" then path = path:sub(1, -2) end
  return path
end

local function lower_keys_merge(base, extra)
  for key, value in pairs(extra or {}) do
    for existing in pairs(base) do
      if type(existing) == "string" and type(key) == "string" and existing:lower() == key:lower() then
        base[existing] = nil
      end
    end
    base[key] = tostring(value)
  end
  return base
end

local function text_response(status, text, headers)
  return text, status, lower_keys_merge({ ["Content-Type"] = "text/plain; charset=utf-8" }, headers)
end

function Router.new(layout)
  local router = setmetatable({ routes = {}, layout = layout }, Router)
  for _, verb in ipairs(VERBS) do router.routes[verb] = {} end
  current_router = router
  return router
end

function Router:add(verb, pattern, handler)
  assert(type(handler) == "function", "web: a route handler must be a function")
  local parts, dynamic = segments(pattern), false
  for i, part in ipairs(parts) do
    local name = part:match("^<(.+)>$")
    parts[i] = name and { param = name } or part
    dynamic = dynamic or name ~= nil
  end
  table.insert(self.routes[verb], { path = normalize(pattern), parts = parts, dynamic = dynamic, handler = handler })
  return self
end

for _, verb in ipairs(VERBS) do
  Router[verb:lower()] = function(self, pattern, handler) return self:add(verb, pattern, handler) end
end

-- The route for `verb` and `path`, and its path parameters; static routes win over patterns.
function Router:match(verb, path)
  local routes = self.routes[verb] or {}
  for _, route in ipairs(routes) do
    if not route.dynamic and route.path == path then return route, {} end
  end
  local given = segments(path)
  for _, route in ipairs(routes) do
    if route.dynamic and #route.parts == #given then
      local params = {}
      for i, part in ipairs(route.parts) do
        if type(part) == "table" then
          params[part.param] = url_decode(given[i])
        elseif part ~= given[i] then
          params = nil
          break
        end
      end
      if params then return route, params end
    end
  end
  return nil
end

function Router:allowed(path)
  local verbs = {}
  for _, verb in ipairs(VERBS) do
    if self:match(verb, path) or (verb == "HEAD" and self:match("GET", path)) then verbs[#verbs + 1] = verb end
  end
  return verbs
end

function Router:handle(verb, url, body, headers)
  url, body = url or "/", body or ""
  local raw_path, query_string = url:match("^([^?]*)%??(.*)$")
  local path = normalize(raw_path)
  local route, params = self:match(verb, path)
  if not route and verb == "HEAD" then route, params = self:match("GET", path) end
  if not route then
    local allowed = self:allowed(path)
    if #allowed > 0 then
      return text_response(405, "method " .. verb .. " not allowed for " .. path, { Allow = table.concat(allowed, ", ") })
    end
    return text_response(404, string.format("URL %s doesn't exist", url))
  end
  local req = Request.new(verb, url, body, params, parse_urlencoded(query_string), headers)
  return self:respond(route.handler(req, body))
end

-- The 4th handler value: an options table (the original library's) or plain headers.
local OPTION_KEYS = { "headers", "redirect", "no_template", "header", "footer" }
local function as_options(value)
  if type(value) ~= "table" then return {} end
  for _, key in ipairs(OPTION_KEYS) do
    if value[key] ~= nil then return value end
  end
  return { headers = value }
end

function Router:respond(template, data, status, extra)
  local opts = as_options(extra)
  status = tonumber(status) or 200
  if opts.redirect then
    return "", 302, { Location = opts.redirect }
  end
  if data == nil then data = {} end
  if template == nil or template == "" then
    local body, err = require("json").encode(data)
    if body == nil then return text_response(500, "web: cannot encode the response as JSON: " .. tostring(err)) end
    return body, status, lower_keys_merge({ ["Content-Type"] = "application/json" }, opts.headers)
  end
  local mustache = require("template").choose("mustache")
  local html, err = mustache:render(template, data)
  if html == nil then return text_response(500, "web: template error: " .. tostring(err)) end
  if self.layout and not opts.no_template then
    html, err = mustache:render(self.layout, { header = opts.header, body = html, footer = opts.footer })
    if html == nil then return text_response(500, "web: layout error: " .. tostring(err)) end
  end
  return html, status, lower_keys_merge({ ["Content-Type"] = "text/html; charset=utf-8" }, opts.headers)
end

-- req.query is both the table of query parameters and callable as req:query(name).
local query_meta = {
  __call = function(query, _, name)
    if name == nil then return query end
    return query[name]
  end,
}

function Request.new(method, url, body, params, query, headers)
  local form = {}
  if not body:match("^%s*[%[{<]") then form = parse_urlencoded(body) end
  setmetatable(query, query_meta)
  return setmetatable({
    method = method, url = url, body = body, params = params, paths = params,
    query = query, queries = query, form = form, headers = headers or {},
  }, Request)
end

function Request:path(name)
  if name == nil then return self.params end
  return self.params[name]
end

for _, verb in ipairs(VERBS) do
  _G[verb] = function(url, body, headers)
    if current_router == nil then
      return text_response(500, "web: the script created no router (call Router.new())")
    end
    return current_router:handle(verb, url, body, headers)
  end
end

-- The original library added this string method; scripts written for it may use ("a,b"):split(",").
if string.split == nil then
  function string.split(s, sep)
    if sep == nil or sep == "" then return { s } end
    local out, from = {}, 1
    local i, j = s:find(sep, from, true)
    while i do
      if i > from then out[#out + 1] = s:sub(from, i - 1) end
      from = j + 1
      i, j = s:find(sep, from, true)
    end
    if from <= #s then out[#out + 1] = s:sub(from) end
    return out
  end
end
