"""The first hour of a new user and an operator's day (issue 21), and script files and flags written for the
Go original (issue 20, item 7): each test does what the user did and checks what they see."""

from __future__ import annotations

import base64
import html.parser
import json
import logging
import os
import re
import socket
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
import requests
from conftest import MSGSCRIPT, ROOT, MsgscriptProcess, free_port, wait_port, wait_until, write_script

import msgscript

EXAMPLES = ROOT / "examples"


def run(*args, env=None, stdin=None, cwd=None, timeout=60) -> subprocess.CompletedProcess:
    """`msgscript ARGS...` as a user types it (no NATS_URL or DEBUG unless given)."""
    full = dict(os.environ)
    for name in ("NATS_URL", "DEBUG", "ETCD_ENDPOINTS"):
        full.pop(name, None)
    full.update(env or {})
    return subprocess.run([*MSGSCRIPT, *map(str, args)], capture_output=True, text=True, env=full, input=stdin,
                          cwd=cwd, timeout=timeout)


def cli(*args, **kw) -> subprocess.CompletedProcess:
    return run("cli", *args, **kw)


def one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def script(directory: Path, filename: str, text: str) -> Path:
    return write_script(directory, filename, text)


ECHO = "--* subject: hour.echo\n--* name: echo\nfunction OnMessage(s, p) return s .. ' got ' .. p end\n"


# 2. -nats-port, cli request, cli publish ------------------------------------------------------------


def test_nats_port_sets_the_embedded_servers_port_and_cli_request_reaches_it(start_server, tmp_path):
    script(tmp_path, "echo.lua", ECHO)
    port = free_port()
    srv = start_server("-script", str(tmp_path), "-nats-port", str(port), "-data", str(tmp_path / "data"), nats=False)
    assert f"started embedded NATS server at nats://127.0.0.1:{port}" in srv.log
    out = cli("request", "-u", f"nats://127.0.0.1:{port}", "hour.echo", "hi")
    assert (out.returncode, out.stdout, out.stderr) == (0, "hour.echo got hi\n", "")
    out = cli("request", "hour.echo", "from the environment", env={"NATS_URL": f"nats://127.0.0.1:{port}"})
    assert out.stdout == "hour.echo got from the environment\n"
    none = cli("request", "-u", f"nats://127.0.0.1:{port}", "hour.nobody")
    one_line_error(none, "no script answers hour.nobody", "no responders")


def test_a_taken_nats_port_is_refused_before_anything_starts(tmp_path):
    script(tmp_path, "echo.lua", ECHO)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = run("server", "-script", tmp_path, "-port", free_port(), "-nats-port", port, "-data", tmp_path / "d")
    line = one_line_error(out, f"-nats-port {port}", "taken")
    assert out.returncode == 2 and "started embedded NATS" not in out.stderr, line
    out = run("server", "-script", tmp_path, "-nats-port", "4223", "-natsurl", "nats://127.0.0.1:1")
    one_line_error(out, "-nats-port", "-natsurl")


def test_when_4222_is_taken_a_free_port_is_chosen_and_logged(start_server, tmp_path):
    script(tmp_path, "echo.lua", ECHO)
    holder = socket.socket()
    try:
        try:
            holder.bind(("127.0.0.1", 4222))
            holder.listen()
        except OSError:
            pass  # something already listens there: the same situation
        srv = start_server("-script", str(tmp_path), "-data", str(tmp_path / "data"), nats=False)
    finally:
        holder.close()
    found = re.search(r"WARNING port 4222 is taken .*listens on port (\d+): reach it with -u "
                      r"nats://127.0.0.1:(\d+), or choose its port with -nats-port", srv.log)
    assert found and found.group(1) == found.group(2), srv.log
    out = cli("request", "-u", f"nats://127.0.0.1:{found.group(1)}", "hour.echo", "x")
    assert out.stdout == "hour.echo got x\n"


def test_cli_request_error_reply_is_one_line_and_exit_1(start_server, tmp_path, nats_server):
    script(tmp_path, "fail.lua", "--* subject: hour.fail\n--* name: fail\n"
                                 "function OnMessage() error('no stock') end\n")
    start_server("-script", str(tmp_path))
    out = cli("request", "-u", nats_server.url, "hour.fail")
    # the file as the server names it: relative to its working directory (here tmp_path) when under it
    assert one_line_error(out) == "error: fail.lua:3: no stock (code 500)"
    assert out.returncode == 1 and out.stdout == ""


