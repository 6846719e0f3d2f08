--* subject: http.hello
--* name: http_get
--* http: true
-- HTTP mode: the function named after the request's verb answers it.
function GET(url, body)
  return "Hello, " .. body .. "!", 200, { ["Content-Type"] = "text/plain" }
end

function POST(url, body)
  return "Hello, " .. body .. "!", 200, { ["Content-Type"] = "text/plain" }
end
