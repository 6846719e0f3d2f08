"""`log` and `loglevel`: Go-style loggers as gopher-lua-libs v0.5.0 exposes them.

A file output's relative path is the call's working directory's; FIFOs, sockets and devices other
than /dev/null are refused. A printf width or precision is bounded by what the script's memory cap
leaves.
"""

import datetime
import json
import math
import os
import re
import sys
import threading

from msgscript import ArgError, LuaError, check_string, check_table, error_text, lua_type, open_file
from msgscript import ticker

from msgscript_plugins.template import go_float

_FLAGS = ("date", "time", "microseconds", "utc", "longfile")
_VERB = re.compile(r"%([-+# 0]*)(\d+|\*)?(?:\.(\d*|\*))?(.)", re.S)


###############################################################################
# Go's fmt over Lua values ####################################################
###############################################################################

def go_number(value):
    """A Lua number as gopher-lua prints it: whole numbers without a fraction."""
    if isinstance(value, int):
        return str(value)
    if value.is_integer() and -(2**63) <= value < 2**63:
        return str(int(value))
    return go_float(value)


class GoFormatter:
    """Go's fmt.Sprint / Sprintln / Sprintf over Lua values (as lupa hands them to Python)."""

    def __init__(self, tostring, limit=lambda: 2**62, tick=lambda n=1: None):
        self.tostring = tostring  # Lua's tostring, for tables, functions...
        self.limit = limit  # how many bytes a width or a precision may ask for
        self.tick = tick  # called for each verb (a look at the call's clock now and then)

    def text(self, value):
        if isinstance(value, str):
            return value
        if isinstance(value, bool):
            return "true" if value else "false"
        if value is None:
            return "nil"
        if isinstance(value, (int, float)):
            return go_number(value)
        out = self.tostring(value)
        return out.decode("utf-8", "surrogateescape") if isinstance(out, bytes) else str(out)

    def sprint(self, args):
        """Go's Sprint: a space between operands when neither is a string."""
        out = []
        for i, arg in enumerate(args):
            if i and not isinstance(arg, str) and not isinstance(args[i - 1], str):
                out.append(" ")
            out.append(self.text(arg))
        return "".join(out)

    def sprintln(self, args):
        return " ".join(self.text(a) for a in args) + "\n"

    def sprintf(self, fmt, args):
        out, pos, used = [], 0, 0
        for m in _VERB.finditer(fmt):
            self.tick()
            out.append(fmt[pos:m.start()])
            pos = m.end()
            flags, width, prec, verb = m.groups()
            if verb == "%":
                out.append("%")
                continue
            if width == "*" or prec == "*":
                star = args[used] if used < len(args) else 0
                used += 1
                star = int(star) if isinstance(star, (int, float)) and math.isfinite(star) else 0
                width, prec = (str(star), prec) if width == "*" else (width, str(star))
            if max(len(width or ""), len(prec or "")) > 18 or max(int(width or 0), int(prec or 0)) > self.limit():
                raise LuaError("printf: a width or precision larger than the script's memory limit allows")
            if used >= len(args):
                out.append(f"%!{verb}(MISSING)")
                continue
            out.append(self.verb(flags, width or "", prec, verb, args[used]))
            used += 1
        out.append(fmt[pos:])
        if used < len(args):
            extra = ", ".join(f"{self.go_type(a)}={self.text(a)}" for a in args[used:])
            out.append(f"%!(EXTRA {extra})")
        return "".join(out)

    @staticmethod
    def go_type(value):
        if isinstance(value, str):
            return "lua.LString"
        if isinstance(value, bool):
            return "lua.LBool"
        if isinstance(value, (int, float)):
            return "lua.LNumber"
        return "*lua.LNilType" if value is None else "*lua.LTable"

    def verb(self, flags, width, prec, verb, arg):
        spec = "%" + flags + width + ("." + prec if prec is not None else "")
        number = isinstance(arg, (int, float)) and not isinstance(arg, bool)
        if verb in "vs":
            return (spec + "s") % self.text(arg)
        if verb == "q" and isinstance(arg, str):
            return (spec + "s") % json.dumps(arg, ensure_ascii=False)
        if verb == "t" and isinstance(arg, bool):
            return (spec + "s") % self.text(arg)
        if verb in "xX" and isinstance(arg, str):
            return (spec + "s") % arg.encode("utf-8", "surrogateescape").hex()
        if number and verb == "c":
            n = int(arg) if math.isfinite(arg) else -1
            return (spec + "s") % (chr(n) if 0 <= n < 0x110000 and not 0xD800 <= n < 0xE000 else "\ufffd")
        if number and verb in "dioxX" and math.isfinite(arg):
            return (spec + ("d" if verb == "i" else verb)) % int(arg)
        if number and verb == "b" and math.isfinite(arg):
            return (spec.replace("#", "") + "s") % format(int(arg), "b")
        if number and verb in "eEfFgG":
            if verb in "gG" and prec is None:
                shortest = go_float(float(arg))
                return (spec + "s") % (shortest.upper() if verb == "G" else shortest)
            return (spec + verb) % float(arg)
        return f"%!{verb}({self.go_type(arg)}={self.text(arg)})"


