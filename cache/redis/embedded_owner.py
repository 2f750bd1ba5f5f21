"""Owning the embedded Redis from async code: the one way the engine starts it.

:func:`start_embedded` starts an :class:`~promptcache.cache.redis.embedded.EmbeddedRedis`
for the sidecar (``promptcache serve`` without ``--redis-url``) and for the in-process cache
(``AsyncCache()`` without ``redis_url``), and stops it when the caller's
:class:`~contextlib.AsyncExitStack` unwinds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import threading

from promptcache.cache.redis.embedded import EmbeddedRedis

log = logging.getLogger(__name__)


async def start_embedded(stack: contextlib.AsyncExitStack, data_dir: str | None) -> str:
    """Start a private redis-server and return its URL; it is stopped (and a temporary
    directory removed) when ``stack`` unwinds.

    With ``data_dir`` its data persists there (AOF and RDB) across restarts; without one it
    runs in a temporary directory, without persistence.
    """
    keep = data_dir is not None
    if data_dir is None:
        data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="promptcache-"))
    redis = EmbeddedRedis(data_dir, persistence=keep)
    keeper = _RedisKeeper(redis)
    url = await keeper.start()
    stack.push_async_callback(keeper.stop)
    log.info("embedded redis-server (pid %s) at %s", redis.pid, url)
    return url


class _RedisKeeper:
    """Owns an :class:`EmbeddedRedis` from a thread that lives exactly as long as it.

    The server is tied to the thread that started it (``PR_SET_PDEATHSIG``), so it is
    started neither on the event loop (start-up blocks) nor on a pooled executor thread
    (which may exit first), but on a thread of its own that waits until ``stop``.
    """

    def __init__(self, redis: EmbeddedRedis) -> None:
        self.redis = redis
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="promptcache-redis",
                                        daemon=True)
        self._ready: asyncio.Future[str] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> str:
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        self._thread.start()
        try:
            return await self._ready
        except BaseException:
            self._done.set()  # cancelled or failed: a server that did start is stopped
            raise

    def _run(self) -> None:
        assert self._loop is not None and self._ready is not None
        ready, loop = self._ready, self._loop
        try:
            url = self.redis.start()
        except BaseException as exc:  # hand the failure to the waiting coroutine
            loop.call_soon_threadsafe(_settle, ready, None, exc)
            return
        loop.call_soon_threadsafe(_settle, ready, url, None)
        self._done.wait()
        self.redis.stop()

    async def stop(self) -> None:
        self._done.set()
        await asyncio.to_thread(self._thread.join)


def _settle(future: asyncio.Future[str], url: str | None, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        assert url is not None
        future.set_result(url)
