"""Building a running engine from options: the one place both the sidecar and the
in-process cache (``promptcache.clients``) construct the cache.

:func:`open_engine` builds the :class:`Engine` for an
:class:`~promptcache.cache.options.EngineOptions`: the Redis client (of ``redis_url``, whose
eviction settings are checked at start-up, or of a private embedded Redis that is supervised
and restarted if it dies), :class:`ExactCache`, the semantic tier with its embedder, index
and verifier, the byte budget and its reaper, the near cache of hot entries with its
tracking connections, the index sync with other nodes and the cross-node single flight; it
registers their cleanup on the caller's :class:`~contextlib.AsyncExitStack`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Coroutine
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from promptcache.cache.breaker import CircuitBreaker
from promptcache.cache.entry import Answer
from promptcache.cache.exact import CachePolicy, ExactCache
from promptcache.cache.keys import tenant_id
from promptcache.cache.options import EngineOptions
from promptcache.cache.protocols import Embedder
from promptcache.cache.redis.budget import BudgetStore
from promptcache.cache.redis.client import close_client, redis_client
from promptcache.cache.redis.embedded_owner import RedisKeeper, start_embedded
from promptcache.cache.redis.health import check_eviction_policy
from promptcache.cache.redis.index_sync import IndexSync
from promptcache.cache.redis.layout import KeyLayout
from promptcache.cache.redis.near import NearCache, NearTracking, near_cache_bytes
from promptcache.cache.redis.remote_flight import RemoteFlight
from promptcache.cache.resident import MemoryGuard, model_bytes
from promptcache.cache.semantic.audit import AnswerJudge, Auditor, model_busy
from promptcache.cache.semantic.embedding import BatchingEmbedder, load_embedder, resolve_tuning
from promptcache.cache.semantic.first_stage import (
    FirstStage,
    StaticEmbedder,
    distil_in_subprocess,
    find_static_model,
)
from promptcache.cache.semantic.index import PartitionedIndex
from promptcache.cache.semantic.tier import SemanticCache, SemanticPolicy
from promptcache.cache.semantic.verifier import Verifier, VerifierConfig
from promptcache.cache.singleflight import SingleFlight
from promptcache.cache.tasks import stop_task

log = logging.getLogger(__name__)
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
    embedded: RedisKeeper | None = None  # the private redis-server, when there is one
    guard: MemoryGuard | None = None  # --max-rss, when set
    near: NearCache = field(default_factory=lambda: NearCache(0))  # hot entries, in process
    tracking: NearTracking | None = None  # keeps ``near`` coherent, when it is on
    audit: Auditor | None = None  # --audit-rate: the false-hit audit, when it is on

    def memory(self) -> dict[str, int]:
        """The parts of this process's memory the engine knows it holds, in bytes."""
        parts = {"model": self.model_bytes, "near": self.near.bytes}
        if self.semantic is not None:
            fs = self.semantic.first_stage
            parts["static_model"] = fs.embedder_bytes if fs is not None else 0
            parts["index"] = self.semantic.nbytes
            parts["memo"] = self.semantic.embedder.memo_bytes_used
        return parts

    def tenant(self, credential: str | None) -> str:
        return tenant_id(credential, shared=self.options.shared_cache)


