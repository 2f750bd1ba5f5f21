"""Savings on a real sidecar and fake upstream: hits count the stored answer's usage, priced
by the --prices table, by model, namespace and tenant; a follower's fallback counts
against; /metrics and /stats show them."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from promptcache.cache.savings import load_prices
from promptcache.testing import FakeUpstream
from tests.sidecar.test_sidecar_exact import CHAT, EMBEDDINGS, MESSAGES, post
from tests.support.paths import ROOT
from tests.support.sidecars import RunningSidecar, eventually, start_sidecar

PRICES = str(ROOT / "docs" / "prices.example.toml")
MINI = "gpt-4o-mini-2024-07-18"  # priced by the example's gpt-4o-mini (longest prefix)
TABLE = load_prices(PRICES)


@pytest.fixture
async def priced(fake: FakeUpstream, redis_url: str,
                 sidecars: list[RunningSidecar]) -> RunningSidecar:
    sc = await start_sidecar(fake.url, redis_url, prices=PRICES, flight_timeout=2.0)
    sidecars.append(sc)
    return sc


def chat(content: str, model: str = MINI) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}]}


async def stats(http: aiohttp.ClientSession, sc: RunningSidecar) -> dict[str, Any]:
    async with http.get(sc.url + "/stats") as r:
        assert r.status == 200
        return dict((await r.json())["savings"])


def cost(model: str, usage: dict[str, int]) -> float:
    price = TABLE.lookup(model)
    assert price is not None
    tokens_in = usage.get("prompt_tokens", usage.get("input_tokens", 0))
    tokens_out = usage.get("completion_tokens", usage.get("output_tokens", 0))
    return (tokens_in * price.input_per_million + tokens_out * price.output_per_million) / 1e6


async def test_hits_count_the_stored_usage_priced_by_model_namespace_and_tenant(
    priced: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession,
) -> None:
    alice = {"Authorization": "Bearer sk-alice", "X-Cache-Namespace": "team-a"}
    bob = {"Authorization": "Bearer sk-bob"}
    _, miss, body = await post(http, priced, chat("What is a cache?"), headers=alice)
    usage = json.loads(body)["usage"]
    for _ in range(2):
        _, hit, _ = await post(http, priced, chat("What is a cache?"), headers=alice)
        assert hit["X-Cache"] == "HIT"
    await post(http, priced, chat("Why?", "llama-3-8b"), headers=bob)
    _, hit, other = await post(http, priced, chat("Why?", "llama-3-8b"), headers=bob)
    assert hit["X-Cache"] == "HIT" and fake.calls[CHAT] == 2
    llama = json.loads(other)["usage"]

    s = await stats(http, priced)

    per_hit = cost(MINI, usage)
    assert s["hits_counted"] == 3 and s["currency"] == "USD"
    assert s["tokens_saved"] == {
        "input": 2 * usage["prompt_tokens"] + llama["prompt_tokens"],
        "output": 2 * usage["completion_tokens"] + llama["completion_tokens"]}
    assert s["cost_saved"] == pytest.approx(2 * per_hit, abs=1e-6) and per_hit > 0
    assert s["net_cost_saved"] == s["cost_saved"] and s["spent"]["calls"] == 0
    assert s["unpriced_models"] == ["llama-3-8b"]
    assert s["by_model"][MINI]["hits_counted"] == 2
    assert s["by_model"]["llama-3-8b"]["cost_saved"] == 0.0
    assert s["by_namespace"]["team-a"]["hits_counted"] == 2
    assert s["by_namespace"][""]["hits_counted"] == 1
    alice_tag = miss["X-Cache-Key"][-8:]  # the tenant's tag ends every key of its entries
    assert s["by_tenant"][alice_tag]["tokens_saved"]["input"] == 2 * usage["prompt_tokens"]
    assert len(s["by_tenant"]) == 2 and "sk-alice" not in json.dumps(s)


async def test_anthropic_and_embeddings_hits_count_their_own_usage_shapes(
    priced: RunningSidecar, http: aiohttp.ClientSession,
) -> None:
    message = {"model": "claude-3-5-haiku-20241022", "max_tokens": 64,
               "messages": [{"role": "user", "content": "Name three primes."}]}
    embed = {"model": "text-embedding-3-small", "input": "a sentence to embed"}
    _, _, m_body = await post(http, priced, message, MESSAGES)
    _, _, e_body = await post(http, priced, embed, EMBEDDINGS)
    assert (await post(http, priced, message, MESSAGES))[1]["X-Cache"] == "HIT"
    assert (await post(http, priced, embed, EMBEDDINGS))[1]["X-Cache"] == "HIT"
    m_usage, e_usage = json.loads(m_body)["usage"], json.loads(e_body)["usage"]

    s = await stats(http, priced)

    assert s["tokens_saved"] == {"input": m_usage["input_tokens"] + e_usage["prompt_tokens"],
                                 "output": m_usage["output_tokens"]}
    assert s["by_model"]["claude-3-5-haiku-20241022"]["cost_saved"] == pytest.approx(
        cost("claude-3-5-haiku-20241022", m_usage), abs=1e-6)
    assert s["unpriced_models"] == []


async def test_a_followers_fallback_upstream_counts_against_the_savings(
    priced: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession,
) -> None:
    """The leader gets an error, which is not shared: its follower, having waited, calls
    upstream itself, and that call's tokens are spent."""
    fake.fail_next(500, path=CHAT)
    fake.hold()
    leading = asyncio.create_task(post(http, priced, chat("shared question")))
    await fake.wait_for_requests(1, CHAT)
    following = asyncio.create_task(post(http, priced, chat("shared question")))
    flights = priced.state.flights
    await eventually(lambda: [flights.followers(k) for k in flights] == [1])
    fake.release()
    (status, _, _), (status2, _, body) = await asyncio.gather(leading, following)
    assert (status, status2) == (500, 200) and fake.calls[CHAT] == 2
    usage = json.loads(body)["usage"]
    await post(http, priced, chat("shared question"))  # a HIT on the follower's answer

    s = await stats(http, priced)

    assert s["spent"]["calls"] == 1
    assert s["spent"]["tokens"] == {"input": usage["prompt_tokens"],
                                    "output": usage["completion_tokens"]}
    assert s["spent"]["cost"] == pytest.approx(cost(MINI, usage), abs=1e-6)
    assert s["net_cost_saved"] == pytest.approx(s["cost_saved"] - s["spent"]["cost"],
                                                abs=1e-6)
    assert s["by_model"][MINI]["spent"]["calls"] == 1


