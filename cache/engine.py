"""Building a running engine from options: the one place both the sidecar and the
in-process cache (``promptcache.clients``) construct the cache.

:func:`open_engine` builds the :class:`Engine` for an
:class:`~promptcache.cache.options.EngineOptions` (Redis client or a private embedded Redis,
:class:`ExactCache`, and the semantic tier with its embedder, index and verifier; the byte
budget and its reaper, the index sync with other nodes and the cross-node single flight) and
registers its cleanup on the caller's :class:`~contextlib.AsyncExitStack`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import tempfile
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from redis.exceptions import RedisError

from promptcache.cache.breaker import CircuitBreaker
from promptcache.cache.exact import CachePolicy, ExactCache
from promptcache.cache.keys import CLUSTER_SHARDS, KeyLayout, tenant_id
from promptcache.cache.options import EngineOptions
from promptcache.cache.redis.budget import Budget
from promptcache.cache.redis.client import RedisStore, close_client, is_cluster_url, redis_client
from promptcache.cache.redis.embedded import EmbeddedRedis
from promptcache.cache.redis.index_sync import IndexSync
from promptcache.cache.redis.remote_flight import RemoteFlight
from promptcache.cache.resident import model_bytes
from promptcache.cache.semantic.embedding import (
    BatchingEmbedder,
    Embedder,
    SentenceTransformerEmbedder,
    resolve_tuning,
)
from promptcache.cache.semantic.index import PartitionedIndex
from promptcache.cache.semantic.tier import SemanticCache, SemanticPolicy
from promptcache.cache.singleflight import SingleFlight

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Answer:
    """A complete upstream answer in non-streaming form: what is stored and shared."""

    status: int
    body: bytes
    content_type: str


@dataclass(slots=True)
class Engine:
    """A running cache: what one sidecar or one in-process cache owns."""

    options: EngineOptions
    redis_url: str  # the Redis in use: options.redis_url, or the private one's
    cache: ExactCache
    semantic: SemanticCache | None = None
    flights: SingleFlight[str, Answer] = field(default_factory=SingleFlight)
    remote: RemoteFlight | None = None  # cross-node single flight (a lease in Redis)
    sync: IndexSync | None = None  # keeps the semantic index in step with other nodes
    model_bytes: int = 0  # the embedding model's weights, for the memory report

    def tenant(self, credential: str | None) -> str:
        return tenant_id(credential, shared=self.options.shared_cache)


async def open_engine(options: EngineOptions, stack: contextlib.AsyncExitStack, *,
                      embedder: Embedder | None = None) -> Engine:
    """The engine for ``options``; everything it starts is closed when ``stack`` unwinds.

    Without ``redis_url`` a private redis-server is started in ``data_dir`` (a temporary
    directory, deleted at close, when that is unset too). ``embedder`` lets several engines
    in one process share a loaded model.
    """
    url = options.redis_url or await _embedded_redis(options.data_dir, stack)
    client = redis_client(url, timeout=options.redis_timeout)
    stack.push_async_callback(close_client, client)
    # Connect (and, on a cluster, learn the slot map) now rather than in the first request's
    # 250 ms budget; an unreachable Redis here is the breaker's business later, not an error.
    with contextlib.suppress(RedisError, OSError, asyncio.TimeoutError):
        await asyncio.wait_for(client.ping(), timeout=max(5.0, options.redis_timeout))
    shards = CLUSTER_SHARDS if is_cluster_url(url) else 1
    layout = KeyLayout(options.key_prefix, shards)
    budget = Budget(client, layout, max_bytes=options.max_bytes, node=secrets.token_hex(6))
    cache = ExactCache(
        RedisStore(client),
        CachePolicy(default_ttl=options.default_ttl or None,
                    max_entry_bytes=options.max_entry_bytes,
                    op_timeout=options.redis_timeout, key_prefix=options.key_prefix,
                    shards=shards),
        breaker=CircuitBreaker(failure_threshold=options.breaker_threshold,
                               reset_timeout=options.breaker_reset),
        budget=budget,
    )
    semantic = sync = None
    if options.semantic:
        semantic = await _semantic(options, cache, embedder)
        stack.push_async_callback(semantic.embedder.close)
        sync = await _start_sync(stack, url, options, semantic)
    _background(stack, budget.reap_forever())
    remote = RemoteFlight(client, layout, lease=options.flight_lease,
                          timeout=options.redis_timeout) if options.flight_lease else None
    return Engine(options, url, cache, semantic, remote=remote, sync=sync,
                  model_bytes=model_bytes(semantic.embedder.embedder) if semantic else 0)


def _background(stack: contextlib.AsyncExitStack, work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` until ``stack`` unwinds (then cancel it)."""
    task = asyncio.create_task(work)

    async def cancel() -> None:
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5.0)  # never hang the shutdown
        if not done:
            log.warning("background task %r did not stop within 5 s", task)
        elif not task.cancelled() and task.exception() is not None:
            log.warning("background task %r had failed: %r", task, task.exception())

    stack.push_async_callback(cancel)


async def _start_sync(stack: contextlib.AsyncExitStack, redis_url: str, options: EngineOptions,
                      semantic: SemanticCache) -> IndexSync:
    """Rebuild the index from Redis and follow the other nodes' changes from then on."""
    block_ms = 1000
    tail = redis_client(redis_url, timeout=options.redis_timeout,
                        read_timeout=block_ms / 1000 + options.redis_timeout + 1.0)
    stack.push_async_callback(close_client, tail)
    assert semantic.exact.budget is not None
    sync = IndexSync(tail, semantic, semantic.exact.layout, node=semantic.exact.budget.node,
                     block_ms=block_ms)
    try:
        await sync.start()
    except (RedisError, OSError) as exc:  # fail open: start empty, fill as traffic comes
        log.warning("could not rebuild the semantic index from Redis: %r", exc)
    _background(stack, sync.run())
    return sync


async def _semantic(options: EngineOptions, cache: ExactCache, embedder: Embedder | None
                    ) -> SemanticCache:
    """Load the model (on a thread: it takes seconds); the index is filled by the sync."""
    from promptcache.cache.semantic.verifier import Verifier, VerifierConfig

    model: Embedder = embedder if embedder is not None else await asyncio.to_thread(
        partial(SentenceTransformerEmbedder, options.embedding_model,
                tuning=resolve_tuning(options.embedding_tuning)))
    config = VerifierConfig(
        numbers=options.verify_numbers, negation=options.verify_negation,
        entities=options.verify_entities,
        model=None if options.verifier_model == "none" else options.verifier_model,
    )
    verifier = await asyncio.to_thread(Verifier, config, embedder=model)
    semantic = SemanticCache(
        cache,
        BatchingEmbedder(model, window=options.embed_window, max_batch=options.embed_max_batch),
        PartitionedIndex(model.dim, options.index_kind),
        verifier,
        SemanticPolicy(threshold=options.similarity_threshold,
                       max_temperature=options.semantic_max_temperature,
                       max_index_bytes=options.index_max_bytes),
    )
    return semantic


async def _embedded_redis(data_dir: str | None, stack: contextlib.AsyncExitStack) -> str:
    """Start a private redis-server; it is stopped (and a temporary directory removed) when
    ``stack`` unwinds."""
    keep = data_dir is not None
    if data_dir is None:
        data_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="promptcache-"))
    keeper = _RedisKeeper(EmbeddedRedis(data_dir, persistence=keep))
    url = await keeper.start()
    stack.push_async_callback(keeper.stop)
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
