"""Several sidecars on one deployment: a single Redis, and a 3-master Redis Cluster.

One contract suite, parametrized over both (``deployment_url``): entries and semantic hits
cross nodes, the byte budget holds under a flood of real prompts, evictions leave every
node's index, recently hit entries survive, restarts keep what was cached, expiry keeps the
accounting exact, and identical misses on two nodes make one upstream call.

The budget counts each shard's change stream too (its share comes out of ``--max-bytes``),
so the budget tests ask :func:`~promptcache.benchmarks.plan.budget_for` for the budget that
leaves their entries a given room on either deployment, and the accounting tests compare the
entries' part of the total.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import aiohttp
import pytest

from promptcache.benchmarks.plan import budget_for
from promptcache.cache.protocols import Embedder
from promptcache.cache.redis.budget import STREAM_LEAST_BYTES
from promptcache.cache.redis.client import close_client, is_cluster_url, redis_client
from promptcache.cache.redis.layout import CLUSTER_SHARDS, KeyLayout
from promptcache.cache.redis.reconcile import reconcile_url
from promptcache.cache.semantic.record import vector_id
from promptcache.testing import FakeUpstream
from tests.sidecar.test_semantic import PARAPHRASE, Q, ask, chat
from tests.sidecar.test_sidecar_exact import CHAT, post
from tests.support.paths import DATASETS
from tests.support.sidecars import RunningSidecar, eventually, start_sidecar

pytestmark = pytest.mark.slow

PROMPTS = DATASETS / "chat_prompts.jsonl.gz"
needs_prompts = pytest.mark.skipif(not PROMPTS.exists(),
                                   reason=f"{PROMPTS} is not there (shared datasets)")


def real_prompts(n: int, skip: int = 0, max_chars: int = 4000) -> list[str]:
    out: list[str] = []
    with gzip.open(PROMPTS, "rt", encoding="utf-8") as f:
        for line in f:
            prompt = json.loads(line)["prompt"]
            if 0 < len(prompt) <= max_chars and prompt not in out:
                out.append(prompt)
            if len(out) >= n + skip:
                break
    return out[skip:]


def layout_for(url: str) -> KeyLayout:
    return KeyLayout("pc:", CLUSTER_SHARDS if is_cluster_url(url) else 1)


@pytest.fixture
async def direct(deployment_url: str) -> AsyncIterator[Any]:
    """A client of the deployment for the test's own checks."""
    client = redis_client(deployment_url, timeout=5.0)
    yield client
    await close_client(client)


class Accounted(NamedTuple):
    """What the budget's accounting holds over all shards."""

    bytes: int  # everything counted: entries and change streams
    entries: int
    streams: int  # the change streams' part of ``bytes``

    @property
    def entry_bytes(self) -> int:
        return self.bytes - self.streams


async def accounted(client: Any, layout: KeyLayout) -> Accounted:
    """The accounting over all shards (each shard read in one HMGET), without side effects."""
    total = entries = streams = 0
    for shard in range(layout.shards):
        raw = await client.hmget(layout.shard_keys(shard)[3], ["bytes", "entries", "stream"])
        total, entries = total + int(raw[0] or 0), entries + int(raw[1] or 0)
        streams += int(raw[2] or 0)
    return Accounted(total, entries, streams)


async def nodes(n: int, fake: FakeUpstream, url: str, sidecars: list[RunningSidecar],
                **settings: Any) -> list[RunningSidecar]:
    started = [await start_sidecar(fake.url, url, **settings) for _ in range(n)]
    sidecars.extend(started)
    return started


# --- entries cross nodes ---------------------------------------------------------------------


async def test_an_exact_hit_stored_through_one_node_is_served_by_another(
    fake: FakeUpstream, deployment_url: str, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession,
) -> None:
    a, b = await nodes(2, fake, deployment_url, sidecars)
    _, h1, body1 = await post(http, a, chat(Q))
    _, h2, body2 = await post(http, b, chat(Q))
    assert (h1["X-Cache"], h2["X-Cache"]) == ("MISS", "HIT") and body1 == body2
    assert fake.calls[CHAT] == 1


