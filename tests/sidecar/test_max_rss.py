"""--max-rss through a live sidecar: past the limit the semantic tier is shed, the model
released, exact hits and pass-through go on; below it again the tier comes back."""

from __future__ import annotations

import aiohttp

from promptcache.cache.protocols import Embedder
from promptcache.testing import FakeUpstream
from tests.sidecar.test_semantic import PARAPHRASE, Q, ask, chat
from tests.sidecar.test_sidecar_exact import CHAT
from tests.support.sidecars import RunningSidecar, eventually, start_sidecar


async def memory(http: aiohttp.ClientSession, sc: RunningSidecar) -> dict[str, object]:
    async with http.get(sc.url + "/stats") as r:
        return dict((await r.json())["memory"])


async def test_over_max_rss_the_tier_is_shed_and_exact_hits_go_on_until_memory_fits(
    fake: FakeUpstream, redis_url: str, embedder: Embedder, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession,
) -> None:
    # this test process (pytest, torch for other tests) is far over 1 MB: shed at once
    sc = await start_sidecar(fake.url, redis_url, embedder=embedder, max_rss=1 << 20)
    sidecars.append(sc)

    async def shed() -> bool:
        return (await memory(http, sc))["shedding"] is True

    await eventually(shed, within=10)
    tier = sc.state.semantic
    assert tier is not None and tier.embedder.paused
    assert getattr(embedder, "session", "released") is None  # the model's memory is given back
    h1, first = await ask(http, sc, chat(Q))
    h2, again = await ask(http, sc, chat(Q))
    h3, _ = await ask(http, sc, chat(PARAPHRASE))
    assert [h1["X-Cache"], h2["X-Cache"], h3["X-Cache"]] == ["MISS", "HIT", "MISS"]
    assert again == first and fake.calls[CHAT] == 2
    assert tier.counts["memory"] >= 3  # two stores left exact-only, one lookup skipped
    async with http.get(sc.url + "/metrics") as r:
        text = await r.text()
    assert "promptcache_memory_shed 1.0" in text and "promptcache_memory_sheds 1.0" in text
    assert 'promptcache_semantic_skipped{reason="memory"}' in text
    stats = await memory(http, sc)
    assert stats["sheds"] == 1 and stats["max_rss_bytes"] == 1 << 20

    guard = sc.state.engine.guard
    assert guard is not None
    guard.limit, guard.hold = 1 << 50, 0.0  # the operator's limit is now far away

    async def resumed() -> bool:
        return (await memory(http, sc))["shedding"] is False

    await eventually(resumed, within=10)
    assert not tier.embedder.paused
    h4, _ = await ask(http, sc, chat("How do I change my email address?"))
    h5, _ = await ask(http, sc, chat("How can I change my email address?"))
    assert [h4["X-Cache"], h5["X-Cache"]] == ["MISS", "SEMANTIC-HIT"]
    assert (await memory(http, sc))["sheds"] == 1
