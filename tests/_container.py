"""Build the msgscript image (Containerfile) with podman, offline, on a base made from Debian packages.

No image registry is reachable from the test machines, so the base image is made by
container/make-base.sh (debootstrap of bookworm with python3, then `podman import`), and pip in
the build installs from wheels downloaded on the host beforehand (`--network none` build): pip
inside a container does not have this machine's pip configuration (local indexes, CA bundle;
PyPI's TLS certificate does not verify there), and an offline build needs no network at all.

Everything slow is cached outside the checkout, in $MSGSCRIPT_CACHE (default
${XDG_CACHE_HOME:-~/.cache}/msgscript):
- base-bookworm.tar: the base's root filesystem (debootstrap: about a minute the first time);
- wheels/<key>/: the dependencies' wheels for Python 3.11 on Linux, keyed by the requirements
  (about 10 s to download; refreshed weekly);
- podman-<driver>/: a podman storage of its own (containers.conf as in tests/_podman.py: runc,
  cgroupfs, lowered ulimits; overlay where the kernel has it), which keeps the imported base and
  the build cache, so an image whose dependencies did not change builds in a few seconds. The
  images and containers a test run makes are removed at its end; build-cache layers after
  three days.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from _podman import CONTAINERS_CONF, podman_env

ROOT = Path(__file__).resolve().parent.parent
MAKE_BASE = ROOT / "container" / "make-base.sh"
BASE_IMAGE = "localhost/msgscript-base:bookworm"
IMAGE_REPO = "localhost/msgscript-test"
LABEL = "msgscript-test=1"
# The base's interpreter and C library (Debian bookworm: Python 3.11, glibc 2.36): the wheels
# must suit them, whatever Python runs the tests.
TARGET_PYTHON = "3.11"
TARGET_GLIBC = (2, 36)
WHEELS_MAX_AGE = 7 * 86400
# What the Containerfile copies from the build context.
IMAGE_FILES = ("Containerfile", "pyproject.toml", "msgscript.py", "README.md", "container/entrypoint.sh")
IMAGE_DIRS = ("plugins",)

STORAGE_CONF = """\
[storage]
driver = "{driver}"
graphroot = "{root}/storage"
runroot = "{state}/run"
"""


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "msgscript"
    path = Path(os.environ.get("MSGSCRIPT_CACHE") or default)
    path.mkdir(parents=True, exist_ok=True)
    return path


def missing_tools() -> str:
    """Why the image cannot be built here ('' when it can)."""
    for tool, package in (("podman", "podman"), ("runc", "runc"), ("conmon", "conmon"), ("debootstrap", "debootstrap")):
        if not (shutil.which(tool) or any(Path(d, tool).exists() for d in ("/usr/bin", "/usr/sbin", "/sbin"))):
            return f"{tool} is not installed (Debian package {package})"
    if os.geteuid() != 0 and not shutil.which("sudo") and not (cache_dir() / "base-bookworm.tar").exists():
        return "making the base image needs root (debootstrap), and sudo is not installed"
    return ""


def _fs_type(path: Path) -> str:
    """The file system type of the mount holding `path` (from /proc/self/mountinfo)."""
    best, fstype = "", ""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return ""
    target = str(path.resolve())
    for line in lines:
        fields = line.split()
        mount, post = fields[4], fields[fields.index("-") + 1:]
        if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, fstype = mount, post[0] if post else ""
    return fstype


def storage_driver(cache: Path) -> str:
    """overlay where the kernel has it and the cache is not itself on overlayfs, else vfs."""
    if os.environ.get("MSGSCRIPT_TEST_STORAGE_DRIVER"):
        return os.environ["MSGSCRIPT_TEST_STORAGE_DRIVER"]
    try:
        kernel_has_overlay = "overlay" in Path("/proc/filesystems").read_text().split()
    except OSError:
        kernel_has_overlay = False
    return "overlay" if kernel_has_overlay and _fs_type(cache) not in ("overlay", "fuse.fuse-overlayfs") else "vfs"


def podman_storage(cache: Path) -> dict[str, str]:
    """The environment for podman commands on the cached storage of these tests.

    Images live in the cache; podman's run-time state goes under /run when root (cleared at boot,
    as podman expects), else next to the images. The paths are the same every time: podman
    refuses a storage whose recorded paths changed.
    """
    driver = storage_driver(cache)
    root = cache / f"podman-{driver}"
    state = Path("/run/msgscript-test") / f"podman-{driver}" if os.geteuid() == 0 else root
    for sub in (root / "storage", state / "tmp", state / "volumes", state / "run"):
        sub.mkdir(parents=True, exist_ok=True)
    for path, text in ((root / "containers.conf", CONTAINERS_CONF.format(root=state)),
                       (root / "storage.conf", STORAGE_CONF.format(root=root, state=state, driver=driver))):
        if not path.exists() or path.read_text() != text:  # never rewritten under a running podman
            path.write_text(text)
    env = podman_env(root)
    env["MSGSCRIPT_CACHE"] = str(cache)
    return env


def podman(env: dict[str, str], *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["podman", *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} exited with {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc


def make_base(env: dict[str, str]) -> str:
    """The base image in the cached storage: made once, imported from the cached tarball after that."""
    proc = subprocess.run(["sh", str(MAKE_BASE), BASE_IMAGE], env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"container/make-base.sh exited with {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return BASE_IMAGE


def _requirements(pyproject: Path) -> list[str]:
    """The project's dependencies and its build backend (pip builds msgscript inside the image)."""
    data = tomllib.loads(pyproject.read_text())
    return sorted(data["project"]["dependencies"]) + sorted(data["build-system"]["requires"])


