"""Building a running engine from options: the one place both the sidecar and the
in-process cache (``promptcache.clients``) construct the cache.

:class:`EngineOptions` holds every option that shapes the cache itself (Redis, TTL, sizes,
breaker, the semantic tier); the sidecar's ``Settings`` extends it with the HTTP-side ones,
so an option has one name and one default everywhere. :func:`open_engine` builds the
:class:`Engine` (Redis client or a private embedded Redis, :class:`ExactCache`, and the
semantic tier with its embedder, index and verifier) and registers its cleanup on the
caller's :class:`~contextlib.AsyncExitStack`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import threading
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import platformdirs
from redis.exceptions import RedisError

from promptcache.cache.breaker import CircuitBreaker
from promptcache.cache.embed import (
    BatchingEmbedder,
    Embedder,
    SentenceTransformerEmbedder,
    resolve_tuning,
)
from promptcache.cache.embedded import EmbeddedRedis
from promptcache.cache.engine import CachePolicy, ExactCache
from promptcache.cache.index import PartitionedIndex
from promptcache.cache.keys import tenant_id
from promptcache.cache.semantic import SemanticCache, SemanticPolicy
from promptcache.cache.singleflight import SingleFlight
from promptcache.cache.store import RedisStore, redis_client

log = logging.getLogger(__name__)


def default_data_dir() -> str:
    """Where the sidecar's embedded Redis keeps its data unless told otherwise."""
    return str(Path(platformdirs.user_cache_dir("promptcache")) / "redis")


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineOptions:
    """The cache's own options; names, meanings and defaults as in the README's
    Configuration table (``--redis-url`` is ``redis_url`` here, and so on)."""

    redis_url: str | None = None
    data_dir: str | None = None
    default_ttl: float = 86400.0
    max_entry_bytes: int = 1 << 20
    shared_cache: bool = False
    redis_timeout: float = 0.25
    breaker_threshold: int = 3
    breaker_reset: float = 1.0
    semantic: bool = True
    similarity_threshold: float = 0.925
    semantic_max_temperature: float = 1.0
    embedding_model: str | None = None
    embedding_tuning: str = "default"
    index_kind: str = "auto"
    verifier_model: str = "default"
    verify_numbers: bool = True
    verify_negation: bool = True
    verify_entities: bool = True
    embed_window: float = 0.001
    embed_max_batch: int = 64
    key_prefix: str = "pc:"


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
    stack.push_async_callback(client.aclose)
    cache = ExactCache(
        RedisStore(client),
        CachePolicy(default_ttl=options.default_ttl or None,
                    max_entry_bytes=options.max_entry_bytes,
                    op_timeout=options.redis_timeout, key_prefix=options.key_prefix),
        breaker=CircuitBreaker(failure_threshold=options.breaker_threshold,
                               reset_timeout=options.breaker_reset),
    )
    semantic = None
    if options.semantic:
        semantic = await _semantic(options, cache, embedder)
        stack.push_async_callback(semantic.embedder.close)
    return Engine(options, url, cache, semantic)


async def _semantic(options: EngineOptions, cache: ExactCache, embedder: Embedder | None
                    ) -> SemanticCache:
    """Load the model (on a thread: it takes seconds) and rebuild the index from Redis."""
    from promptcache.cache.verify import Verifier, VerifierConfig

    model: Embedder = embedder if embedder is not None else await asyncio.to_thread(
        partial(SentenceTransformerEmbedder, options.embedding_model,
                tuning=resolve_tuning(options.embedding_tuning, options.embedding_model)))
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
                       max_temperature=options.semantic_max_temperature),
    )
    try:
        await semantic.rebuild()
    except (RedisError, OSError) as exc:  # fail open: start empty, fill as traffic comes
        log.warning("could not rebuild the semantic index from Redis: %r", exc)
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
