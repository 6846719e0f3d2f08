"""Replies still arrive when the NATS server wants a password or a token (direct replies
must authenticate like the main connection, or step aside)."""

from __future__ import annotations

import subprocess

from conftest import Nats, free_port, wait_port, write_script

import msgscript

HELLO = "--* subject: auth.hello\n--* name: hello\nfunction OnMessage(_, p) return 'hi ' .. p end\n"


def run_auth_server(*auth_args):
    port = free_port()
    proc = subprocess.Popen([msgscript.find_nats_server(), "-a", "127.0.0.1", "-p", str(port), *auth_args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc=proc)
    return port, proc


def test_user_password_and_token_in_the_url(start_server, tmp_path):
    write_script(tmp_path, "h.lua", HELLO)
    for args, url_auth in ((["--user", "ms", "--pass", "s3cret"], "ms:s3cret@"), (["--auth", "tok3n"], "tok3n@")):
        port, proc = run_auth_server(*args)
        try:
            url = f"nats://{url_auth}127.0.0.1:{port}"
            start_server("-script", str(tmp_path), "-natsurl", url, nats=False)
            client = Nats(url)
            try:
                for i in range(5):
                    assert client.request("auth.hello", f"n{i}".encode()).data == f"hi n{i}".encode()
            finally:
                client.close()
        finally:
            proc.terminate()
            proc.wait(10)


def test_replies_under_allow_responses_permissions(start_server, tmp_path):
    """A service user that may only publish replies to requests it received itself."""
    conf = tmp_path / "nats.conf"
    conf.write_text("""authorization {
  users = [
    {user: svc, password: pw, permissions: {subscribe: ">", publish: {deny: ">"}, allow_responses: true}},
    {user: cli, password: pw}
  ]
}
""")
    write_script(tmp_path, "h.lua", HELLO)
    port, proc = run_auth_server("-c", str(conf))
    try:
        start_server("-script", str(tmp_path), "-natsurl", f"nats://svc:pw@127.0.0.1:{port}", nats=False)
        client = Nats(f"nats://cli:pw@127.0.0.1:{port}")
        try:
            for i in range(6):
                assert client.request("auth.hello", f"r{i}".encode(), timeout=3).data == f"hi r{i}".encode()
        finally:
            client.close()
    finally:
        proc.terminate()
        proc.wait(10)
