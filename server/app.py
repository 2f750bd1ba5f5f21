"""The sidecar's aiohttp application: resources, routes, and how to run it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Coroutine
from functools import partial
from typing import Any

import aiohttp
import faiss
from aiohttp import web
from redis.exceptions import RedisError

from promptcache.cache.breaker import CircuitBreaker
from promptcache.cache.embed import BatchingEmbedder, Embedder, SentenceTransformerEmbedder
from promptcache.cache.embedded import EmbeddedRedis
from promptcache.cache.engine import CachePolicy, ExactCache
from promptcache.cache.eviction import Budget
from promptcache.cache.index import PartitionedIndex
from promptcache.cache.keys import CLUSTER_SHARDS, ENDPOINTS, KeyLayout
from promptcache.cache.lease import RemoteFlight
from promptcache.cache.resident import model_bytes
from promptcache.cache.semantic import SemanticCache, SemanticPolicy
from promptcache.cache.store import RedisStore, is_cluster_url, redis_client
from promptcache.cache.sync import IndexSync
from promptcache.server import admin
from promptcache.server.config import Settings
from promptcache.server.handlers import cached_route
from promptcache.server.metrics import Metrics
from promptcache.server.proxy import Upstream
from promptcache.server.state import SIDECAR, Sidecar

log = logging.getLogger("promptcache")


async def _semantic(settings: Settings, cache: ExactCache, embedder: Embedder | None
                    ) -> SemanticCache:
    """Load the model (on a thread: it takes seconds) and rebuild the index from Redis."""
    from promptcache.cache.verify import Verifier, VerifierConfig

    model: Embedder = embedder if embedder is not None else await asyncio.to_thread(
        SentenceTransformerEmbedder, settings.embedding_model)
    config = VerifierConfig(
        numbers=settings.verify_numbers, negation=settings.verify_negation,
        entities=settings.verify_entities,
        model=None if settings.verifier_model == "none" else settings.verifier_model,
    )
    verifier = await asyncio.to_thread(Verifier, config, embedder=model)
    semantic = SemanticCache(
        cache,
        BatchingEmbedder(model, window=settings.embed_window, max_batch=settings.embed_max_batch),
        PartitionedIndex(model.dim, settings.index_kind),
        verifier,
        SemanticPolicy(threshold=settings.similarity_threshold,
                       max_temperature=settings.semantic_max_temperature,
                       max_index_bytes=settings.index_max_bytes),
    )
    return semantic


async def _resources(settings: Settings, redis_url: str, embedder: Embedder | None,
                     app: web.Application) -> AsyncIterator[None]:
    async with contextlib.AsyncExitStack() as stack:
        client = redis_client(redis_url, timeout=settings.redis_timeout)
        stack.push_async_callback(client.aclose)
        shards = CLUSTER_SHARDS if is_cluster_url(redis_url) else 1
        layout = KeyLayout(settings.key_prefix, shards)
        budget = Budget(client, layout, max_bytes=settings.max_bytes, node=secrets.token_hex(6))
        cache = ExactCache(
            RedisStore(client),
            CachePolicy(
                default_ttl=settings.default_ttl or None,
                max_entry_bytes=settings.max_entry_bytes,
                op_timeout=settings.redis_timeout,
                key_prefix=settings.key_prefix,
                shards=shards,
            ),
            breaker=CircuitBreaker(failure_threshold=settings.breaker_threshold,
                                   reset_timeout=settings.breaker_reset),
            budget=budget,
        )
        semantic = sync = None
        if settings.semantic:
            semantic = await _semantic(settings, cache, embedder)
            stack.push_async_callback(semantic.embedder.close)
            sync = await _start_sync(stack, redis_url, settings, semantic)
        _background(stack, budget.reap_forever())
        session = await stack.enter_async_context(aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            auto_decompress=True,
            trust_env=True,
        ))
        app[SIDECAR] = Sidecar(
            settings, cache, Upstream(settings, session), Metrics(), semantic,
            remote=RemoteFlight(client, layout, lease=settings.flight_lease,
                                timeout=settings.redis_timeout) if settings.flight_lease else None,
            sync=sync, model_bytes=model_bytes(semantic.embedder.embedder) if semantic else 0)
        yield


def _background(stack: contextlib.AsyncExitStack, work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` until the app's cleanup cancels it."""
    task = asyncio.create_task(work)

    async def cancel() -> None:
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5.0)  # never hang the shutdown
        if not done:
            log.warning("background task %r did not stop within 5 s", task)
        elif not task.cancelled() and task.exception() is not None:
            log.warning("background task %r had failed: %r", task, task.exception())

    stack.push_async_callback(cancel)


async def _start_sync(stack: contextlib.AsyncExitStack, redis_url: str, settings: Settings,
                      semantic: SemanticCache) -> IndexSync:
    """Rebuild the index from Redis and follow the other nodes' changes from then on."""
    block_ms = 1000
    tail = redis_client(redis_url, timeout=settings.redis_timeout,
                        read_timeout=block_ms / 1000 + settings.redis_timeout + 1.0)
    stack.push_async_callback(tail.aclose)
    assert semantic.exact.budget is not None
    sync = IndexSync(tail, semantic, semantic.exact.layout, node=semantic.exact.budget.node,
                     block_ms=block_ms)
    try:
        await sync.start()
    except (RedisError, OSError) as exc:  # fail open: start empty, fill as traffic comes
        log.warning("could not rebuild the semantic index from Redis: %r", exc)
    _background(stack, sync.run())
    return sync


async def passthrough(request: web.Request) -> web.StreamResponse:
    sc = request.app[SIDECAR]
    sc.metrics.requests.labels("other", "PASS").inc()
    return await sc.upstream.passthrough(request)


def create_app(settings: Settings, redis_url: str, *, embedder: Embedder | None = None
               ) -> web.Application:
    """The sidecar for ``settings`` using the Redis at ``redis_url``.

    ``embedder`` lets several in-process sidecars (tests, benchmarks) share one model.
    """
    app = web.Application(client_max_size=settings.max_body_bytes)
    app.cleanup_ctx.append(partial(_resources, settings, redis_url, embedder))
    app.router.add_get("/healthz", admin.healthz)
    app.router.add_get("/readyz", admin.readyz)
    app.router.add_get("/metrics", admin.metrics)
    app.router.add_get("/stats", admin.stats)
    app.router.add_delete("/cache", admin.delete_cache)
    for path in ENDPOINTS:
        app.router.add_post(path, cached_route)
    app.router.add_route("*", "/{tail:.*}", passthrough)
    return app


def serve(settings: Settings, *, print_fn: Callable[..., None] = print) -> int:
    """Run the sidecar until SIGINT/SIGTERM; own (and always stop) the embedded Redis."""
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Searches here are one query at a time: FAISS's OpenMP threads only add contention
    # with the embedding model and the event loop.
    faiss.omp_set_num_threads(1)
    embedded: EmbeddedRedis | None = None
    redis_url = settings.redis_url
    try:
        if redis_url is None:
            embedded = EmbeddedRedis(settings.resolved_data_dir)
            redis_url = embedded.start()
            log.info("embedded redis-server (pid %s) at %s", embedded.pid, redis_url)
        log.info("caching %s on http://%s:%s", settings.upstream, settings.host, settings.port)
        web.run_app(
            create_app(settings, redis_url),
            host=settings.host,
            port=settings.port,
            print=print_fn,
            access_log=log if settings.log_level.lower() == "debug" else None,
        )
    finally:
        if embedded is not None:
            embedded.stop()
    return 0
