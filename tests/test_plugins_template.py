"""The `template` plugin: mustache rendering as Lua scripts use it."""

import os
import time

import pytest
from conftest import run_lua

import msgscript


def lua(src, *args, timeout=5):
    """Run `OnMessage(*args)` with the bundled plugins; values as Python (bytes -> str)."""
    return run_lua(src, *args, timeout=timeout, python=True)


def render(tmpl, values_lua="{}"):
    """engine:render(tmpl, <values_lua>) -> (text, err)."""
    src = f"""
    local engine = require("template").choose("mustache")
    function OnMessage(_, tmpl) return engine:render(tmpl, {values_lua}) end
    """
    out = lua(src, b"", tmpl.encode())
    return (out + [None, None])[:2]


def test_variables_are_html_escaped_and_triple_or_ampersand_are_raw():
    values = """{x = "<a href=\\"/\\">Tom & Jerry's</a>"}"""
    assert render("{{x}}", values)[0] == "&lt;a href=&#34;/&#34;&gt;Tom &amp; Jerry&#39;s&lt;/a&gt;"
    assert render("{{{x}}}", values)[0] == "<a href=\"/\">Tom & Jerry's</a>"
    assert render("{{& x}}", values)[0] == "<a href=\"/\">Tom & Jerry's</a>"


def test_readme_examples():
    assert render("Hello {{name}}!", '{name = "world"}') == ["Hello world!", None]
    assert render("{{#data}} {{.}} {{/data}}", '{data = {"one", "two"}}')[0] == " one  two "


def test_numbers_print_like_go_float64():
    values = "{a = 3, b = 0.5, c = 1000000, d = 1234567, e = -2.25, f = 0.00001, g = 123456}"
    text = render("{{a}} {{b}} {{c}} {{d}} {{e}} {{f}} {{g}}", values)[0]
    assert text == "3 0.5 1e+06 1.234567e+06 -2.25 1e-05 123456"


def test_missing_names_render_empty_and_dotted_names_resolve():
    values = '{user = {name = {first = "Ada"}}, title = "Dr"}'
    assert render("[{{nope}}] {{user.name.first}} {{user.nope.first}}", values)[0] == "[] Ada "
    assert render("{{#user}}{{title}} {{name.first}}{{/user}}", values)[0] == "Dr Ada"


def test_sections_falsy_values_and_zero_is_truthy():
    values = '{zero = 0, blank = "  ", empty = {}, no = false, yes = true, word = "hi"}'
    tmpl = "{{#zero}}Z{{/zero}}{{#blank}}B{{/blank}}{{#empty}}E{{/empty}}{{#no}}N{{/no}}{{#nothing}}X{{/nothing}}"
    assert render(tmpl + "{{#yes}}Y{{/yes}}{{#word}}<{{.}}>{{/word}}", values)[0] == "ZY<hi>"


def test_inverted_sections_render_for_falsy_values_only():
    values = '{empty = {}, items = {1}, no = false}'
    tmpl = "{{^empty}}none{{/empty}}{{^items}}x{{/items}}{{^no}}!{{/no}}{{^missing}}?{{/missing}}"
    assert render(tmpl, values)[0] == "none!?"


def test_list_iteration_and_map_context():
    values = '{items = {{name = "pen", price = 1.5}, {name = "ink", price = 12}}, shop = {name = "Corner"}}'
    tmpl = "{{#shop}}{{name}}:{{/shop}}{{#items}} {{name}}={{price}}{{/items}}"
    assert render(tmpl, values)[0] == "Corner: pen=1.5 ink=12"


def test_comments_and_standalone_lines_disappear():
    tmpl = "<ul>\n  {{! a comment }}\n  {{#items}}\n  <li>{{.}}</li>\n  {{/items}}\n</ul>"
    assert render(tmpl, '{items = {"a", "b"}}')[0] == "<ul>\n  <li>a</li>\n  <li>b</li>\n</ul>"


def test_set_delimiter():
    assert render("{{=<% %>=}}<% a %> {{a}} <%={{ }}=%>{{a}}", "{a = 1}")[0] == "1 {{a}} 1"


def run_script(script_dir, src, *args, library_dir=None, memory=64 * 2**20, timeout=5):
    """OnMessage(*args) of a script file in `script_dir`, on a server with `library_dir`."""
    services = msgscript.Services(library_dir=str(library_dir) if library_dir else None)
    msgscript.load_plugins([], services.modules)
    script = msgscript.Script("t.sub", "t", src, path=str(script_dir / "t.lua"))
    runner = msgscript.LuaRunner(script, src, services, memory)
    _found, *values = runner.call("OnMessage", time.monotonic() + timeout, *args)
    return [runner.ctx.to_python(v) for v in values]