###############################################################################
# Loggers #####################################################################
###############################################################################

class Logger:
    """A Go log.Logger: prefix, flags, and an output (stdout, stderr or an appended file)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.prefix = ""
        self.flags = dict.fromkeys(_FLAGS, False)
        self.target, self.file = "STDOUT", None

    def set_output(self, output, where=lambda path: path):
        """Switch output (`where` resolves a relative path); returns an error text when the file cannot be
        opened (stdout is used then)."""
        with self.lock:
            self._close()
            self.target = "STDERR" if output == "STDERR" else "STDOUT"
            if output in ("-", "STDOUT", "STDERR"):
                return None
            try:
                fd = open_file(where(output), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            except OSError as e:
                return f"open {output}: {(e.strerror or str(e)).lower()}"
            self.file, self.target = os.fdopen(fd, "ab"), "FILE"
            return None

    def _close(self):
        file, self.file, self.target = self.file, None, "CLOSED"
        if file is not None:
            file.close()

    def close(self):
        """Close a file output; later lines are dropped, as with Go's closed file."""
        with self.lock:
            try:
                self._close()
            except OSError as e:
                return error_text(e)
        return None

    def header(self):
        flags = self.flags
        out = self.prefix
        if flags["date"] or flags["time"] or flags["microseconds"]:
            now = datetime.datetime.now(datetime.UTC if flags["utc"] else None)
            if flags["date"]:
                out += now.strftime("%Y/%m/%d ")
            if flags["time"] or flags["microseconds"]:
                out += now.strftime("%H:%M:%S.%f " if flags["microseconds"] else "%H:%M:%S ")
        return out

    def output(self, message):
        line = self.header() + message
        if not line.endswith("\n"):
            line += "\n"
        data = line.encode("utf-8", "surrogateescape")
        with self.lock:
            if self.target == "FILE":
                self.file.write(data)
                self.file.flush()
            elif self.target != "CLOSED":
                _write_stream(sys.stderr if self.target == "STDERR" else sys.stdout, data)


def _write_stream(stream, data):
    buffer = getattr(stream, "buffer", None)
    if buffer is not None:
        stream.flush()
        buffer.write(data)
        buffer.flush()
    else:
        stream.write(data.decode("utf-8", "replace"))
        stream.flush()


def _load_log(ctx):
    fmt = GoFormatter(ctx.execute("return tostring"), ctx.max_bytes, ticker(ctx.check))

    # The functions below get the logger (a Python object the Lua side keeps) first; argument
    # numbers in errors count from the method's first argument, as Lua does for methods.
    def set_flags(logger, table=None):
        table, flags = check_table(table, 1), {}
        for name in _FLAGS:
            value = table[name.encode()]
            if value is not None and not isinstance(value, bool):
                raise ArgError(1, f"{name} must be a boolean, got {lua_type(value)}")
            flags[name] = bool(value)
        logger.flags = flags

    def new_logger(output=None, prefix=None, flags=None):
        logger = Logger()
        if output is not None:
            logger.set_output(check_string(output, 1), ctx.path)
        if prefix is not None:
            logger.prefix = check_string(prefix, 2)
        if flags is not None:
            set_flags(logger, flags)
        return logger

    def location(logger, where, sep):
        return [where + sep] if logger.flags["longfile"] and where else []

    def print_(logger, where, *args):
        logger.output(fmt.sprint(location(logger, where, " ") + list(args)))

    def println(logger, where, *args):
        logger.output(fmt.sprintln(location(logger, where, "") + list(args)))

    def printf(logger, where, form=None, *args):
        form = check_string(form, 1)
        prefix = "".join(location(logger, where, " ")).replace("%", "%%")
        logger.output(fmt.sprintf(prefix + form, list(args)))

    def set_prefix(logger, prefix=None):
        logger.prefix = check_string(prefix, 1)

    py = ctx.module({
        "new": new_logger, "print": print_, "println": println, "printf": printf,
        "set_prefix": set_prefix, "set_flags": set_flags,
        "set_output": lambda logger, output=None: logger.set_output(check_string(output, 1), ctx.path),
        "close": lambda logger: logger.close(),
    })
    return ctx.execute_file("log.lua", ctx.table(), py)


def lua_modules():
    """Modules this plugin provides: `log`, and `loglevel` built on it."""
    return {"log": _load_log, "loglevel": lambda ctx: ctx.execute_file("loglevel.lua")}
