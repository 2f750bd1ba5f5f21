"""The semantic tier off the request path, on a real Redis: vectors are computed after the
store, attached only to entries that still exist; lookups shed, time out and refuse long
texts instead of waiting for the model.

Most tests run the tier's real :class:`BatchingEmbedder` over :class:`SlowModel`, a fake
model that takes a set time per text or stalls until the test releases it; the length
policy is checked with the real model (its window is what matters there).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis

from promptcache.cache.exact import CachePolicy, ExactCache
from promptcache.cache.keys import CacheKey, request_key
from promptcache.cache.protocols import Embedder, Verdict
from promptcache.cache.redis.budget import BudgetStore
from promptcache.cache.redis.index_sync import IndexSync
from promptcache.cache.redis.layout import KeyLayout
from promptcache.cache.redis.reconcile import reconcile
from promptcache.cache.semantic.embedding import BatchingEmbedder
from promptcache.cache.semantic.index import PartitionedIndex
from promptcache.cache.semantic.record import vector_id
from promptcache.cache.semantic.scope import SemanticView
from promptcache.cache.semantic.tier import SemanticCache, SemanticPolicy
from tests.support.clock import FakeClock
from tests.support.sidecars import eventually

LAYOUT = KeyLayout("pc:", 1)
SCOPE = "0" * 32


def unit(text: str, dim: int) -> np.ndarray:
    """A vector that depends on the text only: the same text, the same vector."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    v = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


class SlowModel:
    """A fake embedding model: ``delay`` seconds a text, or stalled while ``gate`` is clear."""

    dim = 8
    name = "slow-fake"

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.gate = threading.Event()
        self.gate.set()
        self.seen: list[str] = []

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.seen.extend(texts)
        self.gate.wait(timeout=60)
        time.sleep(self.delay * len(texts))
        return np.stack([unit(t, self.dim) for t in texts]) if texts else np.zeros(
            (0, self.dim), dtype=np.float32)


