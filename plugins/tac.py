"""`tac` (gopher-lua-libs v0.5.0): read a file's lines from the last one up.

    local scanner, err = require("tac").open("/var/log/app.log")
    local line = scanner:line()   -- the last line, then the one before it, ...; nil at the start
    scanner:close()

The file is read backwards in 4 KiB blocks, so a big file costs no more than its last lines.
Lines lose their "\\n" and a trailing "\\r". As in the original, lines are limited to 8 KiB: a
longer line ends the scan (`line()` gives nil from there on). A relative path is the call's working
directory's; FIFOs, sockets and devices are refused.
"""

from __future__ import annotations

import errno
import os
import stat

from msgscript import check_string, error_text, open_file

BLOCK = 4096
MAX_LINE = 8 * 1024


class TacReader:
    """Complete lines of a file, last first, found by reading blocks from its end."""

    def __init__(self, path: str):
        fd = open_file(path)
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            os.close(fd)
            raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        self.file = os.fdopen(fd, "rb")  # closed by close(), or when the reader goes away
        self.offset = self.file.seek(0, 2)  # the file position where `partial` starts
        self.partial = b""  # the start of the file's text not yet split into lines
        self.ready: list[bytes] = []  # complete lines in file order; line() takes the last
        self.at_end = True  # the next block read is the file's last one
        self.stopped = False  # a line was too long: the scan is over

    def line(self) -> bytes | None:
        while not self.ready:
            if self.file is None or self.stopped or (self.offset == 0 and not self.partial):
                return None
            self._fill()
        return self.ready.pop()

    def _fill(self) -> None:
        size = min(BLOCK, self.offset)
        self.offset -= size
        self.file.seek(self.offset)
        data = self.file.read(size) + self.partial
        parts = data.split(b"\n")
        if self.at_end and len(parts) > 1 and parts[-1] == b"":
            parts.pop()  # the newline that ends the last line starts no line of its own
        self.at_end = False
        self.partial = parts.pop(0) if self.offset > 0 else b""
        long = [i for i, line in enumerate(parts) if len(line) > MAX_LINE]
        if long or len(self.partial) > MAX_LINE:
            self.stopped = True
            parts = parts[long[-1] + 1:] if long else parts
        self.ready = [line[:-1] if line.endswith(b"\r") else line for line in parts]

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _load(ctx):
    def open_(path=None):
        """tac.open(path) -> scanner | nil, err"""
        path = check_string(path, 1)
        try:
            reader = TacReader(ctx.path(path))
        except OSError as e:
            return None, f"open {error_text(e)}"
        return ctx.module({"line": lambda _self=None: reader.line(), "close": lambda _self=None: reader.close()})

    return {"open": open_}


def lua_modules():
    """Modules this plugin provides."""
    return {"tac": _load}
