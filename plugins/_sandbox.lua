-- The sandbox every script runs in (msgscript.py, LuaRunner). It runs once per Lua runtime, with
-- the real globals, and returns the functions the runner uses. Scripts never see the real globals
-- table, the hook or these functions: getfenv answers with the call's own globals, getinfo hides
-- the sandbox's functions, and the metatables shared by every call (strings, files, Python objects)
-- cannot be reached or changed. Each call gets fresh globals whose library tables (string, table,
-- ...) are copied on first use, so nothing a script changes outlives its call.
--
-- Time. The hook looks at the clock every CHECK instructions; the server's watchdog thread makes it
-- fire at the next instruction when a call passes its deadline (or, on the event loop, its inline
-- budget), however long one instruction takes. A C function whose cost is not a small constant
-- looks at its arguments first (step): a long step moves an inline call to a worker before it
-- starts, and fails past the deadline.
local expired, blocking, module_names, py, pattern_source, max_bytes, CHECK, STEP = ...
local G = _G
local sethook, raw_getinfo, module_metatable = debug.sethook, debug.getinfo, debug.getmetatable
local raw_getfenv, raw_setfenv, raw_loadstring = getfenv, setfenv, loadstring
local raw_getmetatable, raw_setmetatable = getmetatable, setmetatable
local cocreate, coresume = coroutine.create, coroutine.resume
local pcall, error, type, next, rawget, rawset, select, unpack, tostring, tonumber =
  pcall, error, type, next, rawget, rawset, select, unpack, tostring, tonumber
local concat, maxn, raw_open, raw_collect = table.concat, table.maxn, io.open, collectgarbage
local floor, log = math.floor, math.log
local TIMEOUT = "script timed out"
local string_mt, string_lib = raw_getmetatable(""), string
-- the sandbox calls string functions as locals: a script's string copy (the strings' __index
-- during its call) must not be able to change what they do here
local sbyte, sgsub, ssub, sfind = string.byte, string.gsub, string.sub, string.find

