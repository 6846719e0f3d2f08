"""`filepath`: Go's path/filepath (Unix flavour) as gopher-lua-libs v0.5.0 exposes it.

A relative path is the call's working directory's (as each message of the Go original runs in a
directory of its own). Patterns (match, glob) are matched by RE2, in time linear in the name whatever
the pattern; glob looks at the call's clock as it lists directories, and fails once the names it holds
and the matches it found pass what the script's memory cap leaves.
"""

import functools
import os
import stat

import re2

from msgscript import check_string, pure
from msgscript import ticker


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.encoding = re2.Options.Encoding.UTF8  # Go matches names as UTF-8 runes
_RE2_OPTIONS.log_errors = False
_NAME_COST = 64  # bytes a name takes besides its text (as a Python str while listing, as a Lua string after)


class BadPattern(ValueError):
    """Go's filepath.ErrBadPattern."""

    def __init__(self):
        super().__init__("syntax error in pattern")


# Lexical functions on str #####################################################

def _no_tick(n=1):
    pass


def clean(path: str, tick=_no_tick) -> str:
    """Go filepath.Clean: the shortest lexically equivalent path."""
    if path == "":
        return "."
    if "." not in path and "//" not in path and (len(path) == 1 or not path.endswith("/")):
        return path  # nothing to clean (a quick answer for a long path too)
    rooted = path.startswith("/")
    out = []
    for part in path.split("/"):
        tick()
        if part in ("", "."):
            continue
        if part != "..":
            out.append(part)
        elif out and out[-1] != "..":
            out.pop()
        elif not rooted:
            out.append("..")
    joined = "/".join(out)
    return "/" + joined if rooted else joined or "."


def basename(path: str) -> str:
    """Go filepath.Base: the last element."""
    if path == "":
        return "."
    path = path.rstrip("/")
    return path.rsplit("/", 1)[-1] if path else "/"


def dirname(path: str, tick=_no_tick) -> str:
    """Go filepath.Dir: all but the last element, cleaned."""
    return clean(path[:path.rfind("/") + 1], tick)


def ext(path: str) -> str:
    """Go filepath.Ext: the extension of the last element, with its dot."""
    dot = path.rfind(".", path.rfind("/") + 1)
    return path[dot:] if dot >= 0 else ""


def split(path: str) -> tuple[str, str]:
    """Go filepath.Split: (dir, file), dir keeping its trailing slash."""
    i = path.rfind("/") + 1
    return path[:i], path[i:]


def join_list(parts, tick=_no_tick) -> str:
    """Go filepath.Join: empty elements are ignored; "" if all are empty."""
    for i, part in enumerate(parts):
        if part:
            return clean("/".join(parts[i:]), tick)
    return ""


def rel(basepath: str, targpath: str, tick=_no_tick):
    """Go filepath.Rel (purely lexical); err as a 2nd value when impossible."""
    base, targ = clean(basepath, tick), clean(targpath, tick)
    if base == targ:
        return "."
    failure = "", f"Rel: can't make {targpath} relative to {basepath}"
    if base.startswith("/") != targ.startswith("/"):
        return failure
    base_parts = [] if base in (".", "/") else base.strip("/").split("/")
    targ_parts = [] if targ in (".", "/") else targ.strip("/").split("/")
    common = 0
    while common < min(len(base_parts), len(targ_parts)) and base_parts[common] == targ_parts[common]:
        tick()
        common += 1
    if ".." in base_parts[common:common + 1]:
        return failure
    return "/".join([".."] * (len(base_parts) - common) + targ_parts[common:])


# Patterns #####################################################################

def _rune(c: str) -> str:
    return f"\\x{{{ord(c):x}}}"


def _class_char(pattern, i):
    if i >= len(pattern) or pattern[i] in "-]":
        raise BadPattern()
    if pattern[i] == "\\":
        i += 1
        if i >= len(pattern):
            raise BadPattern()
    if i + 1 >= len(pattern):
        raise BadPattern()  # the class is never closed
    return pattern[i], i + 1


