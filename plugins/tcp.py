"""`tcp` (gopher-lua-libs v0.5.0): a plain TCP client.

    local conn, err = require("tcp").open("127.0.0.1:7000" [, dial_timeout_s = 5])
    conn:write("ping\\n")              -- nothing; raises on error
    local line = conn:read("*l")      -- raises on error or timeout; nil at the end of the stream
    conn:close()

`conn:read([fmt = 1024])` takes the strings reader's formats: a number n (one read of up to n
bytes), "*l" (a line without its "\\n"), "*a" (everything until the peer closes), "*n" (a
number). The fields dialTimeout = 5, writeTimeout = 1, readTimeout = 1 and closeTimeout = 1
(seconds) can be read and set on the connection. Every step also ends at the script's deadline,
and what one read returns is bounded by the script's memory cap. The DNS lookup (which cannot be given
a timeout) runs on the scheduler's executor for blocking work, waited for until the dial's deadline.
"""

from __future__ import annotations

import re
import socket
import time

from msgscript import ArgError, LuaError, check_number, check_string, error_text


TIMEOUTS = {"dialTimeout": 5.0, "writeTimeout": 1.0, "readTimeout": 1.0, "closeTimeout": 1.0}
_NUMBER = re.compile(rb"[+-]?(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)")

def _resolve(ctx, host: str, port: int, timeout: float) -> list:
    """getaddrinfo on the executor for blocking work, waited for `timeout` seconds at most."""
    try:
        return ctx.blocking(socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM, cap=max(0.001, timeout))
    except LuaError:
        raise TimeoutError("i/o timeout") from None


def _split_address(addr: str) -> tuple[str, int]:
    """"host:port", "[::1]:port" or ":port" (this machine) as Go's net.Dial reads it."""
    host, sep, port = addr.rpartition(":")
    if not sep:
        raise ValueError(f"address {addr}: missing port in address")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        number = int(port) if port.isascii() and port.isdigit() and len(port) < 6 else socket.getservbyname(port, "tcp")
    except (OSError, UnicodeError, ValueError):
        raise ValueError(f"address {addr}: unknown port") from None
    if number > 65535:
        raise ValueError(f"address {addr}: invalid port")
    return host or "127.0.0.1", number


