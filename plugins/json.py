"""`json` (layeh/gopher-json): encode and decode with the Go original's rules.

Deliberate differences from the original (scripts that work there keep working):
- decode keeps null array elements as nil holes at their positions instead of dropping them
  and renumbering; encode writes such holes back as null. (Lua 5.1's `#` does not see past a
  hole reliably: `table.maxn(t)` gives the last element.)
- encode fails only on real cycles; a table shared by two branches is encoded twice (its text is
  made once and its size counted at each place, so sharing cannot blow the output up unseen).
  Arrays are accepted whatever order `next` yields keys 1..n in.

Bounds: decode refuses, before parsing, a text whose Python objects (estimated from a scan of its
brackets, colons, commas and quotes) would not fit in what the script's memory cap leaves, and parses
a text over JSON_C_SIZE in short steps that look at the call's clock; encode refuses an output larger
than the cap, and writes one over JSON_C_SIZE in short steps too.
"""

from __future__ import annotations

import codecs
import json
import json.decoder
import json.scanner
import math
import re
import secrets

from msgscript import ArgError, LuaError, check_string, is_table, lua_type, pure

from msgscript import INLINE_SIZE, OutputBudget
from msgscript import table_keys, ticker

JSON_C_SIZE = 512 * 2**10  # text json.loads/json.dumps handle in one C call (at most ~20 ms holding the GIL)
SMALL_TEXT = 4096  # a text this short is decoded without looking at the clock (well under a millisecond)
CHECK_SIZE = 8192  # bytes of output between two looks at the clock while encoding
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


BIG_STRING = 2**16  # a string this long is decoded once however often a table holds it


def text_cost(text: str | bytes) -> int:
    """Bytes a string of this text takes in Python (1, 2 or 4 a character)."""
    if isinstance(text, bytes) or text.isascii():
        return len(text) + 64
    return 4 * len(text) + 64


def json_cost(text: str | bytes) -> int:
    """About how many bytes of Python objects json.loads makes of `text`, from a scan that allocates nothing.

    Measured on CPython 3.11: a container is 56-64 bytes, a number 24 plus its list slot, a string about
    50 plus its text, a member of an object about 60; so `[[],[],...]` makes 21 times its text and
    `[{},{},...]` 24 times. Each count errs on the large side.
    """
    marks = (b"{", b"[", b":", b",", b'"') if isinstance(text, bytes) else ("{", "[", ":", ",", '"')
    counts = [0] * 5
    for start in range(0, len(text), SCAN_STEP):  # in steps: one count over megabytes holds the interpreter lock
        for i, mark in enumerate(marks):
            counts[i] += text.count(mark, start, start + SCAN_STEP)
    brackets, colons, commas, quotes = counts[0] + counts[1], counts[2], counts[3], counts[4]
    return text_cost(text) + 64 * brackets + 64 * colons + 32 * commas + 25 * quotes


SCAN_STEP = 2**18


