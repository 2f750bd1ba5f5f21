"""The in-process cache: the sidecar's engine, options and guarantees inside your program.

:class:`AsyncCache` is the async API, bound to the event loop that opens it. :class:`Cache`
is the sync API: it runs an :class:`AsyncCache` on a private event-loop thread, and every
sync method is the async one run there (one bridge, :meth:`Cache.submit`). Both are
context managers that close what they started: the Redis client, the embedding worker and,
without ``redis_url``, the private redis-server (and its temporary directory).

Requests are keyed exactly as the sidecar keys them (endpoint, body, credential,
namespace), so an in-process cache and a sidecar on the same Redis (same ``key_prefix``)
share entries. A failing cache degrades to calling the upstream, never to an error.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from promptcache.cache import flow
from promptcache.cache.api import ENDPOINTS
from promptcache.cache.engine import Engine, open_engine
from promptcache.cache.entry import Answer
from promptcache.cache.errors import CacheClosed, CacheUnavailable, ConfigError, RequestError
from promptcache.cache.keys import check_namespace
from promptcache.cache.options import EngineOptions
from promptcache.cache.protocols import Embedder
from promptcache.cache.request import Prepared
from promptcache.cache.request import prepare as prepare_request
from promptcache.clients.loop import CallerWork, LoopThread

log = logging.getLogger(__name__)
T = TypeVar("T")
CHAT = "/v1/chat/completions"


def engine_options(options: EngineOptions | None = None, **overrides: Any) -> EngineOptions:
    """``options`` (or the defaults) with ``overrides``: the sidecar's option names
    (``redis_url=``, ``similarity_threshold=``...); a sidecar ``Settings`` works too.

    In-process, the application is the authentication boundary, so by default calls that
    carry no credential are cached, in the anonymous tenant (``anonymous_tenant=True``;
    the sidecar's default is the opposite)."""
    base = options or EngineOptions(anonymous_tenant=True)
    names = {f.name for f in fields(EngineOptions)}
    unknown = set(overrides) - names
    if unknown:
        raise ConfigError(f"unknown cache option(s): {', '.join(sorted(unknown))}")
    values = {n: getattr(base, n) for n in names} | overrides
    return EngineOptions(**values)


@dataclass(frozen=True, slots=True)
class Result:
    """An answer and how the cache produced it."""

    response: Any  # the answer: the response JSON, or what the decorated function returned
    status: str  # HIT, SEMANTIC-HIT, MISS or BYPASS (the cache failed or was skipped)
    age: int | None = None  # seconds since the entry was stored (hits)
    key: str | None = None  # the entry's id (X-Cache-Key); the matched one on a semantic hit
    similarity: float | None = None  # semantic hits


class AsyncCache:
    """The in-process cache for one event loop::

        async with AsyncCache(similarity_threshold=0.95) as cache:
            result = await cache.fetch(request_body, call_the_model)

    ``options`` and the keyword overrides take the sidecar's option names; without
    ``redis_url`` a private redis-server is started (in ``data_dir``, or a temporary
    directory removed at close).
    """

    def __init__(self, options: EngineOptions | None = None, *,
                 embedder: Embedder | None = None, **overrides: Any) -> None:
        self.options = engine_options(options, **overrides)
        self._embedder = embedder
        self._stack: contextlib.AsyncExitStack | None = None
        self._engine: Engine | None = None

    async def open(self) -> AsyncCache:
        if self._engine is not None:
            return self
        async with contextlib.AsyncExitStack() as stack:
            self._engine = await open_engine(self.options, stack, embedder=self._embedder)
            self._stack = stack.pop_all()
        return self

    async def close(self) -> None:
        stack, self._stack, self._engine = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def __aenter__(self) -> AsyncCache:
        return await self.open()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise CacheClosed("the cache is not open: use `async with` or await open()")
        return self._engine

    # -- requests ------------------------------------------------------------------------

    def prepare(self, body: Mapping[str, Any] | bytes, *, endpoint: str = CHAT,
                credential: str | None = None, namespace: str = "",
                cache_control: Iterable[str] = (), mode: str | None = None,
                threshold: float | str | None = None) -> Prepared:
        """Key a request body as the sidecar would; RequestError on bad input.

        ``endpoint`` is the API path (``/v1/chat/completions``, ``/v1/completions``,
        ``/v1/embeddings`` or ``/v1/messages``); ``credential`` is the caller's API key (each
        key is its own tenant unless ``shared_cache``); the rest are the per-request
        controls (the README's X-Cache-Namespace, Cache-Control, X-Cache-Mode and
        X-Cache-Threshold).
        """
        if endpoint not in ENDPOINTS:
            raise RequestError(f"not a cached endpoint: {endpoint!r}", param="endpoint")
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        cred = None if credential is None else f"authorization=Bearer {credential}"
        return prepare_request(self.engine, ENDPOINTS[endpoint], endpoint, raw,
                               credential=cred, namespace=namespace,
                               cache_control=cache_control, mode=mode,
                               threshold=None if threshold is None else str(threshold))

    async def handle(self, req: Prepared, exchange: flow.Exchange[T]) -> T:
        """Run a prepared request through the cache flow (see promptcache.cache.flow)."""
        return await flow.handle(self.engine, req, exchange)

    async def lookup(self, body: Mapping[str, Any], **scope: Any) -> Result | None:
        """The cached answer to ``body`` (exact, then semantic), or None. Never raises
        for a cache failure (that is a miss)."""
        req = self.prepare(body, **scope)
        found, _ = await flow.lookup(self.engine, req)
        if found is None:
            return None
        return Result(json.loads(found.answer.body), found.status, found.age,
                      found.key or req.key.digest, found.similarity)

    async def store(self, body: Mapping[str, Any], response: Mapping[str, Any],
                    **scope: Any) -> bool:
        """Store ``response`` as the answer to ``body``; False if it was not stored (an
        error-shaped answer, too large, or the cache failed)."""
        req = self.prepare(body, **scope)
        data = json.dumps(response, separators=(",", ":"), ensure_ascii=False).encode()
        return await flow.store(self.engine, req, Answer(200, data, "application/json"))

    async def fetch(self, body: Mapping[str, Any],
                    call: Callable[[dict[str, Any]], Awaitable[Any]], **scope: Any) -> Result:
        """The cached answer to ``body``, or ``await call(body)`` stored and returned.

        Concurrent misses of one key make one call (single flight). ``call`` must return
        the JSON answer (a dict). Its exceptions propagate and nothing is stored.
        """
        try:
            req = self.prepare(body, **scope)
        except (RequestError, CacheClosed) as exc:
            log.warning("calling through uncached: %s", exc)
            return Result(await call(dict(body)), "BYPASS")
        return await self.handle(req, _CallExchange(req, call))

    def cached(self, *, namespace: str = "", name: str | None = None,
               ) -> Callable[[Callable[[Any], Awaitable[Any]]], Callable[[Any], Awaitable[Any]]]:
        """Decorate ``async def f(prompt) -> answer`` so that answers come from the cache.

        A ``str`` prompt is keyed as a one-message chat request to the model ``name``
        (default: the function's qualified name), so the semantic tier matches rephrasings;
        a ``dict`` prompt is keyed as a chat request body. Answers must be JSON values.
        """
        check_namespace(namespace)

        def decorate(fn: Callable[[Any], Awaitable[Any]]) -> Callable[[Any], Awaitable[Any]]:
            model = name or f"{fn.__module__}.{fn.__qualname__}"

            @functools.wraps(fn)
            async def wrapper(prompt: Any) -> Any:
                if isinstance(prompt, str):
                    body: dict[str, Any] = {"model": model,
                                            "messages": [{"role": "user", "content": prompt}]}
                else:
                    body = dict(prompt)

                async def call(_: dict[str, Any]) -> Any:
                    return {"answer": await fn(prompt)}

                result = await self.fetch(body, call, namespace=namespace)
                return result.response["answer"]

            return wrapper

        return decorate

    # -- management ----------------------------------------------------------------------

    async def invalidate(self, *, namespace: str | None = None, key: str | None = None,
                         everything: bool = False) -> int:
        """Delete one entry (``key`` with its ``namespace``), a namespace, or
        ``everything``; the number of entries deleted. CacheUnavailable if Redis fails."""
        cache = self.engine.cache
        if key is not None:
            return await cache.invalidate_key(check_namespace(namespace or ""), key)
        if everything:
            return await cache.invalidate_all()
        if namespace is None:
            raise ValueError("name a namespace, a key (with its namespace) or everything=True")
        return await cache.invalidate_namespace(check_namespace(namespace))

    async def stats(self) -> dict[str, Any]:
        """Entries and memory of the Redis, circuit state, and the semantic index."""
        engine = self.engine
        try:
            info: dict[str, Any] | None = await engine.cache.info()
        except CacheUnavailable:
            info = None
        return {
            "cache": {"reachable": info is not None, "circuit": engine.cache.breaker.state,
                      **(info or {})},
            "semantic": engine.semantic.stats() if engine.semantic is not None else None,
        }


class _CallExchange:
    """The flow's exchange for :meth:`AsyncCache.fetch`: the upstream is a coroutine."""

    def __init__(self, req: Prepared, call: Callable[[dict[str, Any]], Awaitable[Any]]
                 ) -> None:
        self.req, self.call = req, call

    async def serve(self, answer: Answer, outcome: flow.Outcome) -> Result:
        return _result(json.loads(answer.body), outcome, self.req)

    async def forward(self, outcome: flow.Outcome, store: flow.Store | None
                      ) -> tuple[Result, Answer | None]:
        response = await self.call(dict(self.req.body))
        try:
            data = json.dumps(response, separators=(",", ":"), ensure_ascii=False).encode()
        except (TypeError, ValueError):
            log.warning("answer of %s is not JSON: not cached", self.req.key.digest)
            return _result(response, outcome, self.req), None
        answer = Answer(200, data, "application/json")
        if store is not None:
            await store(answer)
        return _result(response, outcome, self.req), answer


def _result(response: Any, outcome: flow.Outcome, req: Prepared) -> Result:
    return Result(response, outcome.status, outcome.age, outcome.key or req.key.digest,
                  outcome.similarity)


class Cache:
    """The sync in-process cache: an :class:`AsyncCache` on a private event-loop thread::

        with Cache() as cache:
            result = cache.fetch(request_body, call_the_model)
    """

    def __init__(self, options: EngineOptions | None = None, *,
                 embedder: Embedder | None = None, **overrides: Any) -> None:
        self.aio = AsyncCache(options, embedder=embedder, **overrides)
        self._loop = LoopThread("promptcache-cache")

    @property
    def options(self) -> EngineOptions:
        return self.aio.options

    def open(self) -> Cache:
        self._loop.start()
        try:
            self.run(self.aio.open())
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if not self._loop.running:
            return
        try:
            self.run(self.aio.close())
        finally:
            self._loop.stop()

    def __enter__(self) -> Cache:
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Run ``coro`` on the cache's loop (from any thread or event loop)."""
        if not self._loop.running:
            coro.close()
            raise CacheClosed("the cache is not open: use `with Cache() as cache` or open()")
        return self._loop.submit(coro)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the cache's loop and wait for its result (not from that loop)."""
        return self.submit(coro).result()

    def prepare(self, body: Mapping[str, Any] | bytes, **scope: Any) -> Prepared:
        return self.aio.prepare(body, **scope)

    def lookup(self, body: Mapping[str, Any], **scope: Any) -> Result | None:
        return self.run(self.aio.lookup(body, **scope))

    def store(self, body: Mapping[str, Any], response: Mapping[str, Any], **scope: Any) -> bool:
        return self.run(self.aio.store(body, response, **scope))

    def fetch(self, body: Mapping[str, Any], call: Callable[[dict[str, Any]], Any],
              **scope: Any) -> Result:
        """As :meth:`AsyncCache.fetch`, with a plain (blocking) ``call``, which runs on the
        calling thread."""
        work = CallerWork()
        return work.serve_until(self.submit(self.aio.fetch(
            body, lambda b: work.call(lambda: call(b)), **scope)))

    def invalidate(self, *, namespace: str | None = None, key: str | None = None,
                   everything: bool = False) -> int:
        return self.run(self.aio.invalidate(namespace=namespace, key=key,
                                            everything=everything))

    def stats(self) -> dict[str, Any]:
        return self.run(self.aio.stats())
