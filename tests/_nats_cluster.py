"""A real 3-node NATS cluster with JetStream for tests: each node on free loopback ports, its store in a
temporary directory, each node stoppable and restartable (on the same ports and store)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import tempfile
import time

from conftest import stop_process

import msgscript


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NatsNode:
    def __init__(self, binary: str, name: str, store_dir: str, cluster_port: int, routes: list[int]):
        self.binary, self.name, self.store_dir = binary, name, store_dir
        self.port, self.cluster_port, self.routes = _free_port(), cluster_port, routes
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        routes = ",".join(f"nats://127.0.0.1:{p}" for p in self.routes)
        self.proc = subprocess.Popen(
            [self.binary, "-a", "127.0.0.1", "-p", str(self.port), "-n", self.name, "--cluster_name", "msgscript-test",
             "-cluster", f"nats://127.0.0.1:{self.cluster_port}", "-routes", routes, "-js", "-sd", self.store_dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=msgscript._die_with_parent)
        msgscript.wait_for_port("127.0.0.1", self.port, 15, self.proc)

    def kill(self) -> None:
        """SIGKILL: the node dies as a crashed machine would."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class NatsCluster:
    """Three nats-server processes routed to each other; `.url` lists every node's client URL."""

    def __init__(self, size: int = 3):
        binary = msgscript.find_nats_server()
        self.dir = tempfile.mkdtemp(prefix="msgscript-natscluster-")
        cluster_ports = [_free_port() for _ in range(size)]
        self.nodes = [NatsNode(binary, f"n{i}", f"{self.dir}/n{i}", cluster_ports[i],
                               [p for j, p in enumerate(cluster_ports) if j != i]) for i in range(size)]
        for node in self.nodes:
            node.start()
        self.url = ",".join(n.url for n in self.nodes)
        self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        """Until JetStream answers through every running node: an R3 stream can be made and removed from a
        connection to each, and every stream answers with a leader (a node that just restarted leaves
        requests unanswered while it catches up, "not found" answers the longest)."""
        async def probe(node):
            import nats
            import nats.js.errors

            nc = await nats.connect(node.url, connect_timeout=2, max_reconnect_attempts=1)
            try:
                js = nc.jetstream(timeout=2)
                deadline = time.monotonic() + timeout
                while True:
                    try:
                        await js.add_stream(name=f"PROBE_{node.name}", subjects=[f"probe.{node.name}"],
                                            num_replicas=len(self.live))
                        await js.delete_stream(f"PROBE_{node.name}")
                        try:  # a restarted node answers "not found" only once it has caught up
                            await js.stream_info(f"PROBE_{node.name}")
                        except nats.js.errors.NotFoundError:
                            pass
                        for listed in await js.streams_info():  # and the streams there are have a leader
                            info = await js.stream_info(listed.config.name)
                            if info.cluster is not None and not info.cluster.leader:
                                raise RuntimeError(f"stream {listed.config.name} has no leader yet")
                        return
                    except Exception:
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.2)
            finally:
                await nc.close()

        async def probe_all():
            await asyncio.gather(*(probe(node) for node in self.live))

        asyncio.run(probe_all())

    @property
    def live(self) -> list[NatsNode]:
        return [n for n in self.nodes if n.running]

    def close(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class JetStreamServer(NatsNode):
    """One nats-server with JetStream, its store in a temporary directory; restartable on the same port and store."""

    def __init__(self):
        super().__init__(msgscript.find_nats_server(), "single", tempfile.mkdtemp(prefix="msgscript-js-"), 0, [])
        self.start()

    def start(self) -> None:
        command = [self.binary, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", self.store_dir]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=msgscript._die_with_parent)  # none left behind by a killed run
        msgscript.wait_for_port("127.0.0.1", self.port, 15, self.proc)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.store_dir, ignore_errors=True)


class Proxy:
    """A TCP proxy on a free loopback port to `port`, whose connections can be cut (an outage between a client
    and NATS while NATS itself keeps running) and restored."""

    def __init__(self, port: int):
        import threading

        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"nats://127.0.0.1:{self.port}"
        self.open = True
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.open:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), 2)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> None:
        """Close every proxied connection and refuse new ones until restore()."""
        self.open = False
        with self.lock:
            sockets, self.sockets = self.sockets, []
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def restore(self) -> None:
        self.open = True

    def close(self) -> None:
        self.cut()
        self.listener.close()
