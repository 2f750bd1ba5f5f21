"""The engine's request flow (``promptcache.cache.flow.handle``) through a fake Exchange:
hits, semantic hits, misses stored, bypass, single flight and a failing cache, on a real
Redis and (for the semantic tier) the real embedding model."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from promptcache.cache.engine import Engine, open_engine
from promptcache.cache.entry import Answer, Entry
from promptcache.cache.flow import Outcome, Store, cache_headers, handle
from promptcache.cache.options import EngineOptions
from promptcache.cache.protocols import Embedder
from promptcache.cache.request import Prepared, prepare
from tests.support.redis_servers import RedisServer, free_port
from tests.support.sidecars import eventually

CHAT = "/v1/chat/completions"
# A pair the default semantic settings serve (tests/sidecar/test_semantic.py: Q and PARAPHRASE).
Q = "How do I reset my password?"
PARAPHRASE = "How can I reset my password?"


def completion(text: str) -> Answer:
    """An upstream chat answer the cache may store."""
    body = {"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-test",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}]}
    return Answer(200, json.dumps(body).encode(), "application/json")


def request(engine: Engine, content: str = Q, *, cache_control: tuple[str, ...] = ()
            ) -> Prepared:
    body = {"model": "gpt-test", "temperature": 0,
            "messages": [{"role": "user", "content": content}]}
    return prepare(engine, "chat", CHAT, json.dumps(body).encode(),
                   credential="authorization=Bearer sk-test", cache_control=cache_control)


@dataclass(frozen=True)
class Reply:
    """What the fake exchange answered with: ``how`` is "served" or "forwarded"."""

    how: str
    answer: Answer | None
    outcome: Outcome


class FakeExchange:
    """An :class:`~promptcache.cache.flow.Exchange` whose upstream answers ``answer``
    (None: the call failed or its stream broke), after ``hold`` is set if one is given.

    As the real front ends do, ``forward`` hands a complete answer to ``store`` before it
    returns."""

    def __init__(self, answer: Answer | None, *, hold: asyncio.Event | None = None) -> None:
        self.answer = answer
        self.hold = hold
        self.forwarding = asyncio.Event()  # set when forward is entered
        self.served: list[tuple[Answer, Outcome]] = []
        self.forwarded: list[tuple[Outcome, Store | None]] = []
        self.stored: list[bool] = []  # what each call of ``store`` returned

    async def serve(self, answer: Answer, outcome: Outcome) -> Reply:
        self.served.append((answer, outcome))
        return Reply("served", answer, outcome)

    async def forward(self, outcome: Outcome, store: Store | None
                      ) -> tuple[Reply, Answer | None]:
        self.forwarded.append((outcome, store))
        self.forwarding.set()
        if self.hold is not None:
            await self.hold.wait()
        if self.answer is not None and store is not None:
            self.stored.append(await store(self.answer))
        return Reply("forwarded", self.answer, outcome), self.answer


@dataclass
class RecordingMetrics:
    """A :class:`~promptcache.cache.flow.FlowMetrics` that keeps what it was told."""

    outcomes: list[str] = field(default_factory=list)
    stored: list[int] = field(default_factory=list)
    not_stored: list[str] = field(default_factory=list)
    lookups: int = 0
    semantic: int = 0
    bypassed: int = 0
    coalesced: int = 0

    def on_lookup(self, seconds: float) -> None:
        self.lookups += 1

    def on_semantic(self, seconds: float) -> None:
        self.semantic += 1

    def on_store(self, nbytes: int) -> None:
        self.stored.append(nbytes)

    def on_not_stored(self, reason: str) -> None:
        self.not_stored.append(reason)

    def on_outcome(self, endpoint: str, status: str) -> None:
        assert endpoint == CHAT
        self.outcomes.append(status)

    def on_bypass(self) -> None:
        self.bypassed += 1

    def on_coalesced(self) -> None:
        self.coalesced += 1


EngineFactory = Callable[..., Awaitable[Engine]]


@pytest.fixture
async def engines() -> AsyncIterator[EngineFactory]:
    """Open engines (``await engines(redis_url=..., ...)``), all closed after the test."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(*, embedder: Embedder | None = None, **options: Any) -> Engine:
            # a model call on a busy 2-core CI machine may take a second: the production
            # embed deadline would turn an expected hit into a miss
            options = {"semantic": False, "redis_timeout": 2.0, "embed_timeout": 30.0} | options
            return await open_engine(EngineOptions(**options), stack, embedder=embedder)

        yield make


async def stored_answer(engine: Engine, req: Prepared) -> bytes | None:
    entry = await engine.cache.lookup(req.key)
    return None if entry is None else entry.body