async def test_a_semantic_hit_stored_through_one_node_is_served_by_another(
    fake: FakeUpstream, deployment_url: str, embedder: Embedder,
    sidecars: list[RunningSidecar], http: aiohttp.ClientSession,
) -> None:
    a, b = await nodes(2, fake, deployment_url, sidecars, embedder=embedder)
    await ask(http, a, chat(Q))
    index_b = b.state.semantic  # type: ignore[union-attr]
    await eventually(lambda: len(index_b) == 1, within=5)  # learnt from the change stream
    h, _ = await ask(http, b, chat(PARAPHRASE))
    assert h["X-Cache"] == "SEMANTIC-HIT" and fake.calls[CHAT] == 1


async def test_identical_misses_sent_to_two_nodes_at_once_make_one_upstream_call(
    fake: FakeUpstream, deployment_url: str, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession,
) -> None:
    a, b = await nodes(2, fake, deployment_url, sidecars)
    fake.latency = 0.3
    results = await asyncio.gather(*(post(http, node, chat("one call please"))
                                     for node in (a, b, a, b)))
    assert fake.calls[CHAT] == 1
    assert {r[0] for r in results} == {200} and len({r[2] for r in results}) == 1
    assert sum(r[1].get("X-Cache-Coalesced") == "1" for r in results) == 3


async def test_a_node_whose_redis_lease_fails_still_answers(
    fake: FakeUpstream, deployment_url: str, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession, direct: Any,
) -> None:
    """A lease held by a node that died is waited out, then the call goes upstream."""
    (a,) = await nodes(1, fake, deployment_url, sidecars, flight_lease=0.3)
    key = chat("orphaned lease")
    _, h, _ = await post(http, a, key, headers={"Cache-Control": "no-store"})
    digest = h["X-Cache-Key"]
    layout = layout_for(deployment_url)
    await direct.set(layout.lease("", digest), b"dead-node", px=300)
    status, h, _ = await post(http, a, key)
    assert status == 200 and h["X-Cache"] == "MISS" and fake.calls[CHAT] == 2


# --- the byte budget --------------------------------------------------------------------------


@needs_prompts
async def test_a_write_flood_of_real_prompts_never_exceeds_the_budget(
    fake: FakeUpstream, deployment_url: str, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession, direct: Any,
) -> None:
    """Two nodes take 300 real prompts at once; a poller reads the total (entries and
    change streams) all along."""
    layout = layout_for(deployment_url)
    budget, streams = budget_for(120_000, layout.shards)  # 120 KB for the entries
    a, b = await nodes(2, fake, deployment_url, sidecars, max_bytes=budget)
    prompts = real_prompts(300)
    seen: list[int] = []
    done = asyncio.Event()

    async def poll() -> None:
        while not done.is_set():
            seen.append((await accounted(direct, layout)).bytes)
            await asyncio.sleep(0.001)

    async def send(i: int, sem: asyncio.Semaphore) -> None:
        async with sem:
            status, h, _ = await post(http, (a, b)[i % 2], chat(prompts[i]))
            assert status == 200 and h["X-Cache"] == "MISS"

    poller = asyncio.create_task(poll())
    sem = asyncio.Semaphore(8)
    try:
        await asyncio.gather(*(send(i, sem) for i in range(len(prompts))))
    finally:
        done.set()
        await poller
    final = await accounted(direct, layout)
    evicted = a.state.cache.counts["evicted"] + b.state.cache.counts["evicted"]
    assert len(seen) >= 10 and max(seen) <= budget, (len(seen), max(seen), budget)
    assert evicted > 100 and final.entries + evicted == len(prompts)
    assert final.entry_bytes > (budget - streams) * 0.5, "the entries' room was actually used"
    assert 0 < final.streams <= streams, "the change streams are counted, within their share"
    assert (await reconcile_url(deployment_url)).clean


@needs_prompts
async def test_the_most_recently_hit_entries_survive_a_flood(
    fake: FakeUpstream, deployment_url: str, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession,
) -> None:
    budget, _ = budget_for(400_000, layout_for(deployment_url).shards)  # 400 KB for entries
    a, b = await nodes(2, fake, deployment_url, sidecars, max_bytes=budget)
    hot = real_prompts(4, skip=1000)
    for prompt in hot:
        await post(http, a, chat(prompt))
    flood = real_prompts(600)
    for i, prompt in enumerate(flood):
        await post(http, (a, b)[i % 2], chat(prompt))
        if i % 10 == 9:  # the hot set is hit all along, on the other node
            for p in hot:
                _, h, _ = await post(http, (b, a)[i % 2], chat(p))
                assert h["X-Cache"] == "HIT", "a hot entry was evicted"
    assert a.state.cache.counts["evicted"] + b.state.cache.counts["evicted"] > 100
    _, h, _ = await post(http, a, chat(flood[0]))
    assert h["X-Cache"] == "MISS", "the oldest cold entry was evicted"


