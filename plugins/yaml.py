"""`yaml`: decode/encode (and stream decoders/encoders) like gopher-lua-libs v0.5.0, on PyYAML.

A decoded document is bounded by the script's memory cap as the tree it becomes: PyYAML shares
the object of an anchor among its aliases, so a "billion laughs" document is small as a graph
and huge as Lua tables; it gives `nil, err` before anything is expanded.
"""

import functools

from msgscript import ArgError, check_string, is_table, pure

from msgscript import INLINE_SIZE, PRELUDE, OutputBudget


# The decoder and encoder objects read from / write to any Lua object with :read / :write.
_LUA = PRELUDE + r"""
local M, py = ...
local state = setmetatable({}, {__mode = "k"})

local function get(self, kind, fname)
  local st = state[self]
  if st == nil or st.kind ~= kind then
    error("bad argument #1 to '" .. fname .. "' (yaml." .. kind .. " expected, got " .. type(self) .. ")", 3)
  end
  return st
end

local Decoder, Encoder
Decoder, M.Decoder = class({
  decode = function(self)
    local st = get(self, "Decoder", "decode")
    if not st.loaded then
      local ok, data = pcall(st.reader.read, st.reader, "*a")
      st.loaded = true
      if not ok then return nil, tostring(data) end
      py.feed(st.py, data or "")
    end
    return py.next_document(st.py)
  end,
  set_strict = function(self, strict)
    py.set_strict(get(self, "Decoder", "set_strict").py, strict)
  end,
})

Encoder, M.Encoder = class({
  encode = function(self, value)
    local st = get(self, "Encoder", "encode")
    local text, err = py.encode(value)
    if text == nil then return err end
    if st.count > 0 then text = "---\n" .. text end
    local ok, werr = st.writer:write(text)
    if ok == nil and werr ~= nil then return tostring(werr) end
    st.count = st.count + 1
  end,
})

function M.new_decoder(reader)
  local d = setmetatable({}, Decoder)
  state[d] = {kind = "Decoder", reader = reader, py = py.new_stream()}
  return d
end

function M.new_encoder(writer)
  local e = setmetatable({}, Encoder)
  state[e] = {kind = "Encoder", writer = writer, count = 0}
  return e
end
return M
"""

_INT64 = range(-(2**63), 2**63)


class EncodeError(ValueError):
    """A Lua value YAML cannot represent."""


def _yaml():
    import yaml  # third-party: PyYAML

    return yaml


@functools.cache
def _loaders():
    """(lenient, strict) PyYAML loaders: timestamps stay strings, as in yaml.v2 decoding into interface{}."""
    yaml = _yaml()

    class Loader(yaml.SafeLoader):
        pass

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


@functools.cache
def _dumper():
    yaml = _yaml()

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data):
            return True

    def text(dumper, value):
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    return Dumper


###############################################################################
# YAML -> Lua #################################################################
###############################################################################

def to_lua_value(value):
    """Decoded YAML -> values ctx.to_lua can take: nulls dropped from sequences, oversized ints as floats."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k is not None and v is not None:
                out[to_lua_value(k)] = to_lua_value(v)
        return out
    if isinstance(value, (list, tuple)):
        return [to_lua_value(v) for v in value if v is not None]
    if isinstance(value, set):
        return {to_lua_value(k): True for k in value if k is not None}
    if isinstance(value, int) and not isinstance(value, bool) and value not in _INT64:
        return float(value)
    return value


class DecodeError(ValueError):
    """A document that cannot be handed to Lua."""


def tree_size(value, limit: int) -> int:
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


def lua_document(document, limit: int):
    """A decoded document as values for Lua, checked against `limit` as an expanded tree first."""
    try:
        tree_size(document, limit)
        return to_lua_value(document)
    except RecursionError:
        raise DecodeError("yaml: document nested too deeply") from None


def decode_text(text, limit: int, strict=False):
    """The first YAML document of text (None if there is none)."""
    loader = _loaders()[1 if strict else 0]
    for document in _yaml().load_all(text, Loader=loader):
        return lua_document(document, limit)
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


class LuaToYaml(OutputBudget):
    """Convert a Lua value to plain Python for PyYAML, with the original's encoding rules.

    `grow` counts about how long the text gets: past `limit` the encoding stops with a LuaError,
    and past INLINE_SIZE `on_big()` is called once.
    """

    what = "encoded YAML"

    def __init__(self, limit: int = 2**62, on_big=None):
        super().__init__(limit, on_big)
        self.seen = set()  # addresses of the tables met so far

    def convert(self, value):
        self.grow(len(value) if isinstance(value, (bytes, str)) else 8)
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
        if address in self.seen:
            raise EncodeError("nested table is shared or cyclic")
        self.seen.add(address)
        items = list(t.items())
        if [k for k, _ in items] == list(range(1, len(items) + 1)):
            return [self.convert(v) for _, v in items]
        if any(is_table(k) for k, _ in items):
            raise EncodeError("cannot encode tables as mapping keys")
        pairs = [(self.convert(k), self.convert(v)) for k, v in items]
        pairs.sort(key=functools.cmp_to_key(lambda x, y: _key_compare(x[0], y[0])))
        return dict(pairs)


def encode_value(value, limit: int = 2**62, on_big=None):
    """YAML text for a Lua value (one document, no '---'); see LuaToYaml for `limit` and `on_big`."""
    try:
        data = LuaToYaml(limit, on_big).convert(value)
    except RecursionError:
        raise EncodeError("nested table is too deep") from None
    text = _yaml().dump(data, Dumper=_dumper(), default_flow_style=False, allow_unicode=True, sort_keys=False)
    if not isinstance(data, (list, dict)) and text.endswith("\n...\n"):
        text = text[:-4]  # PyYAML closes a bare scalar document with "...", yaml.v2 does not
    return text


class _Stream:
    """A decoder's documents, read lazily from the text its reader gave."""

    def __init__(self):
        self.strict = False
        self.documents = iter(())

    def feed(self, text):
        loader = _loaders()[1 if self.strict else 0]
        self.documents = _yaml().load_all(text, Loader=loader)

    def next_document(self, limit: int):
        try:
            return lua_document(next(self.documents), limit), None
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

    @pure
    def decode(text=None):
        """yaml.decode(text) -> value | nil, err"""
        text = check_string(text, 1)
        if len(text) > INLINE_SIZE:
            ctx.move_to_worker()
        try:
            return decode_text(text, ctx.max_bytes())
        except yaml_errors as e:
            return None, _decode_error(e)

    @pure
    def encode(*args):
        """yaml.encode(value) -> text | nil, err"""
        if not args:
            raise ArgError(1, "value expected")
        try:
            return encode_value(args[0], ctx.max_bytes(), ctx.move_to_worker).encode(
                "utf-8", "surrogateescape")
        except EncodeError as e:
            return None, str(e)
        except _yaml().YAMLError as e:
            return None, yaml_error(e)

    def feed(stream, text=None):
        text = check_string(text, 1)
        if len(text) > INLINE_SIZE:
            ctx.move_to_worker()
        stream.feed(text)

    py = ctx.module({
        "new_stream": pure(lambda: _Stream()), "encode": encode,
        "feed": pure(lambda st, text=None: feed(st, text)),
        "next_document": pure(lambda st: st.next_document(ctx.max_bytes())),
        "set_strict": pure(lambda st, strict=None: setattr(st, "strict", bool(strict))),
    })
    return ctx.lua.execute(_LUA, ctx.module({"decode": decode, "encode": encode}), py, name="=yaml")


def lua_modules():
    """Modules this plugin provides."""
    return {"yaml": _load}
