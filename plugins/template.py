"""The `template` Lua module: mustache rendering (gopher-lua-libs `template` API).

`template.choose("mustache")` returns the one shared engine; `engine:render(tmpl, values)` and
`engine:render_file(path, values)` return the text or `nil, err`. The renderer is written here
(interpolation, sections, inverted sections, comments, partials, set-delimiter, standalone lines).

Values follow the original's conversion: every number is a float64 printed like Go's
`fmt.Sprint` (1000000 -> "1e+06"), a table with t[1] set is a list of t[1..n] (hash keys
dropped), other tables are maps keyed by tostring(key). Deliberate difference: a nested empty
table is an empty list (falsy in a section) where Go would see an empty map (truthy).

Bounds: converting the values, parsing and rendering look at the call's clock as they go (a call
on the event loop moves to a worker past its inline budget, any call stops at its deadline with a Lua
error); rendering fails with `nil, err` once the text outgrows what the script's memory cap leaves.
`{{> name}}` partials are read only from the script's directory and the library directory (each once
per rendering); render_file's relative path is the call's working directory's.
"""

from __future__ import annotations

import os
import re
from decimal import Decimal

from msgscript import ArgError, check_string, error_text, is_table, lua_tostring, lua_type, open_file, pure
from msgscript import table_keys, ticker



MAX_DEPTH = 100  # nesting of values and of partials
PARTIAL_EXTENSIONS = ("", ".mustache", ".stache")

_ESCAPES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", "'": "&#39;", '"': "&#34;", "\0": "\ufffd"}
_ESCAPE_RE = re.compile("[&<>'\"\0]")
_STANDALONE_KINDS = "#^/!>="
_BLANK_TO_EOL = re.compile(r"[^\S\n]*(?:\n|\Z)")  # the rest of a line, if it is only white space
_TOO_LARGE = "rendered text larger than the script's memory limit allows"


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
    """The count of consecutive values from t[1], read raw (an __index cannot make it endless)."""
    keys = {k for k in (table if isinstance(table, dict) else dict(table.items())) if type(k) is int}
    n = 0
    while n + 1 in keys:
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


def to_value(value, depth: int = 0, done: dict | None = None, tick=lambda n=1: None):
    """A Lua value as the renderer sees it: str, float, bool, None, list or dict.

    A table reachable twice is converted once (`done`, keyed by its address), so a table
    shared many times over stays one Python object instead of growing exponentially.
    """
    if depth > MAX_DEPTH:
        raise TemplateError("values nested too deeply")
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if not is_table(value):
        return None  # functions, userdata, threads render as nothing
    done = {} if done is None else done
    key = repr(value)  # the table's address
    if key not in done:
        items = {k: value[k] for k in table_keys(value, tick)}
        n = _border(items)
        if n:
            done[key] = [to_value(items[i], depth + 1, done, tick) for i in range(1, n + 1)]
        else:
            done[key] = {_key_text(k): to_value(v, depth + 1, done, tick) for k, v in items.items()} or []
    return done[key]


def top_values(values, n: int = 2, tick=lambda n=1: None):
    """The top-level `values` argument (argument `n`): a map, or the original's error for an array."""
    if not is_table(values):
        raise ArgError(n, f"table expected, got {lua_type(values)}")
    items = {k: values[k] for k in table_keys(values, tick)}
    if _border(items):
        raise TemplateError("arguments #1 must be a table, but got an array")
    done: dict = {}
    return {_key_text(k): to_value(v, 1, done, tick) for k, v in items.items()}


def as_text(value, limit: int = 2**62, done: dict | None = None, tick=lambda n=1: None) -> str:
    """A value as Go's fmt.Sprint prints it ([a b], map[k:v]); TemplateError past `limit` characters.

    The text of a list or map met again (a shared table) is reused from `done`.
    """
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return go_float(value)
    if isinstance(value, str):
        return value
    done = {} if done is None else done
    if id(value) not in done:
        if isinstance(value, list):
            head, pieces = "[", (as_text(v, limit, done, tick) for v in value)
        else:
            head, pieces = "map[", (f"{k}:{as_text(value[k], limit, done, tick)}" for k in sorted(value))
        parts, size = [], len(head) + 1
        for piece in pieces:
            tick()
            size += len(piece) + 1
            if size > limit:
                raise TemplateError(_TOO_LARGE)
            parts.append(piece)
        done[id(value)] = head + " ".join(parts) + "]"
    return done[id(value)]


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
        newline = text.rfind("\n", pos, start)  # looked for in `before` only: the parse stays linear
        if newline < 0 and pos > 0 and text[pos - 1] != "\n":
            return before, end, ""  # another tag shares the line
        line_start = newline + 1 if newline >= 0 else pos
        head = text[line_start:start]
        rest = _BLANK_TO_EOL.match(text, end)
        if head.strip() or rest is None:  # text shares the line
            return before, end, ""
        return before[: len(before) - len(head)], rest.end(), head

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


