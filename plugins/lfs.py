"""`lfs` (layeh/gopher-lfs): a partial LuaFileSystem.

Relative paths are the call's working directory's, a temporary directory of its own (the Go original
runs each message in one): lfs.currentdir() names it and lfs.chdir changes it for the rest of the call.
Deliberate differences: lfs.dir reads the names at once (counted against the script's memory cap as
they are read, and stopping at its deadline) and closes the directory; its second value is a dir object
with :next() and :close(). symlinkattributes' target is an absolute path.
"""

from __future__ import annotations

import os
import stat
import time

from msgscript import LuaError, check_number, check_string, opt_string, truthy
from msgscript import ticker



_MODES = ((stat.S_ISREG, "file"), (stat.S_ISDIR, "directory"), (stat.S_ISLNK, "link"), (stat.S_ISSOCK, "socket"),
          (stat.S_ISFIFO, "named pipe"), (stat.S_ISCHR, "char device"), (stat.S_ISBLK, "block device"))


def _reason(e: OSError) -> str:
    text = e.strerror or str(e)
    return text[:1].lower() + text[1:]


def _os_error(op: str, path: str, e: OSError) -> tuple:
    """`nil, err` with Go's wording: "mkdir /x: file exists"."""
    return None, f"{op} {path}: {_reason(e)}"


def _stat_table(st: os.stat_result) -> dict:
    mode = next((name for test, name in _MODES if test(st.st_mode)), "other")
    return {"dev": st.st_dev, "ino": st.st_ino, "mode": mode, "nlink": st.st_nlink, "uid": st.st_uid,
            "gid": st.st_gid, "rdev": st.st_rdev, "access": int(st.st_atime), "modification": int(st.st_mtime),
            "change": int(st.st_ctime), "size": st.st_size, "blocks": st.st_blocks, "blksize": st.st_blksize}


def _guard(op: str, shown: str, func, *args):
    """Run an os call: `true`, or `nil, err` naming `shown` (the path as the script gave it)."""
    try:
        func(*args)
    except OSError as e:
        return _os_error(op, shown, e)
    return True


def _unimplemented(*_):
    raise LuaError("unimplemented function")


def _names(ctx, path: str) -> list[str]:
    """The names in a directory, read within the script's memory cap and deadline."""
    names, taken, left, tick = [], 0, ctx.max_bytes(), ticker(ctx.check, 256)
    with os.scandir(path) as entries:
        for entry in entries:
            taken += len(entry.name) + 64
            if taken > left:
                ctx.fits(taken, "lfs.dir's names")  # garbage collected first; raises if still over
                left = ctx.max_bytes()
            tick()
            names.append(entry.name)
    return names


def _lfs_module(ctx):
    def attributes(follow: bool, path=None, name=None):
        path = check_string(path, 1)
        name = opt_string(name, 2)
        where = ctx.path(path)
        try:
            table = _stat_table(os.stat(where) if follow else os.lstat(where))
        except OSError as e:
            return _os_error("stat" if follow else "lstat", path, e)
        if not follow and table["mode"] == "link":
            try:
                table["target"] = os.path.realpath(where, strict=True)
            except OSError:
                pass
        return table if name is None else table.get(name)

    def dir_(path=None):
        path = check_string(path, 1)
        where = ctx.path(path)
        try:
            if not stat.S_ISDIR(os.stat(where).st_mode):
                raise LuaError("not a directory")
            names = iter(_names(ctx, where))
        except OSError as e:
            raise LuaError(f"open {path}: {_reason(e)}") from None
        step = lambda *_: next(names, None)  # noqa: E731
        return step, {"next": step, "close": lambda *_: None}

    def rmdir(path=None):
        path = check_string(path, 1)
        where = ctx.path(path)
        try:
            if not stat.S_ISDIR(os.stat(where).st_mode):
                return None, "not a directory"
        except OSError as e:
            return _os_error("stat", path, e)
        return _guard("rmdir", path, os.rmdir, where)

    def touch(path=None, atime=None, mtime=None):
        now = time.time()
        atime = now if atime is None else check_number(atime, 2)
        mtime = atime if mtime is None else check_number(mtime, 3)
        path = check_string(path, 1)
        try:
            os.utime(ctx.path(path), (atime, mtime))
        except OSError as e:
            return _os_error("chtimes", path, e)
        except (OverflowError, ValueError):
            return None, f"chtimes {path}: time out of range"
        return True

    def link(old=None, new=None, symlink=False):
        old, new = check_string(old, 1), check_string(new, 2)
        try:
            if truthy(symlink):
                os.symlink(old, ctx.path(new))  # the link keeps the target as given
            else:
                os.link(ctx.path(old), ctx.path(new))
        except OSError as e:
            return None, f"{'symlink' if truthy(symlink) else 'link'} {old} {new}: {_reason(e)}"
        return True

    def chdir(path=None, *_):
        path = check_string(path, 1)
        try:
            ctx.chdir(path)
        except OSError as e:
            return _os_error("chdir", path, e)
        return True

    def currentdir(*_):
        return ctx.cwd()

    def mkdir(path=None, *_):
        path = check_string(path, 1)
        return _guard("mkdir", path, os.mkdir, ctx.path(path), 0o755)

    return {
        "attributes": lambda path=None, name=None: attributes(True, path, name),
        "symlinkattributes": lambda path=None, name=None: attributes(False, path, name),
        "chdir": chdir,
        "currentdir": currentdir,
        "dir": dir_,
        "mkdir": mkdir,
        "rmdir": rmdir,
        "link": link,
        "touch": touch,
        **{name: _unimplemented for name in ("lock_dir", "lock", "unlock", "setmode")},
    }


###############################################################################


def lua_modules():
    return {"lfs": _lfs_module}
