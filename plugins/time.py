"""`time`: gopher-lua-libs v0.5.0 time module, with Go reference-time layouts.

Bounds: parse and format are linear in their layout and value and look at the call's clock as they go
(a long layout is not worked on on the event loop); sleep never sleeps past the call's deadline.
"""

import calendar
import datetime
import math
import os
import re
import time
import zoneinfo

from msgscript import ArgError, LuaError, check_number, check_string, opt_string, pure
from msgscript import ticker


DEFAULT_LAYOUT = "Mon Jan 2 15:04:05 -0700 MST 2006"
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_NUMERIC_ZONES = ("070000", "07:00:00", "0700", "07:00", "07")
_DIGITS = "0123456789"
_DIGIT_RUN = re.compile("[0-9]*")
_SPACE_RUN = re.compile(" *")
_FRACTION_RUN = {"0": re.compile("0*"), "9": re.compile("9*")}
_NO_TICK = lambda n=1: None  # noqa: E731


class ParseError(ValueError):
    """A value that does not fit its layout."""


###############################################################################
# Go layouts ##################################################################
###############################################################################

def _zone_token(rest):
    for form in _NUMERIC_ZONES:
        if rest[1:].startswith(form):
            return rest[0] + form
    return None


def _fraction_token(rest):
    digit = rest[1]
    n = 1
    while n < len(rest) and rest[n] == digit:
        n += 1
    if n < len(rest) and rest[n] in _DIGITS:
        return None  # ".0001" is not a fraction: Go reads it as literal text
    return ("frac" + digit, n - 1, rest[0])


def _token_at(rest):
    """The Go layout element at the start of `rest`, or None for a literal character (Go's nextStdChunk)."""
    c = rest[0]
    if c == "J" and rest.startswith("Jan"):
        return "January" if rest.startswith("January") else "Jan"
    if c == "M":
        if rest.startswith("Mon"):
            return "Monday" if rest.startswith("Monday") else "Mon"
        if rest.startswith("MST"):
            return "MST"
    if c == "0":
        if len(rest) >= 2 and "1" <= rest[1] <= "6":
            return rest[:2]
        if rest.startswith("002"):
            return "002"
    if c == "1":
        return "15" if rest.startswith("15") else "1"
    if c == "2":
        return "2006" if rest.startswith("2006") else "2"
    if c == "_":
        if rest.startswith("_2") and not rest.startswith("_2006"):
            return "_2"
        if rest.startswith("__2"):
            return "__2"
    if c in "345":
        return c
    if rest.startswith(("PM", "pm")):
        return rest[:2]
    if c in "-Z":
        return _zone_token(rest)
    if c in ".," and len(rest) > 1 and rest[1] in "09":
        return _fraction_token(rest)
    return None


def tokenize(layout, tick=_NO_TICK):
    """Split a Go layout into (is_literal, text_or_token) pairs."""
    out, literal, i, n = [], [], 0, len(layout)
    while i < n:
        tick()
        c = layout[i]
        if c in ".," and i + 1 < n and layout[i + 1] in "09":  # a fraction: its run of 0s or 9s
            end = _FRACTION_RUN[layout[i + 1]].match(layout, i + 1).end()
            tok = None if end < n and layout[end] in _DIGITS else ("frac" + layout[i + 1], end - i - 1, c)
        else:
            tok = _token_at(layout[i:i + 10])  # no other element is longer
        if tok is None:
            literal.append(c)
            i += 1
            continue
        if literal:
            out.append((True, "".join(literal)))
            literal = []
        out.append((False, tok))
        i += 1 + tok[1] if isinstance(tok, tuple) else len(tok)
    if literal:
        out.append((True, "".join(literal)))
    return out


###############################################################################
# Formatting ##################################################################
###############################################################################

def _format_zone(tok, offset):
    if tok[0] == "Z" and offset == 0:
        return "Z"
    sign = "-" if offset < 0 else "+"
    offset = abs(offset)
    hh, mm, ss = offset // 3600, offset // 60 % 60, offset % 60
    form = tok[1:]
    out = f"{sign}{hh:02d}"
    if form != "07":
        out += (":" if ":" in form else "") + f"{mm:02d}"
    if len(form.replace(":", "")) == 6:
        out += (":" if ":" in form else "") + f"{ss:02d}"
    return out


def _format_fraction(tok, nsec):
    kind, ndigits, sep = tok
    digits = f"{nsec:09d}"[:ndigits]
    if kind == "frac9":
        digits = digits.rstrip("0")
        if not digits:
            return ""
    return sep + digits


def _zone_name(dt):
    name = dt.tzname()
    if name:
        return name
    minutes = int(dt.utcoffset().total_seconds()) // 60
    return f"{'-' if minutes < 0 else '+'}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"