class _Encoder(OutputBudget):
    """Lua value -> plain Python value, with the original's table rules.

    `grow` counts about how long the JSON text gets: past `limit` the encoding stops with a
    LuaError, and past INLINE_SIZE `on_big()` is called once (a call on the event loop moves);
    `tick` looks at the call's clock as the walk goes. A table met again (shared, not a cycle) gives
    the value made the first time, and its size is counted again without walking it again.
    """

    what = "encoded JSON"

    def __init__(self, holey_len, limit: int = 2**62, on_big=None, check=None):
        super().__init__(limit, on_big)
        self.holey_len = holey_len
        self.check = check
        self.mark = min(limit, CHECK_SIZE)  # when grow looks at the limits and the clock next
        self.active: set[str] = set()
        self.done: dict[str, tuple] = {}  # table address -> (value made, its size)
        self.strings: dict[bytes, str] = {}  # big strings decoded so far
        self.floats: list[str] = []
        self.marker = f"\0{secrets.token_hex(8)}:"  # for floats json.dumps would print otherwise

    def grow(self, n: int) -> None:
        self.size += n
        if self.size > self.mark:  # every value adds at least 2: a look every CHECK_SIZE is often enough
            self.passed()

    def passed(self) -> None:
        """The size passed the next mark: the limit, the inline size, the next look at the clock."""
        if self.on_big is not None and self.size > INLINE_SIZE:
            on_big, self.on_big = self.on_big, None
            on_big()
        if self.size > self.limit:
            raise LuaError(f"{self.what} of more than {self.limit} bytes does not fit in the script's memory limit")
        if self.check is not None:
            self.check()
        self.mark = min(self.limit, self.size + CHECK_SIZE, INLINE_SIZE if self.on_big else 2**62)

    def plain(self, v):
        t = type(v)
        if t is bytes:
            self.grow(len(v) + 2)
            if len(v) < BIG_STRING:
                return v.decode("utf-8", "replace")
            # one Lua string met many times (lupa hands over a copy each time): decoded once, kept once
            text = self.strings.get(v)
            if text is None:
                text = self.strings[v] = v.decode("utf-8", "replace")
            return text
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
        if ident in self.done:
            value, size = self.done[ident]
            self.grow(size)
            return value
        self.active.add(ident)
        before = self.size
        try:
            value = self.members(t)
        finally:
            self.active.discard(ident)
        self.done[ident] = value, self.size - before
        return value

    def members(self, t):
        keys = table_keys(t, self.tick)  # the values are read one at a time below
        if not keys:
            return []
        if type(keys[0]) is bytes:
            return self.object(t, keys)
        if type(keys[0]) in (int, float):
            return self.array(t, keys)
        raise ValueError("cannot encode mixed or invalid key types")

    def tick(self, n: int = 1) -> None:
        self.grow(n)  # counts toward the next look at the clock (a key costs a few bytes anyway)

    def object(self, t, keys) -> dict:
        if any(type(k) is not bytes for k in keys):
            raise ValueError("cannot encode mixed or invalid key types")
        out = {}
        for k in keys:
            self.grow(len(k) + 4)
            out[k.decode("utf-8", "replace")] = self.plain(t[k])
        return out

    def array(self, t, keys) -> list:
        n = len(keys)
        if any(type(k) not in (int, float) for k in keys):
            raise ValueError("cannot encode mixed or invalid key types")
        if any(type(k) is not int or not 0 < k <= n for k in keys):
            n = self.holey_len(t) or 0
            if any(type(k) is not int or not 0 < k <= n for k in keys):
                raise ValueError("cannot encode sparse array")
        self.grow(n)
        out = [None] * n
        for k in keys:
            out[k - 1] = self.plain(t[k])
        return out

    def text(self, value) -> str:
        """The JSON text of the value made: one C call when it is short, short steps otherwise."""
        if self.size <= JSON_C_SIZE or self.check is None:
            return self.finish(json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True))
        encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True)
        tick = ticker(self.check)
        parts = []
        for chunk in encoder.iterencode(value):  # the Python encoder: a chunk per value
            parts.append(self.finish(chunk))
            tick()
        return "".join(parts)

    def finish(self, text: str) -> str:
        """Go's float texts in place of their markers, and Go's HTML escapes."""
        if self.floats:
            marker = re.escape(json.dumps(self.marker)[:-1])
            text = re.sub(marker + r'(\d+)\\u0000"', lambda m: self.floats[int(m.group(1))], text)
        return _HTML_RE.sub(lambda m: _HTML_ESCAPES[m.group()], text)


def lua_to_json(value, holey_len=lambda t: None, limit: int = 2**62, on_big=None, check=None) -> str:
    """A Lua value as JSON text by gopher-json's rules; ValueError if it cannot be encoded.

    Text longer than about `limit` bytes is a LuaError; `on_big()` is called once the text
    passes INLINE_SIZE, and `check()` (ctx.check) as the work goes (see _Encoder).
    """
    enc = _Encoder(holey_len, limit, on_big, check)
    try:
        value = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace") if isinstance(value, str) \
            else enc.plain(value)
    except RecursionError:
        raise ValueError("cannot encode tables nested this deeply to JSON") from None
    return enc.text(value)


def _replace_with_fffd(error: UnicodeEncodeError):
    return b"\xef\xbf\xbd" * (error.end - error.start), error.end  # bytes: the encoder takes no non-ASCII str


codecs.register_error("msgscript-json-fffd", _replace_with_fffd)


def _lua_text(s: str) -> bytes:
    """A decoded string as UTF-8; lone surrogates (from \\ud800 escapes or invalid input bytes) become U+FFFD."""
    return s.encode("utf-8", "msgscript-json-fffd")


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


class _SteppedDecoder(json.JSONDecoder):
    """json.loads in short steps: containers and numbers are read in Python (strings still in one C call
    each), calling `tick` for each value, so that a long document holds the interpreter lock only briefly
    and stops at the call's deadline."""

    def __init__(self, tick):
        super().__init__(parse_constant=_reject_constant, parse_float=self._counted(_go_number, tick),
                         parse_int=self._counted(_go_number, tick))
        self.parse_object = self._counted(json.decoder.JSONObject, tick)
        self.parse_array = self._counted(json.decoder.JSONArray, tick)
        self.parse_string = self._counted(json.decoder.scanstring, tick)
        self.scan_once = json.scanner.py_make_scanner(self)

    @staticmethod
    def _counted(func, tick):
        def step(*args):
            tick()
            return func(*args)

        return step


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_go_number, parse_int=_go_number)