@needs_prompts
async def test_evictions_disappear_from_every_nodes_index(
    fake: FakeUpstream, deployment_url: str, embedder: Embedder,
    sidecars: list[RunningSidecar], http: aiohttp.ClientSession, direct: Any,
) -> None:
    layout = layout_for(deployment_url)
    budget, _ = budget_for(150_000, layout.shards)  # 150 KB for the entries
    a, b = await nodes(2, fake, deployment_url, sidecars, embedder=embedder,
                       max_bytes=budget)
    # prompts within the model's window: longer ones are exact-only, with no vector
    for i, prompt in enumerate(real_prompts(120, max_chars=400)):
        await ask(http, (a, b)[i % 2], chat(prompt))
    assert a.state.cache.counts["evicted"] + b.state.cache.counts["evicted"] > 20

    async def live_ids() -> set[int]:
        found: set[int] = set()
        for shard in range(layout.shards):
            async for m, _ in direct.hscan_iter(layout.shard_keys(shard)[2]):
                member = m.decode()
                if await direct.exists(f"{layout.tag(shard)}v:{member}"):
                    found.add(vector_id(layout.digest_of(member)))
        return found

    live = await live_ids()
    assert 10 < len(live) < 120
    for node in (a, b):
        index = node.state.semantic  # type: ignore[union-attr]
        await eventually(lambda index=index: {i for i in live if i in index} == live
                         and len(index) == len(live), within=5)


# --- restarts and expiry ----------------------------------------------------------------------


async def test_a_restarted_node_serves_what_it_served_before(
    fake: FakeUpstream, deployment_url: str, embedder: Embedder,
    sidecars: list[RunningSidecar], http: aiohttp.ClientSession,
) -> None:
    first = await start_sidecar(fake.url, deployment_url, embedder=embedder,
                                max_bytes=1_000_000)
    await ask(http, first, chat(Q))
    await ask(http, first, chat("What is the capital of France?"))
    await first.stop()
    (again,) = await nodes(1, fake, deployment_url, sidecars, embedder=embedder,
                           max_bytes=1_000_000)
    h1, _ = await ask(http, again, chat("What is the capital of France?"))
    h2, _ = await ask(http, again, chat(PARAPHRASE))
    assert (h1["X-Cache"], h2["X-Cache"]) == ("HIT", "SEMANTIC-HIT")
    assert fake.calls[CHAT] == 2


async def test_ttl_expiry_leaves_the_accounting_exact_on_every_node(
    fake: FakeUpstream, deployment_url: str, embedder: Embedder,
    sidecars: list[RunningSidecar], http: aiohttp.ClientSession, direct: Any,
) -> None:
    a, b = await nodes(2, fake, deployment_url, sidecars, embedder=embedder,
                       max_bytes=1_000_000)
    layout = layout_for(deployment_url)
    await ask(http, a, chat("kept for a day"))
    before = await accounted(direct, layout)
    kept = (before.entry_bytes, before.entries)
    for i in range(6):
        await ask(http, (a, b)[i % 2], chat(f"short lived question {i}?"),
                  **{"Cache-Control": "max-age=4", "X-Cache-Mode": "exact"})
    assert (await accounted(direct, layout)).entries == 7
    # the expiries are logged to the change streams, so only the entries' part is as before
    await eventually(lambda: _entries_are(direct, layout, kept), within=15, step=0.1)
    for node in (a, b):
        index = node.state.semantic  # type: ignore[union-attr]
        await eventually(lambda index=index: len(index) == 1, within=5)
    after = await accounted(direct, layout)
    assert after.streams > before.streams, "the expiries were logged and counted"
    async with http.get(a.url + "/stats") as r:
        stats = await r.json()
    assert (stats["cache"]["bytes"], stats["cache"]["entries"]) == (after.bytes, 1)
    assert (await reconcile_url(deployment_url)).clean


