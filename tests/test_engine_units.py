"""Engine parts without Redis: circuit breaker, entry wire form, single flight, Cache-Control
parsing, and ExactCache over an in-memory EntryStore (failures, timeouts, TTLs, size limit)."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import pytest
import redis.exceptions

from promptcache.cache.breaker import CircuitBreaker
from promptcache.cache.cache_control import CacheControl
from promptcache.cache.entry import COMPRESS_MIN_BYTES, Entry, EntryFormatError
from promptcache.cache.errors import CacheUnavailable, RequestError
from promptcache.cache.exact import CachePolicy, ExactCache
from promptcache.cache.keys import request_key, tenant_id
from promptcache.cache.singleflight import SingleFlight


class FakeClock:
    """A monotonic clock that only moves when a test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# =============================================================================================
# CircuitBreaker
# =============================================================================================


def breaker(clock: FakeClock, **kw: Any) -> CircuitBreaker:
    kw = {"failure_threshold": 3, "reset_timeout": 1.0, "max_reset_timeout": 5.0} | kw
    return CircuitBreaker(clock=clock, **kw)


def trip(b: CircuitBreaker) -> None:
    for _ in range(b.failure_threshold):
        assert b.allow()
        b.record_failure()


def test_breaker_starts_closed_and_allows_calls() -> None:
    b = breaker(FakeClock())
    assert b.state == "closed"
    assert all(b.allow() for _ in range(10))
    assert b.trips == 0


def test_breaker_opens_after_threshold_consecutive_failures() -> None:
    b = breaker(FakeClock())
    b.record_failure()
    b.record_failure()
    assert b.state == "closed"
    assert b.allow()
    b.record_failure()
    assert b.state == "open"
    assert b.trips == 1


def test_open_breaker_allows_nothing_until_reset_timeout() -> None:
    clock = FakeClock()
    b = breaker(clock)
    trip(b)
    assert not any(b.allow() for _ in range(5))
    clock.advance(0.999)
    assert b.state == "open"
    assert not b.allow()


def test_half_open_breaker_lets_exactly_one_probe_through() -> None:
    clock = FakeClock()
    b = breaker(clock)
    trip(b)
    clock.advance(1.0)
    assert b.state == "half_open"
    assert b.allow()  # the probe
    assert not b.allow()
    assert not b.allow()
    clock.advance(100)
    assert not b.allow()  # still one probe in flight, however long it takes


def test_successful_probe_closes_the_breaker() -> None:
    clock = FakeClock()
    b = breaker(clock)
    trip(b)
    clock.advance(1.0)
    assert b.allow()
    b.record_success()
    assert b.state == "closed"
    assert all(b.allow() for _ in range(5))


def test_failed_probe_reopens_with_doubled_wait_capped_at_max() -> None:
    clock = FakeClock()
    b = breaker(clock, reset_timeout=1.0, max_reset_timeout=5.0)
    trip(b)
    waits = []
    for _ in range(5):
        # find how long the breaker now stays open, in 0.5 s steps
        waited = 0.0
        while not b.allow():
            clock.advance(0.5)
            waited += 0.5
        waits.append(waited)
        b.record_failure()  # the probe fails
        assert b.state == "open"
    assert waits == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert b.trips == 6


def test_success_after_failed_probes_restores_the_base_reset_timeout() -> None:
    clock = FakeClock()
    b = breaker(clock)
    trip(b)
    clock.advance(1.0)
    assert b.allow()
    b.record_failure()  # wait is now 2 s
    clock.advance(2.0)
    assert b.allow()
    b.record_success()
    trip(b)
    clock.advance(1.0)
    assert b.allow()  # back to 1 s, not 4 s


def test_a_success_resets_the_consecutive_failure_count() -> None:
    b = breaker(FakeClock())
    b.record_failure()
    b.record_failure()
    b.record_success()
    b.record_failure()
    b.record_failure()
    assert b.state == "closed"  # 2 + 2 failures, never 3 in a row
    b.record_failure()
    assert b.state == "open"


def test_release_after_a_cancelled_probe_lets_another_probe_through() -> None:
    clock = FakeClock()
    b = breaker(clock)
    trip(b)
    clock.advance(1.0)
    assert b.allow()
    assert not b.allow()
    b.release()  # the probe was cancelled: no verdict
    assert b.state == "half_open"
    assert b.allow()
    assert not b.allow()


def test_trips_counts_each_opening() -> None:
    clock = FakeClock()
    b = breaker(clock)
    trip(b)
    assert b.trips == 1
    clock.advance(1.0)
    assert b.allow()
    b.record_success()
    trip(b)
    assert b.trips == 2
    b.record_failure()  # failures while already open do not count as a new trip
    assert b.trips == 2


# =============================================================================================
# Entry
# =============================================================================================