def parse(text: str, tick=None):
    """json.loads with Go's number and error rules; ValueError with a Go-like message.

    With `tick` (msgscript.ticker), a text over JSON_C_SIZE is parsed in short steps.
    """
    try:
        if tick is None or len(text) <= JSON_C_SIZE:
            return _DECODER.decode(text)
        return _SteppedDecoder(tick).decode(text)
    except json.JSONDecodeError as e:
        if e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string"):
            raise ValueError("unexpected end of JSON input") from None
        where = _SYNTAX.get(e.msg, "")
        raise ValueError(f"invalid character '{text[e.pos]}' {where}".rstrip()) from None
    except RecursionError:
        raise ValueError("json: document nested too deeply") from None


def json_to_lua(ctx, value, holey=None, keep_nulls: bool = True, tick=None):
    """A decoded JSON value (from `parse`) as a Lua value, checked against the script's memory cap first.

    Null array elements stay as holes (marked with `holey(table, n)` when given) or, without
    `keep_nulls`, are dropped and the rest renumbered, as gopher-json does.
    """
    lua = _ForLua(ctx, holey, keep_nulls, tick)
    try:
        plain = lua.value(value)
    except RecursionError:
        raise ValueError("json: document nested too deeply") from None
    ctx.fits(lua.size, "decoded JSON")
    return ctx.to_lua(plain)


class _ForLua:
    """A value from json.loads made ready for ctx.to_lua: strings as UTF-8 bytes, nulls dropped from
    objects, arrays with holes made into Lua tables (and marked) at once; `size` is what the Lua tables
    will take, counted on the generous side."""

    def __init__(self, ctx, holey, keep_nulls, tick):
        self.ctx, self.holey, self.keep_nulls, self.tick = ctx, holey, keep_nulls, tick
        self.size = 0

    def value(self, v):
        t = type(v)
        if t is str:
            b = _lua_text(v)
            self.size += len(b) + 32
            return b
        if t is dict:
            if self.tick is not None:
                self.tick(len(v))
            self.size += 64 + 72 * len(v)
            return {self.value(k): self.value(x) for k, x in v.items() if x is not None}
        if t is list:
            if self.tick is not None:
                self.tick(len(v))
            self.size += 64 + 24 * len(v)
            if not self.keep_nulls:
                return [self.value(x) for x in v if x is not None]
            items = [self.value(x) for x in v]
            if self.holey is None or None not in v:
                return items
            self.ctx.fits(self.size, "decoded JSON")
            table = self.ctx.table(items)
            self.holey(table, max(i for i, x in enumerate(v, 1) if x is not None) if any(
                x is not None for x in v) else 0)
            return table
        return v


def holes(ctx):
    """(holey, holey_len) of this Lua runtime, shared by the modules that read or write JSON."""
    return ctx.state("json.holes", lambda: ctx.execute_file("json.lua"))


def decode_text(ctx, text: str, holey=None, keep_nulls: bool = True):
    """json.decode's work: the cost checked before the text is parsed, the clock looked at as it goes."""
    if len(text) <= SMALL_TEXT:
        if 65 * len(text) + 64 > ctx.max_bytes():  # json_cost's largest answer for this length
            ctx.fits(json_cost(text), "JSON decoding work")
        if text.isascii() and "null" not in text and "\\u" not in text:
            return ctx.to_lua(parse(text))  # nothing to drop, mark or replace: the quick path
        return json_to_lua(ctx, parse(text), holey, keep_nulls)
    ctx.move_to_worker(len(text))
    ctx.fits(json_cost(text), "JSON decoding work")
    tick = ticker(ctx.check)
    return json_to_lua(ctx, parse(text, tick), holey, keep_nulls, tick)


def _loader(ctx):
    holey, holey_len = holes(ctx)

    @pure
    def encode(*args):
        """json.encode(value) -> text | nil, err"""
        if not args:
            raise ArgError(1, "value expected")
        try:
            return lua_to_json(args[0], holey_len, ctx.max_bytes(), ctx.move_to_worker, ctx.check).encode("utf-8")
        except ValueError as e:
            return None, str(e)

    @pure
    def decode(text=None):
        """json.decode(text) -> value | nil, err"""
        text = check_string(text, 1)
        try:
            return decode_text(ctx, text, holey)
        except ValueError as e:
            return None, str(e)

    return {"encode": encode, "decode": decode}


def lua_modules():
    return {"json": _loader}
