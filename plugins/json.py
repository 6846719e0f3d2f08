"""`json` (layeh/gopher-json): encode and decode with the Go original's rules.

Deliberate differences from the original (scripts that work there keep working):
- decode keeps null array elements as nil holes at their positions instead of dropping them
  and renumbering; encode writes such holes back as null. (Lua 5.1's `#` does not see past a
  hole reliably: `table.maxn(t)` gives the last element.)
- encode fails only on real cycles; a table shared by two branches is encoded twice. Arrays
  are accepted whatever order `next` yields keys 1..n in.
"""

from __future__ import annotations

import json
import math
import re
import secrets

from msgscript import ArgError, check_string, is_table, lua_type, pure

from msgscript import INLINE_SIZE, OutputBudget

# The arrays decode made with holes, and their lengths (for encode), in a weak table.
_HOLES = """
local lengths = setmetatable({}, {__mode = "k"})
local function holey(t, n) lengths[t] = n; return t end
local function holey_len(t) return lengths[t] end
return holey, holey_len
"""
_HTML_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_HTML_RE = re.compile("[<>&\u2028\u2029]")


def go_json_float(f: float) -> str:
    """Go encoding/json's float64 text: shortest digits, exponent only when exp < -6 or >= 21."""
    if math.isnan(f) or math.isinf(f):
        raise ValueError(f"json: unsupported value: {'NaN' if math.isnan(f) else '+Inf' if f > 0 else '-Inf'}")
    a = abs(f)
    if a < 2**53 and f.is_integer():
        return str(int(f))
    text = repr(f)
    if a < 1e-6 or a >= 1e21:
        mant, _, exp = text.partition("e")
        e = int(exp)
        return f"{mant}e-{-e}" if e < 0 else f"{mant}e+{e:02d}"
    if "e" in text:
        from decimal import Decimal

        return format(Decimal(text), "f")
    return text[:-2] if text.endswith(".0") else text


class _Encoder(OutputBudget):
    """Lua value -> plain Python value, with the original's table rules.

    `grow` counts about how long the JSON text gets: past `limit` the encoding stops with a
    LuaError, and past INLINE_SIZE `on_big()` is called once (a call on the event loop moves).
    """

    what = "encoded JSON"

    def __init__(self, holey_len, limit: int = 2**62, on_big=None):
        super().__init__(limit, on_big)
        self.holey_len = holey_len
        self.active: set[str] = set()
        self.floats: list[str] = []
        self.marker = f"\0{secrets.token_hex(8)}:"  # for floats json.dumps would print otherwise

    def plain(self, v):
        t = type(v)
        if t is bytes:
            self.grow(len(v) + 2)
            return v.decode("utf-8", "replace")
        if t is float:
            return self.number(v)
        self.grow(8)
        if v is None or t is bool or t is int or t is str:
            return v
        if is_table(v):
            return self.table(v)
        raise ValueError(f"cannot encode {lua_type(v)} to JSON")

    def number(self, f: float):
        text = go_json_float(f)
        self.grow(len(text))
        if text == repr(f):  # json.dumps writes floats with repr
            return f
        if text.lstrip("-").isdigit():
            return int(text)
        self.floats.append(text)  # swapped for the Go text after json.dumps
        return f"{self.marker}{len(self.floats) - 1}\0"

    def table(self, t):
        ident = repr(t)  # the table's address, whatever its __tostring says
        if ident in self.active:
            raise ValueError("cannot encode recursively nested tables to JSON")
        self.active.add(ident)
        try:
            keys = list(t.keys())  # the values are read one at a time below
            if not keys:
                return []
            if type(keys[0]) is bytes:
                return self.object(t, keys)
            if type(keys[0]) in (int, float):
                return self.array(t, keys)
            raise ValueError("cannot encode mixed or invalid key types")
        finally:
            self.active.discard(ident)

    def object(self, t, keys) -> dict:
        if any(type(k) is not bytes for k in keys):
            raise ValueError("cannot encode mixed or invalid key types")
        out = {}
        for k, v in t.items():
            self.grow(len(k) + 4)
            out[k.decode("utf-8", "replace")] = self.plain(v)
        return out

    def array(self, t, keys) -> list:
        n = len(keys)
        if any(type(k) not in (int, float) for k in keys):
            raise ValueError("cannot encode mixed or invalid key types")
        if any(type(k) is not int or not 0 < k <= n for k in keys):
            n = self.holey_len(t) or 0
            if any(type(k) is not int or not 0 < k <= n for k in keys):
                raise ValueError("cannot encode sparse array")
        out = [None] * n
        self.grow(n)
        for k, v in t.items():
            out[k - 1] = self.plain(v)
        return out