def _format_token(tok, dt, nsec):
    if isinstance(tok, tuple):
        return _format_fraction(tok, nsec)
    hour12 = dt.hour % 12 or 12
    simple = {
        "January": _MONTHS[dt.month - 1], "Jan": _MONTHS[dt.month - 1][:3],
        "Monday": _DAYS[dt.weekday()], "Mon": _DAYS[dt.weekday()][:3],
        "01": f"{dt.month:02d}", "1": str(dt.month), "02": f"{dt.day:02d}", "2": str(dt.day),
        "_2": f"{dt.day:2d}", "002": f"{dt.timetuple().tm_yday:03d}", "__2": f"{dt.timetuple().tm_yday:3d}",
        "15": f"{dt.hour:02d}", "03": f"{hour12:02d}", "3": str(hour12),
        "04": f"{dt.minute:02d}", "4": str(dt.minute), "05": f"{dt.second:02d}", "5": str(dt.second),
        "2006": f"{dt.year:04d}", "06": f"{dt.year % 100:02d}",
        "PM": "PM" if dt.hour >= 12 else "AM", "pm": "pm" if dt.hour >= 12 else "am",
    }
    if tok in simple:
        return simple[tok]
    if tok == "MST":
        return _zone_name(dt)
    return _format_zone(tok, int(dt.utcoffset().total_seconds()))


def go_format(dt, nsec, layout, tick=_NO_TICK):
    """Format an aware datetime (plus nanoseconds) with a Go layout."""
    out = []
    for literal, tok in tokenize(layout, tick):
        tick()
        out.append(tok if literal else _format_token(tok, dt, nsec))
    return "".join(out)


###############################################################################
# Parsing #####################################################################
###############################################################################

def _skip(value, literal, tick=_NO_TICK):
    """Consume `literal`; a run of spaces in the layout matches any run of spaces (Go's skip)."""
    i = j = 0
    while i < len(literal):
        tick()
        if literal[i] == " ":
            if j < len(value) and value[j] != " ":
                raise ParseError("literal mismatch")
            i, j = _SPACE_RUN.match(literal, i).end(), _SPACE_RUN.match(value, j).end()
            continue
        k = literal.find(" ", i)
        k = len(literal) if k < 0 else k
        if not value.startswith(literal[i:k], j):
            raise ParseError("literal mismatch")
        i, j = k, j + k - i
    return value[j:]


def _getnum(value, fixed, width=2):
    n = 0
    while n < width and n < len(value) and value[n] in _DIGITS:
        n += 1
    if n == 0 or (fixed and n < width):
        raise ParseError("bad number")
    return int(value[:n]), value[n:]


def _lookup(names, value):
    for i, name in enumerate(names):
        if value[:len(name)].lower() == name.lower():
            return i, value[len(name):]
    raise ParseError("bad name")


def _nanoseconds(value, nbytes):
    digits = value[1:nbytes]
    if value[0] not in ".," or not digits or _DIGIT_RUN.match(digits).end() != len(digits):
        raise ParseError("bad fractional second")
    return int(digits[:9].ljust(9, "0")), value[nbytes:]


def _signed_offset_len(value):
    n = 1
    while n < len(value) and value[n] in _DIGITS:
        n += 1
    if n == 1 or int(value[1:n]) > 23:
        return 0
    return n


def _zone_name_len(value):
    """Length of a time zone abbreviation at the start of value, 0 if none (Go's parseTimeZone)."""
    if len(value) < 3:
        return 0
    if value[:4] in ("ChST", "MeST"):
        return 4
    if value.startswith("GMT"):
        return 3 + (_signed_offset_len(value[3:]) if value[3:4] in ("+", "-") else 0)
    if value[0] in "+-":
        return _signed_offset_len(value)
    upper = 0
    while upper < 6 and upper < len(value) and "A" <= value[upper] <= "Z":
        upper += 1
    if upper == 3 or (upper == 4 and (value[3] == "T" or value[:4] == "WITA")) or (upper == 5 and value[4] == "T"):
        return upper
    return 0


def _parse_offset(tok, value):
    form = tok[1:]
    n = 1 + len(form)
    if len(value) < n or value[0] not in "+-":
        raise ParseError("bad time zone offset")
    for want, got in zip(form, value[1:n], strict=True):
        if (want == ":") != (got == ":") or (want != ":" and got not in _DIGITS):
            raise ParseError("bad time zone offset")
    digits = value[1:n].replace(":", "").ljust(6, "0")
    offset = int(digits[:2]) * 3600 + int(digits[2:4]) * 60 + int(digits[4:6])
    return (-offset if value[0] == "-" else offset), value[n:]


class _Fields:
    """What a Go layout parse has found so far."""

    def __init__(self):
        self.year, self.month, self.day, self.yday = 1, -1, -1, -1
        self.hour = self.minute = self.second = self.nsec = 0
        self.pm = self.am = self.utc = False
        self.offset, self.zone = None, ""


