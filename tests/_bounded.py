"""Measuring a call from outside the server: its answer time, the event loop meanwhile, the server's
memory and threads. Shared by test_bounded_cost.py and test_bounded_cost_reproducers.py.

A `Target` is one `msgscript server` (run as an unprivileged user when the tests run as root, since
the generated test hands every function paths such as /dev/zero and /sys/...), with a hello script
and numbered one-use scripts under a 1 s limit and a 16 MiB cap: `bc.i.<n>` for calls that start
inline on the event loop (a fresh script runs inline until it reaches something that blocks), and
`bc.w.<n>` with `--* lock: true` for calls on a worker thread (lock scripts always run on workers).
Each script runs its payload as Lua. `Target.measure(mode, lua)` sends one payload over NATS and
returns a `Measure` whose `problems()` say which promises were broken:

- the answer comes within limit + 100 ms (a 3 s client timeout: later is "no answer");
- a hello on another subject, sent every 10 ms by a prober thread, is answered within 100 ms while
  the call runs (the event loop is never held);
- the server's peak RSS during the call (VmHWM, reset through /proc/<pid>/clear_refs before it)
  exceeds its RSS before by less than the cap + 64 MiB;
- nothing left behind, by limit + 1 s after the call was sent: no thread of the server uses CPU
  (30 % of a core over a window at most) and none is blocked in a system call other than those idle
  threads wait in (futex, epoll_wait, nanosleep; or the one it was in at the baseline); no process
  the server started is still running (found by a tag in their environment, so orphans count too);
  and the server has no more threads than after its warm-up plus msgscript's pool for blocking
  plugin work (BLOCKING_THREADS, whose threads stay by design). The worker pool is fixed at two
  threads (-workers 2 -max-workers 2), so it never adds threads that linger: a thread still busy or
  blocked is a call's work that outlived its answer, a worker lost.

A call that leaves the server broken (work left behind, dead, or no longer answering) is followed by
a new server process, so that the next call is measured on a clean one; `restarts` counts them.
Also reported: a reply with Python's words in it, and a traceback in the server's log.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from conftest import MSGSCRIPT, free_port, wait_port

LIMIT = 1.0  # every script's --* timeout
CAP = 16 * 2**20  # every script's --* memory
ANSWER_SLACK = 0.1  # the answer within LIMIT + this
HELLO_MAX = 0.1  # a hello on another subject answered within this, meanwhile
RSS_SLACK = 64 * 2**20  # peak RSS growth during a call under CAP + this
SETTLE = 1.0  # the work has stopped by LIMIT + this after the call was sent
CLIENT_TIMEOUT = 3.0  # a call without an answer by then has "no answer"
BLOCKING_THREADS = 32  # msgscript's pool for plugins' blocking work: its threads stay once made
IDLE_SYSCALLS = {202: "futex", 232: "epoll_wait", 281: "epoll_pwait", 441: "epoll_pwait2",
                 230: "clock_nanosleep", 35: "nanosleep"}
SYSCALL_NAMES = {0: "read", 1: "write", 7: "poll", 23: "select", 42: "connect", 43: "accept", 45: "recvfrom",
                 61: "wait4", 257: "openat", 2: "open", 270: "pselect6", 271: "ppoll", 17: "pread64",
                 19: "readv", 44: "sendto", 46: "sendmsg", 47: "recvmsg", 288: "accept4", 247: "waitid",
                 59: "execve", 56: "clone", 435: "clone3", 16: "ioctl", 72: "fcntl", 76: "truncate",
                 78: "getdents", 217: "getdents64", 4: "stat", 262: "newfstatat", 332: "statx"}
PYTHON_TEXT = re.compile(r"Traceback|NoneType|_LuaTable|lupa\.|positional argument|object has no attribute|"
                         r"unexpected keyword|<class '|internal error \(see the server log\)|"
                         r"\b(?:Value|Type|Key|Attribute|Overflow|Index|Recursion|UnicodeDecode|UnicodeEncode|OS|"
                         r"Runtime|Memory|ZeroDivision|Assertion|NotImplemented|Lookup|Buffer|Connection|"
                         r"FileNotFound|Permission|IsADirectory|Timeout|Binascii|JSONDecode)Error\b")
TICK = os.sysconf("SC_CLK_TCK")
RUN_AS_NOBODY = os.geteuid() == 0 and shutil.which("setpriv") is not None


_RUNNING: set[subprocess.Popen] = set()  # servers started here: killed at exit if a test run is cut short


@atexit.register
def _kill_running() -> None:
    for proc in list(_RUNNING):
        if proc.poll() is None:
            proc.kill()


def case_script(subject: str, name: str, lock: bool) -> str:
    return (f"--* subject: {subject}\n--* name: {name}\n--* timeout: {LIMIT:g}s\n--* memory: {CAP // 2**20}MiB\n"
            + ("--* lock: true\n" if lock else "")
            + 'function OnMessage(_, payload)\n'
              '  local f, err = loadstring(payload, "=case")\n'
              '  if not f then error(err, 0) end\n'
              '  return f()\n'
              'end\n')


HELLO = """--* subject: bc.hello
--* name: hello
function OnMessage(_, payload) return "hello " .. payload end
"""


# --- /proc ------------------------------------------------------------------------------------

def status(pid: int, key: str) -> int:
    """A number of /proc/<pid>/status: VmRSS and VmHWM in bytes, Threads as a count."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            value = int(line.split()[1])
            return value * 1024 if line.endswith("kB") else value
    raise KeyError(key)


