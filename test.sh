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
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else "$@"; fi; }

# --- Debian packages the tests need -------------------------------------------------------
need=()
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
[ -x /bin/busybox ] || need+=(busybox-static)
command -v nix-instantiate >/dev/null || need+=(nix-bin)
command -v psql >/dev/null || need+=(postgresql)
command -v mariadb >/dev/null || command -v mysql >/dev/null || need+=(mariadb-server)
if [ ${#need[@]} -gt 0 ]; then
  log "installing Debian packages: ${need[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# --- database servers (the db plugin tests use the real ones) -------------------------------
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { for _ in $(seq 1 100); do port_open "$1" && return 0; sleep 0.2; done; return 1; }
if ! port_open 5432; then
  log "starting PostgreSQL"
  as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | tail -n1)" main start || true
  wait_port 5432 || { log "PostgreSQL does not answer on 5432"; exit 1; }
fi
as_root su postgres -c "psql -qtc \"SELECT 1 FROM pg_database WHERE datname='test'\" | grep -q 1 || createdb test" \
  2>/dev/null || true
if ! port_open 3306; then
  log "starting MariaDB"
  as_root mkdir -p /run/mysqld && as_root chown mysql:mysql /run/mysqld 2>/dev/null || true
  as_root start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql || true
  wait_port 3306 || { log "MariaDB does not answer on 3306"; exit 1; }
fi
as_root mariadb -uroot -e "CREATE DATABASE IF NOT EXISTS test" 2>/dev/null || true

# --- Python environment -------------------------------------------------------------------
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import lupa, nats, wasmtime, podman, etcd3gw, pytest" \
  || { log "the Python dependencies did not install"; exit 1; }

# --- the tests ----------------------------------------------------------------------------
# nats-server, etcd and the podman API service are started by the tests themselves, on free
# loopback ports, once per session.
exec .venv/bin/python -m pytest -q "$@"
