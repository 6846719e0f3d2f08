"""NATS security as a user sets it up: an nkey seed, TLS with a client certificate, and an
operator's creds file, given as flags or NATS_* variables, for the server, the `nats` Lua
module and `cli dev`; and a one-line error when the NATS server refuses the credentials.

Each mode runs against a real nats-server configured for it (tests/_nats_secure.py)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import pytest
from _nats_secure import ENV_VARS, MODES, connect_error
from conftest import MSGSCRIPT, MsgscriptProcess, free_port, write_script

HELLO = """--* subject: sec.hello
--* name: hello
function OnMessage(_, p) return "hi " .. p end
"""

CALLER = """--* subject: sec.caller
--* name: caller
local nats = require("nats")
function OnMessage(_, p)
  local reply, err = nats.request("sec.hello", p, 2)
  if err ~= nil then return "nats error: " .. err end
  return "via nats: " .. reply
end
"""

# The server gives up within its connect timeout; the rest is interpreter start-up on a slow box.
REFUSAL_DEADLINE = 15

# What each mode's refusal has to say. A missing client certificate reaches the client only as
# a closed TLS connection, so any mention of TLS, certificates or the connection will do.
REFUSAL_WORDS = {"nkey": ("authorization violation",), "creds": ("authorization violation",),
                 "tls": ("certificate", "tls", "ssl", "connection")}


@pytest.fixture(scope="module", params=sorted(MODES))
def secure(request, tmp_path_factory):
    """One secured nats-server per mode, shared by this module's tests."""
    server = MODES[request.param](tmp_path_factory.mktemp(f"nats-{request.param}"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def script_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("scripts")
    write_script(directory, "hello.lua", HELLO)
    write_script(directory, "caller.lua", CALLER)
    return directory


@pytest.fixture(scope="module")
def msgscript_server(secure, script_dir, tmp_path_factory):
    """`msgscript server -natsurl URL <credential flags>` on the mode's nats-server."""
    proc = MsgscriptProcess(["-script", str(script_dir), *secure.server_flags()], tmp_path_factory.mktemp("run"))
    yield proc
    proc.stop()


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without NATS settings of its own, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k != "NATS_URL" and k not in ENV_VARS.values()}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def request(secure, subject: str, data: bytes) -> bytes:
    client = secure.client()
    try:
        return client.request(subject, data).data
    finally:
        client.close()


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def assert_refusal(proc: subprocess.CompletedProcess, mode: str, strict: bool = False) -> None:
    """Non-zero exit, one `error:` line naming the reason, no traceback.

    `strict`: nothing else on stderr (the CLI); the server also logs there."""
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert any(word in lines[0].lower() for word in REFUSAL_WORDS[mode]), lines[0]
    if strict:
        assert proc.stderr.strip() == lines[0], proc.stderr


# The fixtures themselves, checked with plain nats-py -------------------------------------------


def test_fixture_server_accepts_its_credentials(secure):
    client = secure.client()

    async def round_trip():
        async def respond(msg):
            await msg.respond(b"echo " + msg.data)

        await client.nc.subscribe("fixture.echo", cb=respond)
        return (await client.nc.request("fixture.echo", b"ping", timeout=2)).data

    try:
        assert client.run(round_trip()) == b"echo ping"
    finally:
        client.close()


def test_fixture_server_refuses_wrong_and_missing_credentials(secure):
    wrong = connect_error(secure.url, **secure.wrong_client_options)
    assert wrong is not None
    if secure.mode != "tls":
        assert "authorization violation" in str(wrong).lower()
    assert connect_error(secure.url) is not None


# The server and its `nats` module --------------------------------------------------------------


def test_server_connects_and_answers(secure, msgscript_server):
    assert "connected to NATS at" in msgscript_server.log
    for i in range(3):
        assert request(secure, "sec.hello", f"n{i}".encode()) == f"hi n{i}".encode()


def test_nats_module_uses_the_servers_credentials(secure, msgscript_server):
    assert request(secure, "sec.caller", b"x") == b"via nats: hi x"


def test_environment_variables_stand_in_for_the_flags(secure, script_dir, tmp_path):
    proc = MsgscriptProcess(["-script", str(script_dir), "-natsurl", secure.url], tmp_path,
                            env=clean_env(**secure.env()))
    try:
        assert request(secure, "sec.hello", b"env") == b"hi env"
    finally:
        proc.stop()


def test_flags_win_over_environment_variables(secure, script_dir, tmp_path):
    # variables naming files that do not exist: the server only starts if it uses the flags
    missing = {var: str(tmp_path / "missing" / var) for var in secure.env()}
    proc = MsgscriptProcess(["-script", str(script_dir), *secure.server_flags()], tmp_path,
                            env=clean_env(**missing))
    try:
        assert request(secure, "sec.hello", b"flags") == b"hi flags"
    finally:
        proc.stop()


def test_server_refuses_to_start_with_wrong_credentials(secure, script_dir, tmp_path):
    args = ["server", "-port", str(free_port()), "-script", str(script_dir),
            *secure.server_flags(secure.wrong_credentials)]
    started = time.monotonic()
    proc = subprocess.run([*MSGSCRIPT, *args], capture_output=True, text=True, cwd=tmp_path, env=clean_env(),
                          timeout=REFUSAL_DEADLINE)
    assert_refusal(proc, secure.mode)
    assert time.monotonic() - started < REFUSAL_DEADLINE


# cli dev -----------------------------------------------------------------------------------------


def run_with_responder(secure, *args: str) -> subprocess.CompletedProcess:
    """Run `msgscript ARGS` while a nats-py client answers sec.hello on the secured server."""
    client = secure.client()

    async def respond(msg):
        await msg.respond(b"hi " + msg.data)

    async def run():
        await client.nc.subscribe("sec.hello", cb=respond)
        await client.nc.flush()
        proc = await asyncio.create_subprocess_exec(*MSGSCRIPT, *args, env=clean_env(),
                                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())

    try:
        return client.run(run())
    finally:
        client.close()


def test_cli_dev_connects_with_the_credential_flags(secure, script_dir):
    proc = run_with_responder(secure, "cli", "dev", str(script_dir / "caller.lua"), "-i", "x", *secure.cli_flags())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "via nats: hi x\n"


def test_cli_dev_with_wrong_credentials_is_a_one_line_error(secure, script_dir):
    proc = subprocess.run([*MSGSCRIPT, "cli", "dev", str(script_dir / "caller.lua"), "-i", "x",
                           *secure.cli_flags(secure.wrong_credentials)],
                          capture_output=True, text=True, env=clean_env(), timeout=REFUSAL_DEADLINE)
    assert_refusal(proc, secure.mode, strict=True)
