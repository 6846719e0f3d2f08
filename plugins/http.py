"""`http` (cjoudrey/gluahttp): HTTP requests bounded by the script's deadline and memory cap.

Deliberate differences from the original: responses are plain tables (pairs and json.encode
work; there is no http.response metatable); numeric timeouts keep their fractions; every
request is also bounded by the script's deadline; a body larger than what the script's memory
cap leaves is an error instead of a crash; HTTP_PROXY is not honoured; request_batch runs at
most BATCH_PARALLEL requests at a time.

Requests run on the scheduler's executor for blocking work (a DNS lookup cannot be given a timeout),
which the call waits for until the request's deadline; the body is read as it arrives (and inflated
as it is read), and reading stops once it passes what the script's memory cap leaves.
"""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import time
import urllib.parse
import zlib

import msgscript
from msgscript import ArgError, LuaError, check_string, error_text, go_duration, is_table, lua_text, lua_type, truthy
from msgscript import ticker



_REDIRECTS = (301, 302, 303, 307, 308)
_DEADLINE = "context deadline exceeded"
_GRACE = 0.05  # how long past its deadline a request is waited for (its own timeouts end it first)
BATCH_PARALLEL = 8  # requests of one request_batch in flight at once


def _raw(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


class _HttpError(Exception):
    """A request failure reported to the script as `nil, err`."""


def _canonical(name: str) -> str:
    return "-".join(p[:1].upper() + p[1:].lower() for p in name.split("-"))


def _pairs(ctx, table) -> dict:
    if not is_table(table):
        return {}
    tick, out = ticker(ctx.check), {}
    for k, v in table.items():
        tick()
        out[lua_text(k)] = lua_text(v)
    return out


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
    cookies = _pairs(ctx, opt(b"cookies"))
    if cookies:
        headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
    auth = opt(b"auth")
    if is_table(auth):
        user, password = auth[b"user"], auth[b"pass"]
        if not truthy(user) or not truthy(password):
            raise _HttpError("auth table must contain no nil user and pass fields")
        token = base64.b64encode(_raw(f"{lua_text(user)}:{lua_text(password)}")).decode()
        headers["Authorization"] = f"Basic {token}"
    headers.update({_canonical(k): v for k, v in _pairs(ctx, opt(b"headers")).items()})
    return method.upper(), url, headers, body, _time_limit(ctx, opt(b"timeout"))


def _read_body(conn, resp, deadline: float, limit: int, gzipped: bool) -> bytes:
    """The body as it arrives (inflated as it comes when gzipped), failing once it passes `limit` bytes."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzipped else None
    chunks, size = [], 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(_DEADLINE)
        if conn.sock:
            conn.sock.settimeout(left)
        chunk = resp.read1(65536)
        if inflater is not None:
            chunk = inflater.decompress(chunk, limit + 1 - size) if chunk else inflater.flush()
            if inflater.unconsumed_tail:
                raise _TooBig(limit)
        if not chunk and (inflater is None or inflater.eof or not resp.fp):
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise _TooBig(limit)
        chunks.append(chunk)


class _TooBig(Exception):
    def __init__(self, limit: int):
        super().__init__(f"response body larger than the script's memory limit allows ({limit} bytes)")


def _response(url: str, conn, resp, deadline: float, gzipped: bool, limit: int) -> dict:
    headers, cookies = {}, {}
    for name, value in resp.getheaders():
        value = value.encode("latin-1", "replace").decode("utf-8", "surrogateescape")
        headers.setdefault(_canonical(name), value)
        if name.lower() == "set-cookie":
            key, _, val = value.split(";", 1)[0].partition("=")
            cookies[key.strip()] = val.strip().strip('"')
    inflate = gzipped and headers.get("Content-Encoding", "").lower() == "gzip"
    if inflate:
        headers.pop("Content-Encoding")
        headers.pop("Content-Length", None)
    body = _read_body(conn, resp, deadline, limit, inflate)
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
                return _response(url, conn, resp, deadline, gzipped, limit)
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


class _Request:
    """One request, prepared from the script's arguments: what _fetch needs, and its deadline."""

    def __init__(self, ctx, method, url, options):
        method, url, headers, body, timeout = _prepare(ctx, method, url, options)
        self.deadline = time.monotonic() + timeout
        self.what = f'{method[:1]}{method[1:].lower()} "{url}"'
        self.args = (method, url, headers, body, self.deadline, ctx.max_bytes())

    def run(self, ctx) -> dict:
        """Do it on the scheduler's executor for blocking work, waiting until its deadline."""
        try:
            return ctx.blocking(_fetch, *self.args, cap=max(0.0, self.deadline - time.monotonic()) + _GRACE)
        except LuaError:
            raise _HttpError(f"{self.what}: {_DEADLINE}") from None


def _run_all(ctx, requests: list[_Request]) -> list:
    """Each request's response or _HttpError, BATCH_PARALLEL at a time on the executor for blocking work."""
    pool = ctx.services.blocking
    if pool is None:  # no scheduler (a test's runner): one after the other
        return [_outcome(lambda r=r: r.run(ctx)) for r in requests]
    outcomes: list = [None] * len(requests)
    stop = time.monotonic() + ctx.remaining()  # the script's deadline
    waiting = list(enumerate(requests))
    running: dict = {}  # future -> index
    try:
        while waiting or running:
            while waiting and len(running) < BATCH_PARALLEL:
                i, r = waiting.pop(0)
                running[pool.submit(_fetch, *r.args)] = i
            soonest = min(requests[i].deadline for i in running.values())
            done, _ = concurrent.futures.wait(running, max(0.0, min(soonest - time.monotonic(), ctx.remaining()))
                                              + _GRACE, return_when=concurrent.futures.FIRST_COMPLETED)
            now = time.monotonic()
            for future in list(running):
                i = running[future]
                if future in done:
                    outcomes[i] = _outcome(future.result)
                elif now > requests[i].deadline or now > stop:
                    future.cancel()  # its own timeouts end it soon: it is not waited for
                    outcomes[i] = _HttpError(f"{requests[i].what}: {_DEADLINE}")
                else:
                    continue
                del running[future]
    finally:
        for future in running:
            future.cancel()
    return outcomes


def _outcome(func):
    try:
        return func()
    except _HttpError as e:
        return e


def _loader(ctx):
    def request(method=None, url=None, options=None):
        """http.request(method, url [, options]) -> response | nil, err"""
        method, url = check_string(method, 1), check_string(url, 2)
        try:
            return _Request(ctx, method, url, options).run(ctx)
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
        prepared, errors = [], []
        for entry in requests.values():
            ctx.check()
            try:
                if not is_table(entry):
                    raise _HttpError("Request must be a table")
                method, url = entry[1], entry[2]
                if not isinstance(method, bytes) or not isinstance(url, bytes):
                    raise _HttpError("Request must have a method and a url")
                prepared.append(_Request(ctx, lua_text(method), lua_text(url), entry[3]))
            except _HttpError as e:
                errors.append(str(e))
        responses = []
        for outcome in _run_all(ctx, prepared):
            if isinstance(outcome, _HttpError):
                errors.append(str(outcome))
            else:
                responses.append(outcome)
        return (responses, errors) if errors else responses

    members = {name: verb(name) for name in ("get", "post", "put", "patch", "delete", "head")}
    members["request"] = request
    members["request_batch"] = request_batch
    return members


def lua_modules():
    return {"http": _loader}