def test_cli_publish_needs_a_stream_and_says_so(nats_server):
    out = cli("publish", "-u", nats_server.url, "hour.nostream", "x", timeout=30)
    one_line_error(out, "hour.nostream")


def test_cli_request_without_a_server_says_how_to_name_one():
    out = cli("request", "-u", "nats://127.0.0.1:1", "hour.echo", "x")
    one_line_error(out, "cannot connect to NATS at nats://127.0.0.1:1")


def test_readme_first_screen_calls_nats_with_the_cli_and_keeps_two_setup_commands():
    first_screen = "\n".join((ROOT / "README.md").read_text().splitlines()[:40])
    blocks = re.findall(r"```sh\n(.*?)```", first_screen, re.S)
    assert len(blocks[0].strip().splitlines()) == 1 and len(blocks[1].strip().splitlines()) == 1
    calls = blocks[2]
    assert "msgscript cli request funcs.hello John" in calls and "msgscript cli publish" in first_screen
    assert "python -c" not in first_screen and "import nats" not in first_screen


def test_readme_first_screen_nats_calls_work_as_written(tmp_path):
    """The server on its defaults, then the first screen's cli request lines; when 4222 is taken here (another
    NATS), they get `-u` with the port the log names, as the first screen says."""
    readme = (ROOT / "README.md").read_text()
    calls = re.findall(r"```sh\n(.*?)```", "\n".join(readme.splitlines()[:40]), re.S)[2]
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for name in ("NATS_URL", "DEBUG"):
        env.pop(name, None)
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([*MSGSCRIPT, "server", "-script", "examples", "-library", "examples/libs", "-port",
                             str(port), "-data", str(tmp_path / "data")], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, env=env)
    try:
        wait_until(lambda: b"serving" in (tmp_path / "server.log").read_bytes(), 30)
        taken = re.search(r"reach it with (-u nats://127\.0\.0\.1:\d+)", (tmp_path / "server.log").read_text())
        for line in calls.splitlines():
            if "msgscript cli request" not in line:
                continue
            command, _, comment = line.partition("#")
            words = command.split()[1:]  # .venv/bin/msgscript -> this checkout's msgscript
            if taken:
                words[2:2] = taken.group(1).split()
            out = run(*words, cwd=ROOT)
            said = (out.stdout or out.stderr).strip()
            expected = comment.split(":", 1)[1].strip() if comment.strip().startswith("over NATS") else comment.strip()
            expected = expected.split("...")[0].strip()
            assert said.startswith(expected), (line, said)
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


# 3. cli dev runs every kind of script ----------------------------------------------------------------

STREAM = """--* subject: hour.orders
--* name: orders
--* stream: HOUR
function OnMessage(subject, payload, msg)
  return table.concat({subject, payload, msg.id, msg.stream, msg.sequence, msg.attempt, msg.subject}, "|")
end
"""

CRON = """--* subject: hour.tick
--* name: tick
--* cron: @every 30s
function OnMessage(subject, payload, tick)
  return table.concat({subject, "[" .. payload .. "]", tick.tick, tick.stream, tick.subject, tick.attempt}, "|")
end
"""


def test_dev_runs_a_stream_script_with_a_message_table(tmp_path):
    path = script(tmp_path, "orders.lua", STREAM)
    out = cli("dev", path, "-i", "an order")
    assert out.stdout == "hour.orders|an order|HOUR:1|HOUR|1|1|hour.orders\n", out.stderr
    out = cli("dev", path, "-i", "-", "-H", "Nats-Msg-Id: order-7", "--attempt", "3", "--sequence", "12",
              stdin="from stdin")
    assert out.stdout == "hour.orders|from stdin|order-7|HOUR|12|3|hour.orders\n", out.stderr


