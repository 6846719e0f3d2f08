--* subject: funcs.hello
--* name: hello
-- Answers any message on funcs.hello with a greeting built from the payload.
function OnMessage(subject, payload)
  return "Processed subject: " .. subject .. " with payload: " .. payload
end