def _class_regex(pattern, i):
    """Translate a Go character class starting after '['; returns (RE2 regex, next index)."""
    negated = i < len(pattern) and pattern[i] == "^"
    i += negated
    ranges, count = [], 0
    while True:
        if i < len(pattern) and pattern[i] == "]" and count:
            i += 1
            break
        lo, i = _class_char(pattern, i)
        hi = lo
        if pattern[i] == "-":
            hi, i = _class_char(pattern, i + 1)
        count += 1
        if lo <= hi:  # Go accepts a reversed range that simply never matches
            ranges.append(_rune(lo) + "-" + _rune(hi))
    if not ranges:
        return ("(?s:.)" if negated else "[^\\x{0}-\\x{10ffff}]"), i
    return "[" + ("^" if negated else "") + "".join(ranges) + "]", i


def _pattern_regex(pattern: str, tick=_no_tick) -> str:
    """A Go filepath pattern as an RE2 regular expression; BadPattern for a malformed one."""
    out, i = [], 0
    while i < len(pattern):
        tick()
        c = pattern[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\":
            i += 1
            if i >= len(pattern):
                raise BadPattern()
            out.append(_rune(pattern[i]))
        elif c == "[":
            regex, i = _class_regex(pattern, i + 1)
            out.append(regex)
            continue
        else:
            out.append(c if c.isascii() and c.isalnum() else _rune(c))
        i += 1
    return "".join(out)


MAX_PATTERN = 4096  # bytes: a path is shorter (PATH_MAX); a longer pattern costs work and memory for nothing


def _compiled(pattern: str, tick=_no_tick):
    """The RE2 matcher of a pattern (whole names only, kept compiled); BadPattern for a malformed one, or
    one longer than MAX_PATTERN."""
    if len(pattern) > MAX_PATTERN:
        raise BadPattern()
    return _cached(pattern)


@functools.lru_cache(maxsize=64)
def _cached(pattern: str):
    return _compile(pattern)


def _compile(pattern: str, tick=_no_tick):
    try:
        return re2.compile(_utf8(_pattern_regex(pattern, tick)), options=_RE2_OPTIONS).fullmatch
    except re2.error:
        raise BadPattern() from None  # e.g. a pattern too large for RE2's memory budget


def _utf8(name: str) -> bytes:
    """A name as RE2 reads it: UTF-8 where each byte that is not part of valid UTF-8 is a U+FFFD, as Go
    decodes it."""
    try:
        return name.encode()
    except UnicodeEncodeError:  # the bytes a script's string or a file name had that are not UTF-8
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace").encode()


def match(pattern: str, name: str, tick=_no_tick) -> bool:
    """Go filepath.Match; BadPattern for a malformed pattern."""
    return _compiled(pattern, tick)(_utf8(name)) is not None


def _has_meta(path):
    return any(c in path for c in "*?[\\")


class _Budget:
    """What glob may hold (names being sorted, matches found) before it fails, and its clock."""

    def __init__(self, ctx):
        self.ctx, self.taken = ctx, 0
        self.left = ctx.max_bytes() if ctx is not None else 2**62
        self.tick = ticker(ctx.check, 256) if ctx is not None else (lambda n=1: None)

    def take(self, text: str) -> int:
        size = len(text) + _NAME_COST
        self.taken += size
        self.left -= size
        if self.left < 0:
            self.ctx.fits(self.taken, "glob's names and matches")  # garbage collected first; raises if over
            self.left = self.ctx.max_bytes() - self.taken
        self.tick()
        return size

    def give_back(self, size: int) -> None:
        self.taken -= size
        self.left += size


def _glob_dir(directory, pattern, matches, budget, where):
    """Go's glob(): the names in `directory` matching `pattern`, sorted, added to `matches`."""
    path = where(directory)
    try:
        if not stat.S_ISDIR(os.stat(path).st_mode):
            return
    except OSError:
        return  # Go ignores I/O errors while globbing
    names, held = [], 0
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                held += budget.take(entry.name)
                names.append(entry.name)
    except OSError:
        pass
    names.sort()
    test = _compiled(pattern)
    for n in names:
        budget.tick()
        if test(_utf8(n)) is not None:
            found = join_list([directory, n])
            budget.take(found)
            matches.append(found)
    budget.give_back(held)


def glob(pattern: str, ctx=None) -> list[str]:
    """Go filepath.Glob: the sorted matches; raises BadPattern. Relative paths are `ctx`'s call's."""
    where = ctx.path if ctx is not None else (lambda p: p)
    tick = ticker(ctx.check) if ctx is not None else _no_tick
    _compiled(pattern, tick)
    if not _has_meta(pattern):
        return [pattern] if os.path.lexists(where(pattern)) else []
    budget = _Budget(ctx)
    files = []  # Go's globWithLimit recursion, unrolled: the file patterns from the last one
    while True:
        directory, file = split(pattern)
        directory = "." if directory == "" else directory if directory == "/" else directory[:-1]
        files.append(file)
        if not _has_meta(directory):
            break
        if directory == pattern:
            raise BadPattern()
        _compiled(directory, tick)
        pattern = directory
    found = [directory]
    for file in reversed(files):
        dirs, found = found, []
        for d in dirs:
            _glob_dir(d, file, found, budget, where)
    return found


# The Lua module ###############################################################

def _load(ctx):
    def lexical(func, long=False):
        """A Lua function of one path string; `long` work (a loop over the path) looks at the clock."""
        def call(path=None):
            path = check_string(path, 1)
            if not long:
                return func(path)
            ctx.move_to_worker(len(path))
            return func(path, ticker(ctx.check))

        return pure(call)

    @pure
    def match_(pattern=None, name=None):
        """Go filepath.Match: bool, plus err for a malformed pattern."""
        pattern, name = check_string(pattern, 1), check_string(name, 2)
        ctx.move_to_worker(len(pattern) + len(name))
        try:
            return match(pattern, name, ticker(ctx.check))
        except BadPattern as e:
            return False, str(e)

    def glob_(pattern=None):
        """Go filepath.Glob: sorted matches ({} if none), or nil, err for a bad pattern."""
        try:
            return glob(check_string(pattern, 1), ctx)
        except BadPattern as e:
            return None, str(e)

    def abs_(path=None):
        """Go filepath.Abs: the path made absolute (in the call's working directory) and cleaned."""
        path = check_string(path, 1)
        tick = ticker(ctx.check)
        return clean(path, tick) if path.startswith("/") else join_list([ctx.cwd(), path], tick)

    def eval_symlinks(path=None):
        """Go filepath.EvalSymlinks; a relative path stays relative when it resolves inside the working
        directory."""
        path = check_string(path, 1)
        try:
            resolved = os.path.realpath(ctx.path(path), strict=True)
        except OSError as e:
            return "", f"lstat {e.filename or path}: {(e.strerror or str(e)).lower()}"
        if not path.startswith("/"):
            cwd = os.path.realpath(ctx.cwd())
            if resolved == cwd or resolved.startswith(cwd.rstrip("/") + "/"):
                return os.path.relpath(resolved, cwd)
        return resolved

    @pure
    def split_list(path=None):
        """Go filepath.SplitList, its pieces counted before they are made."""
        path = check_string(path, 1)
        ctx.move_to_worker(len(path))
        ctx.fits(80 * path.count(":") + 2 * len(path), "filepath.split_list's result")
        return path.split(":") if path else []

    @pure
    def rel_(basepath=None, targpath=None):
        basepath, targpath = check_string(basepath, 1), check_string(targpath, 2)
        ctx.move_to_worker(len(basepath) + len(targpath))
        return rel(basepath, targpath, ticker(ctx.check))

    members = {
        "basename": lexical(basename), "clean": lexical(clean, True), "dir": lexical(dirname, True),
        "ext": lexical(ext), "from_slash": lexical(str), "to_slash": lexical(str),
        "volume_name": lexical(lambda path: ""), "is_abs": lexical(lambda path: path.startswith("/")),
        "split": lexical(split), "split_list": split_list,
        "separator": pure(lambda: "/"), "list_separator": pure(lambda: ":"),
        "glob": glob_, "match": match_, "abs": abs_, "eval_symlinks": eval_symlinks, "rel": rel_,
    }
    module = ctx.module(members)
    @pure
    def join(parts=None):
        parts = ctx.to_python(parts) or []
        ctx.move_to_worker(sum(len(p) for p in parts if isinstance(p, str)))
        return join_list(parts, ticker(ctx.check))

    module[b"join"] = ctx.execute_file("filepath.lua", ctx.fn(join, "join"))
    return module


def lua_modules():
    """Modules this plugin provides."""
    return {"filepath": _load}