class Connection:
    """One TCP connection with Go's per-operation timeouts and a read buffer."""

    def __init__(self, ctx, sock: socket.socket, addr: str, timeouts: dict):
        self.ctx, self.sock, self.addr, self.timeouts = ctx, sock, addr, timeouts
        self.buffer = bytearray()
        self.eof = False
        local = sock.getsockname()
        self.name = f"tcp {local[0]}:{local[1]}->{addr}"

    def _deadline(self, key: str) -> tuple[float, str]:
        """When the next step must be done (the field's timeout, never past the script's deadline), and
        the error for missing it."""
        timeout, left = self.timeouts[key], self.ctx.remaining()
        if left < timeout:
            return time.monotonic() + left, "script timed out"
        op = "write" if key == "writeTimeout" else "read"
        return time.monotonic() + max(0.001, timeout), f"{op} {self.name}: i/o timeout"

    def _socket(self, op: str) -> socket.socket:
        if self.sock is None:
            raise LuaError(f"{op} {self.name}: use of closed network connection")
        return self.sock

    def write(self, *args):
        data = [check_string(a, i + 1).encode("utf-8", "surrogateescape") for i, a in enumerate(args)]
        sock = self._socket("write")
        deadline, timed_out = self._deadline("writeTimeout")
        try:
            for piece in data:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                sock.sendall(piece)
        except TimeoutError:
            raise LuaError(timed_out) from None
        except OSError as e:
            raise LuaError(f"write {self.name}: {_reason(e)}") from None

    def _fill(self, until: tuple[float, str]) -> bool:
        """Read what arrives (up to the memory cap) into the buffer; False at the end of the stream.

        `until` is (deadline, error text when it passes), from _deadline.
        """
        if self.eof:
            return False
        limit = self.ctx.max_bytes()
        if len(self.buffer) >= limit:
            raise LuaError(f"read {self.name}: data larger than the script's memory limit allows ({limit} bytes)")
        sock = self._socket("read")
        deadline, timed_out = until
        left = deadline - time.monotonic()
        if left <= 0:
            raise LuaError(timed_out)
        sock.settimeout(left)
        try:
            chunk = sock.recv(min(65536, limit - len(self.buffer)))
        except TimeoutError:
            raise LuaError(timed_out) from None
        except OSError as e:
            raise LuaError(f"read {self.name}: {_reason(e)}") from None
        if not chunk:
            self.eof = True
            return False
        self.buffer += chunk
        return True

    def _take(self, n: int) -> bytes:
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    def read(self, fmt=None):
        self._socket("read")  # raises once closed
        deadline = self._deadline("readTimeout")
        if isinstance(fmt, (int, float)) and not isinstance(fmt, bool):
            n = int(max(min(fmt, 2**31), 0)) if fmt == fmt else 0  # NaN reads nothing, +inf what has arrived
            if n <= 0:
                return ""
            if not self.buffer and not self._fill(deadline):
                return None
            return self._take(n)  # one read: what has arrived, up to n bytes
        fmt = "*l" if fmt is None else check_string(fmt, 1)
        if fmt.startswith("*l"):
            searched = 0
            while (end := self.buffer.find(b"\n", searched)) < 0:
                searched = len(self.buffer)
                if not self._fill(deadline):  # the end of the stream: the rest is the last line
                    return self._take(len(self.buffer)) if self.buffer else None
            return self._take(end + 1)[:-1]
        if fmt.startswith("*a"):
            while self._fill(deadline):
                pass
            return self._take(len(self.buffer))
        if fmt.startswith("*n"):
            return self._number(deadline)
        raise ArgError(1, "unknown fmt string")

    def _number(self, deadline: tuple[float, str]):
        """Go's fmt.Fscan of a number: spaces skipped, 0 at the end of the stream."""
        while True:
            del self.buffer[:len(self.buffer) - len(self.buffer.lstrip())]
            if self.buffer:
                break
            if not self._fill(deadline):
                return 0
        while (m := _NUMBER.match(self.buffer)) and m.end() == len(self.buffer) and self._fill(deadline):
            pass
        m = _NUMBER.match(self.buffer)
        if not m:
            raise LuaError(f"read {self.name}: expected a number")
        text = self._take(m.end()).decode()
        return float(int(text, 16)) if text.lstrip("+-")[:2] in ("0x", "0X") else float(text)

    def close(self):
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()


def _reason(exc: OSError) -> str:
    """A socket error in Go's words: "connection refused", "i/o timeout"."""
    return "i/o timeout" if isinstance(exc, TimeoutError) else error_text(exc)


def _dial(ctx, addr: str, timeouts: dict) -> Connection:
    """Connect to `addr` within the dial timeout (0: none) and the script's deadline; raises OSError."""
    dial = timeouts["dialTimeout"]
    deadline = time.monotonic() + (min(dial, ctx.remaining()) if dial > 0 else ctx.remaining())
    host, port = _split_address(addr)
    try:
        infos = _resolve(ctx, host, port, deadline - time.monotonic())
    except socket.gaierror as e:
        raise OSError(f"lookup {host}: {_reason(e)}") from None
    error: OSError = OSError("no addresses found")
    for family, kind, proto, _, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            sock.connect(sockaddr)
            return Connection(ctx, sock, addr, timeouts)
        except OSError as e:
            sock.close()
            error = e if isinstance(e, TimeoutError) else OSError(f"connect: {_reason(e)}")
    raise error


def _load(ctx):
    def open_(addr=None, timeout=None):
        """tcp.open(addr [, dial_timeout_s]) -> connection | nil, err"""
        addr = check_string(addr, 1)
        timeouts = dict(TIMEOUTS)
        if isinstance(timeout, (int, float)) and not isinstance(timeout, bool):  # as Go: non-numbers are ignored
            timeouts["dialTimeout"] = float(timeout)
        try:
            return _dial(ctx, addr, timeouts)
        except ValueError as e:
            return None, f"dial tcp {e}"
        except OSError as e:
            return None, f"dial tcp {addr}: {_reason(e)}"

    def set_field(conn, key, value=None):
        conn.timeouts[key] = float(check_number(value, 3))

    py = ctx.module({
        "open": open_, "write": lambda conn, *args: conn.write(*args), "read": lambda conn, fmt=None: conn.read(fmt),
        "close": lambda conn: conn.close(), "__index": lambda conn, key: conn.timeouts[key], "__newindex": set_field,
    })
    return {"open": ctx.execute_file("tcp.lua", py)}


def lua_modules():
    """Modules this plugin provides."""
    return {"tcp": _load}
