"""`strings`: Go's strings package as gopher-lua-libs v0.5.0 exposes it, plus Reader and Builder."""

import re

from msgscript import check_string, opt_string, pure

from msgscript import INLINE_SIZE


# Go's unicode.IsSpace set (Python's str.isspace also counts \x1c-\x1f, Go does not).
_GO_SPACE = "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
    "\u2028\u2029\u202f\u205f\u3000"
_FIELDS = re.compile("[" + re.escape(_GO_SPACE) + "]+")

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
    return check_string(s, 1).strip(check_string(cutset, 2))


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
    def big(s) -> None:
        if isinstance(s, str) and len(s) > INLINE_SIZE:
            ctx.move_to_worker()

    @pure
    def split_(s=None, sep=None):
        big(s)
        return split(s, sep)

    @pure
    def fields_(s=None):
        big(s)
        return fields(s)

    members = {
        "split": split_, "fields": fields_, "has_prefix": has_prefix, "has_suffix": has_suffix,
        "contains": contains, "trim": trim, "trim_space": trim_space, "trim_prefix": trim_prefix,
        "trim_suffix": trim_suffix,
    }
    return ctx.execute_file("strings.lua", ctx.module(members))


def lua_modules():
    """Modules this plugin provides."""
    return {"strings": _load}
