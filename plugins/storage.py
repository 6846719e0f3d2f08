"""`storage`: the gopher-lua-libs v0.5.0 "memory" driver, a JSON file plus a process-wide cache.

File format (compatible with the original):
`{"data":{"<key>":{"value":"<base64 of the JSON bytes>","max_valid_at":<unix ns>}}}`.
"""

import atexit
import base64
import json
import logging
import os
import sys
import threading
import time
import types

from msgscript import ArgError, check_string, error_text, lua_type, opt_string

from msgscript_plugins.json import holes, json_to_lua, lua_to_json, parse

log = logging.getLogger("msgscript.storage")

SYNC_INTERVAL = 60.0
FOREVER_SECONDS = 10_000_000_000_000  # the original's "no ttl"
_INT64_MAX = 2**63 - 1

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

def _load(ctx):
    holey_len = holes(ctx)[1]  # so that a json.decode result with null holes can be stored

    def decoded(data: bytes):
        """A stored value for Lua; nulls in arrays are dropped, as in the original. ValueError if corrupt."""
        return json_to_lua(ctx, parse(data.decode("utf-8", "replace")), keep_nulls=False)

    def open_(path=None, driver=None):
        path, driver = check_string(path, 1), opt_string(driver, 2, "memory")
        if driver != "memory":
            return None, "driver not found"
        try:
            return Store.open(os.path.abspath(path))
        except OSError as e:
            return None, error_text(e)
        except ValueError as e:
            return None, f"storage {path}: {e}"

    # The methods get the store (a Python object the Lua side keeps) first; argument numbers
    # count from the method's first argument, as Lua does for methods.
    def set_(store, key=None, value=None, ttl=None):
        key = check_string(key, 1)
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float))):
            raise ArgError(3, f"number expected, got {lua_type(ttl)}")
        try:
            data = lua_to_json(value, holey_len, ctx.max_bytes()).encode()
        except ValueError as e:
            return str(e)
        store.set(key, data, ttl)
        return None

    def get(store, key=None):
        data = store.get(check_string(key, 1))
        if data is None:
            return None, False
        try:
            return decoded(data), True
        except ValueError as e:
            return None, None, str(e)

    def dump(store):
        try:
            values = {k: parse(v.decode("utf-8", "replace")) for k, v in store.live().items()}
            return json_to_lua(ctx, values, keep_nulls=False)
        except ValueError as e:
            return None, str(e)

    def sync_or_close(action):
        def run(store):
            try:
                action(store)
            except OSError as e:
                return error_text(e)
            return None
        return run

    py = ctx.module({
        "open": open_, "identity": id, "set": set_, "get": get, "keys": lambda store: store.keys(),
        "dump": dump, "sync": sync_or_close(Store.sync), "close": sync_or_close(Store.close),
    })
    return ctx.execute_file("storage.lua", ctx.table(), py)


def lua_modules():
    """Modules this plugin provides."""
    return {"storage": _load}
