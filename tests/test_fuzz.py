"""Generated input for the two parsers that take bytes from anyone.

(a) Raw HTTP requests (request lines, headers, chunked bodies, random bytes) sent over a real
socket to one real server: every input gets well-formed HTTP responses or a clean close, never
a hang and never a traceback in the server's log. (b) msgscript.parse_envelope with JSON-ish
and arbitrary bytes: a dict or None, never an exception.
"""

from __future__ import annotations

import base64
import json
import re
import socket

import msgscript
import pytest
import requests
from conftest import MsgscriptProcess, write_script
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

SOCKET_TIMEOUT = 10.0  # a request that gets neither an answer nor a close by then hangs

HELLO = """--* subject: fuzz.hello
--* name: hello
function OnMessage(_, payload) return "hello " .. payload end
"""

ECHO = """--* subject: fuzz.echo
--* name: echo
--* http: true
local function echo(url, body) return url .. " " .. #body, 200, {["X-Url"] = url} end
GET, POST, PUT, DELETE, PATCH, OPTIONS, HEAD = echo, echo, echo, echo, echo, echo, echo
"""


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, nats_server):
    base = tmp_path_factory.mktemp("fuzz")
    scripts = base / "scripts"
    scripts.mkdir()
    write_script(scripts, "hello.lua", HELLO)
    write_script(scripts, "echo.lua", ECHO)
    proc = MsgscriptProcess(["-script", str(scripts), "-natsurl", nats_server.url, "-max-body", "64KiB"], base)
    yield proc
    try:
        assert proc.proc.poll() is None, proc.log[-3000:]
        r = requests.post(f"{proc.base}/fuzz.hello", data=b"end", timeout=5)
        assert base64.b64decode(r.json()["hello"]["payload"]) == b"hello end"
        assert "Traceback" not in proc.log, proc.log[-5000:]
    finally:
        proc.stop(timeout=5)


# --- generated requests ----------------------------------------------------------------------

TOKEN = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
EOL = st.sampled_from([b"\r\n"] * 8 + [b"\n", b"\r", b"\r\r\n", b""])

methods = st.one_of(
    st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE",
                     b"PRI", b"get", b"G\x00T", b""]),
    st.text(TOKEN, max_size=12).map(str.encode),
    st.binary(max_size=8),
)
targets = st.one_of(
    st.sampled_from([b"/fuzz.echo", b"/fuzz.echo/a/b?x=1&y", b"/fuzz.hello", b"/", b"/healthz", b"/readyz",
                     b"/metrics", b"/_/list", b"/_/info/fuzz.echo/echo", b"/_/subject/fuzz.echo", b"*",
                     b"http://x/fuzz.echo", b"/fuzz.echo?_timeout=nan", b"/fuzz.echo?_timeout=1ms",
                     b"/fuzz.echo?_timeout=-1", b"/%00", b"/fuzz.echo/%2e%2e/x", b"/fuzz.echo/%2f", b"/nosuch",
                     b"/fuzz..echo", b"/fuzz.*", b"/fuzz.>", b"//", b"/fuzz.echo#frag", b"/" + b"a" * 9000]),
    st.builds(lambda s: b"/fuzz.echo/" + s, st.binary(max_size=40)),
    st.binary(max_size=40),
)
versions = st.one_of(
    st.sampled_from([b"HTTP/1.1"] * 6 + [b"HTTP/1.0", b"HTTP/0.9", b"HTTP/2.0", b"HTTP/1.9", b"http/1.1",
                                         b"HTTP/1.1 ", b"HTTP/11", b""]),
    st.binary(max_size=10),
)
header_names = st.one_of(
    st.sampled_from([b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Expect", b"Upgrade",
                     b"Content-Type", b"X-A", b"content-length", b"Transfer-Encoding ", b" Host", b""]),
    st.text(TOKEN, min_size=1, max_size=20).map(str.encode),
    st.binary(max_size=12),
)
header_values = st.one_of(
    st.sampled_from([b"0", b"5", b"-1", b"+3", b"0x10", b"99999999999999999999", b"chunked", b"gzip, chunked",
                     b"chunked, gzip", b"close", b"keep-alive", b"100-continue", b"websocket", b"h2c", b"x"]),
    st.integers(0, 70_000).map(lambda n: str(n).encode()),
    st.binary(max_size=30),
)
headers = st.lists(st.tuples(header_names, header_values), max_size=8)


