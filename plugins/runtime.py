"""`runtime`: goos()/goarch() with Go's names for the platform."""

import platform
import sys

from msgscript import pure

_GOARCH = {
    "x86_64": "amd64", "amd64": "amd64", "i386": "386", "i686": "386", "x86": "386",
    "aarch64": "arm64", "arm64": "arm64", "armv6l": "arm", "armv7l": "arm", "armv8l": "arm",
    "ppc64le": "ppc64le", "ppc64": "ppc64", "s390x": "s390x", "riscv64": "riscv64",
    "mips": "mips", "mipsel": "mipsle", "mips64": "mips64", "loongarch64": "loong64",
}


@pure
def goos():
    """The operating system as Go's runtime.GOOS names it."""
    if sys.platform.startswith("win"):
        return "windows"
    for name in ("linux", "darwin", "freebsd", "openbsd", "netbsd", "aix", "sunos"):
        if sys.platform.startswith(name):
            return "solaris" if name == "sunos" else name
    return sys.platform


@pure
def goarch():
    """The CPU architecture as Go's runtime.GOARCH names it."""
    machine = platform.machine()
    return _GOARCH.get(machine.lower(), machine.lower())


def lua_modules():
    """Modules this plugin provides."""
    return {"runtime": lambda ctx: {"goos": goos, "goarch": goarch}}
