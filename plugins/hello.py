"""`hello`: the smallest useful plugin, and a worked example of the plugin interface.

A script uses it like this:

    local hello = require("hello")
    function OnMessage(subject, payload)
      return hello.print()          --> "Hello from a Python plugin!"
    end

HOW A PLUGIN WORKS

1. A plugin is one Python file in a plugin directory (the bundled ones live in `plugins/`, installed
   as the package `msgscript_plugins`; more directories come from `-plugin DIR`). msgscript imports
   every `*.py` there whose name does not start with `_`. A plugin that fails to import is logged
   and skipped; it never stops the server. Everything a plugin needs comes from `msgscript`:
       from msgscript import LuaError, ArgError, check_string, opt_string, check_number, opt_number,
           check_integer, opt_integer, check_table, check_function, truthy, lua_type, is_table,
           lua_tostring, lua_text, pure, error_text, run_command, open_file, OutputBudget, INLINE_SIZE,
           ticker, table_keys, TimedOut
   The API is versioned: msgscript.PLUGIN_API is 2. A plugin may set `API = 2` (the version it was
   written for); one that needs a newer API than the server has is refused when it loads.

2. The file defines `lua_modules()`, returning `{lua_name: loader}`. One file may register
   several modules (`log.py` adds `log` and `loglevel`).

3. `loader(ctx)` runs the first time a script `require`s the module in a Lua runtime (each
   script has one per worker thread; the result is cached there). It returns one of:
     - a dict of member name -> value: Python functions become Lua functions named after
       their key, other values are converted (str, numbers, booleans, lists, dicts);
     - a Lua value made with the safe `ctx` methods below, e.g. Lua code around Python functions
       passed in as `ctx.module({...})` or `ctx.fn(func)` (`strings.py`, `yaml.py`);
     - a str of Lua source that `return`s the module table (run as ctx.execute would run it).
   Lua code longer than a line or two lives in a `.lua` file beside the plugin and is run with
   `ctx.execute_file("name.lua", args...)` (a bare name is the bundled plugins' folder; give a
   user plugin's own file by absolute path, e.g. `Path(__file__).with_name("x.lua")`). The file
   gets its arguments as `...` and PRELUDE's helpers as locals: `readonly(t)` (a view scripts
   cannot change), `class(methods, fields)` (a metatable for a module's objects, and its public
   view), `call(f, ...)` (calls a Python function so that its errors point at the script's line).

4. Pushing values into Lua: ONLY through the safe ctx methods.
       ctx.fn(func, name)        a Python function as a Lua function
       ctx.module({...})         a table of members (functions through ctx.fn)
       ctx.table(dict_or_list)   a new Lua table (values converted)
       ctx.to_lua(value)         any Python value as a Lua value
       ctx.readonly(table)       a read-only view of a Lua table
       ctx.execute(source, *args, name=...) / ctx.execute_file("x.lua", *args)   Lua code
   and a function's return value (converted the same way). Each checks the size of what it pushes
   against the script's memory cap first: Lua running out of memory while Python pushes a value
   hangs the whole server. Never use `ctx.lua` (the raw runtime: `execute`, `eval`, `table_from`,
   `globals`...) in a plugin; the bundled plugins are tested for it.

5. A Python function called from Lua (scripts run Lua 5.1, like the Go original's gopher-lua):
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
       Do not catch every Exception around code that calls ctx.check() or ctx.blocking(): let
       their LuaError (a timeout) and the move to a worker pass through.

6. Mark a function `@msgscript.pure` only if it has no side effects and is quick on small input
   (string helpers, encoders): a script running inline on the event loop may call it there. Calling
   any other Python function moves the call to a worker thread first. A pure function whose input
   turns out big calls `ctx.move_to_worker(size)` before the work (the call is run again on a worker
   when `size` is over INLINE_SIZE bytes: that is not for the event loop).

7. Bounds: every function a script can reach has a bounded cost, checked before the work.
     - Time. Anything that blocks waits at most `ctx.remaining()` seconds, the time left before the
       script's deadline (`ctx.remaining(cap)` caps it). Work that cannot be given a timeout (a DNS
       lookup, a library's connect) runs with `ctx.blocking(func, *args, cap=None)` on the
       scheduler's bounded executor, waited for until the deadline (LuaError "script timed out";
       "timed out" when `cap` came first; both are msgscript.TimedOut); a plugin never starts a thread
       of its own.
       msgscript.run_command runs a shell command within a limit (pass `cwd=ctx.cwd()`). A Python
       loop whose length a script controls calls `ctx.check()` every thousand iterations or so: it
       fails past the deadline and, on the event loop past the inline budget, moves the call to a
       worker (`tick = msgscript.ticker(ctx.check)`, then `tick()` once per iteration, does the
       counting; `msgscript.table_keys(table, tick)` reads a big table's keys that way: read its
       values one at a time, as a table may hold one big string many times). A single long C call
       that holds the interpreter lock must be bounded in size (a
       few tens of milliseconds at most) or split.
     - Memory. Anything that reads files, sockets or command output reads at most
       `ctx.max_bytes()`, what the script's memory cap leaves (`ctx.read_file(path)` reads a file
       that way); memory a function spends in Python
       (a decoder's objects, a split's pieces) is estimated from its input and refused before it is
       allocated when it does not fit (`ctx.fits(size, what)` raises the usual LuaError).
     - Files. Every file a plugin opens for a script goes through `msgscript.open_file(path, flags)`,
       which refuses FIFOs, sockets and devices (a read from them could block for ever). A script's
       relative path is resolved in the call's own working directory: `ctx.path(p)`. `ctx.cwd()` is
       that directory (a temporary directory made for the call, removed when it ends, as the Go
       original runs each message in a fresh one) and `ctx.chdir(p)` changes it (lfs.chdir).

8. `ctx` also offers `ctx.script` (the Script being run: subject, name, path, base_dir),
   `ctx.services` (`etcd_endpoints`, `nats`, `store`, `library_dir`) and `ctx.state(key, make)`
   (per-runtime state shared by a plugin's loaders and functions, made on first use).
"""

API = 2  # the plugin API this file was written for (msgscript.PLUGIN_API)

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
