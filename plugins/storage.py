"""`storage`: the gopher-lua-libs v0.5.0 "memory" driver, a JSON file plus a process-wide cache.

File format (compatible with the original):
`{"data":{"<key>":{"value":"<base64 of the JSON bytes>","max_valid_at":<unix ns>}}}`.
"""

import atexit
import base64
import decimal
import json
import logging
import math
import os
import sys
import threading
import time
import types

log = logging.getLogger("msgscript.storage")

SYNC_INTERVAL = 60.0
FOREVER_SECONDS = 10_000_000_000_000  # the original's "no ttl"
_INT64_MAX = 2**63 - 1

_LUA = r"""
local M, py = ...
local state = setmetatable({}, {__mode = "k"})
local function check(self)
  local st = state[self]
  if st == nil then error("storage_ud expected", 3) end
  return st
end
local Storage = {__name = "storage_ud", __index = {}}
for _, name in ipairs({"set", "get", "keys", "dump", "sync", "close"}) do
  local f = py[name]
  Storage.__index[name] = function(self, ...) return f(check(self), ...) end
end
M.Storage = Storage
-- Lua objects for this runtime, by store, so one path gives one object
local objects = setmetatable({}, {__mode = "v"})
function M.open(path, driver)
  local store, err = py.open(path, driver)
  if store == nil then return nil, err end
  local key = py.identity(store)
  local obj = objects[key]
  if obj == nil or py.identity(state[obj]) ~= key then
    obj = setmetatable({}, Storage)
    state[obj] = store
    objects[key] = obj
  end
  return obj
end
return M
"""


###############################################################################
# JSON with gopher-json's rules ###############################################
###############################################################################

class EncodeError(ValueError):
    """A Lua value that gopher-json refuses to encode."""


def _json_float(value):
    if not math.isfinite(value):
        raise EncodeError(f"json: unsupported value: {value}")
    if value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    if value != 0 and (abs(value) < 1e-6 or abs(value) >= 1e21):
        return repr(value).replace("e-0", "e-")
    return format(decimal.Decimal(repr(value)), "f")


def _json_string(value):
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    else:
        value = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    text = json.dumps(value, ensure_ascii=False)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                         ("\u2029", "\\u2029")):
        text = text.replace(char, escape)
    return text


class LuaJson:
    """Encode a Lua value as JSON the way layeh/gopher-json does (empty table -> [], sorted keys)."""

    def __init__(self, identity):
        self.identity = identity
        self.seen = set()

    def encode(self, value):
        if value is None:
            return "null"
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int):
            return str(value)
        if isinstance(value, float):
            return _json_float(value)
        if isinstance(value, (str, bytes)):
            return _json_string(value)
        if type(value).__name__ == "_LuaTable":
            return self.table(value)
        kind = type(value).__name__.removeprefix("_Lua").lower()
        raise EncodeError(f"cannot encode {kind} to JSON")

    def table(self, t):
        address = self.identity(t)
        if address in self.seen:
            raise EncodeError("cannot encode recursively nested tables to JSON")
        self.seen.add(address)
        items = list(t.items())
        if not items:
            return "[]"
        if isinstance(items[0][0], (int, float)) and not isinstance(items[0][0], bool):
            return self.array(items)
        if not all(isinstance(k, bytes) for k, _ in items):
            raise EncodeError("cannot encode mixed or invalid key types")
        items.sort(key=lambda kv: kv[0])
        return "{" + ",".join(_json_string(k) + ":" + self.encode(v) for k, v in items) + "}"

    def array(self, items):
        for i, (k, _) in enumerate(items, 1):
            if not isinstance(k, (int, float)) or isinstance(k, bool):
                raise EncodeError("cannot encode mixed or invalid key types")
            if k != i:
                raise EncodeError("cannot encode sparse array")
        return "[" + ",".join(self.encode(v) for _, v in items) + "]"


