"""The similarity floor falls for long prompts (``--length-relief``), on a real Redis with
the real model: an LLM rewrite of a long sentence (cosine about 0.967) is served, the same
pair is not without the relief, a short pair at a similar cosine is not, and a long prompt
with one word turned into its opposite is not (the ``contrast`` rule)."""

from __future__ import annotations

from typing import Any

import pytest

from promptcache.cache.protocols import Embedder
from promptcache.clients import AsyncCache

MODEL = "gpt-4o-mini"
LONG = ("Gradio is a tool to build machine learning demos and other web apps in just a few "
        "lines of Python.")
LONG_REWRITE = ("Gradio enables developers to create machine learning demos and web "
                "applications with a few lines of Python code.")
LONG_OPPOSITE = ("How do I disable two-factor login for every user on the admin console of "
                 "our team?")
LONG_STORED = ("How do I enable two-factor login for every user on the admin console of our "
               "team?")
SHORT = "How do I learn the English language quickly?"
SHORT_REWRITE = "How do I learn English quickly?"


def body(text: str) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}]}


async def similarity(embedder: Embedder, a: str, b: str) -> float:
    va, vb = embedder.encode([a, b])
    return float(va @ vb)


@pytest.mark.parametrize("first_stage", [True, False])
async def test_a_long_rewrite_is_served_under_the_relief_and_only_then(
        redis_url: str, embedder: Embedder, first_stage: bool) -> None:
    long_sim = await similarity(embedder, LONG, LONG_REWRITE)
    short_sim = await similarity(embedder, SHORT, SHORT_REWRITE)
    # the pairs sit where the relief decides: under the threshold, over it less the relief
    assert 0.93 <= long_sim < 0.975 and 0.93 <= short_sim < 0.975
    for relief, served in ((0.045, True), (0.0, False)):
        async with AsyncCache(redis_url=redis_url, embedder=embedder, embed_timeout=30.0,
                              semantic_wait_budget=5.0, first_stage=first_stage,
                              length_relief=relief) as cache:
            ns = f"relief-{relief}-{first_stage}"  # each arm its own entries
            for text in (LONG, SHORT, LONG_STORED):
                assert await cache.store(body(text), {"answer": text}, namespace=ns)
            assert cache.engine.semantic is not None
            await cache.engine.semantic.drain()
            hit = await cache.lookup(body(LONG_REWRITE), namespace=ns)
            assert (hit is not None and hit.response == {"answer": LONG}) is served
            assert await cache.lookup(body(SHORT_REWRITE), namespace=ns) is None  # 6 words
            assert await cache.lookup(body(LONG_OPPOSITE), namespace=ns) is None  # opposite


async def test_a_floor_the_false_hit_bound_raised_gets_no_relief(
        redis_url: str, embedder: Embedder) -> None:
    """The bound chooses a floor from the similarities of audited hits, so a floor it
    raised is the least similarity served there: the relief does not reach under it."""
    async with AsyncCache(redis_url=redis_url, embedder=embedder, embed_timeout=30.0,
                          semantic_wait_budget=5.0, audit_rate=1.0,
                          max_false_hit_rate=0.01) as cache:
        ns = "bound-raised"
        assert await cache.store(body(LONG), {"answer": LONG}, namespace=ns)
        assert cache.engine.semantic is not None and cache.engine.audit is not None
        await cache.engine.semantic.drain()
        auditor = cache.engine.audit
        hit = await cache.lookup(body(LONG_REWRITE), namespace=ns)
        assert hit is not None  # at the configured floor, the relief serves it
        for _ in range(40):  # wrong answers at the configured floor: the bound raises it
            auditor.record(ns, True, exact=False, similarity=0.976)
        assert auditor.exceeded(ns) and auditor.floor(ns, None) is not None
        assert await cache.lookup(body(LONG_REWRITE), namespace=ns) is None
        assert await cache.lookup(body(LONG), namespace=ns) is not None  # exact still hits