async def open_engine(options: EngineOptions, stack: contextlib.AsyncExitStack, *,
                      embedder: Embedder | None = None) -> Engine:
    """The engine for ``options``; everything it starts is closed when ``stack`` unwinds.

    Without ``redis_url`` a private redis-server is started in ``data_dir`` (a temporary
    directory, deleted at close, when that is unset too). ``embedder`` lets several engines
    in one process share a loaded model.
    """
    keeper: RedisKeeper | None = None
    if options.redis_url:
        url = options.redis_url
    else:
        keeper = await start_embedded(stack, options.data_dir)
        url = keeper.url
    client = redis_client(url, timeout=options.redis_timeout,
                          max_connections=options.redis_max_connections)
    stack.push_async_callback(close_client, client)
    # Connect (and, on a cluster, learn the slot map) now rather than in the first request's
    # 250 ms budget; an unreachable Redis here is the breaker's business later, not an error.
    reachable = False
    with contextlib.suppress(RedisError, OSError, asyncio.TimeoutError):
        await asyncio.wait_for(client.ping(), timeout=max(5.0, options.redis_timeout))
        reachable = True
        if getattr(client, "lane", None) is not None:  # the lookups' GET lane, likewise
            await client.lane.connect(within=max(5.0, options.redis_timeout))
    if keeper is None:  # someone else's Redis: may it evict our keys behind our back?
        if reachable:
            await check_eviction_policy(client, max_bytes=options.max_bytes)
        else:
            log.info("Redis's maxmemory-policy was not checked: Redis did not answer")
    layout = KeyLayout.for_url(url, options.key_prefix)
    near = NearCache(near_cache_bytes(options.near_cache_bytes, options.max_bytes))
    store = BudgetStore(client, layout, max_bytes=options.max_bytes, node=secrets.token_hex(6),
                        near=near)
    tracking = await _start_near(stack, client, layout, near, store, options)
    cache = ExactCache(
        store,
        CachePolicy(default_ttl=options.default_ttl or None,
                    max_entry_bytes=options.max_entry_bytes,
                    op_timeout=options.redis_timeout),
        breaker=CircuitBreaker(failure_threshold=options.breaker_threshold,
                               reset_timeout=options.breaker_reset),
    )
    semantic = sync = None
    if options.semantic:
        semantic = await _semantic(options, cache, embedder)
        stack.push_async_callback(semantic.embedder.close)
        stack.push_async_callback(asyncio.to_thread, semantic.index.close)  # upkeep threads
        semantic.start()  # vectors of new entries, computed off the request path
        stack.push_async_callback(semantic.stop)
        source = static_source(semantic.embedder.embedder) if options.first_stage else None
        if source is not None:
            semantic.first_stage = await asyncio.to_thread(
                _load_first_stage, options.static_model_dir, source)
            semantic.first_stage_ready = semantic.first_stage is not None
            if semantic.first_stage is None:  # distilled once, in the background
                _background(stack, _distil_first_stage(semantic, options.static_model_dir,
                                                       source))
        sync = await _start_sync(stack, url, options, semantic, store)
    _background(stack, store.reap_forever())
    remote = RemoteFlight(client, layout, lease=options.flight_lease,
                          timeout=options.redis_timeout) if options.flight_lease else None
    guard = (_memory_guard(stack, options.max_rss, semantic, near) if options.max_rss
             else None)
    audit = None
    if semantic is not None and options.audit_rate > 0:
        audit = Auditor(options.audit_rate, AnswerJudge(semantic.embedder),
                        threshold=options.similarity_threshold,
                        max_rate=options.max_false_hit_rate or None, pairs=options.audit_pairs,
                        busy=model_busy(semantic.embedder))
        _background(stack, audit.run())
    return Engine(options, url, cache, semantic, remote=remote, sync=sync, guard=guard,
                  model_bytes=(model_bytes(semantic.embedder.embedder) if semantic is not None
                               else 0),
                  embedded=keeper, near=near, tracking=tracking, audit=audit)


async def _start_near(stack: contextlib.AsyncExitStack, client: Any, layout: KeyLayout,
                      near: NearCache, store: BudgetStore, options: EngineOptions
                      ) -> NearTracking | None:
    """Track the entry keys (one connection per master) so that ``near`` may serve; wait
    briefly for tracking to be on or refused, and say which in one line."""
    if near.max_bytes <= 0:
        log.info("near cache off: --near-cache-bytes is 0")
        return None
    tracking = NearTracking(client, layout, near, timeout=options.redis_timeout)
    _background(stack, tracking.run())
    if options.max_bytes:  # the LRU learns of near hits, batched
        _background(stack, store.flush_touches_forever())
    await tracking.settled(within=max(2.0, 4 * options.redis_timeout))
    if near.on:
        log.info("near cache on: up to %d bytes, tracking %d master(s)", near.max_bytes,
                 len(tracking.client_ids))
    elif near.state != "off":  # "off" was logged with its reason
        log.info("near cache waiting for client tracking (%s): off until it is on",
                 near.reason or near.state)
    return tracking


def _memory_guard(stack: contextlib.AsyncExitStack, limit: int,
                  semantic: SemanticCache | None, near: NearCache) -> MemoryGuard:
    """``--max-rss``: shed the semantic tier (and its model) and empty the near cache past
    ``limit``."""

    async def shed() -> None:
        near.pause()
        if semantic is not None:
            await semantic.shed_memory()

    async def resume() -> None:
        near.resume()
        if semantic is not None:
            await semantic.resume_memory()

    guard = MemoryGuard(limit, shed=shed, resume=resume)
    _background(stack, guard.run())
    return guard