def make_entry(body: bytes) -> Entry:
    return Entry(200, body, "application/json", 1_700_000_000.25, "chat")


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b'{"id":"x","choices":[]}',
        b'{"text":"' + b"the same words again " * 200 + b'"}',
        bytes(range(256)) * 8,  # large and incompressible
    ],
    ids=["empty", "small", "large-compressible", "large-incompressible"],
)
def test_entry_encode_decode_round_trip(body: bytes) -> None:
    entry = make_entry(body)
    assert Entry.decode(entry.encode()) == entry


def test_large_compressible_body_is_stored_smaller_than_raw() -> None:
    body = b'{"text":"' + b"the same words again " * 200 + b'"}'
    assert len(body) > COMPRESS_MIN_BYTES
    assert len(make_entry(body).encode()) < len(body) // 4


def test_large_incompressible_body_is_stored_raw() -> None:
    body = bytes(range(256)) * 8
    assert len(make_entry(body).encode()) < len(body) + 64


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage bytes \xff\x00",
        b"\x01",  # a msgpack int, not an entry
        msgpack.packb([1, 200, "application/json"]),  # too few fields
        msgpack.packb([1, "OK", "application/json", 0.0, "chat", False, b"{}"]),  # bad status
        msgpack.packb([1, 200, "application/json", 0.0, "chat", True, b"not zlib"]),
        make_entry(b"{}").encode()[:-3],  # truncated
    ],
    ids=["empty", "garbage", "scalar", "short", "bad-status", "bad-zlib", "truncated"],
)
def test_undecodable_bytes_raise_entry_format_error(data: bytes) -> None:
    with pytest.raises(EntryFormatError):
        Entry.decode(data)


def test_unknown_entry_format_raises_entry_format_error() -> None:
    data = msgpack.packb(
        [2, 200, "application/json", 0.0, "chat", False, b"{}"], use_bin_type=True
    )
    with pytest.raises(EntryFormatError, match="format"):
        Entry.decode(data)


def test_entry_format_error_is_a_value_error() -> None:
    """Callers that treat ValueError as 'unreadable' keep working."""
    assert issubclass(EntryFormatError, ValueError)


def test_deflated_body_is_zlib_of_the_raw_body() -> None:
    body = b"a" * 4096
    fields = msgpack.unpackb(make_entry(body).encode(), raw=False)
    assert fields[5] is True
    assert zlib.decompress(fields[6]) == body


# =============================================================================================
# SingleFlight
# =============================================================================================


async def test_first_joiner_leads_and_later_joiners_follow() -> None:
    sf: SingleFlight[str, bytes] = SingleFlight()
    flight, leader = sf.join("k")
    assert leader
    for n in (1, 2):
        again, lead = sf.join("k")
        assert again is flight
        assert not lead
        assert flight.followers == n
    assert len(sf) == 1


async def test_different_keys_have_separate_flights() -> None:
    sf: SingleFlight[str, bytes] = SingleFlight()
    a, lead_a = sf.join("a")
    b, lead_b = sf.join("b")
    assert lead_a and lead_b
    assert a is not b
    assert len(sf) == 2


async def test_followers_get_the_leaders_result() -> None:
    sf: SingleFlight[str, bytes] = SingleFlight()
    flight, _ = sf.join("k")
    followers = [asyncio.create_task(sf.join("k")[0].wait()) for _ in range(3)]
    await asyncio.sleep(0)  # let the followers start waiting
    assert not any(t.done() for t in followers)
    sf.land("k", flight, b"answer")
    assert await asyncio.gather(*followers) == [b"answer"] * 3


async def test_followers_get_none_when_the_leader_has_nothing_to_share() -> None:
    sf: SingleFlight[str, bytes] = SingleFlight()
    flight, _ = sf.join("k")
    follower = asyncio.create_task(sf.join("k")[0].wait())
    sf.land("k", flight, None)
    assert await follower is None


async def test_land_is_idempotent() -> None:
    sf: SingleFlight[str, bytes] = SingleFlight()
    flight, _ = sf.join("k")
    sf.land("k", flight, b"first")
    sf.land("k", flight, b"second")  # no error, and the first result stands
    assert await flight.wait() == b"first"
    assert len(sf) == 0


async def test_after_landing_a_new_join_starts_a_new_flight() -> None:
    sf: SingleFlight[str, bytes] = SingleFlight()
    old, _ = sf.join("k")
    sf.land("k", old, b"old")
    new, leader = sf.join("k")
    assert leader
    assert new is not old
    # landing the old flight again must not end the new one
    sf.land("k", old, b"stale")
    again, lead = sf.join("k")
    assert again is new and not lead


