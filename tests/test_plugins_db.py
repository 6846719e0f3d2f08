"""The `db` plugin: mysql, postgres and sqlite3 modules against real servers and a real file."""

import socket
import time
import uuid

import pytest

from conftest import run_lua

MARIADB = ("127.0.0.1", 3306)
POSTGRES = ("127.0.0.1", 5432)
MYSQL_DSN = "root@tcp(127.0.0.1:3306)/test"
PG_URL = "postgres://postgres@127.0.0.1:5432/test"


def lua(src, *args, timeout=5):
    """Run `OnMessage(*args)` with the bundled plugins; values as Python (bytes -> str)."""
    return run_lua(src, *[a.encode() for a in args], timeout=timeout, python=True)


def listening(addr) -> bool:
    try:
        socket.create_connection(addr, timeout=1).close()
        return True
    except OSError:
        return False


needs_mariadb = pytest.mark.skipif(not listening(MARIADB), reason="no MariaDB/MySQL server on 127.0.0.1:3306")
needs_postgres = pytest.mark.skipif(not listening(POSTGRES), reason="no PostgreSQL server on 127.0.0.1:5432")


@pytest.fixture
def table():
    """A unique table name; the table is dropped afterwards on both servers."""
    name = f"msgscript_t_{uuid.uuid4().hex[:10]}"
    yield name
    if listening(MARIADB):
        import pymysql

        with pymysql.connect(host="127.0.0.1", user="root", database="test", autocommit=True) as conn:
            conn.cursor().execute(f"DROP TABLE IF EXISTS {name}")
    if listening(POSTGRES):
        import psycopg

        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {name}")


# One script exercises a whole client; `module`, `connect_arg` and the SQL dialect vary.
ROUND_TRIP = """
local db = require(MODULE)
function OnMessage(_, target)
  local c = db.new()
  assert(c:connect(target))
  assert(c:query("CREATE TABLE TBL (id INTEGER, name VARCHAR(20), score FLOAT, note VARCHAR(20))"))
  local none = c:query("INSERT INTO TBL (id, name, score, note) VALUES (?, ?, ?, ?)", 1, "ann", 2.5, "hi")
  c:query("INSERT INTO TBL (id, name, score) VALUES (?, ?, ?)", 2, "bob's", 10)
  local rows, err = c:query("SELECT id, name, score, note FROM TBL WHERE id >= ? ORDER BY id", 1)
  local closed = c:close()
  return rows, err, type(none) == "table" and next(none) == nil, closed
end
"""


def round_trip(module, target, table_name):
    src = ROUND_TRIP.replace("MODULE", f'"{module}"').replace("TBL", table_name)
    return lua(src, "", target)


def assert_rows(rows):
    assert rows == [
        {"id": 1, "name": "ann", "score": 2.5, "note": "hi"},
        {"id": 2, "name": "bob's", "score": 10},  # NULL note: the key is absent
    ]


@needs_mariadb
def test_mysql_rows_are_keyed_by_column_with_binds_and_nulls_absent(table):
    rows, err, inserted, closed = round_trip("mysql", MYSQL_DSN, table)  # inserted: {} for no rows
    assert_rows(rows)
    assert err is None and inserted is True and closed is True


@needs_mariadb
def test_mysql_connect_with_an_options_table_and_types():
    src = """
    local mysql = require("mysql")
    function OnMessage()
      local c = mysql.new()
      c:set_timeout(2000)
      local ok = c:connect({host = "127.0.0.1", port = 3306, user = "root", database = "test"})
      local rows = c:query("SELECT 42 AS n, 1.5e0 AS f, 'x' AS s, CAST('2022-11-01 12:00:00' AS DATETIME) AS d")
      local kept = c:set_keepalive(1000, 2)
      c:close()
      return ok, rows, kept, type(rows[1].n), type(rows[1].d)
    end
    """
    ok, rows, kept, n_type, d_type = lua(src)
    assert ok is True and kept is True
    assert rows == [{"n": 42, "f": 1.5, "s": "x", "d": "2022-11-01 12:00:00"}]
    assert (n_type, d_type) == ("number", "string")


