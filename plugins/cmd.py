"""`cmd`: cmd.exec(command [, timeout]) running `sh -c` in the call's working directory, bounded by the
script's deadline and memory cap."""

from msgscript import LuaError, check_string, opt_number, run_command

DEFAULT_TIMEOUT = 10
_TIMED_OUT = "script timed out"  # how run_command reports that its time ran out


def _load(ctx):
    def exec_(command=None, timeout=None):
        """{status, stdout, stderr}, or nil, err ("execute timeout" when `timeout` seconds pass)."""
        command = check_string(command, 1)
        timeout = opt_number(timeout, 2, DEFAULT_TIMEOUT)
        left = ctx.remaining()
        try:
            # the whole process group is killed at the limit; stdout + stderr may not exceed the memory cap
            result = run_command(command, max(0.0, min(timeout, left)), ctx.max_bytes(), cwd=ctx.cwd())
        except LuaError as e:
            if str(e) != _TIMED_OUT:
                return None, str(e)  # could not start, or too much output
            if timeout < left:
                return None, "execute timeout"
            raise  # the script's own deadline: the call fails as a timeout
        status = -1 if getattr(result, "signal", 0) else result.status  # Go: -1 when a signal killed it
        return {"status": status, "stdout": result.stdout, "stderr": result.stderr}

    return {"exec": exec_}


def lua_modules():
    """Modules this plugin provides."""
    return {"cmd": _load}
