"""`etcd` (the original's own module): put, get and delete keys on the server's etcd endpoints.

etcd.put(key, value) -> nil | err; etcd.delete(key) -> nil | err
etcd.get(key, prefix) -> {EtcdKV...}, nil | nil, nil (nothing found) | nil, err
Every call is bounded by the script's deadline (and 5 s at most).
"""

from __future__ import annotations

import threading

import msgscript
from msgscript import check_string

_clients: dict[tuple, msgscript.EtcdClient] = {}
_lock = threading.Lock()


def _client(endpoints) -> msgscript.EtcdClient:
    key = tuple(endpoints)
    with _lock:
        if key not in _clients:
            _clients[key] = msgscript.EtcdClient(list(key))
        return _clients[key]


def _bytes(value, n: int) -> bytes:
    return check_string(value, n).encode("utf-8", "surrogateescape")


def _loader(ctx):
    def put(key=None, value=None):
        try:
            _client(ctx.services.etcd_endpoints).put(_bytes(key, 1), _bytes(value, 2),
                                                     ctx.remaining(msgscript.ETCD_TIMEOUT))
        except msgscript.ConfigError as e:
            return str(e)
        return None

    def get(key=None, prefix=False):
        try:
            kvs, _ = _client(ctx.services.etcd_endpoints).range(
                _bytes(key, 1), msgscript.truthy(prefix), timeout=ctx.remaining(msgscript.ETCD_TIMEOUT))
        except msgscript.ConfigError as e:
            return None, str(e)
        if not kvs:
            return None, None
        ctx.fits(sum(len(k) + len(v) + 200 for k, v in kvs), "etcd values")
        new = ctx.state("etcd.kv", lambda: ctx.execute("return EtcdKV.new", name="etcd"))
        return ctx.table([new(k, v) for k, v in kvs]), None

    def delete(key=None):
        try:
            _client(ctx.services.etcd_endpoints).delete(_bytes(key, 1), ctx.remaining(msgscript.ETCD_TIMEOUT))
        except msgscript.ConfigError as e:
            return str(e)
        return None

    return {"put": put, "get": get, "delete": delete}


def lua_modules():
    return {"etcd": _loader}