def _lua_ready(value):
    """Decoded JSON -> values for ctx.to_lua: nulls dropped (arrays renumbered), huge ints as floats."""
    if isinstance(value, dict):
        return {k: _lua_ready(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_lua_ready(v) for v in value if v is not None]
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value <= _INT64_MAX:
        return float(value)
    return value


def json_decode(data):
    """JSON bytes -> Lua-ready Python value."""
    return _lua_ready(json.loads(data))


###############################################################################
# Stores ######################################################################
###############################################################################

def _process_state():
    """Registry of open stores for the whole process.

    Kept outside this module because msgscript imports plugin files afresh on every
    load_plugins() call; one path must still map to one store.
    """
    name = "_msgscript_storage_state"
    holder = sys.modules.setdefault(name, types.ModuleType(name))
    fresh = types.SimpleNamespace(stores={}, lock=threading.Lock(), syncer=None)
    return vars(holder).setdefault("state", fresh)  # setdefault: atomic if two imports race


_STATE = _process_state()


class Store:
    """One storage file's contents, shared by every script in the process."""

    def __init__(self, path):
        self.path = path
        self.lock = threading.RLock()
        self.data = {}  # key -> (json bytes, max_valid_at ns)
        self.users = 0

    @classmethod
    def open(cls, path):
        """The shared store for path (loading or creating its file); raises OSError/ValueError."""
        with _STATE.lock:
            store = _STATE.stores.get(path)
            if store is None:
                store = cls(path)
                store.load()
                store.sync()
                _STATE.stores[path] = store
                _start_syncer()
            with store.lock:
                store.users += 1
        return store

    def load(self):
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb") as f:
            raw = f.read()
        if not raw.strip():
            return
        entries = (json.loads(raw).get("data") or {}).items()
        self.data = {k: (base64.b64decode(v.get("value") or ""), int(v.get("max_valid_at") or 0)) for k, v in entries}

    def set(self, key, value, ttl):
        ttl_ns = (ttl if ttl and ttl > 0 else FOREVER_SECONDS) * 1_000_000_000
        with self.lock:
            self.data[key] = (value, min(time.time_ns() + int(ttl_ns), _INT64_MAX))

    def get(self, key):
        """The JSON bytes of a live key, or None."""
        with self.lock:
            entry = self.data.get(key)
        if entry is None or entry[1] <= time.time_ns():
            return None
        return entry[0]

    def keys(self):
        with self.lock:
            return list(self.data)

    def live(self):
        now = time.time_ns()
        with self.lock:
            return {k: v for k, (v, until) in self.data.items() if until > now}

    def sync(self):
        """Drop expired keys, then write the file through path.tmp and a rename."""
        with self.lock:
            now = time.time_ns()
            self.data = {k: e for k, e in self.data.items() if e[1] > now}
            doc = {"data": {k: {"value": base64.b64encode(v).decode(), "max_valid_at": until}
                            for k, (v, until) in self.data.items()}}
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(doc, f, separators=(",", ":"))
            os.replace(tmp, self.path)

    def close(self):
        self.sync()
        with self.lock:
            self.users = max(0, self.users - 1)


def _sync_all(forget_unused=False):
    with _STATE.lock:
        stores = list(_STATE.stores.values())
    for store in stores:
        try:
            store.sync()
        except FileNotFoundError:
            # Its directory is gone (deleted while the server ran): nothing left to save into.
            with _STATE.lock:
                _STATE.stores.pop(store.path, None)
            continue
        except OSError as e:
            log.error("storage %s: sync failed: %s", store.path, e)
            continue
        if forget_unused:
            with _STATE.lock:
                if store.users == 0:
                    _STATE.stores.pop(store.path, None)


def _sync_loop():
    while True:
        time.sleep(SYNC_INTERVAL)
        _sync_all(forget_unused=True)


def _start_syncer():
    if _STATE.syncer is None:
        _STATE.syncer = threading.Thread(target=_sync_loop, name="storage-sync", daemon=True)
        _STATE.syncer.start()
        atexit.register(_sync_all)


###############################################################################
# The Lua module ##############################################################
###############################################################################

def _key(key):
    if isinstance(key, str):
        return key
    if isinstance(key, (int, float)) and not isinstance(key, bool):
        return str(key)
    raise TypeError(f"bad argument #1 (string expected, got {type(key).__name__})")


def _load(ctx):
    table_address = ctx.lua.execute('return function(t) return string.format("%p", t) end')

    def open_(path, driver=None):
        if not isinstance(path, str):
            raise TypeError(f"bad argument #1 to open (string expected, got {type(path).__name__})")
        if driver not in (None, "memory"):
            return None, "driver not found"
        try:
            return Store.open(os.path.abspath(path))
        except (OSError, ValueError) as e:
            return None, str(e)

    def set_(store, key, value=None, ttl=None):
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float))):
            raise TypeError(f"bad argument #3 to set (number expected, got {type(ttl).__name__})")
        try:
            data = LuaJson(table_address).encode(value).encode()
        except EncodeError as e:
            return str(e)
        store.set(_key(key), data, ttl)
        return None

    def get(store, key):
        data = store.get(_key(key))
        if data is None:
            return None, False
        try:
            return json_decode(data), True
        except ValueError as e:
            return None, None, str(e)

    def dump(store):
        try:
            return {k: json_decode(v) for k, v in store.live().items()}
        except ValueError as e:
            return None, str(e)

    def sync_or_close(action):
        def run(store):
            try:
                action(store)
            except OSError as e:
                return str(e)
            return None
        return run

    py = ctx.module({
        "open": open_, "identity": id, "set": set_, "get": get, "keys": lambda store: store.keys(),
        "dump": dump, "sync": sync_or_close(Store.sync), "close": sync_or_close(Store.close),
    })
    return ctx.lua.execute(_LUA, ctx.lua.table(), py)


def lua_modules():
    """Modules this plugin provides."""
    return {"storage": _load}
