"""`crypto`: md5 and sha256 hex digests (all that gopher-lua-libs v0.5.0 has)."""

import hashlib


def _data(value):
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value).encode()
    raise TypeError(f"bad argument #1 (string expected, got {type(value).__name__})")


def md5(s):
    """Lowercase hex MD5 of the string's bytes."""
    return hashlib.md5(_data(s)).hexdigest()


def sha256(s):
    """Lowercase hex SHA-256 of the string's bytes."""
    return hashlib.sha256(_data(s)).hexdigest()


def lua_modules():
    """Modules this plugin provides."""
    return {"crypto": lambda ctx: {"md5": md5, "sha256": sha256}}