def _target_platforms() -> list[str]:
    """pip's --platform values for the base: manylinux tags up to its glibc (pip does not expand them)."""
    arch = platform.machine()
    tags = [f"manylinux_{TARGET_GLIBC[0]}_{minor}_{arch}" for minor in range(TARGET_GLIBC[1], 4, -1)]
    return tags + [f"manylinux2014_{arch}", f"manylinux2010_{arch}", f"manylinux1_{arch}", f"linux_{arch}"]


def _pip(*args: str) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=600)
    noise = "is ignored: it is neither a file nor a directory"  # this machine's extra indexes
    return proc.returncode, "\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if noise not in line)


def wheels(cache: Path, pyproject: Path) -> Path:
    """A directory of wheels for the image's Python: every dependency and the build backend.

    `pip download` (with this machine's pip configuration and indexes) of binary wheels for the
    target interpreter and platform, whatever Python runs the tests. A requirement that has no
    wheel (a pure-Python sdist, such as nkeys) is built into one by `pip wheel` here, and the
    download tried again. Cached by the requirement list, for a week.
    """
    requirements = _requirements(pyproject)
    platforms = _target_platforms()
    key = hashlib.sha256(json.dumps([requirements, TARGET_PYTHON, platforms]).encode()).hexdigest()[:16]
    directory = cache / "wheels" / key
    marker = directory / ".complete"
    if marker.exists() and time.time() - marker.stat().st_mtime < WHEELS_MAX_AGE:
        return directory
    partial = directory.with_name(f"{key}.{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    download = ["download", "--quiet", "--only-binary=:all:", "--python-version", TARGET_PYTHON,
                "--implementation", "cp", "--abi", "cp" + TARGET_PYTHON.replace(".", ""),
                "--dest", str(partial), "--find-links", str(partial)]
    for tag in platforms:
        download += ["--platform", tag]
    built: set[str] = set()
    while True:
        status, out = _pip(*download, *requirements)
        if status == 0:
            break
        missing = re.findall(r"No matching distribution found for (\S+)", out)
        if not missing or missing[0] in built:
            raise RuntimeError(f"pip download of the image's wheels failed:\n{out}")
        built.add(missing[0])
        status, built_out = _pip("wheel", "--quiet", "--no-deps", "--wheel-dir", str(partial), missing[0])
        if status != 0:
            raise RuntimeError(f"{missing[0]} has no wheel for the image, and pip wheel failed:\n{built_out}")
    (partial / ".complete").write_text("\n".join(requirements) + "\n")
    shutil.rmtree(directory, ignore_errors=True)
    partial.rename(directory)
    return directory


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard links keep the files' times, so podman's build cache sees the same wheels each run."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def build_context(dest: Path, wheel_dir: Path) -> Path:
    """A clean copy of what the image is built from (no .venv, caches or stray wheels), plus the wheels."""
    for name in IMAGE_FILES:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    for name in IMAGE_DIRS:
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (dest / "container" / "wheels").mkdir(parents=True)
    for wheel in wheel_dir.glob("*.whl"):
        _link_or_copy(wheel, dest / "container" / "wheels" / wheel.name)
    return dest


def remove_leftovers(env: dict[str, str], older_than: float = 3600) -> None:
    """What crashed earlier runs left in the cached storage: stopped containers, old test images,
    and build-cache layers made more than three days ago (those still in use are made again by
    the next build), so that the cache does not grow without bound."""
    podman(env, "container", "prune", "--force", "--filter", f"label={LABEL}", check=False)
    listing = podman(env, "images", "--filter", f"reference={IMAGE_REPO}", "--format", "{{.Repository}}:{{.Tag}}",
                     check=False).stdout.split()
    for ref in listing:
        stamp = ref.removeprefix(IMAGE_REPO + ":").partition("-")[0]
        if ref.startswith(IMAGE_REPO + ":") and stamp.isdigit() and time.time() - int(stamp) > older_than:
            podman(env, "rmi", "--force", ref, check=False)
    podman(env, "image", "prune", "--force", "--filter", "until=72h", check=False)


def build_image(env: dict[str, str], context: Path, base: str, tag: str) -> str:
    """`podman build` of the Containerfile on `base`, offline, from the wheels in the context."""
    proc = subprocess.run(
        ["podman", "build", "--network", "none", "--format", "docker", "--label", LABEL,
         "--build-arg", f"BASE={base}", "--build-arg", "PIP_INSTALL_ARGS=--no-index --find-links /src/wheels",
         "--tag", tag, "--file", "Containerfile", "."],
        cwd=context, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"podman build exited with {proc.returncode}:\n{proc.stdout[-6000:]}{proc.stderr[-4000:]}")
    return tag


def new_tag() -> str:
    """A tag of this run's image; it starts with the time, for remove_leftovers."""
    return f"{IMAGE_REPO}:{int(time.time())}-{os.getpid()}"
