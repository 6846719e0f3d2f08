"""`-compat go`: what a client of the Go original observes, exactly (issue 20, item 6).

The expected bytes, statuses and headers are those measured on the Go original (numkem/msgscript,
research notes §4.1-4.11). One server with -compat go serves every script of this module; clients
talk to it over real NATS and raw HTTP (a socket, so that request targets go out unchanged).
"""

from __future__ import annotations

import base64
import json
import re
import socket
import time

import nats.errors
import pytest
import requests
from conftest import MsgscriptProcess, Nats, NatsServer, wait_until, write_script

from test_gopher_compat import collect_replies


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


SLOW = """--* subject: gocompat.slow
--* name: slow
local time = require("time")
function OnMessage(subject, payload)
  time.sleep(tonumber(payload) or 1.5)
  local f = io.open(os.getenv("GOCOMPAT_MARKS") .. "/slow-" .. payload, "w")
  f:write("finished")
  f:close()
  return "slept"
end
"""

MARK = """--* subject: gocompat.mark
--* name: mark
function OnMessage(subject, payload)
  local f = io.open(os.getenv("GOCOMPAT_MARKS") .. "/mark-" .. payload, "w")
  f:write("ran")
  f:close()
  return "marked"
end
"""

# what OnMessage returns, chosen by the payload
RETURNS = """--* subject: gocompat.returns
--* name: returns
function OnMessage(subject, payload)
  if payload == "number" then return 42 end
  if payload == "nil" then return nil end
  if payload == "table" then return {} end
  if payload == "boolean" then return true end
  if payload == "empty" then return "" end
  if payload == "two" then return "a", "b" end
  if payload == "error" then error("it failed <b>&</b>") end
  return subject .. ":" .. payload
end
"""

OTHER = """--* subject: gocompat.other
--* name: other
function OnMessage(subject, payload) return "other got " .. payload .. " on " .. subject end
"""

# an HTTP-mode script whose GET answers what the path asks for, and echoes the url argument
WEB = r"""--* subject: gocompat.web
--* name: web
--* http: true
local answers = {
  ["/true"] = function() return true end,
  ["/table404"] = function() return {}, "404" end,
  ["/fraction"] = function() return "x", 201.7 end,
  ["/negative"] = function() return "x", -0.4 end,
  ["/spaced"] = function() return "x", " 302 " end,
  ["/hex"] = function() return "x", "0x1F4" end,
  ["/octal"] = function() return "x", "0201" end,
  ["/array"] = function() return "x", 200, {"a"} end,
  ["/values"] = function() return 1e15, 200, {["X-Flag"] = true, ["X-Num"] = 2^53, ["X-Ratio"] = 0.1 + 0.2} end,
  ["/nan"] = function() return "x", 0/0 end,
  ["/fails"] = function() error("web failed") end,
  ["/badname"] = function() return "x", 200, {["Bad Name"] = "1"} end,
  ["/crlf"] = function() return "x", 200, {["X-A"] = "1\r\nInjected: yes"} end,
}
function GET(url, body)
  local answer = answers[url]
  if answer then return answer() end
  return "url=" .. url, 200, {["Content-Type"] = "text/plain"}
end
"""

# the chunk itself returns values: in Go they stay on the stack and become the body and the status
TOPLEVEL = """--* subject: gocompat.toplevel
--* name: toplevel
--* http: true
function GET(url, body) return "from GET", 202, {["content-type"] = "text/plain"} end
return "from the chunk", 201
"""

# two scripts on one subject: the first (by name) is the slow one
ORDER_A = """--* subject: gocompat.order
--* name: a_slow
local time = require("time")
function OnMessage(subject, payload) time.sleep(0.3) return "a" end
"""
ORDER_B = """--* subject: gocompat.order
--* name: b_fast
function OnMessage(subject, payload) return "b" end
"""

SOURCE = """--* subject: gocompat.source
--* name: source
--* require: shared
function OnMessage(subject, payload) return shared() end
"""
SHARED = "--* name: shared\nfunction shared() return 'shared' end\n"


