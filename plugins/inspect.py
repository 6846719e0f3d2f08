"""`inspect`: human-readable dumps of Lua values, output-compatible with kikito's inspect.lua 3.1.0.

Written from scratch for msgscript (pure Lua, in inspect.lua); only the output format follows inspect.lua.
"""


def lua_modules():
    """Modules this plugin provides (pure Lua)."""
    return {"inspect": lambda ctx: ctx.execute_file("inspect.lua")}
