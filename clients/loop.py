"""A private event loop on a thread of its own: how the sync APIs run the async ones."""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from promptcache.cache.errors import ClientError

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


class CallerWork:
    """Lets a coroutine on a :class:`LoopThread` run blocking calls on the thread that waits
    for it, instead of on the loop's small default executor: a sync caller's upstream call
    (seconds, for a model) then runs on that caller's own thread, however many there are.

    ``serve_until(future)`` (on the waiting thread) runs what ``await call(fn)`` (on the
    loop) hands it, until ``future`` is done, and returns its result.
    """

    def __init__(self) -> None:
        self._inbox: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]
                                       | None] = queue.SimpleQueue()

    async def call(self, fn: Callable[[], T]) -> T:
        done: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._inbox.put((fn, done))
        return await asyncio.wrap_future(done)

    def serve_until(self, future: concurrent.futures.Future[T]) -> T:
        future.add_done_callback(lambda _: self._inbox.put(None))
        while (item := self._inbox.get()) is not None:
            fn, done = item
            if done.set_running_or_notify_cancel():
                try:
                    done.set_result(fn())
                except BaseException as exc:  # handed to the awaiting coroutine
                    done.set_exception(exc)
        return future.result()
