"""`vault` (the Go repository's plugins/vault): secrets in a KV version 2 mount of OpenBao or Vault.

    local vault = require("vault")
    local v, err = vault.new("http://127.0.0.1:8200", token)   -- or vault.new(nil, nil, true): VAULT_ADDR, VAULT_TOKEN
    err = v:write("/app/db", {user = "app", password = "s3cret"}, "secrets")   -- nil on success
    local secret, err = v:read("/app/db", "secrets")             -- {user = "app", password = "s3cret"}
    local keys, err = v:list("/app", "secrets")                  -- {"db"} (folders end with "/")
    err = v:delete("/app/db", "secrets")                         -- every version and the metadata

Built on hvac. Every request waits at most VAULT_CLIENT_TIMEOUT (5 s unless set) and never past
the script's deadline; failures are `nil, err` (or `err`) strings, never Lua errors, except bad
arguments. Deliberate differences from the Go plugin: TLS certificates are verified (VAULT_CACERT
names a CA file, VAULT_SKIP_VERIFY=true turns verification off; the Go plugin never verifies);
paths work with or without their leading "/"; values that are not strings are read as the json
module decodes them (the Go plugin fails on them), nested tables are written as JSON objects or
arrays; listing a path with nothing under it gives an empty table.
"""

from __future__ import annotations

import math
import os
import re
import socket
import ssl
import threading
import urllib.parse

from msgscript import (ArgError, LuaError, check_string, check_table, error_text, first_line, go_duration, lua_text,
                       lua_type, opt_string, parse_bool, ticker)



VAULT_TIMEOUT = 5.0  # seconds one request may take (the Go plugin's DEFAULT_VAULT_TIMEOUT); VAULT_CLIENT_TIMEOUT
_GRACE = 0.05  # how long past its timeout a request is waited for before it is abandoned
_DEADLINE = "context deadline exceeded"
_GO_BOOLS = {"1", "t", "T", "TRUE", "true", "True", "0", "f", "F", "FALSE", "false", "False"}
_REPR = re.compile(r"[\w.]+\(")
_STATUS = {"InvalidRequest": 400, "Unauthorized": 401, "Forbidden": 403, "InvalidPath": 404,
           "RateLimitExceeded": 429, "InternalServerError": 500, "VaultNotInitialized": 501,
           "BadGateway": 502, "VaultDown": 503}

class _Failure(Exception):
    """A failed request, worded for the script."""


###############################################################################
# The client ##################################################################
###############################################################################

class _Client:
    """What vault.new makes: where the server is, the token, and how requests are made."""

    def __init__(self, address: str, token: str, verify, limit: float, session):
        self.address, self.token, self.verify, self.limit, self.session = address, token, verify, limit, session

    def kv(self, timeout: float):
        """hvac's KV v2 API, its requests bounded by `timeout` seconds (an hvac.Client costs ~40 µs)."""
        import hvac

        return hvac.Client(url=self.address, token=self.token, verify=self.verify, timeout=timeout,
                           session=self.session).secrets.kv.v2


def _address(address: str, variable: str | None) -> str:
    """The server's URL, checked; `variable` names the environment variable it came from."""
    if not address:
        raise _Failure(f"{variable} is not set" if variable else "empty address")
    parts = urllib.parse.urlsplit(address)
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise _Failure(f'address "{address}": invalid port') from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Failure(f'address "{address}": expected http://host:port or https://host:port')
    return address


def _verify():
    """requests' `verify`: True, a CA file (VAULT_CACERT), or False (VAULT_SKIP_VERIFY)."""
    skip = os.environ.get("VAULT_SKIP_VERIFY", "")
    if skip and skip not in _GO_BOOLS:
        raise _Failure("could not parse VAULT_SKIP_VERIFY")
    if parse_bool(skip):
        return False
    cacert = os.environ.get("VAULT_CACERT", "")
    if cacert:
        if not os.path.isfile(cacert):
            raise _Failure(f"VAULT_CACERT {cacert}: no such file")
        return os.path.abspath(cacert)
    return True


def _limit() -> float:
    """Seconds one request may take: VAULT_CLIENT_TIMEOUT ("30", "30s", "1m"), else VAULT_TIMEOUT."""
    text = os.environ.get("VAULT_CLIENT_TIMEOUT", "").strip()
    if not text:
        return VAULT_TIMEOUT
    try:
        seconds = float(text) if text.replace(".", "", 1).isdigit() else go_duration(text)
    except ValueError:
        raise _Failure("could not parse VAULT_CLIENT_TIMEOUT") from None
    return seconds if seconds > 0 else VAULT_TIMEOUT


