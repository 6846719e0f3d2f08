"""`filepath`: Go's path/filepath (Unix flavour) as gopher-lua-libs v0.5.0 exposes it."""

import os
import re

from msgscript import check_string, pure

class BadPattern(ValueError):
    """Go's filepath.ErrBadPattern."""

    def __init__(self):
        super().__init__("syntax error in pattern")


# Lexical functions on str #####################################################

def clean(path: str) -> str:
    """Go filepath.Clean: the shortest lexically equivalent path."""
    if path == "":
        return "."
    rooted = path.startswith("/")
    out = []
    for part in path.split("/"):
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


def dirname(path: str) -> str:
    """Go filepath.Dir: all but the last element, cleaned."""
    return clean(path[:path.rfind("/") + 1])


def ext(path: str) -> str:
    """Go filepath.Ext: the extension of the last element, with its dot."""
    i = len(path) - 1
    while i >= 0 and path[i] != "/":
        if path[i] == ".":
            return path[i:]
        i -= 1
    return ""


def split(path: str) -> tuple[str, str]:
    """Go filepath.Split: (dir, file), dir keeping its trailing slash."""
    i = path.rfind("/") + 1
    return path[:i], path[i:]


def join_list(parts) -> str:
    """Go filepath.Join: empty elements are ignored; "" if all are empty."""
    for i, part in enumerate(parts):
        if part:
            return clean("/".join(parts[i:]))
    return ""


def rel(basepath: str, targpath: str):
    """Go filepath.Rel (purely lexical); err as a 2nd value when impossible."""
    base, targ = clean(basepath), clean(targpath)
    if base == targ:
        return "."
    failure = "", f"Rel: can't make {targpath} relative to {basepath}"
    if base.startswith("/") != targ.startswith("/"):
        return failure
    base_parts = [] if base in (".", "/") else base.strip("/").split("/")
    targ_parts = [] if targ in (".", "/") else targ.strip("/").split("/")
    common = 0
    while common < min(len(base_parts), len(targ_parts)) and base_parts[common] == targ_parts[common]:
        common += 1
    if ".." in base_parts[common:common + 1]:
        return failure
    return "/".join([".."] * (len(base_parts) - common) + targ_parts[common:])


# Patterns #####################################################################

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
    """Translate a Go character class starting after '['; returns (regex, next index)."""
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
            ranges.append(re.escape(lo) + "-" + re.escape(hi))
    if not ranges:
        return ("[\\s\\S]" if negated else "(?!)"), i
    return "[" + ("^" if negated else "") + "".join(ranges) + "]", i


def _pattern_regex(pattern):
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\":
            i += 1
            if i >= len(pattern):
                raise BadPattern()
            out.append(re.escape(pattern[i]))
        elif c == "[":
            regex, i = _class_regex(pattern, i + 1)
            out.append(regex)
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z", re.S)


def _has_meta(path):
    return any(c in path for c in "*?[\\")


def _glob_dir(directory, pattern, matches):
    if not os.path.isdir(directory):
        return
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return  # Go ignores I/O errors while globbing
    regex = _pattern_regex(pattern)
    matches.extend(join_list([directory, n]) for n in names if regex.match(n))


def glob(pattern: str, depth: int = 0) -> list[str]:
    """Go filepath.Glob: the sorted matches; raises BadPattern."""
    _pattern_regex(pattern)
    if not _has_meta(pattern):
        return [pattern] if os.path.lexists(pattern) else []
    directory, file = split(pattern)
    directory = "." if directory == "" else directory if directory == "/" else directory[:-1]
    if not _has_meta(directory):
        matches = []
        _glob_dir(directory, file, matches)
        return matches
    if directory == pattern or depth > 10000:
        raise BadPattern()
    matches = []
    for d in glob(directory, depth + 1):
        _glob_dir(d, file, matches)
    return matches


# The Lua module ###############################################################

def _lexical(func):
    """A Lua function of one path string."""
    return pure(lambda path=None: func(check_string(path, 1)))


@pure
def _match(pattern=None, name=None):
    """Go filepath.Match: bool, plus err for a malformed pattern."""
    pattern, name = check_string(pattern, 1), check_string(name, 2)
    try:
        return _pattern_regex(pattern).match(name) is not None
    except BadPattern as e:
        return False, str(e)


def _glob(pattern=None):
    """Go filepath.Glob: sorted matches ({} if none), or nil, err for a bad pattern."""
    try:
        return glob(check_string(pattern, 1))
    except BadPattern as e:
        return None, str(e)


def _abs(path=None):
    """Go filepath.Abs: the path made absolute and cleaned; err as a 2nd value on failure."""
    path = check_string(path, 1)
    if path.startswith("/"):
        return clean(path)
    try:
        return join_list([os.getcwd(), path])
    except OSError as e:
        return "", f"getwd: {e.strerror}"


def _eval_symlinks(path=None):
    """Go filepath.EvalSymlinks; a relative path stays relative when it resolves inside the cwd."""
    path = check_string(path, 1)
    try:
        resolved = os.path.realpath(path, strict=True)
    except OSError as e:
        return "", f"lstat {e.filename or path}: {(e.strerror or str(e)).lower()}"
    if not path.startswith("/"):
        cwd = os.path.realpath(os.getcwd())
        if resolved == cwd or resolved.startswith(cwd.rstrip("/") + "/"):
            return clean(os.path.relpath(resolved, cwd))
    return resolved


@pure
def _rel(basepath=None, targpath=None):
    return rel(check_string(basepath, 1), check_string(targpath, 2))


def _load(ctx):
    members = {
        "basename": _lexical(basename), "clean": _lexical(clean), "dir": _lexical(dirname),
        "ext": _lexical(ext), "from_slash": _lexical(str), "to_slash": _lexical(str),
        "volume_name": _lexical(lambda path: ""), "is_abs": _lexical(lambda path: path.startswith("/")),
        "split": _lexical(split), "split_list": _lexical(lambda path: path.split(":") if path else []),
        "separator": pure(lambda: "/"), "list_separator": pure(lambda: ":"),
        "glob": _glob, "match": _match, "abs": _abs, "eval_symlinks": _eval_symlinks, "rel": _rel,
    }
    module = ctx.module(members)
    join = pure(lambda parts=None: join_list(ctx.to_python(parts) or []))
    module[b"join"] = ctx.execute_file("filepath.lua", ctx.fn(join, "join"))
    return module


def lua_modules():
    """Modules this plugin provides."""
    return {"filepath": _load}