def partial_path(name: str, dirs: list[str]) -> str | None:
    """The file of partial `name`: name, name.mustache or name.stache in one of `dirs`.

    Only names inside those directories count: an absolute name, a `..` step or a symlink that
    leads out of the directory finds nothing.
    """
    if not name or os.path.isabs(name) or ".." in name.split("/"):
        return None
    for directory in dirs:
        root = os.path.realpath(directory)
        for ext in PARTIAL_EXTENSIONS:
            path = os.path.realpath(os.path.join(root, name + ext))
            if path.startswith(root.rstrip(os.sep) + os.sep) and os.path.isfile(path):
                return path
    return None


def read_text(path: str, limit: int) -> str:
    """A template file's text; TemplateError if it is larger than `limit` bytes; OSError for what cannot be
    opened (FIFOs, sockets and devices are refused: a read from them could wait for ever)."""
    with os.fdopen(open_file(path), "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise TemplateError(f"{path}: {_TOO_LARGE}")
    return data.decode("utf-8", "surrogateescape")


class Renderer:
    """Renders parsed nodes into `out`, within an output size; `check` (ctx.check) looks at the call's clock."""

    def __init__(self, limit: int = 2**62, partial_dirs: list[str] = (), check=None):
        self.left, self.partial_dirs = limit, list(partial_dirs)
        self.tick = ticker(check, 256) if check is not None else (lambda n=1: None)
        self.partials: dict[str, list | None] = {}  # each partial is read and parsed once
        self.out: list[str] = []

    def emit(self, text: str) -> None:
        self.left -= len(text)
        if self.left < 0:
            raise TemplateError(_TOO_LARGE)
        self.out.append(text)

    def nodes(self, nodes: list, stack: list, depth: int = 0) -> None:
        for node in nodes:
            self.tick()
            if isinstance(node, str):
                self.emit(node)
            elif node[0] == "var":
                text = as_text(lookup(node[1], stack), self.left, tick=self.tick)
                self.emit(html_escape(text) if node[2] else text)
            elif node[0] == "section":
                self.section(node, stack, depth)
            else:
                self.partial(node, stack, depth)

    def section(self, node: tuple, stack: list, depth: int) -> None:
        _, name, inverted, children = node
        value = lookup(name, stack)
        if inverted:
            if falsy(value):
                self.nodes(children, stack, depth)
        elif not falsy(value):
            for item in value if isinstance(value, list) else [value]:
                self.tick()
                self.nodes(children, stack + [item], depth)

    def partial(self, node: tuple, stack: list, depth: int) -> None:
        if depth >= MAX_DEPTH:
            raise TemplateError(f"partials nested more than {MAX_DEPTH} deep (recursive partial {node[1]!r}?)")
        key = f"{node[2]}\0{node[1]}"
        if key not in self.partials:
            path = partial_path(node[1], self.partial_dirs)
            if path is None:
                self.partials[key] = None  # a missing partial renders as nothing
            else:
                text, indent = read_text(path, max(self.left, 0)), node[2]
                if indent:
                    text = re.sub(r"^(?=.)", lambda _: indent, text, flags=re.M)
                self.partials[key] = parse(text)
        if self.partials[key] is not None:
            self.nodes(self.partials[key], stack, depth + 1)


def render(text: str, values: dict, renderer: Renderer | None = None) -> str:
    """Render mustache `text` with the converted `values`."""
    renderer = renderer or Renderer()
    renderer.nodes(parse(text), [values])
    return "".join(renderer.out)


# The Lua module ###############################################################


def _loader(ctx):
    def renderer() -> Renderer:
        dirs = [ctx.script.base_dir] + ([ctx.services.library_dir] if ctx.services.library_dir else [])
        return Renderer(ctx.max_bytes(), dirs, ctx.check)

    def finish(text: str) -> bytes:
        return text.encode("utf-8", "surrogateescape")  # bytes: the size check sees the real length

    @pure
    def render_(_engine, text=None, values=None):
        """engine:render(text, values) -> string | nil, err"""
        text = check_string(text, 1)
        ctx.move_to_worker(len(text))
        r = renderer()
        try:
            return finish(render(text, top_values(values, tick=r.tick), r))
        except (TemplateError, RecursionError) as e:
            return None, _error(e)

    def render_file(_engine, path=None, values=None):
        """engine:render_file(path, values) -> string | nil, err"""
        path = check_string(path, 1)
        r = renderer()
        try:
            data = top_values(values, tick=r.tick)
            return finish(render(read_text(ctx.path(path), r.left), data, r))
        except OSError as e:
            return None, error_text(e)
        except (TemplateError, RecursionError) as e:
            return None, _error(e)

    engine = ctx.execute_file("template.lua", ctx.module({"render": render_, "render_file": render_file}))

    @pure
    def choose(name=None):
        """The engine called `name` (only "mustache"), or nil, err."""
        if name == "mustache":
            return engine()
        return None, f"unknown template engine: {lua_tostring(name)}"

    return {"choose": choose}


def _error(exc: Exception) -> str:
    return "template nested too deeply" if isinstance(exc, RecursionError) else str(exc)


def lua_modules() -> dict:
    """Register `template`."""
    return {"template": _loader}
