"""`re` (yuin/gluare): regular expressions in Go's RE2 syntax, run by the RE2 engine (google-re2).

Matching is linear in the input, whatever the pattern. It works on the bytes of the Lua strings,
so positions are byte offsets. It reads them as Go's regexp package does: as UTF-8 (`.` is one
character), with each byte that is not part of valid UTF-8 taken as one U+FFFD character.

Bounds: RE2 releases the interpreter lock while it searches, so a long search stops nothing else; a
string longer than INLINE_SIZE is searched on a worker, never on the event loop. Loops over matches
look at the call's clock, and results (and the map of a string's invalid bytes) are counted against
the script's memory cap before they are made. One search of a long string is one C call that cannot be
stopped midway: RE2 is linear, but with a pattern whose automaton does not fit RE2's cache it can take
about 0.1-0.3 µs per byte per few dozen states of the pattern. A pattern of more than 16 groups is
searched by RE2's NFA, whose time and memory grow with the groups too: its cost is counted first
(_check_groups), and a search that would not fit the memory cap or the time left is refused.
"""

from __future__ import annotations

import bisect
import functools
import re as pyre  # only for the fixed, linear pattern in _Subject; user patterns go to RE2
from array import array
from itertools import chain

import re2
from re2 import _re2

from msgscript import (ArgError, LuaError, check_string, is_table, lua_number_text, lua_type, opt_integer, pure,
                       translated, truthy)


_OPTIONS = re2.Options()
_OPTIONS.encoding = re2.Options.Encoding.UTF8  # Go: the pattern and the text are UTF-8
_OPTIONS.log_errors = False  # RE2 would print every invalid pattern to stderr
# Other options keep RE2's defaults, which are Go's: leftmost-first, Perl classes, `$` = end of
# text, `.` not matching \n, and max_mem 8 MiB per pattern (larger programs are "too large").
_UNANCHORED = _re2.RE2.Anchor.UNANCHORED
_CACHE_SIZE = 32  # compiled patterns kept (each may hold up to max_mem, its DFA cache included)
_CHECK_EVERY = 256  # matches between two looks at the clock
_INVALID_BYTE_COST = 48  # bytes of Python objects _Subject keeps for each byte that is not UTF-8

# RE2's error texts -> Go's (regexp/syntax ErrorCode strings)
_GO_ERRORS = {
    "missing )": "missing closing )",
    "missing ]": "missing closing ]",
    "unexpected )": "unexpected )",
    "trailing \\": "trailing backslash at end of expression",
    "no argument for repetition operator": "missing argument to repetition operator",
    "invalid repetition size": "invalid repeat count",
    "bad repetition operator": "invalid nested repetition operator",
    "invalid perl operator": "invalid or unsupported Perl syntax",
    "invalid named capture group": "invalid named capture",
    "invalid escape sequence": "invalid escape sequence",
    "invalid character class range": "invalid character class range",
    "invalid character class": "invalid character class",
    "invalid UTF-8": "invalid UTF-8",
    "pattern too large - compile failed": "expression too large",
    "unexpected error": "regexp/syntax: internal error",
}
_FFFD = "\ufffd".encode()
_INVALID_RUNS = pyre.compile("([\udc80-\udcff]+)")  # undecodable bytes, as surrogateescape gives them
_QUOTE = str.maketrans({c: "\\" + c for c in "\\.+*?()|[]{}^$"})  # Go regexp.QuoteMeta


