"""The change stream inside the byte budget: trimmed by bytes, counted with the entries.

Redis's growth under a write flood from two nodes stays within the budget, on one Redis and
on a Redis Cluster; the stream's bytes are part of the counted total, exactly; the stream
stays under its share of each shard's budget and its real memory under what is counted
for it; a stream an older version wrote is counted on first use.
"""

from __future__ import annotations

import asyncio
import random
import secrets
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from promptcache.cache.redis import scripts
from promptcache.cache.redis.budget import (
    STREAM_LEAST_BYTES,
    STREAM_MAX_BYTES,
    STREAM_MIN_BYTES,
    BudgetStore,
    stream_share,
)
from promptcache.cache.redis.client import close_client, redis_client
from promptcache.cache.redis.layout import CLUSTER_SHARDS, KeyLayout
from tests.redis.test_sync import digest, reader, record
from tests.support.redis_servers import RedisClusterServers
from tests.support.sidecars import eventually

BUDGET = 1_000_000
LAYOUT = KeyLayout("pc:", 1)


async def server_info(client: Any, section: str, field: str) -> int:
    """An INFO field, summed over every master of a cluster."""
    if isinstance(client, RedisCluster):
        per_node = await client.info(section, target_nodes=RedisCluster.PRIMARIES)
        return sum(int(m[field]) for m in per_node.values())
    return int((await client.info(section))[field])


async def used_memory(client: Any) -> int:
    return await server_info(client, "memory", "used_memory")


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(redis_url, socket_timeout=5)
    yield c
    await c.aclose()


async def flood(stores: list[BudgetStore], puts: int, *, writers: int = 1) -> None:
    """Every store writes ``puts`` distinct entries with vector records, ``writers`` at a
    time, all stores at once; half the entries have a TTL."""
    rng = random.Random(0)
    work = [[(secrets.token_hex(16), rng.randbytes(rng.randint(300, 3000)),
              rng.randbytes(rng.randint(600, 1200)), 3_600_000 if i % 2 else None)
             for i in range(puts)] for _ in stores]

    async def write(store: BudgetStore, items: list[tuple[str, bytes, bytes, int | None]]
                    ) -> None:
        for key, entry, vector, ttl in items:
            await store.put("ns", key, entry, vector, ttl)

    await asyncio.gather(*(write(store, items[k::writers])
                           for store, items in zip(stores, work, strict=True)
                           for k in range(writers)))


async def flood_and_measure(url: str, layout: KeyLayout) -> tuple[float, float, BudgetStore]:
    """Two nodes (own clients, own node ids) write ten times the budget at once. Returns
    Redis's used_memory growth over the budget while their connections are still open, the
    same once they closed (what is stored), and a store to inspect the deployment with."""
    probe = redis_client(url, timeout=10.0)
    await probe.ping()
    try:
        before = await used_memory(probe)
        alone = await server_info(probe, "clients", "connected_clients")
        clients = [redis_client(url, timeout=10.0) for _ in range(2)]
        try:
            stores = [BudgetStore(c, layout, max_bytes=BUDGET, node=secrets.token_hex(6))
                      for c in clients]
            await flood(stores, 1500)
            connected = await used_memory(probe) - before
        finally:
            for c in clients:
                await close_client(c)
        await eventually(lambda: _clients_are(probe, alone))  # Redis freed their buffers
        stored = await used_memory(probe) - before
    except BaseException:
        await close_client(probe)
        raise
    return connected / BUDGET, stored / BUDGET, BudgetStore(probe, layout, max_bytes=BUDGET)


async def log_events(client: aioredis.Redis) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The single Redis's stream of events, oldest first."""
    return cast(list[tuple[bytes, dict[bytes, bytes]]], await client.xrange("pc:log"))


async def _clients_are(client: Any, n: int) -> bool:
    return await server_info(client, "clients", "connected_clients") == n


async def check_every_shard(store: BudgetStore) -> None:
    """Every shard's counted total is within its budget, and its stream within its share
    and its real size (MEMORY USAGE) under its count; the streams keep a few hundred events
    (the floor that keeps index sync's gap rebuilds rare)."""
    kept = 0
    for shard in range(store.layout.shards):
        total, _ = await store.totals(shard)
        counted, events = await store.stream_totals(shard)
        real = int(await store.redis.memory_usage(store.layout.shard_keys(shard).log,
                                                  samples=0) or 0)
        assert total <= store.shard_budget
        assert 0 < real <= counted <= store.stream_bytes, (shard, real, counted)
        kept += events
    assert kept >= 300


