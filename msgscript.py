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
import concurrent.futures
import dataclasses
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
from typing import Any, Callable

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
    """Error text without Lua's stack traceback."""
    return str(text).split("\nstack traceback:")[0].strip()


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
local base = {}
for k, v in pairs(_G) do base[k] = v end
local meta = {__index = base}
local function hook()
  if expired() then sethook(hook, "", 1); error("script timed out", 0) end
end
local function run(main, fname, ...)
  local env = setmetatable({}, meta)
  env._G = env
  setupvalue(main, 1, env)
  sethook(hook, "", 10000)
  main()
  local f = env[fname]
  if f == nil then return false end
  return true, f(...)
end
local function compile(source, chunkname)
  return load(source, chunkname, "t", base)
end
local function finish() sethook() end
return run, compile, finish
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
        self._run, compile_, self._finish = self.lua.execute(
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

    def call(self, fname: str, deadline: float, *args) -> tuple:
        """Run the script's chunk in fresh globals, then call `fname(*args)`."""
        self.ctx.deadline = deadline
        try:
            out = self._run(self.main, fname.encode(), *args)
        finally:
            self._finish()
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