-- == Values as text, as gopher-lua writes them (issue 20) =====================================
-- Definitions here (with the C functions as they are before the sandbox wraps them); installed
-- by the block "gopher-lua's text, installed" at the end. gopher-lua writes a number with Go's
-- fmt: an integral value below 2^63 in full (2^53 is 9007199254740992), any other in the
-- shortest text that reads back the same, with an exponent below 1e-4 and from 1e6 up
-- (0.30000000000000004, 1.2345675e+06), and NaN, +Inf, -Inf; Lua 5.1 writes %.14g. Its
-- string.format is Go's Sprintf: %s takes any value (nil, booleans, tables by address without
-- their __tostring) and a missing argument is written %!s(MISSING) instead of raising.
local gotext = {}
do
  local raw_format, raw_match, raw_rep, raw_char, raw_tostring = string.format, string.match, string.rep, string.char,
    tostring
  local huge, frexp, INT_LIMIT = math.huge, math.frexp, 2^63

  -- At a power of two the values that read back as x reach twice as far above x as below: the
  -- 16-digit text above the nearest one may read back when the nearest does not.
  local function above16(x)
    local ax = x < 0 and -x or x
    local int, frac, exp = raw_match(raw_format("%.15e", ax), "^(%d)%.(%d+)e(.*)$")
    local digits = int .. frac
    local i = #digits
    while i > 0 and sbyte(digits, i) == 57 do i = i - 1 end
    if i == 0 then return nil end
    digits = ssub(digits, 1, i - 1) .. raw_char(sbyte(digits, i) + 1) .. raw_rep("0", #digits - i)
    local mantissa = ssub(digits, 1, 1) .. "." .. ssub(digits, 2)
    if tonumber(mantissa .. "e" .. exp) ~= ax then return nil end
    return (x < 0 and "-" or "") .. sgsub(mantissa, "%.?0+$", "") .. "e" .. exp
  end

  -- strconv.FormatFloat(x, 'g', -1, 64) of a finite x: the shortest digits that read back as x
  local function shortest(x)
    local s = raw_format("%.15g", x)  -- a normal double's shortest text has 15 digits or more only if needed
    if tonumber(s) ~= x then
      s = raw_format("%.16g", x)
      if tonumber(s) ~= x then
        s = raw_format("%.17g", x)
        local m = frexp(x)
        if m == 0.5 or m == -0.5 then s = above16(x) or s end
      end
    elseif x < 2.2250738585072014e-308 and x > -2.2250738585072014e-308 then  -- subnormal: fewer digits
      for p = 1, 14 do
        local t = raw_format("%." .. p .. "g", x)
        if tonumber(t) == x then s = t; break end
      end
    end
    if (x >= 1e6 or x <= -1e6) and not sfind(s, "e", 1, true) then  -- %.17g waits for e+17, Go for e+06
      local sign, int, frac = raw_match(s, "^(-?)(%d+)%.?(%d*)$")
      local digits = sgsub(int .. frac, "0+$", "")
      s = sign .. ssub(digits, 1, 1) .. (#digits > 1 and "." .. ssub(digits, 2) or "")
        .. raw_format("e+%02d", #int - 1)
    end
    return s
  end

  local function number(x)
    if x % 1 == 0 and x >= -INT_LIMIT and x < INT_LIMIT then return raw_format("%d", x) end
    if x ~= x then return "NaN" end
    if x == huge then return "+Inf" end
    if x == -huge then return "-Inf" end
    return shortest(x)
  end

  function gotext.tostring(...)
    local v = ...
    local t = type(v)
    if t == "number" then return number(v) end
    if t == "string" then return v end  -- strings have no __tostring a script could set
    if v == nil and select("#", ...) == 0 then error("bad argument #1 to 'tostring' (value expected)", 2) end
    return raw_tostring(v)
  end

  -- what Go's %s and %v write for a value: tostring, except that a table's __tostring is not used
  local function plain(v)
    local t = type(v)
    if t == "string" then return v end
    if t == "number" then return number(v) end
    if t == "table" then
      local mt = module_metatable(v)
      local f = mt and rawget(mt, "__tostring")
      if f ~= nil then
        rawset(mt, "__tostring", nil)
        local s = raw_tostring(v)
        rawset(mt, "__tostring", f)
        return s
      end
    end
    return raw_tostring(v)
  end

  -- NaN and infinities under a float verb, as Go writes them (never zero-padded)
  local function special(x, flags)
    local s = x ~= x and "NaN" or (x > 0 and "Inf" or "-Inf")
    if s ~= "-Inf" then
      if sfind(flags, "+", 1, true) or (s == "Inf" and not sfind(flags, " ", 1, true)) then s = "+" .. s
      elseif sfind(flags, " ", 1, true) then s = " " .. s end
    end
    return s
  end

  -- %g and %G without a precision: Go's shortest form, with the flags Go honours
  local function go_g(x, flags, width, upper)
    if x ~= x or x == huge or x == -huge then return special(x, flags) end
    local s = shortest(x)
    if upper then s = sgsub(s, "e", "E") end
    if sbyte(s, 1) ~= 45 then
      if sfind(flags, "+", 1, true) then s = "+" .. s elseif sfind(flags, " ", 1, true) then s = " " .. s end
    end
    local w = #width <= 2 and tonumber(width) or 0  -- C refuses longer widths
    if #s < w and sfind(flags, "0", 1, true) and not sfind(flags, "-", 1, true) then
      local sign = raw_match(s, "^[-+ ]?")
      s = sign .. raw_rep("0", w - #s) .. ssub(s, #sign + 1)
    end
    return s
  end

  local FLOAT = {e = true, E = true, f = true, g = true, G = true}
  -- what an argument of a conversion is checked for: 1 %s, 2 %d %i, 3 %q, 4 %e %E %f %g %G, 0 the
  -- others C writes as Go does (%c %o %u %x %X), 5 never written by C (%g %G without precision, %v, %F)
  local KIND = {s = 1, d = 2, i = 2, q = 3, e = 4, E = 4, f = 4, g = 4, G = 4, n = 5, N = 5, v = 5, F = 5}

  -- a format's conversions: {at, stop, flags, width, precision, conversion, kind}..., n = how many,
  -- slow = one of them is never left to C
  local function parse(fmt)
    local list, n, pos = {slow = false}, 0, 1
    while true do
      local at = sfind(fmt, "%", pos, true)
      if not at then break end
      if sbyte(fmt, at + 1) == 37 then
        pos = at + 2
      else
        local _, stop, flags, width, dot, prec, conv = sfind(fmt, "^([-+ #0]*)(%d*)(%.?)(%d*)(.?)", at + 1)
        if conv == "" then break end
        local kind = KIND[conv] or 0
        if dot == "" and (conv == "g" or conv == "G") then kind = 5 end
        n = n + 1
        list[n] = {at, stop, flags, width, dot .. prec, conv, kind}
        list[-n] = kind
        list.slow = list.slow or kind == 5
        pos = stop + 1
      end
    end
    list.n = n
    return list
  end

  -- may C write this argument of a conversion of this kind as Go would? (nil: it may be missing)
  local function fine(kind, v)
    local t = type(v)
    if t == "number" then
      if kind == 1 then  -- %.14g writes these integers in full (but -0 with its sign)
        return v % 1 == 0 and v > -1e14 and v < 1e14 and (v ~= 0 or 1 / v > 0)
      end
      if kind == 4 then return v == v and v ~= huge and v ~= -huge end
      return kind ~= 3
    end
    return t == "string" and (kind ~= 2 or tonumber(v) ~= nil)
  end

  local cache, ncache = {}, 0
  local c_format  -- the sandbox's string.format, set where this one is installed
  function gotext.set_c_format(f) c_format = f end

  local function slow_format(fmt, specs, ...)
    local n, parts, args, na, pos = select("#", ...), {}, {}, 0, 1
    for i = 1, specs.n do
      local sp = specs[i]
      local flags, width, prec, conv = sp[3], sp[4], sp[5], sp[6]
      parts[#parts + 1] = ssub(fmt, pos, sp[1] - 1)
      pos = sp[2] + 1
      local spec = ssub(fmt, sp[1], sp[2])
      if i > n then
        spec = "%%!" .. conv .. "(MISSING)"
      else
        local v = (select(i, ...))
        local t = type(v)
        if conv == "s" or conv == "v" then
          v, spec = plain(v), "%" .. flags .. width .. prec .. "s"
        elseif conv == "q" then
          v = plain(v)
        elseif conv == "d" or conv == "i" then
          if t == "string" and tonumber(v) == nil then v = 0 end
        elseif FLOAT[conv] or conv == "F" then
          local x = tonumber(v)
          if conv == "F" then spec = "%" .. flags .. width .. prec .. "f" end
          if x ~= nil and (t == "number" or t == "string") then
            if prec == "" and (conv == "g" or conv == "G") then
              v, spec = go_g(x, flags, width, conv == "G"), "%" .. (sfind(flags, "-", 1, true) and "-" or "") .. width .. "s"
            elseif x ~= x or x == huge or x == -huge then
              v, spec = special(x, flags), "%" .. (sfind(flags, "-", 1, true) and "-" or "") .. width .. "s"
            end
          end
        end
        na = na + 1
        args[na] = v
      end
      parts[#parts + 1] = spec
    end
    parts[#parts + 1] = ssub(fmt, pos)
    return c_format(concat(parts), unpack(args, 1, na))
  end

  function gotext.format(fmt, ...)
    if type(fmt) ~= "string" then return c_format(fmt, ...) end
    local specs = cache[fmt]
    if specs == nil then
      specs = parse(fmt)
      if #fmt <= 512 then
        if ncache >= 256 then cache, ncache = {}, 0 end
        cache[fmt], ncache = specs, ncache + 1
      end
    end
    local n = specs.n
    if n == 0 then return c_format(fmt, ...) end
    if not specs.slow then  -- does any argument need Go's treatment?
      if n == 1 then  -- (strings without a call: the usual case)
        local a = ...
        if type(a) == "string" and specs[-1] ~= 2 or fine(specs[-1], a) then return c_format(fmt, ...) end
      elseif n == 2 then
        local a, b = ...
        if (type(a) == "string" and specs[-1] ~= 2 or fine(specs[-1], a))
            and (type(b) == "string" and specs[-2] ~= 2 or fine(specs[-2], b)) then
          return c_format(fmt, ...)
        end
      else
        local i = 1
        while i <= n and fine(specs[-i], (select(i, ...))) do i = i + 1 end
        if i > n then return c_format(fmt, ...) end
      end
    end
    return slow_format(fmt, specs, ...)
  end

  gotext.number, gotext.plain = number, plain
end
-- == end of the definitions of "Values as text" ================================================

-- Python objects share one metatable (its __call runs the clock check); files share another.
local python_mt = raw_getmetatable(expired)
python_mt.__metatable = false
python_mt.__tostring = function() return "userdata" end
python_mt.__index = function() error("attempt to index a userdata value", 2) end
python_mt.__newindex = python_mt.__index
local file_mt = raw_getmetatable(io.stdout)
file_mt.__metatable = false
local io_input, io_output, stdin, stdout = io.input, io.output, io.stdin, io.stdout

local hook
local function stop_if_expired()
  if expired() then sethook(hook, "", 1); error(TIMEOUT, 0) end  -- and at every instruction from now on
end
function hook()
  stop_if_expired()
  sethook(hook, "", CHECK)  -- a watchdog trip (count 1) with nothing to stop: back to the usual count
end

local inline = false
-- Called before anything with an effect outside Lua: an inline call moves to a worker first.
local function guard()
  if inline then blocking(true); sethook(hook, "", 1); error(TIMEOUT, 0) end
end
-- Called before a C call of `n` units of work (about bytes): a long one is not for the event loop, and
-- none starts past the deadline or so close to it that it would run long after it (long_step).
local long_step = py.long_step
local function step(n)
  if n > STEP then
    if inline then blocking(false); sethook(hook, "", 1); error(TIMEOUT, 0) end  -- this call only
    if not long_step(n) then sethook(hook, "", 1); error(TIMEOUT, 0) end
  end
end
-- An argument C reads as an int (luaL_checkint) wraps outside the int range (2^31 is -2^31 to C, and a
-- count of that size is a loop C never leaves): such numbers are clamped first, NaN is 0.
local INT_MAX, huge = 2^31 - 1, math.huge
local function cint(v)
  local n = tonumber(v)
  if not n or n >= -INT_MAX - 1 and n <= INT_MAX then return v end
  if n ~= n then return 0 end
  return n > 0 and INT_MAX or -INT_MAX - 1
end
local function size(v)
  local t = type(v)
  if t == "string" then return #v end
  return t == "number" and 24 or 0
end

-- Python functions answer (true, results...) or (false, message[, stop now])
local function checked(ok, ...)
  if ok then return ... end
  local message, stop = ...
  if stop then sethook(hook, "", 1) end
  error(message, 3)
end
local function wrap(f)
  return function(...) return checked(f(...)) end
end

local current_env, current_loaded
local LIBS = {}
local function copy(t) local c = {} for k, v in next, t do c[k] = v end return c end

local function loaded()
  if not current_loaded then
    current_loaded = raw_setmetatable({}, {__index = function(_, k) if LIBS[k] then return current_env[k] end end})
  end
  return current_loaded
end

-- Code loaded at run time: text only (crafted bytecode can crash Lua), in the call's globals.
local function text_chunk(src, name, env)
  if sbyte(src, 1) == 27 then return nil, "attempt to load a binary chunk" end
  step(#src * 8)
  local f, err = raw_loadstring(src, name)
  if not f then return nil, err end
  raw_setfenv(f, env or current_env)
  return f
end

-- Files. Paths are resolved in the call's working directory, and what is opened must be a regular
-- file or a directory (or /dev/null, /dev/zero, /dev/urandom): a FIFO or a device would block.
local open_path, close_fd, call_path = wrap(py.open_path), py.close_fd, wrap(py.path)
local function open(path, mode)
  guard()
  local target, fd, code = open_path(path, mode)
  if not target then return nil, fd, code end
  local f, err, code = raw_open(target, mode)
  close_fd(fd)
  if not f then return nil, tostring(path) .. ssub(err, #target + 1), code end
  return f
end

local S = {}  -- the replacements scripts see
function S.loadstring(s, name)
  if type(s) ~= "string" then error("bad argument #1 to 'loadstring' (string expected, got " .. type(s) .. ")", 2) end
  return text_chunk(s, name or s)
end
function S.load(chunk, name, _, env)
  if type(chunk) == "function" then
    local parts = {}
    while true do
      local piece = chunk()
      if piece == nil or piece == "" then break end
      if type(piece) ~= "string" then return nil, "reader function must return a string" end
      parts[#parts + 1] = piece
    end
    chunk = concat(parts)
  elseif type(chunk) ~= "string" then
    error("bad argument #1 to 'load' (function expected, got " .. type(chunk) .. ")", 2)
  end
  return text_chunk(chunk, name or "=(load)", env)
end
local function read_source(path)
  if path == nil then return nil, "reading from standard input is not available to scripts" end
  local f, err = open(path, "r")
  if not f then return nil, err end
  local src = f:read("*a")
  f:close()
  return (sgsub(src, "^#[^\n]*", ""))
end
function S.loadfile(path)
  local src, err = read_source(path)
  if not src then return nil, err end
  return text_chunk(src, "@" .. path)
end
function S.dofile(path)
  local f, err = S.loadfile(path)
  if not f then error(err, 2) end
  return f()
end
function S.getfenv(f)
  if f == nil then f = 1 end
  if type(f) == "number" then
    if f == 0 then return current_env end
    f = f + 1
  end
  local env = raw_getfenv(f)
  if env == G then return current_env end
  return env
end
function S.setfenv(f, t)
  if type(t) ~= "table" then error("bad argument #2 to 'setfenv' (table expected, got " .. type(t) .. ")", 2) end
  if f == nil then f = 1 end
  if type(f) == "number" then
    if f == 0 then error("'setfenv' cannot change the environment of the running thread", 2) end
    local info = raw_getinfo(f + 1, "f")
    if not info then error("bad argument #1 to 'setfenv' (invalid level)", 2) end
    f = info.func
  end
  -- functions of the sandbox, the libraries and the modules keep the real globals: not theirs to change
  if type(f) ~= "function" or raw_getfenv(f) == G then
    error("'setfenv' cannot change environment of given object", 2)
  end
  return raw_setfenv(f, t)
end
function S.getmetatable(v)
  if type(v) == "string" then  -- a copy: the real one is shared by every call
    local mt = copy(string_mt)
    mt.__index = current_env.string
    return mt
  end
  return raw_getmetatable(v)
end
-- a module's read-only views (a metatable hidden behind false, with __newindex) stay read-only
function S.rawset(t, k, v)
  local mt = module_metatable(t)
  if type(mt) == "table" and rawget(mt, "__metatable") == false and rawget(mt, "__newindex") ~= nil then
    error("attempt to change a read-only table of a module", 2)
  end
  return rawset(t, k, v)
end
function S.collectgarbage(opt, arg)
  if opt == nil or opt == "collect" or opt == "count" or opt == "step" then
    if opt ~= "count" then step(raw_collect("count") * 1024) end
    return raw_collect(opt, arg)
  end
  return 0  -- stopping the collector or retuning it would outlive the call
end
function S.module()
  error("module() is not supported: return the module's table instead", 2)
end
local raw_print = print
function S.print(...) guard() return raw_print(...) end
function S.tonumber(v, base)
  if type(v) == "string" then step(#v) end
  return tonumber(v, base)
end

-- Coroutines run on workers only (creating one moves an inline call), with the call's hook. The
-- watchdog must reach them too: they are kept alive until the next call, so it never touches a
-- freed one.
local threads, nthreads = {}, 0
local watch_thread = py.watch_thread
local function co_create(f)
  guard()
  local co = cocreate(f)
  sethook(co, hook, "", CHECK)
  if nthreads < 256 then
    nthreads = nthreads + 1
    threads[nthreads] = co
    watch_thread(tostring(co))
  end
  return co
end
local function co_wrap(f)
  local co = co_create(f)
  return function(...)
    local r = {coresume(co, ...)}
    if not r[1] then error(r[2], 2) end
    return unpack(r, 2, maxn(r))
  end
end
-- Lua 5.1's unpack counts e - i + 1 in a C int: a range of 2^31 or more overflows it, and the push loop
-- ran off the stack (the server died). Counted here in doubles, on the positions as C reads them.
local MAX_RESULTS = 8000  -- LUAI_MAXCSTACK: C refuses more with this message
function S.unpack(t, i, j)
  i, j = cint(i), cint(j)
  if type(t) == "table" then
    local first, last = tonumber(i) or 1, tonumber(j) or #t
    if first <= last and last - first >= MAX_RESULTS then error("too many results to unpack", 2) end
  end
  return unpack(t, i, j)
end
-- A message handler called from the hook's error would run with hooks off: call it after unwinding.
function S.xpcall(f, handler, ...)
  local r = {pcall(f, ...)}
  if r[1] then return unpack(r, 1, maxn(r)) end
  return false, handler(r[2])
end

local MODULES = {}  -- Python-made modules, loaded once per runtime
local load_module, find_module = wrap(py.load_module), wrap(py.find_module)
function S.require(name)
  if type(name) ~= "string" then
    error("bad argument #1 to 'require' (string expected, got " .. type(name) .. ")", 2)
  end
  local cache = loaded()
  local v = rawget(cache, name)
  if v ~= nil then return v end
  if LIBS[name] then return current_env[name] end
  local preload = rawget(current_env, "package")
  preload = preload and type(preload.preload) == "table" and preload.preload[name]
  if preload then
    v = preload(name)
  elseif module_names[name] then
    local mod = MODULES[name]
    if mod == nil then mod = load_module(name); MODULES[name] = mod end
    v = type(mod) == "table" and raw_setmetatable(copy(mod), module_metatable(mod)) or mod
  else
    local path, src = find_module(name)
    if not path then error(src, 2) end
    local f, err = text_chunk(src, "@" .. path)
    if not f then error("error loading module '" .. name .. "' from file '" .. path .. "':\n\t" .. err, 2) end
    v = f(name)
  end
  if v == nil then v = rawget(cache, name) end
  if v == nil then v = true end
  rawset(cache, name, v)
  return v
end

-- The libraries scripts see, in place in the real globals (the modules' Lua code uses them too).
string.dump = nil
local raw_traceback = debug.traceback
debug = {}
function debug.traceback(...)
  local args, n = {...}, select("#", ...)
  local own = type(args[1]) ~= "thread"
  local at = own and 2 or 3
  local level = tonumber(cint(args[at]))
  if level then  -- below 0, C lists |level| "tail calls", one concatenation each
    level = level < 0 and 0 or level > 2^20 and 2^20 or level
    args[at] = own and math.max(level, 1) + 1 or level  -- the script's frames, not this function's
  elseif args[at] == nil then
    args[at] = own and 2 or 0
  end
  if n < at - 1 then  -- no message: C's text starts at "stack traceback:"
    args[at - 1] = ""
    local text = raw_traceback(unpack(args, 1, at))
    return (ssub(text, 2))
  end
  local text = raw_traceback(unpack(args, 1, math.max(n, at)))
  return text
end
function debug.getinfo(f, what)
  if type(f) == "number" and f > 0 then f = f + 1 end
  local info = raw_getinfo(f, what)
  -- the sandbox's, the libraries' and the modules' functions keep the real globals: not handed out
  if info and info.func and raw_getfenv(info.func) == G then info.func = nil end
  return info
end
coroutine.create, coroutine.wrap = co_create, co_wrap
os.exit = function() error("os.exit is not available to scripts", 2) end
os.clock, os.setenv, os.execute = wrap(py.clock), wrap(py.setenv), wrap(py.execute)

-- io.popen: the command runs to completion within the call's time; for "r" its output is read at
-- once, for "w" what the script writes is its input when the file is closed.
local popen_methods, popen_state = {}, raw_setmetatable({}, {__mode = "k"})  -- state out of scripts' reach
local popen_mt = {__index = popen_methods, __metatable = false}
function popen_methods.read(f, fmt)
  local st = popen_state[f]
  local out, pos = st and st.out, st and st.pos
  if not out or pos > #out then return nil end
  fmt = fmt or "*l"
  if fmt == "*a" or fmt == "a" then st.pos = #out + 1; return ssub(out, pos) end
  if type(fmt) == "number" then
    local s = ssub(out, pos, pos + fmt - 1); st.pos = pos + #s; return s
  end
  local nl = sfind(out, "\n", pos, true) or (#out + 1)
  st.pos = nl + 1
  return ssub(out, pos, nl - 1)
end
function popen_methods.lines(f) return function() return popen_methods.read(f, "*l") end end
function popen_methods.write(f, ...)
  local parts = popen_state[f].parts
  for i = 1, select("#", ...) do parts[#parts + 1] = tostring((select(i, ...))) end
  return f
end
function popen_methods.close(f)
  local st = popen_state[f]
  local on_close = st and st.on_close
  if not on_close then return true end
  st.on_close = nil
  local status = on_close(concat(st.parts))
  return status == 0, "exit", status
end
function popen_methods.flush(f) return f end
function popen_methods.setvbuf() return true end
local py_popen = wrap(py.popen)
function io.popen(command, mode)
  guard()
  local out, on_close = py_popen(command, mode)
  local f = raw_setmetatable({}, popen_mt)
  popen_state[f] = {out = out, on_close = on_close, pos = 1, parts = {}}
  return f
end

local raw_lines, raw_input, raw_output, raw_remove, raw_rename = io.lines, io.input, io.output, os.remove, os.rename
io.open = open
function io.lines(path)
  guard()
  if path == nil then return file_methods.lines(io_input()) end
  local f, err = open(path, "r")
  if not f then error(err, 2) end
  local nextline = f:lines()
  return function()
    local line = nextline()
    if line == nil then f:close() end
    return line
  end
end
local io_changed = false  -- the call moved io's default files: they are the process's again after it
local function default_file(raw, mode)
  return function(file)
    guard()
    io_changed = io_changed or file ~= nil
    if type(file) == "string" then
      local f, err = open(file, mode)
      if not f then error(err, 2) end
      file = f
    end
    return raw(file)
  end
end
io.input, io.output = default_file(raw_input, "r"), default_file(raw_output, "w")
function os.remove(path) guard() return raw_remove(call_path(path)) end
function os.rename(a, b) guard() return raw_rename(call_path(a), call_path(b)) end
local raw_tmpname = os.tmpname
function os.tmpname() guard() return raw_tmpname() end
for name, f in next, io do
  if type(f) == "function" and name ~= "popen" and name ~= "open" and name ~= "lines" and name ~= "input"
      and name ~= "output" then
    io[name] = function(...) guard() return f(...) end
  end
end
-- files' methods through a function: io.stdout.__index would otherwise hand out the shared metatable
local file_methods = {}
for _, name in next, {"close", "flush", "seek", "setvbuf", "write"} do
  local f = file_mt[name]
  file_methods[name] = function(...) guard() return f(...) end
end
file_mt.__index = function(_, k) return file_methods[k] end

-- Reading lines and numbers in Lua, a chunk at a time: C's own loops never end on a file of NUL bytes
-- (fgets, then strlen finds no line) or of blanks (fscanf), and neither the hook nor a signal reaches them.
local CHUNK = 4096
local ahead = raw_setmetatable({}, {__mode = "k"})  -- what was read past a line's end, per file
local raw_read, raw_seek = file_mt.read, file_mt.seek
local function more(f, buf)
  local chunk, err = raw_read(f, CHUNK)
  if chunk == nil then return nil, err end
  return buf .. chunk
end
local function read_line(f)
  local buf, parts = ahead[f] or "", {}
  ahead[f] = nil
  while true do
    local nl = sfind(buf, "\n", 1, true)
    if nl then
      if nl < #buf then ahead[f] = ssub(buf, nl + 1) end
      parts[#parts + 1] = ssub(buf, 1, nl - 1)
      return concat(parts)
    end
    if buf ~= "" then parts[#parts + 1] = buf end
    local chunk, err = raw_read(f, CHUNK)
    if chunk == nil then
      if err then return nil, err end
      if #parts == 0 then return nil end
      return concat(parts)
    end
    buf = chunk
  end
end
local function read_number(f)
  local buf = ahead[f] or ""
  ahead[f] = nil
  while true do  -- blanks skipped a chunk at a time
    local start = sfind(buf, "[^%s]")
    if start then buf = ssub(buf, start) break end
    buf = raw_read(f, CHUNK)
    if buf == nil then return nil end
  end
  while #buf < 256 and not sfind(buf, "[^%w%.%+%-]") do
    local longer = more(f, buf)
    if longer == nil or longer == buf then break end
    buf = longer
  end
  local text = string_lib.match(buf, "^[%+%-]?[%w%.]*[eEpP]?[%+%-]?%w*")
  if #text < #buf then ahead[f] = ssub(buf, #text + 1) end
  return tonumber(text)
end
local function read_count(f, n)
  local buf = ahead[f]
  if not buf then return raw_read(f, n) end
  if n == 0 then return "" end
  ahead[f] = nil
  if #buf >= n then
    if #buf > n then ahead[f] = ssub(buf, n + 1) end
    return ssub(buf, 1, n)
  end
  local rest = raw_read(f, n - #buf)
  return buf .. (rest or "")
end
local function read_one(f, fmt)
  if type(fmt) == "number" then return read_count(f, fmt) end
  if fmt == "*l" or fmt == "l" then return read_line(f) end
  if fmt == "*n" or fmt == "n" then return read_number(f) end
  if fmt == "*a" or fmt == "a" then
    local buf = ahead[f]
    ahead[f] = nil
    return (buf or "") .. (raw_read(f, "*a") or "")
  end
  error("bad argument #1 to 'read' (invalid format)", 3)
end
function file_methods.read(f, ...)
  guard()
  local n = select("#", ...)
  if n == 0 then return read_line(f) end
  local out = {}
  for i = 1, n do
    local v, err = read_one(f, (select(i, ...)))
    if v == nil then
      if i == 1 then return nil, err end
      return unpack(out, 1, i)  -- what was read, then nil
    end
    out[i] = v
  end
  return unpack(out, 1, n)
end
function file_methods.lines(f)
  guard()
  return function() return read_line(f) end
end
function file_methods.seek(f, whence, offset)  -- the position a script sees: what it has read
  guard()
  local buf = ahead[f]
  if buf then ahead[f] = nil; raw_seek(f, "cur", -#buf) end
  return raw_seek(f, whence, offset)
end
for _, name in next, {"write", "close"} do  -- what was read ahead goes back first (a file opened r+)
  local f = file_methods[name]
  file_methods[name] = function(file, ...)
    local buf = ahead[file]
    if buf then ahead[file] = nil; raw_seek(file, "cur", -#buf) end
    return f(file, ...)
  end
end
function io.read(...) return file_methods.read(io_input(), ...) end
if not math.mod then math.mod = math.fmod end
local raw_date = os.date
function os.date(fmt, t)
  if type(fmt) == "string" then step(#fmt * 16) end
  return raw_date(fmt, t)
end

-- Lua's pattern functions backtrack inside C, where the hook cannot stop them (("a-"):rep(12) .. "b"
-- on 60 a's runs for days). A call whose worst case is large goes to the same matcher written in
-- Lua (plugins/_patterns.lua), which the hook stops at the deadline; the others stay in C.
local cfind, cmatch, cgmatch, cgsub = string.find, string.match, string.gmatch, string.gsub
local PATTERN_STEPS = 1e8  -- a worst case the C matcher may take (well under a second)
local quantified, nquantified = {}, 0
local function quantifiers(p)
  local q = quantified[p]
  if q then return q end
  local bare = cgsub(cgsub(p, "%%[bB]..", "*"), "%%.", "")  -- %bxy backtracks like a quantifier
  local _
  _, q = cgsub(cgsub(bare, "%[%^?%]?[^%]]*%]", "x"), "[%*%+%-%?]", "")
  if cfind(p, "^%^") then q = q - 1 end  -- anchored: no outer loop over the starting positions
  if nquantified > 256 then quantified, nquantified = {}, 0 end
  quantified[p], nquantified = q, nquantified + 1
  return q
end
-- The worst case of a call in steps: (#s + 1) ^ (repetitions + 1) times #p. 0: not a string call.
local function steps(s, p, plain)
  local ts, tp = type(s), type(p)
  if (ts ~= "string" and ts ~= "number") or (tp ~= "string" and tp ~= "number") then return 0 end
  s, p = tostring(s), tostring(p)
  local q = plain and 0 or quantifiers(p)
  return (#s + 1) ^ (q + 1) * (#p + 1)
end
-- The C matcher also recurses once per quantified item, whatever the subject: 200,000 `a-` items on ""
-- overflowed the C stack (the server died); Lua-to-Lua calls use no C stack and end in "stack overflow".
local C_DEPTH = 200
local function slow(s, p, plain)
  local n = steps(s, p, plain)
  if n > PATTERN_STEPS then return true end  -- the matcher in Lua, which the hook stops
  if n > 0 and not plain and quantifiers(tostring(p)) > C_DEPTH then return true end
  step(n)
  return false
end
local lua_patterns
local function patterns()
  if not lua_patterns then lua_patterns = assert(raw_loadstring(pattern_source, "=patterns"))(1) end
  return lua_patterns
end
-- Called through pcall, the C functions' errors lack the script's position and name: add them back.
local C_ERRORS = {"^bad argument", "^malformed pattern", "^invalid capture", "^invalid pattern capture",
                  "^unfinished capture", "^missing '%[' after", "^unbalanced pattern", "^invalid replacement",
                  "^invalid use of", "^string slice too long", "^invalid option", "^invalid format",
                  "^resulting string too large", "^invalid value", "^wrong number of arguments",
                  "^table too big"}
local function c_result(name, ok, ...)
  if ok then return ... end
  local e = ...
  if type(e) == "string" then
    for i = 1, #C_ERRORS do
      if cfind(e, C_ERRORS[i]) then error((cgsub(e, "^(bad argument #%d+ to )'%?'", "%1'" .. name .. "'")), 3) end
    end
  end
  error(e, 0)
end
local function c_call(name, f)
  return function(...) return select(1, c_result(name, pcall(f, ...))) end
end
local plain_find = wrap(py.plain_find)  -- linear, in Python: C's plain search is quadratic at worst
local raw_rep, c_rep = string.rep, c_call("rep", string.rep)
function string.rep(s, n)
  local ts, count = type(s), tonumber(n)  -- a count in a numeric string counts as much
  if (ts == "string" or ts == "number") and count and count > 0 then
    local len = #tostring(s)
    if len == 0 then return "" end  -- C would loop n times for nothing
    if len * count > max_bytes then error("resulting string too large", 2) end
    step(len * count + count)
  end
  return c_rep(s, n)
end
for _, name in next, {"upper", "lower", "reverse"} do
  local c = c_call(name, string[name])
  string[name] = function(s, ...)
    if type(s) == "string" then step(#s * 4) end
    return c(s, ...)
  end
end
local c_format = c_call("format", string.format)
function string.format(fmt, ...)
  local n = size(fmt)
  for i = 1, select("#", ...) do n = n + size((select(i, ...))) end
  step(n * 4)
  return c_format(fmt, ...)
end
function string.find(s, p, init, plain)
  local special = not plain and cfind(tostring(p), "[%^%$%*%+%?%.%(%)%[%]%%%-]")
  if not slow(s, p, not special) then return select(1, c_result("find", pcall(cfind, s, p, init, plain))) end
  if special then return select(1, patterns().find(s, p, init, plain)) end
  return select(1, c_result("find", pcall(plain_find, s, p, init)))
end
function string.match(s, p, init)
  if not slow(s, p) then return select(1, c_result("match", pcall(cmatch, s, p, init))) end
  return select(1, patterns().match(s, p, init))
end
function string.gmatch(s, p)
  if not slow(s, p) then return select(1, c_result("gmatch", pcall(cgmatch, s, p))) end
  return select(1, patterns().gmatch(s, p))
end
function string.gsub(s, p, repl, n)
  local tr = type(repl)  -- a string or table replacement runs in C for every match; a function is Lua
  if tr == "string" then step(size(s) * (#repl + 1)) elseif tr == "table" then step(size(s) * 16) end
  if not slow(s, p) then return select(1, c_result("gsub", pcall(cgsub, s, p, repl, n))) end
  return select(1, patterns().gsub(s, p, repl, n))
end

-- table functions that walk a whole table look at its length first, and at the positions C will see
local function length(t) return type(t) == "table" and #t or 0 end
local c_concat, c_insert, c_remove, c_sort = c_call("concat", table.concat), c_call("insert", table.insert),
  c_call("remove", table.remove), c_call("sort", table.sort)
function table.concat(t, sep, i, j)
  i, j = cint(i), cint(j)
  local n = (tonumber(j) or length(t)) - (tonumber(i) or 1) + 1
  step(n * (16 + size(sep)))
  return c_concat(t, sep, i, j)
end
function table.insert(t, ...)
  if select("#", ...) < 2 then return c_insert(t, ...) end
  local pos, v = ...
  local n = tonumber(pos)
  if type(t) == "table" and n and n > INT_MAX and n < huge and select("#", ...) == 2 then  -- past the end: nothing moves (C would wrap)
    rawset(t, n - n % 1, v)
    return
  end
  pos = cint(pos)
  step((length(t) - (tonumber(pos) or 0)) * 8)
  return c_insert(t, pos, select(2, ...))
end
function table.remove(t, pos)
  pos = cint(pos)
  local n, at = length(t), tonumber(pos)
  if at and at >= 1 and at <= n then step((n - at) * 8) end  -- C removes nothing outside 1..#t
  return c_remove(t, pos)
end
function table.sort(t, f)
  local n = length(t)
  if n > 1 then step(n * log(n) * 12) end
  return c_sort(t, f)
end
-- In Lua: C would walk a large table (calling a C function for each entry) where the hook cannot stop it.
function table.foreach(t, f)
  if type(t) ~= "table" then error("bad argument #1 to 'foreach' (table expected, got " .. type(t) .. ")", 2) end
  for k, v in next, t do
    local r = f(k, v)
    if r ~= nil then return r end
  end
end
function table.foreachi(t, f)
  if type(t) ~= "table" then error("bad argument #1 to 'foreachi' (table expected, got " .. type(t) .. ")", 2) end
  for i = 1, #t do
    local r = f(i, t[i])
    if r ~= nil then return r end
  end
end
function table.maxn(t)
  if type(t) ~= "table" then error("bad argument #1 to 'maxn' (table expected, got " .. type(t) .. ")", 2) end
  local m = 0
  for k in next, t do
    if type(k) == "number" and k > m then m = k end
  end
  return m
end

-- == gopher-lua's text, installed (issue 20; definitions at "Values as text" above) ===========
do
  local number = gotext.number
  gotext.set_c_format(string.format)
  string.format = gotext.format
  S.tostring = gotext.tostring  -- print (C) calls the global tostring, so it writes numbers this way too

  -- io.write and file:write take strings and numbers; numbers written as tostring writes them
  local function with_numbers(write)
    return function(...)
      local n = select("#", ...)
      for i = 1, n do
        if type((select(i, ...))) == "number" then
          local args = {...}
          for j = i, n do
            if type(args[j]) == "number" then args[j] = number(args[j]) end
          end
          return write(unpack(args, 1, n))
        end
      end
      return write(...)
    end
  end
  io.write = with_numbers(io.write)
  file_methods.write = with_numbers(file_methods.write)
  local popen_write = popen_methods.write
  popen_methods.write = with_numbers(popen_write)
end
-- == end of "gopher-lua's text, installed" ====================================================

for name, f in next, S do G[name] = f end
newproxy, gcinfo, python = nil, nil, nil  -- newproxy: userdata finalizers run with no time limit
package.loaded._G, package.loaded.debug = nil, nil
package.loadlib, package.seeall, package.cpath = nil, nil, ""  -- no C code; seeall exposes the real globals
local kv_methods = {}
function kv_methods:getKey() return self.key end
function kv_methods:getValue() return self.value end
local kv_mt = {__index = function(_, k) return kv_methods[k] end, __metatable = false}
EtcdKV = {}
function EtcdKV.new(key, value) return raw_setmetatable({key = key, value = value}, kv_mt) end
function EtcdKV.getKey(kv) return kv_methods.getKey(kv) end
function EtcdKV.getValue(kv) return kv_methods.getValue(kv) end

local base = copy(G)
base._G = nil
for k, v in next, base do if type(v) == "table" then LIBS[k] = true end end

local meta = {__metatable = false}
-- first use of a global: libraries are copied, everything is kept in the call's globals
function meta.__index(env, k)
  local v = base[k]
  if v == nil then return nil end
  if LIBS[k] then
    v = copy(v)
    if k == "string" then string_mt.__index = v
    elseif k == "package" then v.loaded, v.preload, v.loaders = loaded(), {}, {} end
    rawset(loaded(), k, v)
  end
  rawset(env, k, v)
  return v
end

local function invoke(main, env, fname, ...)
  main()
  local f = env[fname]
  if f == nil then return false end
  return true, f(...)
end
local function finish(ok, ...)
  if io_changed then
    io_changed = false
    if io_output() ~= stdout then io_output(stdout) end
    if io_input() ~= stdin then io_input(stdin) end
  end
  inline, current_env, current_loaded = false, nil, nil
  string_mt.__index = string_lib
  if not ok then
    local e = ...
    if type(e) ~= "string" and type(e) ~= "number" then e = "(error object is a " .. type(e) .. " value)" end
    error(e, 0)
  end
  return ...
end
local function run(main, fname, in_line, ...)
  string_mt.__index = string_lib
  current_loaded, inline = nil, in_line
  if nthreads > 0 then threads, nthreads = {}, 0 end  -- the runner has forgotten them already
  -- two hash slots from the start (the nil field only sizes the table): _G and the handler
  local env = raw_setmetatable({_G = false, handler = nil}, meta)
  env._G = env
  current_env = env
  raw_setfenv(main, env)
  return finish(pcall(invoke, main, env, fname, ...))
end
local function compile(source, chunkname)
  return text_chunk(source, chunkname, base)
end
-- a durable message's description, OnMessage's third argument, made here rather than pushed from Python
local function run_message(main, fname, in_line, a, b, id, stream, sequence, attempt, subject, tick)
  return run(main, fname, in_line, a, b,
             {id = id, stream = stream, sequence = sequence, attempt = attempt, subject = subject, tick = tick})
end
-- The hook stays set between calls (no Lua runs then): setting it per call would cost more than it does.
sethook(hook, "", CHECK)
return run, compile, wrap, run_message
