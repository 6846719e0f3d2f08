"""The `scrape` plugin: finding attributes and text in HTML from Lua."""


from conftest import run_lua

PAGE = """<!DOCTYPE html>
<html><head><title>Shop</title></head>
<body>
  <div id="main" class="card featured">
    <a href="/pen" title="Pen">A <b>fine</b>   pen</a>
    <div class="card">nested card</div>
  </div>
  <div class="card"><a href="/ink">Ink</a></div>
  <ul><li>one<li>two <i>italic</i></ul>
  <img src="pen.png" alt="a pen"><img src="ink.png">
  <p>first<p>second
</body></html>
"""


def lua(src, *args, timeout=5):
    """Run `OnMessage(*args)` with the bundled plugins; values as Python (bytes -> str)."""
    return run_lua(src, *args, timeout=timeout, python=True)


def scrape(call):
    """Evaluate `scrape.<call>` with `html` bound to PAGE; returns (result, second value, count of values)."""
    src = f"""
    local scrape = require("scrape")
    function OnMessage(_, html)
      local function pack(...) return select("#", ...), ... end
      local n, result, second = pack(scrape.{call})
      return result, second, n
    end
    """
    return tuple(lua(src, b"", PAGE.encode()))


def test_text_by_class_does_not_descend_into_a_match():
    texts, err, count = scrape('find_text_by_class(html, "card")')
    assert texts == ["A fine pen nested card", "Ink"]
    assert err is None and count == 2


def test_text_by_id_and_tag():
    assert scrape('find_text_by_id(html, "main")')[0] == ["A fine pen nested card"]
    assert scrape('find_text_by_tag(html, "li")')[0] == ["one", "two italic"]
    assert scrape('find_text_by_tag(html, "p")')[0] == ["first", "second"]
    assert scrape('find_text_by_tag(html, "title")')[0] == ["Shop"]


def test_attr_by_tag_class_and_id_with_empty_string_for_missing():
    assert scrape('find_attr_by_tag(html, "href", "a")')[0] == ["/pen", "/ink"]
    assert scrape('find_attr_by_tag(html, "alt", "img")')[0] == ["a pen", ""]
    assert scrape('find_attr_by_class(html, "id", "featured")')[0] == ["main"]
    assert scrape('find_attr_by_id(html, "class", "main")')[0] == ["card featured"]


def test_attrs_take_the_count_first_and_the_query_last():
    maps, err, _ = scrape('find_attrs_by_tag(html, 2, "src", "alt", "img")')
    assert maps == [{"src": "pen.png", "alt": "a pen"}, {"src": "ink.png", "alt": ""}]
    assert err is None
    assert scrape('find_attrs_by_class(html, 1, "id", "featured")')[0] == [{"id": "main"}]
    assert scrape('find_attrs_by_id(html, 2, "id", "class", "main")')[0] == [{"id": "main", "class": "card featured"}]


def test_no_match_is_an_empty_list():
    src = """
    local scrape = require("scrape")
    function OnMessage(_, html)
      local res = scrape.find_text_by_id(html, "nothing")
      return type(res), #res
    end
    """
    assert lua(src, b"", PAGE.encode()) == ["table", 0]


def test_results_are_plain_lists_for_ipairs_and_fragments_work():
    src = """
    local scrape = require("scrape")
    function OnMessage()
      local out = {}
      for i, href in ipairs(scrape.find_attr_by_tag('<a href="x">1</a><a href="y">2</a>', "href", "a")) do
        out[#out + 1] = i .. "=" .. href
      end
      return table.concat(out, ",")
    end
    """
    assert lua(src) == ["1=x,2=y"]


def test_bad_arguments_raise_lua_errors():
    src = """
    local scrape = require("scrape")
    function OnMessage()
      local _, e1 = pcall(scrape.find_text_by_tag, nil, "a")
      local _, e2 = pcall(scrape.find_attrs_by_tag, "<img>", 2, "src")
      local _, e3 = pcall(scrape.find_attr_by_id, "<p>", "id")
      return e1, e2, e3
    end
    """
    assert lua(src) == ["bad argument #1 to 'find_text_by_tag' (string expected, got nil)",
                        "bad argument #4 to 'find_attrs_by_tag' (string expected, got nil)",
                        "bad argument #3 to 'find_attr_by_id' (string expected, got nil)"]
