"""SQL for Lua scripts: the `mysql`, `sqlite3` (gluasql API) and `postgres` modules.

Drivers: pymysql (MySQL/MariaDB), the standard library's sqlite3, psycopg 3 (PostgreSQL),
each imported only when a script connects. Differences from the Go original, on purpose:
- `connect` opens the connection at once, so a bad host or password is `false, err` there;
  a connection found closed before a query is reopened (as Go's pool would).
- PostgreSQL works, as `require("postgres")` and as `mysql` with a `postgres://` DSN.
- `sqlite3`'s `c:open` accepts nil or `{}` options (cache, mode, immutable, vfs, nolock are
  used; go-sqlite3-only keys such as _auth or _txlock are ignored) and `c:query` binds `?` arguments.
- Booleans from PostgreSQL are Lua booleans; DECIMAL/NUMERIC and other types stay strings.
Every connect and query is bounded by the script's deadline (and `c:set_timeout(ms)`).
"""

from __future__ import annotations

import math
import re
import time
import urllib.parse
import weakref

import msgscript

_ESCAPES = {"\r": "\\r", "\n": "\\n", "\\": "\\\\", "'": "\\'", '"': '\\"', "\032": "\\Z"}
_SQLITE_URI_KEYS = ("cache", "mode", "immutable", "vfs", "nolock")
_INT64 = range(-(2**63), 2**63)


class DbError(Exception):
    """A connection or query failure, reported to Lua as an error value."""


def _missing(package: str, module: str) -> DbError:
    return DbError(f"the {module} module needs the Python package {package!r} (pip install {package})")


# Values, placeholders, options ################################################


def lua_row(names: list[str], values) -> dict:
    """One result row: column name -> Lua value; NULL columns are left out."""
    row = {}
    for name, value in zip(names, values, strict=False):
        if value is not None:
            row[name] = lua_value(value)
    return row


def lua_value(value):
    """A column value as Lua sees it: numbers stay numbers, bytes and everything else are strings."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if value in _INT64 else float(value)
    if isinstance(value, float):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", "surrogateescape")
    return str(value)


def bind_value(value):
    """A Lua bind argument as a driver parameter."""
    if value is None or isinstance(value, (str, int, float)):
        return value
    raise DbError(f"cannot bind a value of type {type(value).__name__} (use strings, numbers, booleans or nil)")


def execute(cursor, sql: str, binds: tuple, backslash_escapes: bool) -> None:
    """Run `sql`, its `?` placeholders bound to `binds` (none: the SQL as is)."""
    if binds:
        cursor.execute(format_placeholders(sql, len(binds), backslash_escapes), [bind_value(b) for b in binds])
    else:
        cursor.execute(sql)


def format_placeholders(sql: str, count: int, backslash_escapes: bool) -> str:
    """Turn `?` placeholders (outside quotes) into `%s`, and `%` into `%%`, for a driver's format style."""
    quoted = r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"" if backslash_escapes else r"'[^']*'|\"[^\"]*\""
    found = 0

    def replace(m: re.Match) -> str:
        nonlocal found
        token = m.group()
        if token == "?":
            found += 1
            return "%s"
        return token.replace("%", "%%")

    out = re.sub(quoted + r"|`[^`]*`|\?|%", replace, sql)
    if found != count:
        raise DbError(f"the query has {found} ? placeholders but {count} bind arguments were given")
    return out


def go_duration(text: str) -> float | None:
    """Seconds in a Go duration string such as "30s" or "1m30s"; None when it is not one."""
    try:
        return msgscript.go_duration(text)
    except ValueError:
        return None


def parse_mysql_dsn(dsn: str) -> dict:
    """go-sql-driver DSN `user:pass@tcp(host:port)/db?charset=x` -> pymysql keyword arguments."""
    head, slash, tail = dsn.rpartition("/")
    if not slash:
        raise DbError(f"invalid DSN {dsn!r}: missing the slash before the database name")
    database, _, query = tail.partition("?")
    creds, at, address = head.rpartition("@")
    args: dict = {"database": urllib.parse.unquote(database) or None}
    if at:
        user, _, password = creds.partition(":")
        args.update(user=user, password=password)
    m = re.fullmatch(r"(\w*)(?:\((.*)\))?", address)
    net, addr = (m.group(1), m.group(2)) if m else ("tcp", address)  # lenient: `host:port` without tcp(...)
    if net == "unix":
        args["unix_socket"] = addr
    elif net not in ("", "tcp", "tcp4", "tcp6"):
        raise DbError(f"invalid DSN {dsn!r}: unknown network {net!r}")
    else:
        host, _, port = (addr or "").rpartition(":") if ":" in (addr or "") else (addr, "", "")
        args.update(host=(host or "").strip("[]") or "127.0.0.1", port=int(port or 3306))
    for key, values in urllib.parse.parse_qs(query).items():
        _dsn_param(args, key, values[-1])
    return args