def chunked(chunks: list[bytes], sizes: list[bytes | None], end: bytes) -> bytes:
    """A chunked body; a size of None is the real one (in hex), others are taken as they are."""
    out = b""
    for chunk, size in zip(chunks, sizes + [None] * len(chunks), strict=False):
        out += (size if size is not None else f"{len(chunk):x}".encode()) + b"\r\n" + chunk + b"\r\n"
    return out + end


chunk_sizes = st.one_of(st.none(), st.sampled_from([b"-1", b"0x3", b"fffffffffffffffffff", b"3;ext=1", b"3 ", b"",
                                                    b"z", b"10000"]), st.binary(max_size=6))
bodies = st.one_of(
    st.binary(max_size=300),
    st.builds(chunked, st.lists(st.binary(min_size=1, max_size=40), max_size=4), st.lists(chunk_sizes, max_size=4),
              st.sampled_from([b"0\r\n\r\n", b"0\r\nX-Trailer: 1\r\n\r\n", b"0\r\n", b"", b"0\n\n"])),
)


@st.composite
def requests_(draw) -> bytes:
    eol = draw(EOL)
    line = draw(methods) + b" " + draw(targets) + b" " + draw(versions)
    fields = b"".join(name + b": " + value + eol for name, value in draw(headers))
    body = draw(bodies)
    if draw(st.booleans()):  # a correct Content-Length or chunked framing for the body
        if draw(st.booleans()):
            fields += b"Content-Length: " + str(len(body)).encode() + eol
        else:
            fields += b"Transfer-Encoding: chunked" + eol
            body = chunked([body] if body else [], [], b"0\r\n\r\n")
    return line + eol + fields + eol + body


@st.composite
def plausible(draw) -> bytes:
    """A request a real client could send, with odd but legal parts: mostly reaches a script."""
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH"]))
    path = draw(st.sampled_from([b"/fuzz.echo", b"/fuzz.hello", b"/healthz", b"/_/list", b"/metrics"]))
    rest = draw(st.text("abc/%2F0.?&=_~+-", max_size=20).map(str.encode))
    query = draw(st.sampled_from([b"", b"?_timeout=1s", b"?_timeout=0", b"?_timeout=2h", b"?a=1&a=2"]))
    fields = b"".join(name.encode() + b": " + value.encode() + b"\r\n" for name, value in draw(
        st.lists(st.tuples(st.text(TOKEN, min_size=1, max_size=12), st.text(st.characters(
            min_codepoint=0x20, max_codepoint=0x7e), max_size=30)), max_size=5)))
    body = draw(st.binary(max_size=200))
    if body or draw(st.booleans()):
        fields += b"Content-Length: " + str(len(body)).encode() + b"\r\n"
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]))
    return method + b" " + path + rest + query + b" " + version + b"\r\nHost: x\r\n" + fields + b"\r\n" + body


raw_requests = st.one_of(
    plausible(),
    st.lists(plausible(), min_size=2, max_size=4).map(b"".join),  # pipelined
    requests_(),
    st.lists(requests_(), min_size=2, max_size=3).map(b"".join),  # pipelined
    st.binary(max_size=500),
    st.builds(lambda a, b: a + b, requests_(), st.binary(max_size=100)),
)


# --- what comes back ---------------------------------------------------------------------------

STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5]\d\d) [^\r\n]*\r\n")
HEADER_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+): ([^\x00-\x08\x0a-\x1f\x7f]*)")


def check_responses(data: bytes) -> list[int]:
    """The statuses of the well-formed responses `data` consists of; AssertionError otherwise."""
    statuses, pos = [], 0
    while pos < len(data):
        m = STATUS_LINE.match(data, pos)
        assert m, f"not a status line at byte {pos}: {data[pos:pos + 200]!r}"
        status = int(m.group(1))
        end = data.find(b"\r\n\r\n", m.start())
        assert end >= 0, f"headers never end: {data[pos:pos + 500]!r}"
        length = None
        for line in data[m.end():end].split(b"\r\n") if end > m.end() else []:
            h = HEADER_LINE.fullmatch(line)
            assert h, f"malformed header line {line!r} in {data[pos:end]!r}"
            if h.group(1).lower() == b"content-length":
                assert length is None, f"two Content-Length headers: {data[pos:end]!r}"
                length = int(h.group(2))
        pos = end + 4
        statuses.append(status)
        if status < 200:
            continue  # 100 Continue: no body, the real response follows
        assert length is not None, f"no Content-Length: {data[m.start():end]!r}"
        rest = data[pos:]
        if len(rest) >= length and (len(rest) == length or rest[length:].startswith(b"HTTP/1.1 ")):
            pos += length
        else:  # a HEAD response: the length of the body it would have had, no body
            assert rest == b"" or rest.startswith(b"HTTP/1.1 "), f"body does not match Content-Length {length}: " \
                                                                 f"{rest[:200]!r}"
    return statuses