async def test_a_stored_answer_is_served_as_a_hit_with_its_age_and_not_forwarded(
    engines: EngineFactory, redis_url: str
) -> None:
    engine = await engines(redis_url=redis_url)
    req = request(engine)
    cached = completion("Use the reset link.")
    written = Entry(cached.status, cached.body, cached.content_type, time.time() - 30, "chat")
    assert await engine.cache.put(req.key, written)
    exchange, metrics = FakeExchange(completion("from upstream")), RecordingMetrics()

    reply = await handle(engine, req, exchange, metrics)

    assert reply.how == "served" and reply.answer == cached
    assert exchange.forwarded == [] and exchange.served == [(cached, reply.outcome)]
    assert reply.outcome.status == "HIT" and reply.outcome.age in (30, 31)
    assert reply.outcome.key is None and reply.outcome.similarity is None
    assert not reply.outcome.coalesced
    assert cache_headers(req, reply.outcome)["X-Cache-Key"] == req.key.digest
    assert metrics.outcomes == ["HIT"] and metrics.lookups == 1 and metrics.stored == []


async def test_a_paraphrase_is_served_the_stored_answer_as_a_semantic_hit(
    engines: EngineFactory, redis_url: str, embedder: Embedder
) -> None:
    engine = await engines(redis_url=redis_url, semantic=True, embedder=embedder)
    first, metrics = request(engine, Q), RecordingMetrics()
    upstream = FakeExchange(completion("Use the reset link."))
    assert (await handle(engine, first, upstream, metrics)).how == "forwarded"
    assert upstream.stored == [True]
    assert engine.semantic is not None
    await engine.semantic.drain()  # its vector is computed off the request path
    paraphrase = request(engine, PARAPHRASE)
    assert paraphrase.key.digest != first.key.digest
    exchange = FakeExchange(completion("from upstream"))

    reply = await handle(engine, paraphrase, exchange, metrics)

    assert reply.how == "served" and reply.answer == upstream.answer
    assert exchange.forwarded == []
    outcome = reply.outcome
    assert outcome.status == "SEMANTIC-HIT" and outcome.key == first.key.digest
    assert outcome.similarity is not None
    assert engine.options.similarity_threshold <= outcome.similarity < 1.0
    assert outcome.age in (0, 1) and not outcome.coalesced
    assert metrics.outcomes == ["MISS", "SEMANTIC-HIT"] and metrics.semantic >= 1


async def test_a_miss_is_forwarded_with_a_store_and_the_stored_answer_then_hits(
    engines: EngineFactory, redis_url: str
) -> None:
    engine = await engines(redis_url=redis_url)
    req, metrics = request(engine), RecordingMetrics()
    exchange = FakeExchange(completion("Use the reset link."))

    reply = await handle(engine, req, exchange, metrics)

    assert reply.how == "forwarded" and exchange.served == []
    [(outcome, store)] = exchange.forwarded
    assert outcome == Outcome("MISS") and callable(store)
    assert exchange.stored == [True] and len(metrics.stored) == 1 and metrics.stored[0] > 0
    assert metrics.not_stored == []
    assert await stored_answer(engine, req) == completion("Use the reset link.").body

    again = await handle(engine, request(engine), FakeExchange(completion("other")), metrics)
    assert again.how == "served" and again.outcome.status == "HIT"
    assert again.answer == completion("Use the reset link.")
    assert len(exchange.forwarded) == 1 and metrics.outcomes == ["MISS", "HIT"]


async def test_no_cache_and_no_store_bypass_the_cache_and_store_nothing(
    engines: EngineFactory, redis_url: str
) -> None:
    engine = await engines(redis_url=redis_url)
    await handle(engine, request(engine), FakeExchange(completion("old")))
    req = request(engine, cache_control=("no-cache, no-store",))
    exchange, metrics = FakeExchange(completion("new")), RecordingMetrics()

    reply = await handle(engine, req, exchange, metrics)

    assert reply.how == "forwarded" and reply.answer == completion("new")
    assert exchange.served == [] and exchange.forwarded == [(Outcome("BYPASS"), None)]
    assert await stored_answer(engine, req) == completion("old").body  # kept, not served
    assert metrics.outcomes == ["BYPASS"] and metrics.lookups == 0
    assert metrics.bypassed == 0 and metrics.stored == [] and metrics.not_stored == []


async def lead_and_follow(engine: Engine, leader: FakeExchange, follower: FakeExchange,
                          hold: asyncio.Event, metrics: RecordingMetrics
                          ) -> tuple[Reply, Reply]:
    """Handle one request twice at once: the leader forwards and waits for ``hold``, which
    is set once the second handle waits on the leader's flight."""
    req = request(engine)
    leading = asyncio.create_task(handle(engine, req, leader, metrics))
    await leader.forwarding.wait()
    following = asyncio.create_task(handle(engine, request(engine), follower, metrics))
    try:
        await eventually(lambda: engine.flights.followers(req.key.digest) == 1)
    finally:
        hold.set()
        led, followed = await asyncio.gather(leading, following)
    return led, followed


