"""Two sidecars on one Redis, both with the near cache: whatever one node changes (an
overwrite, DELETE /cache of everything, a key or a tenant, an eviction under the budget, an
expiry), the other stops serving the old answer within 50 ms, not just eventually."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from promptcache.testing import FakeUpstream
from tests.sidecar.test_sidecar_exact import chat, post
from tests.support.sidecars import RunningSidecar, start_sidecar

AUTH = {"Authorization": "Bearer tok"}
#: The longest a node may serve an answer that another node changed.
BOUND = 0.05


async def two_nodes(fake: FakeUpstream, url: str, sidecars: list[RunningSidecar],
                    **settings: Any) -> tuple[RunningSidecar, RunningSidecar]:
    a = await start_sidecar(fake.url, url, admin_token="tok", **settings)
    b = await start_sidecar(fake.url, url, admin_token="tok", **settings)
    sidecars.extend((a, b))
    for sc in (a, b):
        assert sc.state.engine.near.on, sc.state.engine.near.stats()
    return a, b


async def near_hit(http: aiohttp.ClientSession, sc: RunningSidecar, body: Any) -> bytes:
    """Ask ``sc`` until its near cache serves ``body``'s entry (a fill landing just after
    the entry was written can be dropped by that write's own invalidation); the answer."""
    near = sc.state.engine.near
    for _ in range(50):
        hits = near.counts["hits"]
        _, h, answer = await post(http, sc, body)
        assert h["X-Cache"] == "HIT"
        if near.counts["hits"] > hits:
            return answer
        await asyncio.sleep(0.005)
    raise AssertionError("never served from the near cache")


async def within_bound(ask: Callable[[], Awaitable[bool]]) -> float:
    """Ask in a tight loop until the answer is no longer the stale one; fail past BOUND."""
    start = time.monotonic()
    while not await ask():
        assert time.monotonic() - start < BOUND, "a stale answer was served past the bound"
    return time.monotonic() - start


async def test_an_overwrite_through_one_node_reaches_the_other(
    fake: FakeUpstream, redis_url: str, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession,
) -> None:
    a, b = await two_nodes(fake, redis_url, sidecars)
    await post(http, a, chat("overwritten"))
    old = await near_hit(http, b, chat("overwritten"))
    fake.answer_words = 7  # the upstream now answers differently
    _, h, new = await post(http, a, chat("overwritten"), headers={"Cache-Control": "no-cache"})
    assert h["X-Cache"] == "MISS" and new != old

    async def fresh() -> bool:
        return (await post(http, b, chat("overwritten")))[2] == new

    await within_bound(fresh)


@pytest.mark.parametrize("target", ["all", "key", "tenant"])
async def test_delete_cache_through_one_node_reaches_the_other(
    target: str, fake: FakeUpstream, redis_url: str, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession,
) -> None:
    a, b = await two_nodes(fake, redis_url, sidecars)
    _, h, _ = await post(http, a, chat("deleted"))
    await near_hit(http, b, chat("deleted"))
    selector = {"all": {"all": True}, "key": {"key": h["X-Cache-Key"], "namespace": ""},
                "tenant": {"credential": {"Authorization": "Bearer sk-alice"}}}[target]
    async with http.delete(a.url + "/cache", json=selector, headers=AUTH) as r:
        assert r.status == 200 and (await r.json())["deleted"] == 1

    async def gone() -> bool:
        return (await post(http, b, chat("deleted")))[1]["X-Cache"] == "MISS"

    await within_bound(gone)


async def test_an_eviction_under_the_budget_reaches_the_other_node(
    fake: FakeUpstream, redis_url: str, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession,
) -> None:
    a, b = await two_nodes(fake, redis_url, sidecars, max_bytes=60_000)
    _, h, _ = await post(http, a, chat("evicted"))
    await near_hit(http, b, chat("evicted"))
    direct = aioredis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        keys = [k async for k in direct.scan_iter(match="pc:e:*")]
        assert len(keys) == 1
        i = 0
        while await direct.exists(keys[0]):  # flood through the other node
            await post(http, a, chat(f"filler {i} " + "x" * 2000))
            i += 1
    finally:
        await direct.aclose()
    assert a.state.cache.counts["evicted"] > 0

    async def gone() -> bool:
        return (await post(http, b, chat("evicted")))[1]["X-Cache"] == "MISS"

    await within_bound(gone)


async def test_an_expired_entry_is_never_served_by_the_other_node(
    fake: FakeUpstream, redis_url: str, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession,
) -> None:
    a, b = await two_nodes(fake, redis_url, sidecars)
    direct = aioredis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        await post(http, a, chat("expiring"), headers={"Cache-Control": "max-age=1"})
        (key,) = [k async for k in direct.scan_iter(match="pc:e:*")]
        before = time.monotonic()
        pttl = await direct.pttl(key)
        expires = before + pttl / 1000  # no later than the key expires in Redis
        await near_hit(http, b, chat("expiring"))
        late_hits = 0
        while True:
            sent = time.monotonic()
            _, h, _ = await post(http, b, chat("expiring"))
            if h["X-Cache"] == "MISS":
                break
            if sent > expires + 0.002:  # a hit asked for after the key's expiry
                late_hits += 1
            assert sent < expires + 1.0
        assert late_hits == 0
        assert time.monotonic() - expires < BOUND + 0.05
    finally:
        await direct.aclose()


async def test_stats_and_metrics_show_the_near_cache(
    fake: FakeUpstream, redis_url: str, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession,
) -> None:
    a, b = await two_nodes(fake, redis_url, sidecars, near_cache_bytes=1 << 20)
    await post(http, a, chat("counted"))
    await near_hit(http, b, chat("counted"))
    async with http.get(b.url + "/stats") as r:
        near = (await r.json())["near_cache"]
    assert near["enabled"] and near["state"] == "on" and near["reason"] is None
    assert near["hits"] >= 1 and near["fills"] >= 1 and near["entries"] == 1
    assert 0 < near["bytes"] <= near["max_bytes"] == 1 << 20
    async with http.get(b.url + "/metrics") as r:
        text = await r.text()
    assert "promptcache_near_cache_hits_total" in text
    assert "promptcache_near_cache_enabled 1.0" in text
    off = await start_sidecar(fake.url, redis_url, near_cache_bytes=0)
    sidecars.append(off)
    async with http.get(off.url + "/stats") as r:
        near = (await r.json())["near_cache"]
    assert (near["enabled"], near["state"]) == (False, "off") and "0" in near["reason"]