async def test_cancelled_follower_does_not_cancel_the_flight() -> None:
    sf: SingleFlight[str, bytes] = SingleFlight()
    flight, _ = sf.join("k")
    quitter = asyncio.create_task(sf.join("k")[0].wait())
    stayer = asyncio.create_task(sf.join("k")[0].wait())
    await asyncio.sleep(0)
    quitter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await quitter
    sf.land("k", flight, b"answer")
    assert await stayer == b"answer"


# =============================================================================================
# CacheControl
# =============================================================================================


def test_no_header_means_no_directives() -> None:
    cc = CacheControl.parse([])
    assert cc == CacheControl(no_cache=False, no_store=False, max_age=None)
    assert not cc.bypass
    assert cc.accepts_age(10**9)


def test_no_cache_skips_lookup_but_not_store() -> None:
    cc = CacheControl.parse(["no-cache"])
    assert cc.no_cache and not cc.no_store and not cc.bypass


def test_no_store_skips_store_but_not_lookup() -> None:
    cc = CacheControl.parse(["no-store"])
    assert cc.no_store and not cc.no_cache and not cc.bypass


def test_max_age_is_parsed() -> None:
    cc = CacheControl.parse(["max-age=60"])
    assert cc.max_age == 60
    assert not cc.no_cache and not cc.no_store and not cc.bypass


def test_quoted_max_age_is_accepted() -> None:
    assert CacheControl.parse(['max-age="30"']).max_age == 30


@pytest.mark.parametrize(
    "values",
    [["no-cache, no-store"], ["no-cache", "no-store"], ["no-store,no-cache"]],
    ids=["one-header", "two-headers", "no-space"],
)
def test_no_cache_and_no_store_together_bypass(values: list[str]) -> None:
    assert CacheControl.parse(values).bypass


def test_directives_combine_across_header_values() -> None:
    cc = CacheControl.parse(["no-store", "max-age=5, private"])
    assert cc == CacheControl(no_cache=False, no_store=True, max_age=5)


def test_directive_names_are_case_insensitive() -> None:
    cc = CacheControl.parse(["No-Cache, NO-STORE", "Max-Age=7"])
    assert cc == CacheControl(no_cache=True, no_store=True, max_age=7)


def test_unknown_directives_are_ignored() -> None:
    assert CacheControl.parse(["private, must-revalidate, , x=1"]) == CacheControl()


def test_max_age_zero_bypasses_the_cache() -> None:
    cc = CacheControl.parse(["max-age=0"])
    assert cc.bypass
    assert cc.no_cache and cc.no_store


@pytest.mark.parametrize(
    "value", ["max-age=abc", "max-age=-1", "max-age=1.5", "max-age=", "max-age"]
)
def test_bad_max_age_is_a_400_request_error(value: str) -> None:
    with pytest.raises(RequestError) as info:
        CacheControl.parse([value])
    assert info.value.status == 400
    assert info.value.param == "Cache-Control"


def test_non_ascii_digit_max_age_is_a_400_request_error() -> None:
    with pytest.raises(RequestError):
        CacheControl.parse(["max-age=²"])


def test_huge_max_age_is_capped_at_2_to_the_31() -> None:
    assert CacheControl.parse(["max-age=99999999999999999999"]).max_age == 2**31


def test_accepts_age_up_to_max_age() -> None:
    cc = CacheControl.parse(["max-age=10"])
    assert cc.accepts_age(0)
    assert cc.accepts_age(10)
    assert not cc.accepts_age(11)


# =============================================================================================
# ExactCache over an in-memory store
# =============================================================================================


