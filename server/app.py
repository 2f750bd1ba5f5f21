"""The sidecar's aiohttp application: resources, routes, and how to run it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from functools import partial

import aiohttp
import faiss
from aiohttp import web

from promptcache.cache import tracing
from promptcache.cache.api import ENDPOINTS
from promptcache.cache.engine import open_engine
from promptcache.cache.errors import ConfigError
from promptcache.cache.protocols import Embedder
from promptcache.cache.resident import bound_allocator, trim_forever
from promptcache.cache.savings import Savings, load_prices
from promptcache.cache.tasks import stop_task
from promptcache.server import admin, dashboard
from promptcache.server.config import Settings, redact_url
from promptcache.server.handlers import audit_ask, cached_route
from promptcache.server.metrics import Metrics
from promptcache.server.proxy import Upstream
from promptcache.server.state import SIDECAR, Sidecar

log = logging.getLogger("promptcache")
#: aiohttp's shutdown timeout: how long a stopping sidecar lets requests in flight finish.
DRAIN_SECONDS = 60.0
#: Set on the app when it runs in a process of its own whose allocator it may tune.
BOUNDED = web.AppKey("bounded", bool)


async def _resources(settings: Settings, embedder: Embedder | None,
                     app: web.Application) -> AsyncIterator[None]:
    async with contextlib.AsyncExitStack() as stack:
        engine = await open_engine(settings, stack, embedder=embedder)
        session = await stack.enter_async_context(aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            auto_decompress=True,
            trust_env=True,
        ))
        savings = Savings(load_prices(settings.prices) if settings.prices else None)
        app[SIDECAR] = Sidecar(settings, engine, Upstream(settings, session), Metrics(savings))
        if engine.audit is not None:  # --audit-rate: re-asks upstream, counted as spent
            engine.audit.connect(audit_ask(app[SIDECAR]), savings.spent)
        if app.get(BOUNDED):  # a process of its own (serve): freed pages go back regularly
            trimmer = asyncio.create_task(trim_forever())
            stack.push_async_callback(stop_task, trimmer)
        if settings.otel and tracing.enable():  # per process: see cache/tracing.py
            stack.callback(tracing.disable)
        yield


async def passthrough(request: web.Request) -> web.StreamResponse:
    sc = request.app[SIDECAR]
    sc.metrics.requests.labels("other", "PASS").inc()
    return await sc.upstream.passthrough(request)


def create_app(settings: Settings, *, embedder: Embedder | None = None) -> web.Application:
    """The sidecar for ``settings``, on the Redis at ``settings.redis_url`` (or, without one,
    a private Redis started in ``settings.data_dir`` when the app starts).

    ``embedder`` lets several in-process sidecars (tests, benchmarks) share one model.
    """
    if settings.upstream_api_key and not settings.anonymous_tenant:
        # The sidecar is then the authentication boundary: callers without a credential
        # are served with the operator's key, and cached in the anonymous tenant.
        settings = replace(settings, anonymous_tenant=True)
    # aiohttp's keep-alive timer also runs from the moment a connection opens until a
    # request's headers are complete: it is the header timeout (slowloris) as well.
    app = web.Application(client_max_size=settings.max_body_bytes,
                          handler_args={"keepalive_timeout": settings.header_timeout})
    app.cleanup_ctx.append(partial(_resources, settings, embedder))
    app[dashboard.LATENCY] = dashboard.LatencyWindows()
    app.router.add_get("/healthz", admin.healthz)
    app.router.add_get("/readyz", admin.readyz)
    app.router.add_get("/metrics", admin.metrics)
    app.router.add_get("/stats", admin.stats)
    app.router.add_get("/dashboard", dashboard.dashboard)
    app.router.add_delete("/cache", admin.delete_cache)
    for path in ENDPOINTS:
        app.router.add_post(path, cached_route)
    app.router.add_route("*", "/{tail:.*}", passthrough)
    return app


def serve(settings: Settings, *, print_fn: Callable[..., None] | None = print,
          sock: socket.socket | None = None, worker: dict[str, int] | None = None) -> int:
    """Run one sidecar process until SIGINT/SIGTERM; without ``redis_url`` it owns (and
    always stops) an embedded Redis.

    With ``--workers N`` the command line runs :func:`promptcache.server.workers.supervise`
    instead (which never imports this module: the supervisor stays small), and each of its
    workers runs this on the listening socket ``sock`` it inherited, ``worker`` saying which
    worker it is (shown in ``/stats``)."""
    if worker is None and settings.workers > 1:
        raise ConfigError("serve() runs one process: --workers N is run by "
                          "promptcache.server.workers.supervise")
    tag = f" [worker {worker['index']}]" if worker is not None else ""
    logging.basicConfig(level=settings.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s")
    # Searches here are one query at a time: FAISS's OpenMP threads only add contention
    # with the embedding model and the event loop.
    faiss.omp_set_num_threads(1)
    if settings.redis_url is None:  # the embedded Redis, in the resolved data directory
        settings = replace(settings, data_dir=str(settings.resolved_data_dir))
    app = create_app(settings)
    app[BOUNDED] = bound_allocator()  # the model's buffers never fragment this process's heap
    if worker is not None:
        app[admin.WORKER] = worker
    else:
        log.info("caching %s on http://%s:%s", redact_url(settings.upstream), settings.host,
                 settings.port)
    web.run_app(
        app,
        host=None if sock is not None else settings.host,
        port=None if sock is not None else settings.port,
        sock=sock,
        shutdown_timeout=DRAIN_SECONDS,
        print=print_fn if worker is None else None,
        access_log=log if settings.log_level.lower() == "debug" else None,
    )
    return 0
