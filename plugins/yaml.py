"""`yaml`: decode/encode (and stream decoders/encoders) like gopher-lua-libs v0.5.0, on PyYAML.

Bounds. PyYAML makes 400-500 bytes of Python objects per node of a document, so decode refuses,
before parsing, a text whose nodes (estimated from a scan) would not fit in what the script's memory
cap leaves. It parses with libyaml (PyYAML's C loader) when it is there, and looks at the call's clock
at every node, so a long document stops at the deadline. A decoded document is bounded by the cap
as the tree it becomes: PyYAML shares the object of an anchor among its aliases, so a "billion
laughs" document is small as a graph and huge as Lua tables; it gives `nil, err` before anything
is expanded. encode refuses a table met twice (shared or cyclic, as the original does) and an output
larger than the cap, and writes its text in steps that look at the clock.
"""

import functools
import io
import json
import re

from msgscript import ArgError, check_string, is_table, pure

from msgscript import OutputBudget
from msgscript import table_keys, ticker
from msgscript_plugins.json import text_cost


_INT64 = range(-(2**63), 2**63)


def yaml_cost(text: str) -> int:
    """About how many bytes of Python objects PyYAML makes of `text` (its node graph, then the values).

    A node (a scalar, a sequence or a mapping, with its two marks) costs PyYAML 370-480 bytes; every node
    but the first follows a line break, a ",", a ":", a "[", a "{", a "- " or a "? ", which the scan counts.
    """
    count = text.count
    nodes = 1 + count("\n") + count(",") + count(":") + count("[") + count("{") + count("- ") + count("? ")
    return 2 * text_cost(text) + 500 * nodes


class EncodeError(ValueError):
    """A Lua value YAML cannot represent."""


def _yaml():
    import yaml  # third-party: PyYAML

    return yaml


@functools.cache
def _loaders():
    """(lenient, strict) PyYAML loader classes (libyaml's parser when available): timestamps stay strings, as
    in yaml.v2 decoding into interface{}; every node resolved or constructed calls the loader's `tick`."""
    yaml = _yaml()
    base = getattr(yaml, "CSafeLoader", None) or yaml.SafeLoader

    class Loader(base):
        tick = staticmethod(lambda n=1: None)

        def resolve(self, kind, value, implicit):  # called for each node as the parser composes it
            self.tick()
            return super().resolve(kind, value, implicit)

        def construct_object(self, node, deep=False):
            self.tick()
            return super().construct_object(node, deep)

    Loader.add_constructor("tag:yaml.org,2002:timestamp", lambda loader, node: loader.construct_scalar(node))

    class StrictLoader(Loader):
        def construct_mapping(self, node, deep=False):
            keys = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if key in keys:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key} already set in map", key_node.start_mark)
                keys.add(key)
            return super().construct_mapping(node, deep)

    return Loader, StrictLoader


def documents(text: str, strict: bool = False, tick=None):
    """The documents of `text`, one at a time (PyYAML's load_all, with `tick` called at every node)."""
    loader = _loaders()[1 if strict else 0](text)
    if tick is not None:
        loader.tick = tick
    try:
        while loader.check_data():
            yield loader.get_data()
    except (KeyError, IndexError, TypeError, AttributeError):  # PyYAML's constructors on `!!bool maybe`, `!!int`
        raise DecodeError("yaml: a value does not match its tag") from None
    finally:
        loader.dispose()


@functools.cache
def _dumper():
    yaml = _yaml()

    class Dumper(yaml.SafeDumper):
        tick = staticmethod(lambda n=1: None)

        def ignore_aliases(self, data):
            return True

        def emit(self, event):
            self.tick()
            super().emit(event)

    def text(dumper, value):
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    return Dumper


###############################################################################
# YAML -> Lua #################################################################
###############################################################################

def to_lua_value(value, tick=lambda n=1: None):
    """Decoded YAML -> values ctx.to_lua can take: nulls dropped from sequences, oversized ints as floats."""
    if isinstance(value, dict):
        tick(len(value))
        out = {}
        for k, v in value.items():
            if k is not None and v is not None:
                out[to_lua_value(k, tick)] = to_lua_value(v, tick)
        return out
    if isinstance(value, (list, tuple)):
        tick(len(value))
        return [to_lua_value(v, tick) for v in value if v is not None]
    if isinstance(value, set):
        tick(len(value))
        return {to_lua_value(k, tick): True for k in value if k is not None}
    if isinstance(value, int) and not isinstance(value, bool) and value not in _INT64:
        return float(value)
    return value


class DecodeError(ValueError):
    """A document that cannot be handed to Lua."""


