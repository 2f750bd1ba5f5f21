"""The semantic tier through the sidecar: paraphrases hit, nothing else does."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import numpy as np
import pytest
import redis

from promptcache.cache.protocols import Embedder
from promptcache.cache.semantic.embedding import BatchingEmbedder
from promptcache.cache.semantic.index import PartitionedIndex
from promptcache.testing import FakeUpstream
from tests.sidecar.test_sidecar_exact import CHAT, MESSAGES, assembled, post, stream
from tests.support.sidecars import RunningSidecar, eventually, start_sidecar

Q = "How do I reset my password?"
PARAPHRASE = "How can I reset my password?"


def chat(content: str, *, system: str | None = None, history: list[dict[str, Any]] = (),
         **params: Any) -> dict[str, Any]:  # type: ignore[assignment]
    messages = [{"role": "system", "content": system}] if system else []
    messages += [*history, {"role": "user", "content": content}]
    return {"model": "gpt-test", "messages": messages, "temperature": 0, **params}


async def vectors_attached(sc: RunningSidecar) -> None:
    """Wait until what ``sc`` stored has its vector: vectors are computed off the request
    path, after the answer went out."""
    if sc.state.semantic is not None:
        await sc.state.semantic.drain()


async def ask(http: aiohttp.ClientSession, sc: RunningSidecar, body: dict[str, Any],
              **headers: str) -> tuple[dict[str, str], dict[str, Any]]:
    """POST ``body`` (200 expected); what it stored is in the semantic index on return."""
    status, h, raw = await post(http, sc, body, headers=headers)
    assert status == 200, raw
    await vectors_attached(sc)
    return h, json.loads(raw)


async def test_readyz_says_the_semantic_index_is_loaded(
    semantic_sidecar: RunningSidecar, http: aiohttp.ClientSession
) -> None:
    async with http.get(semantic_sidecar.url + "/readyz") as r:
        assert r.status == 200
        assert await r.json() == {"status": "ready", "cache": "ok", "semantic": "ok"}


async def test_a_paraphrase_gets_the_cached_answer(
    semantic_sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    h1, first = await ask(http, semantic_sidecar, chat(Q))
    h2, second = await ask(http, semantic_sidecar, chat(PARAPHRASE))
    assert (h1["X-Cache"], h2["X-Cache"]) == ("MISS", "SEMANTIC-HIT")
    assert second == first and fake.calls[CHAT] == 1
    assert 0.9 <= float(h2["X-Cache-Similarity"]) <= 1.0
    assert h2["X-Cache-Key"] == h1["X-Cache-Key"] and "Age" in h2


@pytest.mark.parametrize("changed", [
    {"system": "You are a pirate."},
    {"history": [{"role": "user", "content": "I use Gmail."},
                 {"role": "assistant", "content": "OK."}]},
    {"model": "gpt-other"},
    {"temperature": 0.3},
    {"max_tokens": 10},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
])
async def test_a_paraphrase_in_another_scope_never_hits(
    semantic_sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession,
    changed: dict[str, Any],
) -> None:
    await ask(http, semantic_sidecar, chat(Q))
    h, _ = await ask(http, semantic_sidecar, chat(PARAPHRASE, **changed))
    assert h["X-Cache"] == "MISS" and fake.calls[CHAT] == 2


async def test_other_tenants_and_namespaces_never_hit(
    semantic_sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    await ask(http, semantic_sidecar, chat(Q))
    h1, _ = await ask(http, semantic_sidecar, chat(PARAPHRASE), Authorization="Bearer sk-bob")
    h2, _ = await ask(http, semantic_sidecar, chat(PARAPHRASE), **{"X-Cache-Namespace": "n2"})
    assert (h1["X-Cache"], h2["X-Cache"]) == ("MISS", "MISS") and fake.calls[CHAT] == 3


TRAPS = [
    ("Cancel my subscription.", "Don't cancel my subscription."),
    ("How do I cancel my subscription?", "How do I not cancel my subscription?"),
    ("Is it safe to take 2 aspirin tablets a day?", "Is it safe to take 20 aspirin tablets a day?"),
    ("Book a table for 4 people at 7pm.", "Book a table for 4 people at 8pm."),
    ("What happened on 3 March 2020?", "What happened on 3 March 2021?"),
    ("Convert 5 kg to pounds.", "Convert 5 lb to pounds."),
    ("Why did Alice sue Bob?", "Why did Bob sue Alice?"),
    ("Write a poem about Paris.", "Write a poem about London."),
    ("What does the function parse_args do?", "What does the function parse_kwargs do?"),
    ("Summarise https://example.com/a", "Summarise https://example.com/b"),
    ("Explain the file config.yaml", "Explain the file config.toml"),
]


@pytest.mark.parametrize(("stored", "asked"), TRAPS)
async def test_look_alike_questions_never_hit(
    semantic_sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession,
    stored: str, asked: str,
) -> None:
    await ask(http, semantic_sidecar, chat(stored))
    h, _ = await ask(http, semantic_sidecar, chat(asked))
    assert h["X-Cache"] == "MISS"


async def test_long_prompts_that_differ_after_the_model_window_never_share(
    semantic_sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """Past the window the model sees a prefix: such prompts are exact-only, counted."""
    context = " ".join(f"Paragraph {i} of the shared report says the figures for region "
                       f"{i} grew while costs in region {i} fell." for i in range(30))
    h1, _ = await ask(http, semantic_sidecar, chat(context + " Give the arguments in favour."))
    h2, _ = await ask(http, semantic_sidecar, chat(context + " Give the arguments against."))
    h3, _ = await ask(http, semantic_sidecar, chat(context + " Give the arguments against."))
    assert [h1["X-Cache"], h2["X-Cache"], h3["X-Cache"]] == ["MISS", "MISS", "HIT"]
    assert fake.calls[CHAT] == 2
    async with http.get(semantic_sidecar.url + "/metrics") as r:
        text = await r.text()
    assert 'promptcache_semantic_skipped{reason="too_long"} 2.0' in text


async def test_x_cache_mode_exact_and_a_raised_threshold_turn_it_off(
    semantic_sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    await ask(http, semantic_sidecar, chat(Q))
    h1, _ = await ask(http, semantic_sidecar, chat(PARAPHRASE),
                      **{"X-Cache-Mode": "exact", "Cache-Control": "no-store"})
    h2, _ = await ask(http, semantic_sidecar, chat(PARAPHRASE),
                      **{"X-Cache-Threshold": "0.9999", "Cache-Control": "no-store"})
    h3, _ = await ask(http, semantic_sidecar, chat(PARAPHRASE), **{"X-Cache-Threshold": "0.1"})
    assert [h1["X-Cache"], h2["X-Cache"], h3["X-Cache"]] == ["MISS", "MISS", "SEMANTIC-HIT"]
    status, _, _ = await post(http, semantic_sidecar, chat(Q), headers={"X-Cache-Threshold": "2"})
    assert status == 400
    status, _, _ = await post(http, semantic_sidecar, chat(Q), headers={"X-Cache-Mode": "fuzzy"})
    assert status == 400


async def test_high_temperature_skips_the_semantic_tier(
    semantic_sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    await ask(http, semantic_sidecar, chat(Q, temperature=1.5))
    h, _ = await ask(http, semantic_sidecar, chat(PARAPHRASE, temperature=1.5))
    assert h["X-Cache"] == "MISS"


async def test_a_streaming_request_gets_a_streamed_semantic_hit(
    semantic_sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    _, first = await ask(http, semantic_sidecar, chat(Q))
    h, events, _ = await stream(http, semantic_sidecar, chat(PARAPHRASE))
    assert h["X-Cache"] == "SEMANTIC-HIT" and len(events) >= 4
    got = assembled("chat", events)["choices"][0]["message"]["content"]
    assert got == first["choices"][0]["message"]["content"]


async def test_anthropic_messages_get_semantic_hits(
    semantic_sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    body = {"model": "claude-test", "max_tokens": 64, "system": "Be brief.",
            "messages": [{"role": "user", "content": Q}]}
    await post(http, semantic_sidecar, body, MESSAGES)
    await vectors_attached(semantic_sidecar)
    body["messages"][0]["content"] = [{"type": "text", "text": PARAPHRASE}]
    _, h, _ = await post(http, semantic_sidecar, body, MESSAGES)
    assert h["X-Cache"] == "SEMANTIC-HIT" and fake.calls[MESSAGES] == 1


async def test_a_restarted_sidecar_serves_the_same_semantic_hits(
    fake: FakeUpstream, redis_url: str, embedder: Embedder, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession,
) -> None:
    first = await start_sidecar(fake.url, redis_url, embedder=embedder)
    await ask(http, first, chat(Q))
    await first.stop()
    second = await start_sidecar(fake.url, redis_url, embedder=embedder)
    sidecars.append(second)
    assert len(second.state.semantic) == 1  # type: ignore[union-attr]
    h, _ = await ask(http, second, chat(PARAPHRASE))
    assert h["X-Cache"] == "SEMANTIC-HIT" and fake.calls[CHAT] == 1


async def test_vectors_of_another_embedder_are_re_embedded_at_restart(
    fake: FakeUpstream, redis_url: str, embedder: Embedder, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession,
) -> None:
    """A record made by another model (here: a nonsense vector) is never searched as is."""
    from promptcache.cache.semantic.record import VectorRecord

    first = await start_sidecar(fake.url, redis_url, embedder=embedder)
    await ask(http, first, chat(Q))
    await first.stop()
    r = redis.Redis.from_url(redis_url)
    try:
        (key,) = list(r.scan_iter("pc:v:*"))
        record = VectorRecord.decode(r.get(key))
        alien = np.zeros_like(record.vector)
        alien[0] = 1.0
        r.set(key, VectorRecord(record.scope, record.text, alien, record.namespace,
                                record.digest, "some-other-model").encode(), keepttl=True)
    finally:
        r.close()
    second = await start_sidecar(fake.url, redis_url, embedder=embedder)
    sidecars.append(second)
    assert second.state.semantic is not None
    assert second.state.semantic.counts["reembedded"] == 1
    h, _ = await ask(http, second, chat(PARAPHRASE))
    assert h["X-Cache"] == "SEMANTIC-HIT" and fake.calls[CHAT] == 1


@pytest.mark.parametrize("how", ["expired", "deleted"])
async def test_entries_gone_from_redis_never_come_back_through_the_index(
    semantic_sidecar: RunningSidecar, fake: FakeUpstream, redis_url: str,
    http: aiohttp.ClientSession, how: str,
) -> None:
    h, _ = await ask(http, semantic_sidecar, chat(Q))
    r = redis.Redis.from_url(redis_url)
    try:
        (entry,) = list(r.scan_iter("pc:e:*"))
        if how == "expired":
            r.pexpire(entry, 1)
            await eventually(lambda: not r.exists(entry))
        else:
            r.unlink(entry)
    finally:
        r.close()
    semantic = semantic_sidecar.state.semantic
    assert semantic is not None and len(semantic) == 1
    h2, _ = await ask(http, semantic_sidecar, chat(PARAPHRASE), **{"Cache-Control": "no-store"})
    assert h2["X-Cache"] == "MISS"
    assert len(semantic) == 0, "a stale candidate is dropped from the index"


async def test_64_concurrent_lookups_are_batched_and_each_gets_its_own_vector(
    embedder: Embedder,
) -> None:
    texts = [f"Question number {i}: how do I fix error E{i * 7} in module m{i}?"
             for i in range(64)]
    batching = BatchingEmbedder(embedder, window=0.005, max_batch=64)
    try:
        vectors = await asyncio.gather(*(batching.embed(t) for t in texts))
    finally:
        await batching.close()
    assert batching.batches < 8, f"{batching.batches} model calls for 64 texts"
    expected = embedder.encode(texts)
    for got, want in zip(vectors, expected, strict=True):
        assert float(np.dot(got, want)) > 0.9999


async def test_repeated_texts_are_not_re_embedded(embedder: Embedder) -> None:
    batching = BatchingEmbedder(embedder, window=0.0, memo_size=2)
    try:
        a = await batching.embed("alpha")
        await asyncio.gather(*(batching.embed("alpha") for _ in range(5)))
        assert batching.embedded == 1 and batching.memo_hits == 5
        await batching.embed("beta")
        await batching.embed("gamma")  # the memo holds 2: alpha falls out
        again = await batching.embed("alpha")
    finally:
        await batching.close()
    assert batching.embedded == 4 and float(np.dot(a, again)) > 0.9999


def test_a_busy_scope_never_hides_a_match_in_a_quiet_one() -> None:
    """Scope is a partition: 10k near-identical vectors elsewhere do not crowd it out."""
    rng = np.random.default_rng(1)
    target = rng.normal(size=16).astype(np.float32)
    target /= np.linalg.norm(target)
    noise = target + rng.normal(scale=0.01, size=(10_000, 16)).astype(np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    index = PartitionedIndex(16, "flat")
    index.add("busy", np.arange(10_000), noise)
    quiet = target + rng.normal(scale=0.2, size=16).astype(np.float32)
    index.add("quiet", np.array([99_999]), (quiet / np.linalg.norm(quiet))[None, :])
    found = index.search("quiet", target, k=1)
    assert [i for i, _ in found] == [99_999]
    assert all(i < 10_000 for i, _ in index.search("busy", target, k=5))
