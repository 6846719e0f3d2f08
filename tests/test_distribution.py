"""Distribution pieces: Nix files, the NixOS module's command line, the container entry point, the zipapp."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import msgscript

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "nix" / "module.nix"
ENTRYPOINT = ROOT / "container" / "entrypoint.sh"
NIX_FILES = sorted([*ROOT.glob("*.nix"), *(ROOT / "nix").rglob("*.nix")])
NIX_INSTANTIATE = shutil.which("nix-instantiate")
needs_nix = pytest.mark.skipif(NIX_INSTANTIATE is None, reason="nix-instantiate not installed (Debian: nix-bin)")


# Nix files ###################################################################


def test_the_nix_files_exist():
    names = {p.relative_to(ROOT).as_posix() for p in NIX_FILES}
    assert {"flake.nix", "nix/module.nix", "nix/package.nix"} <= names


@needs_nix
@pytest.mark.parametrize("path", NIX_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_nix_file_parses(path):
    proc = subprocess.run([NIX_INSTANTIATE, "--parse", str(path)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


# The NixOS module's command line is one msgscript accepts ####################

# Evaluates nix/module.nix with just enough of nixpkgs' `lib` stubbed in to read its config back.
MODULE_EVAL = r"""
{ modulePath, overrides }:
let
  lib = {
    inherit (builtins) concatStringsSep filter;
    optionals = cond: list: if cond then list else [ ];
    optionalAttrs = cond: attrs: if cond then attrs else { };
    mkOption = option: option;
    mkEnableOption = description: { default = false; inherit description; };
    mkIf = cond: content: if cond then content else { };
    literalExpression = text: text;
    hasPrefix = prefix: s: builtins.substring 0 (builtins.stringLength prefix) s == prefix;
    types = {
      enum = values: { inherit values; };
      listOf = type: "list";
      nullOr = type: type;
      str = "str";
      path = "path";
      package = "package";
      port = "port";
      bool = "bool";
    };
  };
  module = import modulePath {
    inherit lib;
    config.services.msgscript = cfg;
    pkgs.callPackage = path: args: "/nix/store/msgscript";
    utils.escapeSystemdExecArgs = builtins.toJSON;
  };
  options = module.options.services.msgscript;
  isOption = o: o ? default && o ? description;
  defaults = opts: builtins.mapAttrs (name: o: if isOption o then o.default else defaults o) opts;
  merge = a: b: a // builtins.mapAttrs (k: v: if builtins.isAttrs v && builtins.isAttrs (a.${k} or null)
    then merge a.${k} v else v) b;
  cfg = merge (defaults options // { enable = true; }) overrides;
in
{
  inherit (module) config;
  backends = options.backend.type.values;
  logLevels = options.logLevel.type.values;
}
"""


def eval_module(tmp_path, overrides=""):
    """nix/module.nix evaluated with services.msgscript.enable = true plus `overrides` (Nix attrset text)."""
    expr = tmp_path / "eval-module.nix"
    expr.write_text(MODULE_EVAL)
    proc = subprocess.run([NIX_INSTANTIATE, "--eval", "--strict", "--json", str(expr), "--arg", "modulePath",
                           str(MODULE), "--arg", "overrides", f"{{ {overrides} }}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def exec_start_args(evaluated):
    """The argument list after the msgscript executable in the unit's ExecStart."""
    exec_start = evaluated["config"]["systemd"]["services"]["msgscript"]["serviceConfig"]["ExecStart"]
    binary, _, args = exec_start.partition(" ")
    assert binary == "/nix/store/msgscript/bin/msgscript"
    return json.loads(args)


def server_config_for(argv):
    """What `msgscript` makes of a command line: the parsed flags and the validated server config."""
    args = msgscript._parse_args(argv)
    assert args.mode == "server"
    return args, msgscript.server_config(args, {})


@needs_nix
def test_module_defaults_give_a_command_line_the_server_accepts(tmp_path):
    argv = exec_start_args(eval_module(tmp_path))
    args, cfg = server_config_for(argv)
    assert argv[0] == "server"
    assert (cfg.store.backend, cfg.port, cfg.nats.url) == ("file", 7643, "")
    assert cfg.store.script_dir == "/var/lib/msgscript/scripts"
    assert cfg.store.library_dir == "/var/lib/msgscript/libs"
    assert cfg.store.etcd_endpoints == ["http://127.0.0.1:2379"]
    assert cfg.data_dir == "/var/lib/msgscript/nats"  # the embedded NATS keeps JetStream under the data directory
    assert (cfg.http.admin, cfg.http.metrics) == ("local", "local")


@needs_nix
def test_every_module_option_reaches_the_server(tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    secrets = {name: tmp_path / name for name in ("user.creds", "ca.pem", "cert.pem", "key.pem")}
    for path in secrets.values():
        path.write_text("x")
    overrides = (f'backend = "etcd"; etcdEndpoints = [ "http://10.0.0.1:2379" "http://10.0.0.2:2379" ]; '
                 f'natsUrl = "nats://10.0.0.3:4222"; plugins = "{plugins}"; dataDir = "/srv/ms"; port = 8080; '
                 f'nats = {{ credsFile = "{secrets["user.creds"]}"; tls = {{ caFile = "{secrets["ca.pem"]}"; '
                 f'certFile = "{secrets["cert.pem"]}"; keyFile = "{secrets["key.pem"]}"; }}; }}; '
                 'admin = "off"; metrics = "public"; logLevel = "debug"; extraFlags = [ "-workers" "4" ];')
    evaluated = eval_module(tmp_path, overrides)
    args, cfg = server_config_for(exec_start_args(evaluated))
    assert cfg.store.backend == "etcd"
    assert cfg.store.etcd_endpoints == ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
    assert cfg.nats.url == "nats://10.0.0.3:4222"
    assert (cfg.nats.creds, cfg.nats.tls_ca) == (str(secrets["user.creds"]), str(secrets["ca.pem"]))
    assert (cfg.nats.tls_cert, cfg.nats.tls_key) == (str(secrets["cert.pem"]), str(secrets["key.pem"]))
    assert (cfg.http.admin, cfg.http.metrics) == ("off", "public")
    assert cfg.plugin_dirs == [str(plugins)]
    assert (cfg.store.script_dir, cfg.store.library_dir) == ("/srv/ms/scripts", "/srv/ms/libs")
    assert (cfg.port, cfg.log_level, cfg.workers) == (8080, "debug", 4)
    traced = eval_module(tmp_path, 'traces = { enable = true; endpoint = "http://10.0.0.9:4318"; };')
    env = traced["config"]["systemd"]["services"]["msgscript"]["environment"]
    assert env == {"TELEMETRY_TRACES": "1", "OTEL_ENDPOINT": "http://10.0.0.9:4318"}


@needs_nix
def test_every_backend_and_log_level_the_module_offers_is_accepted(tmp_path):
    evaluated = eval_module(tmp_path)
    assert set(evaluated["backends"]) == {"file", "etcd", "nats"}
    for backend in evaluated["backends"]:
        _, cfg = server_config_for(exec_start_args(eval_module(tmp_path, f'backend = "{backend}";')))
        assert cfg.store.backend == backend
    for level in evaluated["logLevels"]:
        _, cfg = server_config_for(exec_start_args(eval_module(tmp_path, f'logLevel = "{level}";')))
        assert cfg.log_level == msgscript.LOG_LEVELS[level]  # the Go names as the server maps them


@needs_nix
def test_the_unit_is_hardened_and_restarts(tmp_path):
    service = eval_module(tmp_path)["config"]["systemd"]["services"]["msgscript"]
    unit = service["serviceConfig"]
    assert (unit["Type"], unit["NotifyAccess"]) == ("notify", "main")  # the server sends READY=1 and STOPPING=1
    assert unit["Restart"] == "on-failure"
    assert unit["NoNewPrivileges"] is True
    assert unit["ProtectSystem"] == "strict"
    assert unit["ReadWritePaths"] == ["/var/lib/msgscript"]
    assert unit["PrivateTmp"] is True
    assert sorted(unit["RestrictAddressFamilies"]) == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert "@system-service" in unit["SystemCallFilter"]
    assert (unit["User"], unit["Group"]) == ("msgscript", "msgscript")
    assert "multi-user.target" in service["wantedBy"]


@needs_nix
def test_module_creates_its_user_and_opens_the_firewall_only_when_asked(tmp_path):
    default = eval_module(tmp_path)["config"]
    assert default["users"]["users"]["msgscript"]["isSystemUser"] is True
    assert "msgscript" in default["users"]["groups"]
    assert default["networking"]["firewall"]["allowedTCPPorts"] == {}
    assert "d /var/lib/msgscript/scripts 0750 msgscript msgscript - -" in default["systemd"]["tmpfiles"]["rules"]
    custom = eval_module(tmp_path, 'user = "svc"; group = "svc"; openFirewall = true; port = 9000;')["config"]
    assert custom["users"]["users"] == {} and custom["users"]["groups"] == {}
    assert custom["networking"]["firewall"]["allowedTCPPorts"] == [9000]
    assert custom["systemd"]["services"]["msgscript"]["serviceConfig"]["User"] == "svc"


def test_flags_written_in_the_module_source_are_server_flags(tmp_path):
    """Without Nix: read the flags out of the module's serverArgs list and hand them to the parser."""
    block = re.search(r"serverArgs\s*=\s*\[(.*?)\+\+\s*cfg\.extraFlags;", MODULE.read_text(), re.S)
    assert block, "nix/module.nix has no `serverArgs = [ ... ] ++ cfg.extraFlags;`"
    words = [w for w in re.findall(r'"([^"]*)"', block.group(1)) if "$" not in w]
    flags = [w for w in words if w.startswith("-")]
    assert words[0] == "server"
    secret = tmp_path / "secret"
    secret.write_text("x")
    samples = {"-backend": "file", "-etcdurl": "http://127.0.0.1:2379,http://10.0.0.2:2379", "-script": str(tmp_path),
               "-library": str(tmp_path), "-port": "7643", "-log": "info", "-natsurl": "nats://127.0.0.1:4222",
               "-plugin": str(tmp_path), "-data": str(tmp_path), "-natscreds": str(secret), "-natsnkey": str(secret),
               "-natstls-ca": str(secret), "-natstls-cert": str(secret), "-natstls-key": str(secret),
               "-admin": "local", "-metrics": "local"}
    assert set(flags) <= set(samples), f"give the new module flags a sample value here: {set(flags) - set(samples)}"
    assert {"-backend", "-etcdurl", "-natsurl", "-plugin", "-script", "-library", "-port"} <= set(flags)
    exclusive = {"-natsnkey"}  # with -natscreds: the module offers both, a server takes one
    argv = ["server"] + [part for flag in flags if flag not in exclusive for part in (flag, samples[flag])]
    args, cfg = server_config_for(argv)
    assert cfg.port == 7643 and cfg.plugin_dirs == [str(tmp_path)]


def test_server_parser_rejects_a_flag_it_does_not_know():
    with pytest.raises(msgscript.ConfigError, match="-no-such-flag"):
        msgscript._parse_args(["server", "-no-such-flag", "x"])


# Container entry point #######################################################


@pytest.fixture
def stub(tmp_path):
    """A stand-in msgscript that prints its arguments as JSON."""
    path = tmp_path / "bin" / "msgscript"
    path.parent.mkdir()
    path.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    path.chmod(0o755)
    return path


def entrypoint(*args, env=None):
    return subprocess.run(["sh", str(ENTRYPOINT), *args], capture_output=True, text=True, timeout=30,
                          env={"PATH": os.environ["PATH"], **(env or {})})


@pytest.mark.parametrize("argv", [
    ["server"],
    ["server", "-script", "/scripts", "-port", "7643", "-natsurl", "nats://n:4222"],
    ["cli", "dev", "/scripts/my script.lua", "-i", "", "-s", "a.*", "--", "$HOME"],
    ["cli", "completion", "bash"],
])
def test_entrypoint_passes_arguments_through_exactly(stub, argv):
    proc = entrypoint(*argv, env={"MSGSCRIPT_BIN": str(stub)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == argv


def test_entrypoint_runs_msgscript_from_path_by_default(stub):
    proc = entrypoint("cli", "list", env={"PATH": f"{stub.parent}:/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == ["cli", "list"]


@pytest.mark.parametrize("argv", [[], ["serve"], ["bash"], ["-script", "/scripts"]])
def test_entrypoint_rejects_anything_but_server_or_cli(stub, argv):
    proc = entrypoint(*argv, env={"MSGSCRIPT_BIN": str(stub)})
    assert proc.returncode == 2
    assert proc.stdout == ""
    first, *rest = proc.stderr.splitlines()
    assert "server or cli" in first
    assert any(line.lstrip().startswith(("usage:", "IMAGE cli")) for line in rest)


def test_entrypoint_help_prints_usage():
    proc = entrypoint("--help")
    assert proc.returncode == 0
    assert "server" in proc.stdout and "cli" in proc.stdout


# Zipapp ######################################################################


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url, proc, deadline):
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"msgscript.pyz exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status, resp.read()
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"no answer from {url}")


@pytest.mark.slow
def test_zipapp_serves_http_and_nats_with_nothing_else_installed(tmp_path):
    """./build_zipapp.sh (about 20 s, fetches wheels), then the .pyz alone on a bare interpreter."""
    python = shutil.which("python3", path="/usr/bin:/bin")
    if python is None:
        pytest.skip("no system python3 in /usr/bin or /bin to run the .pyz with")
    pyz = tmp_path / "msgscript.pyz"
    build = subprocess.run([str(ROOT / "build_zipapp.sh")], env={**os.environ, "PYZ_OUTPUT": str(pyz)},
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    assert "Linux x86_64" in build.stdout

    port = free_port()
    bare_env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SHIV_ROOT": str(tmp_path / "shiv")}
    log = (tmp_path / "server.log").open("w+")
    server = subprocess.Popen([python, str(pyz), "server", "-script", str(ROOT / "examples"), "-port", str(port)],
                              env=bare_env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        status, body = wait_for_http(f"http://127.0.0.1:{port}/http.hello", server, time.monotonic() + 60)
        assert (status, body) == (200, b"Hello, !")
        nats_bin = next((tmp_path / "shiv").glob("*/site-packages/bin/nats-server"))
        assert os.access(nats_bin, os.X_OK)
        log.seek(0)
        urls = re.findall(r"nats://127\.0\.0\.1:\d+", log.read())
        assert urls, "the server log does not say where its embedded nats-server listens"
        assert nats_request(urls[0], "funcs.hello", b"zip") == b"Processed subject: funcs.hello with payload: zip"
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def nats_request(url, subject, payload):
    import asyncio

    import nats

    async def request():
        nc = await nats.connect(url, connect_timeout=5)
        try:
            return (await nc.request(subject, payload, timeout=10)).data
        finally:
            await nc.close()

    return asyncio.run(request())