def tree_size(value, limit: int, tick=lambda n=1: None) -> int:
    """About how many bytes `value` takes as Lua values with every alias expanded; DecodeError past `limit`.

    Each shared object is measured once (by id) and counted at every place it appears, so the
    cost is the size of the graph, however large the tree it stands for.
    """
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(v) -> int:
        if isinstance(v, bytes):
            return len(v) + 32
        if isinstance(v, str):
            return (len(v) if v.isascii() else len(v.encode("utf-8", "surrogateescape"))) + 32
        if not isinstance(v, (dict, list, tuple, set)):
            return 0
        key = id(v)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise DecodeError("yaml: anchor value contains itself")
        active.add(key)
        total = 64
        tick(len(v))
        for k, x in (v.items() if isinstance(v, dict) else ((None, x) for x in v)):
            total += 40 + size(k) + size(x)
            if total > limit:
                raise DecodeError(f"yaml: the decoded document is larger than the script's memory limit allows "
                                  f"({limit} bytes)")
        active.discard(key)
        sizes[key] = total
        return total

    return size(value)


def yaml_error(exc) -> str:
    """A PyYAML error on one line, as yaml.v2 words it: "yaml: line 2: did not find expected key"."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if mark is not None and problem:
        return f"yaml: line {mark.line + 1}: {problem}"
    return f"yaml: {str(exc).splitlines()[0] if str(exc) else 'invalid document'}"


def lua_document(document, limit: int, tick=lambda n=1: None):
    """A decoded document as values for Lua, checked against `limit` as an expanded tree first."""
    try:
        tree_size(document, limit, tick)
        return to_lua_value(document, tick)
    except RecursionError:
        raise DecodeError("yaml: document nested too deeply") from None


def decode_text(text, limit: int, strict=False, tick=None):
    """The first YAML document of text (None if there is none)."""
    for document in documents(text, strict, tick):
        return lua_document(document, limit, tick or (lambda n=1: None))
    return None


###############################################################################
# Lua -> YAML #################################################################
###############################################################################

def _natural_less(a, b):
    """yaml.v2's key order for two strings: letters by code point, digit runs by value."""
    for i, (ca, cb) in enumerate(zip(a, b, strict=False)):
        if ca == cb:
            continue
        la, lb = ca.isalpha(), cb.isalpha()
        if la and lb:
            return ca < cb
        if la or lb:
            return lb
        na, ia = _digit_run(a, i)
        nb, ib = _digit_run(b, i)
        if na != nb:
            return na < nb
        if ia != ib:
            return ia < ib
        return ca < cb
    return len(a) < len(b)


def _digit_run(s, i):
    j = i
    while j < len(s) and s[j].isdigit():
        j += 1
    return (int(s[i:j]) if j > i else 0), j


def _key_compare(a, b):
    """Order mapping keys like yaml.v2: bools, then numbers by value, then strings naturally."""
    def rank(k):
        return 0 if isinstance(k, bool) else 1 if isinstance(k, (int, float)) else 2

    ra, rb = rank(a), rank(b)
    if ra != rb:
        return -1 if ra < rb else 1
    if ra < 2:
        return (a > b) - (a < b)
    return -1 if _natural_less(a, b) else 1 if _natural_less(b, a) else 0


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _step(key) -> str:
    """One step of a path to a value, as Lua code would write it: .name, [1], ["a b"]."""
    if isinstance(key, bytes):
        text = key.decode("utf-8", "replace")
        return f".{text}" if _IDENTIFIER.fullmatch(text) else "[" + json.dumps(text, ensure_ascii=False) + "]"
    if isinstance(key, bool) or key is None:
        return f"[{str(key).lower()}]"
    if isinstance(key, (int, float)):
        return f"[{int(key) if float(key).is_integer() else key}]"
    return f"[{_address(key)}]"


def _address(t) -> str:
    """A table as tostring shows it without a __tostring: table: 0x..."""
    return "table: " + repr(t).rpartition(" ")[2].rstrip(">")


def _where(path: list) -> str:
    return "".join(path).lstrip(".") or "the top"


class LuaToYaml(OutputBudget):
    """Convert a Lua value to plain Python for PyYAML, with the original's encoding rules.

    `grow` counts about how long the text gets: past `limit` the encoding stops with a LuaError,
    past INLINE_SIZE `on_big()` is called once, and `tick` looks at the call's clock as the walk goes.
    A table met twice is refused, as the original does ("nested table table: 0x..."), with where.
    """

    what = "encoded YAML"

    def __init__(self, limit: int = 2**62, on_big=None, tick=None):
        super().__init__(limit, on_big)
        self.tick = tick
        self.longest = 0  # characters of the longest string: PyYAML emits one in a single uninterruptible step
        self.seen: dict[str, str] = {}  # address of each table met -> where it was met
        self.active: set[str] = set()  # the tables being converted (a path from the top)
        self.path: list[str] = []

    def grow(self, n: int) -> None:
        super().grow(n)
        if self.tick is not None:
            self.tick()

    def convert(self, value):
        if isinstance(value, (bytes, str)):
            self.grow(len(value))
            self.longest = max(self.longest, len(value))
        else:
            self.grow(8)
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, bytes):
            return value.decode("utf-8", "replace")
        if isinstance(value, int):
            return value
        if isinstance(value, float):
            return int(value) if value.is_integer() and abs(value) < 2**63 else value  # as Go: int64 when whole
        if is_table(value):
            return self.table(value)
        raise EncodeError("cannot encode values with function in them")

    def table(self, t):
        address = repr(t)  # the table's address, whatever its __tostring says
        where = _where(self.path)
        if address in self.seen:
            first = self.seen[address]
            how = f"cycle at {where}" if address in self.active else f"shared: at {first} and at {where}"
            raise EncodeError(f"nested table {_address(t)} ({how})")
        self.seen[address] = where
        self.active.add(address)
        try:
            return self.members(t)
        finally:
            self.active.discard(address)

    def members(self, t):
        items = [(k, t[k]) for k in table_keys(t, self.grow)]
        if [k for k, _ in items] == list(range(1, len(items) + 1)):
            out = []
            for k, v in items:
                self.path.append(f"[{k}]")
                out.append(self.convert(v))
                self.path.pop()
            return out
        pairs = []
        for k, v in items:
            self.path.append(_step(k))
            key = self.convert(k)  # keys go through the same walk, as in the original
            if isinstance(key, (dict, list)):
                raise EncodeError("cannot encode tables as mapping keys")
            pairs.append((key, self.convert(v)))
            self.path.pop()
        pairs.sort(key=functools.cmp_to_key(lambda x, y: _key_compare(x[0], y[0])))
        return dict(pairs)


