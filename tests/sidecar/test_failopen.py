"""A cache outage degrades to pass-through: callers never see an error caused by the cache."""

from __future__ import annotations

import json
import time

import aiohttp
import pytest

from promptcache.testing import FakeUpstream
from tests.sidecar.test_sidecar_exact import CHAT, chat, post
from tests.support.redis_servers import RedisServer
from tests.support.sidecars import RunningSidecar, eventually, start_sidecar

pytestmark = pytest.mark.slow


async def test_redis_killed_mid_test_bypasses_then_hits_resume_after_restart(
    fake: FakeUpstream, fresh_redis: RedisServer, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession,
) -> None:
    sc = await start_sidecar(fake.url, fresh_redis.url, breaker_reset=0.2)
    sidecars.append(sc)
    await post(http, sc, chat("before"))
    _, h, _ = await post(http, sc, chat("before"))
    assert h["X-Cache"] == "HIT"

    fresh_redis.kill()
    statuses = []
    for i in range(10):
        status, headers, body = await post(http, sc, chat(f"during {i % 2}"))
        statuses.append((status, headers["X-Cache"]))
        assert json.loads(body)["choices"][0]["message"]["content"]
    assert all(s == (200, "BYPASS") for s in statuses), statuses
    assert sc.state.cache.breaker.trips >= 1
    async with http.get(sc.url + "/readyz") as r:
        assert r.status == 503

    fresh_redis.start()  # same port, empty (no persistence in the test server)

    async def cached_again() -> bool:
        _, headers, _ = await post(http, sc, chat("after"))
        return headers["X-Cache"] in ("MISS", "HIT")

    await eventually(cached_again)
    _, h2, _ = await post(http, sc, chat("after"))
    assert h2["X-Cache"] == "HIT"
    async with http.get(sc.url + "/readyz") as r:
        assert r.status == 200


async def test_slow_redis_costs_one_short_timeout_then_the_circuit_opens(
    fake: FakeUpstream, fresh_redis: RedisServer, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession,
) -> None:
    """A hung Redis (SIGSTOP) answers nothing; requests still get 200 quickly."""
    sc = await start_sidecar(fake.url, fresh_redis.url, redis_timeout=0.1,
                             breaker_threshold=2, breaker_reset=30.0)
    sidecars.append(sc)
    await post(http, sc, chat("warm"))  # open pooled connections while Redis is fine
    fresh_redis.pause()
    try:
        timings = []
        for i in range(8):
            t0 = time.perf_counter()
            status, headers, _ = await post(http, sc, chat(f"q{i}"))
            timings.append(time.perf_counter() - t0)
            assert (status, headers["X-Cache"]) == (200, "BYPASS")
        assert sc.state.cache.breaker.state == "open"
        # After the breaker opened, no request waits on Redis any more.
        assert max(timings[3:]) < 0.1, timings
    finally:
        fresh_redis.resume()


async def test_streaming_request_bypasses_cleanly_when_redis_is_down(
    fake: FakeUpstream, fresh_redis: RedisServer, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession,
) -> None:
    sc = await start_sidecar(fake.url, fresh_redis.url)
    sidecars.append(sc)
    fresh_redis.kill()
    async with http.post(sc.url + CHAT, json=chat(stream=True)) as r:
        body = await r.read()
        assert r.status == 200 and r.headers["X-Cache"] == "BYPASS"
    assert body.rstrip().endswith(b"data: [DONE]")


async def test_sidecar_starts_and_serves_when_redis_is_down_from_the_start(
    fake: FakeUpstream, sidecars: list[RunningSidecar], http: aiohttp.ClientSession,
) -> None:
    from tests.support.redis_servers import free_port

    sc = await start_sidecar(fake.url, f"redis://127.0.0.1:{free_port()}")
    sidecars.append(sc)
    for _ in range(3):
        status, h, _ = await post(http, sc, chat())
        assert (status, h["X-Cache"]) == (200, "BYPASS")
    async with http.get(sc.url + "/stats") as r:
        stats = await r.json()
    assert r.status == 200 and stats["cache"]["reachable"] is False