def lua_to_json(value, holey_len=lambda t: None, limit: int = 2**62, on_big=None) -> str:
    """A Lua value as JSON text by gopher-json's rules; ValueError if it cannot be encoded.

    Text longer than about `limit` bytes is a LuaError; `on_big()` is called once the text
    passes INLINE_SIZE (see _Encoder).
    """
    enc = _Encoder(holey_len, limit, on_big)
    try:
        value = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace") if isinstance(value, str) \
            else enc.plain(value)
    except RecursionError:
        raise ValueError("cannot encode tables nested this deeply to JSON") from None
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    if enc.floats:
        marker = re.escape(json.dumps(enc.marker)[:-1])
        text = re.sub(marker + r'(\d+)\\u0000"', lambda m: enc.floats[int(m.group(1))], text)
    return _HTML_RE.sub(lambda m: _HTML_ESCAPES[m.group()], text)


def _lua_text(s: str) -> bytes:
    try:
        return s.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from \ud800 escapes or invalid input bytes
        return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in s).encode("utf-8")


def _reject_constant(name: str):
    raise ValueError(f"invalid character '{name[0]}' looking for beginning of value")


def _go_number(text: str) -> float:
    """Every JSON number is a float64 (as in Go and Lua 5.1); one beyond its range is an error."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"json: cannot unmarshal number {text} into Go value of type float64")
    return value


# Python's json messages in encoding/json's words
_SYNTAX = {
    "Expecting value": "looking for beginning of value",
    "Expecting property name enclosed in double quotes": "looking for beginning of object key string",
    "Expecting ':' delimiter": "after object key",
    "Expecting ',' delimiter": "after array element or object key:value pair",
    "Extra data": "after top-level value",
    "Invalid control character at": "in string literal",
    "Invalid \\escape": "in string escape code",
}


def parse(text: str):
    """json.loads with Go's number and error rules; ValueError with a Go-like message."""
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_go_number, parse_int=_go_number)
    except json.JSONDecodeError as e:
        if e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string"):
            raise ValueError("unexpected end of JSON input") from None
        where = _SYNTAX.get(e.msg, "")
        raise ValueError(f"invalid character '{text[e.pos]}' {where}".rstrip()) from None
    except RecursionError:
        raise ValueError("json: document nested too deeply") from None


def json_to_lua(ctx, value, holey=None, keep_nulls: bool = True):
    """A decoded JSON value (from `parse`) as a Lua value, checked against the script's memory cap first.

    Null array elements stay as holes (marked with `holey(table, n)` when given) or, without
    `keep_nulls`, are dropped and the rest renumbered, as gopher-json does.
    """
    ctx.fits(_size(value), "decoded JSON")
    return _Decoder(ctx.lua, holey, keep_nulls).lua(value)


def _text_size(s: str) -> int:
    return len(s) if s.isascii() else len(s.encode("utf-8", "surrogatepass"))


def _size(v) -> int:
    if isinstance(v, str):
        return _text_size(v) + 32
    if isinstance(v, dict):
        return 64 + sum(72 + _text_size(k) + _size(x) for k, x in v.items())
    if isinstance(v, list):
        return 64 + sum(24 + _size(x) for x in v)
    return 0


class _Decoder:
    """Plain Python value (from json.loads) -> Lua value."""

    def __init__(self, lua, holey, keep_nulls):
        self.table_from, self.holey, self.keep_nulls = lua.table_from, holey, keep_nulls

    def lua(self, v):
        t = type(v)
        if t is str:
            return _lua_text(v)
        if t is dict:
            return self.table_from({_lua_text(k): self.lua(x) for k, x in v.items() if x is not None})
        if t is list:
            if not self.keep_nulls:
                return self.table_from([self.lua(x) for x in v if x is not None])
            table = self.table_from([self.lua(x) for x in v])
            if self.holey and None in v:
                last = max((i for i, x in enumerate(v, 1) if x is not None), default=0)
                self.holey(table, last)
            return table
        return v


def holes(ctx):
    """(holey, holey_len) of this Lua runtime, shared by the modules that read or write JSON."""
    return ctx.state("json.holes", lambda: ctx.execute(_HOLES, name="json"))


def _loader(ctx):
    holey, holey_len = holes(ctx)

    @pure
    def encode(*args):
        """json.encode(value) -> text | nil, err"""
        if not args:
            raise ArgError(1, "value expected")
        try:
            return lua_to_json(args[0], holey_len, ctx.max_bytes(), ctx.move_to_worker).encode("utf-8")
        except ValueError as e:
            return None, str(e)

    @pure
    def decode(text=None):
        """json.decode(text) -> value | nil, err"""
        text = check_string(text, 1)
        if len(text) > INLINE_SIZE:
            ctx.move_to_worker()
        if len(text) > ctx.max_bytes():
            return None, "JSON text larger than the script's memory limit allows"
        try:
            return json_to_lua(ctx, parse(text), holey)
        except ValueError as e:
            return None, str(e)

    return {"encode": encode, "decode": decode}


def lua_modules():
    return {"json": _loader}
