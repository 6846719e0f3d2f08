"""`ioutil`: read_file/write_file/copy/copyn as gopher-lua-libs v0.5.0 exposes them.

Relative paths are the call's working directory's; FIFOs, sockets and devices are refused (a read
from them could wait for ever); read_file reads at most what the script's memory cap leaves.
"""

import os

from msgscript import check_string, open_file


def os_error(op, path, exc):
    """An OSError worded like Go's *PathError: "open /x: no such file or directory"."""
    reason = exc.strerror or str(exc)
    return f"{op} {path}: {reason[:1].lower()}{reason[1:]}"


def _load(ctx):
    def read_file(path=None):
        """The whole file as a string, or nil, err (also for a file larger than the memory cap allows)."""
        path = check_string(path, 1)
        limit = ctx.max_bytes()
        try:
            return ctx.read_file(path, limit)
        except IsADirectoryError as e:
            return None, os_error("read", path, e)
        except OSError as e:
            return None, os_error("open", path, e)
        except ValueError:
            return None, f"read {path}: file larger than the script's memory limit allows ({limit} bytes)"

    def write_file(path=None, data=None):
        """Write (truncating, mode 0644); nothing on success, err on failure."""
        path, data = check_string(path, 1), check_string(data, 2).encode("utf-8", "surrogateescape")
        try:
            fd = open_file(ctx.path(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except OSError as e:
            return os_error("open", path, e)
        return None

    return ctx.execute_file("ioutil.lua", ctx.module({"read_file": read_file, "write_file": write_file}))


def lua_modules():
    """Modules this plugin provides."""
    return {"ioutil": _load}
