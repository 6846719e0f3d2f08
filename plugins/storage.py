"""`storage`: the gopher-lua-libs v0.5.0 "memory" driver, a JSON file plus a process-wide cache.

File format (compatible with the original):
`{"data":{"<key>":{"value":"<base64 of the JSON bytes>","max_valid_at":<unix ns>}}}`.

A relative path is the call's working directory's (a temporary directory, as each message of the Go
original runs in one): give an absolute path to keep the data. The file is written on close() and sync(),
when the server stops, and otherwise at most every SYNC_INTERVAL seconds: the first store call after the
interval hands the writing to the scheduler's executor for blocking work (there is no thread of its own,
so data set since the last write is lost if the server is killed). One store keeps at most STORE_LIMIT
bytes of keys and values, all the stores of the server TOTAL_LIMIT; a set beyond either fails ("storage
full"). A store nothing uses any more is forgotten (its memory freed) at the next periodic write.
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

from msgscript import ArgError, check_string, error_text, lua_type, open_file, opt_string
from msgscript import ticker
from msgscript_plugins.json import json_cost

from msgscript_plugins.json import holes, json_to_lua, lua_to_json, parse

log = logging.getLogger("msgscript.storage")

SYNC_INTERVAL = 60.0
STORE_LIMIT = 64 * 2**20  # bytes of keys and values one store keeps
TOTAL_LIMIT = 256 * 2**20  # bytes of keys and values all the stores of the process keep
FOREVER_SECONDS = 10_000_000_000_000  # the original's "no ttl"
_INT64_MAX = 2**63 - 1
_ENTRY = 64  # bytes counted for each key besides its text and value

###############################################################################
# Stores ######################################################################
###############################################################################

def _process_state():
    """Registry of open stores for the whole process (one path, one store), kept in sys.modules so that a
    second import of this file (a plugin directory naming the bundled one) shares it."""
    name = "_msgscript_storage_state"
    holder = sys.modules.setdefault(name, types.ModuleType(name))
    fresh = types.SimpleNamespace(stores={}, lock=threading.Lock(), synced=time.monotonic(), syncing=False,
                                  at_exit=False, total=0)
    return vars(holder).setdefault("state", fresh)  # setdefault: atomic if two imports race


_STATE = _process_state()


class StoreFull(ValueError):
    def __init__(self, limit: int = STORE_LIMIT, what: str = "this store"):
        super().__init__(f"storage full ({limit} bytes of keys and values in {what})")


def _grow_total(delta: int) -> None:
    """Count `delta` more bytes kept by all the stores; StoreFull past TOTAL_LIMIT (a shrink always works)."""
    with _STATE.lock:
        if delta > 0 and _STATE.total + delta > TOTAL_LIMIT:
            raise StoreFull(TOTAL_LIMIT, "all the stores of the server")
        _STATE.total += delta


class Store:
    """One storage file's contents, shared by every script in the process."""

    def __init__(self, path):
        self.path = path
        self.lock = threading.RLock()  # held only briefly: a script's call may wait on it
        self.writing = threading.Lock()  # one write of the file at a time
        self.data = {}  # key -> (json bytes, max_valid_at ns)
        self.size = 0  # bytes of keys and values (STORE_LIMIT at most)
        self.users = 0

    @classmethod
    def open(cls, ctx, path):
        """The shared store for path (loading or creating its file); raises OSError/ValueError."""
        with _STATE.lock:
            store = _STATE.stores.get(path)
        if store is None:
            fresh = cls(path)
            fresh.load(ctx)  # outside the registry's lock: reading a big file takes a while
            with _STATE.lock:
                store = _STATE.stores.setdefault(path, fresh)
                if not _STATE.at_exit:
                    _STATE.at_exit = True
                    atexit.register(_sync_all)
            if store is fresh:
                store.sync()
            else:  # another call opened it meanwhile: its copy is the one kept
                _grow_total(-fresh.size)
        with store.lock:
            store.users += 1
        return store

    def load(self, ctx):
        """Read the file (bounded by the script's memory cap, as what parsing it makes)."""
        if not os.path.lexists(self.path):
            return
        raw = ctx.read_file(self.path, min(ctx.max_bytes(), STORE_LIMIT * 2))
        if not raw.strip():
            return
        ctx.fits(json_cost(raw), "the storage file's decoding work")
        doc = parse(raw.decode("utf-8", "replace"), ticker(ctx.check))
        entries = (doc.get("data") or {}).items() if isinstance(doc, dict) else ()
        tick = ticker(ctx.check)
        for k, v in entries:
            tick()
            value = base64.b64decode(v.get("value") or "") if isinstance(v, dict) else b""
            self.data[k] = (value, int(v.get("max_valid_at") or 0) if isinstance(v, dict) else 0)
            self.size += _ENTRY + len(k) + len(value)
        if self.size > STORE_LIMIT:
            raise StoreFull()
        _grow_total(self.size)

    def set(self, key, value, ttl):
        ttl_ns = min((ttl if ttl and ttl > 0 else FOREVER_SECONDS) * 1e9, _INT64_MAX)
        with self.lock:
            old = self.data.get(key)
            size = self.size + len(value) - (len(old[0]) if old else -(_ENTRY + len(key)))
            if size > STORE_LIMIT and size > self.size:
                raise StoreFull()
            _grow_total(size - self.size)
            self.data[key] = (value, min(time.time_ns() + int(ttl_ns), _INT64_MAX))
            self.size = size

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
        with self.writing:
            with self.lock:
                now = time.time_ns()
                self.data = {k: e for k, e in self.data.items() if e[1] > now}
                size = sum(_ENTRY + len(k) + len(v) for k, (v, _) in self.data.items())
                _grow_total(size - self.size)
                self.size = size
                entries = list(self.data.items())
            doc = {"data": {k: {"value": base64.b64encode(v).decode(), "max_valid_at": until}
                            for k, (v, until) in entries}}
            tmp = self.path + ".tmp"
            fd = open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)  # never a FIFO a script made there
            with os.fdopen(fd, "w") as f:
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
            # Its directory is gone (a call's own directory, or deleted while the server ran): nothing
            # left to save into.
            _forget(store)
            continue
        except OSError as e:
            log.error("storage %s: sync failed: %s", store.path, e)
            continue
        if forget_unused and store.users == 0:
            _forget(store)