@pytest.fixture(scope="module")
def go(tmp_path_factory, nats_server):
    root = tmp_path_factory.mktemp("compat_go")
    scripts, libs, marks = root / "scripts", root / "libs", root / "marks"
    for d in (scripts, libs, marks):
        d.mkdir()
    for name, text in (("slow.lua", SLOW), ("mark.lua", MARK), ("returns.lua", RETURNS), ("other.lua", OTHER),
                       ("web.lua", WEB), ("source.lua", SOURCE), ("toplevel.lua", TOPLEVEL),
                       ("order_a.lua", ORDER_A), ("order_b.lua", ORDER_B)):
        write_script(scripts, name, text)
    write_script(libs, "shared.lua", SHARED)
    proc = MsgscriptProcess(["-script", str(scripts), "-library", str(libs), "-compat", "go", "-http-timeout", "1s",
                             "-natsurl", nats_server.url], root, {"GOCOMPAT_MARKS": str(marks)})
    proc.marks = marks
    client = Nats(nats_server.url)
    proc.nats = client
    yield proc
    client.close()
    proc.stop()


def raw_http(port: int, target: str | bytes, method: str = "GET", body: bytes = b"") -> tuple[int, dict, bytes]:
    """One request with the target exactly as given: (status, headers with lower-case names, body)."""
    target = target.encode("latin-1") if isinstance(target, str) else target
    head = b"%s %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (
        method.encode(), target, len(body))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    header_block, _, content = data.partition(b"\r\n\r\n")
    lines = header_block.decode("latin-1").split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return int(lines[0].split()[1]), {k: v if len(v) > 1 else v[0] for k, v in headers.items()}, content


def reply_of(go, subject: str, data: bytes) -> bytes:
    return go.nats.request(subject, data, timeout=10).data


# --- 4.1 the wait runs out: 503 context deadline exceeded ---------------------------------------

def test_a_wait_that_runs_out_is_503_context_deadline_exceeded_and_the_script_finishes(go):
    started = time.monotonic()
    status, headers, body = raw_http(go.port, "/gocompat.slow", "POST", b"1.5")
    assert time.monotonic() - started < 1.4
    assert (status, body) == (503, b"context deadline exceeded")
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert headers["content-length"] == "25"
    assert "date" in headers and "server" not in headers  # Go's net/http headers
    # as in Go, the script was not stopped by the wait: it runs on and finishes
    assert wait_until(lambda: (go.marks / "slow-1.5").exists(), 5)


# --- 4.2 ?_timeout= --------------------------------------------------------------------------------

@pytest.mark.parametrize("query", ["_timeout=abc", "_timeout=5", "_timeout=", "_timeout", "_timeout=5x"])
def test_an_invalid_timeout_query_is_the_default_wait(go, query):
    status, _, body = raw_http(go.port, f"/gocompat.slow?{query}", "POST", b"1.2")
    assert (status, body) == (503, b"context deadline exceeded")  # the default 1s, not 5s, not a 400


@pytest.mark.parametrize("value", ["0", "0s", "-1s", "-5m"])
def test_a_zero_or_negative_timeout_answers_503_at_once_without_running(go, value):
    started = time.monotonic()
    status, headers, body = raw_http(go.port, f"/gocompat.mark?_timeout={value}", "POST", f"t{value}".encode())
    assert time.monotonic() - started < 0.5
    assert (status, body, headers["content-type"]) == (503, b"context deadline exceeded",
                                                       "text/plain; charset=utf-8")
    time.sleep(0.3)
    assert not (go.marks / f"mark-t{value}").exists()


def test_the_first_timeout_value_counts_and_may_lengthen_the_wait(go):
    status, _, body = raw_http(go.port, "/gocompat.slow?_timeout=4s&_timeout=0s", "POST", b"1.1")
    assert status == 200
    (result,) = json.loads(body)
    assert base64.b64decode(result["payload"]) == b"slept"


def test_the_url_argument_keeps_the_timeout_query(go):
    status, _, body = raw_http(go.port, "/gocompat.web?_timeout=3s")
    assert (status, body) == (200, b"url=?_timeout=3s")


# --- 4.3 / 4.4 a verb without a function, a raw NATS message to an HTTP-mode script ------------------

def test_a_verb_without_a_function_is_an_empty_200_html_page(go):
    status, headers, body = raw_http(go.port, "/gocompat.web/x", "PATCH", b"data")
    assert (status, body) == (200, b"")
    assert headers["content-type"] == "text/html" and headers["content-length"] == "0"


