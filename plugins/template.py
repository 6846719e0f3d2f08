"""The `template` Lua module: mustache rendering (gopher-lua-libs `template` API).

`template.choose("mustache")` returns the one shared engine; `engine:render(tmpl, values)` and
`engine:render_file(path, values)` return the text or `nil, err`. The renderer is written here
(interpolation, sections, inverted sections, comments, partials, set-delimiter, standalone lines).

Values follow the original's conversion: every number is a float64 printed like Go's
`fmt.Sprint` (1000000 -> "1e+06"), a table with t[1] set is a list of t[1..n] (hash keys
dropped), other tables are maps keyed by tostring(key). Deliberate difference: a nested empty
table is an empty list (falsy in a section) where Go would see an empty map (truthy).
"""

from __future__ import annotations

import os
import re
from decimal import Decimal

from lupa import lua54

MAX_DEPTH = 100  # nesting of values and of partials

_ESCAPES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", "'": "&#39;", '"': "&#34;", "\0": "\ufffd"}
_ESCAPE_RE = re.compile("[&<>'\"\0]")
_STANDALONE_KINDS = "#^/!>="


class TemplateError(Exception):
    """A template that cannot be parsed or rendered."""


# Go number formatting and Lua value conversion ###############################


def go_float(x: float) -> str:
    """A float64 as Go's fmt.Sprint prints it (%v, i.e. shortest %g with exponent at 1e+06)."""
    if x != x:
        return "NaN"
    if x in (float("inf"), float("-inf")):
        return "+Inf" if x > 0 else "-Inf"
    if x == 0:
        return "-0" if str(x).startswith("-") else "0"
    sign, digits, exponent = Decimal(repr(float(x))).normalize().as_tuple()
    stripped = "".join(map(str, digits))
    point = len(stripped) + exponent  # the value is 0.<stripped> * 10**point
    exp = point - 1
    out = "-" if sign else ""
    if exp < -4 or exp >= 6:
        mantissa = stripped[0] + ("." + stripped[1:] if len(stripped) > 1 else "")
        return f"{out}{mantissa}e{'-' if exp < 0 else '+'}{abs(exp):02d}"
    if point <= 0:
        return f"{out}0.{'0' * -point}{stripped}"
    if point >= len(stripped):
        return out + stripped + "0" * (point - len(stripped))
    return f"{out}{stripped[:point]}.{stripped[point:]}"


def _border(table) -> int:
    """Lua's MaxN: the count of consecutive non-nil values from t[1]."""
    n = 0
    while table[n + 1] is not None:
        n += 1
    return n


def _key_text(key) -> str:
    if isinstance(key, bytes):
        return key.decode("utf-8", "surrogateescape")
    if isinstance(key, bool):
        return "true" if key else "false"
    if isinstance(key, float):
        return go_float(key)
    return str(key)


def to_value(value, depth: int = 0):
    """A Lua value as the renderer sees it: str, float, bool, None, list or dict."""
    if depth > MAX_DEPTH:
        raise TemplateError("values nested too deeply")
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if lua54.lua_type(value) == "table":
        n = _border(value)
        if n:
            return [to_value(value[i], depth + 1) for i in range(1, n + 1)]
        items = {_key_text(k): to_value(v, depth + 1) for k, v in value.items()}
        return items or []
    return None  # functions, userdata, threads render as nothing


def top_values(values):
    """The top-level `values` argument: a map, or the original's error for an array."""
    if lua54.lua_type(values) != "table":
        raise TypeError(f"bad argument #2 to render (table expected, got {lua_type(values)})")
    if _border(values):
        raise TemplateError("arguments #1 must be a table, but got an array")
    return {_key_text(k): to_value(v, 1) for k, v in values.items()}


def as_text(value) -> str:
    """A value as Go's fmt.Sprint prints it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return go_float(value)
    if isinstance(value, list):
        return "[" + " ".join(as_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "map[" + " ".join(f"{k}:{as_text(value[k])}" for k in sorted(value)) + "]"
    return str(value)


def html_escape(text: str) -> str:
    """Go's template.HTMLEscape."""
    return _ESCAPE_RE.sub(lambda m: _ESCAPES[m.group()], text)


# Parsing ######################################################################


