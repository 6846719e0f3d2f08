"""examples/libs/web.lua: the router library, driven through examples/web.lua like the server does."""

import json
import time
from pathlib import Path

import pytest

import msgscript

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = ROOT / "examples" / "libs" / "web.lua"
EXAMPLE = ROOT / "examples" / "web.lua"


@pytest.fixture(scope="module")
def call():
    """call(method, url, body=b"") -> Result, running the example with the library prepended."""
    services = msgscript.Services()
    msgscript.load_plugins([str(msgscript.BUNDLED_PLUGINS)], services.modules)
    script = msgscript.parse_script(EXAMPLE.read_text(), str(EXAMPLE))
    assert script.http and script.libraries == ["web"]
    script.content = LIBRARY.read_text() + "\n" + script.content
    executor = msgscript.LuaExecutor(services)

    def run(method, url, body=b""):
        return executor.run(script, msgscript.Call(script.subject, body, method, url, time.monotonic() + 5))

    return run


def content_type(result):
    return next(v for k, v in result.headers.items() if k.lower() == "content-type")


def test_plain_text_route(call):
    result = call("GET", "/plain")
    assert (result.http_code, result.payload) == (200, b"Hello, World!")
    assert content_type(result) == "text/plain"


def test_json_route(call):
    result = call("GET", "/json")
    assert result.http_code == 200
    assert json.loads(result.payload) == {"name": "John"}
    assert content_type(result) == "application/json"


def test_path_parameter_rendered_by_template_and_escaped(call):
    result = call("GET", "/path/a%3Cb%3E")
    assert result.http_code == 200
    assert result.payload.strip() == b"<p>a&lt;b&gt;</p>"
    assert content_type(result).startswith("text/html")


def test_post_with_json_body(call):
    result = call("POST", "/post", b'{"name": "Ann"}')
    assert (result.http_code, result.payload.strip()) == (200, b"Hello Ann!")
    bad = call("POST", "/post", b"not json")
    assert bad.http_code == 400 and "name" in json.loads(bad.payload)["error"]


def test_query_parameters(call):
    result = call("GET", "/search?q=lua+rocks&page=2")
    assert json.loads(result.payload) == {"query": "lua rocks", "page": 2}
    assert json.loads(call("GET", "/search").payload) == {"query": "", "page": 1}


def test_put_with_path_parameter_and_json_body(call):
    result = call("PUT", "/items/7", b'{"color": "blue"}')
    assert result.http_code == 200
    assert json.loads(result.payload) == {"color": "blue", "id": "7"}


def test_patch_with_form_body(call):
    result = call("PATCH", "/items/7", b"color=dark+red&size=L")
    assert json.loads(result.payload) == {"id": "7", "changed": {"color": "dark red", "size": "L"}}


def test_delete_with_own_header(call):
    result = call("DELETE", "/items/9")
    assert json.loads(result.payload) == {"deleted": "9"}
    assert result.headers["X-Deleted"] == "9"


def test_unknown_route_is_404(call):
    result = call("GET", "/nowhere")
    assert result.http_code == 404 and b"/nowhere" in result.payload


def test_known_path_with_other_verb_is_405(call):
    result = call("POST", "/json")
    assert result.http_code == 405
    assert result.headers["Allow"] == "GET, HEAD"


def test_trailing_slash_and_head_fall_back(call):
    assert json.loads(call("GET", "/json/").payload) == {"name": "John"}
    assert call("HEAD", "/json").http_code == 200