def reset_peak(pid: int) -> bool:
    """VmHWM := VmRSS (Linux 4.0+); False where that is not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@dataclass
class ThreadState:
    tid: int
    state: str  # R, S, D, ...
    ticks: int  # utime + stime
    syscall: int | None  # None: running (no system call)
    wchan: str

    @property
    def call(self) -> str:
        if self.syscall is None:
            return "running"
        return IDLE_SYSCALLS.get(self.syscall) or SYSCALL_NAMES.get(self.syscall) or f"syscall {self.syscall}"

    def __str__(self) -> str:
        return f"thread {self.tid} {self.state} in {self.call} ({self.wchan or '-'})"


def threads(pid: int) -> dict[int, ThreadState]:
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for name in tids:
        base = f"/proc/{pid}/task/{name}"
        try:
            stat = Path(f"{base}/stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            raw = Path(f"{base}/syscall").read_text().split()
            wchan = Path(f"{base}/wchan").read_text().strip()
        except OSError:
            continue
        syscall = None if not raw or raw[0] == "running" else int(raw[0])
        if syscall == -1:
            syscall = None
        out[int(name)] = ThreadState(int(name), fields[0], int(fields[11]) + int(fields[12]), syscall,
                                     "" if wchan == "0" else wchan)
    return out


def leftovers(tag: str, server: int) -> list[str]:
    """Processes started by the server that are still running, as 'pid command': those whose environment
    carries the server's tag (inherited by children, and by their children once orphaned)."""
    found = []
    needle = tag.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == server:
            continue
        try:
            if needle not in Path(f"/proc/{entry}/environ").read_bytes():
                continue
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if state != "Z":
            found.append(f"{entry} {cmd.strip()[:80]}")
    return found


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


# --- NATS from outside ------------------------------------------------------------------------

class Client:
    """A synchronous NATS client on its own event loop (one per thread that uses it)."""

    def __init__(self, url: str):
        import nats

        self.loop = asyncio.new_event_loop()
        self.nc = self.loop.run_until_complete(nats.connect(url, max_reconnect_attempts=-1, reconnect_time_wait=0.2))

    def request(self, subject: str, data: bytes, timeout: float):
        """(seconds, message or None) — None when no answer came within `timeout`."""
        import nats.errors

        started = time.monotonic()
        try:
            msg = self.loop.run_until_complete(self.nc.request(subject, data, timeout=timeout))
        except (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError):
            return time.monotonic() - started, None
        return time.monotonic() - started, msg

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.nc.close())
        finally:
            self.loop.close()


