"""The cascade on a real Redis with the real model: the first stage lets a novel prompt
miss without the transformer, keeps paraphrase hits (ranked by the precise vectors of its
candidates' records: none is held in the process), stores its codes in the vector records
(a restart indexes them without computing any) and can be switched on after the index was
filled."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from promptcache.cache.protocols import Embedder
from promptcache.cache.semantic.first_stage import FirstStage, StaticEmbedder, find_static_model
from promptcache.cache.semantic.tier import REF_BYTES
from promptcache.clients import AsyncCache

MODEL = "gpt-4o-mini"
STORED = ["How do I reset my password?", "What is the boiling point of water at sea level?",
          "Give me a recipe for banana bread."]
PARAPHRASE = "How can I reset my password?"
NOVEL = "Explain how a Kalman filter fuses an odometer with GPS readings."


def body(text: str) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}]}


async def fill(cache: AsyncCache) -> None:
    for text in STORED:
        assert await cache.store(body(text), {"answer": text})
    assert cache.engine.semantic is not None
    await cache.engine.semantic.drain()


async def test_a_novel_prompt_skips_the_transformer_and_a_paraphrase_still_hits(
        redis_url: str, embedder: Embedder) -> None:
    async with AsyncCache(redis_url=redis_url, embedder=embedder, embed_timeout=30.0,
                          semantic_wait_budget=5.0) as cache:
        await fill(cache)
        semantic = cache.engine.semantic
        assert semantic is not None and semantic.first_stage_ready
        assert semantic.first_stage is not None and len(semantic.first_stage) == len(STORED)
        assert len(semantic.index) == 0  # the candidates' precise vectors are read from Redis
        embedded = semantic.embedder.embedded
        assert await cache.lookup(body(NOVEL)) is None
        assert semantic.counts["first_stage_miss"] == 1
        assert semantic.embedder.embedded == embedded  # MiniLM never saw the novel prompt
        hit = await cache.lookup(body(PARAPHRASE))
        assert hit is not None and hit.response == {"answer": STORED[0]}
        assert semantic.embedder.embedded == embedded + 1  # the paraphrase went on to MiniLM
        stats = await cache.stats()
        assert stats["semantic"]["first_stage_vectors"] == len(STORED)
        assert 0 < stats["semantic"]["first_stage_bytes"] <= 64 * 1024


async def test_records_carry_their_codes_so_a_restart_computes_none(
        redis_url: str, embedder: Embedder) -> None:
    async with AsyncCache(redis_url=redis_url, embedder=embedder, embed_timeout=30.0,
                          semantic_wait_budget=5.0) as cache:
        await fill(cache)
    async with AsyncCache(redis_url=redis_url, embedder=embedder, embed_timeout=30.0,
                          semantic_wait_budget=5.0) as cache:
        semantic = cache.engine.semantic
        assert semantic is not None and semantic.first_stage is not None
        assert len(semantic.first_stage) == len(semantic) == len(STORED)
        assert len(semantic.index) == 0  # precise vectors stay in Redis
        assert semantic.counts["codes_computed"] == 0 and semantic.counts["reembedded"] == 0
        assert await cache.lookup(body(NOVEL)) is None
        assert semantic.counts["first_stage_miss"] == 1
        hit = await cache.lookup(body(PARAPHRASE))
        assert hit is not None and hit.response == {"answer": STORED[0]}


async def test_a_first_stage_switched_on_later_codes_what_is_indexed_before_it_filters(
        redis_url: str, embedder: Embedder) -> None:
    async with AsyncCache(redis_url=redis_url, embedder=embedder, embed_timeout=30.0,
                          semantic_wait_budget=5.0,
                          first_stage=False) as cache:
        await fill(cache)
        semantic = cache.engine.semantic
        assert semantic is not None and semantic.first_stage is None
        assert len(semantic.index) == len(STORED)  # without a first stage: all in process
        assert await cache.lookup(body(NOVEL)) is None
        assert semantic.counts["first_stage_miss"] == 0  # no first stage: MiniLM decided
        path = find_static_model()
        assert path is not None  # the session's embedder fixture distilled it
        await semantic.use_first_stage(FirstStage(StaticEmbedder(path)))
        assert semantic.first_stage_ready
        assert semantic.counts["codes_computed"] == len(STORED)
        assert len(semantic.index) == 0 and len(semantic) == len(STORED)
        assert await cache.lookup(body(NOVEL + " Please be brief.")) is None
        assert semantic.counts["first_stage_miss"] == 1
        hit = await cache.lookup(body(PARAPHRASE))
        assert hit is not None and hit.response == {"answer": STORED[0]}


async def test_a_missing_static_model_is_distilled_in_a_child_process_then_switched_on(
        redis_url: str, embedder: Embedder, tmp_path: Path) -> None:
    async with AsyncCache(redis_url=redis_url, embedder=embedder, embed_timeout=30.0,
                          semantic_wait_budget=5.0, static_model_dir=str(tmp_path)) as cache:
        semantic = cache.engine.semantic
        assert semantic is not None and semantic.first_stage is None  # not distilled yet
        await fill(cache)  # the tier works without it meanwhile
        hit = await cache.lookup(body(PARAPHRASE))
        assert hit is not None and hit.response == {"answer": STORED[0]}
        deadline = time.monotonic() + 100
        while not semantic.first_stage_ready:
            assert time.monotonic() < deadline, "the first stage was never switched on"
            await asyncio.sleep(0.2)
        assert semantic.first_stage is not None and len(semantic.first_stage) == len(STORED)
        assert find_static_model(tmp_path) is not None
        assert await cache.lookup(body(NOVEL)) is None
        assert semantic.counts["first_stage_miss"] == 1


async def test_the_index_bound_counts_the_map_from_ids_to_entries(
        redis_url: str, embedder: Embedder) -> None:
    limit = 4 * REF_BYTES  # room for a few entries' refs and codes, not for ten
    async with AsyncCache(redis_url=redis_url, embedder=embedder, embed_timeout=30.0,
                          semantic_wait_budget=5.0, index_max_bytes=limit) as cache:
        semantic = cache.engine.semantic
        assert semantic is not None and semantic.first_stage_ready
        for n in range(10):
            assert await cache.store(body(f"Question number {n}: what is {n} squared?"),
                                     {"answer": n * n})
        await semantic.drain()
        assert 1 <= len(semantic) < 10 and semantic.counts["index_full"] == 10 - len(semantic)
        assert semantic.nbytes >= len(semantic) * REF_BYTES
        assert semantic.nbytes <= limit + REF_BYTES + 64  # at most one entry past the bound
