"""Cross-node single flight (a lease in Redis) and the per-node index bound."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
import redis.asyncio as aioredis

from promptcache.cache.protocols import Embedder
from promptcache.cache.redis.layout import KeyLayout
from promptcache.cache.redis.remote_flight import RemoteFlight
from promptcache.testing import FakeUpstream
from tests.sidecar.test_semantic import ask, chat
from tests.support.redis_servers import free_port
from tests.support.sidecars import RunningSidecar, start_sidecar

LAYOUT = KeyLayout("pc:", 1)
DIGEST = "ab" * 16


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(redis_url, socket_timeout=5)
    yield c
    await c.aclose()


async def test_one_node_gets_the_lease_and_only_its_owner_releases_it(
        client: aioredis.Redis) -> None:
    a = RemoteFlight(client, LAYOUT, lease=5.0)
    b = RemoteFlight(client, LAYOUT, lease=5.0)
    lease = await a.acquire("", DIGEST)
    assert lease is not None and await b.acquire("", DIGEST) is None
    await client.set(LAYOUT.lease("", DIGEST), b"someone-else")  # lease taken over
    await lease.release()
    assert await client.get(LAYOUT.lease("", DIGEST)) == b"someone-else"


async def test_a_waiter_gets_the_entry_when_it_lands(client: aioredis.Redis) -> None:
    waiter = RemoteFlight(client, LAYOUT, lease=5.0, poll=0.005)
    await client.set(LAYOUT.lease("", DIGEST), b"leader", px=5000)
    polls = 0

    async def lookup() -> str | None:
        nonlocal polls
        polls += 1
        return "entry" if polls >= 4 else None

    assert await waiter.wait("", DIGEST, lookup) == "entry"
    assert waiter.landed == 1 and polls == 4


async def test_a_waiter_calls_upstream_itself_once_the_lease_is_gone(
        client: aioredis.Redis) -> None:
    waiter = RemoteFlight(client, LAYOUT, lease=5.0, poll=0.005)
    await client.set(LAYOUT.lease("", DIGEST), b"leader", px=50)

    async def nothing() -> None:
        return None

    assert await waiter.wait("", DIGEST, nothing) is None
    assert waiter.expired == 1


async def test_a_dead_redis_grants_the_upstream_call() -> None:
    """A Redis failure on this path degrades to calling upstream, never to an error."""
    dead = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}", socket_timeout=0.2,
                                   socket_connect_timeout=0.2)
    try:
        flight = RemoteFlight(dead, LAYOUT, timeout=0.3)
        lease = await flight.acquire("", DIGEST)
        assert lease is not None  # go ahead and call upstream
        await lease.release()  # nothing to release, and no error

        async def nothing() -> None:
            return None

        assert await flight.wait("", DIGEST, nothing) is None
        assert flight.failed == 2
    finally:
        await dead.aclose()


async def test_a_full_index_stops_indexing_on_that_node_but_entries_still_hit(
    fake: FakeUpstream, redis_url: str, embedder: Embedder, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession,
) -> None:
    sc = await start_sidecar(fake.url, redis_url, embedder=embedder, index_max_bytes=1)
    sidecars.append(sc)
    await ask(http, sc, chat("What is the boiling point of water at sea level?"))
    await ask(http, sc, chat("Who painted the ceiling of the Sistine Chapel?"))
    semantic = sc.state.semantic
    assert semantic is not None and len(semantic) == 1
    assert semantic.counts["index_full"] == 1
    h, _ = await ask(http, sc, chat("Who painted the ceiling of the Sistine Chapel?"))
    assert h["X-Cache"] == "HIT"
