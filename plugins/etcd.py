"""`etcd` (the original's own module): put, get and delete keys on the server's etcd endpoints.

etcd.put(key, value) -> nil | err; etcd.delete(key) -> nil | err
etcd.get(key, prefix) -> {EtcdKV...}, nil | nil, nil (nothing found) | nil, err
Every call runs on the scheduler's executor for blocking work and is bounded by the script's deadline
(and 5 s at most); get reads etcd's answer as it arrives and fails once it (or what decoding it makes)
passes what the script's memory cap leaves.
"""

from __future__ import annotations

import base64
import json
import threading

import msgscript
from msgscript import LuaError, check_string
from msgscript_plugins.json import json_cost


_clients: dict[tuple, msgscript.EtcdClient] = {}
_lock = threading.Lock()


class _TooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"etcd values of more than {limit} bytes do not fit in the script's memory limit")


def _client(endpoints) -> msgscript.EtcdClient:
    key = tuple(endpoints)
    with _lock:
        if key not in _clients:
            _clients[key] = msgscript.EtcdClient(list(key))
        return _clients[key]


def _bytes(value, n: int) -> bytes:
    return check_string(value, n).encode("utf-8", "surrogateescape")


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _prefix_end(prefix: bytes) -> bytes:
    """The first key after every key starting with `prefix` (etcd's range_end for a prefix)."""
    end = bytearray(prefix)
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:
        return b"\0"
    end[-1] += 1
    return bytes(end)


def _range(client: msgscript.EtcdClient, key: bytes, prefix: bool, timeout: float, limit: int) -> list:
    """[(key, value)...] of a range request, its answer read with a cap."""
    body = {"key": _b64(key)}
    if prefix:
        body["range_end"] = _b64(_prefix_end(key))
    resp = client.call("/kv/range", body, timeout, stream=True)
    if not hasattr(resp, "iter_content"):  # not a 200: call() gave the decoded answer (or raised)
        return []
    chunks, size = [], 0
    try:
        for chunk in resp.iter_content(65536):
            size += len(chunk)
            if size > limit:
                raise _TooLarge(limit)
            chunks.append(chunk)
    finally:
        resp.close()
    data = b"".join(chunks)
    if json_cost(data) > limit:
        raise _TooLarge(limit)
    try:
        doc = json.loads(data)
    except ValueError:
        doc = {"error": "not JSON"}
    if not isinstance(doc, dict) or "error" in doc:
        reason = doc.get("message") or doc.get("error") if isinstance(doc, dict) else "unexpected answer"
        raise msgscript.EtcdRefused(f"etcd at {client.where}: {reason}")
    return [(base64.b64decode(kv["key"]), base64.b64decode(kv.get("value") or "")) for kv in doc.get("kvs", [])]


def _loader(ctx):
    def blocking(func, *args):
        """`func(*args)` on the executor for blocking work: an error text for a failure or a timeout."""
        try:
            return ctx.blocking(func, *args, cap=msgscript.ETCD_TIMEOUT + 0.5), None
        except (msgscript.ConfigError, _TooLarge) as e:
            return None, str(e)
        except LuaError as e:
            if str(e) == "timed out":
                return None, f"cannot reach etcd at {','.join(ctx.services.etcd_endpoints)}: timed out"
            raise

    def put(key=None, value=None):
        client = _client(ctx.services.etcd_endpoints)
        return blocking(client.put, _bytes(key, 1), _bytes(value, 2), ctx.remaining(msgscript.ETCD_TIMEOUT))[1]

    def get(key=None, prefix=False):
        client = _client(ctx.services.etcd_endpoints)
        kvs, err = blocking(_range, client, _bytes(key, 1), msgscript.truthy(prefix),
                            ctx.remaining(msgscript.ETCD_TIMEOUT), ctx.max_bytes())
        if err is not None:
            return None, err
        if not kvs:
            return None, None
        ctx.fits(sum(len(k) + len(v) + 200 for k, v in kvs), "etcd values")
        new = ctx.state("etcd.kv", lambda: ctx.execute("return EtcdKV.new", name="etcd"))
        return ctx.table([new(k, v) for k, v in kvs]), None

    def delete(key=None):
        client = _client(ctx.services.etcd_endpoints)
        return blocking(client.delete, _bytes(key, 1), ctx.remaining(msgscript.ETCD_TIMEOUT))[1]

    return {"put": put, "get": get, "delete": delete}


def lua_modules():
    return {"etcd": _loader}
