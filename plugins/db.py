"""SQL for Lua scripts: the `mysql`, `sqlite3` (gluasql API) and `postgres` modules.

Drivers: pymysql (MySQL/MariaDB), the standard library's sqlite3, psycopg 3 (PostgreSQL),
each imported only when a script connects. Differences from the Go original, on purpose:
- `connect` opens the connection at once, so a bad host or password is `false, err` there;
  a connection found closed before a query is reopened (as Go's pool would).
- PostgreSQL works, as `require("postgres")` and as `mysql` with a `postgres://` DSN.
- `sqlite3`'s `c:open` accepts nil or `{}` options (cache, mode, immutable, vfs, nolock are
  used; go-sqlite3-only keys such as _auth or _txlock are ignored) and `c:query` binds `?` arguments.
- Booleans from PostgreSQL are Lua booleans; DECIMAL/NUMERIC and other types stay strings.
Every connect and query is bounded by the script's deadline (and `c:set_timeout(ms)`): it runs on the
scheduler's executor for blocking work (a connect's DNS lookup cannot be given a timeout), waited for
until then, and the driver's own timeouts end it there too. Rows are fetched in batches (streamed on
PostgreSQL for one SELECT, WITH, VALUES, TABLE or SHOW statement) and counted as they come: a result
larger than what the script's memory cap leaves is an error. (libpq holds the whole result of other
PostgreSQL statements, e.g. INSERT ... RETURNING or several statements in one query, before it is
counted.) A relative sqlite3 path is in the call's working directory.
"""

from __future__ import annotations

import math
import os
import re
import time
import urllib.parse
import weakref

import msgscript
from msgscript import (ArgError, LuaError, check_string, is_table, lua_type, open_file, opt_number, pure,
                       translated)


_ESCAPES = {"\r": "\\r", "\n": "\\n", "\\": "\\\\", "'": "\\'", '"': '\\"', "\032": "\\Z"}
_ESCAPE_TABLE = str.maketrans(_ESCAPES)
_SQLITE_URI_KEYS = ("cache", "mode", "immutable", "vfs", "nolock")
_ROW_QUERY = re.compile(r"\s*\(*\s*(select|with|values|table|show)\b", re.I)  # streamed on PostgreSQL
_INT64 = range(-(2**63), 2**63)
_GRACE = 0.5  # how long past its timeout a driver call is waited for (the driver's own error comes first)


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
    raise DbError(f"cannot bind a {lua_type(value)} value (use strings, numbers, booleans or nil)")


def prepare(sql: str, binds: tuple, backslash_escapes: bool, deadline: float = math.inf) -> tuple[str, list | None]:
    """(sql, parameters) for a format-style driver: `?` placeholders bound to `binds` (none: the SQL as is)."""
    if binds:
        return format_placeholders(sql, len(binds), backslash_escapes, deadline), [bind_value(b) for b in binds]
    return sql, None


def execute(cursor, sql: str, binds: tuple, backslash_escapes: bool, deadline: float = math.inf) -> None:
    """Run `sql` with its `?` placeholders bound to `binds`."""
    query, params = prepare(sql, binds, backslash_escapes, deadline)
    cursor.execute(query) if params is None else cursor.execute(query, params)


class ResultTooLarge(DbError):
    def __init__(self, limit: int):
        super().__init__(f"query result larger than the script's memory limit allows ({limit} bytes)")


def _text_size(value) -> int:
    """Bytes a column value takes as a Lua string (its UTF-8 length), 0 for numbers and booleans."""
    if not isinstance(value, str):
        return 0
    return (len(value) if value.isascii() else len(value.encode("utf-8", "surrogateescape"))) + 32


class QueryTimedOut(DbError):
    def __init__(self):
        super().__init__("script timed out")


ABANDONED = (ResultTooLarge, QueryTimedOut)  # a result given up on: the rest is not read


