"""`kv`: script state in NATS JetStream key-value buckets, on the server's NATS connection.

    local kv = require("kv")
    local b, err = kv.bucket("counters" [, {history = 1, ttl = "1h", replicas = 3}])   -- nil, err on failure
    local value, rev = b:get("hits")              -- nil for a missing key; nil, err on failure
    local rev, err = b:put("hits", "1")
    local rev, err = b:create("hits", "1")        -- nil, err when the key exists
    local rev, err = b:update("hits", "2", rev)   -- nil, err when rev is not the key's latest revision
    local err = b:delete("hits")
    local keys, err = b:keys()                    -- sorted; {} for an empty bucket

A bucket is created on first use with the options (history 1-64, ttl as a Go duration or seconds, replicas
1-5, default the server's -replicas: 3 on a NATS cluster, else 1); an existing bucket keeps its own. Each
call waits at most KV_TIMEOUT seconds and never past the script's deadline; values handed to the script must
fit in its memory limit. Failures are `nil, err` (or `err`) strings; bad argument types raise. Calls run on
the server's NATS connection, through its event loop, from a worker thread (never inline on the loop).
"""

from __future__ import annotations

import re
import threading

import msgscript
from msgscript import (ArgError, LuaError, check_integer, check_string, go_duration, is_table, lua_text, lua_type)

KV_TIMEOUT = 5.0
_KEY = re.compile(r"^[-/_=.a-zA-Z0-9]+$")
_BUCKET = re.compile(r"^[A-Za-z0-9_-]+$")
# Keys and bucket names are parts of NATS subjects: nats-server drops a connection (the server's, shared by every
# script) whose command line passes 4 KiB, so "$KV.<bucket>.<key>" stays well under it
MAX_BUCKET, MAX_KEY = 256, 512
_buckets: dict[tuple[int, str], object] = {}  # (connection, name) -> nats-py KeyValue, shared by every script
_MAX_CACHED = 1024
_lock = threading.Lock()


class _Failure(Exception):
    """A failed call, worded for the script."""


class _Bucket:
    """What kv.bucket gives a script (as an opaque handle): the bucket's name and nats-py handle."""

    def __init__(self, name: str, kv):
        self.name, self.kv = name, kv


def _options(options) -> dict:
    """history, ttl and replicas from the options table, checked (ArgError for bad ones)."""
    if options is None:
        return {}
    if not is_table(options):
        raise ArgError(2, f"table expected, got {lua_type(options)}")
    config = {}
    for key, value in options.items():
        key = lua_text(key) if isinstance(key, (bytes, int, float)) else lua_type(key)
        if key == "ttl":
            try:
                seconds = float(value) if isinstance(value, (int, float)) else go_duration(lua_text(value))
            except (ValueError, msgscript.ConfigError):
                raise ArgError(2, f"ttl must be a duration such as 30s or 1h, got {lua_text(value)!r}") from None
            if not 0 <= seconds < 2**53 / 1e9:
                raise ArgError(2, "ttl out of range")
            config["ttl"] = seconds or None
        elif key in ("history", "replicas"):
            limit = 64 if key == "history" else 5
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value != int(value) \
                    or not 1 <= value <= limit:
                raise ArgError(2, f"{key} must be a whole number from 1 to {limit}")
            config[key] = int(value)
        else:
            raise ArgError(2, f"unknown option {key!r} (use history, ttl or replicas)")
    return config


def _shown(key, limit: int = MAX_KEY) -> str:
    """A key (or a bucket's name) as an error names it: a too long one by its start."""
    text = lua_text(key)
    return text if len(text) <= limit else text[:32] + "..."


def _key(key, n: int) -> str:
    key = check_string(key, n)
    if len(key) > MAX_KEY:
        raise _Failure(f"invalid key {key[:32]!r}... (longer than {MAX_KEY} bytes)")
    if not _KEY.match(key) or key.startswith(".") or key.endswith("."):
        raise _Failure(f"invalid key {key!r} (letters, digits and - / _ = . only; no dot at either end)")
    return key


def _value(ctx, value, n: int) -> bytes:
    data = check_string(value, n).encode("utf-8", "surrogateescape")
    limit = ctx.services.nats.nc.max_payload
    if len(data) > limit - 1024:
        raise _Failure(f"value of {len(data)} bytes is larger than the NATS server allows ({limit} bytes a message)")
    return data