RENDER = """
local engine = require("template").choose("mustache")
function OnMessage(tmpl) return engine:render(tmpl, VALUES) end
"""


def test_partials_come_from_the_script_directory_and_the_library_directory(tmp_path):
    scripts, libs, outside = tmp_path / "scripts", tmp_path / "libs", tmp_path / "outside"
    for d in (scripts, libs, outside):
        d.mkdir()
    (scripts / "item.mustache").write_text("<b>{{name}}</b>")
    (scripts / "plain").write_text("[{{name}}]")
    (libs / "footer.stache").write_text("(c) {{name}}")
    (outside / "secret").write_text("SECRET")
    os.symlink(outside / "secret", scripts / "link")
    src = RENDER.replace("VALUES", '{list = {{name = "a"}, {name = "b"}}, name = "top"}')
    tmpl = "{{#list}}{{> item}}{{/list}} {{>plain}} {{> footer}} ({{> missing}})"
    assert run_script(scripts, src, tmpl.encode(), library_dir=libs) == ["<b>a</b><b>b</b> [top] (c) top ()"]
    # nothing outside those two directories: absolute paths, ../ and symlinks leading out render empty
    for name in (str(outside / "secret"), "../outside/secret", "link", "/etc/passwd"):
        assert run_script(scripts, src, f"<{{{{> {name}}}}}>".encode(), library_dir=libs) == ["<>"], name


def test_rendering_stops_at_the_deadline():
    # nested sections over a list: a trillion steps that write nothing
    src = RENDER.replace("VALUES", "{l = (function() local t = {} for i = 1, 1000 do t[i] = i end return t end)()}")
    start = time.monotonic()
    with pytest.raises(Exception, match="timed out"):
        run_lua(src, b"{{#l}}{{#l}}{{#l}}{{#l}}{{/l}}{{/l}}{{/l}}{{/l}}", timeout=0.5)
    assert time.monotonic() - start < 2


def test_rendered_text_is_bounded_by_the_memory_cap(tmp_path):
    src = RENDER.replace("VALUES", "{l = (function() local t = {} for i = 1, 300 do t[i] = i end return t end)()}")
    start = time.monotonic()
    text, err = run_script(tmp_path, src, b"{{#l}}{{#l}}{{#l}}" + b"0123456789" * 10 + b"{{/l}}{{/l}}{{/l}}",
                           memory=8 * 2**20)
    assert text is None and "memory limit" in err
    assert time.monotonic() - start < 2


def test_shared_tables_are_converted_once_and_printing_them_is_bounded(tmp_path):
    # 2^60 paths through 60 tables: converted as a graph, printed until the size bound stops it
    dag = '(function() local t = {"x"} for i = 1, 60 do t = {t, t} end return t end)()'
    src = RENDER.replace("VALUES", "{dag = " + dag + "}")
    start = time.monotonic()
    text, err = run_script(tmp_path, src, b"{{dag}}", memory=8 * 2**20)
    assert text is None and "memory limit" in err
    assert time.monotonic() - start < 2


def test_render_file(tmp_path):
    page = tmp_path / "page.mustache"
    page.write_text("Hi {{who}}")
    src = """
    local engine = require("template").choose("mustache")
    function OnMessage(_, path)
      local ok = engine:render_file(path, {who = "file"})
      local none, err = engine:render_file(path .. ".missing", {})
      return ok, none, err
    end
    """
    text, none, err = lua(src, b"", str(page).encode())
    assert text == "Hi file"
    assert none is None and "no such file" in err.lower()


def test_top_level_array_is_an_error_value():
    assert render("x", '{1, 2}') == [None, "arguments #1 must be a table, but got an array"]


def test_values_that_are_not_a_table_raise():
    src = """
    local engine = require("template").choose("mustache")
    function OnMessage() local ok, err = pcall(engine.render, engine, "x", 5) return ok, tostring(err) end
    """
    ok, err = lua(src)
    assert ok is False and "table expected" in err


def test_unknown_engine_and_shared_engine():
    src = """
    local template = require("template")
    function OnMessage()
      local none, err = template.choose("jinja")
      return none, err, template.choose("mustache") == template.choose("mustache")
    end
    """
    assert lua(src) == [None, "unknown template engine: jinja", True]


def test_malformed_template_is_an_error_value():
    text, err = render("{{#open}}never closed", "{}")
    assert text is None and "open" in err
