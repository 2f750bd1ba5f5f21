"""``promptcache serve --workers N``: N sidecar processes on one port and one Redis.

A supervisor (:func:`supervise`, the process ``promptcache serve`` started) owns what the
workers share, and the workers (``python -m promptcache.server.workers``, :func:`main`) each
run the ordinary sidecar (:func:`promptcache.server.app.serve`) with an engine of their own::

    promptcache serve --workers 2          the supervisor: no engine, no model, no app
      |- N listening sockets (bound once)  one inherited by each worker (pass_fds)
      |- redis-server (embedded)           started once; its unix:// URL given to the workers
      |- worker 0: python -m promptcache.server.workers --fd 3 --index 0 ...
      '- worker 1: ...                     each: its own engine, model, index, /stats

- **The sockets.** The supervisor binds ``--host``/``--port`` once, as N sockets in one
  ``SO_REUSEPORT`` group (:func:`listen`), and keeps them open; worker i serves socket i
  (inherited, aiohttp's ``SockSite``), and the kernel spreads new connections evenly over
  the group by a hash of their addresses. One socket shared by every worker (the fallback
  without ``SO_REUSEPORT``) balances badly: each worker's event loop accepts every waiting
  connection at once, so 32 connections opened together were split 30/2; the group split
  them 19/13. While a worker restarts, its socket stays open in the supervisor: the
  connections the kernel gives it wait in its backlog for the new worker, and the other
  workers' connections are not touched.
- **Redis.** Without ``--redis-url`` the supervisor starts the embedded Redis as a single
  sidecar does (:func:`~promptcache.cache.redis.embedded_owner.start_embedded`: locked data
  directory, supervised and restarted if it dies), and the workers get its URL (a unix socket
  in ``--data-dir``) as their ``redis_url``. It is stopped after the last worker has exited.
  With ``--redis-url`` the workers use that Redis and the supervisor starts none.
- **Settings.** Each worker reads the supervisor's settings as JSON from a pipe (its stdin):
  secrets (``--upstream-api-key``, ``--admin-token``) never appear on a command line, which
  ``ps`` shows to every user, nor in the workers' environment (their ``PROMPTCACHE_*``
  variables are removed). The command line carries only the descriptor, the worker's
  index, the number of workers and the supervisor's pid.
- **Restarts.** A worker that exits while the supervisor is not stopping is started again in
  its slot, with a warning naming its exit status: at once the first time, then after a
  backoff that doubles (0.5 s up to 10 s) while the slot's workers keep dying within 30 s of
  starting. More than ``max(5, 2 x N)`` restarts within a minute is a crash loop: the
  supervisor logs an error, stops the other workers and Redis, and exits with status 1.
- **Stopping.** SIGTERM or SIGINT to the supervisor (the workers run in sessions of their
  own, so a terminal's Ctrl-C reaches the supervisor alone) sends one SIGTERM to every worker:
  aiohttp stops accepting, lets requests in flight finish (up to its shutdown timeout,
  60 s), then the worker's engine closes. The supervisor waits for them (a worker still
  running :data:`STOP_TIMEOUT` seconds later is killed), stops the embedded Redis and exits 0.
- **No orphans.** Each worker asks the kernel for ``PR_SET_PDEATHSIG = SIGTERM`` at start
  (:func:`die_with_parent`): if the supervisor dies, even by SIGKILL, its workers drain and
  exit, and the embedded Redis goes too (its own parent-death signal).

Everything a worker reports (``/healthz``, ``/readyz``, ``/stats``, ``/metrics``) is its own
engine's; ``/stats`` says which worker answered (``worker``: index, pid, workers). Memory and
``--max-rss`` are per worker: each loads its own model and keeps its own index.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from promptcache.cache.errors import ConfigError
from promptcache.cache.redis.embedded_owner import start_embedded
from promptcache.server.config import Settings, redact_url

log = logging.getLogger("promptcache.workers")

#: How long the supervisor waits for its workers to exit after SIGTERM before killing them:
#: the drain (``promptcache.server.app.DRAIN_SECONDS``, 60 s, not imported: the supervisor
#: never loads the app), then the engine's close.
STOP_TIMEOUT = 75.0
_PR_SET_PDEATHSIG = 1


class RestartPolicy:
    """When to restart a worker that exited, and when to give up.

    The first restart of a slot is immediate; each further one, while the slot's last worker
    lived less than ``stable_after`` seconds, waits twice as long as the one before
    (``min_backoff`` up to ``max_backoff``). More than ``max_restarts`` restarts (all slots
    together) within ``window`` seconds is a crash loop: :meth:`crashed` returns None.
    """

    def __init__(self, max_restarts: int, *, window: float = 60.0, min_backoff: float = 0.5,
                 max_backoff: float = 10.0, stable_after: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_restarts = max_restarts
        self.window = window
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.stable_after = stable_after
        self._clock = clock
        self._recent: deque[float] = deque()  # when the exits of the last window were
        self._backoff: dict[int, float] = {}  # slot -> its last wait

    @property
    def recent(self) -> int:
        """Workers that exited within the last window (as of the last :meth:`crashed`)."""
        return len(self._recent)

    def crashed(self, slot: int, lived: float) -> float | None:
        """The seconds to wait before restarting ``slot``, whose worker exited after
        ``lived`` seconds; None when the workers are crashing in a loop."""
        now = self._clock()
        self._recent.append(now)
        while self._recent and now - self._recent[0] > self.window:
            self._recent.popleft()
        if len(self._recent) > self.max_restarts:
            return None
        if lived >= self.stable_after:  # it had stayed up: this is a first crash again
            self._backoff.pop(slot, None)
        last = self._backoff.get(slot)
        wait = 0.0 if last is None else min(max(last * 2, self.min_backoff), self.max_backoff)
        self._backoff[slot] = wait
        return wait


def listen(host: str, port: int, count: int, backlog: int = 1024) -> list[socket.socket]:
    """``count`` listening TCP sockets on ``host``:``port`` (its first address), one per
    worker, in one ``SO_REUSEPORT`` group: the kernel spreads new connections evenly over
    them. Where ``SO_REUSEPORT`` is missing, one socket that every worker shares.

    The port is first bound alone, without ``SO_REUSEPORT``, so that a port someone else
    holds (another supervisor's group included) is an error, not a port shared with them."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                flags=socket.AI_PASSIVE)[0][0]
    with socket.create_server((host, port), family=family) as probe:
        port = probe.getsockname()[1]  # the port chosen, for --port 0
    if not hasattr(socket, "SO_REUSEPORT"):
        return [socket.create_server((host, port), family=family, backlog=backlog)]
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            socks.append(socket.create_server((host, port), family=family, backlog=backlog,
                                              reuse_port=True))
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def encode_settings(settings: Settings) -> bytes:
    """The settings as the workers read them from their pipe (JSON)."""
    return json.dumps(dataclasses.asdict(settings)).encode()


def decode_settings(data: bytes) -> Settings:
    """:func:`encode_settings`'s inverse (JSON lists are the options' tuples)."""
    raw: dict[str, Any] = json.loads(data)
    return Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


def supervise(settings: Settings, *, print_fn: Callable[..., None] = print) -> int:
    """Run ``settings.workers`` sidecar processes on one socket and one Redis until SIGTERM
    or SIGINT (exit status 0), or until they crash in a loop (1). See the module docstring."""
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        socks = listen(settings.host, settings.port, settings.workers)
    except OSError as exc:
        raise ConfigError(f"--host/--port: cannot listen on {settings.host}:{settings.port}: "
                          f"{exc.strerror or exc}") from exc
    try:
        return asyncio.run(_supervise(settings, socks, print_fn))
    finally:
        for sock in socks:
            sock.close()


async def _supervise(settings: Settings, socks: list[socket.socket],
                     print_fn: Callable[..., None]) -> int:
    pool = Pool(settings, socks)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, pool.stop.set)
    async with contextlib.AsyncExitStack() as stack:
        if settings.redis_url is None:  # one embedded Redis for every worker
            keeper = await start_embedded(stack, str(settings.resolved_data_dir))
            pool.settings = replace(settings, redis_url=keeper.url)
        host, port = socks[0].getsockname()[:2]
        log.info("caching %s on http://%s:%s with %d workers", redact_url(settings.upstream),
                 host, port, settings.workers)
        print_fn(f"======== Running on http://{host}:{port} ({settings.workers} workers) "
                 "========\n(Press CTRL+C to quit)")
        return await pool.run()


