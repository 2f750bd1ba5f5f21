"""The near cache (cache/redis/near.py) against real Redis servers: fills and hits, the byte
bound and LRU order, invalidation by other clients (overwrite, delete, eviction, FLUSHALL),
exact expiry, the fill race, a lost tracking connection, tracking refused, and a cluster."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from promptcache.cache.redis.budget import BudgetStore
from promptcache.cache.redis.client import close_client, is_cluster_url, redis_client
from promptcache.cache.redis.layout import CLUSTER_SHARDS, KeyLayout
from promptcache.cache.redis.near import (
    NEAR_ENTRY_OVERHEAD_BYTES,
    NearCache,
    NearTracking,
    near_cache_bytes,
)
from promptcache.cache.tasks import stop_task
from tests.support.redis_servers import RedisServer
from tests.support.sidecars import eventually


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Node:
    """A store with a near cache and its tracking, as one sidecar has them."""

    def __init__(self, url: str, *, max_bytes: int = 0, near_bytes: int = 1 << 20,
                 clock: Any = time.monotonic, touch_interval: float = 0.1) -> None:
        self.url = url
        self.client = redis_client(url, timeout=5.0)
        self.layout = KeyLayout("pc:", CLUSTER_SHARDS if is_cluster_url(url) else 1)
        self.near = NearCache(near_bytes, clock=clock)
        self.store = BudgetStore(self.client, self.layout, max_bytes=max_bytes, near=self.near,
                                 touch_interval=touch_interval)
        self.tracking = NearTracking(self.client, self.layout, self.near, timeout=1.0,
                                     ping_interval=0.2, ping_timeout=0.5)
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> Node:
        self.task = asyncio.create_task(self.tracking.run())
        await self.tracking.settled(within=10)
        return self

    async def close(self) -> None:
        await stop_task(self.task)
        await close_client(self.client)


@contextlib.asynccontextmanager
async def node(url: str, **kw: Any) -> AsyncIterator[Node]:
    n = Node(url, **kw)
    try:
        yield await n.start()
    finally:
        await n.close()


@pytest.fixture
async def other(deployment_url: str) -> AsyncIterator[BudgetStore]:
    """Another node's store (no near cache), writing to the same deployment."""
    client = redis_client(deployment_url, timeout=5.0)
    layout = KeyLayout("pc:", CLUSTER_SHARDS if is_cluster_url(deployment_url) else 1)
    yield BudgetStore(client, layout)
    await close_client(client)


def body(i: int, size: int = 300) -> bytes:
    return random.Random(i).randbytes(size)


async def write(n: Node, store: BudgetStore, namespace: str, digest: str, value: bytes,
                ttl_ms: int | None = None) -> None:
    """Put through ``store`` and wait until ``n`` has seen the invalidation (a fill in flight
    when it lands is dropped, rightly: the tests want their fills installed)."""
    seen = n.near.counts["invalidations"] + (store is n.store)  # it drops its own at once
    await store.put(namespace, digest, value, None, ttl_ms)
    await eventually(lambda: n.near.counts["invalidations"] > seen, within=1, step=0.001)