class HelloProber(threading.Thread):
    """Sends a hello on bc.hello every `every` seconds and keeps (sent, answered) times."""

    def __init__(self, url: str, every: float = 0.01):
        super().__init__(daemon=True, name="hello-prober")
        self.url, self.every = url, every
        self.records: collections.deque = collections.deque(maxlen=20000)
        self.lock = threading.Lock()
        self.outstanding: float | None = None
        self.stopping = threading.Event()
        self.active = threading.Event()  # hellos are sent while a call is measured (set by Target.measure)
        self.ready = threading.Event()
        self.failed: str | None = None

    def run(self) -> None:
        try:
            client = Client(self.url)
        except Exception as e:  # noqa: BLE001 - reported by wait_ready
            self.failed = repr(e)
            self.ready.set()
            return
        self.ready.set()
        try:
            while not self.stopping.is_set():
                if not self.active.wait(0.2):
                    continue
                sent = time.monotonic()
                self.outstanding = sent
                took, msg = client.request("bc.hello", b"probe", timeout=5)
                ok = msg is not None and msg.data == b"hello probe"
                with self.lock:  # an unanswered hello counts as the time it waited
                    self.records.append((sent, sent + took, ok))
                self.outstanding = None
                time.sleep(self.every)
        finally:
            client.close()

    def worst(self, start: float, end: float) -> tuple[float, int]:
        """The longest hello wait that overlapped [start, end] (unanswered ones count as the time they
        waited), and how many hellos overlapped."""
        deadline = time.monotonic() + 5
        while self.outstanding is not None and self.outstanding <= end and time.monotonic() < deadline:
            time.sleep(0.002)  # the hello in flight at the end of the call: wait for its answer
        worst, count = 0.0, 0
        with self.lock:
            records = list(self.records)
        for sent, done, ok in reversed(records):
            if done < start:
                if sent < start - 10:
                    break
                continue
            if sent > end:
                continue
            count += 1
            worst = max(worst, done - sent if ok else math.inf)
        if self.outstanding is not None and self.outstanding <= end:
            count += 1
            worst = max(worst, time.monotonic() - self.outstanding)
        return worst, count

    def stop(self) -> None:
        self.stopping.set()
        self.active.set()
        self.join(10)


# --- one measured call ------------------------------------------------------------------------

@dataclass
class Measure:
    mode: str
    lua: str
    answered: float | None = None  # seconds until the answer (None: no answer)
    reply: str = ""  # the answer: data, or "error <code>: <text>"
    code: str = ""  # the NATS error code ("" for a plain answer)
    hello: float = 0.0  # worst hello wait meanwhile
    hellos: int = 0
    rss_before: int = 0
    peak: int = 0  # peak RSS during the call
    rss_after: int = 0
    idle_after: float | None = None  # seconds from the call until the server was idle (None: never)
    busy: list[str] = field(default_factory=list)  # what kept it from being idle at limit + SETTLE
    stopped_late: float | None = None  # when the left-behind work did stop (None: still going)
    kids: list[str] = field(default_factory=list)
    extra_threads: int = 0
    died: str = ""
    traceback: str = ""  # a traceback the server logged during the call

    def problems(self) -> list[tuple[str, str]]:
        """[(class, detail)] of the promises this call broke."""
        out = []
        if self.died:
            out.append(("server died or stopped answering", self.died))
        if self.answered is None:
            out.append(("no answer", f"no answer within {CLIENT_TIMEOUT:g}s"))
        elif self.answered > LIMIT + ANSWER_SLACK:
            out.append(("late answer", f"answered after {self.answered:.2f}s ({self.reply[:160]})"))
        if self.hello == math.inf:
            out.append(("hello not answered", "a hello on another subject got no answer (or no responders)"))
        elif self.hello > HELLO_MAX:
            out.append(("event loop held", f"a hello waited {self.hello * 1000:.0f} ms"))
        if self.peak - self.rss_before > CAP + RSS_SLACK:
            out.append(("memory", f"RSS grew by {(self.peak - self.rss_before) / 2**20:.0f} MiB during the call "
                                  f"(limit {(CAP + RSS_SLACK) / 2**20:.0f} MiB)"))
        if self.idle_after is None and not self.died:
            late = (f"it stopped {self.stopped_late:.1f}s after the call" if self.stopped_late is not None
                    else "still going when the server was restarted")
            out.append(("work left behind", f"not idle {LIMIT + SETTLE:g}s after the call ({late}): "
                                            + "; ".join(self.busy)))
        if self.kids:
            out.append(("process left behind", "; ".join(self.kids)))
        if self.extra_threads > 0:
            out.append(("threads left behind", f"{self.extra_threads} threads more than the pools account for"))
        if PYTHON_TEXT.search(self.reply):
            out.append(("python text", self.reply[:200]))
        if self.traceback:
            out.append(("traceback in the log", self.traceback[-600:]))
        return out

    def summary(self) -> str:
        took = "no answer" if self.answered is None else f"{self.answered:.3f}s"
        idle = "never" if self.idle_after is None else f"{self.idle_after:.2f}s"
        grew = (self.peak - self.rss_before) / 2**20
        return (f"[{self.mode}] {took}: {self.reply[:120]!r}; hello max {self.hello * 1000:.0f} ms over "
                f"{self.hellos}; RSS {self.rss_before / 2**20:.0f} MiB, peak +{grew:.0f} MiB; idle after {idle}")


