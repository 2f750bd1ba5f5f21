"""Engine parts without Redis: circuit breaker, entry wire form, single flight and
Cache-Control parsing. (ExactCache runs on a real Redis: tests/redis/test_exact.py.)"""

from __future__ import annotations

import asyncio
import zlib
from typing import Any

import msgpack
import pytest

from promptcache.cache.breaker import CircuitBreaker
from promptcache.cache.cache_control import CacheControl
from promptcache.cache.entry import COMPRESS_MIN_BYTES, Entry
from promptcache.cache.errors import EntryFormatError, RequestError
from promptcache.cache.singleflight import SingleFlight
from tests.support.clock import FakeClock

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


@pytest.mark.parametrize(("digits", "seconds"), [
    ("9" * 5000, 2**31), ("1" * 100_000, 2**31), ("0" * 5000 + "5", 5), ("0" * 5000, 0)])
def test_a_max_age_of_thousands_of_digits_is_read_not_an_error(digits: str,
                                                               seconds: int) -> None:
    """int() refuses strings of more than 4,300 digits; such a header is capped like any
    other huge value, and leading zeros do not count."""
    assert CacheControl.parse([f"max-age={digits}"]).max_age == seconds


def test_accepts_age_up_to_max_age() -> None:
    cc = CacheControl.parse(["max-age=10"])
    assert cc.accepts_age(0)
    assert cc.accepts_age(10)
    assert not cc.accepts_age(11)
