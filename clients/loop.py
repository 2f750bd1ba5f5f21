"""A private event loop on a thread of its own: how the sync APIs run the async ones."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from promptcache.clients.errors import ClientError

T = TypeVar("T")


class LoopThread:
    """``start`` a loop on a daemon thread; ``run``/``submit`` coroutines on it from any
    thread or loop; ``stop`` ends it (after ``stop``, ``start`` makes a fresh one)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self._loop is not None

    def start(self) -> None:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name=self.name,
                                          daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread

    def stop(self) -> None:
        with self._lock:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        loop = self._loop
        if loop is None:
            coro.close()
            raise ClientError(f"{self.name} is not running (closed, or never opened)")
        return asyncio.run_coroutine_threadsafe(coro, loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.submit(coro).result()