class Target:
    """The server under test and what measures it (see the module docstring)."""

    def __init__(self, base: Path | None, nats_url: str, scripts: int = 400, flags: tuple = (),
                 extra: dict | None = None, unprivileged: bool = RUN_AS_NOBODY):
        self.base = Path(tempfile.mkdtemp(prefix="bounded-", dir=base))
        os.chmod(self.base, 0o755)
        self.dir = self.base / "scripts"
        self.dir.mkdir(mode=0o755)
        self.nats_url = nats_url
        self.count = scripts
        self.flags = ("-workers", "2", "-max-workers", "2", *flags)
        self.unprivileged = unprivileged
        (self.dir / "hello.lua").write_text(HELLO)
        for n in range(scripts):
            (self.dir / f"i{n}.lua").write_text(case_script(f"bc.i.{n}", f"i{n}", lock=False))
            (self.dir / f"w{n}.lua").write_text(case_script(f"bc.w.{n}", f"w{n}", lock=True))
        for name, text in (extra or {}).items():
            (self.dir / name).write_text(text)
        self.proc: subprocess.Popen | None = None
        self.client: Client | None = None
        self.prober: HelloProber | None = None
        self.restarts = 0
        try:
            self.start()
        except BaseException:
            self.close()
            raise

    # the process
    def start(self) -> None:
        self.port = free_port()
        self.log_path = self.base / f"server-{self.port}.log"
        self.logfile = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        command = [*MSGSCRIPT, "server", "-port", str(self.port), "-script", str(self.dir),
                   "-natsurl", self.nats_url, *self.flags]
        if self.unprivileged:
            command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *command]
        self.tag = f"{os.getpid()}-{time.monotonic_ns()}"
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1", HOME=str(self.base),
                   BOUNDED_COST_TAG=self.tag)
        env.pop("NATS_URL", None)
        self.proc = subprocess.Popen(command, cwd=self.base, stdin=subprocess.DEVNULL, stdout=self.logfile,
                                     stderr=subprocess.STDOUT, env=env)
        _RUNNING.add(self.proc)
        try:
            wait_port(self.port, 60, self.proc)
        except RuntimeError as e:
            raise RuntimeError(f"the server did not start ({e}):\n{self.log[-3000:]}") from None
        deadline = time.monotonic() + 60
        while "serving" not in self.log:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{self.log[-3000:]}")
            time.sleep(0.05)
        self.pid = self.proc.pid
        self.log_seen = len(self.log_path.read_bytes())
        self.used = {"inline": 0, "worker": 0}
        self.client = Client(self.nats_url)
        self.prober = HelloProber(self.nats_url)
        self.prober.active.set()
        self.prober.start()
        self.prober.ready.wait(10)
        assert self.prober.failed is None, self.prober.failed
        self.warm_up()

    def warm_up(self) -> None:
        """One quick call in each mode, then the baseline: threads and their idle system calls."""
        for mode in ("inline", "worker"):
            for attempt in range(3):  # the first calls make the worker threads and the runtimes: a busy
                took, msg = self.client.request(self.subject(mode), b"return 'warm'", 10)  # machine may be slow
                if msg is not None and msg.data == b"warm":
                    break
                assert attempt < 2, (mode, took, msg and (msg.data, msg.headers), self.log[-2000:])
        time.sleep(0.3)
        self.idle(time.monotonic() + 5)
        self.baseline = threads(self.pid)
        self.base_count = len(self.baseline)
        self.base_rss = status(self.pid, "VmRSS")
        self.prober.active.clear()

    @contextlib.contextmanager
    def probing(self):
        """Hellos every 10 ms meanwhile (measure does this itself)."""
        self.prober.active.set()
        try:
            yield self.prober
        finally:
            self.prober.active.clear()

    def stop(self, graceful: bool = True) -> None:
        if self.prober is not None:
            self.prober.stop()
            self.prober = None
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc is not None:
            _RUNNING.discard(self.proc)
            self.kill_leftovers(self.proc.pid)
        self.logfile.close()

    def restart(self) -> None:
        """A new server process (after a call that left this one broken, or when the scripts are used up)."""
        self.stop(graceful=False)
        self.restarts += 1
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def subject(self, mode: str) -> str:
        n = self.used[mode]
        if n >= self.count:  # all used: a new server process has them all fresh again
            self.restart()
            n = 0
        self.used[mode] = n + 1
        return f"bc.{'i' if mode == 'inline' else 'w'}.{n}"

    # idleness
    def _unexpected(self, snapshot: dict[int, ThreadState]) -> list[ThreadState]:
        """Threads blocked in a system call idle threads do not wait in (and that they were not in at the
        baseline)."""
        out = []
        for t in snapshot.values():
            if t.syscall is None or t.syscall in IDLE_SYSCALLS:
                continue
            known = getattr(self, "baseline", {}).get(t.tid)
            if known is not None and known.syscall == t.syscall:
                continue
            out.append(t)
        return out

    def idle(self, deadline: float, window: float = 0.05) -> tuple[bool, list[str]]:
        """Wait until no thread uses CPU over `window` and none is blocked where idle threads are not;
        (whether it was, by `deadline`; what was busy in the last look)."""
        busy: list[str] = []
        first = True
        while True:
            before = threads(self.pid)
            if not before:
                return False, ["the server is gone"]
            time.sleep(window)
            after = threads(self.pid)
            spent = {tid: t.ticks - before[tid].ticks for tid, t in after.items() if tid in before}
            total = sum(spent.values())
            blocked = self._unexpected(after)
            burning = [t for tid, t in after.items() if spent.get(tid, 0) * (1 / TICK) >= 0.3 * window]
            if total * (1 / TICK) < 0.3 * window and not blocked and (not first or total == 0):
                return True, []
            busy = ([f"{t} used {spent[t.tid] / TICK * 1000:.0f} ms CPU in {window * 1000:.0f} ms" for t in burning]
                    + [f"{t} blocked" for t in blocked])
            if not busy:
                busy = [f"the process used {total / TICK * 1000:.0f} ms CPU in {window * 1000:.0f} ms"]
            first = False
            if time.monotonic() > deadline:
                return False, busy
            window = min(0.2, window * 2)

    # one call
    def measure(self, mode: str, lua: str, timeout: float = CLIENT_TIMEOUT) -> Measure:
        self.prober.active.set()
        try:
            return self._measure(mode, lua, timeout)
        finally:
            if self.prober is not None:
                self.prober.active.clear()

    def _measure(self, mode: str, lua: str, timeout: float) -> Measure:
        m = Measure(mode, lua)
        if self.proc.poll() is not None:
            self.restart()
        subject = self.subject(mode)
        pid = self.pid
        m.rss_before = status(pid, "VmRSS")
        reset_peak(pid)
        started = time.monotonic()
        took, msg = self.client.request(subject, lua.encode(), timeout)
        ended = time.monotonic()
        if msg is not None:
            m.answered = took
            headers = msg.headers or {}
            if "Nats-Service-Error-Code" in headers:
                m.code = headers["Nats-Service-Error-Code"]
                m.reply = f"error {m.code}: {headers.get('Nats-Service-Error', '')}"
            else:
                m.reply = msg.data[:2000].decode(errors="replace")
        m.hello, m.hellos = self.prober.worst(started, ended)
        if self.proc.poll() is None and (msg is None or m.hello == math.inf):
            _took, hello = self.client.request("bc.hello", b"after", 2)
            if hello is None or hello.data != b"hello after":
                m.died = f"it stopped answering hellos; log ends:\n{self.log[-1000:]}"
                m.peak = m.rss_after = m.rss_before
                self.kill_leftovers(pid)
                self.restart()
                return m
        if self.proc.poll() is not None:
            m.kids = self.kill_leftovers(pid)
            m.died = f"exit status {self.proc.returncode}; log ends:\n{self.log[-1500:]}"
            m.peak = m.rss_after = m.rss_before
            self.restart()
            return m
        ok, busy = self.idle(started + LIMIT + SETTLE)
        if ok:
            m.idle_after = time.monotonic() - started
        else:
            m.busy = busy
            settled, _ = self.idle(time.monotonic() + 3)  # does it ever stop?
            if settled:
                m.stopped_late = time.monotonic() - started
        try:
            m.peak = status(pid, "VmHWM")
            m.rss_after = status(pid, "VmRSS")
        except (OSError, KeyError):
            m.peak = m.rss_after = m.rss_before
        m.kids = self.kill_leftovers(pid)  # so that the next call starts clean
        m.extra_threads = len(threads(pid)) - self.base_count - BLOCKING_THREADS
        data = self.log_path.read_bytes()[self.log_seen:]
        self.log_seen += len(data)
        text = data.decode(errors="replace")
        if "Traceback" in text:
            m.traceback = text[max(0, text.index("Traceback") - 300):][:2000]
        if m.idle_after is None:
            self.restart()
        return m

    def kill_leftovers(self, pid: int) -> list[str]:
        found = leftovers(self.tag, pid)
        for kid in found:
            try:
                os.kill(int(kid.split()[0]), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        return found


# --- peers for the hostile arguments ----------------------------------------------------------

class Peers:
    """Local endpoints the hostile arguments point at: a TCP port that accepts and never speaks, one that
    sends zeros forever, an HTTP server whose answer is a 1 GiB body, and a FIFO nobody writes."""

    def __init__(self, base: Path | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix="peers-", dir=base))
        os.chmod(self.dir, 0o755)  # the server (maybe another user) may read, not change, what is here
        self.fifo = self.dir / "fifo"
        os.mkfifo(self.fifo, 0o666)
        os.chmod(self.fifo, 0o666)
        self.lines = self.dir / "lines.txt"
        self.lines.write_text("".join(f"line {i}\n" for i in range(10000)))
        os.chmod(self.lines, 0o644)
        self.work = self.dir / "work"  # a directory the server may write in
        self.work.mkdir()
        os.chmod(self.work, 0o777)
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self.silent = self._listen(self._hold)
        self.zeros = self._listen(self._zeros)
        self.http_zeros = self._listen(self._http_zeros)

    def _listen(self, handler) -> int:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        self._socks.append(listener)

        def accept():
            while not self._stop.is_set():
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                self._socks.append(conn)
                threading.Thread(target=handler, args=(conn,), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()
        return listener.getsockname()[1]

    def _hold(self, conn: socket.socket) -> None:
        self._stop.wait()

    def _zeros(self, conn: socket.socket) -> None:
        chunk = bytes(65536)
        try:
            while not self._stop.is_set():
                conn.sendall(chunk)
        except OSError:
            pass

    def _http_zeros(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5)
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1073741824\r\n\r\n")
            self._zeros(conn)
        except OSError:
            pass

    def close(self) -> None:
        self._stop.set()
        for s in self._socks:
            try:
                s.close()
            except OSError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


def group(failures: list[tuple[str, str, Measure]]) -> str:
    """Failures [(case name, class, detail, measure)] as a report grouped by class."""
    by_class: dict[str, list] = collections.defaultdict(list)
    for name, cls, detail, m in failures:
        by_class[cls].append((name, detail, m))
    lines = []
    for cls in sorted(by_class, key=lambda c: -len(by_class[c])):
        cases = by_class[cls]
        lines.append(f"== {cls}: {len(cases)} case(s)")
        for name, detail, m in cases:
            lines.append(f"  - {name} [{m.mode}]: {detail}")
    return "\n".join(lines)


def python() -> str:
    return sys.executable