def _dsn_param(args: dict, key: str, value: str) -> None:
    if key == "charset":
        args["charset"] = value.split(",")[0]
    elif key in ("timeout", "readTimeout", "writeTimeout"):
        seconds = go_duration(value)
        if seconds is None:
            raise DbError(f"invalid DSN parameter {key}={value!r}: not a duration")
        args[{"timeout": "connect_cap", "readTimeout": "read_cap", "writeTimeout": "write_cap"}[key]] = seconds


def options_table(ctx, value) -> dict:
    """A connect options table as a dict, or the original's error for anything else."""
    options = ctx.to_python(value) if _is_table(value) else None
    if not options or not isinstance(options, dict):
        raise ValueError("options or connection string excepted")
    return options


def _is_table(value) -> bool:
    return type(value).__name__ == "_LuaTable"


def _error_text(exc: BaseException) -> str:
    args = getattr(exc, "args", ())
    if len(args) == 2 and isinstance(args[0], int):  # pymysql: (code, message)
        return f"Error {args[0]}: {args[1]}"
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# Backends: one open connection each ##########################################


class Backend:
    """A driver connection: `query(sql, binds, timeout)` -> rows, `close()`."""

    def query(self, sql: str, binds: list, timeout: float) -> list[dict]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        return False

    @staticmethod
    def rows(cursor) -> list[dict]:
        if cursor.description is None:
            return []
        names = [d[0] for d in cursor.description]
        return [lua_row(names, r) for r in cursor.fetchall()]


class MysqlBackend(Backend):
    """pymysql; numbers come back as numbers, other columns as the server's text."""

    def __init__(self, args: dict, timeout: float):
        try:
            import pymysql
            from pymysql.constants import FIELD_TYPE
        except ImportError:
            raise _missing("pymysql", "mysql") from None
        self.caps = {k: args.pop(k) for k in ("connect_cap", "read_cap", "write_cap") if k in args}
        numbers = {t: int for t in (FIELD_TYPE.TINY, FIELD_TYPE.SHORT, FIELD_TYPE.LONG, FIELD_TYPE.INT24,
                                    FIELD_TYPE.LONGLONG, FIELD_TYPE.YEAR)}
        numbers.update({FIELD_TYPE.FLOAT: float, FIELD_TYPE.DOUBLE: float})
        conv = {**pymysql.converters.encoders, **numbers}
        args.setdefault("charset", "utf8mb4")
        self.conn = pymysql.connect(**args, conv=conv, autocommit=True,
                                    connect_timeout=min(timeout, self.caps.get("connect_cap", timeout)))

    def query(self, sql, binds, timeout):
        # pymysql re-reads these before every socket read/write, so they bound this query only.
        self.conn._read_timeout = min(timeout, self.caps.get("read_cap", timeout))
        self.conn._write_timeout = min(timeout, self.caps.get("write_cap", timeout))
        with self.conn.cursor() as cursor:
            execute(cursor, sql, binds, backslash_escapes=True)
            return self.rows(cursor)

    def close(self):
        self.conn.close()

    @property
    def closed(self):
        return not self.conn.open


