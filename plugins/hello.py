"""`hello`: the smallest useful plugin, and a worked example of the plugin interface.

A script uses it like this:

    local hello = require("hello")
    function OnMessage(subject, payload)
      return hello.print()          --> "Hello from a Python plugin!"
    end

HOW A PLUGIN WORKS

1. A plugin is one Python file in a plugin directory (the bundled ones live in `plugins/` and
   import each other as `plugins.<name>`; more directories come from `-plugin DIR`). msgscript
   imports every `*.py` there whose name does not start with `_`. A plugin that fails to import
   is logged and skipped; it never stops the server.

2. The file defines `lua_modules()`, returning `{lua_name: loader}`. One file may register
   several modules (`log.py` adds `log` and `loglevel`).

3. `loader(ctx)` runs the first time a script `require`s the module in a Lua runtime (each
   script has one per worker thread; the result is cached there). It returns one of:
     - a dict of member name -> value: Python functions become Lua functions named after
       their key, other values are converted (str, numbers, booleans, lists, dicts);
     - a str of Lua source that `return`s the module table (`inspect.py`);
     - a Lua value made with `ctx.execute(source, ...)`, e.g. Lua code around Python functions
       passed in as `ctx.module({...})` or `ctx.fn(func)` (`strings.py`, `yaml.py`).

4. A Python function called from Lua (scripts run Lua 5.1, like the Go original's gopher-lua):
     - gets Lua strings as `str` (UTF-8 with surrogateescape: any bytes survive), numbers as int
       or float, booleans, nil as None, tables as lupa tables (`ctx.to_python(t)` makes a dict or
       list). Missing arguments arrive as None and extra ones are dropped, so give parameters
       defaults (`def get(key=None)`) and check them:
           key = msgscript.check_string(key, 1)      # numbers are accepted, as in Lua
       check_string/opt_string, check_number/opt_number, check_integer/opt_integer,
       check_table and check_function raise ArgError, which the script sees as
       "bad argument #1 to 'get' (string expected, got nil)". lua_type(v), is_table(v),
       truthy(v) and lua_tostring(v) answer in Lua's terms.
     - returns a value (str -> string, bytes pass through, dicts/lists -> tables), or a tuple
       for several values: `return None, "not found"` is Lua's `nil, err`, the usual way to
       report a failure a script should handle.
     - raises LuaError("text") for a Lua error with that text (`pcall` catches it). Any other
       exception is a bug in the plugin: it is logged with its traceback and the script gets
       "name: text". Error texts are for scripts: no Python type names or wording
       (msgscript.error_text(exc) words an OSError as Go does: "x: no such file or directory").
     - is wrapped for you: values handed to Lua go through the return value, ctx.to_lua(v) or
       ctx.table(v). Never give Lua a raw Python callable other than through ctx.fn/ctx.module
       (objects kept as opaque handles are fine; Lua sees them as "userdata").

5. Mark a function `@msgscript.pure` only if it has no side effects and is quick (string
   helpers, encoders): a script running inline on the event loop may call it there. Calling any
   other Python function moves the call to a worker thread first.

6. Bounds. Anything that blocks (network, subprocesses, sleeping) waits at most
   `ctx.remaining()` seconds, the time left before the script's deadline (`ctx.remaining(cap)`
   caps it; msgscript.run_command runs a shell command within such a limit). Anything that reads
   files, sockets or command output reads at most `ctx.max_bytes()`, what the script's memory
   cap leaves. A value built for Lua in any other way than the return value, ctx.to_lua or
   ctx.table (e.g. `ctx.lua.table_from`) must be checked first with `ctx.fits(size)`: Lua
   running out of memory while Python pushes a value hangs the whole server.

7. `ctx` also offers `ctx.script` (the Script being run: subject, name, path, base_dir) and
   `ctx.services` (`etcd_endpoints`, `nats`, `store`, `library_dir`).
"""

GREETING = "Hello from a Python plugin!"


def _load(ctx):
    # `ctx` is unused here; a real plugin keeps it for ctx.remaining(), ctx.max_bytes() or
    # ctx.to_python(). The loader runs once per Lua runtime, so per-runtime state (caches,
    # handles) can live in this closure.

    def greet():
        """Print a greeting on the server's stdout and return it to the script."""
        print(GREETING, flush=True)  # a side effect: so not @pure
        return GREETING  # a str return value becomes a Lua string

    return {"print": greet}


def lua_modules():
    """The Lua modules this plugin provides: name -> loader."""
    return {"hello": _load}
