"""Redis faults: a supervised embedded Redis comes back by itself, index sync notices a Redis
that restarted or lost its data and drops the vectors that went with it, and an external
Redis that may evict keys behind the budget's back is reported at start-up."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from promptcache.cache.engine import open_engine
from promptcache.cache.errors import EmbeddedRedisError
from promptcache.cache.options import EngineOptions
from promptcache.cache.redis.budget import BudgetStore
from promptcache.cache.redis.embedded import EmbeddedRedis
from promptcache.cache.redis.embedded_owner import RedisKeeper, start_embedded
from promptcache.cache.redis.index_sync import IndexSync
from promptcache.cache.semantic.record import vector_id
from tests.redis.test_sync import LAYOUT, digest, reader, record
from tests.support.redis_servers import RedisClusterServers, RedisServer
from tests.support.sidecars import eventually

pytestmark = pytest.mark.slow

# =============================================================================================
# Index sync after a restart, a loss of data, a gap
# =============================================================================================


@contextlib.asynccontextmanager
async def tailing(sync: IndexSync) -> AsyncIterator[None]:
    task = asyncio.create_task(sync.run())
    try:
        yield
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def ids(*numbers: int) -> set[int]:
    return {vector_id(digest(i)) for i in numbers}


def indexed(sync: IndexSync) -> set[int]:
    return {i for i in sync.semantic._refs if i in sync.semantic.index}


async def fill(store: BudgetStore, numbers: range) -> None:
    for i in numbers:
        await store.put("", digest(i), b"entry", record(i), None)


async def test_a_redis_restarted_without_its_data_is_noticed_and_its_vectors_leave_the_index(
        fresh_redis: RedisServer) -> None:
    """No write follows the restart, so only the new run id can tell: the index empties."""
    client = aioredis.Redis.from_url(fresh_redis.url, socket_timeout=5)
    try:
        await fill(BudgetStore(client, LAYOUT, node="writer"), range(30))
        semantic, sync = reader(client)
        sync.retry_after = 0.05
        await sync.start()
        assert indexed(sync) == ids(*range(30))
        async with tailing(sync):
            fresh_redis.kill()
            fresh_redis.start()  # same port, empty (no persistence)
            await eventually(lambda: len(semantic.index) == 0, within=10)
        assert sync.counts["restarts"] >= 1 and sync.counts["rebuilds"] >= 1
    finally:
        await client.aclose()


async def test_a_sequence_that_goes_back_rebuilds_the_shard_without_the_lost_vectors(
        redis_url: str) -> None:
    """Redis lost its data (FLUSHALL here; a restart without persistence alike) and new
    writes restart the sequence at 1: the node keeps the new vectors, drops the old ones."""
    client = aioredis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        writer = BudgetStore(client, LAYOUT, node="writer")
        await fill(writer, range(20))
        semantic, sync = reader(client)
        sync.verify_every = 3600.0  # the run id does not change: only the sequence can tell
        await sync.start()
        async with tailing(sync):
            await client.flushall()
            await fill(writer, range(100, 103))
            await eventually(lambda: indexed(sync) == ids(100, 101, 102), within=10)
        assert sync.counts["restarts"] == 1 and sync.counts["gaps"] == 0
        assert semantic.counts["dropped_at_rebuild"] == 20
    finally:
        await client.aclose()


async def test_a_gap_rebuild_drops_the_vectors_removed_while_the_node_was_behind(
        redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        writer = BudgetStore(client, LAYOUT, node="writer", stream_maxlen=5)
        await fill(writer, range(20))
        semantic, sync = reader(client)
        await sync.start()
        assert indexed(sync) == ids(*range(20))
        for i in range(10):  # removals this node will never read: the stream is trimmed
            assert await writer.delete("", digest(i)) == 1
        await fill(writer, range(100, 300))
        async with tailing(sync):
            await eventually(lambda: indexed(sync) == ids(*range(10, 20), *range(100, 300)),
                             within=10)
        assert sync.counts["gaps"] == 1 and semantic.counts["dropped_at_rebuild"] == 10
    finally:
        await client.aclose()


async def test_a_shard_rebuild_on_a_cluster_drops_only_that_shards_vectors(
        redis_cluster: RedisClusterServers) -> None:
    from promptcache.cache.exact import CachePolicy, ExactCache
    from promptcache.cache.redis.client import close_client, redis_client
    from promptcache.cache.redis.layout import KeyLayout
    from promptcache.cache.semantic.index import PartitionedIndex
    from promptcache.cache.semantic.tier import SemanticCache
    from tests.redis.test_sync import DIM

    redis_cluster.flushall()
    layout = KeyLayout.for_url(redis_cluster.url)
    client = redis_client(redis_cluster.url, timeout=5)
    try:
        store = BudgetStore(client, layout, node="n")
        semantic = SemanticCache(ExactCache(store, CachePolicy(op_timeout=5.0)), None,  # type: ignore[arg-type]
                                 PartitionedIndex(DIM, "flat"), None)
        sync = IndexSync(client, semantic, store)
        await fill(store, range(60))
        await sync.start()
        assert indexed(sync) == ids(*range(60))
        shard = layout.shard(digest(0))
        in_shard = [i for i in range(60) if layout.shard(digest(i)) == shard]
        await client.delete(*(layout.vector("", digest(i)) for i in in_shard))
        elsewhere = [i for i in range(60) if layout.shard(digest(i)) != shard]
        await client.delete(layout.vector("", digest(elsewhere[0])))
        await sync._rebuild_shard(shard)
        # This shard's vanished vectors are dropped; another shard's are that shard's job.
        assert indexed(sync) == ids(*elsewhere)
    finally:
        await close_client(client)


# =============================================================================================
# maxmemory-policy of an external Redis, checked at start-up
# =============================================================================================


async def start_engine(url: str, **options: object) -> None:
    async with contextlib.AsyncExitStack() as stack:
        await open_engine(EngineOptions(redis_url=url, semantic=False, **options),  # type: ignore[arg-type]
                          stack)


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "promptcache.cache.redis.health" and r.levelno == level]


async def test_an_evicting_maxmemory_policy_is_warned_of_at_start_up(
        fresh_redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """The warning names the server, the risk and the fix, and never the URL's password."""
    client = aioredis.Redis.from_url(fresh_redis.url)
    await client.config_set("maxmemory-policy", "allkeys-lru")
    await client.config_set("requirepass", "s3cret-pw")
    await client.aclose()
    with caplog.at_level(logging.INFO, logger="promptcache.cache.redis.health"):
        await start_engine(f"redis://:s3cret-pw@127.0.0.1:{fresh_redis.port}")
    [warning] = messages(caplog, logging.WARNING)
    assert f"Redis 127.0.0.1:{fresh_redis.port} has maxmemory-policy 'allkeys-lru'" in warning
    assert "behind the byte budget's back" in warning
    assert "CONFIG SET maxmemory-policy noeviction" in warning and "s3cret" not in warning


