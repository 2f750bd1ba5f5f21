"""The sidecar's aiohttp application: resources, routes, and how to run it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from functools import partial

import aiohttp
import faiss
from aiohttp import web

from promptcache.cache.engine import open_engine
from promptcache.cache.keys import ENDPOINTS
from promptcache.cache.redis.embedded import EmbeddedRedis
from promptcache.cache.semantic.embedding import Embedder
from promptcache.server import admin
from promptcache.server.config import Settings
from promptcache.server.handlers import cached_route
from promptcache.server.metrics import Metrics
from promptcache.server.proxy import Upstream
from promptcache.server.state import SIDECAR, Sidecar

log = logging.getLogger("promptcache")


async def _resources(settings: Settings, redis_url: str, embedder: Embedder | None,
                     app: web.Application) -> AsyncIterator[None]:
    async with contextlib.AsyncExitStack() as stack:
        engine = await open_engine(replace(settings, redis_url=redis_url), stack,
                                   embedder=embedder)
        session = await stack.enter_async_context(aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            auto_decompress=True,
            trust_env=True,
        ))
        app[SIDECAR] = Sidecar(settings, engine, Upstream(settings, session), Metrics())
        yield


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