def static_source(embedder: Any) -> Path | None:
    """The model directory a first stage can be distilled from: that of a
    sentence-transformers model directory (either backend); None for another embedder
    (no first stage)."""
    path = getattr(embedder, "model_path", None)
    return Path(path) if isinstance(path, (str, Path)) and Path(path).is_dir() else None


def _load_first_stage(static_dir: str | None, source: Path) -> FirstStage | None:
    """The first stage over the static model of ``source`` (blocking); None if it is not
    distilled yet."""
    path = find_static_model(static_dir, source=source)
    return FirstStage(StaticEmbedder(path)) if path is not None else None


async def _distil_first_stage(semantic: SemanticCache, static_dir: str | None,
                              source: Path) -> None:
    """Distil the static model in a child process (about 15 s of CPU at low priority,
    and its memory is the child's; the tier works without a first stage meanwhile), then
    give the tier its first stage."""
    log.info("distilling the first stage's static model from %s (once; the semantic tier "
             "runs without it until then)", source)
    try:
        await distil_in_subprocess(static_dir, source)
        first_stage = await asyncio.to_thread(_load_first_stage, static_dir, source)
    except Exception:  # the tier goes on without a first stage
        log.exception("could not distil the first stage's static model")
        return
    if first_stage is not None:
        await semantic.use_first_stage(first_stage)
        log.info("the first stage is on: %d codes", len(first_stage))


def _background(stack: contextlib.AsyncExitStack, work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` until ``stack`` unwinds (then cancel it)."""
    task = asyncio.create_task(work)

    async def cancel() -> None:
        await stop_task(task)  # never hangs the shutdown

    stack.push_async_callback(cancel)


async def _start_sync(stack: contextlib.AsyncExitStack, redis_url: str, options: EngineOptions,
                      semantic: SemanticCache, store: BudgetStore) -> IndexSync:
    """Rebuild the index from Redis and follow the other nodes' changes from then on."""
    block_ms = 1000
    tail = redis_client(redis_url, timeout=options.redis_timeout,
                        read_timeout=block_ms / 1000 + options.redis_timeout + 1.0)
    stack.push_async_callback(close_client, tail)
    sync = IndexSync(tail, semantic, store, block_ms=block_ms)
    try:  # the rebuild goes on in the background past the wait: exact hits need no index
        await sync.start(wait=options.index_warmup_wait)
    except (RedisError, OSError) as exc:  # fail open: start empty, fill as traffic comes
        log.warning("could not rebuild the semantic index from Redis: %r", exc)
    _background(stack, sync.run())
    return sync


async def _semantic(options: EngineOptions, cache: ExactCache, embedder: Embedder | None
                    ) -> SemanticCache:
    """Load the model (on a thread: it takes seconds); the index is filled by the sync."""
    model: Embedder = embedder if embedder is not None else await asyncio.to_thread(
        partial(load_embedder, options.embed_backend, options.embedding_model,
                tuning=resolve_tuning(options.embedding_tuning),
                threads=options.embed_threads, model_dir=options.static_model_dir))
    config = VerifierConfig(
        numbers=options.verify_numbers, negation=options.verify_negation,
        entities=options.verify_entities, contrast=options.verify_contrast,
        model=None if options.verifier_model == "none" else options.verifier_model,
    )
    verifier = await asyncio.to_thread(Verifier, config, embedder=model)
    semantic = SemanticCache(
        cache,
        BatchingEmbedder(model, window=options.embed_window, max_batch=options.embed_max_batch,
                         memo_bytes=options.embed_memo_bytes, timeout=options.embed_timeout,
                         niceness=options.embed_niceness,
                         background_threads=options.embed_threads or None),
        PartitionedIndex(model.dim, options.index_kind),
        verifier,
        SemanticPolicy(threshold=options.similarity_threshold,
                       length_relief=options.length_relief,
                       max_temperature=options.semantic_max_temperature,
                       max_index_bytes=options.index_max_bytes,
                       wait_budget=options.semantic_wait_budget,
                       background_quiet=options.semantic_wait_budget,
                       embed_timeout=options.embed_timeout,
                       vector_backlog=options.vector_backlog),
    )
    return semantic
