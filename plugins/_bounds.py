"""What the bundled modules share to keep the cost of a script's call bounded (not a plugin: its name
starts with "_"). Every function a script can reach checks its cost from its arguments before the work,
looks at the call's clock in every loop whose length the script controls, and opens files only through
msgscript.open_file.
"""

from __future__ import annotations

import os

from msgscript import INLINE_SIZE, open_file

CHECK_EVERY = 1024  # iterations of a module's loop between two looks at the call's clock


def ticker(ctx, every: int = CHECK_EVERY, check=None):
    """A function to call once per iteration of a loop a script controls (or with the work done, `tick(n)`):
    every `every` units it calls ctx.check() (or `check`), which fails past the call's deadline and, for a
    call on the event loop past its inline budget, moves the call to a worker."""
    check = check or ctx.check
    done = 0

    def tick(n: int = 1) -> None:
        nonlocal done
        done += n
        if done >= every:
            done = 0
            check()

    return tick


def table_items(table, tick) -> list:
    """A Lua table's (key, value) pairs, read with a `tick()` every CHECK_EVERY: a table of millions of
    keys takes a while to read from Python, so an inline call moves off the event loop on the way."""
    items = []
    append = items.append
    for pair in table.items():
        append(pair)
        if len(items) % CHECK_EVERY == 0:
            tick(CHECK_EVERY)
    return items


def off_loop(ctx, size: int) -> None:
    """Work on `size` bytes of input is not for the event loop: an inline call moves to a worker first."""
    if size > INLINE_SIZE:
        ctx.move_to_worker()


def text_cost(text: str | bytes) -> int:
    """Bytes a string of this text takes in Python (1, 2 or 4 a character)."""
    if isinstance(text, bytes) or text.isascii():
        return len(text) + 64
    return 4 * len(text) + 64


def json_cost(text: str | bytes) -> int:
    """About how many bytes of Python objects json.loads makes of `text`, from a scan that allocates nothing.

    Measured on CPython 3.11: a container is 56-64 bytes, a number 24 plus its list slot, a string about
    50 plus its text, a member of an object about 60; so `[[],[],...]` makes 21 times its text and
    `[{},{},...]` 24 times. Each count errs on the large side.
    """
    count = text.count
    if isinstance(text, bytes):
        brackets, colons, commas, quotes = count(b"{") + count(b"["), count(b":"), count(b","), count(b'"')
    else:
        brackets, colons, commas, quotes = count("{") + count("["), count(":"), count(","), count('"')
    return text_cost(text) + 64 * brackets + 64 * colons + 32 * commas + 25 * quotes


def yaml_cost(text: str) -> int:
    """About how many bytes of Python objects PyYAML makes of `text` (its node graph, then the values).

    A node (a scalar, a sequence or a mapping, with its two marks) costs PyYAML 370-480 bytes; every node
    but the first follows a line break, a ",", a ":", a "[", a "{", a "- " or a "? ", which the scan counts.
    """
    count = text.count
    nodes = 1 + count("\n") + count(",") + count(":") + count("[") + count("{") + count("- ") + count("? ")
    return 2 * text_cost(text) + 500 * nodes


def refuse_if_over(ctx, cost: int, what: str) -> None:
    """LuaError when `cost` bytes (what the work would allocate in Python) do not fit in what the script's
    memory cap leaves, garbage collected: "<what> of about N bytes does not fit in the script's memory
    limit (16 MiB)"."""
    if cost > ctx.max_bytes():
        ctx.fits(cost, what)  # collects the script's garbage first; raises if it still does not fit


def read_file(ctx, path: str, limit: int) -> bytes:
    """The bytes of the file a script names (relative to the call's working directory), at most `limit`
    of them: OSError if it cannot be opened (FIFOs, sockets and devices are refused), ValueError if larger."""
    fd = open_file(ctx.path(path))
    with os.fdopen(fd, "rb") as f:
        if os.fstat(fd).st_size > limit:
            raise ValueError(f"{path}: file larger than the script's memory limit allows ({limit} bytes)")
        data = f.read(limit + 1)  # files in /proc report size 0: the read itself is bounded too
    if len(data) > limit:
        raise ValueError(f"{path}: file larger than the script's memory limit allows ({limit} bytes)")
    return data
