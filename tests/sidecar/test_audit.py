"""The false-hit audit in a live sidecar: audited hits, /stats, /metrics, the bound."""

from __future__ import annotations

from typing import Any

import aiohttp

from promptcache.cache.protocols import Embedder
from promptcache.testing import FakeUpstream
from tests.sidecar.test_semantic import PARAPHRASE, Q, ask, chat
from tests.sidecar.test_sidecar_exact import CHAT
from tests.support.sidecars import RunningSidecar, eventually, start_sidecar


async def _stats(http: aiohttp.ClientSession, sc: RunningSidecar) -> dict[str, Any]:
    async with http.get(sc.url + "/stats") as r:
        return dict((await r.json())["audit"])


async def test_audited_hits_are_re_asked_upstream_and_reported(
    fake: FakeUpstream, redis_url: str, embedder: Embedder, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession,
) -> None:
    sc = await start_sidecar(fake.url, redis_url, embedder=embedder, audit_rate=1.0)
    sidecars.append(sc)
    await ask(http, sc, chat(Q))
    h, _ = await ask(http, sc, chat(PARAPHRASE))
    assert h["X-Cache"] == "SEMANTIC-HIT"
    h, _ = await ask(http, sc, chat(Q))
    assert h["X-Cache"] == "HIT"

    async def audited() -> bool:
        s = await _stats(http, sc)
        return s["audited"] == 1 and s["control"]["audited"] == 1

    await eventually(audited)
    s = await _stats(http, sc)
    assert fake.calls[CHAT] == 3  # the miss, and one audit call for each hit
    assert set(s) >= {"audited", "disagreed", "false_hit_rate", "interval", "namespaces",
                      "control", "changes", "dropped"}
    assert s["namespaces"][""]["audited"] == 1 and len(s["interval"]) == 2
    assert s["control"]["disagreed"] == 0  # the fake answers an identical request identically
    async with http.get(sc.url + "/metrics") as r:
        text = await r.text()
    assert "promptcache_audit_audited_total 1.0" in text
    assert 'promptcache_audit_bound_exceeded{namespace=""} 0.0' in text


async def test_the_bound_raises_the_namespace_floor_when_hits_disagree(
    fake: FakeUpstream, redis_url: str, embedder: Embedder, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession,
) -> None:
    """The fake's answer to a paraphrase names another digest than the served one: the
    judge's rules find the names differ, so every audited semantic hit is a false hit."""
    sc = await start_sidecar(fake.url, redis_url, embedder=embedder, audit_rate=1.0,
                             max_false_hit_rate=0.01)
    sidecars.append(sc)
    await ask(http, sc, chat(Q), **{"X-Cache-Namespace": "ns"})
    similarity = 1.0
    for _ in range(40):
        h, _ = await ask(http, sc, chat(PARAPHRASE), **{"X-Cache-Namespace": "ns"})
        if h["X-Cache"] != "SEMANTIC-HIT":
            break
        similarity = float(h["X-Cache-Similarity"])

    async def raised() -> bool:
        return bool((await _stats(http, sc))["changes"])

    await eventually(raised, within=30)
    s = await _stats(http, sc)
    assert s["namespaces"]["ns"]["bound_exceeded"] and s["false_hit_rate"] > 0.5
    change = s["changes"][0]
    # every audited hit was false at the paraphrase's similarity: the record shows every
    # floor up to it over the bound, so the floor goes above it, or the tier off
    assert change["namespace"] == "ns" and similarity < 1.0
    assert change["off"] or change["floor"] > similarity
    async with http.get(sc.url + "/metrics") as r:
        assert 'promptcache_audit_bound_exceeded{namespace="ns"} 1.0' in await r.text()
