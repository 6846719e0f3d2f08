-- Lua 5.1's string.find, string.match, string.gmatch and string.gsub written in Lua.
--
-- The C versions (lstrlib.c) backtrack inside C, where the instruction-count hook that
-- enforces a script's deadline never fires: string.find(("a"):rep(60), ("a-"):rep(12) .. "b")
-- runs for days. These run the same algorithm, step for step, as Lua code, so the hook fires
-- inside them and the deadline stops them. Results and error messages are those of Lua 5.1.5's
-- lstrlib.c; the one deliberate difference is Lua 5.2's recursion limit (MAXCCALLS, "pattern too
-- complex"), where 5.1's C code recurses until the C stack overflows.
--
-- Usage: the chunk returns {find = ..., match = ..., gmatch = ..., gsub = ...}. Load it with the
-- real globals (it keeps string.byte, string.sub, ... as it finds them at load time). Its
-- optional argument is the number of Lua frames a caller puts between the script and these
-- functions (a wrapper that calls them without a tail call counts 1): error messages then get
-- the position prefix of the script's line, and "bad argument" errors the name the script used,
-- as the C functions' messages do.
--
-- Nothing here matches in C: the subject is read with string.byte, one byte at a time, and the
-- only other C calls are string.sub, table.concat and (at load time) the C string.find, to learn
-- the character classes of the C library's locale.

local EXTRA = tonumber((...)) or 0

local byte, sub, char, concat = string.byte, string.sub, string.char, table.concat
local cfind, format = string.find, string.format
local type, tonumber, select, error, pcall, rawget = type, tonumber, select, error, pcall, rawget
local pairs, ipairs, unpack = pairs, ipairs, unpack
local floor, ceil = math.floor, math.ceil
local getinfo = type(debug) == "table" and debug.getinfo or nil

local MAXCCALLS = 200    -- nested matcher calls, as lstrlib.c of Lua 5.2+ (error "pattern too complex")
local MAXCAPTURES = 32   -- LUA_MAXCAPTURES
local CAP_UNFINISHED, CAP_POSITION = -1, -2
local L_ESC = 37         -- '%'

-- Errors raised while matching are thrown as {TAG, message} and re-raised by the public function
-- at its caller's level, as luaL_error does; anything else (the deadline hook, a replacement
-- function's error) passes through unchanged.
local TAG = {}
local function throw(msg) error({TAG, msg}, 0) end

-------------------------------------------------------------------------------
-- Character classes: 256-entry membership tables (byte -> true)
-------------------------------------------------------------------------------

local ANY, LIT, CLASS = {}, {}, {}
for c = 0, 255 do ANY[c] = true; LIT[c] = {[c] = true} end
for _, cl in ipairs({"a", "c", "d", "l", "p", "s", "u", "w", "x", "z"}) do
  local yes, no = {}, {}
  for c = 0, 255 do
    if cfind(char(c), "%" .. cl) then yes[c] = true else no[c] = true end
  end
  CLASS[byte(cl)], CLASS[byte(cl:upper())] = yes, no
end

-------------------------------------------------------------------------------
-- The state of the running match (set by setstate before every match)
-------------------------------------------------------------------------------

