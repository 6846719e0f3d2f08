"""`hello`: the smallest useful plugin, and a worked example of the plugin interface.

A script uses it like this:

    local hello = require("hello")
    function OnMessage(subject, payload)
      return hello.print()          --> "Hello from a Python plugin!"
    end

HOW A PLUGIN WORKS

1. A plugin is one Python file in a plugin directory (the bundled ones live in
   `plugins/`; more directories can be given on the command line). msgscript
   imports every `*.py` there whose name does not start with `_`. A plugin that
   fails to import is logged and skipped; it never stops the server.

2. The file defines `lua_modules()`, returning `{lua_name: loader}`. One file
   may register several modules (see `log.py`, which adds `log` and `loglevel`).

3. A loader is called as `loader(ctx)` the first time a script `require`s the
   module in a Lua runtime (each script has its own runtime per worker thread,
   and `require` caches the result there). It returns one of:
     - a dict of member name -> value. Python callables become Lua functions;
       strings, numbers, booleans, lists and dicts are converted to Lua values;
     - a str of Lua source that `return`s the module table (a pure-Lua module,
       see `inspect.py`);
     - a Lua table built with `ctx.lua.execute(...)` (mixed modules, see
       `strings.py` or `yaml.py`).

4. Calling conventions for the Python functions:
     - Lua strings arrive as `str` (decoded as UTF-8 with surrogateescape, so any
       bytes survive a round trip). Numbers, booleans and nil arrive as Python
       values; Lua tables arrive as lupa tables (`ctx.to_python(t)` turns one
       into a dict or list).
     - Returning a value returns it to Lua (`str` becomes a Lua string, `bytes`
       passes through untouched, dicts/lists become tables). Returning a tuple
       returns several values: `return None, "error text"` gives Lua `nil, err`,
       the usual convention for failures a script should handle.
     - Raising an exception raises a Lua error (`pcall` catches it; its message
       is `str(exception)`). Use this for programming errors such as a wrong
       argument type.
     - Never hand a Python `str` to Lua yourself other than as a return value:
       the conversion happens in the wrapper around your function.

5. Anything that can block (network, subprocesses, sleeping) must be bounded by
   `ctx.remaining()`: the seconds left before the running script's deadline
   (`ctx.remaining(cap)` also caps it). See `cmd.py` and `time.py`.

6. `ctx` also offers `ctx.script` (the Script being run: subject, name, path...)
   and `ctx.services` (`etcd_endpoints`, `nats`, `store`).
"""

GREETING = "Hello from a Python plugin!"


def _load(ctx):
    # `ctx` is unused here; a real plugin would keep it for ctx.remaining(),
    # ctx.to_python() or ctx.lua. The loader runs once per Lua runtime, so
    # per-runtime state (caches, handles) can live in this closure.

    def greet():
        """Print a greeting on the server's stdout and return it to the script."""
        print(GREETING, flush=True)
        return GREETING  # a str return value becomes a Lua string

    return {"print": greet}


def lua_modules():
    """The Lua modules this plugin provides: name -> loader."""
    return {"hello": _load}
