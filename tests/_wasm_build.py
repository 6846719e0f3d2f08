"""Build WASI command modules from C with the `ziglang` package (for tests and examples)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path


def have_zig() -> bool:
    """Whether the `ziglang` package (zig's C compiler) is installed."""
    return importlib.util.find_spec("ziglang") is not None


def build_wasm(src: str | Path, out: str | Path, timeout: float = 300) -> Path:
    """Compile one C file to a wasm32-wasi command module at `out`; returns `out`.

    The first build on a machine also builds zig's WASI libc (~15 s); later
    builds take a fraction of a second.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "ziglang", "cc", "-target", "wasm32-wasi", "-O2", "-s", "-o", str(out), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"building {src} failed:\n{proc.stderr}")
    return out