async def test_a_concurrent_follower_is_served_the_leaders_answer_as_coalesced(
    engines: EngineFactory, redis_url: str
) -> None:
    engine = await engines(redis_url=redis_url)
    hold, metrics = asyncio.Event(), RecordingMetrics()
    leader = FakeExchange(completion("Use the reset link."), hold=hold)
    follower = FakeExchange(completion("a second upstream answer"))

    led, followed = await lead_and_follow(engine, leader, follower, hold, metrics)

    assert led.how == "forwarded" and len(leader.forwarded) == 1 and follower.forwarded == []
    assert followed.how == "served" and followed.answer == completion("Use the reset link.")
    assert follower.served == [(completion("Use the reset link."),
                                Outcome("MISS", coalesced=True))]
    assert metrics.coalesced == 1 and metrics.outcomes == ["MISS", "MISS"]
    assert leader.stored == [True] and len(metrics.stored) == 1


async def test_a_follower_forwards_itself_when_the_leaders_answer_is_too_large_to_share(
    engines: EngineFactory, redis_url: str
) -> None:
    engine = await engines(redis_url=redis_url, max_entry_bytes=256)
    hold, metrics = asyncio.Event(), RecordingMetrics()
    large = completion("x" * 1000)
    assert len(large.body) > engine.options.max_entry_bytes
    leader, follower = FakeExchange(large, hold=hold), FakeExchange(large)

    led, followed = await lead_and_follow(engine, leader, follower, hold, metrics)

    assert (led.how, followed.how) == ("forwarded", "forwarded")
    assert [o for o, _ in leader.forwarded] == [o for o, _ in follower.forwarded] == [
        Outcome("MISS")]
    assert all(callable(store) for _, store in leader.forwarded + follower.forwarded)
    assert follower.served == [] and metrics.coalesced == 0
    assert leader.stored == follower.stored == [False]
    assert metrics.not_stored == ["too_large", "too_large"] and metrics.stored == []
    assert await stored_answer(engine, request(engine)) is None


async def test_a_follower_forwards_itself_when_the_leader_has_no_answer(
    engines: EngineFactory, redis_url: str
) -> None:
    engine = await engines(redis_url=redis_url)
    hold, metrics = asyncio.Event(), RecordingMetrics()
    leader = FakeExchange(None, hold=hold)  # the upstream call failed, or its stream broke
    follower = FakeExchange(completion("Use the reset link."))

    led, followed = await lead_and_follow(engine, leader, follower, hold, metrics)

    assert (led.how, led.answer) == ("forwarded", None)
    assert followed.how == "forwarded" and followed.answer == completion("Use the reset link.")
    assert len(leader.forwarded) == len(follower.forwarded) == 1
    assert follower.forwarded[0][0] == Outcome("MISS") and follower.served == []
    assert metrics.coalesced == 0 and follower.stored == [True]
    assert await stored_answer(engine, request(engine)) == completion("Use the reset link.").body


async def test_an_unreachable_redis_is_bypassed_to_the_upstream_without_storing(
    engines: EngineFactory
) -> None:
    engine = await engines(redis_url=f"redis://127.0.0.1:{free_port()}", redis_timeout=0.5)
    exchange, metrics = FakeExchange(completion("Use the reset link.")), RecordingMetrics()

    reply = await handle(engine, request(engine), exchange, metrics)

    assert reply.how == "forwarded" and reply.answer == completion("Use the reset link.")
    # The answer is handed over (for requests waiting on this one) but not stored.
    [(outcome, _)] = exchange.forwarded
    assert outcome == Outcome("BYPASS") and exchange.stored == [False]
    assert exchange.served == []
    assert metrics.bypassed == 1 and metrics.outcomes == ["BYPASS"]
    assert metrics.stored == [] and metrics.not_stored == []


async def test_a_redis_that_dies_is_bypassed_to_the_upstream_not_raised(
    engines: EngineFactory, fresh_redis: RedisServer
) -> None:
    engine = await engines(redis_url=fresh_redis.url, redis_timeout=0.5)
    await handle(engine, request(engine), FakeExchange(completion("stored")))
    fresh_redis.kill()
    exchange, metrics = FakeExchange(completion("from upstream")), RecordingMetrics()

    reply = await handle(engine, request(engine), exchange, metrics)

    assert reply.how == "forwarded" and reply.answer == completion("from upstream")
    [(outcome, _)] = exchange.forwarded
    assert outcome == Outcome("BYPASS") and exchange.stored == [False]
    assert exchange.served == []
    assert metrics.bypassed == 1 and metrics.outcomes == ["BYPASS"]