def test_a_raw_nats_message_to_an_http_mode_script_is_the_empty_page_envelope(go):
    assert reply_of(go, "gocompat.web", b"anything") == (
        b'{"script_result":[{"http_code":200,"error":"","http_headers":{},"is_html":true,"payload":""}],'
        b'"is_html":true}')


def test_an_envelope_method_is_looked_up_as_it_is_written(go):
    envelope = json.dumps({"subject": "gocompat.web", "payload": b64("b"), "method": "get", "url": "/true"})
    (result,) = json.loads(reply_of(go, "gocompat.web", envelope.encode()))["script_result"]
    assert (result["http_code"], result["payload"]) == (200, "")  # Go has no global "get": nothing ran


# --- 4.5 / 4.6 payload null, http_headers --------------------------------------------------------------

@pytest.mark.parametrize("kind", ["number", "nil", "table", "boolean"])
def test_a_normal_mode_return_that_is_not_a_string_has_payload_null(go, kind):
    assert reply_of(go, "gocompat.returns", kind.encode()) == (
        b'{"script_result":[{"http_code":0,"error":"","http_headers":null,"is_html":false,"payload":null}],'
        b'"is_html":false}')


def test_an_empty_string_has_an_empty_payload_and_extra_values_are_ignored(go):
    (empty,) = json.loads(reply_of(go, "gocompat.returns", b"empty"))["script_result"]
    assert empty["payload"] == ""
    (two,) = json.loads(reply_of(go, "gocompat.returns", b"two"))["script_result"]
    assert two["payload"] == b64("a")


def test_errors_have_payload_null_and_go_json_escaping(go):
    data = reply_of(go, "gocompat.returns", b"error")
    assert b"\\u003cb\\u003e\\u0026\\u003c/b\\u003e" in data and b"<b>" not in data
    (result,) = json.loads(data)["script_result"]
    assert "it failed <b>&</b>" in result["error"]
    assert (result["http_code"], result["http_headers"], result["is_html"], result["payload"]) == (0, None, False, None)


def test_html_results_carry_headers_also_when_they_fail(go):
    ok = json.dumps({"subject": "gocompat.web", "payload": "", "method": "GET", "url": "/array"})
    (result,) = json.loads(reply_of(go, "gocompat.web", ok.encode()))["script_result"]
    assert result == {"http_code": 200, "error": "", "http_headers": {"1": "a"}, "is_html": True,
                      "payload": b64("x")}
    failed = json.dumps({"subject": "gocompat.web", "payload": "", "method": "GET", "url": "/fails"})
    (result,) = json.loads(reply_of(go, "gocompat.web", failed.encode()))["script_result"]
    assert "web failed" in result["error"]
    assert (result["http_code"], result["http_headers"], result["is_html"], result["payload"]) == (0, {}, True, None)


# --- 4.7 the envelope: its subject chooses the scripts; payload null ------------------------------------

def test_the_envelope_subject_chooses_the_scripts(go):
    envelope = json.dumps({"subject": "gocompat.other", "payload": b64("Ann")})
    (result,) = json.loads(reply_of(go, "gocompat.returns", envelope.encode()))["script_result"]
    assert base64.b64decode(result["payload"]) == b"other got Ann on gocompat.other"


def test_an_envelope_naming_a_subject_without_scripts_gets_the_go_error(go):
    envelope = json.dumps({"subject": "gocompat.nothing", "payload": b64("x")})
    assert reply_of(go, "gocompat.returns", envelope.encode()) == (
        b'{"script_result":null,"is_html":false,'
        b'"error":"failed to get scripts for subject: script not found for subject: gocompat.nothing"}')


@pytest.mark.parametrize("data", [b'{"payload": null, "x": 1}', b'{"subject": "gocompat.other"}', b"{}",
                                  b'{"payload": null, "method": "GET", "async": true}'])
def test_payload_null_makes_the_whole_data_the_payload(go, data):
    (result,) = json.loads(reply_of(go, "gocompat.returns", data))["script_result"]
    assert base64.b64decode(result["payload"]) == b"gocompat.returns:" + data


