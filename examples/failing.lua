--* subject: example.failing
--* name: failing
-- Always fails: shows what a script error looks like to the caller.
function OnMessage(subject, payload)
  someUndefinedFunction()
  return "never reached"
end