def _session(ctx, verify):
    """This Lua runtime's requests session for `verify` (kept: connections are reused across calls).

    hvac lets a session's own `verify` override the one it is given, so each setting has its session.
    Proxies, .netrc and REQUESTS_CA_BUNDLE from the environment are not used (trust_env off).
    """
    sessions = ctx.state("vault.sessions", dict)
    if verify not in sessions:
        import requests

        session = requests.Session()
        session.trust_env = False
        session.verify = verify
        adapter = _capped_adapter()
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        sessions[verify] = session
    return sessions[verify]


_LIMIT = threading.local()  # the bytes a response may take, for the request being made on this thread


class _TooLarge(Exception):
    def __init__(self, limit: int):
        super().__init__(f"an answer of more than {limit} bytes does not fit in the script's memory limit")


def _capped_adapter():
    """A requests transport that reads an answer as it arrives and stops once it (or what decoding it
    as JSON makes) passes _LIMIT.bytes."""
    import requests.adapters

    from msgscript_plugins.json import json_cost

    class Capped(requests.adapters.HTTPAdapter):
        def send(self, request, stream=False, **kwargs):
            resp = super().send(request, stream=True, **kwargs)
            if stream:
                return resp
            limit = getattr(_LIMIT, "bytes", 2**62)
            chunks, size = [], 0
            for chunk in resp.iter_content(65536):
                size += len(chunk)
                if size > limit:
                    resp.close()
                    raise _TooLarge(limit)
                chunks.append(chunk)
            body = b"".join(chunks)
            if json_cost(body) > limit:
                raise _TooLarge(limit)
            resp._content, resp._content_consumed = body, True  # what reading it without `stream` sets
            return resp

    return Capped()


###############################################################################
# Requests ####################################################################
###############################################################################

def _blocking(ctx, client: _Client, fn, *args):
    """Run `fn(client.kv(timeout), *args)`, the one place where this module blocks.

    `timeout` is what the script's deadline leaves, at most the client's limit; hvac passes it
    to requests (per connect and per read). The call runs on the scheduler's executor for blocking
    work, waited for only that long, so nothing (a hung DNS lookup, a server that answers a byte at a
    time) keeps the script past it. Raises what `fn` raises, or TimeoutError.
    """
    timeout = ctx.remaining(client.limit)
    limit = ctx.max_bytes()

    def run():
        _LIMIT.bytes = limit
        return fn(client.kv(timeout), *args)

    try:
        return ctx.blocking(run, cap=timeout + _GRACE)
    except LuaError:
        raise TimeoutError(_DEADLINE) from None


def _root(exc: BaseException) -> BaseException:
    """The innermost cause of a requests/urllib3 exception (the OSError that started it)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = exc.__cause__ or exc.__context__
        if inner is None:
            break
        exc = inner
    return exc


def _reason(exc: BaseException) -> str:
    """A failure of hvac/requests in a script's words; re-raises what is neither (a plugin bug)."""
    import hvac.exceptions
    import requests

    if isinstance(exc, hvac.exceptions.VaultError):
        message = ", ".join(str(e) for e in exc.errors or [])
        if not message and exc.json is None and exc.text:
            message = first_line(exc.text)[:200]
        code = _STATUS.get(type(exc).__name__)
        if message and code:
            return f"{message} (code {code})"
        return message or (f"code {code}" if code else "unexpected answer from the server")
    if isinstance(exc, requests.RequestException):
        request = exc.request
        where = f'{request.method[:1]}{request.method[1:].lower()} "{request.url}": ' if request is not None else ""
        if isinstance(exc, requests.Timeout):
            return where + _DEADLINE
        root = _root(exc)
        if isinstance(root, ssl.SSLCertVerificationError):
            return f"{where}tls: failed to verify certificate: {root.verify_message or root.reason}"
        if isinstance(root, ssl.SSLError):
            return f"{where}tls: {root.reason or first_line(str(root))}"
        if isinstance(root, socket.gaierror):
            host = urllib.parse.urlsplit(request.url).hostname if request is not None else "host"
            return f"{where}lookup {host}: {(root.strerror or 'no such host').lower()}"
        if isinstance(root, OSError) and root.errno:
            return where + error_text(root)
        if isinstance(root, TimeoutError):
            return where + _DEADLINE
        text = first_line(str(root))
        if not text or _REPR.match(text):  # e.g. "IncompleteRead(0 bytes read)": no Python names for scripts
            text = "the connection failed"
        return where + text[:1].lower() + text[1:]
    if isinstance(exc, TimeoutError):
        return _DEADLINE
    if isinstance(exc, _TooLarge):
        return str(exc)
    if isinstance(exc, OSError):
        return error_text(exc)
    raise exc


