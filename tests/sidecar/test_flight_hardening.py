"""Single flight that cannot hang, against a real sidecar, Redis and fake upstream.

A leader whose client stops reading (or leaves) does not hold the store or its followers;
followers give up waiting after ``flight_timeout`` and call upstream themselves; only 2xx
answers are shared; a request that becomes leader looks in the cache once more, so N
concurrent identical misses make exactly one upstream call; and the upstream answer read on
a cached route is bounded by ``max_response_bytes``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from promptcache.testing import FakeUpstream
from tests.sidecar.test_sidecar_exact import (
    CHAT,
    MESSAGES,
    anthropic,
    assembled,
    chat,
    post,
    stream,
)
from tests.support.sidecars import RunningSidecar, eventually, start_sidecar

#: Filler words per answer for a stream of about 5 MB (one SSE event per word): more than
#: the socket buffers between the sidecar and a client that reads nothing can hold.
BIG_STREAM_WORDS = 20_000


async def start(fake: FakeUpstream, redis_url: str, sidecars: list[RunningSidecar],
                **settings: Any) -> RunningSidecar:
    sc = await start_sidecar(fake.url, redis_url, **settings)
    sidecars.append(sc)
    return sc


@asynccontextmanager
async def idle_client(sc: RunningSidecar, body: dict[str, Any]
                      ) -> AsyncIterator[socket.socket]:
    """A client that sends a request to ``sc`` and then reads nothing (its receive buffer
    kept small, so the sidecar's writes back up quickly); closed on exit."""
    parts = urlsplit(sc.url)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    try:
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, (parts.hostname, parts.port))
        data = json.dumps(body).encode()
        head = (f"POST {CHAT} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                f"Authorization: Bearer sk-alice\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n\r\n").encode()
        await loop.sock_sendall(sock, head + data)
        yield sock
    finally:
        sock.close()


async def wait_for_followers(sc: RunningSidecar, n: int) -> None:
    flights = sc.state.flights
    await eventually(lambda: [flights.followers(k) for k in flights] == [n])


# --- a leader whose client does not read ----------------------------------------------------


@pytest.mark.parametrize("leader", ["never_reads", "disconnects"])
async def test_a_leader_whose_client_does_not_read_its_stream_holds_up_no_follower(
    fake: FakeUpstream, redis_url: str, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession, leader: str,
) -> None:
    """The leader's upstream stream is read to the end whatever its client does: the entry
    is stored and the followers (streaming or not) are served the one upstream answer."""
    sc = await start(fake, redis_url, sidecars, max_entry_bytes=4 << 20)
    fake.answer_words = BIG_STREAM_WORDS
    body = chat("a long answer, please", stream=True)
    fake.hold()
    async with idle_client(sc, body) as leader_socket:
        await fake.wait_for_requests(1, CHAT)
        followers = [asyncio.create_task(stream(http, sc, chat("a long answer, please"))),
                     asyncio.create_task(post(http, sc, chat("a long answer, please")))]
        await wait_for_followers(sc, 2)
        if leader == "disconnects":
            leader_socket.close()
        fake.release()
        async with asyncio.timeout(30):  # well before flight_timeout (60 s) would free them
            (headers, events, _), (status, plain_headers, plain) = await asyncio.gather(
                *followers)
    streamed = assembled("chat", events)["choices"][0]["message"]["content"]
    assert status == 200 and json.loads(plain)["choices"][0]["message"]["content"] == streamed
    assert len(streamed.split()) > BIG_STREAM_WORDS
    assert headers["X-Cache-Coalesced"] == plain_headers["X-Cache-Coalesced"] == "1"
    assert fake.calls[CHAT] == 1
    _, again, _ = await post(http, sc, chat("a long answer, please"))
    assert again["X-Cache"] == "HIT" and fake.calls[CHAT] == 1


# --- followers: a deadline, and only 2xx answers ---------------------------------------------


async def test_a_follower_calls_upstream_itself_once_the_flight_timeout_has_passed(
    fake: FakeUpstream, redis_url: str, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession,
) -> None:
    sc = await start(fake, redis_url, sidecars, flight_timeout=0.5)
    fake.hold()  # the leader's upstream call hangs
    leading = asyncio.create_task(post(http, sc, chat("slow")))
    await fake.wait_for_requests(1, CHAT)
    sent = time.monotonic()
    following = asyncio.create_task(post(http, sc, chat("slow")))

    await fake.wait_for_requests(2, CHAT, within=10.0)

    assert time.monotonic() - sent >= 0.5  # it did wait for the leader first
    fake.release()
    (status, led, _), (status2, followed, _) = await asyncio.gather(leading, following)
    assert (status, status2) == (200, 200)
    assert led["X-Cache"] == followed["X-Cache"] == "MISS"
    assert "X-Cache-Coalesced" not in followed and fake.calls[CHAT] == 2


async def test_an_error_answer_is_not_shared_with_followers(
    fake: FakeUpstream, redis_url: str, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession,
) -> None:
    """In shared mode one caller's 401 never reaches another caller: the follower calls
    upstream with its own credential."""
    sc = await start(fake, redis_url, sidecars, shared_cache=True)
    fake.fail_next(401, path=CHAT)
    fake.hold()
    revoked = asyncio.create_task(post(http, sc, chat("shared question"),
                                       headers={"Authorization": "Bearer sk-revoked"}))
    await fake.wait_for_requests(1, CHAT)
    valid = asyncio.create_task(post(http, sc, chat("shared question"),
                                     headers={"Authorization": "Bearer sk-valid"}))
    await wait_for_followers(sc, 1)
    fake.release()

    (status, _, _), (status2, headers, body) = await asyncio.gather(revoked, valid)

    assert status == 401
    assert status2 == 200 and json.loads(body)["choices"][0]["message"]["content"]
    assert "X-Cache-Coalesced" not in headers and fake.calls[CHAT] == 2
    assert [r.headers["authorization"] for r in fake.requests_to(CHAT)] == [
        "Bearer sk-revoked", "Bearer sk-valid"]


# --- exactly one upstream call -----------------------------------------------------------


@pytest.mark.parametrize("round_", range(5))
async def test_concurrent_identical_misses_make_exactly_one_upstream_call(
    sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession, round_: int,
) -> None:
    """No hold on the upstream: requests that missed just before the leader stored its
    answer find it when they lead in turn, instead of calling again. Several rounds, so a
    race that loses only sometimes shows."""
    for i in range(4):
        prompt = f"round {round_}.{i}"
        replies = await asyncio.gather(*(post(http, sidecar, chat(prompt)) for _ in range(50)))
        assert all(status == 200 for status, _, _ in replies)
        assert len({body for _, _, body in replies}) == 1
        assert fake.calls[CHAT] == i + 1, f"{prompt}: {fake.calls[CHAT] - i} upstream calls"


class SlowReply:
    """An entry store whose next ``get`` once ``armed`` reads Redis, then answers only when
    ``resume`` is set: a lookup that misses just before an identical request stores."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.armed = False
        self.read, self.resume = asyncio.Event(), asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def get(self, namespace: str, digest: str, *, held_checked: bool = False
                  ) -> bytes | None:
        value: bytes | None = await self._store.get(namespace, digest,
                                                    held_checked=held_checked)
        if self.armed:
            self.armed = False
            self.read.set()
            await self.resume.wait()
        return value


async def test_a_request_that_missed_just_before_the_leader_stored_is_a_hit_not_a_call(
    sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession,
) -> None:
    """Its lookup read Redis before the leader stored; by the time it would lead in turn,
    the leader's flight has landed. It looks once more before calling upstream."""
    cache = sidecar.state.cache
    slow = cache.store = SlowReply(cache.store)
    fake.hold()
    leading = asyncio.create_task(post(http, sidecar, chat("just missed")))
    await fake.wait_for_requests(1, CHAT)
    slow.armed = True
    late = asyncio.create_task(post(http, sidecar, chat("just missed")))
    await slow.read.wait()  # its lookup found nothing
    fake.release()
    _, led, _ = await leading  # stored, and the flight landed
    slow.resume.set()

    status, headers, _ = await late

    assert led["X-Cache"] == "MISS" and (status, headers["X-Cache"]) == (200, "HIT")
    assert fake.calls[CHAT] == 1


# --- bounded upstream reads ------------------------------------------------------------------


@pytest.mark.parametrize("path,body", [(CHAT, chat("too long")), (MESSAGES, anthropic())])
async def test_an_upstream_answer_over_max_response_bytes_is_a_502_in_the_apis_shape(
    fake: FakeUpstream, redis_url: str, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession, path: str, body: dict[str, Any],
) -> None:
    sc = await start(fake, redis_url, sidecars, max_response_bytes=16_384)
    fake.answer_words = 5_000  # about 35 kB of answer

    status, headers, raw = await post(http, sc, body, path)

    assert status == 502 and headers["X-Cache"] == "MISS"
    doc = json.loads(raw)
    if path == MESSAGES:
        assert doc["type"] == "error" and doc["error"]["type"] == "api_error"
    else:
        assert doc["error"]["type"] == "upstream_error"
    assert "16384 bytes" in doc["error"]["message"]
    fake.answer_words = 0
    _, again, _ = await post(http, sc, body, path)
    assert again["X-Cache"] == "MISS" and fake.calls[path] == 2


async def test_a_stream_over_max_response_bytes_is_relayed_whole_but_not_stored(
    fake: FakeUpstream, redis_url: str, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession,
) -> None:
    sc = await start(fake, redis_url, sidecars, max_response_bytes=65_536)
    fake.answer_words = 2_000  # about 500 kB of events, 14 kB assembled

    _, events, chunks = await stream(http, sc, chat("a long stream"))

    assert sum(map(len, chunks)) > 65_536
    assert len(assembled("chat", events)["choices"][0]["message"]["content"].split()) > 2_000
    _, again, _ = await post(http, sc, chat("a long stream"))
    assert again["X-Cache"] == "MISS" and fake.calls[CHAT] == 2