def test_envelope_keys_match_whatever_their_case_and_may_follow_white_space(go):
    for data in (b'{"Payload": "aGk=", "subject": "gocompat.returns"}',
                 b' \n {"PAYLOAD": "aGk=", "SUBJECT": "gocompat.returns"}'):
        (result,) = json.loads(reply_of(go, "gocompat.returns", data))["script_result"]
        assert base64.b64decode(result["payload"]) == b"gocompat.returns:hi", data


def test_an_envelope_without_a_subject_looks_up_the_empty_subject(go):
    assert reply_of(go, "gocompat.returns", b'{"payload": "aGk="}') == (
        b'{"script_result":null,"is_html":false,'
        b'"error":"failed to get scripts for subject: script not found for subject: "}')


def test_a_field_of_the_wrong_type_makes_the_data_raw_but_async_stays(go):
    data = b'{"payload": "!!", "async": true}'
    msgs = collect_replies(go.nats, "gocompat.returns", data, wait=1.5)
    assert [m.data for m in msgs][0] == b"{}"
    (result,) = json.loads(msgs[1].data)["script_result"]
    assert base64.b64decode(result["payload"]) == b"gocompat.returns:" + data
    assert len(msgs) == 2


def test_async_answers_an_empty_object_then_the_reply(go):
    envelope = json.dumps({"subject": "gocompat.other", "payload": b64("Bo"), "async": True}).encode()
    msgs = collect_replies(go.nats, "gocompat.returns", envelope, wait=1.5)
    assert msgs[0].data == b"{}" and len(msgs) == 2
    (result,) = json.loads(msgs[1].data)["script_result"]
    assert base64.b64decode(result["payload"]) == b"other got Bo on gocompat.other"


# --- 4.8 the url argument ------------------------------------------------------------------------------------

URLS = [
    ("/gocompat.web", ""),
    ("/gocompat.web/", "/"),
    ("/gocompat.web/a/b?x=1&y=/gocompat.web", "/a/b?x=1&y="),
    ("/gocompat.web/gocompat.webx", "x"),
    ("/gocompat.web/?", "/?"),
    ("/gocompat.web/a%20b?q=%2F", "/a%20b?q=%2F"),
    ("/gocompat.web/a%2Fb", "/a%2Fb"),
    ("/gocompat.web/%7E", "/%7E"),
    ("/gocompat.web/a;b", "/a;b"),
    ("/gocompat.web/%C3%A9?z=%C3%A9", "/%C3%A9?z=%C3%A9"),
    ("/gocompat%2Eweb/x", "/gocompat%2Eweb/x"),
    ("http://example.net/gocompat.web/a?b=1", "http://example.net/a?b=1"),
]


@pytest.mark.parametrize("target, url", URLS)
def test_the_url_argument_is_computed_as_go_does(go, target, url):
    status, _, body = raw_http(go.port, target)
    assert (status, body.decode()) == (200, f"url={url}")


def test_raw_non_ascii_bytes_in_the_target_are_a_400(go):
    """Go re-escapes them (`/f/é` gives the url `/%C3%A9`); msgscript's strict parser refuses them."""
    status, _, _ = raw_http(go.port, "/gocompat.web/é".encode())
    assert status == 400


@pytest.mark.parametrize("target, location", [("//gocompat.web/x", "/gocompat.web/x"),
                                              ("/gocompat.web/./a/../b?q=1", "/gocompat.web/b?q=1"),
                                              ("/gocompat.web//c/", "/gocompat.web/c/")])
def test_a_path_that_is_not_clean_is_redirected_to_its_clean_form(go, target, location):
    status, headers, body = raw_http(go.port, target)
    assert (status, headers["location"], body) == (301, location, b"")


# --- 4.9 return conversions ---------------------------------------------------------------------------------

@pytest.mark.parametrize("path, status, body", [
    ("/true", 200, b""), ("/table404", 404, b""), ("/fraction", 201, b"x"), ("/negative", 200, b"x"),
    ("/spaced", 302, b"x"), ("/hex", 500, b"x"), ("/octal", 129, None), ("/values", 200, b"1000000000000000"),
])
def test_return_values_are_converted_as_go_converts_them(go, path, status, body):
    got_status, headers, got_body = raw_http(go.port, f"/gocompat.web{path}")
    if status == 129:  # "0201" is octal 129: outside 200-599, msgscript answers 500 (Go sends 129 and a 200)
        assert got_status == 500 and b"invalid HTTP status 129" in got_body
        return
    assert (got_status, got_body) == (status, body)
    assert headers["content-type"] == "text/html"
    if path == "/values":
        assert (headers["x-flag"], headers["x-num"], headers["x-ratio"]) == ("", "9007199254740992",
                                                                            "0.30000000000000004")