class StalledVerifier:
    """A verifier that never answers until released."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def verify_batch(self, items: Sequence[tuple[str, str, float]]) -> Sequence[Verdict]:
        self.gate.wait(timeout=60)
        return [Verdict(ok=True, reason=None, score=1.0) for _ in items]


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(redis_url, socket_timeout=5)
    yield c
    await c.aclose()


@asynccontextmanager
async def tier(client: aioredis.Redis, model: Embedder, *, max_bytes: int = 0,
               verifier: Any = None, start: bool = True, clock: Any = time.monotonic,
               node: str = "n1", **policy: Any) -> AsyncIterator[SemanticCache]:
    """A semantic tier over ``model``, its worker started unless ``start`` is False."""
    store = BudgetStore(client, LAYOUT, max_bytes=max_bytes, node=node)
    exact = ExactCache(store, CachePolicy(op_timeout=5.0))
    embedder = BatchingEmbedder(model, window=0.0)
    semantic = SemanticCache(exact, embedder, PartitionedIndex(model.dim, "flat"), verifier,
                             SemanticPolicy(**policy), clock=clock, idle_poll=0.005)
    if start:
        semantic.start()
    try:
        yield semantic
    finally:
        for gated in (model, verifier):  # let blocked threads finish
            if gated is not None and hasattr(gated, "gate"):
                gated.gate.set()
        await semantic.stop()
        await embedder.close()


def key(i: int) -> CacheKey:
    return request_key("/v1/chat/completions", {"i": i}, tenant="t")


async def store(semantic: SemanticCache, i: int, text: str, *, size: int = 200,
                ttl: float | None = None) -> int:
    """Store entry ``i`` with the view ``text``; must return without waiting for a vector."""
    body = random.Random(i).randbytes(size)  # incompressible: the size is what is stored
    entry = semantic.exact.entry_for(200, body, "application/json", "chat")
    async with asyncio.timeout(5):
        return await semantic.put(key(i), entry, SemanticView(SCOPE, text), ttl=ttl)


async def has_vector(client: aioredis.Redis, i: int) -> bool:
    return bool(await client.exists(LAYOUT.vector("", key(i).digest)))


async def accounting_is_exact(semantic: SemanticCache) -> bool:
    assert isinstance(semantic.exact.store, BudgetStore)
    return (await reconcile(semantic.exact.store)).clean


async def test_a_store_returns_before_its_vector_which_is_attached_later_and_then_hits(
        client: aioredis.Redis) -> None:
    model = SlowModel()
    model.gate.clear()  # the model computes nothing until released
    async with tier(client, model) as semantic:
        assert await store(semantic, 1, "how do I reset my password?", ttl=600) > 0
        assert await semantic.exact.lookup(key(1)) is not None, "the exact entry is there"
        assert not await has_vector(client, 1) and len(semantic.index) == 0
        assert await semantic.lookup(SemanticView(SCOPE, "how do I reset my password?")) is None

        model.gate.set()
        await semantic.drain()

        assert await has_vector(client, 1) and len(semantic.index) == 1
        entry_ttl = await client.pttl(LAYOUT.entry("", key(1).digest))
        vector_ttl = await client.pttl(LAYOUT.vector("", key(1).digest))
        assert 0 < vector_ttl <= entry_ttl <= 600_000, "the record expires with its entry"
        hit = await semantic.lookup(SemanticView(SCOPE, "how do I reset my password?"))
        assert hit is not None and hit.digest == key(1).digest
        assert semantic.counts["vectors_attached"] == 1
        assert await accounting_is_exact(semantic)


@pytest.mark.parametrize("how", ["deleted", "expired", "evicted"])
async def test_an_entry_gone_before_its_vector_is_computed_is_never_resurrected(
        client: aioredis.Redis, how: str) -> None:
    """Deleted, expired or evicted while its text waited: no vector record, no index
    entry, and the byte accounting matches what Redis holds."""
    model = SlowModel()
    model.gate.clear()
    # 40 kB: room (less the change stream's share) for one 12 kB entry, not two. The tier's
    # clock stands still: it does not know the entry expired, Redis tells it.
    async with tier(client, model, max_bytes=40_000 if how == "evicted" else 0,
                    clock=lambda: 0.0) as semantic:
        ttl = 0.05 if how == "expired" else None
        assert await store(semantic, 1, "first question", size=12_000, ttl=ttl) > 0
        entry_key = LAYOUT.entry("", key(1).digest)
        if how == "deleted":
            assert await semantic.exact.invalidate_key("", key(1).digest) == 1
        elif how == "expired":
            await eventually(lambda: _gone(client, entry_key))
        else:
            assert await store(semantic, 2, "second question", size=12_000) > 0
            assert semantic.exact.counts["evicted"] == 1
        assert not await client.exists(entry_key)

        model.gate.set()
        await semantic.drain()

        assert not await has_vector(client, 1) and not await client.exists(entry_key)
        assert semantic.counts["vector_gone"] == 1
        assert len(semantic.index) == (1 if how == "evicted" else 0)
        assert semantic.index.search(SCOPE, unit("first question", 8), 4)[:1] != [
            (int(key(1).digest[:15], 16), pytest.approx(1.0))]
        if how == "evicted":
            assert await has_vector(client, 2), "the entry that is there got its vector"
        assert await accounting_is_exact(semantic)


async def _gone(client: aioredis.Redis, k: str) -> bool:
    return not await client.exists(k)


async def test_an_attached_vector_is_counted_in_the_budget_evicting_to_fit(
        client: aioredis.Redis) -> None:
    """The record's bytes come out of the budget like a record written with its entry:
    the accounting stays exact and the total within the budget."""
    async with tier(client, SlowModel(), max_bytes=40_000) as semantic:
        for i in range(30):
            assert await store(semantic, i, f"question {i} " + "word " * 100, size=1000) > 0
            await semantic.drain()
        usage = await semantic.exact.store.usage()
        assert usage.bytes <= 40_000 and semantic.exact.counts["evicted"] > 0
        assert semantic.counts["vectors_attached"] == 30
        assert await has_vector(client, 29)
        assert await accounting_is_exact(semantic)


async def test_another_node_learns_an_attached_vector_from_the_change_stream(
        client: aioredis.Redis) -> None:
    async with tier(client, SlowModel()) as node_a, tier(client, SlowModel(),
                                                         node="n2") as node_b:
        assert isinstance(node_b.exact.store, BudgetStore)
        sync = IndexSync(client, node_b, node_b.exact.store, block_ms=100)
        await sync.start()
        tail = asyncio.create_task(sync.run())
        try:
            await store(node_a, 1, "stored question")
            await node_a.drain()
            await eventually(lambda: vector_id(key(1).digest) in node_b.index, within=5)
            hit = await node_b.lookup(SemanticView(SCOPE, "stored question"))
            assert hit is not None and hit.digest == key(1).digest
            await node_a.exact.invalidate_key("", key(1).digest)
            await eventually(lambda: len(node_b.index) == 0, within=5)
        finally:
            tail.cancel()
            await asyncio.gather(tail, return_exceptions=True)


async def test_past_the_backlog_bound_entries_stay_exact_only_and_are_counted(
        client: aioredis.Redis) -> None:
    async with tier(client, SlowModel(), vector_backlog=2, start=False) as semantic:
        for i in range(5):
            assert await store(semantic, i, f"question {i}") > 0
        assert semantic.counts["exact_only"] == 3
        assert semantic.stats()["vector_backlog"] == 2

        semantic.start()
        await semantic.drain()

        assert [await has_vector(client, i) for i in range(5)] == [True] * 2 + [False] * 3
        assert all([await semantic.exact.lookup(key(i)) is not None for i in range(5)])
        assert semantic.counts["vectors_attached"] == 2


async def test_a_miss_whose_lookup_embedded_its_text_gets_its_vector_from_the_memo(
        client: aioredis.Redis) -> None:
    """The text a miss was looked up with is not embedded again for storage, and its
    vector is attached even while the model is busy."""
    model = SlowModel()
    async with tier(client, model) as semantic:
        await store(semantic, 1, "stored question")
        await semantic.drain()
        assert await semantic.lookup(SemanticView(SCOPE, "another question")) is None
        model.gate.clear()
        busy = asyncio.create_task(semantic.embedder.embed("keeps the model busy"))
        await eventually(lambda: not semantic.embedder.idle())

        await store(semantic, 2, "another question")
        async with asyncio.timeout(5):
            await semantic.drain()

        assert await has_vector(client, 2) and model.seen.count("another question") == 1
        model.gate.set()
        await busy


async def test_vectors_for_storage_wait_until_lookups_leave_the_model_alone(
        client: aioredis.Redis) -> None:
    """The backlog is embedded only once no lookup wanted the model for a while."""
    clock = FakeClock()
    model = SlowModel()
    async with tier(client, model, clock=clock, background_quiet=1.0) as semantic:
        await store(semantic, 1, "stored question")
        await semantic.drain()  # no lookup yet: computed at once
        assert await semantic.lookup(SemanticView(SCOPE, "a lookup")) is None
        await store(semantic, 2, "waits for quiet")

        with pytest.raises(TimeoutError):
            await asyncio.wait_for(semantic.drain(), 0.2)
        assert "waits for quiet" not in model.seen
        clock.advance(1.0)
        await semantic.drain()

        assert await has_vector(client, 2) and "waits for quiet" in model.seen


async def test_a_saturated_embedder_sheds_lookups_at_once_and_counts_them(
        client: aioredis.Redis) -> None:
    model = SlowModel(delay=0.2)
    async with tier(client, model, wait_budget=0.010) as semantic:
        await store(semantic, 1, "stored question")
        await semantic.drain()  # the scope holds a vector; the model's cost is known
        busy = [asyncio.create_task(semantic.embedder.embed(f"other {i}")) for i in range(4)]
        await eventually(lambda: not semantic.embedder.idle())

        started = time.perf_counter()
        missed = await semantic.lookup(SemanticView(SCOPE, "a new question"))
        took = time.perf_counter() - started

        assert missed is None and semantic.counts["shed"] == 1
        assert took < 0.1, f"a shed lookup took {took:.3f} s"
        assert "a new question" not in model.seen
        known = await semantic.lookup(SemanticView(SCOPE, "stored question"))
        assert known is not None, "a text whose vector is in the memo waits for nothing"
        await asyncio.gather(*busy)
        assert await semantic.lookup(SemanticView(SCOPE, "a new question")) is None
        assert "a new question" in model.seen, "an idle model is asked again"
        assert semantic.stats()["shed"] == 1


async def test_a_stalled_embedder_makes_lookups_misses_not_stalls(
        client: aioredis.Redis) -> None:
    model = SlowModel()
    async with tier(client, model, wait_budget=60.0, embed_timeout=0.2) as semantic:
        await store(semantic, 1, "stored question")
        await semantic.drain()
        model.gate.clear()

        started = time.perf_counter()
        missed = await semantic.lookup(SemanticView(SCOPE, "a question never embedded"))
        took = time.perf_counter() - started

        assert missed is None and semantic.counts["deadline"] == 1
        assert took < 2.0, f"a lookup on a stalled model took {took:.3f} s"


async def test_a_stalled_verifier_makes_a_lookup_a_miss_not_a_stall(
        client: aioredis.Redis) -> None:
    async with tier(client, SlowModel(), verifier=StalledVerifier(), wait_budget=60.0,
                    embed_timeout=0.2) as semantic:
        await store(semantic, 1, "stored question")
        await semantic.drain()

        started = time.perf_counter()
        missed = await semantic.lookup(SemanticView(SCOPE, "stored question"))
        took = time.perf_counter() - started

        assert missed is None and semantic.counts["deadline"] == 1
        assert took < 2.0, f"a lookup on a stalled verifier took {took:.3f} s"


CONTEXT = " ".join(f"Paragraph {i} of the shared report says the figures for region {i} "
                   f"grew while costs in region {i} fell." for i in range(30))


async def test_prompts_longer_than_the_model_window_are_exact_only(
        client: aioredis.Redis, embedder: Embedder) -> None:
    """Two long prompts that differ only after the window never share an answer: such
    prompts get no vector and no lookup; their exact entries still hit."""
    favour = CONTEXT + " Give the arguments in favour."
    against = CONTEXT + " Give the arguments against."
    async with tier(client, embedder) as semantic:
        assert not semantic.embedder.fits(favour)
        assert await store(semantic, 1, favour) > 0
        await semantic.drain()

        assert not await has_vector(client, 1) and len(semantic.index) == 0
        assert await semantic.lookup(SemanticView(SCOPE, against)) is None
        assert semantic.counts["too_long"] == 1
        assert await semantic.exact.lookup(key(1)) is not None
        assert semantic.embedder.embedded == 0, "the model never saw the long prompts"