class PostgresBackend(Backend):
    """psycopg 3; numbers and booleans are converted, every other type stays PostgreSQL's text."""

    _context = None

    def __init__(self, conninfo: str, params: dict, timeout: float):
        try:
            import psycopg
        except ImportError:
            raise _missing("psycopg[binary]", "postgres") from None
        # libpq counts connect_timeout in whole seconds, at least 2.
        params.setdefault("connect_timeout", max(2, math.ceil(timeout)))
        self.conn = psycopg.connect(conninfo, autocommit=True, context=self._text_context(psycopg), **params)

    @classmethod
    def _text_context(cls, psycopg):
        """Adapters that load every type as text except integers, floats, booleans and bytea."""
        if cls._context is None:
            from psycopg.adapt import AdaptersMap
            from psycopg.types.string import TextLoader

            keep = {"int2", "int4", "int8", "oid", "float4", "float8", "bool", "bytea"}
            context = AdaptersMap(psycopg.adapters)
            for info in psycopg.adapters.types:
                if info.name not in keep:
                    context.register_loader(info.oid, TextLoader)
                if getattr(info, "array_oid", 0):
                    context.register_loader(info.array_oid, TextLoader)
            cls._context = context
        return cls._context

    def query(self, sql, binds, timeout):
        with self.conn.cursor() as cursor:
            # A server-side limit: the statement is cancelled when the script's time is up.
            cursor.execute(f"SET statement_timeout = {max(1, int(timeout * 1000))}")
            execute(cursor, sql, binds, backslash_escapes=False)
            return self.rows(cursor)

    def close(self):
        self.conn.close()

    @property
    def closed(self):
        return self.conn.closed


class SqliteBackend(Backend):
    """The standard library's sqlite3 in autocommit mode; a progress handler enforces the deadline."""

    def __init__(self, path: str, options: dict, timeout: float):
        import sqlite3

        query = urllib.parse.urlencode({k: _sqlite_option(v) for k, v in options.items() if k in _SQLITE_URI_KEYS})
        uri = "file:" + urllib.parse.quote(path, safe="/:") + ("?" + query if query else "")
        self.conn = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None, check_same_thread=False)

    def query(self, sql, binds, timeout):
        deadline = time.monotonic() + timeout
        self.conn.set_progress_handler(lambda: time.monotonic() > deadline, 1000)
        self.conn.execute(f"PRAGMA busy_timeout = {max(1, int(timeout * 1000))}")
        cursor = self.conn.execute(sql, [bind_value(b) for b in binds])
        try:
            return self.rows(cursor)
        finally:
            cursor.close()

    def close(self):
        self.conn.close()


