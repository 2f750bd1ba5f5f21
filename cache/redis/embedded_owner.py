"""Owning the embedded Redis from async code: the one way the engine starts it, and its
supervisor.

:func:`start_embedded` starts an :class:`~promptcache.cache.redis.embedded.EmbeddedRedis`
for the sidecar (``promptcache serve`` without ``--redis-url``) and for the in-process cache
(``AsyncCache()`` without ``redis_url``), and stops it when the caller's
:class:`~contextlib.AsyncExitStack` unwinds. Until then its :class:`RedisKeeper` supervises
it: a server that dies (the OOM killer, a SIGKILL) is started again on the same address and
data directory (``EmbeddedRedis.revive``), with its data when persistence is on, empty when
not. Requests meanwhile fail over to the upstream (the circuit breaker's BYPASS) and cache
again once the breaker's probes reach the new server; nothing restarts the sidecar.
Restarts that follow each other quickly back off; each is logged as a warning and counted
(:attr:`RedisKeeper.restarts`, :meth:`RedisKeeper.stats`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from promptcache.cache.errors import EmbeddedRedisError
from promptcache.cache.redis.embedded import EmbeddedRedis

log = logging.getLogger(__name__)


async def start_embedded(stack: contextlib.AsyncExitStack, data_dir: str | None
                         ) -> RedisKeeper:
    """Start a private, supervised redis-server; its URL is the keeper's ``url``. It is
    stopped (and a temporary directory removed) when ``stack`` unwinds.

    With ``data_dir`` its data persists there (AOF and RDB) across restarts; without one it
    runs in a temporary directory, without persistence.
    """
    keep = data_dir is not None
    if data_dir is None:
        data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="promptcache-"))
    redis = EmbeddedRedis(data_dir, persistence=keep)
    keeper = RedisKeeper(redis)
    url = await keeper.start()
    stack.push_async_callback(keeper.stop)
    log.info("embedded redis-server (pid %s) at %s", redis.pid, url)
    return keeper


class RedisKeeper:
    """Owns and supervises an :class:`EmbeddedRedis` from a thread that lives exactly as long
    as it.

    The server is tied to the thread that started it (``PR_SET_PDEATHSIG``), so it is
    started (and restarted) neither on the event loop (start-up blocks) nor on a pooled
    executor thread (which may exit first), but on a thread of its own, which checks every
    ``poll_interval`` seconds that the server still runs until ``stop``. The first restart
    after a crash is immediate; each further one while the server has not yet stayed up for
    ``stable_after`` seconds waits twice as long as the last (from ``min_backoff`` up to
    ``max_backoff``). ``stop`` ends the supervision, waits included, and stops the server.
    """

    def __init__(self, redis: EmbeddedRedis, *, poll_interval: float = 0.1,
                 min_backoff: float = 0.5, max_backoff: float = 30.0,
                 stable_after: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.redis = redis
        self.poll_interval = poll_interval
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.stable_after = stable_after
        self._clock = clock
        self.restarts = 0  # successful restarts after the server died
        self.failed_restarts = 0  # restart attempts that did not bring it up
        self.last_exit: int | None = None  # exit status of the last server that died
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="promptcache-redis",
                                        daemon=True)
        self._ready: asyncio.Future[str] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def url(self) -> str:
        return self.redis.url

    @property
    def pid(self) -> int | None:
        """The pid of the redis-server now (None between a crash and its restart)."""
        return self.redis.pid if self.redis.running else None

    def stats(self) -> dict[str, Any]:
        return {"pid": self.pid, "running": self.redis.running, "restarts": self.restarts,
                "failed_restarts": self.failed_restarts, "last_exit": self.last_exit}

    async def start(self) -> str:
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        self._thread.start()
        try:
            return await self._ready
        except BaseException:
            self._done.set()  # cancelled or failed: a server that did start is stopped
            raise

    async def stop(self) -> None:
        self._done.set()
        await asyncio.to_thread(self._thread.join)

    def _run(self) -> None:
        assert self._loop is not None and self._ready is not None
        ready, loop = self._ready, self._loop
        try:
            url = self.redis.start()
        except BaseException as exc:  # hand the failure to the waiting coroutine
            loop.call_soon_threadsafe(_settle, ready, None, exc)
            return
        loop.call_soon_threadsafe(_settle, ready, url, None)
        try:
            self._supervise()
        except Exception:  # a bug here must not take the running server down with it
            log.exception("the embedded redis-server is no longer supervised")
            self._done.wait()
        finally:
            self.redis.stop()

    def _supervise(self) -> None:
        """Until ``stop``: restart the server whenever it has died, backing off."""
        backoff = 0.0  # the wait before the next restart
        up_since = self._clock()
        while not self._done.wait(self.poll_interval):
            if self.redis.running:
                if backoff and self._clock() - up_since >= self.stable_after:
                    backoff = 0.0
                continue
            if self.redis.returncode is not None:  # a death, not a failed restart
                self.last_exit = self.redis.returncode
                log.warning("embedded redis-server exited (status %s); restarting it%s",
                            self.last_exit, f" in {backoff:g} s" if backoff else "")
            if backoff and self._done.wait(backoff):
                return
            backoff = min(max(backoff * 2, self.min_backoff), self.max_backoff)
            try:
                url = self.redis.revive()
            except EmbeddedRedisError as exc:
                self.failed_restarts += 1
                log.warning("could not restart the embedded redis-server (next try in "
                            "%g s): %s", backoff, exc)
                continue
            self.restarts += 1
            up_since = self._clock()
            log.warning("embedded redis-server restarted (pid %s, restart %d) at %s, %s",
                        self.redis.pid, self.restarts, url,
                        "its data reloaded" if self.redis.persistence else "empty")


def _settle(future: asyncio.Future[str], url: str | None, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        assert url is not None
        future.set_result(url)