def test_array_entries_of_the_headers_table_are_named_by_their_index(go):
    _, headers, _ = raw_http(go.port, "/gocompat.web/array")
    assert headers["1"] == "a"


def test_an_http_mode_error_is_a_500_with_its_message(go):
    """Go writes status 0, its server drops the connection: msgscript keeps a clear error (documented)."""
    status, headers, body = raw_http(go.port, "/gocompat.web/fails")
    assert status == 500 and b"web failed" in body


@pytest.mark.parametrize("path", ["/badname", "/crlf"])
def test_a_header_that_could_split_the_response_is_a_500(go, path):
    """Go's net/http drops a bad header name and turns CR LF into spaces; msgscript refuses (documented)."""
    status, headers, body = raw_http(go.port, f"/gocompat.web{path}")
    assert status == 500 and b"script web returned" in body and "injected" not in headers


def test_a_status_go_cannot_write_is_a_500_not_a_dropped_connection(go):
    status, _, body = raw_http(go.port, "/gocompat.web/nan")
    assert status == 500 and b"invalid HTTP status -9223372036854775808" in body


def test_a_chunks_own_return_values_are_ignored_and_content_type_is_matched_in_any_case(go):
    """Go leaks the chunk's return values into the answer and, seeing no "Content-Type" key written
    exactly so, adds a second Content-Type; msgscript answers with what GET returned (documented)."""
    status, headers, body = raw_http(go.port, "/gocompat.toplevel")
    assert (status, body, headers["content-type"]) == (202, b"from GET", "text/plain")


def test_results_come_in_the_order_of_the_scripts(go):
    """Go lists results as they complete; msgscript in the order of the scripts (documented)."""
    results = json.loads(reply_of(go, "gocompat.order", b""))["script_result"]
    assert [base64.b64decode(r["payload"]) for r in results] == [b"a", b"b"]


def test_an_async_envelope_without_a_reply_subject_still_runs(go):
    """Go fails to publish the {} to an empty reply subject and runs nothing; msgscript runs the scripts."""
    envelope = json.dumps({"subject": "gocompat.mark", "payload": b64("async-no-reply"), "async": True})
    go.nats.run(go.nats.nc.publish("gocompat.mark", envelope.encode()))
    go.nats.run(go.nats.nc.flush())
    assert wait_until(lambda: (go.marks / "mark-async-no-reply").exists(), 5)


# --- 4.10 normal-mode answers over HTTP ----------------------------------------------------------------------

def test_normal_mode_answers_are_a_json_array_as_text_plain(go):
    status, headers, body = raw_http(go.port, "/gocompat.returns", "POST", b"error")
    assert status == 200 and headers["content-type"] == "text/plain; charset=utf-8"
    assert b"\\u003cb\\u003e" in body
    (result,) = json.loads(body)
    assert result["payload"] is None and "it failed" in result["error"]
    status, _, body = raw_http(go.port, "/gocompat.returns", "POST", b"number")
    assert body == b'[{"http_code":0,"error":"","http_headers":null,"is_html":false,"payload":null}]'


def test_an_unknown_subject_is_the_go_file_store_error(go):
    status, headers, body = raw_http(go.port, "/gocompat.unknown")
    assert (status, body) == (500, b"Error: failed to get scripts for subject: script not found for subject: "
                                   b"gocompat.unknown")
    assert headers["content-type"] == "text/plain; charset=utf-8"


# --- 4.11 __listScripts, __listNamesForScript, __infoNamedScript ------------------------------------------

def special(go, subject: str, data: bytes = b"") -> dict:
    return json.loads(reply_of(go, subject, data))


def test_list_scripts_answers_the_subjects(go):
    doc = special(go, "__listScripts")
    (result,) = doc["script_result"]
    assert (doc["is_html"], result["http_code"], result["http_headers"], result["is_html"]) == (True, 200, {}, True)
    subjects = json.loads(base64.b64decode(result["payload"]))
    assert {"gocompat.slow", "gocompat.web", "gocompat.returns", "gocompat.other"} <= set(subjects)


