"""Helpers shared by the bundled plugins (not a plugin itself: its name starts with "_").

PRELUDE is Lua for a module's Lua code. A module is loaded once per Lua runtime and each call
gets a shallow copy of its table, so a table *inside* a module (an object's metatable, a table
of constants) is shared by every call of the script. These helpers keep such tables out of a
script's reach, so that nothing one call changes outlives it, and make errors from Python
functions point at the script's line.
"""

from msgscript import LuaError

PRELUDE = r"""
local function readonly_error() error("attempt to change a read-only table of a module", 2) end

-- A view of `t` that scripts can read but not change.
local function readonly(t)
  return setmetatable({}, {__index = t, __newindex = readonly_error, __metatable = false})
end

-- The metatable for a module's objects, and what getmetatable(obj) gives scripts (the module
-- field they compare with): a read-only view, so the methods cannot be swapped.
local function class(methods, fields)
  local public = readonly({__index = readonly(methods)})
  local mt = {__index = methods, __metatable = public}
  for k, v in pairs(fields or {}) do mt[k] = v end
  return mt, public
end

-- Calls a Python function so that its errors point at the script's line, not at this module's.
local function call(f, ...)
  local r = {pcall(f, ...)}
  if not r[1] then error(r[2], 3) end
  return unpack(r, 2, table.maxn(r))
end
"""


def readonly(ctx, table, name: str):
    """A read-only view of a Lua table (e.g. one shared object a module hands out)."""
    return ctx.lua.execute(PRELUDE + "return readonly(...)", table, name=f"={name}")


def move_off_the_loop(ctx) -> None:
    """Called by a @pure function whose work turns out big: a call running inline on the event
    loop moves to a worker thread (and runs again there); elsewhere this does nothing."""
    ctx.move_to_worker()


INLINE_SIZE = 256 * 2**10  # text this long is not "quick": a call on the event loop moves to a worker


class OutputBudget:
    """What an encoder has produced so far, against `limit` bytes (the script's memory cap): past it a
    LuaError; past INLINE_SIZE `on_big()` is called once (a call on the event loop moves to a worker)."""

    what = "output"

    def __init__(self, limit: int = 2**62, on_big=None):
        self.limit, self.on_big, self.size = limit, on_big, 0

    def grow(self, n: int) -> None:
        self.size += n
        if self.on_big is not None and self.size > INLINE_SIZE:
            on_big, self.on_big = self.on_big, None
            on_big()
        if self.size > self.limit:
            raise LuaError(f"{self.what} of more than {self.limit} bytes does not fit in the script's memory limit")