async def test_metrics_show_tokens_and_cost_saved_without_tenants(
    priced: RunningSidecar, http: aiohttp.ClientSession,
) -> None:
    headers = {"X-Cache-Namespace": "team-a"}
    _, _, body = await post(http, priced, chat("metrics, please"), headers=headers)
    await post(http, priced, chat("metrics, please"), headers=headers)
    usage = json.loads(body)["usage"]
    async with http.get(priced.url + "/metrics") as r:
        text = await r.text()
    labels = f'model="{MINI}",namespace="team-a"'
    assert (f'promptcache_tokens_saved_total{{kind="input",{labels}}} '
            f'{float(usage["prompt_tokens"])}') in text
    assert (f'promptcache_tokens_saved_total{{kind="output",{labels}}} '
            f'{float(usage["completion_tokens"])}') in text
    line = next(x for x in text.splitlines()
                if x.startswith(f"promptcache_cost_saved_total{{{labels}}}"))
    assert float(line.split()[-1]) == pytest.approx(cost(MINI, usage))
    assert "# TYPE promptcache_tokens_saved_total counter" in text
    assert "# TYPE promptcache_cost_saved_total counter" in text
    assert "tenant" not in "".join(x for x in text.splitlines()
                                   if x.startswith("promptcache_") and "saved" in x)


async def test_without_a_price_table_stats_have_the_same_shape(
    sidecar: RunningSidecar, http: aiohttp.ClientSession,
) -> None:
    await post(http, sidecar, chat("no prices"))
    await post(http, sidecar, chat("no prices"))
    s = await stats(http, sidecar)
    assert set(s) == {"hits_counted", "tokens_saved", "cost_saved", "currency", "spent",
                      "net_cost_saved", "by_model", "by_namespace", "by_tenant",
                      "unpriced_models"}
    assert set(s["spent"]) == {"calls", "tokens", "cost"}
    assert s["hits_counted"] == 1 and s["tokens_saved"]["input"] > 0
    assert s["cost_saved"] == 0.0 and s["unpriced_models"] == [MINI]
    assert set(s["by_model"][MINI]) == {"hits_counted", "tokens_saved", "cost_saved",
                                        "spent", "net_cost_saved"}