class FakeStore:
    """An in-memory EntryStore that records its calls and can be told to fail or hang."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.ttls: dict[str, int | None] = {}
        self.calls = 0
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

    async def get(self, key: str) -> bytes | None:
        await self._op()
        return self.data.get(key)

    async def set(self, key: str, value: bytes, ttl_ms: int | None) -> None:
        await self._op()
        self.data[key] = value
        self.ttls[key] = ttl_ms

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        await self._op()
        return [self.data.get(k) for k in keys]

    async def set_many(self, items: list[tuple[str, bytes]], ttl_ms: int | None) -> None:
        await self._op()
        for key, value in items:
            self.data[key] = value
            self.ttls[key] = ttl_ms

    async def scan(self, pattern: str) -> AsyncIterator[bytes]:
        for k in list(self.data):
            if k.startswith(pattern.removesuffix("*")):
                yield k.encode()

    async def delete(self, key: str, *more: str) -> int:
        await self._op()
        return sum(1 for k in (key, *more) if self.data.pop(k, None) is not None)

    async def delete_matching(self, pattern: str) -> int:
        await self._op()
        assert pattern.endswith("*")
        doomed = [k for k in self.data if k.startswith(pattern[:-1])]
        for k in doomed:
            del self.data[k]
        return len(doomed)

    async def ping(self) -> None:
        await self._op()

    async def info(self) -> dict[str, Any]:
        await self._op()
        return {"keys": len(self.data)}

    async def close(self) -> None:
        pass


KEY = request_key(
    "/v1/chat/completions",
    {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    tenant=tenant_id("sk-test"),
    namespace="ns",
)
BODY = b'{"id":"chatcmpl-1","choices":[{"message":{"content":"hello"}}]}'


def make_cache(
    store: FakeStore, clock: FakeClock | None = None, **policy: Any
) -> ExactCache:
    clock = clock or FakeClock()
    return ExactCache(
        store,
        CachePolicy(**policy),
        breaker=CircuitBreaker(failure_threshold=3, reset_timeout=5.0, clock=clock),
        clock=clock,
    )


async def test_put_then_lookup_returns_the_entry() -> None:
    store = FakeStore()
    cache = make_cache(store)
    entry = cache.entry_for(200, BODY, "application/json", "chat")
    written = await cache.put(KEY, entry)
    assert written == len(entry.encode())
    assert await cache.lookup(KEY) == entry
    assert list(store.data) == [KEY.redis_key("pc:")]


async def test_lookup_of_a_missing_key_is_none() -> None:
    assert await make_cache(FakeStore()).lookup(KEY) is None


async def test_key_prefix_is_used_for_store_keys() -> None:
    store = FakeStore()
    cache = make_cache(store, key_prefix="other:")
    await cache.put(KEY, cache.entry_for(200, BODY, "application/json", "chat"))
    assert list(store.data) == [KEY.redis_key("other:")]
    assert next(iter(store.data)).startswith("other:e:")


async def test_entry_over_max_entry_bytes_is_not_written() -> None:
    store = FakeStore()
    cache = make_cache(store, max_entry_bytes=100)
    big = cache.entry_for(200, bytes(range(256)), "application/json", "chat")
    assert await cache.put(KEY, big) == 0
    assert store.data == {}
    assert store.calls == 0
    assert await cache.lookup(KEY) is None


async def test_entry_age_comes_from_the_injected_clock() -> None:
    clock = FakeClock(5000.0)
    cache = make_cache(FakeStore(), clock)
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
    default_ttl: float | None, ttl: float | None, expected_ms: int | None
) -> None:
    store = FakeStore()
    cache = make_cache(store, default_ttl=default_ttl)
    await cache.put(KEY, cache.entry_for(200, BODY, "application/json", "chat"), ttl=ttl)
    assert store.ttls == {KEY.redis_key("pc:"): expected_ms}


async def test_positive_sub_millisecond_ttl_is_never_sent_as_zero() -> None:
    store = FakeStore()
    cache = make_cache(store, default_ttl=0.0004)
    await cache.put(KEY, cache.entry_for(200, BODY, "application/json", "chat"))
    assert store.ttls[KEY.redis_key("pc:")] != 0


async def test_invalidate_key_namespace_and_all() -> None:
    store = FakeStore()
    cache = make_cache(store)
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
    assert store.data == {}


async def test_ping_and_info_go_to_the_store() -> None:
    store = FakeStore()
    cache = make_cache(store)
    assert await cache.ping() is True
    assert await cache.info() == {"keys": 0}
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
async def test_store_errors_become_cache_unavailable(error: Exception) -> None:
    store = FakeStore()
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


async def test_open_circuit_stops_calling_the_store_until_reset_timeout() -> None:
    clock = FakeClock()
    store = FakeStore()
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


async def test_failed_probe_keeps_the_circuit_open() -> None:
    clock = FakeClock()
    store = FakeStore()
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


async def test_store_that_hangs_past_op_timeout_is_cache_unavailable() -> None:
    store = FakeStore()
    store.hang = True
    cache = make_cache(store, op_timeout=0.01)
    with pytest.raises(CacheUnavailable) as info:
        await cache.lookup(KEY)
    assert isinstance(info.value.__cause__, TimeoutError)
    with pytest.raises(CacheUnavailable):
        await cache.put(KEY, cache.entry_for(200, BODY, "application/json", "chat"))
    assert store.data == {}


async def test_hanging_store_trips_the_breaker() -> None:
    store = FakeStore()
    store.hang = True
    cache = make_cache(store, op_timeout=0.01)
    for _ in range(3):
        with pytest.raises(CacheUnavailable):
            await cache.lookup(KEY)
    assert cache.breaker.state == "open"
    assert cache.breaker.trips == 1


async def test_cancelled_probe_releases_the_half_open_slot() -> None:
    """A probe cancelled mid-call gives no verdict: the next caller may probe."""
    clock = FakeClock()
    store = FakeStore()
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


async def test_undecodable_stored_bytes_are_a_miss() -> None:
    store = FakeStore()
    cache = make_cache(store)
    store.data[KEY.redis_key("pc:")] = b"\xc1 not an entry"
    assert await cache.lookup(KEY) is None
    assert cache.breaker.state == "closed"  # a bad entry is not a backend failure