def _bytes(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _text(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


###############################################################################
# Patterns and subjects #######################################################
###############################################################################


class _Regexp:
    """A compiled pattern: RE2's matcher, its group count and its group names."""

    __slots__ = ("match", "groups", "names", "size")

    def __init__(self, pattern: bytes):
        if _has_byte_escape(pattern):  # RE2's \C (any byte) is not Go syntax, and splits characters
            raise LuaError(r"error parsing regexp: invalid escape sequence: `\C`")
        rx = _re2.RE2(pattern, _OPTIONS)
        if not rx.ok():
            raise LuaError(_go_error(rx.error(), pattern))
        self.match, self.size = rx.Match, rx.ProgramSize()
        self.groups = rx.NumberOfCapturingGroups()
        self.names = {}
        for name, index in sorted(rx.NamedCapturingGroups(), key=lambda item: item[1]):
            self.names.setdefault(name, index)  # Go's Expand takes the first group of a name


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _compile(pattern: bytes) -> _Regexp:
    return _Regexp(pattern)


def _regexp(pattern: str) -> _Regexp:
    return _compile(_bytes(pattern))


# With many groups, RE2 searches with its NFA, which keeps every group's position for every state of the
# pattern at every byte: about ProgramSize x groups x 16 bytes of memory and (bytes + 1) x ProgramSize x groups
# steps of 0.3 ns, in one C call that cannot be stopped (4,000 "(a?)" on 1,000 bytes: 41 s; 16,000 "()": 7 GiB).
_FEW_GROUPS = 16  # below this the usual engines (DFA, one-pass, bit state) do the work: nothing to count
_GROUP_STEP = 0.3e-9  # seconds per step, measured


def _check_groups(ctx, rx: _Regexp, n: int) -> None:
    """A search of `n` bytes with `rx` fits the call's memory and time, and runs on the event loop only when
    short (about a millisecond); else a LuaError, before the search."""
    if rx.groups <= _FEW_GROUPS:
        return
    ctx.fits(rx.size * (rx.groups + 1) * 16, "the positions of the regexp's groups")
    steps = (n + 1) * rx.size * (rx.groups + 1)
    if steps * _GROUP_STEP > 0.001:
        ctx.move_to_worker()
        if steps * _GROUP_STEP > ctx.remaining():
            raise LuaError(f"regexp: a search with {rx.groups} groups over {n} bytes would take longer than the "
                           f"call has left")


def _has_byte_escape(pattern: bytes) -> bool:
    """Whether the pattern uses \\C (outside \\Q...\\E, where it is literal text)."""
    i = pattern.find(b"\\")
    while 0 <= i < len(pattern) - 1:
        c = pattern[i + 1:i + 2]
        if c == b"C":
            return True
        if c == b"Q":
            end = pattern.find(b"\\E", i + 2)
            if end < 0:
                return False
            i = end
        i = pattern.find(b"\\", i + 2)
    return False


def _go_error(message: bytes | str, pattern: bytes) -> str:
    """RE2's "missing ): (a" as Go words it: error parsing regexp: missing closing ): `(a`."""
    text = _text(message) if isinstance(message, bytes) else str(message)
    for code, go_code in _GO_ERRORS.items():
        if text == code or text.startswith(code + ": "):
            arg = text[len(code) + 2:] or _text(pattern)
            return f"error parsing regexp: {go_code}: `{arg}`"
    return f"error parsing regexp: {text}: `{_text(pattern)}`"


class _Subject:
    """A string as Go's regexp reads it.

    `text` is what RE2 searches: the string itself when it is valid UTF-8, else a copy with each
    invalid byte replaced by U+FFFD (Go decodes such a byte as U+FFFD, width 1), so `.` and `[^a]`
    match it as in Go. `search` and `find_all` give spans in offsets of `raw`, the string itself.
    """

    __slots__ = ("raw", "text", "_fffd")

    def __init__(self, raw: bytes):
        self.raw = self.text = raw
        self._fffd = None  # offsets in text of the U+FFFD that stand for invalid bytes
        if raw.isascii():
            return
        try:
            raw.decode("utf-8")
            return
        except UnicodeDecodeError:
            pass
        out, fffd, size = [], [], 0
        for i, piece in enumerate(_INVALID_RUNS.split(_text(raw))):
            if i % 2:
                fffd.extend(range(size, size + 3 * len(piece), 3))
                out.append(_FFFD * len(piece))
                size += 3 * len(piece)
            elif piece:
                out.append(piece.encode("utf-8"))
                size += len(out[-1])
        self.text, self._fffd = b"".join(out), fffd

    def _raw_spans(self, spans: list) -> list:
        """Spans in `text` -> spans in `raw` ((-1, -1), a group that took no part, stays)."""
        fffd, left = self._fffd, bisect.bisect_left
        return [(a - 2 * left(fffd, a), b - 2 * left(fffd, b)) if a >= 0 else (a, b) for a, b in spans]

    def search(self, rx: _Regexp) -> list | None:
        """The first match: (start, end) of the match and of each group, or None."""
        spans = _search(rx, self.text, 0)
        return spans if spans is None or self._fffd is None else self._raw_spans(spans)

    def find_all(self, rx: _Regexp, limit: int, work: _Work):
        """Successive matches by Go's FindAll rule: an empty match right after a match is skipped."""
        text, match, mapped = self.text, rx.match, self._fffd is not None
        pos, prev_end, count, end = 0, -1, 0, len(text)
        while pos <= end and count != limit:
            spans = match(_UNANCHORED, text, pos, end)
            start, stop = spans[0]
            if start < 0:
                return
            if start < end and 0x80 <= text[start] < 0xC0:  # inside a character: see _search
                spans = _search(rx, text, start)
                if spans is None:
                    return
                start, stop = spans[0]
            accept = True
            if stop == pos:  # an empty match at pos: step over one character
                accept = pos != prev_end
                pos += _char_width(text[pos]) if pos < end else 1
            else:
                pos = stop
            prev_end = stop
            if accept:
                count += 1
                if not count % _CHECK_EVERY:
                    work.check()
                yield self._raw_spans(spans) if mapped else spans


def _search(rx: _Regexp, text: bytes, pos: int) -> list | None:
    """The leftmost match starting at or after `pos`, as RE2 spans, or None.

    Go tries only character boundaries as starts; RE2 tries every byte, so an empty-width
    match (`\\B`) may fall inside a multi-byte character: then the search goes on after it.
    """
    end = len(text)
    while True:
        spans = rx.match(_UNANCHORED, text, pos, end)
        start = spans[0][0]
        if start < 0:
            return None
        if start == end or not 0x80 <= text[start] < 0xC0:
            return spans
        pos = start + 1
        while pos < end and 0x80 <= text[pos] < 0xC0:
            pos += 1


def _char_width(lead: int) -> int:
    """The length of the UTF-8 character starting with byte `lead` (text is valid UTF-8)."""
    return 1 if lead < 0xC0 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4


def _start(length: int, init: int) -> int:
    """gluare's luaIndex2StringIndex(init, start=true): 0-based, negative from the end, >= 0."""
    i = init - 1 if init else 0
    if i < 0:
        i += length + 1
    return max(i, 0)


class _Work:
    """Bounds a loop over matches: the memory cap, and the call's clock (ctx.check: its deadline, and for
    a call running inline on the event loop its budget, past which the call moves to a worker thread;
    these functions have no effects, so they are simply run again there)."""

    __slots__ = ("ctx", "limit", "what", "check")

    def __init__(self, ctx, what: str):
        self.ctx, self.what, self.check = ctx, what, ctx.check
        self.limit = ctx.max_bytes()  # a result up to this size fits: no need to ask again

    def fits(self, size: int) -> None:
        """Raise unless `size` bytes of results fit in the script's memory."""
        self.ctx.fits(size, self.what)  # collects garbage first; raises if still too big
        self.limit = self.ctx.max_bytes()


###############################################################################
# Replacements ################################################################
###############################################################################


def _template(repl: str) -> tuple:
    """A Go Regexp.Expand template -> literal bytes and group references (a number or a name)."""
    return _short_template(repl) if len(repl) <= 1024 else _parse_template(repl)


@functools.lru_cache(maxsize=256)
def _short_template(repl: str) -> tuple:
    return _parse_template(repl)


def _parse_template(repl: str) -> tuple:
    parts, i, n = [], 0, len(repl)
    while (j := repl.find("$", i)) >= 0:
        parts.append(_bytes(repl[i:j]))
        if repl.startswith("$", j + 1):  # $$
            parts.append(b"$")
            i = j + 2
            continue
        k, brace = j + 1, repl.startswith("{", j + 1)
        k += brace
        start = k
        while k < n and (repl[k].isalpha() or repl[k].isdecimal() or repl[k] == "_"):
            k += 1
        name = repl[start:k]
        if not name or (brace and not repl.startswith("}", k)):  # malformed: a plain "$"
            parts.append(b"$")
            i = j + 1
            continue
        i = k + brace
        number = name.isascii() and name.isdigit() and len(name) <= 9 and (name == "0" or name[0] != "0")
        parts.append(int(name) if number else name)
    parts.append(_bytes(repl[i:]))
    return tuple(p for p in parts if p != b"")


def _expander(rx: _Regexp, repl: str):
    """A function (raw, spans) -> the replacement text, for a string `repl`."""
    parts = []
    for part in _template(repl):
        if isinstance(part, bytes):
            parts.append(part)
            continue
        index = part if isinstance(part, int) else rx.names.get(_bytes(part))
        if index is not None and index <= rx.groups:
            parts.append(index)
    if all(isinstance(p, bytes) for p in parts):
        constant = b"".join(parts)
        return lambda raw, spans: constant
    # a group that took no part has the span (-1, -1): raw[-1:-1] is ""
    return lambda raw, spans: b"".join([p if p.__class__ is bytes else raw[spans[p][0]:spans[p][1]] for p in parts])


def _replacement(value) -> bytes | None:
    """A table's or function's result as gopher-lua's LVAsString: None keeps the match."""
    if value is None or value is False:
        return None
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return _bytes(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return lua_number_text(value).encode()
    return b""  # true, a table, a function: replaced by nothing, as in the original


def _captures(rx: _Regexp, raw: bytes, spans: list) -> tuple:
    """All groups ("" for one that took no part), or the whole match for a pattern without groups."""
    if not rx.groups:
        return (raw[spans[0][0]:spans[0][1]],)
    return tuple([raw[a:b] for a, b in spans[1:]])


###############################################################################
# The module ##################################################################
###############################################################################


def _loader(ctx):
    def subject(raw: bytes) -> _Subject:
        """A _Subject, its cost counted first when the string is not valid UTF-8."""
        if not raw.isascii() and len(raw) > 4096:
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                invalid = len(raw) - len(raw.decode("utf-8", "ignore").encode())
                ctx.fits(3 * len(raw) + _INVALID_BYTE_COST * invalid, "a map of its invalid bytes")
        return _Subject(raw)

    def regexp(pattern: str, n: int) -> _Regexp:
        """The compiled pattern, its cost over `n` bytes counted first (_check_groups)."""
        rx = _regexp(pattern)
        _check_groups(ctx, rx, n)
        return rx

    @pure
    def find(*args):
        args += (None,) * (2 - len(args))
        s, pattern = check_string(args[0], 1), check_string(args[1], 2)
        ctx.move_to_worker(len(s) + len(pattern))
        if not s and not pattern:
            return 1, 0
        raw = _bytes(s)
        init = _start(len(raw), opt_integer(args[2] if len(args) > 2 else None, 3, 1))
        if len(args) == 4 and truthy(args[3]):  # plain, read only when exactly 4 arguments are passed
            if init > len(raw):
                return None
            needle = _bytes(pattern)
            at = raw.find(needle, init)
            return None if at < 0 else (at + 1, at + len(needle))
        rx = regexp(pattern, len(s))
        if init > len(raw):
            return None
        raw = raw[init:]
        spans = subject(raw).search(rx)
        if spans is None or (rx.groups and spans[1][0] < 0):
            return None
        end = spans[-1][1] if spans[-1][0] >= 0 else spans[0][1]  # quirk: the end of the last group
        return (init + spans[0][0] + 1, init + end, *[raw[a:b] for a, b in spans[1:]])

    @pure
    def match(s=None, pattern=None, init=None):
        s, pattern = check_string(s, 1), check_string(pattern, 2)
        ctx.move_to_worker(len(s) + len(pattern))
        raw = _bytes(s)
        offset = opt_integer(init, 3, 1)
        offset = max((len(raw) + offset + 1 if offset < 0 else offset) - 1, 0)
        rx = regexp(pattern, len(s))
        if offset > len(raw):
            return None
        raw = raw[offset:]
        spans = subject(raw).search(rx)
        return None if spans is None else _captures(rx, raw, spans)

    @pure
    def gmatch(s=None, pattern=None):
        s, pattern = check_string(s, 1), check_string(pattern, 2)
        ctx.move_to_worker(len(s) + len(pattern))
        rx = regexp(pattern, len(s))
        found_in = subject(_bytes(s))
        first = 1 if rx.groups else 0  # the groups, or the whole match
        width = 2 * (rx.groups or 1)
        work = _Work(ctx, "gmatch results")
        found = array("q")  # (start, end) of each yielded group of each match
        size, step = 0, 8 * width
        for spans in found_in.find_all(rx, -1, work):
            found.extend(chain.from_iterable(spans[first:]))
            size += step
            if size > work.limit:
                work.fits(size)
        raw, index = found_in.raw, 0

        @pure
        def gmatch_iterator(*_):
            nonlocal index
            if index >= len(found):
                return None
            at, index = index, index + width
            return tuple([raw[found[i]:found[i + 1]] for i in range(at, at + width, 2)])

        return gmatch_iterator

    @pure
    def gsub(s=None, pattern=None, repl=None, n=None):
        s, pattern = check_string(s, 1), check_string(pattern, 2)
        if not isinstance(repl, str) and not is_table(repl) and lua_type(repl) != "function":
            raise ArgError(3, f"string/table/function expected, got {lua_type(repl)}")
        limit = opt_integer(n, 4, -1)
        ctx.move_to_worker(len(s) + len(pattern) + (len(repl) if isinstance(repl, str) else 0))
        rx = regexp(pattern, len(s))
        found_in = subject(_bytes(s))
        if isinstance(repl, str):
            replace = _expander(rx, repl)
        elif is_table(repl):
            key = 1 if rx.groups else 0
            replace = lambda raw, spans: _replacement(repl[raw[spans[key][0]:spans[key][1]]])  # noqa: E731
        else:
            def replace(raw, spans):
                out = repl(*_captures(rx, raw, spans))
                return _replacement(out[0] if out else None) if isinstance(out, tuple) else _replacement(out)
        raw = found_in.raw
        work = _Work(ctx, "gsub result")
        out, last, count, size = [], 0, 0, 0
        for spans in found_in.find_all(rx, limit, work):
            count += 1
            text = replace(raw, spans)
            if text is None:
                continue
            start = spans[0][0]
            out.append(raw[last:start])
            out.append(text)
            size += start - last + len(text)
            if size > work.limit:
                work.fits(size)
            last = spans[0][1]
        if not count:
            return raw, 0
        out.append(raw[last:])
        work.fits(size + len(raw) - last)
        return b"".join(out), count

    @pure
    def quote(s=None):
        s = check_string(s, 1)
        ctx.move_to_worker(len(s))
        ctx.fits(4 * len(s), "re.quote's result")
        return _bytes(translated(s, _QUOTE, ctx.check))

    return {"find": find, "match": match, "gmatch": gmatch, "gsub": gsub, "quote": quote}


def lua_modules():
    return {"re": _loader}