def _parse_date_token(tok, value, f):
    if tok == "2006":
        if len(value) < 4 or any(c not in _DIGITS for c in value[:4]):
            raise ParseError("bad year")
        f.year = int(value[:4])
        return value[4:]
    if tok == "06":
        year, value = _getnum(value, True)
        f.year = year + (1900 if year >= 69 else 2000)
        return value
    if tok in ("Jan", "January"):
        month, value = _lookup([m[:3] for m in _MONTHS] if tok == "Jan" else _MONTHS, value)
        f.month = month + 1
        return value
    if tok in ("Mon", "Monday"):
        return _lookup([d[:3] for d in _DAYS] if tok == "Mon" else _DAYS, value)[1]
    if tok in ("1", "01"):
        f.month, value = _getnum(value, tok == "01")
        if not 1 <= f.month <= 12:
            raise ParseError("month out of range")
        return value
    if tok in ("2", "_2", "02"):
        if tok == "_2" and value[:1] == " ":
            value = value[1:]
        f.day, value = _getnum(value, tok == "02")
        return value
    if tok in ("__2", "002"):
        for _ in range(2 if tok == "__2" else 0):
            value = value[1:] if value[:1] == " " else value
        f.yday, value = _getnum(value, tok == "002", 3)
        if not 1 <= f.yday <= 366:
            raise ParseError("day-of-year out of range")
        return value
    return None


def _parse_clock_token(tok, value, f, following):
    if tok in ("15", "3", "03"):
        f.hour, value = _getnum(value, tok == "03")
        if f.hour > (23 if tok == "15" else 12):
            raise ParseError("hour out of range")
        return value
    if tok in ("4", "04"):
        f.minute, value = _getnum(value, tok == "04")
        if f.minute > 59:
            raise ParseError("minute out of range")
        return value
    if tok in ("5", "05"):
        f.second, value = _getnum(value, tok == "05")
        if f.second > 59:
            raise ParseError("second out of range")
        # a fraction in the value but not in the layout is still accepted (Go does this)
        if len(value) >= 2 and value[0] in ".," and value[1] in _DIGITS and not isinstance(following, tuple):
            f.nsec, value = _nanoseconds(value, _DIGIT_RUN.match(value, 1).end())
        return value
    if tok in ("PM", "pm"):
        word = value[:2]
        if word not in ((tok, "AM") if tok == "PM" else (tok, "am")):
            raise ParseError("bad AM/PM")
        f.pm, f.am = word == tok, word != tok
        return value[2:]
    return None


def _parse_zone_token(tok, value, f):
    if tok == "MST":
        if value.startswith("UTC"):
            f.utc = True
            return value[3:]
        n = _zone_name_len(value)
        if not n:
            raise ParseError("bad time zone name")
        f.zone = value[:n]
        return value[n:]
    if isinstance(tok, tuple):
        kind, ndigits, _ = tok
        if kind == "frac0":
            if len(value) < 1 + ndigits:
                raise ParseError("bad fractional second")
            f.nsec, value = _nanoseconds(value, 1 + ndigits)
            return value
        if len(value) < 2 or value[0] not in ".," or value[1] not in _DIGITS:
            return value  # ".999" fractions are optional
        f.nsec, value = _nanoseconds(value, _DIGIT_RUN.match(value, 1).end())
        return value
    if tok[0] == "Z" and value.startswith("Z"):
        f.utc = True
        return value[1:]
    f.offset, value = _parse_offset(tok, value)
    return value


def _apply_yday(f):
    leap = calendar.isleap(f.year)
    if f.yday > (366 if leap else 365):
        raise ParseError("day-of-year out of range")
    date = datetime.date(f.year, 1, 1) + datetime.timedelta(days=f.yday - 1)
    if f.month >= 0 and f.month != date.month:
        raise ParseError("day-of-year does not match month")
    if f.day >= 0 and f.day != date.day:
        raise ParseError("day-of-year does not match day")
    f.month, f.day = date.month, date.day


def _offset_for_name(name, naive, local):
    """The UTC offset the zone abbreviation `name` has in `local` around this wall time, if it is used there."""
    for when in (naive, naive.replace(month=1, day=1), naive.replace(month=7, day=1)):
        for fold in (0, 1):
            dt = when.replace(tzinfo=local, fold=fold)
            if dt.tzname() == name:
                return int(dt.utcoffset().total_seconds())
    return None


def _to_unix(f, default, local):
    naive = datetime.datetime(f.year, f.month, f.day, f.hour, f.minute, f.second)
    wall = calendar.timegm(naive.timetuple())
    if f.utc:
        return wall
    if f.offset is not None:
        return wall - f.offset
    if f.zone:
        offset = _offset_for_name(f.zone, naive, local)
        if offset is None:
            offset = int(f.zone[3:] or 0) * 3600 if f.zone.startswith("GMT") else 0
        return wall - offset
    return int(naive.replace(tzinfo=default).timestamp())