def _forget(store: Store) -> None:
    with _STATE.lock:
        if _STATE.stores.get(store.path) is store:
            del _STATE.stores[store.path]
            _STATE.total -= store.size


def _sync_job():
    try:
        _sync_all(forget_unused=True)
    finally:
        _STATE.syncing = False


def sync_when_due(ctx) -> None:
    """Once SYNC_INTERVAL has passed since the last write, write every store (and forget those no call
    uses): on the scheduler's executor for blocking work, not waited for; here when there is none."""
    now = time.monotonic()
    with _STATE.lock:
        if _STATE.syncing or now - _STATE.synced < SYNC_INTERVAL:
            return
        _STATE.syncing, _STATE.synced = True, now
    pool = ctx.services.blocking
    try:
        if pool is not None:
            pool.submit(_sync_job)
            return
    except RuntimeError:  # the executor is shut down: the server is stopping (atexit writes the stores)
        _STATE.syncing = False
        return
    _sync_job()


###############################################################################
# The Lua module ##############################################################
###############################################################################

def _load(ctx):
    holey_len = holes(ctx)[1]  # so that a json.decode result with null holes can be stored

    def decoded(data: bytes):
        """A stored value for Lua; nulls in arrays are dropped, as in the original. ValueError if corrupt."""
        ctx.fits(json_cost(data), "the stored value's decoding work")
        tick = ticker(ctx.check)
        return json_to_lua(ctx, parse(data.decode("utf-8", "replace"), tick), keep_nulls=False, tick=tick)

    def open_(path=None, driver=None):
        path, driver = check_string(path, 1), opt_string(driver, 2, "memory")
        if driver != "memory":
            return None, "driver not found"
        sync_when_due(ctx)
        try:
            return Store.open(ctx, os.path.abspath(ctx.path(path)))
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
        sync_when_due(ctx)
        try:
            data = lua_to_json(value, holey_len, min(ctx.max_bytes(), STORE_LIMIT), check=ctx.check).encode()
            store.set(key, data, ttl)
        except ValueError as e:
            return str(e)
        return None

    def get(store, key=None):
        data = store.get(check_string(key, 1))
        sync_when_due(ctx)
        if data is None:
            return None, False
        try:
            return decoded(data), True
        except ValueError as e:
            return None, None, str(e)

    def dump(store):
        values = store.live()
        ctx.fits(sum(json_cost(v) + 64 + len(k) for k, v in values.items()), "storage.dump's work")
        tick = ticker(ctx.check)
        try:
            values = {k: parse(v.decode("utf-8", "replace"), tick) for k, v in values.items()}
            return json_to_lua(ctx, values, keep_nulls=False, tick=tick)
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