def _sqlite_option(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


# The client object scripts hold ###############################################


class Client:
    """What `mysql.new()` & co. return: at most one connection, opened by connect/open."""

    def __init__(self, ctx, opener):
        self.ctx = ctx
        self.opener = opener  # timeout -> Backend, kept to reopen a connection found closed
        self.backend: Backend | None = None
        self.timeout_ms: float | None = None
        weakref.finalize(self, _close_quietly, self.__dict__)

    def timeout(self) -> float:
        cap = self.timeout_ms / 1000 if self.timeout_ms else None
        return self.ctx.remaining(cap)

    def connect(self, opener):
        """Open a connection (closing the previous one): true, or false, err."""
        self.close()
        self.opener = opener
        try:
            self.backend = opener(self.timeout())
        except Exception as e:  # noqa: BLE001 - any driver, socket or DSN error is `false, err`
            return False, _error_text(e)
        return True

    def query(self, sql, binds):
        """Rows, or nil, err; nothing at all when not connected (as the original)."""
        if not isinstance(sql, str) or not sql:
            raise ValueError("query: SQL string expected")
        if self.backend is None:
            return ()
        try:
            if self.backend.closed:
                self.backend = self.opener(self.timeout())
            return self.backend.query(sql, list(binds), self.timeout())
        except Exception as e:  # noqa: BLE001 - driver, binding and timeout errors are all `nil, err`
            return None, _error_text(e)

    def close(self):
        """Close the connection: true, or false, err."""
        backend, self.backend = self.backend, None
        if backend is not None:
            try:
                backend.close()
            except Exception as e:  # noqa: BLE001 - reported to the script
                return False, _error_text(e)
        return True

    def lua_methods(self, extra: dict) -> dict:
        """The methods of the Lua client object (each takes the object itself first)."""
        return {
            "set_timeout": lambda _self, ms=None: setattr(self, "timeout_ms", float(ms) if ms else None),
            "query": lambda _self, sql=None, *binds: self.query(sql, binds),
            "close": lambda _self=None: self.close(),
            **extra,
        }


def _close_quietly(state: dict) -> None:
    backend = state.get("backend")
    if backend is not None:
        try:
            backend.close()
        except Exception:  # noqa: BLE001, S110 - best effort when a forgotten client is collected
            pass


def _keepalive(client: Client):
    def set_keepalive(_self, max_lifetime_ms=None, max_idle=None):
        """No pool to tune: true (plus the original's "connect required" when not connected)."""
        return True if client.backend else (True, "connect required")

    return set_keepalive


# Openers: connection arguments -> a function that opens a Backend #############


def mysql_opener(ctx, arg):
    """What `mysql`'s connect accepts: a go-sql-driver DSN, `postgres://...`, or an options table."""
    if isinstance(arg, str) and arg:
        driver, sep, rest = arg.partition("://")
        if not sep:
            driver, rest = "mysql", arg
        if driver in ("postgres", "postgresql"):
            return postgres_opener(ctx, arg if not re.match(r"\s*\w+\s*=", rest) else rest)
        if driver != "mysql":
            raise DbError(f'sql: unknown driver "{driver}" (use mysql or postgres)')
        return _mysql_from_dsn(rest)
    options = options_table(ctx, arg)
    args = {"host": str(options.get("host") or "127.0.0.1"), "port": int(options.get("port") or 3306),
            "user": options.get("user"), "password": options.get("password") or "",
            "database": options.get("database")}
    if options.get("charset"):
        args["charset"] = str(options["charset"])
    return lambda timeout: MysqlBackend(dict(args), timeout)


def _mysql_from_dsn(dsn: str):
    args = parse_mysql_dsn(dsn)  # raises DbError early for a malformed DSN
    return lambda timeout: MysqlBackend(dict(args), timeout)


def postgres_opener(ctx, arg):
    """A `postgres://` URL, a libpq `key=value` string, or {host, port, database, user, password}."""
    if isinstance(arg, str) and arg:
        return lambda timeout: PostgresBackend(arg, {}, timeout)
    options = options_table(ctx, arg)
    params = {"host": str(options.get("host") or "127.0.0.1"), "port": int(options.get("port") or 5432)}
    for key, name in (("database", "dbname"), ("dbname", "dbname"), ("user", "user"), ("password", "password"),
                      ("sslmode", "sslmode")):
        if options.get(key) not in (None, ""):
            params[name] = str(options[key])
    return lambda timeout: PostgresBackend("", dict(params), timeout)


def _connector(ctx, client: Client, make_opener):
    def connect(_self, arg=None):
        """Connect with a DSN or an options table: true, or false, err."""
        try:
            opener = make_opener(ctx, arg)
        except DbError as e:
            return False, str(e)
        return client.connect(opener)

    return connect


# Modules ######################################################################


def escape(text) -> str:
    """`mysql.escape`: backslash-escape \\r \\n \\\\ ' " and \\032."""
    return "".join(_ESCAPES.get(c, c) for c in str(text))


def _server_module(make_opener, with_escape: bool):
    def loader(ctx):
        def new():
            """A new client object (not connected)."""
            client = Client(ctx, None)
            return ctx.module(client.lua_methods({
                "connect": _connector(ctx, client, make_opener),
                "set_keepalive": _keepalive(client),
            }))

        members = {"new": new, "_DEBUG": False, "_VERSION": "0.0.0"}
        if with_escape:
            members["escape"] = escape
        return members

    return loader


def _sqlite_loader(ctx):
    def new():
        """A new sqlite3 client object (not open)."""
        client = Client(ctx, None)

        def open_(_self, path=None, options=None):
            if not isinstance(path, str) or not path:
                raise ValueError("open: a database path is required")
            opts = ctx.to_python(options) if _is_table(options) else {}
            if not isinstance(opts, dict):
                raise ValueError("options excepted")
            return client.connect(lambda timeout: SqliteBackend(path, opts, timeout))

        return ctx.module(client.lua_methods({"open": open_}))

    return {"new": new, "_DEBUG": False, "_VERSION": "0.0.0"}


def lua_modules() -> dict:
    """Register `mysql`, `postgres` and `sqlite3`."""
    return {
        "mysql": _server_module(mysql_opener, with_escape=True),
        "postgres": _server_module(postgres_opener, with_escape=False),
        "sqlite3": _sqlite_loader,
    }
