"""ExactCache on the path production runs: the Redis entry store (BudgetStore), here without
a byte budget; failures, hangs and cancellations are injected around that real store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from promptcache.cache.breaker import CircuitBreaker
from promptcache.cache.errors import CacheUnavailable
from promptcache.cache.exact import CachePolicy, ExactCache
from promptcache.cache.keys import request_key, tenant_id
from promptcache.cache.protocols import PutResult, Usage
from promptcache.cache.redis.budget import ENTRY_OVERHEAD_BYTES, BudgetStore
from promptcache.cache.redis.layout import KeyLayout
from tests.support.clock import FakeClock


class FaultyStore:
    """The real store behind a gate: counts calls, records TTLs, and can fail or hang."""

    def __init__(self, inner: BudgetStore) -> None:
        self.inner = inner
        self.calls = 0
        self.ttls: dict[str, int | None] = {}  # digest -> ttl_ms of its last put
        self.fail: BaseException | None = None
        self.hang = False
        self.entered = asyncio.Event()  # set by every call, so a test can wait for one
        self._never = asyncio.Event()

    async def _op(self) -> None:
        self.calls += 1
        self.entered.set()
        if self.hang:
            await self._never.wait()
        if self.fail is not None:
            raise self.fail

    def held(self, namespace: str, digest: str) -> bytes | None:
        return None  # no near cache: every read is a backend call

    async def get(self, namespace: str, digest: str, *, held_checked: bool = False
                  ) -> bytes | None:
        await self._op()
        return await self.inner.get(namespace, digest)

    async def touch(self, namespace: str, digest: str) -> None:
        await self._op()
        await self.inner.touch(namespace, digest)

    async def put(self, namespace: str, digest: str, entry: bytes, vector: bytes | None,
                  ttl_ms: int | None) -> PutResult:
        await self._op()
        self.ttls[digest] = ttl_ms
        return await self.inner.put(namespace, digest, entry, vector, ttl_ms)

    async def get_with_vectors(self, refs: Sequence[tuple[str, str]]
                               ) -> list[tuple[bytes | None, bytes | None]]:
        await self._op()
        return await self.inner.get_with_vectors(refs)

    async def vector_batches(self, shard: int | None = None, batch: int = 500
                             ) -> AsyncIterator[list[bytes | None]]:
        await self._op()
        async for records in self.inner.vector_batches(shard, batch):
            yield records

    async def delete(self, namespace: str, digest: str) -> int:
        await self._op()
        return await self.inner.delete(namespace, digest)

    async def attach_vector(self, namespace: str, digest: str, vector: bytes) -> bool:
        await self._op()
        return await self.inner.attach_vector(namespace, digest, vector)

    async def delete_matching(self, namespace: str | None, tenant_tag: str | None = None
                              ) -> int:
        await self._op()
        return await self.inner.delete_matching(namespace, tenant_tag)

    async def usage(self) -> Usage:
        await self._op()
        return await self.inner.usage()

    async def info(self) -> dict[str, Any]:
        await self._op()
        return await self.inner.info()

    async def ping(self) -> None:
        await self._op()
        await self.inner.ping()


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(redis_url, socket_timeout=5)
    yield c
    await c.aclose()


def faulty(client: aioredis.Redis, prefix: str = "pc:") -> FaultyStore:
    return FaultyStore(BudgetStore(client, KeyLayout(prefix)))


KEY = request_key(
    "/v1/chat/completions",
    {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    tenant=tenant_id("sk-test"),
    namespace="ns",
)
BODY = b'{"id":"chatcmpl-1","choices":[{"message":{"content":"hello"}}]}'
ENTRY_KEY = KeyLayout("pc:").entry(KEY.namespace, KEY.digest)


def make_cache(store: FaultyStore, clock: FakeClock | None = None, **policy: Any
               ) -> ExactCache:
    clock = clock or FakeClock()
    return ExactCache(
        store,
        CachePolicy(**policy),
        breaker=CircuitBreaker(failure_threshold=3, reset_timeout=5.0, clock=clock),
        clock=clock,
    )


async def test_put_then_lookup_returns_the_entry(client: aioredis.Redis) -> None:
    cache = make_cache(faulty(client))
    entry = cache.entry_for(200, BODY, "application/json", "chat")
    written = await cache.put(KEY, entry)
    # the bytes counted: the encoded entry, its key name and Redis's bookkeeping
    assert written == len(entry.encode()) + len(ENTRY_KEY) + ENTRY_OVERHEAD_BYTES
    assert await cache.lookup(KEY) == entry
    entries = [k async for k in client.scan_iter("pc:e:*")]
    assert entries == [ENTRY_KEY.encode()]


async def test_lookup_of_a_missing_key_is_none(client: aioredis.Redis) -> None:
    assert await make_cache(faulty(client)).lookup(KEY) is None


async def test_key_prefix_is_used_for_store_keys(client: aioredis.Redis) -> None:
    cache = make_cache(faulty(client, prefix="other:"))
    await cache.put(KEY, cache.entry_for(200, BODY, "application/json", "chat"))
    entries = [k.decode() async for k in client.scan_iter("*:e:*")]
    assert entries == [KeyLayout("other:").entry(KEY.namespace, KEY.digest)]
    assert entries[0].startswith("other:e:")


async def test_entry_over_max_entry_bytes_is_not_written(client: aioredis.Redis) -> None:
    store = faulty(client)
    cache = make_cache(store, max_entry_bytes=100)
    big = cache.entry_for(200, bytes(range(256)), "application/json", "chat")
    assert await cache.put(KEY, big) == 0
    assert await client.dbsize() == 0
    assert store.calls == 0
    assert await cache.lookup(KEY) is None


async def test_entry_age_comes_from_the_injected_clock(client: aioredis.Redis) -> None:
    clock = FakeClock(5000.0)
    cache = make_cache(faulty(client), clock)
    entry = cache.entry_for(200, BODY, "application/json", "chat")
    assert entry.created == 5000.0
    clock.advance(42.7)
    assert cache.age(entry) == 42


@pytest.mark.parametrize(
    ("default_ttl", "ttl", "expected_ms"),
    [
        (86400.0, None, 86_400_000),  # the policy default
        (60.0, None, 60_000),
        (60.0, 5, 5_000),  # an explicit ttl (max-age) wins
        (60.0, 1.5, 1_500),
        (None, None, None),  # no default: no expiry
        (None, 30, 30_000),
        (0, None, None),  # 0 means no expiry
    ],
)
async def test_ttl_is_passed_to_the_store_in_milliseconds(
    client: aioredis.Redis, default_ttl: float | None, ttl: float | None,
    expected_ms: int | None
) -> None:
    store = faulty(client)
    cache = make_cache(store, default_ttl=default_ttl)
    await cache.put(KEY, cache.entry_for(200, BODY, "application/json", "chat"), ttl=ttl)
    assert store.ttls == {KEY.digest: expected_ms}
    pttl = await client.pttl(ENTRY_KEY)
    if expected_ms is None:
        assert pttl == -1  # the key lives without an expiry
    else:
        assert expected_ms - 1000 < pttl <= expected_ms


async def test_positive_sub_millisecond_ttl_is_never_sent_as_zero(
        client: aioredis.Redis) -> None:
    store = faulty(client)
    cache = make_cache(store, default_ttl=0.0004)
    await cache.put(KEY, cache.entry_for(200, BODY, "application/json", "chat"))
    assert store.ttls[KEY.digest] != 0


async def test_invalidate_key_namespace_and_all(client: aioredis.Redis) -> None:
    cache = make_cache(faulty(client))
    entry = cache.entry_for(200, BODY, "application/json", "chat")
    other_ns = request_key(KEY.endpoint, {"x": 1}, tenant=KEY.tenant, namespace="other")
    third = request_key(KEY.endpoint, {"x": 2}, tenant=KEY.tenant, namespace="ns")
    for k in (KEY, other_ns, third):
        await cache.put(k, entry)
    assert await cache.invalidate_key("ns", KEY.digest) == 1
    assert await cache.lookup(KEY) is None
    assert await cache.invalidate_namespace("ns") == 1  # only `third` is left there
    assert await cache.lookup(other_ns) == entry
    assert await cache.invalidate_all() == 1
    assert [k async for k in client.scan_iter("pc:[ev]:*")] == []


async def test_ping_and_info_go_to_the_store(client: aioredis.Redis) -> None:
    store = faulty(client)
    cache = make_cache(store)
    assert await cache.ping() is True
    info = await cache.info()
    assert (info["keys"], info["entries"], info["bytes"], info["max_bytes"]) == (0, 0, 0, 0)
    await cache.put(KEY, cache.entry_for(200, BODY, "application/json", "chat"))
    info = await cache.info()
    assert info["entries"] == 1 and info["keys"] >= 1 and info["used_memory_bytes"] > 0
    store.fail = redis.exceptions.ConnectionError("down")
    assert await cache.ping() is False


@pytest.mark.parametrize(
    "error",
    [
        redis.exceptions.ConnectionError("connection refused"),
        redis.exceptions.TimeoutError("read timed out"),
        redis.exceptions.ResponseError("ERR invalid expire time"),
        OSError("network is unreachable"),
    ],
    ids=["connection", "redis-timeout", "response", "oserror"],
)
async def test_store_errors_become_cache_unavailable(client: aioredis.Redis,
                                                     error: Exception) -> None:
    store = faulty(client)
    store.fail = error
    cache = make_cache(store)
    entry = cache.entry_for(200, BODY, "application/json", "chat")
    with pytest.raises(CacheUnavailable) as info:
        await cache.lookup(KEY)
    assert info.value.__cause__ is error
    with pytest.raises(CacheUnavailable):
        await cache.put(KEY, entry)
    with pytest.raises(CacheUnavailable):
        await cache.invalidate_namespace("ns")


async def test_open_circuit_stops_calling_the_store_until_reset_timeout(
        client: aioredis.Redis) -> None:
    clock = FakeClock()
    store = faulty(client)
    store.fail = redis.exceptions.ConnectionError("down")
    cache = make_cache(store, clock)
    for _ in range(3):  # breaker threshold
        with pytest.raises(CacheUnavailable):
            await cache.lookup(KEY)
    assert store.calls == 3
    assert cache.breaker.state == "open"

    for _ in range(10):
        with pytest.raises(CacheUnavailable, match="circuit is open"):
            await cache.lookup(KEY)
    with pytest.raises(CacheUnavailable):
        await cache.invalidate_all()
    assert store.calls == 3  # the store was not called while the circuit was open

    clock.advance(4.9)
    with pytest.raises(CacheUnavailable):
        await cache.lookup(KEY)
    assert store.calls == 3

    clock.advance(0.1)
    store.fail = None  # Redis is back: the probe succeeds
    assert await cache.lookup(KEY) is None
    assert store.calls == 4
    assert cache.breaker.state == "closed"
    assert await cache.lookup(KEY) is None
    assert store.calls == 5


async def test_failed_probe_keeps_the_circuit_open(client: aioredis.Redis) -> None:
    clock = FakeClock()
    store = faulty(client)
    store.fail = redis.exceptions.ConnectionError("down")
    cache = make_cache(store, clock)
    for _ in range(3):
        with pytest.raises(CacheUnavailable):
            await cache.lookup(KEY)
    clock.advance(5.0)
    with pytest.raises(CacheUnavailable):
        await cache.lookup(KEY)  # the probe, which fails
    assert store.calls == 4
    clock.advance(5.0)  # the wait has doubled to 10 s
    with pytest.raises(CacheUnavailable, match="circuit is open"):
        await cache.lookup(KEY)
    assert store.calls == 4


async def test_store_that_hangs_past_op_timeout_is_cache_unavailable(
        client: aioredis.Redis) -> None:
    store = faulty(client)
    store.hang = True
    cache = make_cache(store, op_timeout=0.01)
    with pytest.raises(CacheUnavailable) as info:
        await cache.lookup(KEY)
    assert isinstance(info.value.__cause__, TimeoutError)
    with pytest.raises(CacheUnavailable):
        await cache.put(KEY, cache.entry_for(200, BODY, "application/json", "chat"))
    assert await client.dbsize() == 0


async def test_hanging_store_trips_the_breaker(client: aioredis.Redis) -> None:
    store = faulty(client)
    store.hang = True
    cache = make_cache(store, op_timeout=0.01)
    for _ in range(3):
        with pytest.raises(CacheUnavailable):
            await cache.lookup(KEY)
    assert cache.breaker.state == "open"
    assert cache.breaker.trips == 1


async def test_cancelled_probe_releases_the_half_open_slot(client: aioredis.Redis) -> None:
    """A probe cancelled mid-call gives no verdict: the next caller may probe."""
    clock = FakeClock()
    store = faulty(client)
    store.fail = redis.exceptions.ConnectionError("down")
    cache = make_cache(store, clock, op_timeout=60.0)
    for _ in range(3):
        with pytest.raises(CacheUnavailable):
            await cache.lookup(KEY)
    clock.advance(5.0)
    store.fail, store.hang = None, True
    store.entered.clear()
    probe = asyncio.create_task(cache.lookup(KEY))
    await store.entered.wait()  # the probe is inside the store call
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    store.hang = False
    assert await cache.lookup(KEY) is None
    assert cache.breaker.state == "closed"


async def test_undecodable_stored_bytes_are_a_miss(client: aioredis.Redis) -> None:
    cache = make_cache(faulty(client))
    await client.set(ENTRY_KEY, b"\xc1 not an entry")
    assert await cache.lookup(KEY) is None
    assert cache.breaker.state == "closed"  # a bad entry is not a backend failure