EMIT_COST = 2e-6  # seconds a character of a string may cost PyYAML's emitter (1.5 us measured for invalid UTF-8)


def encode_value(value, limit: int = 2**62, on_big=None, tick=None, time_left=None):
    """YAML text for a Lua value (one document, no '---'); see LuaToYaml for `limit`, `on_big`, `tick`.
    `time_left()`: the seconds the call has; a string whose emission would take longer is refused first
    (PyYAML emits a scalar in one step: 2 MiB of text kept a worker busy 4 s past its deadline)."""
    try:
        walk = LuaToYaml(limit, on_big, tick)
        data = walk.convert(value)
        if time_left is not None and walk.longest * EMIT_COST > time_left():
            raise EncodeError(f"yaml: a string of {walk.longest} characters takes longer to encode than the call "
                              f"has left")
        out = io.StringIO()
        dumper = _dumper()(out, default_flow_style=False, allow_unicode=True, sort_keys=False)
        if tick is not None:
            dumper.tick = tick
        try:
            dumper.open()
            dumper.represent(data)
            dumper.close()
        finally:
            dumper.dispose()
    except RecursionError:
        raise EncodeError("nested table is too deep") from None
    text = out.getvalue()
    if not isinstance(data, (list, dict)) and text.endswith("\n...\n"):
        text = text[:-4]  # PyYAML closes a bare scalar document with "...", yaml.v2 does not
    return text


class _Stream:
    """A decoder's documents, read lazily from the text its reader gave."""

    def __init__(self):
        self.strict = False
        self.documents = iter(())
        self.tick = None

    def feed(self, text, tick):
        self.tick = tick
        self.documents = documents(text, self.strict, tick)

    def next_document(self, limit: int):
        try:
            return lua_document(next(self.documents), limit, self.tick or (lambda n=1: None)), None
        except StopIteration:
            return None, "EOF"
        except (_yaml().YAMLError, ValueError, RecursionError) as e:
            self.documents = iter(())
            return None, _decode_error(e)


def _decode_error(exc) -> str:
    if isinstance(exc, RecursionError):
        return "yaml: document nested too deeply"
    if isinstance(exc, DecodeError):
        return str(exc)
    if isinstance(exc, ValueError):  # e.g. an integer of more digits than Python converts
        return "yaml: a value cannot be decoded (number too large?)"
    return yaml_error(exc)


def _load(ctx):
    yaml_errors = (_yaml().YAMLError, ValueError, RecursionError)

    def costly(text: str) -> None:
        ctx.move_to_worker(len(text))
        ctx.fits(yaml_cost(text), "YAML decoding work")

    @pure
    def decode(text=None):
        """yaml.decode(text) -> value | nil, err"""
        text = check_string(text, 1)
        costly(text)
        try:
            return decode_text(text, ctx.max_bytes(), tick=ticker(ctx.check))
        except yaml_errors as e:
            return None, _decode_error(e)

    @pure
    def encode(*args):
        """yaml.encode(value) -> text | nil, err"""
        if not args:
            raise ArgError(1, "value expected")
        try:
            return encode_value(args[0], ctx.max_bytes(), ctx.move_to_worker, ticker(ctx.check), ctx.remaining).encode(
                "utf-8", "surrogateescape")
        except EncodeError as e:
            return None, str(e)
        except _yaml().YAMLError as e:
            return None, yaml_error(e)

    def feed(stream, text=None):
        text = check_string(text, 1)
        costly(text)
        stream.feed(text, ticker(ctx.check))

    py = ctx.module({
        "new_stream": pure(lambda: _Stream()), "encode": encode,
        "feed": pure(lambda st, text=None: feed(st, text)),
        "next_document": pure(lambda st: st.next_document(ctx.max_bytes())),
        "set_strict": pure(lambda st, strict=None: setattr(st, "strict", bool(strict))),
    })
    return ctx.execute_file("yaml.lua", ctx.module({"decode": decode, "encode": encode}), py)


def lua_modules():
    """Modules this plugin provides."""
    return {"yaml": _load}