class Rows:
    """Result rows for Lua, collected up to `limit` bytes (about what they take as Lua tables) until
    `deadline` (rows that keep coming are read here, where no socket timeout fires)."""

    def __init__(self, limit: int, timeout: float):
        self.limit, self.size, self.rows = limit, 64, []
        self.deadline = time.monotonic() + timeout

    def add(self, names: list[str], values) -> None:
        row = lua_row(names, values)
        self.size += 64 + sum(40 + len(k) + _text_size(v) for k, v in row.items())
        if self.size > self.limit:
            raise ResultTooLarge(self.limit)
        if not len(self.rows) % 256 and time.monotonic() > self.deadline:
            raise QueryTimedOut()
        self.rows.append(row)

    def read(self, cursor) -> list[dict]:
        """Every row of the cursor's result ({} for a statement without one)."""
        if cursor.description is None:
            return []
        names = [d[0] for d in cursor.description]
        while batch := cursor.fetchmany(256):
            for values in batch:
                self.add(names, values)
        return self.rows


def format_placeholders(sql: str, count: int, backslash_escapes: bool, deadline: float = math.inf) -> str:
    """Turn `?` placeholders (outside quotes) into `%s`, and `%` into `%%`, for a driver's format style
    (DbError past `deadline`: this runs on the executor for blocking work, which nothing else stops)."""
    quoted = r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"" if backslash_escapes else r"'[^']*'|\"[^\"]*\""
    found = steps = 0

    def replace(m: re.Match) -> str:
        nonlocal found, steps
        steps += 1
        if not steps % 4096 and time.monotonic() > deadline:
            raise DbError("timed out while preparing the query")
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
    """A connect options table as a dict, or the original's error (raised) for anything else."""
    options = ctx.to_python(value) if is_table(value) else None
    if not options or not isinstance(options, dict):
        raise LuaError("options or connection string excepted")
    return options


def _port(value, default: int) -> int:
    try:
        return int(value or default)
    except (TypeError, ValueError):
        raise DbError(f"invalid port {value}") from None


def _error_text(exc: BaseException) -> str:
    """A driver error on one line: "Error 1146: Table 'test.x' doesn't exist", libpq's or SQLite's text."""
    args = getattr(exc, "args", ())
    if len(args) == 2 and isinstance(args[0], int):  # pymysql: (code, message)
        text = f"Error {args[0]}: {args[1]}"
    else:
        text = msgscript.error_text(exc) if isinstance(exc, OSError) else str(exc).strip()
    text = re.sub(r"\[Errno -?\d+\] ", "", text)  # socket errors inside driver messages
    return text.splitlines()[0] if text else "database error"


# Backends: one open connection each ##########################################


class Backend:
    """A driver connection: `query(sql, binds, timeout, limit)` -> rows (at most `limit` bytes), `close()`."""

    def query(self, sql: str, binds: list, timeout: float, limit: int) -> list[dict]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        return False


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

    def query(self, sql, binds, timeout, limit):
        import pymysql

        # pymysql re-reads these before every socket read/write, so they bound this query only.
        self.conn._read_timeout = min(timeout, self.caps.get("read_cap", timeout))
        self.conn._write_timeout = min(timeout, self.caps.get("write_cap", timeout))
        with self.conn.cursor(pymysql.cursors.SSCursor) as cursor:  # unbuffered: rows are counted as they come
            execute(cursor, sql, binds, backslash_escapes=True, deadline=time.monotonic() + timeout)
            try:
                return Rows(limit, timeout).read(cursor)
            except ABANDONED:
                # Dropping the connection is quicker than reading the rest of the result, which closing
                # the cursor (or collecting the result) would do; the next query reconnects.
                if cursor._result is not None:
                    cursor._result.unbuffered_active = False
                cursor.connection = None
                self.conn.close()
                raise

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

    def query(self, sql, binds, timeout, limit):
        with self.conn.cursor() as cursor:
            # A server-side limit: the statement is cancelled when the script's time is up.
            cursor.execute(f"SET statement_timeout = {max(1, int(timeout * 1000))}")
            if not _ROW_QUERY.match(sql) or ";" in sql.strip().rstrip(";"):
                execute(cursor, sql, binds, backslash_escapes=False, deadline=time.monotonic() + timeout)
                return Rows(limit, timeout).read(cursor)
            # One query that returns rows: streamed, so a huge result is never held in memory.
            query, params = prepare(sql, binds, backslash_escapes=False, deadline=time.monotonic() + timeout)
            rows, stream = Rows(limit, timeout), cursor.stream(query, params)
            try:
                for values in stream:
                    rows.add([d.name for d in cursor.description], values)
            except ABANDONED as e:
                self.conn.cancel()  # else closing the stream reads the rest of the result
                if isinstance(e, QueryTimedOut):  # the call is over: what has arrived is not read either
                    self.conn.close()
                try:
                    stream.close()
                except Exception:  # noqa: BLE001, S110 - the cancelled query's error
                    pass
                raise
            return rows.rows

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

    def query(self, sql, binds, timeout, limit):
        deadline = time.monotonic() + timeout
        self.conn.set_progress_handler(lambda: time.monotonic() > deadline, 1000)
        self.conn.execute(f"PRAGMA busy_timeout = {max(1, int(timeout * 1000))}")
        cursor = self.conn.execute(sql, [bind_value(b) for b in binds])
        try:
            return Rows(limit, timeout).read(cursor)
        finally:
            cursor.close()

    def close(self):
        self.conn.close()