@needs_mariadb
def test_mysql_errors_connect_false_err_and_query_nil_err():
    src = """
    local mysql = require("mysql")
    function OnMessage()
      local bad = mysql.new()
      local ok, connect_err = bad:connect("root@tcp(127.0.0.1:1)/test")
      local c = mysql.new()
      c:connect("root@tcp(127.0.0.1:3306)/test")
      local rows, query_err = c:query("SELECT * FROM no_such_table_here")
      c:close()
      return ok, connect_err, rows, query_err, select("#", c:query("SELECT 1"))
    end
    """
    ok, connect_err, rows, query_err, after_close = lua(src)
    assert ok is False and "connect" in connect_err.lower()
    assert rows is None and "no_such_table_here" in query_err
    assert after_close == 0  # not connected: query returns nothing, as the original


@needs_mariadb
def test_mysql_escape_and_bad_arguments():
    src = """
    local mysql = require("mysql")
    function OnMessage()
      local escaped = mysql.escape("it's \\"q\\"\\n\\\\")
      local raised = pcall(mysql.new().connect, mysql.new(), {})
      return escaped, raised
    end
    """
    assert lua(src) == ["it\\'s \\\"q\\\"\\n\\\\", False]


@needs_postgres
def test_postgres_rows_are_keyed_by_column_with_binds_and_nulls_absent(table):
    rows, err, inserted, closed = round_trip("postgres", PG_URL, table)
    assert_rows(rows)
    assert err is None and inserted is True and closed is True


@needs_postgres
def test_mysql_module_accepts_a_postgres_dsn(table):
    rows, err, _, _ = round_trip("mysql", PG_URL, table)
    assert_rows(rows)


@needs_postgres
def test_postgres_options_table_types_and_errors():
    src = """
    local pg = require("postgres")
    function OnMessage()
      local c = pg.new()
      local ok = c:connect({host = "127.0.0.1", port = 5432, user = "root", database = "test"})
      local rows = c:query("SELECT current_user AS u, true AS yes, 7::bigint AS n, 1.25::numeric AS d, NULL AS gone")
      local none, err = c:query("SELECT * FROM no_such_table_here")
      c:close()
      local bad = pg.new()
      local bad_ok, bad_err = bad:connect("postgres://postgres@127.0.0.1:1/test")
      return ok, rows, none, err, bad_ok, bad_err
    end
    """
    ok, rows, none, err, bad_ok, bad_err = lua(src)
    assert ok is True
    assert rows == [{"u": "root", "yes": True, "n": 7, "d": "1.25"}]
    assert none is None and "no_such_table_here" in err
    assert bad_ok is False and bad_err


@needs_postgres
def test_postgres_query_is_bounded_by_the_script_deadline():
    src = """
    local pg = require("postgres")
    function OnMessage()
      local c = pg.new()
      c:connect("postgres://postgres@127.0.0.1:5432/test")
      local rows, err = c:query("SELECT pg_sleep(10)")
      c:close()
      return rows, err
    end
    """
    start = time.monotonic()
    rows, err = lua(src, timeout=1)
    assert rows is None and "timeout" in err
    assert time.monotonic() - start < 3


@needs_mariadb
def test_mysql_set_timeout_bounds_a_query():
    src = """
    local mysql = require("mysql")
    function OnMessage()
      local c = mysql.new()
      c:set_timeout(300)
      c:connect("root@tcp(127.0.0.1:3306)/test")
      return c:query("SELECT SLEEP(5)")
    end
    """
    start = time.monotonic()
    rows, err = lua(src)
    assert rows is None and "timed out" in err.lower(), err
    assert time.monotonic() - start < 2


def test_sqlite_file_rows_binds_nulls_and_errors(tmp_path):
    src = """
    local sqlite3 = require("sqlite3")
    function OnMessage(_, path)
      local c = sqlite3.new()
      local ok = c:open(path, {cache = "private"})
      c:query("CREATE TABLE t (id INTEGER, name TEXT, score REAL, note TEXT)")
      local inserted = c:query("INSERT INTO t VALUES (1, 'ann', 2.5, 'hi'), (2, 'bob', 10, NULL)")
      local rows = c:query("SELECT * FROM t WHERE id >= ? ORDER BY id", 1)
      local none, err = c:query("SELECT * FROM missing")
      return ok, type(inserted) == "table" and next(inserted) == nil, rows, none, err, c:close()
    end
    """
    db = tmp_path / "data.db"
    ok, inserted, rows, none, err, closed = lua(src, "", str(db))
    assert ok is True and inserted is True and closed is True
    assert rows == [{"id": 1, "name": "ann", "score": 2.5, "note": "hi"}, {"id": 2, "name": "bob", "score": 10.0}]
    assert none is None and "missing" in err
    assert db.exists()


