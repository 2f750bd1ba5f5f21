"""The pipelined GET lane: replies matched to callers in order, failures contained.

Real redis-servers throughout: the session one, and dedicated ones for a password, a
crash, a restart and a hang (SIGSTOP).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from promptcache.cache.redis import lane as lane_module
from promptcache.cache.redis.client import close_client, redis_client
from promptcache.cache.redis.lane import GetLane, LaneBusy, lane_for
from tests.support.redis_servers import RedisServer


@pytest.fixture
async def plain(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def lane(plain: aioredis.Redis) -> AsyncIterator[GetLane]:
    made = lane_for(plain, timeout=1.0)
    assert made is not None
    yield made
    await made.aclose()


async def test_concurrent_gets_each_get_their_own_value(plain: aioredis.Redis,
                                                        lane: GetLane) -> None:
    values = {f"k{i}": (b"v%d-" % i) * (i % 50 * 100 + 1) for i in range(300)}
    await plain.mset(values)
    keys = [*values, *(f"missing{i}" for i in range(50))]

    got = await asyncio.gather(*(lane.get(k) for k in keys))

    assert got == [values.get(k) for k in keys]
    assert lane.connects == 1  # all of it on one connection


async def test_an_error_reply_fails_its_caller_alone(plain: aioredis.Redis,
                                                     lane: GetLane) -> None:
    await plain.rpush("a-list", "x")
    await plain.set("s", "ok")

    results = await asyncio.gather(lane.get("s"), lane.get("a-list"), lane.get("s"),
                                   return_exceptions=True)

    assert results[0] == b"ok" and results[2] == b"ok"
    assert isinstance(results[1], ResponseError) and "WRONGTYPE" in str(results[1])


async def test_a_caller_that_gives_up_leaves_the_order_intact(plain: aioredis.Redis,
                                                              lane: GetLane) -> None:
    await plain.mset({"a": "1", "b": "2", "c": "3"})
    first = asyncio.ensure_future(lane.get("a"))
    second = asyncio.ensure_future(lane.get("b"))
    await asyncio.sleep(0)
    first.cancel()  # its reply still comes, and is dropped

    assert await second == b"2"
    assert await lane.get("c") == b"3" and first.cancelled()


async def test_a_password_and_a_database_from_the_url() -> None:
    with RedisServer(extra_args=["--requirepass", "s3cret"]) as server:  # started
        url = f"redis://:s3cret@127.0.0.1:{server.port}/3"
        client = redis_client(url, timeout=1.0)
        try:
            await client.set("k", "in-db-3")
            assert client.lane is not None
            assert await client.lane.get("k") == b"in-db-3"
            other = aioredis.Redis.from_url(f"redis://:s3cret@127.0.0.1:{server.port}/0")
            assert await other.get("k") is None  # the lane really selected db 3
            await other.aclose()
            wrong = GetLane(("127.0.0.1", str(server.port)), timeout=1.0, password="nope")
            with pytest.raises(ResponseError):
                await wrong.get("k")
            await wrong.aclose()
        finally:
            await close_client(client)


async def test_a_crash_fails_what_waits_and_a_restart_is_found_again(
    fresh_redis: RedisServer,
) -> None:
    client = redis_client(fresh_redis.url, timeout=1.0)
    try:
        await client.set("k", "v")
        lane = client.lane
        assert lane is not None and await lane.get("k") == b"v"

        fresh_redis.kill()
        with pytest.raises(RedisConnectionError):
            await lane.get("k")
        fresh_redis.start()
        await client.set("k", "again")  # through the pool (its own retry reconnects)

        assert await lane.get("k") == b"again"
        assert lane.connects == 2
    finally:
        await close_client(client)


async def test_a_hung_redis_fails_pending_gets_after_the_lane_timeout(
    fresh_redis: RedisServer,
) -> None:
    lane = GetLane(("127.0.0.1", str(fresh_redis.port)), timeout=0.3)
    try:
        assert await lane.get("k") is None
        fresh_redis.pause()
        started = time.monotonic()
        results = await asyncio.gather(*(lane.get("k") for _ in range(20)),
                                       return_exceptions=True)
        waited = time.monotonic() - started
        fresh_redis.resume()

        assert all(isinstance(r, RedisConnectionError) for r in results)
        assert waited < 0.3 * 2 + 0.2  # the watchdog, not some longer socket timeout
        assert await lane.get("k") is None  # a new connection once Redis answers again
    finally:
        fresh_redis.resume()
        await lane.aclose()


async def test_a_full_lane_sends_the_client_to_its_pool(
    plain: aioredis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(lane_module, "MAX_PENDING", 5)
    client = redis_client(redis_url, timeout=1.0)
    try:
        await plain.set("k", "v")
        assert client.lane is not None
        with pytest.raises(LaneBusy):
            await asyncio.gather(*(client.lane.get("k") for _ in range(6)))
        got = await asyncio.gather(*(client.get("k") for _ in range(50)))
        assert got == [b"v"] * 50  # the five on the lane, the rest through the pool
    finally:
        await close_client(client)


async def test_no_lane_over_tls(redis_url: str) -> None:
    tls = aioredis.Redis.from_url(redis_url.replace("redis://", "rediss://"))
    try:
        assert lane_for(tls, timeout=1.0) is None
    finally:
        await tls.aclose()
