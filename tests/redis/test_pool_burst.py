"""Bursts beyond the Redis connection pool: waited out, never taken for a Redis failure.

The client lets at most ``max_connections`` commands run at once (per node on a cluster);
the rest wait briefly for a free connection. A wait that runs out is a miss for that request
(CacheUnavailable: pass-through), but the circuit breaker does not count it.
"""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
import redis.asyncio as aioredis

from promptcache.cache.entry import Entry
from promptcache.cache.errors import CacheUnavailable
from promptcache.cache.exact import CachePolicy, ExactCache
from promptcache.cache.keys import CacheKey
from promptcache.cache.redis.budget import BudgetStore
from promptcache.cache.redis.client import close_client, redis_client
from promptcache.cache.redis.layout import KeyLayout
from promptcache.testing import FakeUpstream
from tests.support.sidecars import RunningSidecar, start_sidecar

CHAT = "/v1/chat/completions"
KEY = CacheKey("t", "", CHAT, "ab" * 16)
ENTRY = Entry(200, b'{"choices": []}', "application/json", 0.0, "chat")

CacheFactory = Callable[..., ExactCache]


@pytest.fixture
async def caches(deployment_url: str) -> AsyncIterator[CacheFactory]:
    """Exact caches on the deployment (one Redis or a cluster), each with its own client:
    ``caches(max_connections=.., wait=.., op_timeout=..)``; closed after the test."""
    clients = []

    def make(*, max_connections: int, wait: float = 2.0, op_timeout: float = 2.0
             ) -> ExactCache:
        client = redis_client(deployment_url, timeout=wait, read_timeout=5.0,
                              max_connections=max_connections)
        clients.append(client)
        store = BudgetStore(client, KeyLayout.for_url(deployment_url, "pc:"))
        return ExactCache(store, CachePolicy(op_timeout=op_timeout))

    yield make
    for client in clients:
        await close_client(client)


def hold_connections(cache: ExactCache, n: int, seconds: int) -> list[asyncio.Task[object]]:
    """Keep ``n`` of the cache's connections busy for ``seconds`` (a blocking pop on a key
    nothing pushes to)."""
    redis: aioredis.Redis = cache.store.redis  # type: ignore[attr-defined]
    return [asyncio.create_task(redis.blpop([f"{{{KEY.digest}}}nothing"], timeout=seconds))
            for _ in range(n)]


async def test_a_burst_of_lookups_far_beyond_the_pool_all_find_the_entry(
    caches: CacheFactory,
) -> None:
    """Single commands, scripts and (on a cluster) the pipelines of multi-key reads."""
    cache = caches(max_connections=4)
    assert await cache.put(KEY, ENTRY)
    refs = [(KEY.namespace, KEY.digest), (KEY.namespace, "cd" * 16)]

    found, pairs = await asyncio.gather(
        asyncio.gather(*(cache.lookup(KEY) for _ in range(200))),
        asyncio.gather(*(cache.get_with_vectors(refs) for _ in range(100))))

    assert all(entry is not None and entry.body == ENTRY.body for entry in found)
    assert all(raw[0][0] is not None and raw[1] == (None, None) for raw in pairs)
    assert cache.breaker.state == "closed" and cache.breaker.trips == 0


async def test_a_wait_for_a_connection_that_runs_out_passes_the_cache_by_without_a_breaker_failure(
    caches: CacheFactory,
) -> None:
    cache = caches(max_connections=1, wait=0.2)
    assert await cache.put(KEY, ENTRY)
    busy = hold_connections(cache, 1, seconds=2)
    await asyncio.sleep(0)  # let it take the one connection

    for _ in range(2 * cache.breaker.failure_threshold):
        with pytest.raises(CacheUnavailable, match="no free cache connection"):
            await cache.put(KEY, ENTRY)  # a script: it needs a pooled connection

    assert cache.breaker.state == "closed" and cache.breaker.trips == 0
    await asyncio.gather(*busy)
    assert await cache.put(KEY, ENTRY)


async def test_on_one_redis_lookups_take_the_lane_and_never_wait_for_the_pool(
    redis_url: str,
) -> None:
    """An exact lookup is one GET, pipelined on the lane's own connection: a pool held
    by slow commands does not hold lookups up (a cluster has no lane)."""
    client = redis_client(redis_url, timeout=0.2, read_timeout=5.0, max_connections=1)
    cache = ExactCache(BudgetStore(client, KeyLayout.for_url(redis_url, "pc:")),
                       CachePolicy(op_timeout=2.0))
    try:
        assert await cache.put(KEY, ENTRY)
        busy = hold_connections(cache, 1, seconds=1)
        await asyncio.sleep(0)

        found = await asyncio.gather(*(cache.lookup(KEY) for _ in range(100)))

        assert all(entry is not None and entry.body == ENTRY.body for entry in found)
        assert not busy[0].done()  # all that happened while the pool's one connection was held
        await asyncio.gather(*busy)
    finally:
        await close_client(client)


async def test_time_waiting_for_a_connection_does_not_count_against_the_operation_timeout(
    caches: CacheFactory,
) -> None:
    """The operation's own budget (0.2 s here) is for Redis; the wait for a connection held
    for 1 s by another command has its own bound (3 s)."""
    cache = caches(max_connections=1, wait=3.0, op_timeout=0.2)
    assert await cache.put(KEY, ENTRY)
    busy = hold_connections(cache, 1, seconds=1)
    await asyncio.sleep(0)

    stored = await cache.put(KEY, ENTRY)  # a script: it waits for the pooled connection

    assert stored and busy[0].done()
    assert cache.breaker.trips == 0


async def test_a_burst_of_500_hits_while_redis_holds_every_connection_is_all_hits(
    fake: FakeUpstream, redis_url: str, sidecars: list[RunningSidecar],
) -> None:
    """Redis pauses (CLIENT PAUSE, 3 s) just as 500 identical requests arrive: the first 256
    hold every pooled connection, the rest wait for one; all are served from the cache.
    (The Redis timeout, 5 s here, bounds both the pause's wait and the wait for a connection.)
    """
    sc = await start_sidecar(fake.url, redis_url, redis_timeout=5.0)
    sidecars.append(sc)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "burst"}]})
    headers = {"Authorization": "Bearer sk-burst", "Content-Type": "application/json"}
    admin = aioredis.Redis.from_url(redis_url, socket_timeout=5)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:

        async def one() -> str:
            async with http.post(sc.url + CHAT, data=body, headers=headers) as r:
                assert r.status == 200
                await r.read()
                return r.headers["X-Cache"]

        assert await one() == "MISS"
        try:
            await admin.execute_command("CLIENT", "PAUSE", 3000, "ALL")
            statuses = collections.Counter(await asyncio.gather(*(one() for _ in range(500))))
        finally:
            await admin.aclose()

    assert statuses == {"HIT": 500}
    assert sc.state.cache.breaker.trips == 0 and fake.calls[CHAT] == 1