local S, SLEN         -- subject and its length; positions are 1 .. SLEN + 1
local PB              -- pattern bytes, PB[plen + 1] == PB[plen + 2] == 0 (C's terminator)
local EP, SETS, FIRST -- per pattern position: classend, the item's set, the prefilter
local CAPI, CAPL = {}, {}  -- capture start and length (or CAP_UNFINISHED / CAP_POSITION)
local LEVEL = 0       -- number of captures (finished or not)

local cache, ncache = {}, 0

-- The compiled form of a pattern: its bytes up to the first "\0" (the C code reads the pattern
-- as a C string) and tables filled in as the matcher meets each position. Everything in them is
-- a pure function of the pattern, so compiled patterns are cached.
local function compile(p)
  local cp = cache[p]
  if cp then return cp end
  local pb, n = {}, 0
  for i = 1, #p do
    local c = byte(p, i)
    if c == 0 then break end
    n = i
    pb[i] = c
  end
  pb[n + 1], pb[n + 2] = 0, 0
  cp = {pb = pb, ep = {}, sets = {}, first = {}}
  if #p <= 256 then
    if ncache >= 64 then cache, ncache = {}, 0 end
    cache[p], ncache = cp, ncache + 1
  end
  return cp
end

local function setstate(s, cp)
  S, SLEN, PB, EP, SETS, FIRST = s, #s, cp.pb, cp.ep, cp.sets, cp.first
end

-------------------------------------------------------------------------------
-- The matcher (lstrlib.c's match and its helpers)
-------------------------------------------------------------------------------

local function classend(p)
  local pb = PB
  local c = pb[p]
  p = p + 1
  if c == L_ESC then
    if pb[p] == 0 then throw("malformed pattern (ends with '%')") end
    return p + 1
  elseif c == 91 then  -- '['
    if pb[p] == 94 then p = p + 1 end  -- '^'
    repeat  -- look for a ']'
      local cc = pb[p]
      if cc == 0 then throw("malformed pattern (missing ']')") end
      p = p + 1
      if cc == L_ESC and pb[p] ~= 0 then p = p + 1 end  -- skip escapes (e.g. '%]')
    until pb[p] == 93
    return p + 1
  end
  return p
end

-- matchbracketclass for every byte at once: the set [...] from p ('[') to ec (']').
local function buildset(p, ec)
  local pb, t = PB, {}
  local negate = pb[p + 1] == 94
  if negate then p = p + 1 end
  p = p + 1
  while p < ec do
    local c = pb[p]
    if c == L_ESC then
      p = p + 1
      local cl = CLASS[pb[p]]
      if cl then
        for k in pairs(cl) do t[k] = true end
      else
        t[pb[p]] = true
      end
    elseif pb[p + 1] == 45 and p + 2 < ec then  -- a range
      for k = c, pb[p + 2] do t[k] = true end
      p = p + 2
    else
      t[c] = true
    end
    p = p + 1
  end
  if negate then
    local u = {}
    for k = 0, 255 do if not t[k] then u[k] = true end end
    t = u
  end
  return t
end

-- The set of bytes a single-character item (at p, ending before ep) matches (singlematch).
local function itemset(p, ep)
  local c = PB[p]
  if c == 46 then return ANY  -- '.'
  elseif c == L_ESC then
    local cl = PB[p + 1]
    return CLASS[cl] or LIT[cl]
  elseif c == 91 then return buildset(p, ep - 1)
  end
  return LIT[c]
end

local function getset(p, ep)
  local set = SETS[p]
  if not set then
    set = itemset(p, ep)
    SETS[p] = set
  end
  return set
end

-- A prefilter for the match at p: the set of bytes the subject must have there for the match to
-- get past its first item, when that item is a single-character one that cannot match empty
-- (after any opening captures, which the C code always enters first). Only used where the C code
-- is sure to try at least one match at p, and only when entering those captures cannot fail, so
-- that skipping the positions it rules out changes neither results nor errors.
local function prefilter(p, depth)
  local f = FIRST[p]
  if f == nil then
    local pb, q, k = PB, p, 0
    while pb[q] == 40 do  -- '('
      if pb[q + 1] == 41 then q = q + 2 else q = q + 1 end
      k = k + 1
    end
    local c, c1 = pb[q], pb[q + 1]
    if c == 0 or c == 41 or (c == 36 and c1 == 0)
        or (c == L_ESC and (c1 == 98 or c1 == 102 or (c1 >= 48 and c1 <= 57))) then
      f = false
    else
      f = {k}  -- the item is at q: fill in below, when its classend may be evaluated
      f.q = q
    end
    FIRST[p] = f
  end
  if not f or depth + f[1] > MAXCCALLS or LEVEL + f[1] > MAXCAPTURES then return nil end
  local set = f[2]
  if set == nil then
    local q = f.q
    local ep = EP[q]
    if not ep then
      ep = classend(q)
      EP[q] = ep
    end
    local quant = PB[ep]
    if quant == 42 or quant == 45 or quant == 63 then  -- '*', '-', '?'
      set = false
    else
      set = getset(q, ep)
    end
    f[2] = set
  end
  return set or nil
end

local match

local function start_capture(s, p, what, d)
  local level = LEVEL
  if level >= MAXCAPTURES then throw("too many captures") end
  level = level + 1
  CAPI[level], CAPL[level], LEVEL = s, what, level
  local res = match(s, p, d + 1)
  if not res then LEVEL = LEVEL - 1 end  -- undo capture
  return res
end

local function end_capture(s, p, d)
  local l = LEVEL
  while l >= 1 and CAPL[l] ~= CAP_UNFINISHED do l = l - 1 end
  if l < 1 then throw("invalid pattern capture") end
  CAPL[l] = s - CAPI[l]  -- close capture
  local res = match(s, p, d + 1)
  if not res then CAPL[l] = CAP_UNFINISHED end  -- undo capture
  return res
end

local function match_capture(s, c)
  local l = c - 48  -- '1' -> capture 1
  if l < 1 or l > LEVEL or CAPL[l] == CAP_UNFINISHED then throw("invalid capture index") end
  local len = CAPL[l]
  if len == CAP_POSITION then return nil end  -- (size_t)-2 never fits
  if SLEN - s + 1 >= len then
    local init = CAPI[l]
    if len == 0 or sub(S, s, s + len - 1) == sub(S, init, init + len - 1) then return s + len end
  end
  return nil
end

local function matchbalance(s, p)
  local b, e = PB[p], PB[p + 1]
  if b == 0 or e == 0 then throw("unbalanced pattern") end
  if s > SLEN or byte(S, s) ~= b then return nil end
  local cont, n = 1, SLEN
  s = s + 1
  while s <= n do
    local c = byte(S, s)
    if c == e then
      cont = cont - 1
      if cont == 0 then return s + 1 end
    elseif c == b then
      cont = cont + 1
    end
    s = s + 1
  end
  return nil  -- string ends out of balance
end

local function max_expand(s, set, ep, d)
  local i, n = s, SLEN
  while i <= n and set[byte(S, i)] do i = i + 1 end  -- counts maximum expand for item
  local p = ep + 1
  local fs = prefilter(p, d + 1)
  if fs then
    while i >= s do
      if i <= n and fs[byte(S, i)] then
        local res = match(i, p, d + 1)
        if res then return res end
      end
      i = i - 1
    end
    return nil
  end
  while i >= s do  -- keeps trying to match with the maximum repetitions
    local res = match(i, p, d + 1)
    if res then return res end
    i = i - 1
  end
  return nil
end

local function min_expand(s, set, ep, d)
  local p, n = ep + 1, SLEN
  local fs = prefilter(p, d + 1)
  while true do
    if not fs or (s <= n and fs[byte(S, s)]) then
      local res = match(s, p, d + 1)
      if res then return res end
    end
    if s <= n and set[byte(S, s)] then
      s = s + 1  -- try with one more repetition
    else
      return nil
    end
  end
end

-- Returns the position after the match of the pattern from p against the subject from s, or nil.
function match(s, p, d)
  if d > MAXCCALLS then throw("pattern too complex") end
  local pb = PB
  while true do
    local c = pb[p]
    if c == 40 then  -- '(': start capture
      if pb[p + 1] == 41 then return start_capture(s, p + 2, CAP_POSITION, d) end
      return start_capture(s, p + 1, CAP_UNFINISHED, d)
    elseif c == 41 then  -- ')': end capture
      return end_capture(s, p + 1, d)
    elseif c == 0 then  -- end of pattern
      return s
    elseif c == 36 and pb[p + 1] == 0 then  -- '$' at the end of the pattern
      if s == SLEN + 1 then return s end
      return nil
    elseif c == L_ESC and pb[p + 1] == 98 then  -- %bxy
      s = matchbalance(s, p + 2)
      if not s then return nil end
      p = p + 4
    elseif c == L_ESC and pb[p + 1] == 102 then  -- %f[set]
      p = p + 2
      if pb[p] ~= 91 then throw("missing '[' after '%f' in pattern") end
      local ep = EP[p]
      if not ep then
        ep = classend(p)
        EP[p] = ep
      end
      local set = getset(p, ep)
      local previous = 0
      if s > 1 then previous = byte(S, s - 1) end
      if set[previous] or not set[byte(S, s) or 0] then return nil end
      p = ep
    elseif c == L_ESC and pb[p + 1] >= 48 and pb[p + 1] <= 57 then  -- %0-%9
      s = match_capture(s, pb[p + 1])
      if not s then return nil end
      p = p + 2
    else  -- a single-character item, maybe with a quantifier
      local ep = EP[p]
      if not ep then
        ep = classend(p)
        EP[p] = ep
      end
      local set = SETS[p]
      if not set then
        set = itemset(p, ep)
        SETS[p] = set
      end
      local q = pb[ep]
      if q == 42 then  -- '*'
        return max_expand(s, set, ep, d)
      elseif q == 45 then  -- '-'
        return min_expand(s, set, ep, d)
      end
      local m = s <= SLEN and set[byte(S, s)]
      if q == 43 then  -- '+'
        if m then return max_expand(s + 1, set, ep, d) end
        return nil
      elseif q == 63 then  -- '?'
        if m then
          local res = match(s + 1, ep + 1, d + 1)
          if res then return res end
        end
        p = ep + 1
      else
        if not m then return nil end
        s, p = s + 1, ep
      end
    end
  end
end

-- Capture i (1-based) of the match s .. e - 1 (push_onecapture).
local function capture(i, s, e)
  if i > LEVEL then
    if i == 1 then return sub(S, s, e - 1) end  -- no captures: the whole match
    throw("invalid capture index")
  end
  local l = CAPL[i]
  if l == CAP_UNFINISHED then throw("unfinished capture") end
  if l == CAP_POSITION then return CAPI[i] end
  local init = CAPI[i]
  return sub(S, init, init + l - 1)
end

local function captures(i, n, s, e)
  if i > n then return end
  return capture(i, s, e), captures(i + 1, n, s, e)
end

-------------------------------------------------------------------------------
-- Arguments, as lauxlib checks them
-------------------------------------------------------------------------------

-- lua_Integer from a number as the C cast does on this machine, including the undefined cases
-- (out of range, NaN), which string.format("%d") shows.
local function probe(x)
  local ok, r = pcall(format, "%d", x)
  return ok and tonumber(r) or -2 ^ 63
end
local HUGE_POS, HUGE_NEG, NAN_INT = probe(1e300), probe(-1e300), probe(0 / 0)

local function tointeger(d)
  if d ~= d then return NAN_INT end
  if d >= 2 ^ 63 then return HUGE_POS end
  if d < -2 ^ 63 then return HUGE_NEG end
  if d >= 0 then return floor(d) end
  return ceil(d)
end

local function toint(d)  -- (int) of a lua_Integer (luaL_checkint)
  if d >= 2 ^ 63 then return -1 end  -- INT64_MAX
  d = d % 2 ^ 32
  if d >= 2 ^ 31 then d = d - 2 ^ 32 end
  return d
end

-- Called by checkstring / optinteger / the entry functions, so that the function the script
-- called is at level 3 (+ EXTRA) from here.
local function argerror(narg, extramsg, fname)
  local name = fname
  local ar = getinfo and getinfo(3 + EXTRA, "n")
  if ar then
    if ar.namewhat == "method" then
      narg = narg - 1
      if narg == 0 then
        error("calling '" .. (ar.name or "?") .. "' on bad self (" .. extramsg .. ")", 4 + EXTRA)
      end
    end
    name = ar.name or "?"
  end
  error("bad argument #" .. narg .. " to '" .. name .. "' (" .. extramsg .. ")", 4 + EXTRA)
end

local function checkstring(v, narg, nargs, fname)
  local t = type(v)
  if t == "string" then return v end
  if t == "number" then return v .. "" end
  argerror(narg, "string expected, got " .. (narg > nargs and "no value" or t), fname)
end

local function checkrepl(tr)
  if tr ~= "string" and tr ~= "number" and tr ~= "function" and tr ~= "table" then
    argerror(3, "string/function/table expected", "gsub")
  end
end

local function optinteger(v, narg, default, fname)
  if v == nil then return default end
  local n = tonumber(v)
  if n == nil or (type(v) ~= "number" and type(v) ~= "string") then
    argerror(narg, "number expected, got " .. type(v), fname)
  end
  return tointeger(n)
end

local function posrelat(pos, len)  -- Lua 5.1's
  if pos < 0 then pos = pos + len + 1 end
  if pos >= 0 then return pos end
  return 0
end

-- Re-raise: a matcher error at the caller of the public function (finish is tail-called by it,
-- which takes the public function's frame: level 3 is the script), others unchanged.
local function finish(ok, ...)
  if ok then return ... end
  local e = ...
  if type(e) == "table" and rawget(e, 1) == TAG then error(rawget(e, 2), 3 + EXTRA) end
  error(e, 0)
end

local function finish_iter(ok, ...)  -- the same for gmatch's iterator, which the script calls
  if ok then return ... end
  local e = ...
  if type(e) == "table" and rawget(e, 1) == TAG then error(rawget(e, 2), 3) end
  error(e, 0)
end

-------------------------------------------------------------------------------
-- find, match
-------------------------------------------------------------------------------

local function has_specials(p)  -- strpbrk(p, "^$*+?.([%-"), p read as a C string
  for i = 1, #p do
    local c = byte(p, i)
    if c == 0 then return false end
    if c == 94 or c == 36 or c == 42 or c == 43 or c == 63 or c == 46 or c == 40 or c == 91
        or c == 37 or c == 45 then
      return true
    end
  end
  return false
end

local function plainfind(s, init, p)  -- lmemfind: the first p in s after offset init
  local l2, ls = #p, #s
  if l2 == 0 then return init + 1 end
  if l2 > ls - init then return nil end
  local first = byte(p, 1)
  if l2 == 1 then
    for i = init + 1, ls do
      if byte(s, i) == first then return i end
    end
    return nil
  end
  local last, off = byte(p, l2), l2 - 1
  for i = init + 1, ls - off do
    if byte(s, i) == first and byte(s, i + off) == last and sub(s, i, i + off) == p then return i end
  end
  return nil
end

local function find_aux(isfind, s, p, init, plain)
  local ls = #s
  init = posrelat(init, ls) - 1
  if init < 0 then init = 0 elseif init > ls then init = ls end
  if isfind and (plain or not has_specials(p)) then  -- do a plain search
    local i = plainfind(s, init, p)
    if i then return i, i + #p - 1 end
    return nil
  end
  local cp = compile(p)
  setstate(s, cp)
  local start = 1
  local anchor = PB[1] == 94
  if anchor then start = 2 end
  local s1 = init + 1
  LEVEL = 0
  local fs = not anchor and prefilter(start, 1)
  while true do
    if fs then
      while s1 <= ls and not fs[byte(s, s1)] do s1 = s1 + 1 end
      if s1 > ls then break end  -- the end of the subject cannot match either
    end
    LEVEL = 0
    local e = match(s1, start, 1)
    if e then
      if isfind then return s1, e - 1, captures(1, LEVEL) end
      return captures(1, LEVEL == 0 and 1 or LEVEL, s1, e)
    end
    s1 = s1 + 1
    if anchor or s1 > ls + 1 then break end
  end
  return nil
end

local function find(...)
  local nargs = select("#", ...)
  local s, p, init, plain = ...
  s = checkstring(s, 1, nargs, "find")
  p = checkstring(p, 2, nargs, "find")
  init = optinteger(init, 3, 1, "find")
  return finish(pcall(find_aux, true, s, p, init, plain and true or false))
end

local function str_match(...)
  local nargs = select("#", ...)
  local s, p, init = ...
  s = checkstring(s, 1, nargs, "match")
  p = checkstring(p, 2, nargs, "match")
  init = optinteger(init, 3, 1, "match")
  return finish(pcall(find_aux, false, s, p, init, false))
end

-------------------------------------------------------------------------------
-- gmatch (in 5.1 a leading '^' is an ordinary character here)
-------------------------------------------------------------------------------

local function gmatch(...)
  local nargs = select("#", ...)
  local s, p = ...
  s = checkstring(s, 1, nargs, "gmatch")
  p = checkstring(p, 2, nargs, "gmatch")
  local cp = compile(p)
  local pos = 0  -- offset where the next search starts
  local function step()
    setstate(s, cp)
    local ls = #s
    local src = pos + 1
    LEVEL = 0
    local fs = src <= ls + 1 and prefilter(1, 1)  -- (only if the C code tries a match)
    while src <= ls + 1 do
      if fs then
        while src <= ls and not fs[byte(s, src)] do src = src + 1 end
        if src > ls then break end
      end
      LEVEL = 0
      local e = match(src, 1, 1)
      if e then
        local newstart = e - 1
        if e == src then newstart = newstart + 1 end  -- empty match? go at least one position
        pos = newstart
        return captures(1, LEVEL == 0 and 1 or LEVEL, src, e)
      end
      src = src + 1
    end
  end
  return function()
    return finish_iter(pcall(step))
  end
end

-------------------------------------------------------------------------------
-- gsub
-------------------------------------------------------------------------------

-- add_s's reading of a replacement string: literal strings, and capture numbers (0: the match).
-- A '%' before a non-digit is that character; a '%' at the end is the string's terminator "\0".
local function parse_repl(r)
  local parts, n, lit = {}, 0, {}
  local i, l = 1, #r
  while i <= l do
    local c = byte(r, i)
    if c ~= L_ESC then
      lit[#lit + 1] = c
    else
      i = i + 1
      local d = byte(r, i) or 0
      if d < 48 or d > 57 then
        lit[#lit + 1] = d
      else
        if #lit > 0 then
          n = n + 1
          parts[n] = char(unpack(lit))
          lit = {}
        end
        n = n + 1
        parts[n] = d - 48
      end
    end
    if #lit >= 200 then  -- keep char()'s argument list short
      n = n + 1
      parts[n] = char(unpack(lit))
      lit = {}
    end
    i = i + 1
  end
  if #lit > 0 then
    n = n + 1
    parts[n] = char(unpack(lit))
  end
  return parts, n
end

local function gsub_aux(src, p, repl, tr, max_s)
  local cp = compile(p)
  setstate(src, cp)
  local start = 1
  local anchor = PB[1] == 94
  if anchor then start = 2 end
  local ls = #src
  local parts, nparts, constant
  if tr == "string" then
    parts, nparts = parse_repl(repl)
    if nparts == 0 then
      constant = ""
    elseif nparts == 1 and type(parts[1]) == "string" then
      constant = parts[1]
    end
  end
  local out, no = {}, 0
  local n = 0
  local si, lit = 1, 1  -- current position; start of the text not yet copied
  LEVEL = 0
  local fs = not anchor and max_s > 0 and prefilter(start, 1)  -- (only if the C code tries a match)
  while n < max_s do
    if fs then
      while si <= ls and not fs[byte(src, si)] do si = si + 1 end
      if si > ls then break end
    end
    LEVEL = 0
    local e = match(si, start, 1)
    if e then
      n = n + 1
      if lit < si then
        no = no + 1
        out[no] = sub(src, lit, si - 1)
      end
      lit = si
      if constant then
        no = no + 1
        out[no] = constant
      elseif parts then
        for k = 1, nparts do
          local part = parts[k]
          no = no + 1
          if type(part) == "string" then
            out[no] = part
          elseif part == 0 then
            out[no] = sub(src, si, e - 1)
          else
            out[no] = capture(part, si, e)
          end
        end
      else
        local v
        if tr == "function" then
          v = repl(captures(1, LEVEL == 0 and 1 or LEVEL, si, e))
        else
          v = repl[capture(1, si, e)]
        end
        setstate(src, cp)  -- the replacement may have run another match
        if not v then  -- nil or false: keep the original text
          v = sub(src, si, e - 1)
        else
          local tv = type(v)
          if tv ~= "string" and tv ~= "number" then throw("invalid replacement value (a " .. tv .. ")") end
        end
        no = no + 1
        out[no] = v
      end
    end
    if e and e > si then  -- non empty match? skip it
      si, lit = e, e
    elseif si <= ls then
      si = si + 1
    else
      break
    end
    if anchor then break end
  end
  if lit <= ls then
    no = no + 1
    out[no] = sub(src, lit, ls)
  end
  return concat(out, "", 1, no), n
end

local function gsub(...)
  local nargs = select("#", ...)
  local src, p, repl, max_s = ...
  src = checkstring(src, 1, nargs, "gsub")
  p = checkstring(p, 2, nargs, "gsub")
  local tr = type(repl)
  if max_s == nil then
    max_s = #src + 1
  else
    max_s = toint(optinteger(max_s, 4, nil, "gsub"))
  end
  checkrepl(tr)
  if tr == "number" then repl, tr = repl .. "", "string" end
  return finish(pcall(gsub_aux, src, p, repl, tr, max_s))
end

return {find = find, match = str_match, gmatch = gmatch, gsub = gsub}