async def _entries_are(client: Any, layout: KeyLayout, expected: tuple[int, int]) -> bool:
    now = await accounted(client, layout)
    return (now.entry_bytes, now.entries) == expected


async def test_stats_and_metrics_report_the_budget_and_resident_memory(
    fake: FakeUpstream, deployment_url: str, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession, direct: Any,
) -> None:
    (a,) = await nodes(1, fake, deployment_url, sidecars, max_bytes=1_000_000)
    await post(http, a, chat(Q))
    async with http.get(a.url + "/stats") as r:
        stats = await r.json()
    shards = CLUSTER_SHARDS if is_cluster_url(deployment_url) else 1
    assert stats["cache"]["entries"] == 1 and stats["cache"]["shards"] == shards
    counted = await accounted(direct, layout_for(deployment_url))
    assert stats["cache"]["bytes"] == counted.bytes and stats["cache"]["max_bytes"] == 1_000_000
    # one entry, and one shard's change stream holding one event
    assert 0 < counted.entry_bytes < 5000 and 0 < counted.streams < STREAM_LEAST_BYTES
    memory = stats["memory"]
    assert memory["rss_bytes"] > 10_000_000
    named = [k for k in memory if k.endswith("_bytes") and k not in (
        "rss_bytes", "anon_bytes", "file_bytes", "other_bytes")]
    assert named == ["model_bytes", "near_bytes"]  # the semantic tier is off here
    assert memory["rss_bytes"] == sum(memory[k] for k in named) + memory["other_bytes"]
    # the anonymous and file-backed pages, read a moment apart from RSS
    assert abs(memory["anon_bytes"] + memory["file_bytes"] - memory["rss_bytes"]) < 8 << 20
    async with http.get(a.url + "/metrics") as r:
        text = await r.text()
    assert "promptcache_budget_max_bytes 1e+06" in text
    assert 'promptcache_memory_bytes{part="other"}' in text
    assert "promptcache_resident_bytes" in text


async def test_invalidation_reaches_every_master_and_keeps_the_accounting_exact(
    fake: FakeUpstream, deployment_url: str, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession, direct: Any,
) -> None:
    a, b = await nodes(2, fake, deployment_url, sidecars, admin_token="tok",
                       max_bytes=1_000_000)
    layout = layout_for(deployment_url)
    for i in range(24):  # spread over every shard (and master) of a cluster
        await post(http, (a, b)[i % 2], chat(f"question {i}"),
                   headers={"X-Cache-Namespace": "team-a" if i % 3 else "team-b"})
    assert (await accounted(direct, layout)).entries == 24
    auth = {"Authorization": "Bearer tok"}
    async with http.delete(a.url + "/cache", json={"namespace": "team-b"}, headers=auth) as r:
        assert r.status == 200 and (await r.json())["deleted"] == 8
    assert (await accounted(direct, layout)).entries == 16
    _, h, _ = await post(http, b, chat("question 0"), headers={"X-Cache-Namespace": "team-b"})
    assert h["X-Cache"] == "MISS"
    async with http.delete(b.url + "/cache", json={"all": True}, headers=auth) as r:
        assert r.status == 200 and (await r.json())["deleted"] == 17
    left = await accounted(direct, layout)
    # only the change streams (which logged the deletes) are left
    assert (left.entry_bytes, left.entries) == (0, 0) and left.streams > 0
    assert (await reconcile_url(deployment_url)).clean


async def test_closing_a_cluster_client_while_it_learns_the_slot_map_closes_it(
        redis_cluster: Any) -> None:
    """redis-py's cluster aclose() is a no-op until the client is initialised; closing
    while the client is learning the slot map must still leave no connection open."""
    client = redis_client(redis_cluster.url, timeout=5.0)
    learning = asyncio.create_task(client.initialize())
    await asyncio.sleep(0)  # the client is now learning the slot map
    await close_client(client)
    await asyncio.gather(learning, return_exceptions=True)
    nodes = list(client.nodes_manager.nodes_cache.values())
    assert nodes, "the client learnt the slot map"
    assert not any(c.is_connected for node in nodes for c in node._connections)