def send(port: int, request: bytes) -> bytes:
    """Send a request, close our side, read everything until the server closes."""
    with socket.create_connection(("127.0.0.1", port), SOCKET_TIMEOUT) as s:
        s.settimeout(SOCKET_TIMEOUT)
        try:
            s.sendall(request)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server already answered and closed: fine
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass  # a close with unread input: clean enough
        except TimeoutError:
            raise AssertionError(f"no answer and no close within {SOCKET_TIMEOUT:g}s for {request[:300]!r}; "
                                 f"got {out[:300]!r}") from None
        return out


class LogTail:
    """The part of a server's log written since the last look."""

    def __init__(self, server: MsgscriptProcess):
        self.server, self.offset = server, len(server.log)

    def new(self) -> str:
        text = self.server.log
        part, self.offset = text[self.offset:], len(text)
        return part


@pytest.fixture(scope="module")
def log_tail(fuzz_server):
    return LogTail(fuzz_server)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=raw_requests)
@example(request=b"GET /fuzz.echo HTTP/1.1\r\nHost: x\r\n\r\n")
@example(request=b"POST /fuzz.echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
@example(request=b"HEAD /fuzz.echo HTTP/1.1\r\n\r\nGET /fuzz.echo HTTP/1.1\r\n\r\n")
@example(request=b"POST /fuzz.echo HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc")
@example(request=b"GET /fuzz.echo HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
@example(request=b"CONNECT x:80 HTTP/1.1\r\n\r\n")
def test_http_front_answers_or_closes_cleanly(fuzz_server, log_tail, request):
    out = send(fuzz_server.port, request)
    statuses = check_responses(out)
    event(f"first status {statuses[0]}" if statuses else "closed without a response")
    log = log_tail.new()
    assert "Traceback" not in log and " ERROR " not in log, f"for {request[:300]!r}:\n{log[-3000:]}"


# --- envelopes ---------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=15,
)
payloads = st.one_of(st.binary(max_size=50).map(lambda b: base64.b64encode(b).decode()), st.text(max_size=30),
                     json_values)
envelopes = st.fixed_dictionaries(
    {"payload": payloads},
    optional={k: json_values | st.text(max_size=10) for k in ("subject", "method", "url", "async", "executor", "raw")},
)


@st.composite
def mangled(draw, doc) -> bytes:
    """JSON text of `doc`, sometimes cut short or with bytes put in."""
    data = json.dumps(doc, ensure_ascii=draw(st.booleans()), allow_nan=True).encode()
    kind = draw(st.sampled_from(["as is", "as is", "cut", "insert", "nested"]))
    if kind == "cut":
        return data[:draw(st.integers(0, len(data)))]
    if kind == "insert":
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
    if kind == "nested":
        depth = draw(st.integers(1, 100_000))
        return b'{"payload": "", "x": ' + b"[" * depth + b"]" * depth + b"}"
    return data


envelope_bytes = st.one_of(
    envelopes.flatmap(mangled),
    st.binary(max_size=200),
    st.binary(max_size=200).map(lambda b: b'{"payload"' + b),
    st.binary(max_size=200).map(lambda b: b'{"payload": "' + b + b'"}'),
)


@settings(max_examples=500, deadline=None, database=None)
@given(data=envelope_bytes)
@example(data=b'{"payload": "aGk="}')
@example(data=b'{"payload": null}')
@example(data=b'{"payload": "\xff"}')
@example(data=b'{"payload": "\\ud800"}')
@example(data=b'{"payload": 1e999999}')
@example(data=b'{"payload": "", "x": ' + b"1" * 5000 + b"}")
def test_parse_envelope_returns_a_dict_or_none(data):
    result = msgscript.parse_envelope(data)
    assert result is None or isinstance(result, dict)
    if result is not None:
        assert isinstance(result["payload"], bytes)


@settings(max_examples=200, deadline=None, database=None)
@given(doc=envelopes)
def test_a_valid_envelope_is_read_as_one(doc):
    data = json.dumps(doc).encode()
    result = msgscript.parse_envelope(data)
    payload = doc["payload"]
    try:
        expected = base64.b64decode(payload or "", validate=True) if isinstance(payload, (str, type(None))) else None
    except ValueError:
        expected = None
    if expected is None:
        assert result is None
    else:
        assert result is not None and result["payload"] == expected