async def test_a_two_node_write_flood_grows_redis_by_at_most_the_budget(redis_url: str) -> None:
    """used_memory growth with the writers' connections open (their buffers included) is at
    most 1.25x a 1 MB budget, and what stays once they closed is within the budget. (Each
    open connection costs Redis 20-60 KB that no budget counts: each node writes on one.)"""
    connected, stored, store = await flood_and_measure(redis_url, LAYOUT)
    try:
        print(f"used_memory growth / budget: {connected:.3f} connected, {stored:.3f} stored")
        assert connected <= 1.25
        assert stored <= 1.0
        await check_every_shard(store)
        assert (await store.usage()).entries > 100
    finally:
        await close_client(store.redis)


@pytest.mark.slow
async def test_a_two_node_write_flood_on_a_cluster_stores_at_most_the_budget(
        redis_cluster: RedisClusterServers) -> None:
    """On a Redis Cluster the budget is split over 16 shards, each with its own stream: what
    the flood leaves in Redis (once the writers' connections closed) is within the budget.
    Open connections cost more here: each node keeps one per master."""
    redis_cluster.flushall()
    layout = KeyLayout("pc:", CLUSTER_SHARDS)
    connected, stored, store = await flood_and_measure(redis_cluster.url, layout)
    try:
        print(f"used_memory growth / budget: {connected:.3f} connected, {stored:.3f} stored")
        assert stored <= 1.0
        await check_every_shard(store)
    finally:
        await close_client(store.redis)


async def test_the_streams_bytes_are_inside_the_counted_total_exactly(
        client: aioredis.Redis) -> None:
    """meta bytes = the entries' sizes + the stream's count, and the stream's count is its
    fixed cost plus each event's bytes, recomputed here from the events themselves."""
    store = BudgetStore(client, LAYOUT, max_bytes=BUDGET, node="n1")
    sizes = [(await store.put("", f"{i:032x}", b"e" * 700, b"v" * 300 if i % 2 else None,
                              None)).size for i in range(30)]
    await store.delete_members([(0, LAYOUT.member("", f"{i:032x}")) for i in range(12)])
    events = await log_events(client)
    assert len(events) == 30 + 2  # 30 inserts, 12 removals in events of LOG_CHUNK members
    expected = scripts.STREAM_BASE_BYTES + sum(
        scripts.event_bytes(*fields.values()) for _, fields in events)
    counted, n = await store.stream_totals(0)
    assert (counted, n) == (expected, len(events))
    assert await store.totals(0) == (sum(sizes[12:]) + counted, 18)
    before, after, _, _ = await store.recount(0)
    assert before == after == sum(sizes[12:]) + counted


