"""The developer loop as a user runs it: `cli dev`, `cli devhttp`, `cli completion`, --help and usage errors."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import MSGSCRIPT, ROOT, free_port, stop_process, wait_port, write_script

ECHO = """--* subject: dev.echo
--* name: echo
function OnMessage(subject, payload)
  return subject .. " got " .. payload
end
"""

PLUGIN = '''
def lua_modules():
    return {"shout": lambda ctx: {"loud": lambda text: text.upper() + "!"}}
'''


def msgscript(*args, cwd=None, timeout=30, **kw) -> subprocess.CompletedProcess:
    """`msgscript ARGS...` with its output as text."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("NATS_URL", None)
    return subprocess.run([*MSGSCRIPT, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout, **kw)


def dev(*args, **kw) -> subprocess.CompletedProcess:
    return msgscript("cli", "dev", *args, **kw)


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    """A failure as a user should see it: non-zero status, one line on stderr, no traceback."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0]


# cli dev ----------------------------------------------------------------------------------------


def test_dev_input_is_a_file_when_one_exists_else_the_literal(tmp_path):
    script = write_script(tmp_path, "echo.lua", ECHO)
    (tmp_path / "input.txt").write_text("what the file says")
    proc = dev(script, "-i", tmp_path / "input.txt")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "dev.echo got what the file says\n"

    proc = dev(script, "-i", "just words")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "dev.echo got just words\n"

    # a relative path counts when it exists from the working directory
    proc = dev(script, "-i", "input.txt", cwd=tmp_path)
    assert proc.stdout == "dev.echo got what the file says\n"


def test_dev_lua_script_prints_only_its_result(tmp_path):
    # nothing on stderr: no warning about executors (podman) the script does not use
    proc = dev(write_script(tmp_path, "echo.lua", ECHO), "-i", "quiet please")
    assert proc.returncode == 0
    assert proc.stdout == "dev.echo got quiet please\n"
    assert proc.stderr == ""


def test_dev_subject_and_name_flags_override_the_headers(tmp_path):
    script = write_script(tmp_path, "echo.lua", ECHO)
    proc = dev(script, "-i", "x", "-s", "other.subject", "-n", "renamed")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "other.subject got x\n"

    headless = write_script(tmp_path, "headless.lua", "function OnMessage(s, p) return s .. '|' .. p end\n")
    assert dev(headless, "-i", "x").returncode != 0  # no subject, no name
    proc = dev(headless, "-i", "y", "--subject", "given.here", "--name", "given")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "given.here|y\n"


def test_dev_with_a_library_directory(tmp_path):
    libs = tmp_path / "libs"
    libs.mkdir()
    write_script(libs, "greet.lua", "--* name: greet\nfunction greet(who) return 'Hi, ' .. who end\n")
    script = write_script(tmp_path, "s.lua", "--* subject: dev.lib\n--* name: lib\n--* require: greet\n"
                                             "function OnMessage(_, payload) return greet(payload) end\n")
    proc = dev(script, "-i", "Ann", "-l", libs)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Hi, Ann\n"

    proc = dev(script, "-i", "Ann")  # without -l the library is missing
    assert proc.returncode != 0
    assert "greet" in proc.stderr


def test_dev_with_a_plugin_directory(tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "shout.py").write_text(PLUGIN)
    script = write_script(tmp_path, "s.lua", "--* subject: dev.plugin\n--* name: plugin\n"
                                             "local shout = require('shout')\n"
                                             "function OnMessage(_, payload) return shout.loud(payload) end\n")
    proc = dev(script, "-i", "quiet", "-p", plugins)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "QUIET!\n"

    proc = dev(script, "-i", "quiet")
    assert proc.returncode != 0
    assert "shout" in proc.stderr


def test_dev_nats_is_not_connected(tmp_path):
    script = write_script(tmp_path, "s.lua", "--* subject: dev.nats\n--* name: nats\nlocal nats = require('nats')\n"
                                             "function OnMessage() local r, err = nats.request('x.y', 'p', 1)\n"
                                             "  return tostring(r) .. ' / ' .. tostring(err) end\n")
    proc = dev(script, "-i", "")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("nil / ")
    assert "not connected" in proc.stdout.lower()


def test_dev_script_error_goes_to_stderr_with_nonzero_exit(tmp_path):
    script = write_script(tmp_path, "bad.lua", "--* subject: dev.bad\n--* name: bad\n"
                                               "function OnMessage() someUndefinedFunction() end\n")
    proc = dev(script, "-i", "x")
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert "someUndefinedFunction" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_dev_missing_file_is_a_one_line_error(tmp_path):
    proc = dev(tmp_path / "nope.lua", "-i", "x")
    assert_one_line_error(proc, "nope.lua")


# cli devhttp ------------------------------------------------------------------------------------


class DevHttp:
    """`msgscript cli devhttp FILE --port P ...` running in the background."""

    def __init__(self, *args, cwd: Path):
        self.port = free_port()
        self.log_path = cwd / f"devhttp-{self.port}.log"
        with open(self.log_path, "wb") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen([*MSGSCRIPT, "cli", "devhttp", *map(str, args), "--port", str(self.port)],
                                         cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_port(self.port, 20, self.proc)
        except RuntimeError as e:
            output = self.log_path.read_text(errors="replace")
            raise AssertionError(f"devhttp did not start ({e}); its output ends with:\n{output[-1500:]}") from None
        self.base = f"http://127.0.0.1:{self.port}"

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.base + path, timeout=10, **kw)

    def stop(self) -> int:
        return stop_process(self.proc)


@pytest.fixture
def devhttp():
    started = []

    def start(*args, cwd):
        server = DevHttp(*args, cwd=cwd)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def page_script(greeting: str) -> str:
    return ("--* subject: dev.page\n--* name: page\n--* http: true\n--* require: footer\n"
            f"function GET(url, body) return '<p>{greeting} ' .. url .. '</p>' .. footer(), 201, "
            "{ ['X-Dev'] = 'yes' } end\n")


def rewrite(path: Path, text: str) -> None:
    """Edit a file so that a change in it is visible even within one mtime tick."""
    path.write_text(text)
    stamp = time.time() + 1
    os.utime(path, (stamp, stamp))


def test_devhttp_serves_an_http_script_and_rereads_it_and_its_libraries(tmp_path, devhttp):
    libs = tmp_path / "libs"
    libs.mkdir()
    lib = write_script(libs, "footer.lua", "--* name: footer\nfunction footer() return '<footer>v1</footer>' end\n")
    script = write_script(tmp_path, "page.lua", page_script("Hello"))
    server = devhttp(script, "-l", libs, cwd=tmp_path)

    resp = server.get("/dev.page/a/b?c=d")
    assert resp.status_code == 201
    assert resp.headers["X-Dev"] == "yes"
    assert resp.headers["Content-Type"].startswith("text/html")
    assert resp.text == "<p>Hello /a/b?c=d</p><footer>v1</footer>"

    rewrite(script, page_script("Bonjour"))
    assert server.get("/dev.page/").text == "<p>Bonjour /</p><footer>v1</footer>"

    rewrite(lib, "--* name: footer\nfunction footer() return '<footer>v2</footer>' end\n")
    assert server.get("/dev.page/").text == "<p>Bonjour /</p><footer>v2</footer>"


def test_devhttp_non_http_script_answers_its_payload_as_text(tmp_path, devhttp):
    script = write_script(tmp_path, "echo.lua", ECHO)
    server = devhttp(script, cwd=tmp_path)
    resp = requests.post(f"{server.base}/dev.echo", data=b"posted", timeout=10)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    assert resp.text == "dev.echo got posted"

    rewrite(script, ECHO.replace(" got ", " now got "))
    assert requests.post(f"{server.base}/dev.echo", data=b"again", timeout=10).text == "dev.echo now got again"


# cli completion ---------------------------------------------------------------------------------

COMMAND_WORDS = ("add", "list", "rm", "lib", "dev", "devhttp", "completion")
FLAG_WORDS = ("--subject", "--name", "--library", "--plugin", "--input", "--port", "--backend")


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_script_mentions_commands_and_flags(shell):
    proc = msgscript("cli", "completion", shell)
    assert proc.returncode == 0, proc.stderr
    flags = [f"-l {f[2:]}" for f in FLAG_WORDS] if shell == "fish" else FLAG_WORDS  # fish: `-l subject`
    for word in (*COMMAND_WORDS, *flags, "server", "msgscriptcli"):
        assert word in proc.stdout, f"{word} missing from the {shell} completion"
    if shell != "bash":
        if not shutil.which(shell):
            pytest.skip(f"{shell} is not installed, so its completion script is not syntax-checked")
        check = {"zsh": ["zsh", "-n"], "fish": ["fish", "--no-execute"]}[shell]
        parsed = subprocess.run([*check], input=proc.stdout, capture_output=True, text=True, timeout=30)
        assert parsed.returncode == 0, parsed.stderr


def bash(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)


def test_bash_sources_the_completion_and_completes():
    if not shutil.which("bash"):
        pytest.skip("bash is not installed")
    source = f"source <({shlex.join([*MSGSCRIPT, 'cli', 'completion', 'bash'])})"
    proc = bash(f"{source} && complete -p msgscript && complete -p msgscriptcli")
    assert proc.returncode == 0, proc.stderr
    assert "msgscript" in proc.stdout and "msgscriptcli" in proc.stdout

    def complete(*words: str) -> list[str]:
        line = " ".join(shlex.quote(w) for w in words)
        proc = bash(f"{source}; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; "
                    "_msgscript_complete; printf '%s\\n' \"${COMPREPLY[@]}\"")
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()

    assert set(complete("msgscript", "")) == {"server", "cli"}
    assert {"dev", "devhttp"} <= set(complete("msgscript", "cli", "de"))
    assert "--input" in complete("msgscript", "cli", "dev", "--in")
    assert "--port" in complete("msgscript", "server", "--po")
    assert "list" in complete("msgscriptcli", "li")


# --help and usage errors ------------------------------------------------------------------------

HELP_COMMANDS = [
    ["--help"],
    ["server", "--help"],
    ["cli", "--help"],
    ["cli", "add", "--help"],
    ["cli", "dev", "--help"],
    ["cli", "devhttp", "--help"],
    ["cli", "lib", "--help"],
    ["cli", "completion", "--help"],
]


@pytest.mark.parametrize("args", HELP_COMMANDS, ids=" ".join)
def test_every_command_answers_help(args):
    proc = msgscript(*args)
    assert proc.returncode == 0, proc.stderr
    assert "usage" in (proc.stdout + proc.stderr).lower()


def test_version_is_printed_with_exit_status_0():
    proc = msgscript("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("msgscript ")


def test_no_command_prints_usage_and_fails():
    proc = msgscript()
    assert proc.returncode != 0
    assert "usage" in proc.stderr.lower()
    assert "Traceback" not in proc.stderr


def test_msgscriptcli_answers_help():
    proc = subprocess.run([sys.executable, "-c", "import sys, msgscript; sys.exit(msgscript.cli_main())", "--help"],
                          capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "dev" in proc.stdout and "completion" in proc.stdout


@pytest.mark.parametrize("args, word", [
    (["cli", "nosuch"], "nosuch"),
    (["cli", "dev", "x.lua"], "x.lua"),  # -i is optional: the missing file is the error
    (["server", "-port", "notanumber"], "notanumber"),
    (["nosuch"], "nosuch"),
    (["cli", "devhttp", "nope.lua"], "nope.lua"),
    (["cli", "dev", str(ROOT / "examples" / "hello.lua"), "-i", "x", "-p", "/no/such/plugins"], "/no/such/plugins"),
    (["cli", "dev", str(ROOT / "examples" / "hello.lua"), "-i", "x", "-l", "/no/such/libs"], "/no/such/libs"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_wrong_usage_is_a_one_line_error(args, word):
    assert_one_line_error(msgscript(*args), word)