class Pool:
    """The workers of one supervisor: started, restarted, stopped."""

    def __init__(self, settings: Settings, socks: list[socket.socket],
                 policy: RestartPolicy | None = None) -> None:
        self.settings = settings
        self.socks = socks  # worker i serves socks[i], or the one socket they all share
        self.policy = policy or RestartPolicy(max(5, 2 * settings.workers))
        self.stop = asyncio.Event()  # set on SIGTERM/SIGINT, or when giving up
        self.gave_up = False
        self.procs: dict[int, asyncio.subprocess.Process] = {}

    async def run(self) -> int:
        """Keep every slot running until :attr:`stop`; then drain them all. The exit
        status: 0, or 1 after a crash loop."""
        slots = [asyncio.create_task(self._keep(i)) for i in range(self.settings.workers)]
        await self.stop.wait()
        log.info("stopping the workers: they finish the requests in flight")
        for proc in self.procs.values():
            _signal(proc, signal.SIGTERM)
        _, late = await asyncio.wait(slots, timeout=STOP_TIMEOUT)
        if late:
            for index, proc in self.procs.items():
                if proc.returncode is None:
                    log.warning("worker %d (pid %d) still running %g s after SIGTERM; "
                                "killing it", index, proc.pid, STOP_TIMEOUT)
                    _signal(proc, signal.SIGKILL)
            await asyncio.wait(late)
        for slot in slots:
            slot.result()  # a bug in a slot's loop is not swallowed
        log.info("the workers have stopped")
        return 1 if self.gave_up else 0

    async def _keep(self, index: int) -> None:
        """Run slot ``index``'s worker, again each time it exits, until :attr:`stop`."""
        while not self.stop.is_set():
            proc = await self._spawn(index)
            started = time.monotonic()
            if self.stop.is_set():  # stopped while it was being spawned
                _signal(proc, signal.SIGTERM)
            status = await proc.wait()
            if self.stop.is_set():
                return
            wait = self.policy.crashed(index, time.monotonic() - started)
            if wait is None:
                log.error("worker %d (pid %d) exited with status %s: %d worker exits within "
                          "%g s, a crash loop; stopping the workers and giving up", index,
                          proc.pid, _status(status), self.policy.recent, self.policy.window)
                self.gave_up = True
                self.stop.set()
                return
            log.warning("worker %d (pid %d) exited with status %s; restarting it%s", index,
                        proc.pid, _status(status), f" in {wait:g} s" if wait else "")
            if wait:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), wait)

    async def _spawn(self, index: int) -> asyncio.subprocess.Process:
        fd = self.socks[index % len(self.socks)].fileno()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "promptcache.server.workers", "--fd", str(fd),
            "--index", str(index), "--workers", str(self.settings.workers),
            "--parent", str(os.getpid()),
            stdin=asyncio.subprocess.PIPE, pass_fds=(fd,),
            # The settings come through the pipe alone: none of the operator's PROMPTCACHE_*
            # variables (a token among them) is copied into the workers' environment.
            env={k: v for k, v in os.environ.items() if not k.startswith("PROMPTCACHE_")},
            start_new_session=True,  # Ctrl-C reaches the supervisor, which stops them in order
        )
        self.procs[index] = proc
        assert proc.stdin is not None
        with contextlib.suppress(OSError):  # a worker that died at once: its exit says why
            proc.stdin.write(encode_settings(self.settings))
            await proc.stdin.drain()
            proc.stdin.close()
            await proc.stdin.wait_closed()
        log.info("worker %d started (pid %d)", index, proc.pid)
        return proc