class _Parser:
    """Turns template text into nodes: str, ("var", name, escape), ("section", name, inverted, nodes),
    ("partial", name, indent)."""

    def __init__(self, text: str):
        self.text = text
        self.otag, self.ctag = "{{", "}}"

    def parse(self) -> list:
        text, pos = self.text, 0
        stack: list[tuple[str | None, bool, list]] = [(None, False, [])]
        while True:
            start = text.find(self.otag, pos)
            if start < 0:
                stack[-1][2].append(text[pos:])
                break
            kind, name, end = self._tag(start)
            before = text[pos:start]
            if kind in _STANDALONE_KINDS:
                before, end, indent = self._standalone(pos, start, end, before)
            else:
                indent = ""
            if before:
                stack[-1][2].append(before)
            pos = end
            self._add(stack, kind, name, indent)
        if len(stack) > 1:
            raise TemplateError(f"unclosed section {stack[-1][0]!r}")
        return stack[0][2]

    def _tag(self, start: int) -> tuple[str, str, int]:
        """Kind, name and end position of the tag at `start`."""
        text, i = self.text, start + len(self.otag)
        kind = text[i:i + 1]
        closer = self.ctag
        if kind == "{":
            closer = "}" + self.ctag
        elif kind == "=":
            closer = "=" + self.ctag
        elif kind not in "#^/!>&":
            kind = ""
        stop = text.find(closer, i)
        if stop < 0:
            line = text.count("\n", 0, start) + 1
            raise TemplateError(f"line {line}: unmatched open tag {self.otag!r}")
        name = text[i + len(kind):stop].strip()
        if kind == "=":
            self._set_delimiters(name, start)
        return kind, name, stop + len(closer)

    def _set_delimiters(self, spec: str, start: int) -> None:
        parts = spec.split()
        if len(parts) != 2:
            raise TemplateError(f"invalid set-delimiter tag at offset {start}: {spec!r}")
        self.otag, self.ctag = parts

    def _standalone(self, pos: int, start: int, end: int, before: str) -> tuple[str, int, str]:
        """Drop the line of a tag that stands alone on it; returns (text before, new end, indent)."""
        text = self.text
        line_start = text.rfind("\n", 0, start) + 1
        line_end = text.find("\n", end)
        line_end = len(text) if line_end < 0 else line_end + 1
        head, tail = text[line_start:start], text[end:line_end]
        if line_start < pos or head.strip() or tail.strip():  # another tag or text shares the line
            return before, end, ""
        return before[: len(before) - len(head)], line_end, head

    @staticmethod
    def _add(stack: list, kind: str, name: str, indent: str) -> None:
        nodes = stack[-1][2]
        if kind in ("#", "^"):
            stack.append((name, kind == "^", []))
        elif kind == "/":
            open_name, inverted, children = stack.pop() if len(stack) > 1 else (None, False, [])
            if open_name != name:
                raise TemplateError(f"section {name!r} closed but {open_name!r} is open" if open_name
                                    else f"closing tag {name!r} without an opening tag")
            stack[-1][2].append(("section", name, inverted, children))
        elif kind == ">":
            nodes.append(("partial", name, indent))
        elif kind in ("", "&", "{"):
            nodes.append(("var", name, kind == ""))


def parse(text: str) -> list:
    """Parse mustache text into nodes; raises TemplateError."""
    return _Parser(text).parse()


# Rendering ####################################################################


def lookup(name: str, stack: list):
    """Resolve a (dotted) name against the context stack; None when missing."""
    if name == ".":
        return stack[-1]
    first, *rest = name.split(".")
    value = None
    for context in reversed(stack):
        if isinstance(context, dict) and first in context:
            value = context[first]
            break
    for part in rest:
        value = value.get(part) if isinstance(value, dict) else None
    return value


def falsy(value) -> bool:
    """nil, false, an empty list and a whitespace-only string are false; 0 is true."""
    if value is None or value is False:
        return True
    if isinstance(value, list):
        return not value
    return isinstance(value, str) and not value.strip()


def read_partial(name: str) -> str:
    """A partial's text from the working directory (or $CWD): name, name.mustache, name.stache."""
    dirs = [os.getcwd()] + ([os.environ["CWD"]] if os.environ.get("CWD") else [])
    for directory in dirs:
        for ext in ("", ".mustache", ".stache"):
            path = os.path.join(directory, name + ext)
            if os.path.isfile(path):
                with open(path, encoding="utf-8", errors="surrogateescape") as f:
                    return f.read()
    return ""


def render_nodes(nodes: list, stack: list, out: list, depth: int = 0) -> None:
    """Append the rendering of `nodes` in the context `stack` to `out`."""
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif node[0] == "var":
            text = as_text(lookup(node[1], stack))
            out.append(html_escape(text) if node[2] else text)
        elif node[0] == "section":
            _render_section(node, stack, out, depth)
        else:
            _render_partial(node, stack, out, depth)


def _render_section(node: tuple, stack: list, out: list, depth: int) -> None:
    _, name, inverted, children = node
    value = lookup(name, stack)
    if inverted:
        if falsy(value):
            render_nodes(children, stack, out, depth)
    elif not falsy(value):
        for item in value if isinstance(value, list) else [value]:
            render_nodes(children, stack + [item], out, depth)


def _render_partial(node: tuple, stack: list, out: list, depth: int) -> None:
    if depth >= MAX_DEPTH:
        raise TemplateError(f"partials nested more than {MAX_DEPTH} deep (recursive partial {node[1]!r}?)")
    text, indent = read_partial(node[1]), node[2]
    if indent:
        text = re.sub(r"^(?=.)", lambda _: indent, text, flags=re.M)
    render_nodes(parse(text), stack, out, depth + 1)


def render(text: str, values: dict) -> str:
    """Render mustache `text` with the converted `values`."""
    out: list[str] = []
    render_nodes(parse(text), [values], out)
    return "".join(out)


# The Lua module ###############################################################


def lua_type(value) -> str:
    """The Lua type name of a value as it arrives from Lua."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, (str, bytes)):
        return "string"
    return lua54.lua_type(value) or type(value).__name__


def _string_arg(value, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return go_float(float(value))
    raise TypeError(f"bad argument to {what} (string expected, got {lua_type(value)})")


def _render_lua(_engine, text, values):
    text = _string_arg(text, "render")
    try:
        return render(text, top_values(values))  # a non-table raises TypeError, like the original
    except (TemplateError, RecursionError) as e:
        return None, str(e)


def _render_file_lua(_engine, path, values):
    path = _string_arg(path, "render_file")
    try:
        data = top_values(values)
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
        return render(text, data)
    except (OSError, TemplateError, RecursionError) as e:
        return None, str(e)


def _loader(ctx):
    engine = ctx.module({"render": _render_lua, "render_file": _render_file_lua})

    def choose(name):
        """The engine called `name` (only "mustache"), or nil, err."""
        if name == "mustache":
            return engine
        return None, f"unknown template engine: {ctx.text(name) if name is not None else 'nil'}"

    return {"choose": choose}


def lua_modules() -> dict:
    """Register `template`."""
    return {"template": _loader}
