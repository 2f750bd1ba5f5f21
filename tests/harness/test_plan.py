"""The capacity planner against a real filled cache: Redis bytes, index bytes, within 20%."""

from __future__ import annotations

import contextlib
import gzip
import json
import subprocess
import sys

import pytest
import redis.asyncio as aioredis

from promptcache.benchmarks import plan
from promptcache.cache import flow, request
from promptcache.cache.engine import open_engine
from promptcache.cache.entry import Answer
from promptcache.cache.options import EngineOptions
from promptcache.cache.protocols import Embedder
from promptcache.cache.redis.budget import BudgetStore, stream_share
from promptcache.cache.redis.layout import CLUSTER_SHARDS
from tests.support.paths import DATASETS
from tests.support.redis_servers import RedisServer

PROMPTS = DATASETS / "chat_prompts.jsonl.gz"
needs_prompts = pytest.mark.skipif(not PROMPTS.exists(), reason=f"{PROMPTS} is not there")


def _prompts(n: int) -> list[str]:
    out: list[str] = []
    with gzip.open(PROMPTS, "rt", encoding="utf-8") as lines:
        for line in lines:
            text = json.loads(line)["prompt"]
            # within the model's window (256 tokens): longer prompts are exact-only
            if 20 <= len(text) <= 900 and text not in out:
                out.append(text)
            if len(out) == n:
                break
    return out