def go_parse(value, layout, default=datetime.UTC, local=None, tick=_NO_TICK):
    """Parse `value` with a Go layout; returns unix seconds (int, or float with a fraction)."""
    f = _Fields()
    rest = value
    tokens = tokenize(layout, tick)
    following_tokens, following = [], None  # the next element after each token
    for literal, tok in reversed(tokens):
        following_tokens.append(following)
        if not literal:
            following = tok
    following_tokens.reverse()
    for i, (literal, tok) in enumerate(tokens):
        tick(64)  # each step may copy what is left of the value
        if literal:
            rest = _skip(rest, tok, tick)
            continue
        following = following_tokens[i]
        out = _parse_date_token(tok, rest, f)
        if out is None:
            out = _parse_clock_token(tok, rest, f, following)
        if out is None:
            out = _parse_zone_token(tok, rest, f)
        rest = out
    if rest:
        raise ParseError(f'extra text: "{rest}"')
    if f.pm and f.hour < 12:
        f.hour += 12
    elif f.am and f.hour == 12:
        f.hour = 0
    if f.yday >= 0:
        _apply_yday(f)
    f.month, f.day = max(f.month, 1), (1 if f.day < 0 else f.day)
    if not 1 <= f.day <= calendar.monthrange(f.year, f.month)[1]:
        raise ParseError("day out of range")
    seconds = _to_unix(f, default, local or local_zone())
    return seconds + f.nsec / 1e9 if f.nsec else seconds


###############################################################################
# Zones and the Lua module ####################################################
###############################################################################

def local_zone():
    """The server's zone, found the way Go finds it: $TZ, then /etc/localtime, else UTC."""
    tz = os.environ.get("TZ")
    try:
        if tz is not None:
            return zoneinfo.ZoneInfo(tz.lstrip(":")) if tz.lstrip(":") else datetime.UTC
        with open("/etc/localtime", "rb") as f:
            return zoneinfo.ZoneInfo.from_file(f, key="Local")
    except (OSError, ValueError, zoneinfo.ZoneInfoNotFoundError):
        return datetime.UTC


def load_location(name):
    """Go time.LoadLocation: "" and "UTC" are UTC, "Local" is the server zone, else an IANA name."""
    if name in ("", "UTC"):
        return datetime.UTC
    if name == "Local":
        return local_zone()
    try:
        return zoneinfo.ZoneInfo(name)
    except (ValueError, zoneinfo.ZoneInfoNotFoundError):
        raise ValueError(f"unknown time zone {name}") from None


def _load(ctx):
    def sleep(seconds=None):
        """Sleep, but never past the script's deadline (that is a timeout)."""
        seconds = check_number(seconds, 1)
        if seconds <= 0:
            return None
        left = ctx.remaining()
        if seconds <= left:
            time.sleep(seconds)
            return None
        time.sleep(left + 0.005)  # just past the deadline, so the call fails as a timeout
        raise LuaError("script timed out (in time.sleep)")

    @pure
    def parse(value=None, layout=None, location=None):
        value, layout, location = check_string(value, 1), check_string(layout, 2), opt_string(location, 3)
        ctx.move_to_worker(64 * (len(value) + len(layout)))
        tick = ticker(ctx.check)
        try:
            if location is None:
                return go_parse(value, layout, tick=tick)
            loc = load_location(location)
            return go_parse(value, layout, default=loc, local=loc, tick=tick)
        except ValueError as e:
            return None, f'parsing time "{value}" as "{layout}": {e}'
        except OverflowError:
            return None, f'parsing time "{value}" as "{layout}": year out of range'

    @pure
    def format_(ts=None, layout=None, location=None):
        ts, layout, location = check_number(ts, 1), opt_string(layout, 2, DEFAULT_LAYOUT), opt_string(location, 3)
        try:
            tz = load_location(location) if location is not None else local_zone()
        except ValueError as e:
            return None, str(e)
        if not math.isfinite(ts):
            raise ArgError(1, "time value out of range")
        sec = math.floor(ts)
        nsec = int(round((ts - sec) * 1e9))
        try:
            dt = datetime.datetime.fromtimestamp(sec, tz)
        except (OverflowError, OSError, ValueError):
            raise ArgError(1, "time value out of range") from None
        ctx.move_to_worker(64 * len(layout))
        return go_format(dt, min(nsec, 999_999_999), layout, ticker(ctx.check))

    return {
        "unix": pure(lambda: time.time()),
        "unix_nano": pure(lambda: time.time_ns()),
        "sleep": sleep,
        "parse": parse,
        "format": format_,
    }


def lua_modules():
    """Modules this plugin provides."""
    return {"time": _load}