async def changes_within(check: Any, seconds: float = 0.05) -> float:
    """Poll ``check`` in a tight loop; the seconds until it held (fail past ``seconds``)."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > seconds:
            raise AssertionError(f"not changed within {seconds * 1000:.0f} ms")
        await asyncio.sleep(0)
    return time.monotonic() - start


# --- fills and hits ---------------------------------------------------------------------------


async def test_a_second_read_is_served_from_the_near_cache_without_redis(
        deployment_url: str, other: BudgetStore) -> None:
    async with node(deployment_url) as n:
        assert n.near.state == "on" and n.near.stats()["enabled"]
        await write(n, other, "", "a" * 64, body(1), None)
        assert await n.store.get("", "a" * 64) == body(1)  # a fill
        assert (n.near.counts["fills"], n.near.counts["hits"]) == (1, 0)
        await n.client.aclose()  # no Redis from here on: the hits are the near cache's
        for _ in range(3):
            assert await n.store.get("", "a" * 64) == body(1)
        assert n.near.counts["hits"] == 3


async def test_a_missing_entry_is_not_cached(redis_url: str) -> None:
    async with node(redis_url) as n:
        assert await n.store.get("", "c" * 64) is None
        assert len(n.near) == 0 and n.near.counts["misses"] == 1


def test_the_bound_counts_key_value_and_overhead_and_evicts_least_recently_used() -> None:
    clock = FakeClock()
    size = len("k0") + 100 + NEAR_ENTRY_OVERHEAD_BYTES
    near = NearCache(3 * size, clock=clock)
    near.set_state("on")
    for i in range(3):
        assert near.install(near.begin(f"k{i}"), body(i, 100), -1)  # type: ignore[arg-type]
    assert near.bytes == 3 * size and len(near) == 3
    assert near.get("k0") == body(0, 100)  # k0 is now the most recent: k1 goes first
    near.install(near.begin("k3"), body(3, 100), -1)  # type: ignore[arg-type]
    assert near.get("k1") is None and near.get("k0") is not None and near.get("k3") is not None
    assert near.bytes == 3 * size and near.counts["evictions"] == 1
    assert not near.install(near.begin("big"), body(9, 4 * size), -1)  # type: ignore[arg-type]
    assert near.bytes == 3 * size


def test_the_default_bound_is_64_mib_or_a_sixteenth_of_the_budget() -> None:
    assert near_cache_bytes(None, 0) == 64 << 20
    assert near_cache_bytes(None, 160_000_000) == 10_000_000
    assert near_cache_bytes(None, 10 << 30) == 64 << 20
    assert near_cache_bytes(0, 10 << 30) == 0 and near_cache_bytes(5, 0) == 5
    assert NearCache(0).state == "off" and NearCache(0).stats()["reason"]


def test_the_per_entry_overhead_constant_covers_what_python_allocates() -> None:
    """Measured: tracemalloc's bytes for 20k entries, less their keys' and values' lengths."""
    near = NearCache(1 << 30)
    near.set_state("on")
    keys = [f"pc:e:{i:016x}:{'d' * 40}" for i in range(20_000)]
    values = [bytes(200) + i.to_bytes(4, "big") for i in range(20_000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for k, v in zip(keys, values, strict=True):
            fill = near.begin(k)
            assert fill is not None
            near.install(fill, v, 5000)
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    # keys and values exist already here; in the process they are allocated by the fill
    own = (after - before) / len(keys)
    measured = own + (49 + 33)  # + the str and bytes object headers of key and value
    assert measured <= NEAR_ENTRY_OVERHEAD_BYTES <= measured * 1.5, measured


# --- coherence --------------------------------------------------------------------------------


async def test_an_overwrite_by_another_client_invalidates_within_milliseconds(
        deployment_url: str, other: BudgetStore) -> None:
    async with node(deployment_url) as n:
        await write(n, other, "", "a" * 64, body(1), None)
        assert await n.store.get("", "a" * 64) == body(1)
        await write(n, other, "", "a" * 64, body(2), None)

        async def fresh() -> bool:
            return await n.store.get("", "a" * 64) == body(2)

        await changes_within(fresh)
        assert n.near.counts["invalidations"] >= 1


async def test_a_delete_by_another_client_invalidates_within_milliseconds(
        deployment_url: str, other: BudgetStore) -> None:
    async with node(deployment_url) as n:
        await write(n, other, "ns", "a" * 64, body(1), None)
        assert await n.store.get("ns", "a" * 64) == body(1)
        await other.delete_matching("ns")

        async def gone() -> bool:
            return await n.store.get("ns", "a" * 64) is None

        await changes_within(gone)


async def test_a_raw_del_and_flushall_reach_the_near_cache(redis_url: str) -> None:
    async with node(redis_url) as n:
        raw = aioredis.Redis.from_url(redis_url, socket_timeout=5)
        try:
            await raw.set(n.layout.entry("", "a" * 64), b"x")
            await raw.set(n.layout.entry("", "b" * 64), b"y")
            assert await n.store.get("", "a" * 64) == b"x"
            assert await n.store.get("", "b" * 64) == b"y"
            await raw.delete(n.layout.entry("", "a" * 64))
            await eventually(lambda: len(n.near) == 1, within=1, step=0.001)
            flushes = n.near.counts["flushes"]
            await raw.flushall()
            await eventually(lambda: len(n.near) == 0, within=1, step=0.001)
            assert n.near.counts["flushes"] == flushes + 1 and n.near.on
        finally:
            await raw.aclose()


async def test_eviction_by_the_budget_script_invalidates(redis_url: str) -> None:
    async with node(redis_url) as n:
        client = redis_client(redis_url, timeout=5.0)
        try:
            writer = BudgetStore(client, n.layout, max_bytes=60_000, stream_bytes=20_000)
            await write(n, writer, "", "0" * 64, body(0, 2000))
            assert await n.store.get("", "0" * 64) == body(0, 2000)
            evicted: list[str] = []
            i = 1
            while not evicted:
                result = await writer.put("", f"{i:064x}", body(i, 2000), None, None)
                evicted += result.evicted
                i += 1
            assert any(m.endswith("0" * 64) for m in evicted)

            async def gone() -> bool:
                return await n.store.get("", "0" * 64) is None

            await changes_within(gone)
        finally:
            await close_client(client)


async def test_an_entry_expires_from_the_near_cache_when_its_key_expires_in_redis(
        deployment_url: str, other: BudgetStore) -> None:
    clock = FakeClock()
    async with node(deployment_url, clock=clock) as n:
        await write(n, other, "", "a" * 64, body(1), 10_000)
        assert await n.store.get("", "a" * 64) == body(1)
        clock.now += 9.0
        assert n.near.get(n.layout.entry("", "a" * 64)) == body(1)
        clock.now += 1.0  # 10 s after the read was sent: past the key's own expiry
        assert n.near.get(n.layout.entry("", "a" * 64)) is None
        assert n.near.counts["expired"] == 1 and len(n.near) == 0
        await write(n, other, "", "b" * 64, body(2), None)  # no TTL: no deadline
        assert await n.store.get("", "b" * 64) == body(2)
        clock.now += 1e9
        assert n.near.get(n.layout.entry("", "b" * 64)) == body(2)


async def test_a_real_expiry_is_never_served_late(deployment_url: str, other: BudgetStore) -> None:
    async with node(deployment_url) as n:
        await write(n, other, "", "a" * 64, body(1), 150)
        expires = time.monotonic() + 0.15
        served_late = 0
        while time.monotonic() < expires + 0.1:
            sent = time.monotonic()
            value = await n.store.get("", "a" * 64)
            if value is not None and sent > expires:  # asked for after the key expired
                served_late += 1
            await asyncio.sleep(0.001)
        assert served_late == 0 and n.near.counts["hits"] > 0


async def test_an_invalidation_during_a_fill_in_flight_is_not_installed(
        deployment_url: str, other: BudgetStore) -> None:
    async with node(deployment_url) as n:
        await write(n, other, "", "a" * 64, body(1), None)
        read = n.store._get_ttl

        async def slow_read(**kw: Any) -> Any:
            out = await read(**kw)  # the old value, read before the overwrite
            seen = n.near.counts["invalidations"]
            await write(n, other, "", "a" * 64, body(2), None)
            await eventually(lambda: n.near.counts["invalidations"] > seen, within=1,
                             step=0.001)
            return out

        n.store._get_ttl = slow_read
        assert await n.store.get("", "a" * 64) == body(1)  # what Redis held when read
        n.store._get_ttl = read
        assert len(n.near) == 0 and n.near.counts["fills_dropped"] == 1
        assert await n.store.get("", "a" * 64) == body(2)


async def test_this_nodes_own_writes_drop_its_near_entries_at_once(redis_url: str) -> None:
    async with node(redis_url) as n:
        await write(n, n.store, "", "a" * 64, body(1), None)
        assert await n.store.get("", "a" * 64) == body(1)
        await n.store.put("", "a" * 64, body(2), None, None)
        assert await n.store.get("", "a" * 64) == body(2)  # no wait for the invalidation
        await n.store.delete("", "a" * 64)
        assert await n.store.get("", "a" * 64) is None


# --- the LRU learns of near hits ----------------------------------------------------------------


async def test_near_hits_refresh_the_lru_in_one_batch(redis_url: str) -> None:
    async with node(redis_url, max_bytes=1_000_000, touch_interval=0.05) as n:
        for d in ("a", "b"):
            await write(n, n.store, "", d * 64, body(1), None)
            await n.store.get("", d * 64)
        lru = n.layout.shard_keys(0).lru
        before = {d: await n.client.zscore(lru, n.layout.member("", d * 64)) for d in "ab"}
        await asyncio.sleep(0.1)
        for d in ("a", "b"):
            assert await n.store.get("", d * 64) == body(1)
        assert n.near.counts["hits"] == 2
        await n.store.flush_touches()
        for d in "ab":
            assert await n.client.zscore(lru, n.layout.member("", d * 64)) > before[d]
        assert await n.client.zcard(lru) == 2  # XX: nothing added


# --- losing tracking, and no tracking ----------------------------------------------------------


async def test_a_killed_tracking_connection_flushes_then_tracking_comes_back(
        redis_url: str) -> None:
    async with node(redis_url) as n:
        await write(n, n.store, "", "a" * 64, body(1), None)
        assert await n.store.get("", "a" * 64) == body(1) and len(n.near) == 1
        (client_id,) = n.tracking.client_ids.values()
        raw = aioredis.Redis.from_url(redis_url, socket_timeout=5)
        try:
            await raw.client_kill_filter(_id=client_id)
        finally:
            await raw.aclose()
        await eventually(lambda: n.near.state != "on" or n.tracking.connects > 1, within=2,
                         step=0.001)
        assert len(n.near) == 0
        await eventually(lambda: n.near.on and n.tracking.connects == 2, within=5)
        assert await n.store.get("", "a" * 64) == body(1)  # refilled
        assert await n.store.get("", "a" * 64) == body(1) and n.near.counts["hits"] == 1


async def test_a_restarted_redis_flushes_the_near_cache_and_tracking_resumes(
        fresh_redis: RedisServer) -> None:
    async with node(fresh_redis.url) as n:
        await write(n, n.store, "", "a" * 64, body(1), None)
        assert await n.store.get("", "a" * 64) == body(1)
        fresh_redis.kill()
        await eventually(lambda: n.near.state == "down", within=3, step=0.005)
        assert len(n.near) == 0 and n.near.get(n.layout.entry("", "a" * 64)) is None
        fresh_redis.start()
        await eventually(lambda: n.near.on, within=10)
        await write(n, n.store, "", "a" * 64, body(2), None)
        assert await n.store.get("", "a" * 64) == body(2)


async def test_a_hung_redis_is_found_by_ping_and_the_near_cache_flushed(
        fresh_redis: RedisServer) -> None:
    async with node(fresh_redis.url) as n:
        await write(n, n.store, "", "a" * 64, body(1), None)
        assert await n.store.get("", "a" * 64) == body(1)
        fresh_redis.pause()
        try:
            await eventually(lambda: n.near.state == "down", within=3, step=0.01)
            assert len(n.near) == 0
        finally:
            fresh_redis.resume()
        await eventually(lambda: n.near.on, within=10)


async def test_without_permission_to_track_the_near_cache_stays_off(redis_url: str) -> None:
    admin = aioredis.Redis.from_url(redis_url, socket_timeout=5)
    await admin.execute_command("ACL", "SETUSER", "notrack", "on", ">pw", "~*", "&*",
                                "+@all", "-client")
    host_port = redis_url.split("//")[1]
    try:
        async with node(f"redis://notrack:pw@{host_port}") as n:
            assert n.near.state == "off" and "permission" in (n.near.reason or "")
            stats = n.near.stats()
            assert not stats["enabled"] and stats["reason"]
            await n.store.put("", "a" * 64, body(1), None, None)
            assert await n.store.get("", "a" * 64) == body(1)  # from Redis, as without it
            assert await n.store.get("", "a" * 64) == body(1)
            assert len(n.near) == 0 and n.near.counts["hits"] == 0
            assert n.task is not None and n.task.done()  # no retrying
    finally:
        await admin.execute_command("ACL", "DELUSER", "notrack")
        await admin.aclose()


async def test_a_cluster_is_tracked_on_every_master(redis_cluster: Any) -> None:
    redis_cluster.flushall()
    async with node(redis_cluster.url) as n:
        assert n.near.on and len(n.tracking.client_ids) == 3
        writer = redis_client(redis_cluster.url, timeout=5.0)
        try:
            other = BudgetStore(writer, n.layout)
            digests = [f"{i:08x}" + "f" * 56 for i in range(16)]  # every shard
            for i, d in enumerate(digests):
                await write(n, other, "", d, body(i), None)
                assert await n.store.get("", d) == body(i)
            assert len(n.near) == 16
            for i, d in enumerate(digests):
                await write(n, other, "", d, body(100 + i), None)
            await eventually(lambda: len(n.near) == 0, within=1, step=0.001)
            for i, d in enumerate(digests):
                assert await n.store.get("", d) == body(100 + i)
        finally:
            await close_client(writer)
