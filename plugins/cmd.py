"""`cmd`: cmd.exec(command [, timeout]) running `sh -c`, bounded by the script's deadline."""

import os
import signal
import subprocess

DEFAULT_TIMEOUT = 10


def _kill_group(proc):
    """Kill the shell and everything it started (it leads its own process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        pipe.close()


def execute(command, timeout, limit):
    """Run `sh -c command`; a result dict, or (None, err). `limit` caps the timeout (script deadline)."""
    try:
        proc = subprocess.Popen(
            ["sh", "-c", command], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True,
        )
    except OSError as e:
        return None, str(e)
    try:
        out, err = proc.communicate(timeout=max(0.0, min(timeout, limit)))
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return None, "execute timeout"
    except BaseException:
        _kill_group(proc)
        raise
    status = proc.returncode if proc.returncode >= 0 else -1
    return {"status": status, "stdout": out, "stderr": err}


def _load(ctx):
    def exec_(command, timeout=None):
        if isinstance(command, (int, float)) and not isinstance(command, bool):
            command = str(command)
        if not isinstance(command, str):
            raise TypeError(f"bad argument #1 to exec (string expected, got {type(command).__name__})")
        if timeout is None:
            timeout = DEFAULT_TIMEOUT
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise TypeError(f"bad argument #2 to exec (number expected, got {type(timeout).__name__})")
        return execute(command, timeout, ctx.remaining())

    return {"exec": exec_}


def lua_modules():
    """Modules this plugin provides."""
    return {"cmd": _load}
