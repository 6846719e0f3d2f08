"""`http` (cjoudrey/gluahttp): HTTP requests bounded by the script's deadline and memory cap.

Deliberate differences from the original: responses are plain tables (pairs and json.encode
work; there is no http.response metatable); numeric timeouts keep their fractions; every
request is also bounded by the script's deadline; a body larger than what the script's memory
cap leaves is an error instead of a crash; HTTP_PROXY is not honoured.
"""

from __future__ import annotations

import base64
import zlib
import http.client
import threading
import time
import urllib.parse
from concurrent.futures import Future, TimeoutError as FutureTimeout

import msgscript
from msgscript import ArgError, check_string, error_text, go_duration, is_table, lua_text, lua_type, truthy


_REDIRECTS = (301, 302, 303, 307, 308)
_DEADLINE = "context deadline exceeded"


def _raw(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


class _HttpError(Exception):
    """A request failure reported to the script as `nil, err`."""


def _canonical(name: str) -> str:
    return "-".join(p[:1].upper() + p[1:].lower() for p in name.split("-"))


def _pairs(table) -> dict:
    return {lua_text(k): lua_text(v) for k, v in table.items()} if is_table(table) else {}


def _time_limit(ctx, timeout) -> float:
    """Seconds the request may take: the `timeout` option, never past the script's deadline."""
    if isinstance(timeout, bytes):
        try:
            timeout = go_duration(lua_text(timeout))
        except ValueError as e:
            raise _HttpError(str(e)) from None
    elif not isinstance(timeout, (int, float)) or isinstance(timeout, bool):
        return ctx.remaining()
    return ctx.remaining(timeout) if timeout > 0 else 0.0


def _prepare(ctx, method: str, url: str, options) -> tuple:
    """The request's (method, url, headers, body, time limit) from the Lua options table."""
    opt = options.__getitem__ if is_table(options) else (lambda key: None)
    headers = {"User-Agent": f"msgscript/{msgscript.__version__}"}
    if isinstance(opt(b"query"), bytes):
        url = urllib.parse.urlsplit(url)._replace(query=lua_text(opt(b"query"))).geturl()
    body = opt(b"body")
    if not isinstance(body, bytes):
        body = opt(b"form") if isinstance(opt(b"form"), bytes) else None
        if body is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
    cookies = _pairs(opt(b"cookies"))
    if cookies:
        headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
    auth = opt(b"auth")
    if is_table(auth):
        user, password = auth[b"user"], auth[b"pass"]
        if not truthy(user) or not truthy(password):
            raise _HttpError("auth table must contain no nil user and pass fields")
        token = base64.b64encode(_raw(f"{lua_text(user)}:{lua_text(password)}")).decode()
        headers["Authorization"] = f"Basic {token}"
    headers.update({_canonical(k): v for k, v in _pairs(opt(b"headers")).items()})
    return method.upper(), url, headers, body, _time_limit(ctx, opt(b"timeout"))


def _read_body(conn, resp, deadline: float, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(_DEADLINE)
        if conn.sock:
            conn.sock.settimeout(left)
        chunk = resp.read1(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise _TooBig(limit)
        chunks.append(chunk)


class _TooBig(Exception):
    def __init__(self, limit: int):
        super().__init__(f"response body larger than the script's memory limit allows ({limit} bytes)")


def _response(url: str, resp, body: bytes, gzipped: bool, limit: int) -> dict:
    headers, cookies = {}, {}
    for name, value in resp.getheaders():
        value = value.encode("latin-1", "replace").decode("utf-8", "surrogateescape")
        headers.setdefault(_canonical(name), value)
        if name.lower() == "set-cookie":
            key, _, val = value.split(";", 1)[0].partition("=")
            cookies[key.strip()] = val.strip().strip('"')
    if gzipped and headers.get("Content-Encoding", "").lower() == "gzip":
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        body = inflater.decompress(body, limit + 1)
        if len(body) > limit:
            raise _TooBig(limit)
        headers.pop("Content-Encoding")
        headers.pop("Content-Length", None)
    return {"body": body, "body_size": len(body), "status_code": resp.status,
            "headers": headers, "cookies": cookies, "url": url}


def _fetch(method: str, url: str, headers: dict, body, deadline: float, limit: int) -> dict:
    """Do one request (following up to 10 redirects) before `deadline`; raise _HttpError."""
    verb = method[:1] + method[1:].lower()
    gzipped = not any(k.lower() == "accept-encoding" for k in headers)
    if gzipped:
        headers = {**headers, "Accept-Encoding": "gzip"}
    for _ in range(11):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise _HttpError(f'{verb} "{url}": unsupported protocol scheme "{parts.scheme}"')
        left = deadline - time.monotonic()
        if left <= 0:
            raise _HttpError(f'{verb} "{url}": {_DEADLINE}')
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = cls(parts.netloc.rpartition("@")[2], timeout=left)
        try:
            if parts.username is not None and "Authorization" not in headers:
                creds = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
                headers = {**headers, "Authorization": "Basic " + base64.b64encode(_raw(creds)).decode()}
            target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
            conn.request(method, target, body=body, headers={k: _raw(v) for k, v in headers.items()})
            resp = conn.getresponse()
            location = resp.getheader("Location")
            if resp.status not in _REDIRECTS or not location:
                return _response(url, resp, _read_body(conn, resp, deadline, limit), gzipped, limit)
        except _TooBig as e:
            raise _HttpError(f'{verb} "{url}": {e}') from None
        except Exception as e:  # noqa: BLE001 - every failure is the script's `nil, err`
            reason = _DEADLINE if isinstance(e, TimeoutError) else error_text(e)
            raise _HttpError(f'{verb} "{url}": {reason}') from None
        finally:
            conn.close()
        # Go's redirect rules: 301-303 turn into a bodiless GET; credentials stay with their host
        dropped = {"Content-Type", "Content-Length"} if resp.status in (301, 302, 303) and method != "HEAD" else set()
        method, body = ("GET", None) if dropped else (method, body)
        url, old_host = urllib.parse.urljoin(url, location), parts.netloc
        if urllib.parse.urlsplit(url).netloc != old_host:
            dropped |= {"Authorization", "Cookie"}
        headers = {k: v for k, v in headers.items() if k not in dropped}
    raise _HttpError(f'{verb} "{url}": stopped after 10 redirects')


def _in_thread(func, *args) -> Future:
    """Run `func` on a daemon thread, so a hung DNS lookup cannot outlive the script's deadline."""
    fut: Future = Future()

    def run():
        try:
            fut.set_result(func(*args))
        except BaseException as e:  # noqa: BLE001 - handed to the waiting script
            fut.set_exception(e)

    threading.Thread(target=run, daemon=True, name="lua-http").start()
    return fut


def _start(ctx, method, url, options) -> tuple:
    """Start one request; returns (future, verb+url for errors, deadline)."""
    method, url, headers, body, timeout = _prepare(ctx, method, url, options)
    deadline = time.monotonic() + timeout
    what = f'{method[:1]}{method[1:].lower()} "{url}"'
    return _in_thread(_fetch, method, url, headers, body, deadline, ctx.max_bytes()), what, deadline


def _finish(started) -> dict:
    fut, what, deadline = started
    try:
        return fut.result(timeout=max(0.0, deadline - time.monotonic()) + 0.05)
    except FutureTimeout:
        raise _HttpError(f"{what}: {_DEADLINE}") from None


def _loader(ctx):
    def request(method=None, url=None, options=None):
        """http.request(method, url [, options]) -> response | nil, err"""
        method, url = check_string(method, 1), check_string(url, 2)
        try:
            return _finish(_start(ctx, method, url, options))
        except _HttpError as e:
            return None, str(e)

    def verb(name):
        def call(url=None, options=None):
            return request(name, check_string(url, 1), options)
        return call

    def request_batch(requests=None):
        """http.request_batch({{method, url [, options]}, ...}) -> responses [, errors]"""
        if not is_table(requests):
            raise ArgError(1, f"table expected, got {lua_type(requests)}")
        started, errors = [], []
        for entry in requests.values():
            try:
                if not is_table(entry):
                    raise _HttpError("Request must be a table")
                method, url = entry[1], entry[2]
                if not isinstance(method, bytes) or not isinstance(url, bytes):
                    raise _HttpError("Request must have a method and a url")
                started.append(_start(ctx, lua_text(method), lua_text(url), entry[3]))
            except _HttpError as e:
                errors.append(str(e))
        responses = []
        for item in started:
            try:
                responses.append(_finish(item))
            except _HttpError as e:
                errors.append(str(e))
        return (responses, errors) if errors else responses

    members = {name: verb(name) for name in ("get", "post", "put", "patch", "delete", "head")}
    members["request"] = request
    members["request_batch"] = request_batch
    return members


def lua_modules():
    return {"http": _loader}
