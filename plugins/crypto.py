"""`crypto`: md5 and sha256 hex digests (all that gopher-lua-libs v0.5.0 has)."""

import hashlib

from msgscript import check_string, pure


INLINE_SIZE = 2**20  # longer strings are not hashed on the event loop


def _load(ctx):
    def digest(name: str):
        @pure
        def hexdigest(s=None):
            """Lowercase hex digest of the string's bytes."""
            data = check_string(s, 1).encode("utf-8", "surrogateescape")
            if len(data) > INLINE_SIZE:
                ctx.move_to_worker()
            return hashlib.new(name, data).hexdigest()

        return hexdigest

    return {"md5": digest("md5"), "sha256": digest("sha256")}


def lua_modules():
    """Modules this plugin provides."""
    return {"crypto": _load}