def _signal(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def _status(code: int) -> str:
    """An exit status as a reader wants it: ``1``, or ``-9 (SIGKILL)``."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"{code} ({signal.Signals(-code).name})"
    return str(code)


def die_with_parent(parent: int) -> None:
    """Ask the kernel for SIGTERM when the process that started this one dies (Linux's
    ``PR_SET_PDEATHSIG``); exit at once if it is already gone."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):
            log.warning("prctl() unavailable: this worker may outlive its supervisor")
    if os.getppid() != parent:  # the supervisor died before prctl() took effect
        raise SystemExit(0)


def _worker_arguments() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m promptcache.server.workers",
                                description="One worker of `promptcache serve --workers N` "
                                "(started by the supervisor; the settings come on stdin).")
    p.add_argument("--fd", type=int, required=True, help="the inherited listening socket")
    p.add_argument("--index", type=int, required=True, help="this worker's slot, from 0")
    p.add_argument("--workers", type=int, required=True, help="how many workers there are")
    p.add_argument("--parent", type=int, required=True, help="the supervisor's pid")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """One worker: the sidecar on the inherited socket, with the settings read from stdin."""
    args = _worker_arguments().parse_args(argv)
    die_with_parent(args.parent)
    settings = decode_settings(sys.stdin.buffer.read())
    from promptcache.server.app import serve  # only a worker loads the app and its engine

    sock = socket.socket(fileno=args.fd)
    worker = {"index": args.index, "pid": os.getpid(), "workers": args.workers}
    return serve(settings, sock=sock, worker=worker)


if __name__ == "__main__":
    sys.exit(main())