def _regular_or_missing(path: str) -> None:
    """OSError unless `path` is missing, ":memory:" or a file msgscript.open_file opens (no FIFO or device,
    whose reads could block the driver for ever)."""
    if path != ":memory:" and os.path.lexists(path):
        os.close(open_file(path))


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

    def blocking(self, func, *args):
        """`func(timeout, *args)` on the executor for blocking work, waited for until the timeout (plus
        a grace for the driver's own error): LuaError("script timed out") past the script's deadline."""
        timeout = self.timeout()
        try:
            return self.ctx.blocking(func, timeout, *args, cap=timeout + _GRACE)
        except LuaError as e:
            if str(e) == "timed out":  # c:set_timeout's limit, before the script's deadline
                raise DbError(f"timed out after {timeout:g}s") from None
            raise

    def connect(self, opener):
        """Open a connection (closing the previous one): true, or false, err."""
        self.close()
        self.opener = opener
        try:
            self.backend = self.blocking(opener)
        except LuaError:
            raise
        except Exception as e:  # noqa: BLE001 - any driver, socket or DSN error is `false, err`
            return False, _error_text(e)
        return True

    def query(self, sql, binds):
        """Rows, or nil, err; nothing at all when not connected (as the original)."""
        sql = check_string(sql, 1)
        if not sql:
            raise ArgError(1, "SQL string expected, got an empty string")
        if self.backend is None:
            return ()
        limit = self.ctx.max_bytes()
        try:
            if self.backend.closed:
                self.backend = self.blocking(self.opener)
            backend = self.backend
            return self.blocking(lambda timeout: backend.query(sql, list(binds), timeout, limit))
        except LuaError:
            raise
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
            "set_timeout": lambda _self, ms=None: setattr(self, "timeout_ms", opt_number(ms, 1) or None),
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
    args = {"host": str(options.get("host") or "127.0.0.1"), "port": _port(options.get("port"), 3306),
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
    params = {"host": str(options.get("host") or "127.0.0.1"), "port": _port(options.get("port"), 5432)}
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


@pure
def escape(text=None) -> str:
    """`mysql.escape`: backslash-escape \\r \\n \\\\ ' " and \\032."""
    return check_string(text, 1).translate(_ESCAPE_TABLE)


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
            @pure
            def escape_(text=None):
                text = check_string(text, 1)
                ctx.move_to_worker(len(text))
                ctx.fits(4 * len(text), "mysql.escape's result")
                return translated(text, _ESCAPE_TABLE, ctx.check)

            members["escape"] = escape_
        return members

    return loader


def _sqlite_loader(ctx):
    def new():
        """A new sqlite3 client object (not open)."""
        client = Client(ctx, None)

        def open_(_self, path=None, options=None):
            path = check_string(path, 1)
            if not path:
                raise ArgError(1, "a database path is required")
            opts = ctx.to_python(options) if is_table(options) else {}
            if not isinstance(opts, dict):
                raise ArgError(2, "options excepted")
            where = path if path == ":memory:" else ctx.path(path)
            try:
                _regular_or_missing(where)
            except OSError as e:
                return False, msgscript.error_text(e)
            return client.connect(lambda timeout: SqliteBackend(where, opts, timeout))

        return ctx.module(client.lua_methods({"open": open_}))

    return {"new": new, "_DEBUG": False, "_VERSION": "0.0.0"}


def lua_modules() -> dict:
    """Register `mysql`, `postgres` and `sqlite3`."""
    return {
        "mysql": _server_module(mysql_opener, with_escape=True),
        "postgres": _server_module(postgres_opener, with_escape=False),
        "sqlite3": _sqlite_loader,
    }