def test_sqlite_open_errors(tmp_path):
    src = """
    local sqlite3 = require("sqlite3")
    function OnMessage(_, path)
      local ok, err = sqlite3.new():open(path .. "/no/such/dir/x.db", {mode = "rwc"})
      local raised = pcall(sqlite3.new().open, sqlite3.new(), "", {mode = "rwc"})
      return ok, err, raised
    end
    """
    ok, err, raised = lua(src, "", str(tmp_path))
    assert ok is False and "open" in err
    assert raised is False


def test_sqlite_read_only_mode(tmp_path):
    db = tmp_path / "ro.db"
    src = """
    local sqlite3 = require("sqlite3")
    function OnMessage(_, path)
      local w = sqlite3.new()
      w:open(path, {mode = "rwc"})
      w:query("CREATE TABLE t (x INTEGER)")
      w:close()
      local r = sqlite3.new()
      r:open(path, {mode = "ro"})
      return r:query("INSERT INTO t VALUES (1)")
    end
    """
    rows, err = lua(src, "", str(db))
    assert rows is None and "readonly" in err.replace("-", "").replace(" ", "")


@needs_mariadb
def test_mysql_dsn_with_driver_prefix_and_parameters():
    src = """
    local mysql = require("mysql")
    function OnMessage(_, dsn)
      local c = mysql.new()
      local ok, err = c:connect(dsn)
      local rows = c:query("SELECT DATABASE() AS db, @@character_set_client AS cs")
      c:close()
      return ok, err, rows
    end
    """
    ok, err, rows = lua(src, "", "mysql://root:@tcp(127.0.0.1:3306)/test?charset=utf8mb4&timeout=2s")
    assert (ok, err) == (True, None)
    assert rows == [{"db": "test", "cs": "utf8mb4"}]


def test_sqlite_in_memory_without_options():
    src = """
    local sqlite3 = require("sqlite3")
    function OnMessage()
      local c = sqlite3.new()
      local ok = c:open(":memory:")
      return ok, c:query("SELECT 1 + 1 AS two")
    end
    """
    assert lua(src) == [True, [{"two": 2}]]


# A result larger than the script's memory cap is `nil, err`; the rows are counted as they arrive.
BIG_RESULT = """
local db = require(MODULE)
function OnMessage(_, target)
  local c = db.new()
  assert(CONNECT)
  local rows, err = c:query(SQL)
  local after = c:query("SELECT 1 AS one")
  c:close()
  return rows, err, after
end
"""


@pytest.mark.parametrize("module, connect, sql", [
    pytest.param("mysql", "c:connect(target)",
                 "SELECT REPEAT('x', 1000) AS s FROM information_schema.columns a, information_schema.columns b",
                 marks=needs_mariadb, id="mysql"),
    pytest.param("postgres", "c:connect(target)", "SELECT repeat('x', 1000) AS s FROM generate_series(1, 10000000)",
                 marks=needs_postgres, id="postgres"),
    pytest.param("sqlite3", "c:open(':memory:')",
                 "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n LIMIT 10000000) "
                 "SELECT printf('%.1000c', 'x') AS s FROM n", id="sqlite3"),
])
def test_results_over_the_memory_cap_are_nil_err(module, connect, sql):
    target = {"mysql": MYSQL_DSN, "postgres": PG_URL, "sqlite3": ""}[module]
    src = BIG_RESULT.replace("MODULE", f'"{module}"').replace("CONNECT", connect).replace("SQL", repr(sql))
    start = time.monotonic()
    rows, err, after = run_lua(src, b"", target.encode(), timeout=20, python=True, memory=8 * 2**20)
    assert rows is None and "memory limit" in err
    assert after == [{"one": 1}]  # the connection still works (reopened if it had to be dropped)
    assert time.monotonic() - start < 10