def test_dev_runs_a_cron_script_with_a_tick_table(tmp_path):
    path = script(tmp_path, "tick.lua", CRON)
    out = cli("dev", path, "--tick", "2026-01-31T12:00:00Z")
    assert out.stdout == "hour.tick|[]|2026-01-31T12:00:00Z|MSGSCRIPT_CRON|msgscript.cron.hour.tick.tick|1\n", \
        out.stderr
    now = cli("dev", path)
    assert re.fullmatch(r"hour\.tick\|\[\]\|\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\|MSGSCRIPT_CRON\|.*\|1\n", now.stdout)
    one_line_error(cli("dev", path, "-i", "x"), "-i/--input", "cron script")


def test_dev_input_is_optional_and_dash_reads_stdin(tmp_path):
    page = script(tmp_path, "page.lua", "--* subject: hour.page\n--* name: page\n--* http: true\n"
                                        "function GET(url, body) return 'page ' .. url .. ' [' .. body .. ']' end\n"
                                        "function POST(url, body) return 'posted ' .. body end\n")
    out = cli("dev", page, "-U", "/a")
    assert (out.returncode, out.stdout) == (0, "page /a []\n"), out.stderr
    out = cli("dev", page, "-m", "POST", "-i", "-", stdin="a body\n")
    assert out.stdout == "posted a body\n"
    echo = script(tmp_path, "echo.lua", ECHO)
    assert cli("dev", echo, "-i", "-", stdin="piped").stdout == "hour.echo got piped\n"
    assert cli("dev", echo).stdout == "hour.echo got \n"


def test_dev_refuses_flags_that_do_not_apply_to_the_script(tmp_path):
    echo = script(tmp_path, "echo.lua", ECHO)
    one_line_error(cli("dev", echo, "--attempt", "2"), "--attempt", "stream and cron scripts")
    one_line_error(cli("dev", echo, "-m", "POST"), "-m/--method", "HTTP-mode")
    one_line_error(cli("dev", script(tmp_path, "o.lua", STREAM), "--tick", "now"), "--tick", "cron scripts")


# 4. one flag syntax ----------------------------------------------------------------------------------


def test_long_flags_take_one_or_two_dashes_everywhere(tmp_path):
    libs = tmp_path / "libs"
    libs.mkdir()
    script(libs, "greet.lua", "--* name: greet\nfunction greet(who) return 'Hi, ' .. who end\n")
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "shout.py").write_text("def lua_modules():\n"
                                      "    return {'shout': lambda ctx: {'loud': lambda t: t.upper()}}\n")
    path = script(tmp_path, "s.lua", "--* subject: hour.lib\n--* name: lib\n--* require: greet\n"
                                     "local shout = require('shout')\n"
                                     "function OnMessage(_, p) return shout.loud(greet(p)) end\n")
    for flags in (("-library", libs, "-plugin", plugins), ("--library", libs, "--pluginDir", plugins),
                  ("-l", libs, "-p", plugins), ("-libdir", libs, "-pluginDir", plugins)):
        out = cli("dev", path, "-input", "ann", *flags)
        assert (out.returncode, out.stdout) == (0, "HI, ANN\n"), (flags, out.stderr)
    listed = cli("list", "-backend", "file", "-script-dir", tmp_path, "-library", libs)
    assert listed.returncode == 0 and "hour.lib" in listed.stdout, listed.stderr
    listed = cli("-backend=file", "list", "-script-dir", tmp_path, "-library", libs)
    assert "hour.lib" in listed.stdout, listed.stderr


def test_a_misplaced_or_unknown_flag_is_refused_not_split_or_ignored(tmp_path):
    path = script(tmp_path, "echo.lua", ECHO)
    one_line_error(cli("dev", path, "-ibrary", "x"), "unknown flag -ibrary")
    one_line_error(cli("devhttp", path, "-prt", "8000"), "unknown flag -prt")
    one_line_error(cli("-b", "file", "dev", path), "-b/--backend", "does not apply to dev")
    one_line_error(cli("dev", path, "--script-dir", tmp_path), "--script-dir")
    one_line_error(cli("request", "--library", tmp_path, "a.b"), "--library")
    one_line_error(cli("list", "-i", "x"), "-i")
    one_line_error(run("server", "-script", tmp_path, "-lib", "x"), "unknown flag -lib")