async def test_the_stream_is_trimmed_to_its_byte_share_and_its_memory_stays_under_it(
        client: aioredis.Redis) -> None:
    """Events only (removals of entries that never were): the stream is trimmed, oldest
    first and exactly, to its byte share; Redis's used_memory grows by less than what is
    counted for it."""
    share = 30_000
    warm = BudgetStore(client, KeyLayout("warm:", 1))  # loads the script outside the figure
    await warm.delete_members([(0, "x")])
    await client.delete(*[k async for k in client.scan_iter("warm:*")])
    before = await used_memory(client)
    store = BudgetStore(client, LAYOUT, node=secrets.token_hex(6), stream_bytes=share)
    rng = random.Random(1)
    written = 0
    for _ in range(300):
        members = [LAYOUT.member("ns", secrets.token_hex(16)) for _ in range(rng.randint(1, 20))]
        await store.delete_members([(0, m) for m in members])
        written += -(-len(members) // scripts.LOG_CHUNK)
        counted, events = await store.stream_totals(0)
        assert counted <= share
    grown = await used_memory(client) - before
    assert grown <= counted, (grown, counted)
    seqs = [int(f[b"seq"]) for _, f in await log_events(client)]
    assert len(seqs) == events < written and seqs[-1] == written
    assert seqs == list(range(written - events + 1, written + 1)), "trimmed oldest first"
    assert await store.totals(0) == (counted, 0)


async def test_a_stream_written_before_it_was_counted_is_counted_on_first_use(
        client: aioredis.Redis) -> None:
    """A deployment upgraded with an uncounted stream of many events: the first write
    counts the stream, adds it to the total and trims it to its share."""
    for seq in range(1, 2001):
        await client.xadd("pc:log", {"op": "=", "ids": f"{seq:049x}", "node": "old",
                                     "seq": seq})
    await client.hset("pc:meta", mapping={"seq": 2000})
    store = BudgetStore(client, LAYOUT, max_bytes=BUDGET, node="new")
    size = (await store.put("", "f" * 32, b"x" * 100, None, None)).size
    counted, events = await store.stream_totals(0)
    assert 0 < counted <= store.stream_bytes and events < 2000
    assert await store.totals(0) == (size + counted, 1)
    before, after, _, _ = await store.recount(0)
    assert before == after


def test_the_streams_share_is_a_twentieth_of_the_budget_within_bounds() -> None:
    assert stream_share(10_000_000) == 500_000
    assert stream_share(10**10) == STREAM_MAX_BYTES == stream_share(0)
    assert stream_share(200_000) == STREAM_MIN_BYTES  # the floor for index sync ...
    assert stream_share(200_000, 16) == STREAM_LEAST_BYTES  # ... over all shards
    assert stream_share(60_000) == 30_000  # at most half a small budget ...
    assert stream_share(10_000) == STREAM_LEAST_BYTES  # ... but never less than this


def test_a_one_megabyte_budget_keeps_a_few_hundred_events() -> None:
    """The floor that keeps gap rebuilds rare: right after a trim the streams still hold
    this many one-entry inserts (the most frequent event), on one Redis and over a
    cluster's shards."""
    insert = scripts.event_bytes("+", LAYOUT.member("", "0" * 32), "0" * 12, "123456")

    def least_kept(share: int) -> int:
        room = share - scripts.STREAM_BASE_BYTES
        return (room - room // scripts.TRIM_SLACK) // insert

    single = least_kept(stream_share(BUDGET))
    per_shard = least_kept(stream_share(BUDGET // CLUSTER_SHARDS, CLUSTER_SHARDS))
    assert single >= 350 and per_shard * CLUSTER_SHARDS >= 450, (single, per_shard)


async def test_a_node_following_the_streams_through_a_flood_misses_no_event(
        client: aioredis.Redis) -> None:
    """Two nodes write as fast as they can under a 1 MB budget while a third follows the
    stream (index sync): the byte share keeps enough events that it never falls behind a
    trim, and its index ends with exactly the vectors Redis holds."""
    writers = [BudgetStore(client, LAYOUT, max_bytes=BUDGET, node=f"w{n}") for n in range(2)]
    semantic, sync = reader(client)
    await sync.start()
    task = asyncio.create_task(sync.run())

    async def write(n: int) -> None:
        for i in range(n, 1500, 2):
            await writers[n].put("", digest(i), b"e" * random.Random(i).randint(300, 3000),
                                 record(i), None)

    try:
        await asyncio.gather(write(0), write(1))
        live = {int(d[:15], 16) for d in map(digest, range(1500))
                if await client.exists(LAYOUT.vector("", d))}
        assert 100 < len(live) < 1000
        await eventually(lambda: {i for i in live if i in semantic.index} == live
                         and len(semantic.index) == len(live), within=10)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert sync.counts["gaps"] == 0 and sync.counts["rebuilds"] == 0


async def test_a_stream_count_gone_wrong_is_counted_afresh(client: aioredis.Redis) -> None:
    """The stream deleted behind the scripts' back leaves a count too high: the next write
    finds no event left to trim, counts the stream afresh and keeps logging."""
    store = BudgetStore(client, LAYOUT, max_bytes=BUDGET, node="n1")
    for i in range(5):
        await store.put("", f"{i:032x}", b"e" * 500, None, None)
    await client.delete("pc:log")
    for field in ("stream", "bytes"):  # and a count far off
        await client.hincrby("pc:meta", field, store.stream_bytes)
    await store.put("", "f" * 32, b"e" * 500, None, None)
    await store.put("", "e" * 32, b"e" * 500, None, None)
    events = await log_events(client)
    counted, n = await store.stream_totals(0)
    assert n == 1 and counted == scripts.STREAM_BASE_BYTES + scripts.event_bytes(
        *events[0][1].values())
    before, after, _, entries = await store.recount(0)
    assert before == after and entries == 7


@pytest.mark.parametrize("cluster", [False, True])
def test_the_planned_budget_leaves_the_entries_their_bytes_after_the_streams_share(
        cluster: bool) -> None:
    from promptcache.benchmarks import plan

    for entries in (100, 5_000, 1_000_000):
        p = plan.plan(plan.Workload(entries, 500, 2000, cluster=cluster, index="flat"))
        shards = CLUSTER_SHARDS if cluster else 1
        share = stream_share(p.max_bytes // shards, shards)
        assert p.stream_bytes == shards * share
        # a multiple of the shard count, so the even split loses nothing to rounding
        assert p.max_bytes % shards == 0
        assert 0 <= p.max_bytes - (p.redis_bytes + p.stream_bytes) < shards
        assert (p.max_bytes // shards - share) * shards >= p.redis_bytes