def _call(ctx, client: _Client, fn, *args):
    """_blocking, with every failure turned into _Failure."""
    try:
        return _blocking(ctx, client, fn, *args)
    except Exception as e:  # noqa: BLE001 - sorted by _reason: a script's error, or re-raised as a bug
        raise _Failure(_reason(e)) from None


###############################################################################
# Values ######################################################################
###############################################################################

def _key(key, n: int) -> str:
    if isinstance(key, bytes) or (isinstance(key, (int, float)) and not isinstance(key, bool)):
        return lua_text(key)
    raise ArgError(n, f"table keys must be strings or numbers, got {lua_type(key)}")


def _nested(value, n: int, depth: int = 0, tick=lambda n=1: None):
    """A value inside a written table's value, as JSON (tables by the json module's rules)."""
    if depth > 100:
        raise ArgError(n, "table nested too deeply")
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        if math.isnan(value) or math.isinf(value):
            raise ArgError(n, "NaN and infinity cannot be written")
        return int(value) if float(value).is_integer() and abs(value) < 2**53 else value
    if lua_type(value) != "table":
        raise ArgError(n, f"a {lua_type(value)} cannot be written")
    items = list(value.items())
    tick(len(items))
    if not items:
        return []  # as the json module encodes an empty table
    numbers = sorted(k for k, _ in items if isinstance(k, (int, float)) and not isinstance(k, bool))
    if numbers == list(range(1, len(items) + 1)):  # keys 1..n: an array
        return [_nested(v, n, depth + 1, tick) for _, v in sorted(items, key=lambda kv: kv[0])]
    return {_key(k, n): _nested(v, n, depth + 1, tick) for k, v in items}


def _secret_data(table, n: int, tick=lambda n=1: None) -> dict:
    """The table written as a secret: strings, numbers and booleans are stored as their text, as
    the Go plugin does; a table value is stored as a JSON object or array."""
    data = {}
    for k, v in table.items():
        tick()
        if isinstance(v, bytes):
            data[_key(k, n)] = v.decode("utf-8", "replace")  # JSON holds text: invalid bytes become U+FFFD
        elif isinstance(v, bool):
            data[_key(k, n)] = "true" if v else "false"
        elif isinstance(v, (int, float)):
            data[_key(k, n)] = lua_text(v)
        else:
            data[_key(k, n)] = _nested(v, n, tick=tick)
    return data


