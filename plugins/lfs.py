"""`lfs` (layeh/gopher-lfs): a partial LuaFileSystem.

Deliberate differences: lfs.dir lists the names at once and closes the directory; its second
value is a dir object with :next() and :close(). symlinkattributes' target is an absolute path.
"""

from __future__ import annotations

import functools
import os
import stat
import time

from msgscript import LuaError, check_number, check_string, opt_string, truthy


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


def _attributes(follow: bool, path=None, name=None):
    path = check_string(path, 1)
    name = opt_string(name, 2)
    try:
        table = _stat_table(os.stat(path) if follow else os.lstat(path))
    except OSError as e:
        return _os_error("stat" if follow else "lstat", path, e)
    if not follow and table["mode"] == "link":
        try:
            table["target"] = os.path.realpath(path, strict=True)
        except OSError:
            pass
    return table if name is None else table.get(name)


def _guard(op: str, func, *args):
    """Run an os call: `true`, or `nil, err`."""
    try:
        func(*args)
    except OSError as e:
        return _os_error(op, args[0], e)
    return True


def _lfs_dir(path=None):
    path = check_string(path, 1)
    try:
        if not stat.S_ISDIR(os.stat(path).st_mode):
            raise LuaError("not a directory")
    except OSError as e:
        raise LuaError(f"open {path}: {_reason(e)}") from None
    names = iter(os.listdir(path))
    step = lambda *_: next(names, None)  # noqa: E731
    return step, {"next": step, "close": lambda *_: None}


def _lfs_rmdir(path=None):
    path = check_string(path, 1)
    try:
        if not stat.S_ISDIR(os.stat(path).st_mode):
            return None, "not a directory"
    except OSError as e:
        return _os_error("stat", path, e)
    return _guard("rmdir", os.rmdir, path)


def _lfs_touch(path=None, atime=None, mtime=None):
    now = time.time()
    atime = now if atime is None else check_number(atime, 2)
    mtime = atime if mtime is None else check_number(mtime, 3)
    return _guard("chtimes", os.utime, check_string(path, 1), (atime, mtime))


def _lfs_link(old=None, new=None, symlink=False):
    old, new = check_string(old, 1), check_string(new, 2)
    try:
        (os.symlink if truthy(symlink) else os.link)(old, new)
    except OSError as e:
        return None, f"{'symlink' if truthy(symlink) else 'link'} {old} {new}: {_reason(e)}"
    return True


def _currentdir(*_):
    try:
        return os.getcwd()
    except OSError as e:
        return _os_error("getwd", ".", e)


def _unimplemented(*_):
    raise LuaError("unimplemented function")


def _lfs_module(ctx):
    return {
        "attributes": functools.partial(_attributes, True),
        "symlinkattributes": functools.partial(_attributes, False),
        "chdir": lambda path=None, *_: _guard("chdir", os.chdir, check_string(path, 1)),
        "currentdir": _currentdir,
        "dir": _lfs_dir,
        "mkdir": lambda path=None, *_: _guard("mkdir", os.mkdir, check_string(path, 1), 0o755),
        "rmdir": _lfs_rmdir,
        "link": _lfs_link,
        "touch": _lfs_touch,
        **{name: _unimplemented for name in ("lock_dir", "lock", "unlock", "setmode")},
    }


###############################################################################


def lua_modules():
    return {"lfs": _lfs_module}
