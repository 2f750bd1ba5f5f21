"""EmbeddedRedis: the private redis-server the sidecar starts, owns and must never orphan."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from promptcache.cache.errors import EmbeddedRedisError
from promptcache.cache.redis.embedded import MAX_UNIX_SOCKET_PATH, EmbeddedRedis
from tests.support.redis_servers import RedisServer


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A data dir whose socket path is surely short enough for AF_UNIX."""
    with tempfile.TemporaryDirectory(
        prefix="pc-", dir="/tmp" if os.path.isdir("/tmp") else None
    ) as d:
        yield Path(d) / "data"


@contextmanager
def client(url: str) -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        yield conn
    finally:
        conn.close()


def process_alive(pid: int) -> bool:
    """True while ``pid`` is a live redis-server (a zombie, or a reused pid, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError):
        return True  # no /proc to look at: os.kill() said it exists
    return state != "Z" and b"redis-server" in cmdline


def wait_until_gone(pid: int, deadline_s: float = 10.0) -> bool:
    deadline = time.monotonic() + deadline_s
    while process_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_starts_and_answers_ping_over_unix_socket_only(short_dir: Path) -> None:
    with EmbeddedRedis(short_dir) as server:
        assert server.url == f"unix://{short_dir}/redis.sock"
        assert server.port is None
        assert (short_dir / "redis.sock").is_socket()
        with client(server.url) as conn:
            assert conn.ping() is True
            assert conn.config_get("port") == {"port": "0"}  # no TCP listener at all
            assert conn.config_get("protected-mode") == {"protected-mode": "yes"}


def test_runs_in_its_own_session_so_ctrl_c_reaches_only_the_owner(short_dir: Path) -> None:
    with EmbeddedRedis(short_dir) as server:
        assert server.pid is not None
        assert os.getsid(server.pid) == server.pid != os.getsid(0)


def test_data_survives_stop_and_start_on_the_same_data_dir(short_dir: Path) -> None:
    with EmbeddedRedis(short_dir) as server, client(server.url) as conn:
        conn.set("prompt", "response")
        assert conn.config_get("appendonly") == {"appendonly": "yes"}
    with EmbeddedRedis(short_dir) as server, client(server.url) as conn:
        assert conn.get("prompt") == b"response"


def test_without_persistence_nothing_is_written_or_kept(short_dir: Path) -> None:
    with EmbeddedRedis(short_dir, persistence=False) as server, client(server.url) as conn:
        conn.set("prompt", "response")
    assert not (short_dir / "appendonly.aof").exists()
    assert not (short_dir / "dump.rdb").exists()
    with EmbeddedRedis(short_dir, persistence=False) as server, client(server.url) as conn:
        assert conn.get("prompt") is None


def test_too_long_socket_path_falls_back_to_loopback_tcp(short_dir: Path) -> None:
    deep = short_dir / ("d" * 60) / ("e" * 60)
    assert len(os.fsencode(deep / "redis.sock")) > MAX_UNIX_SOCKET_PATH
    with EmbeddedRedis(deep) as server:
        assert server.port is not None
        assert server.url == f"redis://127.0.0.1:{server.port}"
        assert not (deep / "redis.sock").exists()
        with client(server.url) as conn:
            assert conn.ping() is True
            assert conn.config_get("bind") == {"bind": "127.0.0.1"}


def test_explicit_port_listens_on_that_loopback_port(short_dir: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with EmbeddedRedis(short_dir, port=port) as server, client(server.url) as conn:
        assert server.url == f"redis://127.0.0.1:{port}"
        assert conn.ping() is True


def test_second_instance_on_the_same_data_dir_fails_after_the_lock_wait(
    short_dir: Path,
) -> None:
    with EmbeddedRedis(short_dir) as first:
        second = EmbeddedRedis(short_dir, lock_timeout=0.3)
        started = time.monotonic()
        with pytest.raises(EmbeddedRedisError, match="in use"):
            second.start()
        assert 0.3 <= time.monotonic() - started < 2
        assert not second.running
        with client(first.url) as conn:
            assert conn.ping() is True  # the first one is untouched


def test_stop_leaves_no_process_and_is_idempotent(short_dir: Path) -> None:
    server = EmbeddedRedis(short_dir)
    server.start()
    pid = server.pid
    assert pid is not None and server.running
    server.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not server.running and server.pid is None
    server.stop()  # second call: no error


_OWNER_SCRIPT = textwrap.dedent(
    """
    import sys
    import redis
    from promptcache.cache.redis.embedded import EmbeddedRedis

    server = EmbeddedRedis(sys.argv[1])
    conn = redis.Redis.from_url(server.start(), socket_timeout=5)
    conn.set("written-before", "owner was killed")
    conn.close()
    print(server.pid, flush=True)
    sys.stdin.read()  # wait to be killed
    """
)


@pytest.mark.slow
def test_sigkilled_owner_leaves_no_redis_behind(short_dir: Path) -> None:
    """PR_SET_PDEATHSIG: redis gets SIGTERM when its owner dies, saves, and exits."""
    with subprocess.Popen(
        [sys.executable, "-c", _OWNER_SCRIPT, str(short_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as owner:
        assert owner.stdout is not None
        line = owner.stdout.readline()
        assert line.strip().isdigit(), f"owner did not start redis: {line!r}"
        redis_pid = int(line)
        assert process_alive(redis_pid)
        owner.kill()
    assert wait_until_gone(redis_pid), f"redis-server {redis_pid} outlived its killed owner"
    # It shut down cleanly: the lock is free and the data was kept.
    with EmbeddedRedis(short_dir) as server, client(server.url) as conn:
        assert conn.get("written-before") == b"owner was killed"


def test_stale_socket_file_from_a_crash_is_removed(short_dir: Path) -> None:
    short_dir.mkdir(parents=True)
    stale = short_dir / "redis.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(stale))  # the file stays after close, as after a crash
    assert stale.is_socket()
    with EmbeddedRedis(short_dir) as server, client(server.url) as conn:
        assert conn.ping() is True
    assert not stale.exists()


def test_missing_binary_is_a_clear_error(short_dir: Path) -> None:
    with pytest.raises(EmbeddedRedisError, match="not found or not executable"):
        EmbeddedRedis(short_dir, binary=str(short_dir / "no-redis-server")).start()


def test_early_exit_reports_the_log_tail_and_releases_the_lock(short_dir: Path) -> None:
    with pytest.raises(EmbeddedRedisError, match="exited with code") as info:
        EmbeddedRedis(short_dir, extra_args=["--no-such-directive", "1"]).start()
    assert "no-such-directive" in str(info.value)  # redis' own complaint, from redis.log
    with EmbeddedRedis(short_dir) as server, client(server.url) as conn:
        assert conn.ping() is True


# -- the test helpers other suites rely on ----------------------------------------------------


def test_redis_url_fixture_gives_an_empty_database(redis_url: str) -> None:
    assert redis_url.startswith("redis://127.0.0.1:") and not redis_url.endswith(":6379")
    with client(redis_url) as conn:
        assert conn.dbsize() == 0
        conn.set("left-behind", "1")  # the next user of redis_url must not see it


@pytest.mark.slow
def test_redis_server_restarts_on_the_same_port_after_a_kill(fresh_redis: RedisServer) -> None:
    url, pid = fresh_redis.url, fresh_redis.pid
    assert pid is not None
    fresh_redis.kill()
    assert not process_alive(pid)
    with pytest.raises(redis.ConnectionError), client(url) as conn:
        conn.ping()
    assert fresh_redis.restart() == url
    with client(url) as conn:
        assert conn.ping() is True