async def test_noeviction_starts_without_a_warning(
        redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="promptcache.cache.redis.health"):
        await start_engine(redis_url, max_bytes=10_000_000)
    assert messages(caplog, logging.WARNING) == messages(caplog, logging.INFO) == []


async def test_a_maxmemory_below_the_byte_budget_is_warned_of(
        fresh_redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    client = aioredis.Redis.from_url(fresh_redis.url)
    await client.config_set("maxmemory", 5_000_000)
    await client.aclose()
    with caplog.at_level(logging.INFO, logger="promptcache.cache.redis.health"):
        await start_engine(fresh_redis.url, max_bytes=10_000_000)
    [warning] = messages(caplog, logging.WARNING)
    assert "maxmemory 5000000 B, below --max-bytes 10000000 B" in warning


async def test_a_redis_that_forbids_config_is_reported_as_not_checked(
        fresh_redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """As on managed Redis: the cache's user may not run CONFIG (an ACL, here)."""
    client = aioredis.Redis.from_url(fresh_redis.url)
    await client.acl_setuser("app", enabled=True, passwords=["+secret"], keys=["*"],
                             categories=["+@all"], commands=["-config"])
    await client.aclose()
    url = f"redis://app:secret@127.0.0.1:{fresh_redis.port}"
    with caplog.at_level(logging.INFO, logger="promptcache.cache.redis.health"):
        await start_engine(url)
    assert messages(caplog, logging.WARNING) == []
    [info] = messages(caplog, logging.INFO)
    assert "could not check maxmemory-policy" in info and "noeviction" in info


async def test_every_master_of_a_cluster_is_checked(
        redis_cluster: RedisClusterServers, caplog: pytest.LogCaptureFixture) -> None:
    node = redis_cluster.nodes[2]
    client = aioredis.Redis(port=node.port)
    await client.config_set("maxmemory-policy", "volatile-ttl")
    try:
        with caplog.at_level(logging.INFO, logger="promptcache.cache.redis.health"):
            await start_engine(redis_cluster.url)
    finally:
        await client.config_set("maxmemory-policy", "noeviction")
        await client.aclose()
    [warning] = messages(caplog, logging.WARNING)
    assert f"127.0.0.1:{node.port}" in warning and "volatile-ttl" in warning


# =============================================================================================
# The supervised embedded Redis
# =============================================================================================


async def test_a_killed_embedded_redis_is_restarted_with_its_data_at_the_same_url(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with contextlib.AsyncExitStack() as stack:
        keeper = await start_embedded(stack, str(tmp_path / "data"))  # persistence on
        client = aioredis.Redis.from_url(keeper.url, socket_timeout=5)
        stack.push_async_callback(client.aclose)
        await client.set("kept", "yes")
        first = keeper.pid
        assert first is not None
        with caplog.at_level(logging.WARNING, logger="promptcache.cache.redis.embedded_owner"):
            os.kill(first, signal.SIGKILL)
            await eventually(lambda: keeper.restarts == 1 and keeper.pid is not None)
        assert keeper.pid != first and keeper.stats()["last_exit"] == -signal.SIGKILL
        assert await client.get("kept") == b"yes"  # the AOF was reloaded, same URL
        assert any("restarted" in r.getMessage() for r in caplog.records)
    assert not keeper.redis.running


class NeverComesUp(EmbeddedRedis):
    """A server that 'starts' once, then can never be revived: every attempt fails."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self.attempts: list[float] = []

    def start(self) -> str:
        return "redis://127.0.0.1:1"

    def revive(self) -> str:
        self.attempts.append(time.monotonic())
        raise EmbeddedRedisError("exited with code 1 during start-up")

    def stop(self, timeout: float = 10.0) -> None:
        pass


async def test_restarts_back_off_and_stop_when_the_keeper_is_stopped(tmp_path: Path) -> None:
    redis = NeverComesUp(tmp_path)
    keeper = RedisKeeper(redis, poll_interval=0.01, min_backoff=0.05, max_backoff=60.0)
    await keeper.start()
    await eventually(lambda: len(redis.attempts) >= 5, within=10)
    gaps = [b - a for a, b in zip(redis.attempts, redis.attempts[1:], strict=False)]
    for n, gap in enumerate(gaps[:4]):  # 0.05, 0.1, 0.2, 0.4 s at least
        assert gap >= 0.05 * 2**n, gaps
    t0 = time.monotonic()
    await keeper.stop()  # in the middle of a backoff of seconds
    assert time.monotonic() - t0 < 1.0
    tried = len(redis.attempts)
    await asyncio.sleep(0.2)
    assert len(redis.attempts) == tried and keeper.failed_restarts == tried
    assert keeper.restarts == 0
