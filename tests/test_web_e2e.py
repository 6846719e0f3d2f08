"""examples/web.lua served by a real `msgscript server` with the web.lua router library, route by route over HTTP."""

from __future__ import annotations

import shutil

import pytest
import requests
from conftest import ROOT, MsgscriptProcess

EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def web(tmp_path_factory, nats_server):
    """`msgscript server -script DIR -library examples/libs` with examples/web.lua in DIR; yields the script's URL."""
    root = tmp_path_factory.mktemp("web-e2e")
    scripts = root / "scripts"
    scripts.mkdir()
    shutil.copy(EXAMPLES / "web.lua", scripts)
    server = MsgscriptProcess(["-script", str(scripts), "-library", str(EXAMPLES / "libs"),
                               "-natsurl", nats_server.url], root)
    yield f"{server.base}/example.libs.web"
    server.stop()


def test_plain_text_route(web):
    resp = requests.get(f"{web}/plain", timeout=10)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "text/plain"
    assert resp.text == "Hello, World!"


def test_json_route(web):
    resp = requests.get(f"{web}/json", timeout=10)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "application/json"
    assert resp.json() == {"name": "John"}


def test_path_parameter_is_rendered_html_escaped(web):
    resp = requests.get(f"{web}/path/hello", timeout=10)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/html")
    assert resp.text.strip() == "<p>hello</p>"

    resp = requests.get(f"{web}/path/%3Cb%3Ebold%20%26%20co", timeout=10)
    assert resp.status_code == 200
    assert resp.text.strip() == "<p>&lt;b&gt;bold &amp; co</p>"


def test_post_with_a_json_body(web):
    resp = requests.post(f"{web}/post", json={"name": "Ada"}, timeout=10)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/html")
    assert resp.text.strip() == "Hello Ada!"


def test_post_without_a_name_is_a_400_with_a_json_error(web):
    resp = requests.post(f"{web}/post", json={"nom": "Ada"}, timeout=10)
    assert resp.status_code == 400
    assert resp.json() == {"error": "a JSON body with a name is required"}

    resp = requests.post(f"{web}/post", data=b"not json", timeout=10)
    assert resp.status_code == 400


def test_query_parameters(web):
    resp = requests.get(f"{web}/search", params={"q": "lua rocks", "page": "2"}, timeout=10)
    assert resp.status_code == 200
    assert resp.json() == {"query": "lua rocks", "page": 2}

    assert requests.get(f"{web}/search", timeout=10).json() == {"query": "", "page": 1}


def test_put_replaces_an_item_from_json(web):
    resp = requests.put(f"{web}/items/7", json={"color": "red", "size": "L"}, timeout=10)
    assert resp.status_code == 200
    assert resp.json() == {"color": "red", "size": "L", "id": "7"}


def test_patch_updates_from_a_form(web):
    resp = requests.patch(f"{web}/items/7", data={"color": "dark red", "size": "L"}, timeout=10)
    assert resp.status_code == 200
    assert resp.json() == {"id": "7", "changed": {"color": "dark red", "size": "L"}}


def test_delete_answers_with_its_own_header(web):
    resp = requests.delete(f"{web}/items/9", timeout=10)
    assert resp.status_code == 200
    assert resp.headers["X-Deleted"] == "9"
    assert resp.json() == {"deleted": "9"}


def test_head_falls_back_to_get_without_a_body(web):
    resp = requests.head(f"{web}/plain", timeout=10)
    assert resp.status_code == 200
    assert resp.content == b""


def test_unknown_path_is_404_and_other_verb_is_405(web):
    resp = requests.get(f"{web}/nowhere", timeout=10)
    assert resp.status_code == 404
    assert "/nowhere" in resp.text

    resp = requests.post(f"{web}/json", timeout=10)
    assert resp.status_code == 405
    assert set(resp.headers["Allow"].split(", ")) == {"GET", "HEAD"}

    resp = requests.get(f"{web}/items/7", timeout=10)
    assert resp.status_code == 405
    assert set(resp.headers["Allow"].split(", ")) == {"PUT", "PATCH", "DELETE"}


def test_keep_alive_session_across_routes(web):
    with requests.Session() as session:
        for _ in range(3):
            assert session.get(f"{web}/json", timeout=10).json() == {"name": "John"}
            assert session.delete(f"{web}/items/1", timeout=10).headers["X-Deleted"] == "1"
