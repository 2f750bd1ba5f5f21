"""The byte budget, LRU eviction, expiry accounting and reconciliation, on a real Redis."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from promptcache.cache.exact import CachePolicy, ExactCache
from promptcache.cache.keys import request_key
from promptcache.cache.redis.budget import ENTRY_OVERHEAD_BYTES, BudgetStore
from promptcache.cache.redis.layout import KeyLayout
from promptcache.cache.redis.reconcile import reconcile
from tests.support.paths import DATASETS
from tests.support.sidecars import eventually

LAYOUT = KeyLayout("pc:", 1)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        self.now += 0.001  # every reading is later than the one before
        return self.now


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(redis_url, socket_timeout=5)
    yield c
    await c.aclose()


def make_cache(client: aioredis.Redis, max_bytes: int, *, node: str = "n1",
               stream_bytes: int | None = None) -> ExactCache:
    store = BudgetStore(client, LAYOUT, max_bytes=max_bytes, node=node, clock=Clock(),
                        stream_bytes=stream_bytes)
    return ExactCache(store, CachePolicy(op_timeout=5.0))


def store_of(cache: ExactCache) -> BudgetStore:
    assert isinstance(cache.store, BudgetStore)
    return cache.store


def key(i: int, namespace: str = ""):  # type: ignore[no-untyped-def]
    return request_key("/v1/chat/completions", {"i": i}, tenant="t", namespace=namespace)


async def put(cache: ExactCache, i: int, size: int = 600, ttl: float | None = None,
              namespace: str = "") -> int:
    body = random.Random(i).randbytes(size)  # incompressible: the size is what is stored
    entry = cache.entry_for(200, body, "application/json", "chat")
    return await cache.put(key(i, namespace), entry, ttl=ttl)


async def stored(client: aioredis.Redis, *ids: int) -> bool:
    keys = [LAYOUT.entry("", key(i).digest) for i in ids]
    return int(await client.exists(*keys)) == len(keys)


async def usage(cache: ExactCache) -> tuple[int, int]:
    """(bytes, entries) of the entries: the counted total less the change stream's part
    (tests/redis/test_budget_stream.py checks that part)."""
    u = await cache.store.usage()
    stream, _ = await store_of(cache).stream_totals(0)
    return u.bytes - stream, u.entries


async def test_bytes_counted_are_payload_vector_keys_and_overhead(
        client: aioredis.Redis) -> None:
    cache = make_cache(client, 0)
    k = key(1)
    entry = cache.entry_for(200, b"x" * 500, "application/json", "chat")
    counted = await cache.put(k, entry, vector=b"v" * 300)
    expected = (len(entry.encode()) + 300 + len(LAYOUT.entry(k.namespace, k.digest))
                + len(LAYOUT.vector(k.namespace, k.digest)) + ENTRY_OVERHEAD_BYTES)
    assert counted == expected
    assert await usage(cache) == (expected, 1)


async def test_inserts_evict_least_recently_hit_entries_and_never_exceed_the_budget(
        client: aioredis.Redis) -> None:
    one = await put(make_cache(client, 0), 0)  # the size of one entry
    await client.flushall()
    stream = 20_000  # the change stream's share of the budget; the entries get the rest
    cache = make_cache(client, 3 * one + 10 + stream, stream_bytes=stream)  # room for three
    for i in range(3):
        await put(cache, i)
    assert await cache.lookup(key(0)) is not None  # 0 is now the most recently hit
    await put(cache, 3)  # evicts 1, the least recently used
    assert await cache.lookup(key(1)) is None
    assert await stored(client, 0, 2, 3)  # (EXISTS does not count as a hit)
    await put(cache, 4)  # evicts 2: older than 0's hit and 3's insert
    assert await stored(client, 0, 3, 4) and not await stored(client, 2)
    total, entries = await usage(cache)
    assert entries == 3 and total <= 3 * one + 10
    assert cache.counts["evicted"] == 2


async def test_an_entry_larger_than_the_budget_is_not_stored(client: aioredis.Redis) -> None:
    cache = make_cache(client, 2000)
    assert await put(cache, 0, size=5000) == 0
    assert await cache.lookup(key(0)) is None
    assert await usage(cache) == (0, 0)
    assert cache.counts["over_budget"] == 1


async def test_overwriting_an_entry_replaces_its_bytes(client: aioredis.Redis) -> None:
    cache = make_cache(client, 0)
    await put(cache, 0, size=1000)
    second = await put(cache, 0, size=200)
    assert await usage(cache) == (second, 1)


async def test_ttl_expiry_leaves_the_accounting_exact(client: aioredis.Redis) -> None:
    cache = make_cache(client, 100_000)
    kept = await put(cache, 0)
    for i in range(1, 6):
        await put(cache, i, ttl=0.05)
    assert (await usage(cache))[1] == 6
    entry_key = LAYOUT.entry("", key(1).digest)
    await eventually(lambda: _gone(client, entry_key))
    await eventually(lambda: _usage_is(cache, (kept, 1)))
    events = await client.xrange("pc:log")
    removed = {m for _, f in events if f[b"op"] == b"-" for m in f[b"ids"].decode().split(",")}
    assert removed == {LAYOUT.member("", key(i).digest) for i in range(1, 6)}
    assert (await reconcile(store_of(cache))).clean


async def _gone(client: aioredis.Redis, k: str) -> bool:
    return not await client.exists(k)


async def _usage_is(cache: ExactCache, expected: tuple[int, int]) -> bool:
    return await usage(cache) == expected


async def test_deletes_keep_the_accounting_exact(client: aioredis.Redis) -> None:
    cache = make_cache(client, 0)
    sizes = {}
    for i in range(6):
        sizes[i] = await put(cache, i, namespace="a" if i < 3 else "b")
    assert await cache.invalidate_key("a", key(0, "a").digest) == 1
    assert await cache.invalidate_key("a", key(0, "a").digest) == 0
    assert await usage(cache) == (sum(sizes.values()) - sizes[0], 5)
    assert await cache.invalidate_namespace("a") == 2
    assert await usage(cache) == (sizes[3] + sizes[4] + sizes[5], 3)
    assert await cache.invalidate_all() == 3
    assert await usage(cache) == (0, 0)
    assert [k async for k in client.scan_iter("pc:[ev]:*")] == []


async def test_reconcile_reports_and_fixes_every_kind_of_drift(
        client: aioredis.Redis) -> None:
    cache = make_cache(client, 0)
    for i in range(5):
        await put(cache, i)
    report = await reconcile(store_of(cache))
    assert report.clean and report.checked == 5
    # Drift made behind the cache's back: a key deleted, a size wrong, an entry
    # written without accounting, and a total that disagrees with the sizes.
    await client.delete(LAYOUT.entry("", key(0).digest))
    await client.hset("pc:sizes", LAYOUT.member("", key(1).digest), 1)
    await client.set(LAYOUT.entry("", key(9).digest), b"y" * 700)
    await client.hincrby("pc:meta", "bytes", 12345)
    report = await reconcile(store_of(cache))
    assert (report.stale, report.resized, report.untracked) == (1, 1, 1)
    assert not report.clean and report.entries_after == 5
    live, _ = await store_of(cache).stream_totals(0)  # the stream is counted too
    async for k in client.scan_iter("pc:e:*"):
        member = k.decode()[len("pc:e:"):]
        live += int(await client.strlen(k)) + len(k) + ENTRY_OVERHEAD_BYTES
        assert await client.hget("pc:sizes", member) is not None
    assert report.bytes_after == live == (await cache.store.usage()).bytes
    assert (await reconcile(store_of(cache))).clean


async def test_concurrent_writers_on_many_clients_never_exceed_the_budget(
        redis_url: str) -> None:
    """Four "nodes" (own clients) write at once; a poller checks the total all along."""
    budget_bytes = 20_000
    clients = [aioredis.Redis.from_url(redis_url, socket_timeout=5) for _ in range(5)]
    caches = [make_cache(c, budget_bytes, node=f"n{n}") for n, c in enumerate(clients[:4])]
    seen: list[int] = []
    done = asyncio.Event()

    async def poll() -> None:
        while not done.is_set():
            seen.append(int(await clients[4].hget("pc:meta", "bytes") or 0))
            await asyncio.sleep(0)

    async def write(cache: ExactCache, ids: itertools.count[int]) -> None:
        for _ in range(100):
            await put(cache, next(ids), size=300 + next(ids) % 900)

    ids = itertools.count()
    poller = asyncio.create_task(poll())
    try:
        await asyncio.gather(*(write(c, ids) for c in caches))
    finally:
        done.set()
        await poller
        for c in clients:
            await c.aclose()
    assert len(seen) > 50 and max(seen) <= budget_bytes
    assert max(seen) > budget_bytes * 0.8, "the budget was actually used"


def test_promptcache_reconcile_prints_the_report_and_exits_1_on_drift(
        redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    import redis

    from promptcache.cli import main

    assert main(["reconcile", "--redis-url", redis_url]) == 0
    assert json.loads(capsys.readouterr().out)["clean"] is True
    r = redis.Redis.from_url(redis_url)
    try:
        r.set(LAYOUT.entry("", key(1).digest), b"z" * 100)  # an entry nobody accounted
    finally:
        r.close()
    assert main(["reconcile", "--redis-url", redis_url]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["untracked"] == 1 and report["entries_after"] == 1
    assert main(["reconcile", "--redis-url", redis_url]) == 0


PROMPTS = DATASETS / "chat_prompts.jsonl.gz"


@pytest.mark.slow
@pytest.mark.skipif(not PROMPTS.exists(), reason="shared datasets are not there")
def test_bench_budget_writes_its_figures_and_never_overshoots(tmp_path: Path) -> None:
    import argparse
    import json

    from promptcache.benchmarks import budget

    parser = argparse.ArgumentParser()
    budget.add_arguments(parser)
    out = tmp_path
    args = parser.parse_args(["--prompts", str(PROMPTS), "--entries", "400", "--max-bytes",
                              "150000", "--writers", "3", "--sync-samples", "50",
                              "--out", str(out)])
    assert budget.main(args) == 0
    result = json.loads((out / "budget.json").read_text())
    flood = result["flood"]
    assert flood["overshoot_bytes"] <= 0 and flood["evicted"] > 200
    assert flood["entries"] + flood["evicted"] == 400
    # a 400-entry fill is small: fixed allocations weigh more than at 4000 entries (~0.98)
    assert 0.8 < result["per_entry"]["used_memory_over_counted"] < 1.25
    assert 0 < result["sync_latency"]["p50_ms"] <= result["sync_latency"]["max_ms"] < 2000


def test_promptcache_reconcile_without_a_reachable_redis_is_a_clean_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from promptcache.cli import main

    assert main(["reconcile", "--data-dir", str(tmp_path)]) == 2
    assert "cannot reconcile the cache at unix://" in capsys.readouterr().err


async def test_hits_refresh_recency_at_most_once_per_touch_interval(
        client: aioredis.Redis) -> None:
    now = [1000.0]
    store = BudgetStore(client, LAYOUT, max_bytes=100_000, clock=lambda: now[0])
    cache = ExactCache(store, CachePolicy(op_timeout=5.0))
    await put(cache, 0)
    member = LAYOUT.member("", key(0).digest)
    assert await client.zscore("pc:lru", member) == 1_000_000
    now[0] = 1002.0
    await cache.lookup(key(0))
    assert await client.zscore("pc:lru", member) == 1_002_000
    now[0] = 1002.05  # within the interval: a plain GET
    await cache.lookup(key(0))
    assert await client.zscore("pc:lru", member) == 1_002_000
    now[0] = 1002.2
    await cache.lookup(key(0))
    assert await client.zscore("pc:lru", member) == 1_002_200
