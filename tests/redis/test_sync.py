"""Index sync: a node follows the change stream, and rebuilds when it fell behind a trim."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator

import numpy as np
import pytest
import redis.asyncio as aioredis

from promptcache.cache.exact import CachePolicy, ExactCache
from promptcache.cache.redis.budget import BudgetStore
from promptcache.cache.redis.index_sync import IndexSync
from promptcache.cache.redis.layout import KeyLayout
from promptcache.cache.semantic.index import PartitionedIndex
from promptcache.cache.semantic.record import VectorRecord
from promptcache.cache.semantic.tier import SemanticCache
from tests.support.sidecars import eventually

LAYOUT = KeyLayout("pc:", 1)
DIM = 8


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(redis_url, socket_timeout=5)
    yield c
    await c.aclose()


def digest(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()[:32]


def record(i: int) -> bytes:
    v = np.random.default_rng(i).normal(size=DIM).astype(np.float32)
    return VectorRecord("scope", f"text {i}", v / np.linalg.norm(v), "", digest(i)).encode()


def reader(client: aioredis.Redis) -> tuple[SemanticCache, IndexSync]:
    store = BudgetStore(client, LAYOUT, node="reader")
    exact = ExactCache(store, CachePolicy(op_timeout=5.0))
    semantic = SemanticCache(exact, None, PartitionedIndex(DIM, "flat"), None)  # type: ignore[arg-type]
    return semantic, IndexSync(client, semantic, store, block_ms=100)


async def test_inserts_and_removals_of_another_node_reach_the_index(
        client: aioredis.Redis) -> None:
    writer = BudgetStore(client, LAYOUT, node="writer", max_bytes=20 * 1500)
    semantic, sync = reader(client)
    await sync.start()
    task = asyncio.create_task(sync.run())
    try:
        for i in range(50):
            await writer.put("", digest(i), b"entry" * 50, record(i), None)
        live = {int(d[:15], 16) for d in map(digest, range(50))
                if await client.exists(LAYOUT.entry("", d))}
        assert 5 < len(live) < 50  # the budget evicted some
        await eventually(lambda: {i for i in live if i in semantic.index} == live
                         and len(semantic.index) == len(live), within=5)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert sync.counts["gaps"] == 0


async def test_a_node_behind_a_trimmed_stream_rebuilds_from_redis(
        client: aioredis.Redis) -> None:
    writer = BudgetStore(client, LAYOUT, node="writer", stream_maxlen=5)
    semantic, sync = reader(client)
    await sync.start()  # the stream is empty: this node expects event 1 next
    for i in range(400):  # ... but the tail only starts once the stream was trimmed
        await writer.put("", digest(i), b"entry", record(i), None)
    assert int((await client.xrange("pc:log", count=1))[0][1][b"seq"]) > 1
    task = asyncio.create_task(sync.run())
    try:
        await eventually(lambda: len(semantic.index) == 400, within=5)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert sync.counts["gaps"] == 1 and sync.counts["rebuilds"] == 1


async def test_a_large_index_loads_in_the_background_while_start_up_goes_on(
        client: aioredis.Redis) -> None:
    """start(wait=0) returns at once with the rebuild under way (warming); the node's
    lookups meanwhile see what is loaded; run() finishes it, then follows the stream."""
    writer = BudgetStore(client, LAYOUT, node="writer")
    for i in range(3000):
        await writer.put("", digest(i), b"entry", record(i), None)
    semantic, sync = reader(client)
    await sync.start(wait=0)
    assert sync.warming and sync.stats()["warming"] is True
    assert len(semantic.index) < 3000
    task = asyncio.create_task(sync.run())
    try:
        await eventually(lambda: not sync.warming, within=30)
        assert len(semantic.index) == 3000 and sync.counts["warmup_ms"] >= 0
        await writer.put("", digest(9999), b"entry", record(9999), None)  # followed after
        await eventually(lambda: len(semantic.index) == 3001, within=5)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