def _from_json(value):
    """A value read from the server, for Lua: nulls in objects dropped (nil), in arrays kept as
    holes; integers too big for a double's 53 bits become floats."""
    if isinstance(value, dict):
        return {k: _from_json(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**53:
        return float(value)
    return value


def _text_size(s: str) -> int:
    return len(s) if s.isascii() else len(s.encode("utf-8", "surrogatepass"))


def _size(value) -> int:
    """About how many bytes a value read from the server takes in Lua."""
    if isinstance(value, str):
        return _text_size(value) + 32
    if isinstance(value, dict):
        return 64 + sum(48 + _text_size(k) + _size(v) for k, v in value.items())
    if isinstance(value, list):
        return 64 + sum(24 + _size(v) for v in value)
    return 16


MAX_PATH = 4096  # bytes of an address, a path or a mount: more than any real one; longer only costs work
MAX_TOKEN = 65536  # bytes of a token (a JWT of a few KiB fits)


def _where(path, mount, n_path: int, n_mount: int) -> tuple[str, str]:
    """A method's path and mount, checked (a megabyte of path took hvac and requests seconds to build a URL)."""
    path, mount = check_string(path, n_path), check_string(mount, n_mount)
    for value, n, what in ((path, n_path, "path"), (mount, n_mount, "mount")):
        if len(value) > MAX_PATH:
            raise ArgError(n, f"{what} longer than {MAX_PATH} bytes")
    return path, mount


def _path(path: str) -> str:
    return path.lstrip("/")


###############################################################################
# The Lua module ##############################################################
###############################################################################

def _read(kv, path, mount):
    """The answer for the latest version, or None when there is none (or it was deleted)."""
    import hvac.exceptions

    try:
        return kv.read_secret_version(path, mount_point=mount, raise_on_deleted_version=True)
    except hvac.exceptions.InvalidPath as e:
        if e.errors:  # e.g. no such mount
            raise
        return None


def _write(kv, path, data, mount):
    return kv.create_or_update_secret(path, data, mount_point=mount)


def _delete(kv, path, mount):
    return kv.delete_metadata_and_all_versions(path, mount_point=mount)


def _list(kv, path, mount):
    import hvac.exceptions

    try:
        return kv.list_secrets(path, mount_point=mount)
    except hvac.exceptions.InvalidPath as e:
        if e.errors:  # e.g. no such mount
            raise
        return {"data": {"keys": []}}  # nothing under the path


def _load(ctx):
    def new(address=None, token=None, from_env=None):
        """vault.new(address, token [, from_env]) -> client | nil, err"""
        if from_env is not None and not isinstance(from_env, bool):
            raise ArgError(3, f"boolean expected, got {lua_type(from_env)}")
        if from_env:
            opt_string(address, 1)  # ignored, but must be strings or nil
            opt_string(token, 2)
            address, token = os.environ.get("VAULT_ADDR", ""), os.environ.get("VAULT_TOKEN", "")
        else:
            address, token = check_string(address, 1), check_string(token, 2)
            if len(address) > MAX_PATH:
                raise ArgError(1, f"address longer than {MAX_PATH} bytes")
            if len(token) > MAX_TOKEN:
                raise ArgError(2, f"token longer than {MAX_TOKEN} bytes")
        try:
            verify = _verify()
            return _Client(_address(address, "VAULT_ADDR" if from_env else None), token, verify, _limit(),
                           _session(ctx, verify))
        except _Failure as e:
            return None, f"failed to create new vault client: {e}"

    # The methods get the client first; argument numbers count from the method's first argument.
    def read(client, path=None, mount=None):
        """v:read(path, mount) -> table | nil, err"""
        path, mount = _where(path, mount, 1, 2)
        try:
            answer = _call(ctx, client, _read, _path(path), mount)
        except _Failure as e:
            return None, f"failed to read path {path}: {e}"
        if answer is None:
            return None, f"path {path} not found"
        data = (answer.get("data") or {}).get("data") if isinstance(answer, dict) else None
        if not isinstance(data, dict):
            return None, f"failed to read path {path}: unexpected answer from the server"
        try:
            ctx.fits(_size(data), "secret")
        except LuaError as e:
            return None, f"failed to read path {path}: {e}"
        return _from_json(data)

    def write(client, path=None, table=None, mount=None):
        """v:write(path, table, mount) -> nil | err"""
        path, mount = _where(path, mount, 1, 3)
        data = _secret_data(check_table(table, 2), 2, ticker(ctx.check))
        try:
            _call(ctx, client, _write, _path(path), data, mount)
        except _Failure as e:
            return f"failed to write to {path}: {e}"
        return None

    def delete(client, path=None, mount=None):
        """v:delete(path, mount) -> nil | err: the secret's metadata and every version of it."""
        path, mount = _where(path, mount, 1, 2)
        try:
            _call(ctx, client, _delete, _path(path), mount)
        except _Failure as e:
            return f"failed to delete {path}: {e}"
        return None

    def list_(client, path=None, mount=None):
        """v:list(path, mount) -> {key...} | nil, err; folders end with "/"."""
        path, mount = _where(path, mount, 1, 2)
        try:
            answer = _call(ctx, client, _list, _path(path), mount)
        except _Failure as e:
            return None, f"failed to list {path}: {e}"
        keys = (answer.get("data") or {}).get("keys") if isinstance(answer, dict) else None
        if not isinstance(keys, list):
            return None, f"failed to list {path}: unexpected answer from the server"
        keys = [k for k in keys if isinstance(k, str)]
        try:
            ctx.fits(_size(keys), "key list")
        except LuaError as e:
            return None, f"failed to list {path}: {e}"
        return keys

    py = ctx.module({"new": new, "read": read, "write": write, "delete": delete, "list": list_})
    return ctx.execute_file("vault.lua", py)


def lua_modules():
    """Modules this plugin provides."""
    return {"vault": _load}