def test_list_names_for_script_answers_names_or_the_go_error(go):
    (result,) = special(go, "__listNamesForScript", b"gocompat.web")["script_result"]
    assert json.loads(base64.b64decode(result["payload"])) == ["web"]
    assert reply_of(go, "__listNamesForScript", b"gocompat.none") == (
        b'{"script_result":null,"is_html":false,"error":"script not found for subject: gocompat.none"}')


def test_info_named_script_answers_its_content_executor_and_libraries(go):
    doc = special(go, "__infoNamedScript", b"gocompat.source,source")
    (result,) = doc["script_result"]
    assert result["http_headers"] == {"executor": "lua", "libraries": "shared"}
    assert (doc["is_html"], result["is_html"]) == (False, False)
    content = base64.b64decode(result["payload"]).decode()
    assert "function OnMessage" in content and "--*" not in content
    (web,) = special(go, "__infoNamedScript", b"gocompat.web,web")["script_result"]
    assert web["is_html"] is True
    assert reply_of(go, "__infoNamedScript", b"gocompat.web,nope") == (
        b'{"script_result":null,"is_html":false,"error":"no script found for subject gocompat.web with name nope"}')
    assert reply_of(go, "__infoNamedScript", b"only-one-part") == (
        b'{"script_result":null,"is_html":false,"error":"invalid request"}')


def test_list_scripts_over_http_is_an_html_page_of_json_for_local_clients(go):
    r = requests.get(f"{go.base}/__listScripts", timeout=5)
    assert r.status_code == 200 and r.headers["Content-Type"] == "text/html"
    assert "gocompat.web" in r.json()
    r = requests.post(f"{go.base}/__listNamesForScript", data=b"gocompat.none", timeout=5)
    assert (r.status_code, r.text) == (500, "Error: script not found for subject: gocompat.none")


def test_without_compat_the_introspection_subjects_are_not_served(tmp_path):
    """They hand out script sources to anyone on NATS: only with -compat go (a NATS of its own here,
    where no -compat go server listens)."""
    server = NatsServer()
    client = None
    try:
        write_script(tmp_path, "other.lua", OTHER.replace("gocompat.other", "gocompat.plain"))
        proc = MsgscriptProcess(["-script", str(tmp_path), "-natsurl", server.url], tmp_path)
        client = Nats(server.url)
        assert client.request("gocompat.plain", b"x").data == b"other got x on gocompat.plain"
        with pytest.raises(nats.errors.NoRespondersError):
            client.request("__listScripts", b"", timeout=2)
        proc.stop()
    finally:
        if client is not None:
            client.close()
        server.stop()


def test_over_the_inflight_limit_the_refusal_is_a_go_reply(start_server, tmp_path):
    """Go has no such limit; msgscript's refusal keeps the Go shapes: a Reply with the error over NATS."""
    import threading

    # a subject of its own: the module's server (same NATS, same queue group) serves gocompat.slow
    write_script(tmp_path, "slow.lua", SLOW.replace("os.getenv(\"GOCOMPAT_MARKS\")", f"'{tmp_path}'")
                 .replace("gocompat.slow", "gocompat.busy"))
    srv = start_server("-script", str(tmp_path), "-compat", "go", "-max-inflight", "1", "-http-timeout", "5s")
    first = threading.Thread(target=raw_http, args=(srv.port, "/gocompat.busy", "POST", b"3"))
    first.start()
    try:  # the first request holds the one slot for 3 s
        assert wait_until(lambda: re.search(r"^msgscript_inflight_calls 1(\.0)?$",
                                            requests.get(f"{srv.base}/metrics", timeout=5).text, re.M), 10)
        client = Nats(srv_nats_url(srv))
        try:
            doc = json.loads(client.request("gocompat.busy", b"1", timeout=5).data)
        finally:
            client.close()
        assert doc["script_result"] is None and doc["is_html"] is False and "server busy" in doc["error"]
        status, _, _ = raw_http(srv.port, "/gocompat.busy", "POST", b"1")
        assert status == 429
    finally:
        first.join()


def srv_nats_url(srv) -> str:
    return next(arg for arg in srv.proc.args if str(arg).startswith("nats://"))
