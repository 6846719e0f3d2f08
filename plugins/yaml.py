"""`yaml`: decode/encode (and stream decoders/encoders) like gopher-lua-libs v0.5.0, on PyYAML."""

import functools
import math

# The decoder and encoder objects read from / write to any Lua object with :read / :write.
_LUA = r"""
local M, py = ...
local state = setmetatable({}, {__mode = "k"})

local function get(self, kind)
  local st = state[self]
  if st == nil or st.kind ~= kind then error("yaml." .. kind .. " expected", 3) end
  return st
end

M.Decoder = {__name = "yaml.Decoder", __index = {
  decode = function(self)
    local st = get(self, "Decoder")
    if not st.loaded then
      local ok, data = pcall(st.reader.read, st.reader, "*a")
      st.loaded = true
      if not ok then return nil, tostring(data) end
      py.feed(st.py, data or "")
    end
    return py.next_document(st.py)
  end,
  set_strict = function(self, strict)
    py.set_strict(get(self, "Decoder").py, strict)
  end,
}}

M.Encoder = {__name = "yaml.Encoder", __index = {
  encode = function(self, value)
    local st = get(self, "Encoder")
    local text, err = py.encode(value)
    if text == nil then return err end
    if st.count > 0 then text = "---\n" .. text end
    local ok, werr = st.writer:write(text)
    if ok == nil and werr ~= nil then return tostring(werr) end
    st.count = st.count + 1
  end,
}}

function M.new_decoder(reader)
  local d = setmetatable({}, M.Decoder)
  state[d] = {kind = "Decoder", reader = reader, py = py.new_stream()}
  return d
end

function M.new_encoder(writer)
  local e = setmetatable({}, M.Encoder)
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
                        None, None, f"key {key!r} already set in map", key_node.start_mark)
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


def decode_text(text, strict=False):
    """The first YAML document of text (None if there is none)."""
    loader = _loaders()[1 if strict else 0]
    for document in _yaml().load_all(text, Loader=loader):
        return to_lua_value(document)
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


class LuaToYaml:
    """Convert a Lua value to plain Python for PyYAML, with the original's encoding rules."""

    def __init__(self, identity):
        self.identity = identity  # Lua function giving a table's address
        self.seen = set()

    def convert(self, value):
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, bytes):
            return value.decode("utf-8", "replace")
        if isinstance(value, int):
            return value
        if isinstance(value, float):
            return int(value) if math.isfinite(value) and value.is_integer() else value
        if type(value).__name__ == "_LuaTable":
            return self.table(value)
        raise EncodeError("cannot encode values with function in them")

    def table(self, t):
        address = self.identity(t)
        if address in self.seen:
            raise EncodeError(f"nested table {address.decode()} is shared or cyclic")
        self.seen.add(address)
        items = list(t.items())
        if [k for k, _ in items] == list(range(1, len(items) + 1)):
            return [self.convert(v) for _, v in items]
        pairs = [(self.convert(k), self.convert(v)) for k, v in items]
        pairs.sort(key=functools.cmp_to_key(lambda x, y: _key_compare(x[0], y[0])))
        return dict(pairs)


def encode_value(value, identity):
    """YAML text for a Lua value (one document, no '---')."""
    data = LuaToYaml(identity).convert(value)
    text = _yaml().dump(data, Dumper=_dumper(), default_flow_style=False, allow_unicode=True, sort_keys=False)
    if not isinstance(data, (list, dict)) and text.endswith("\n...\n"):
        text = text[:-4]  # PyYAML closes a bare scalar document with "...", yaml.v2 does not
    return text


class _Stream:
    """A decoder's documents, read lazily from the text its reader gave."""

    def __init__(self):
        self.strict = False
        self.documents = None

    def feed(self, text):
        loader = _loaders()[1 if self.strict else 0]
        self.documents = _yaml().load_all(text, Loader=loader)

    def next_document(self):
        try:
            return to_lua_value(next(self.documents)), None
        except StopIteration:
            return None, "EOF"
        except _yaml().YAMLError as e:
            self.documents = iter(())
            return None, str(e)


def _load(ctx):
    identity = ctx.lua.execute('return function(t) return string.format("%p", t) end')
    yaml_error = _yaml().YAMLError

    def decode(text=None):
        if not isinstance(text, (str, int, float)) or isinstance(text, bool):
            raise TypeError(f"bad argument #1 to decode (string expected, got {type(text).__name__})")
        try:
            return decode_text(str(text))
        except yaml_error as e:
            return None, str(e)

    def encode(*args):
        if not args:
            raise TypeError("bad argument #1 to encode (value expected)")
        try:
            return encode_value(args[0], identity)
        except (EncodeError, yaml_error) as e:
            return None, str(e)

    py = ctx.module({
        "new_stream": _Stream, "encode": encode,
        "feed": lambda st, text: st.feed(ctx.text(text)),
        "next_document": lambda st: st.next_document(),
        "set_strict": lambda st, strict: setattr(st, "strict", bool(strict)),
    })
    return ctx.lua.execute(_LUA, ctx.module({"decode": decode, "encode": encode}), py)


def lua_modules():
    """Modules this plugin provides."""
    return {"yaml": _load}