def _answer(text: str) -> bytes:
    return json.dumps({
        "id": "chatcmpl-plan", "object": "chat.completion", "created": 1700000000,
        "model": "gpt-test", "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 100, "total_tokens": 110}}).encode()


@needs_prompts
@pytest.mark.slow
async def test_the_plan_matches_a_filled_cache_within_20_percent(
    fresh_redis: RedisServer, embedder: Embedder,
) -> None:
    """Real prompts as requests and real text as answers, stored through the engine (budget,
    vector records, index): Redis's used memory, the budget's count of the entries and the
    node's index bytes each land within 20% of what `plan` predicts for the same sizes (the
    change stream, counted in the budget too, is set apart: the plan gives its share, not
    what 600 writes leave in it)."""
    n = 600
    # prompts within the model's window (longer ones are cached exactly only)
    texts = [t for t in _prompts(3 * n)
             if embedder.count_tokens(t) <= embedder.max_tokens][:2 * n]  # type: ignore[attr-defined]
    assert len(texts) == 2 * n
    requests, answers = texts[:n], [_answer(t) for t in texts[n:]]
    url = fresh_redis.url
    client = aioredis.Redis.from_url(url)
    try:
        before = int((await client.info("memory"))["used_memory"])
        async with contextlib.AsyncExitStack() as stack:
            engine = await open_engine(EngineOptions(redis_url=url, max_bytes=10**9,
                                                     index_kind="flat"), stack,
                                       embedder=embedder)
            for prompt, answer in zip(requests, answers, strict=True):
                body = json.dumps({"model": "gpt-test", "temperature": 0,
                                   "messages": [{"role": "user", "content": prompt}]}).encode()
                req = request.prepare(engine, "chat", "/v1/chat/completions", body,
                                   credential="sk-plan")
                assert await flow.store(engine, req, Answer(200, answer, "application/json"))
            assert engine.semantic is not None
            await engine.semantic.drain()  # vectors are attached off the request path
            store = engine.cache.store
            assert isinstance(store, BudgetStore)
            usage = await store.usage()
            streams = sum([(await store.stream_totals(s))[0]
                           for s in range(store.layout.shards)])
            assert engine.semantic.first_stage is not None
            index_bytes = engine.semantic.index.nbytes + engine.semantic.first_stage.nbytes
            indexed = len(engine.semantic)
        used = int((await client.info("memory"))["used_memory"]) - before
    finally:
        await client.aclose()
    assert usage.entries == n and indexed == n and 0 < streams < usage.bytes
    predicted = plan.plan(plan.Workload(
        entries=n, avg_request_chars=round(sum(map(len, requests)) / n),
        avg_response_bytes=round(sum(map(len, answers)) / n), index="flat"))
    for name, measured, expected in (
        ("budget bytes of the entries", usage.bytes - streams, predicted.redis_bytes),
        ("redis used_memory", used, predicted.redis_bytes + streams),
        ("index bytes", index_bytes + n * plan.REFS_BYTES_PER_VECTOR,
         predicted.index_bytes_per_node + n * predicted.first_stage_bytes_per_vector),
    ):
        assert 0.8 <= measured / expected <= 1.2, (name, measured, expected)


def test_plan_scales_with_entries_and_nodes_and_counts_every_tier() -> None:
    small = plan.plan(plan.Workload(1000, 500, 2000, first_stage=False))
    big = plan.plan(plan.Workload(100_000, 500, 2000, nodes=3, first_stage=False))
    assert big.redis_bytes == 100 * small.redis_bytes
    assert big.index_kind == "hnsw" and small.index_kind == "flat"  # auto switches at 20k
    staged = plan.plan(plan.Workload(1_000_000, 500, 2000))  # the default: a first stage
    assert staged.first_stage_bytes_per_vector <= 64  # the bound, codes and ids
    assert staged.index_bytes_per_vector == plan.REFS_BYTES_PER_VECTOR  # no precise vectors
    assert staged.vector_record_bytes > small.vector_record_bytes  # the code rides along
    assert big.total_bytes == big.max_bytes + 3 * big.node_bytes
    for p in (small, big, plan.plan(plan.Workload(1000, 500, 2000, cluster=True))):
        # --max-bytes = the entries + each shard's change stream at the share it will get
        shards = CLUSTER_SHARDS if p.workload.cluster else 1
        assert p.max_bytes % shards == 0  # the even split loses nothing to rounding
        assert 0 <= p.max_bytes - (p.redis_bytes + p.stream_bytes) < shards
        assert p.stream_bytes == shards * stream_share(p.max_bytes // shards, shards)
    assert small.redis_bytes_per_entry == (small.entry_bytes + small.vector_record_bytes
                                           + small.key_bytes + small.bookkeeping_bytes)
    sq8 = plan.plan(plan.Workload(1000, 500, 2000, index="sq8", first_stage=False))
    assert sq8.index_bytes_per_vector < small.index_bytes_per_vector
    exact_only = plan.plan(plan.Workload(1000, 500, 2000, semantic=False))
    assert exact_only.vector_record_bytes == 0 and exact_only.index_bytes_per_node == 0
    assert exact_only.model_bytes_per_node == exact_only.model_runtime_bytes_per_node == 0
    assert exact_only.memo_bytes_per_node == 0
    # the process, and the exact-hit path's near cache (a sixteenth of a small budget)
    # and request memo
    assert exact_only.hot_path_bytes_per_node == (exact_only.max_bytes // 16
                                                  + plan.REQUEST_MEMO_BYTES)
    assert exact_only.node_bytes == plan.PROCESS_BYTES + exact_only.hot_path_bytes_per_node
    no_near = plan.plan(plan.Workload(1000, 500, 2000, semantic=False, near_cache_bytes=0))
    assert no_near.node_bytes == plan.PROCESS_BYTES + plan.REQUEST_MEMO_BYTES
    # a node with the tier: the process, the model and its runtime, the memo, the index
    # and the first stage, each as the planner states it
    assert small.node_bytes == (plan.PROCESS_BYTES + small.model_bytes_per_node
                                + small.model_runtime_bytes_per_node
                                + small.memo_bytes_per_node + small.index_bytes_per_node
                                + small.first_stage_bytes_per_node
                                + small.hot_path_bytes_per_node)
    smaller_memo = plan.plan(plan.Workload(1000, 500, 2000, first_stage=False,
                                           memo_bytes=1 << 20))
    assert small.node_bytes - smaller_memo.node_bytes == plan.MEMO_BYTES - (1 << 20)
    compressed = plan.plan(plan.Workload(1000, 500, 20_000))
    assert compressed.entry_bytes < 0.6 * 20_000  # large bodies are stored deflated


def test_plan_command_prints_a_table_and_json() -> None:
    argv = [sys.executable, "-m", "promptcache", "plan", "--entries", "5000",
            "--avg-request-chars", "400", "--avg-response-bytes", "1500", "--nodes", "2"]
    table = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True)
    assert "Redis (all nodes together)" in table.stdout and "node total" in table.stdout
    out = subprocess.run([*argv, "--json"], capture_output=True, text=True, timeout=120,
                         check=True)
    data = json.loads(out.stdout)
    assert data["workload"]["nodes"] == 2 and data["redis_bytes"] > 5000 * 860
    bad = subprocess.run([*argv[:5], "-1", *argv[6:]], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and "must be positive" in bad.stderr
