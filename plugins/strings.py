"""`strings`: Go's strings package as gopher-lua-libs v0.5.0 exposes it, plus Reader and Builder.

Bounds: a string longer than INLINE_SIZE is not worked on on the event loop (the call moves to a
worker first); split and fields count their pieces before making them and refuse a result that would
not fit in what the script's memory cap leaves; trim with a long cutset is linear in the string.
"""

import functools
import re

from msgscript import INLINE_SIZE, check_string, opt_string, pure


# Go's unicode.IsSpace set (Python's str.isspace also counts \x1c-\x1f, Go does not).
_GO_SPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
    "\u2028\u2029\u202f\u205f\u3000"
_FIELDS = re.compile("[" + re.escape(_GO_SPACE) + "]+")
_PIECE = 80  # bytes one piece of a split takes besides its text (a Python str, then a Lua string in a table)
SMALL_CUTSET = 64  # trim checks each character against a cutset this short; a longer one is a character class


def _pieces_cost(count: int, s: str) -> int:
    return _PIECE * count + 2 * len(s)


@pure
def split(s=None, sep=None):
    """Go strings.Split: an empty separator splits into characters."""
    s, sep = check_string(s, 1), opt_string(sep, 2, "")
    return list(s) if sep == "" else s.split(sep)


@pure
def fields(s=None):
    """Go strings.Fields: split around runs of white space."""
    return [f for f in _FIELDS.split(check_string(s, 1)) if f]


@pure
def has_prefix(s=None, prefix=None):
    """True if s starts with prefix."""
    return check_string(s, 1).startswith(check_string(prefix, 2))


@pure
def has_suffix(s=None, suffix=None):
    """True if s ends with suffix."""
    return check_string(s, 1).endswith(check_string(suffix, 2))


@pure
def contains(s=None, sub=None):
    """True if sub is within s."""
    return check_string(sub, 2) in check_string(s, 1)


@pure
def trim(s=None, cutset=None):
    """Remove any of the characters in cutset from both ends."""
    s, cutset = check_string(s, 1), check_string(cutset, 2)
    if len(cutset) <= SMALL_CUTSET:
        return s.strip(cutset)
    chars = "".join(sorted(set(cutset)))  # str.strip looks through the cutset for each character
    if len(chars) <= SMALL_CUTSET:
        return s.strip(chars)
    run = re.compile("[" + re.escape(chars) + "]*")
    start = run.match(s).end()
    if start == len(s):
        return ""
    return s[start:len(s) - run.match(s[::-1]).end()]


@pure
def trim_space(s=None):
    """Remove leading and trailing white space."""
    return check_string(s, 1).strip(_GO_SPACE)


@pure
def trim_prefix(s=None, prefix=None):
    """s without the leading prefix, if present."""
    return check_string(s, 1).removeprefix(check_string(prefix, 2))


@pure
def trim_suffix(s=None, suffix=None):
    """s without the trailing suffix, if present."""
    return check_string(s, 1).removesuffix(check_string(suffix, 2))


def _load(ctx):
    def sized(func):
        """`func`, moved off the event loop first when its strings are long."""
        @functools.wraps(func)  # its signature: extra arguments are dropped, as Lua does
        def call(*args):
            size = 0
            for a in args:
                if type(a) is str:
                    size += len(a)
            if size > INLINE_SIZE:
                ctx.move_to_worker()
            return func(*args)

        return pure(call)

    @pure
    def split_(s=None, sep=None):
        s, sep = check_string(s, 1), opt_string(sep, 2, "")
        ctx.move_to_worker(len(s))
        ctx.fits(_pieces_cost(len(s) if sep == "" else s.count(sep) + 1, s), "strings.split's result")
        return split(s, sep)

    @pure
    def fields_(s=None):
        s = check_string(s, 1)
        ctx.move_to_worker(len(s))
        spaces = sum(s.count(c) for c in (_GO_SPACE[:6] if s.isascii() else _GO_SPACE))  # at most this many + 1
        ctx.fits(_pieces_cost(spaces + 1, s), "strings.fields' result")
        return fields(s)

    members = {
        "split": split_, "fields": fields_, "has_prefix": sized(has_prefix), "has_suffix": sized(has_suffix),
        "contains": sized(contains), "trim": sized(trim), "trim_space": sized(trim_space),
        "trim_prefix": sized(trim_prefix), "trim_suffix": sized(trim_suffix),
    }
    return ctx.execute_file("strings.lua", ctx.module(members))


def lua_modules():
    """Modules this plugin provides."""
    return {"strings": _load}