def _load(ctx):
    import nats.js.errors

    def run(coro):
        """Run `coro` on the server's NATS connection within the call's deadline (and KV_TIMEOUT)."""
        try:
            return ctx.services.nats.run(coro, ctx.remaining(KV_TIMEOUT))
        except _Failure:
            raise
        except Exception as e:  # noqa: BLE001 - worded for the script
            raise _Failure(msgscript.nats_reason(e)) from None

    def bridge():
        if ctx.services.nats is None:
            raise _Failure("not connected to NATS")
        return ctx.services.nats

    def bucket(name=None, options=None):
        """kv.bucket(name [, options]) -> bucket | nil, err"""
        name = check_string(name, 1)
        config = _options(options)
        try:
            if len(name) > MAX_BUCKET:
                raise _Failure(f"invalid bucket name (longer than {MAX_BUCKET} bytes)")
            if not _BUCKET.match(name):
                raise _Failure(f"invalid bucket name {name!r} (letters, digits, _ and - only)")
            if name.startswith("msgscript_"):
                raise _Failure("bucket names starting with msgscript_ are the server's (scripts, locks)")
            nats = bridge()
            with _lock:
                kv = _buckets.get((id(nats.nc), name))
            if kv is None:
                replicas = config.pop("replicas", ctx.services.nats_replicas)
                kv = run(msgscript.jetstream_bucket(nats.nc.jetstream(timeout=KV_TIMEOUT), "kv", name, replicas,
                                                    **config))
                with _lock:
                    if len(_buckets) >= _MAX_CACHED:  # scripts that make buckets without end: start again
                        _buckets.clear()
                    _buckets[(id(nats.nc), name)] = kv
            return _Bucket(name, kv)
        except _Failure as e:
            return None, f"kv.bucket {_shown(name, MAX_BUCKET)}: {e}"

    def get(b, key=None):
        """b:get(key) -> value, revision | nil (missing) | nil, err"""
        async def op():
            try:  # a read may be asked again when its answer is late (see msgscript._retried)
                return await msgscript._retried(b.kv.get, k)
            except nats.js.errors.KeyNotFoundError:  # deleted keys too
                return None

        try:
            k = _key(key, 1)
            bridge()
            entry = run(op())
        except _Failure as e:
            return None, f"get {_shown(key)}: {e}"
        if entry is None:
            return None
        try:
            ctx.fits(len(entry.value or b"") + 64, "value")
        except LuaError as e:
            return None, f"get {_shown(key)}: {e}"
        return entry.value or b"", entry.revision

    def write(what, b, key, value, revision=None):
        async def op():
            if what == "put":
                return await b.kv.put(k, data)
            if what == "create":
                try:
                    return await b.kv.create(k, data)
                except nats.js.errors.KeyNotFoundError:  # nats-py's create reads the key after a conflict:
                    raise nats.js.errors.KeyWrongLastSequenceError() from None  # it was there, and went again
            return await b.kv.update(k, data, last=revision)

        try:
            k = _key(key, 1)
            bridge()
            data = _value(ctx, value, 2)
            return run(op())
        except _Failure as e:
            return None, f"{what} {_shown(key)}: {e}"

    def put(b, key=None, value=None):
        """b:put(key, value) -> revision | nil, err"""
        return write("put", b, key, value)

    def create(b, key=None, value=None):
        """b:create(key, value) -> revision | nil, err (the key exists)"""
        out = write("create", b, key, value)
        if isinstance(out, tuple) and out[1].endswith("wrong last revision"):
            return None, f"create {_shown(key)}: key exists"
        return out

    def update(b, key=None, value=None, revision=None):
        """b:update(key, value, revision) -> revision | nil, err (revision is not the latest)"""
        revision = check_integer(revision, 3)
        if revision < 0:
            raise ArgError(3, "revision must not be negative")
        out = write("update", b, key, value, revision)
        if isinstance(out, tuple) and out[1].endswith("wrong last revision"):
            return None, f"update {_shown(key)}: revision {revision} is not the latest"
        return out

    def delete(b, key=None):
        """b:delete(key) -> nil | err"""
        try:
            k = _key(key, 1)
            bridge()
            run(b.kv.delete(k))
        except _Failure as e:
            return f"delete {_shown(key)}: {e}"
        return None

    def keys(b):
        """b:keys() -> {key...} (sorted) | nil, err; stops early when the list would not fit in memory."""
        budget = ctx.max_bytes()

        async def op():
            watcher = await b.kv.watchall(ignore_deletes=True, meta_only=True)
            found, size = [], 64
            try:
                while (entry := await watcher.updates(KV_TIMEOUT)) is not None:
                    size += len(entry.key) + 48
                    if size > budget:
                        raise _Failure(f"the keys do not fit in the script's memory limit (more than {budget} "
                                       "bytes)")
                    found.append(entry.key)
            finally:
                await watcher.stop()
            return sorted(found)

        try:
            bridge()
            return run(op())
        except _Failure as e:
            return None, f"keys: {e}"

    py = ctx.module({"bucket": bucket, "get": get, "put": put, "create": create, "update": update,
                     "delete": delete, "keys": keys})
    return ctx.execute_file("kv.lua", py)


def lua_modules():
    return {"kv": _load}