def test_devhttp_takes_port_with_one_dash(tmp_path):
    path = script(tmp_path, "echo.lua", ECHO)
    port = free_port()
    proc = subprocess.Popen([*MSGSCRIPT, "cli", "devhttp", str(path), "-port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        wait_port(port, 20, proc)
        assert requests.post(f"http://127.0.0.1:{port}/hour.echo", data="x", timeout=10).text == "hour.echo got x"
    finally:
        proc.terminate()
        proc.wait(10)


# 5. every failed call logs one warning, at the default level ---------------------------------------


def test_failed_calls_are_logged_for_every_transport_and_the_log_is_quiet_otherwise(start_server, tmp_path,
                                                                                     nats_server):
    script(tmp_path, "fail.lua", "--* subject: hour.fail\n--* name: fail\n"
                                 "function OnMessage() error('out of paper') end\n")
    srv = start_server("-script", str(tmp_path), "-log", "debug")
    requests.get(f"{srv.base}/hour.fail", timeout=10)
    cli("request", "-u", nats_server.url, "hour.fail")
    where = "fail.lua:3: out of paper"
    srv.wait_log(f"WARNING script hour.fail/fail failed (HTTP, status 500): {where}")
    srv.wait_log(f"WARNING script hour.fail/fail failed (NATS, status 500): {where}")
    script(tmp_path, "fail.lua", "--* subject: hour.fail\n--* name: fail\n"
                                 "function OnMessage() error('out of ink') end\n")
    srv.wait_log("reloaded")
    time.sleep(1.5)  # a second or more of the file watcher's idle loop
    for noise in ("changes detected", "rust notify timeout", "INFO watchfiles"):
        assert noise not in srv.log


def test_stream_and_cron_failures_are_logged_with_their_transport(start_server, tmp_path):
    port = free_port()
    script(tmp_path, "s.lua", "--* subject: hour.stream\n--* name: s\n--* stream: HOURSTREAM\n--* retry: none\n"
                              "function OnMessage() error('bad message') end\n")
    script(tmp_path, "c.lua", "--* subject: hour.cron\n--* name: c\n--* cron: @every 1s\n"
                              "function OnMessage() error('bad tick') end\n")
    srv = start_server("-script", str(tmp_path), "-nats-port", str(port), "-data", str(tmp_path / "data"),
                       "-create-streams", nats=False)
    srv.wait_log("script hour.stream/s runs from stream HOURSTREAM")
    assert cli("publish", "-u", f"nats://127.0.0.1:{port}", "hour.stream", "x").returncode == 0
    srv.wait_log("WARNING script hour.stream/s failed (stream, status 500): ")
    srv.wait_log("WARNING script hour.cron/c failed (cron, status 500): ", timeout=15)
    assert re.search(r"failed \(cron, status 500\): \S*c\.lua:4: bad tick", srv.log)


def test_failure_log_keeps_ten_a_minute_per_script_then_sums_up(caplog):
    log = msgscript.FailureLog(burst=10, every=0.5)
    timers = []
    log.later = lambda delay, fn: timers.append(threading.Timer(delay, fn)) or timers[-1].start()
    noisy = msgscript.Script("a.b", "noisy", "")
    quiet = msgscript.Script("a.b", "quiet", "")
    failure = msgscript.Result(error="boom", status=500)
    with caplog.at_level(logging.WARNING, logger="msgscript"):
        for _ in range(25):
            log.failed(noisy, msgscript.Call("a.b", via="HTTP"), failure)
        log.failed(quiet, msgscript.Call("a.b"), failure)
        wait_until(lambda: "15 more failed calls" in caplog.text, timeout=3)
    lines = caplog.text.splitlines()
    assert sum("script a.b/noisy failed (HTTP, status 500): boom" in line for line in lines) == 10
    assert sum("script a.b/quiet failed (NATS, status 500): boom" in line for line in lines) == 1
    assert sum("script a.b/noisy: 15 more failed calls not logged in the last minute" in line for line in lines) == 1


# 6. cli add refuses what would not load; cli list shows what is stored but broken ---------------------


def test_cli_add_refuses_scripts_that_would_not_load(etcd, tmp_path):
    e = ("-e", etcd.endpoint)
    syntax = script(tmp_path, "syntax.lua", "--* subject: hour.syntax\n--* name: syntax\n\n"
                                            "function OnMessage( return end\n")
    assert one_line_error(cli("add", *e, syntax)) == f"error: {syntax}:4: Lua syntax error: <name> or '...' " \
                                                     f"expected near 'return'"
    headless = script(tmp_path, "headless.lua", "--* subjet: hour.x\n--* name: x\nfunction OnMessage() end\n")
    one_line_error(cli("add", *e, headless), "missing required header '--* subject", "did you mean 'subject'?")
    wild = script(tmp_path, "wild.lua", "--* subject: hour.*\n--* name: wild\n")
    one_line_error(cli("add", *e, wild), "wildcard")
    needs = script(tmp_path, "needs.lua", "--* subject: hour.needs\n--* name: needs\n--* require: nowhere\n"
                                          "function OnMessage() return 'x' end\n")
    one_line_error(cli("add", *e, needs), "nowhere", "msgscript cli lib add")
    assert all(cli("add", *e, f).returncode == 1 for f in (syntax, headless, wild, needs))
    assert "hour." not in cli("list", *e).stdout  # nothing was stored

    lib = script(tmp_path, "nowhere.lua", "function helper() return 'helped' end\n")
    added = cli("lib", "add", *e, "--name", "nowhere", lib)  # a file without a name header: --name names it
    assert added.returncode == 0 and "added library nowhere" in added.stdout, added.stderr
    ok = cli("add", *e, needs)
    assert ok.returncode == 0, ok.stderr


def test_cli_list_shows_stored_scripts_that_cannot_load_with_the_reason(etcd, tmp_path):
    e = ("-e", etcd.endpoint)
    good = script(tmp_path, "good.lua", "--* subject: hour.good\n--* name: good\nfunction OnMessage() end\n")
    assert cli("add", *e, good).returncode == 0
    # written by another tool (the Go CLI stores without checking)
    value = json.dumps({"content": base64.b64encode(b"-- broken\nfunction OnMessage( end").decode(), "executor": "lua",
                        "is_html": False, "libraries": None, "name": "broken", "subject": "hour.broken"})
    etcd.etcdctl("put", "msgscript/scripts/hour.broken/broken", value)
    out = cli("list", *e)
    assert out.returncode == 0 and out.stderr == ""
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["Subject", "Name", "Problem"]
    broken = next(line for line in lines if line.startswith("hour.broken"))
    assert "msgscript/scripts/hour.broken/broken:2: Lua syntax error" in broken
    assert any(line.split() == ["hour.good", "good"] for line in lines)


# 7. error messages name the real file and line ------------------------------------------------------


def test_errors_name_the_script_file_line_and_the_library_file_line(start_server, tmp_path, nats_server):
    scripts, libs = tmp_path / "scripts", tmp_path / "libs"
    scripts.mkdir()
    libs.mkdir()
    script(libs, "util.lua", "--* name: util\n-- helpers\nfunction check(x)\n"
                             "  if x == '' then error('empty input') end\n  return x\nend\n")
    script(scripts, "use.lua", "--* subject: hour.use\n--* name: use\n--* require: util\n\n"
                               "function OnMessage(_, p)\n  check(p)\n  return nothing.here\nend\n")
    script(scripts, "util.lua", "--* subject: hour.util\n--* name: util\n\nlocal x = = 1\n")
    srv = start_server("-script", str(scripts), "-library", str(libs))
    url = ("-u", nats_server.url)
    inlib = cli("request", *url, "hour.use", "")
    assert one_line_error(inlib) == "error: libs/util.lua:4: empty input (code 500)"
    inscript = cli("request", *url, "hour.use", "x")
    assert one_line_error(inscript) == ("error: scripts/use.lua:7: attempt to index global 'nothing' "
                                        "(a nil value) (code 500)")
    srv.wait_log(f"skipping {scripts / 'util.lua'}:4: Lua syntax error: unexpected symbol near '='")
    # cli dev names them the same way
    dev = cli("dev", scripts / "use.lua", "-l", libs)
    assert one_line_error(dev) == f"error: {libs / 'util.lua'}:4: empty input"


def test_etcd_scripts_and_libraries_are_named_by_their_keys(etcd, start_server, tmp_path, nats_server):
    e = ("-e", etcd.endpoint)
    lib = script(tmp_path, "util.lua", "--* name: util\nfunction check(x)\n  error('no ' .. x)\nend\n")
    use = script(tmp_path, "use.lua", "--* subject: hour.etcd\n--* name: use\n--* require: util\n"
                                      "function OnMessage(_, p) check(p) end\n")
    assert cli("lib", "add", *e, lib).returncode == 0
    assert cli("add", *e, use).returncode == 0
    start_server("-backend", "etcd", "-etcdurl", etcd.endpoint)
    out = cli("request", "-u", nats_server.url, "hour.etcd", "luck")
    assert one_line_error(out) == "error: msgscript/libs/util:2: no luck (code 500)"


# 8. the admin pages -------------------------------------------------------------------------------


class Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.rows: list[tuple[str, str]] = []
        self._cell: list[str] | None = None
        self._row: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a" and dict(attrs).get("href"):
            self.links.append(dict(attrs)["href"])
        if tag in ("th", "td"):
            self._cell = []

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag in ("th", "td") and self._cell is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        if tag == "tr":
            self.rows.append(tuple(self._row))
            self._row = []


def parse(page: str) -> Links:
    links = Links()
    links.feed(page)
    return links


def test_every_link_of_every_admin_page_answers_200(start_server, tmp_path):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    for f in EXAMPLES.glob("*.lua"):
        script(scripts, f.name, f.read_text())
    script(scripts, "odd.lua", "--* subject: hour.odd\n--* name: odd name/with%\nfunction OnMessage() end\n")
    script(scripts, "orders.lua", STREAM + "--* timeout: 1500ms\n--* memory: 16MiB\n--* lock: true\n")
    port = free_port()
    srv = start_server("-script", str(scripts), "-library", str(EXAMPLES / "libs"), "-nats-port", str(port),
                       "-data", str(tmp_path / "data"), "-create-streams", nats=False)
    srv.wait_log("script hour.orders/orders runs from stream HOUR")
    seen, todo, pages = set(), ["/_/"], {}
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        r = requests.get(srv.base + path, timeout=10)
        assert r.status_code == 200, (path, r.status_code, r.text[:200])
        pages[path] = r.text
        if r.headers["Content-Type"].startswith("text/html"):
            for href in parse(r.text).links:
                target = urllib.parse.urljoin(path, href).partition("#")[0]
                if not target.startswith("http"):
                    todo.append(target)
    assert "/_/file/docs/modules.md" in seen and "/_/file/plugins/hello.py" in seen
    assert "/_/list" in seen and "/_/info/hour.odd/odd%20name%2Fwith%25" in seen
    assert "def lua_modules" in pages["/_/file/plugins/hello.py"]

    rows = parse(pages["/_/info/hour.orders/orders"]).rows
    keys = [k for k, _ in rows]
    assert len(keys) == len(set(keys)), keys  # no row twice
    values = dict(rows)
    assert (values["http"], values["lock"], values["timeout"], values["memory"]) == ("false", "true", "1.5s", "16MiB")
    assert (values["require"], values["stream"], values["retry"]) == ("-", "HOUR", "1s, 5s, 30s")
    plain = dict(parse(pages["/_/info/funcs.hello/hello"]).rows)
    assert (plain["timeout"], plain["memory"], plain["require"]) == ("-", "-", "-")
    for page in pages.values():
        assert "<td>False</td>" not in page and "<td>True</td>" not in page and "<td>None</td>" not in page


# 9. the cron machinery touches an external NATS only for cron scripts ---------------------------------


def test_cron_stream_is_created_only_when_a_cron_script_exists_and_logged(start_server, tmp_path):
    store = tmp_path / "js"
    port = free_port()
    js = subprocess.Popen([msgscript.find_nats_server(), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc=js)
        url = f"nats://127.0.0.1:{port}"
        script(tmp_path, "echo.lua", ECHO)
        srv = start_server("-script", str(tmp_path), "-natsurl", url, nats=False)
        time.sleep(1)
        streams = stream_names(url)
        assert streams == [], streams
        script(tmp_path, "tick.lua", CRON)
        srv.wait_log(f"created stream MSGSCRIPT_CRON (subjects msgscript.cron.>) on NATS at {url}")
        assert stream_names(url) == ["MSGSCRIPT_CRON"]
    finally:
        js.terminate()
        js.wait(10)


def stream_names(url: str) -> list[str]:
    import asyncio

    import nats

    async def names():
        nc = await nats.connect(url)
        try:
            return sorted([s.config.name for s in await nc.jetstream().streams_info()])
        finally:
            await nc.close()

    return asyncio.run(names())


# 10. the smaller list --------------------------------------------------------------------------------


def test_misspelled_header_and_wildcard_subject_say_what_is_wrong(start_server, tmp_path):
    script(tmp_path, "echo.lua", ECHO)
    script(tmp_path, "typo.lua", "--* subjetc: hour.typo\n--* name: typo\nfunction OnMessage() end\n")
    script(tmp_path, "wild.lua", "--* subject: hour.>\n--* name: wild\nfunction OnMessage() end\n")
    srv = start_server("-script", str(tmp_path))
    assert ("missing required header '--* subject: ...' (line 1, '--* subjetc', is not a header: did you mean "
            "'subject'?)") in srv.log
    assert ("subject 'hour.>' is not a valid NATS subject: it has a wildcard (* or >): a script answers one literal "
            "subject") in srv.log


def test_a_timeout_says_which_limit_ran_out(start_server, tmp_path, nats_server):
    loop = "function OnMessage() while true do end end\n"
    script(tmp_path, "h.lua", "--* subject: hour.slow\n--* name: slow\n--* timeout: 300ms\n" + loop)
    script(tmp_path, "w.lua", "--* subject: hour.wait\n--* name: wait\n" + loop)
    srv = start_server("-script", str(tmp_path), "-http-timeout", "400ms", "-timeout", "1s")
    assert "(its timeout header 300ms)" in requests.get(f"{srv.base}/hour.slow", timeout=10).json()["slow"]["error"]
    assert "(the HTTP wait 400ms)" in requests.get(f"{srv.base}/hour.wait", timeout=10).json()["wait"]["error"]
    assert "(?_timeout=200ms)" in requests.get(f"{srv.base}/hour.wait?_timeout=200ms",
                                               timeout=10).json()["wait"]["error"]
    out = cli("request", "-u", nats_server.url, "hour.wait")
    one_line_error(out, "timed out (the server's -timeout 1s)")
    dev = cli("dev", tmp_path / "w.lua", "-t", "200ms")
    one_line_error(dev, "timed out (-t 200ms)")


def test_compat_error_lists_only_real_choices(tmp_path):
    out = run("server", "-script", tmp_path, "-compat", "python")
    assert one_line_error(out) == "error: -compat must be go (or left out), not 'python'"


def test_one_script_is_not_1_scripts(start_server, tmp_path):
    script(tmp_path, "echo.lua", ECHO)
    srv = start_server("-script", str(tmp_path))
    assert "serving 1 script on 1 subject;" in srv.log and f"1 script on 1 subject in {tmp_path}" in srv.log
    assert "1 scripts" not in srv.log and "1 subjects" not in srv.log


def test_the_readme_http_mode_snippet_answers_the_readme_curl(start_server, tmp_path):
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"\*\*HTTP mode\*\*.*?```lua\n(.*?)```", readme, re.S).group(1)
    curl = re.search(r"curl (-d John )?http://127\.0\.0\.1:7643/http\.hello\s", readme)
    script(tmp_path, "snippet.lua", snippet)
    srv = start_server("-script", str(tmp_path))
    method = requests.post if curl.group(1) else requests.get
    r = method(f"{srv.base}/http.hello", data=b"John", timeout=10)
    assert (r.status_code, r.text) == (200, "Hello, John!")


def test_a_subject_without_scripts_has_no_responder_as_the_readme_says(start_server, tmp_path, nats_server):
    readme = (ROOT / "README.md").read_text()
    errors = re.search(r"- \*\*Errors\*\*.*?(?=\n- \*\*)", readme, re.S).group(0)
    assert "no responders" in errors and "404 for a subject without scripts" not in errors
    script(tmp_path, "echo.lua", ECHO)
    start_server("-script", str(tmp_path))
    one_line_error(cli("request", "-u", nats_server.url, "hour.none"), "no responders")


def test_scripts_can_require_lua_files_as_the_docs_say(tmp_path):
    docs = (ROOT / "docs" / "modules.md").read_text()
    assert "require only the built-in and plugin modules" not in docs
    assert "-library" in docs.split("## Using modules")[1].split("\n## ")[0]
    libs = tmp_path / "libs"
    (libs / "shop").mkdir(parents=True)
    (libs / "shop" / "tax.lua").write_text("return {rate = function() return 0.2 end}\n")
    path = script(tmp_path, "s.lua", "--* subject: hour.req\n--* name: req\n"
                                     "local tax = require('shop.tax')\n"
                                     "function OnMessage() return tostring(tax.rate()) end\n")
    assert cli("dev", path, "-l", libs).stdout == "0.2\n"


def test_a_taken_http_port_is_reported_before_nats_starts(tmp_path):
    script(tmp_path, "echo.lua", ECHO)
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        out = run("server", "-script", tmp_path, "-port", port, "-nats-port", free_port(), "-data", tmp_path / "d",
                  "-log", "debug")
    assert time.monotonic() - started < 10
    assert out.returncode == 2
    assert f"error: cannot listen on port {port}" in out.stderr
    assert "embedded NATS" not in out.stderr and "subscribed" not in out.stderr and "connected" not in out.stderr


# issue 20, item 7: files and flags written for the Go original ---------------------------------------


def test_go_style_headers_without_the_colon_load(start_server, tmp_path, nats_server):
    script(tmp_path, "go.lua", "--* subject funcs.gostyle\n--* name gostyle\n"
                               "function OnMessage(s, p) return 'go ' .. p end\n")
    start_server("-script", str(tmp_path))
    assert cli("request", "-u", nats_server.url, "funcs.gostyle", "x").stdout == "go x\n"


@pytest.mark.parametrize("level", ["trace", "TRACE", "fatal", "panic", "Warning", "debug", "error"])
def test_go_log_levels_start_the_server(tmp_path, level, nats_server):
    script(tmp_path, "echo.lua", ECHO)
    port = free_port()
    proc = subprocess.Popen([*MSGSCRIPT, "server", "-script", str(tmp_path), "-natsurl", nats_server.url, "-port",
                             str(port), "-log", level], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_port(port, 20, proc)
        wait_until(lambda: requests.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200, 10)
    finally:
        proc.terminate()
        output = proc.communicate(timeout=20)[0]
    shown = {"fatal": "", "panic": "", "error": "", "Warning": ""}.get(level)
    if shown is not None:  # quiet levels: not even the start-up lines
        assert output == shown, output


def test_any_debug_value_means_debug_as_in_go(tmp_path, nats_server):
    script(tmp_path, "echo.lua", ECHO)
    proc = MsgscriptProcess(["-script", str(tmp_path), "-natsurl", nats_server.url, "-log", "error"], tmp_path,
                            env={"DEBUG": "0"})
    try:
        assert " DEBUG " in proc.log
    finally:
        proc.stop()
    out = run("server", "-log", "loud")
    one_line_error(out, "unknown log level 'loud'", "trace")


def test_lib_add_accepts_gos_name_flag(etcd, tmp_path):
    e = ("-e", etcd.endpoint)
    out = cli("lib", "add", *e, "--name", "web", EXAMPLES / "libs" / "web.lua")
    assert out.returncode == 0 and "added library web" in out.stdout, out.stderr
    out = cli("lib", "add", *e, "--name", "x", EXAMPLES / "libs" / "web.lua", EXAMPLES / "hello.lua")
    one_line_error(out, "--name names one library")
    assert "web" in cli("lib", "list", *e).stdout.split()


def test_a_missing_library_loads_the_script_with_a_warning(start_server, tmp_path, nats_server):
    script(tmp_path, "s.lua", "--* subject: hour.nolib\n--* name: nolib\n--* require: ghost\n"
                              "function OnMessage(_, p) return 'ran ' .. p end\n")
    srv = start_server("-script", str(tmp_path))
    assert "WARNING script s.lua (hour.nolib/nolib) requires library 'ghost', which does not " \
           "exist: it runs without it" in srv.log
    assert cli("request", "-u", nats_server.url, "hour.nolib", "anyway").stdout == "ran anyway\n"
    page = requests.get(f"{srv.base}/_/list", timeout=10).text
    assert "runs without the missing library ghost" in page
