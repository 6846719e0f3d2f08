"""A private `podman system service` for tests, with a tiny busybox image imported locally.

No registry is reachable from the test machines, and podman there only works
with runc, the cgroupfs cgroup manager and lowered ulimits; all of that goes
into a containers.conf (CONTAINERS_CONF) and a storage.conf
(CONTAINERS_STORAGE_CONF) under a temporary directory, so the service and
its images and containers are isolated from the machine's own podman.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

IMAGE = "localhost/msgscript-busybox:latest"
BUSYBOX_APPLETS = ("sh", "cat", "echo", "env", "sleep", "true", "false", "printf", "ls", "id", "wc")

CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]

[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
events_logger = "file"
tmp_dir = "{root}/tmp"
volume_path = "{root}/volumes"
"""

STORAGE_CONF = """\
[storage]
driver = "vfs"
graphroot = "{root}/storage"
runroot = "{root}/run"
"""


def missing_tools() -> str:
    """Why a podman service cannot be started here ('' when it can)."""
    for tool in ("podman", "runc", "conmon"):
        if not shutil.which(tool) and not Path(f"/usr/bin/{tool}").exists():
            return f"{tool} is not installed (Debian packages podman, runc)"
    if not busybox_path():
        return "busybox is not installed (Debian package busybox-static)"
    return ""


def busybox_path() -> str:
    """A statically linked busybox to build the test image from."""
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        if Path(candidate).exists():
            return candidate
    return shutil.which("busybox") or ""


def podman_env(root: str | Path) -> dict[str, str]:
    """The environment a podman CLI or service needs to use the storage under `root`."""
    root = Path(root)
    env = dict(os.environ)
    env["CONTAINERS_CONF"] = str(root / "containers.conf")
    env["CONTAINERS_STORAGE_CONF"] = str(root / "storage.conf")
    env.pop("CONTAINER_HOST", None)
    return env


def write_config(root: str | Path) -> dict[str, str]:
    """Write containers.conf and storage.conf under `root`; returns the podman environment."""
    root = Path(root)
    for sub in ("tmp", "volumes", "storage", "run"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "containers.conf").write_text(CONTAINERS_CONF.format(root=root))
    (root / "storage.conf").write_text(STORAGE_CONF.format(root=root))
    return podman_env(root)


def import_busybox(root: Path, env: dict[str, str], image: str = IMAGE) -> str:
    """Import a rootfs holding only busybox and its applet links as `image`."""
    tar_path = root / "busybox-rootfs.tar"
    with tarfile.open(tar_path, "w") as tar:
        for d in ("bin", "tmp", "etc"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        tar.add(busybox_path(), "bin/busybox")
        for applet in BUSYBOX_APPLETS:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
    subprocess.run(["podman", "import", str(tar_path), image], env=env, check=True, capture_output=True, timeout=60)
    return image


def _wait_for_socket(path: Path, proc: subprocess.Popen, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"podman system service exited with status {proc.returncode}")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"podman system service did not create {path} within {timeout}s")


def start_podman_service(root: str | Path | None = None):
    """Start a private podman API service; returns (socket_url, image, stop)."""
    root = Path(root or tempfile.mkdtemp(prefix="msgscript-podman-"))
    env = write_config(root)
    image = import_busybox(root, env)
    sock = root / "podman.sock"
    with open(root / "service.log", "wb") as log:
        proc = subprocess.Popen(
            ["podman", "system", "service", "--time=0", f"unix://{sock}"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        _wait_for_socket(sock, proc)
    except Exception:
        proc.kill()
        proc.wait()
        raise

    def stop():
        subprocess.run(["podman", "rm", "--all", "--force"], env=env, capture_output=True, timeout=60)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)

    return f"unix://{sock}", image, stop
