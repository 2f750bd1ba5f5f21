"""Byte-budget benchmark: adherence under a write flood, and bytes stored per entry.

Several writers (each its own Redis client, as separate sidecars would be) insert entries
built from real prompts (``chat_prompts.jsonl.gz``: the request body, a response of similar
size, a 384-dim float16 vector record) as fast as they can into one private Redis, under
``--max-bytes``, while a poller reads the accounted total continuously. Reported:

- the largest total seen and the overshoot over the budget (the scripts make it <= 0);
- inserts and evictions per second during the flood;
- bytes counted per entry against the raw request+response bytes;
- Redis ``used_memory`` per entry (an unbounded fill of the same entries), against the
  bytes counted, which checks the per-entry bookkeeping constant;
- index sync latency: from one node's insert until another node's index holds the vector
  (p50/p99 over ``--sync-samples`` inserts, one at a time).

    promptcache bench budget [--prompts PATH] [--entries 4000] [--max-bytes 2000000]
                             [--writers 4] [--sync-samples 300] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from promptcache.benchmarks.results import publish
from promptcache.benchmarks.workload import DEFAULT_PROMPTS
from promptcache.cache.exact import CachePolicy, ExactCache
from promptcache.cache.keys import request_key
from promptcache.cache.redis.budget import ENTRY_OVERHEAD_BYTES, BudgetStore
from promptcache.cache.redis.client import close_client, redis_client
from promptcache.cache.redis.embedded import EmbeddedRedis
from promptcache.cache.redis.index_sync import IndexSync
from promptcache.cache.redis.layout import KeyLayout
from promptcache.cache.semantic.index import PartitionedIndex
from promptcache.cache.semantic.record import VectorRecord, vector_id
from promptcache.cache.semantic.tier import SemanticCache

DIM = 384


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", default=DEFAULT_PROMPTS, metavar="FILE",
                   help=f"JSON lines with a 'prompt' field (default: {DEFAULT_PROMPTS})")
    p.add_argument("--entries", type=int, default=4000, help="entries written (default: 4000)")
    p.add_argument("--max-bytes", type=int, default=2_000_000,
                   help="the budget during the flood, in bytes (default: 2000000)")
    p.add_argument("--writers", type=int, default=4,
                   help="concurrent writers, each with its own client (default: 4)")
    p.add_argument("--sync-samples", type=int, default=300,
                   help="inserts timed until another node indexes them (default: 300)")
    p.add_argument("--out", default="bench-results",
                   help="directory for budget.json (default: bench-results)")


def _items(path: str, n: int) -> list[tuple[bytes, bytes, str]]:
    """(request body, response body, prompt) for n entries (prompts reused if needed)."""
    prompts: list[str] = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        prompts = [json.loads(line)["prompt"] for line in f]
    out = []
    for i in range(n):
        prompt = prompts[i % len(prompts)]
        request = json.dumps({"model": "gpt-4o-mini", "temperature": 0, "n": i,
                              "messages": [{"role": "user", "content": prompt}]}).encode()
        answer = " ".join(reversed(prompt.split()))[:4000] or "ok"
        response = json.dumps({"id": f"chatcmpl-{i}", "object": "chat.completion",
                               "model": "gpt-4o-mini", "choices": [{"index": 0, "message": {
                                   "role": "assistant", "content": answer},
                                   "finish_reason": "stop"}]}).encode()
        out.append((request, response, prompt))
    return out


async def _fill(url: str, items: list[tuple[bytes, bytes, str]], max_bytes: int,
                writers: int) -> dict[str, Any]:
    layout = KeyLayout("bench:", 1)
    clients = [redis_client(url, timeout=10.0) for _ in range(writers + 1)]
    caches = [ExactCache(BudgetStore(c, layout, max_bytes=max_bytes, node=f"w{n}"),
                         CachePolicy(op_timeout=10.0))
              for n, c in enumerate(clients[:writers])]
    rng = np.random.default_rng(0)
    await clients[0].flushall()
    used0 = int((await clients[0].info("memory"))["used_memory"])
    seen: list[int] = []
    done = asyncio.Event()

    async def poll() -> None:
        while not done.is_set():
            seen.append(int(await clients[-1].hget(layout.shard_keys(0).meta, "bytes") or 0))
            await asyncio.sleep(0)

    async def write(w: int) -> None:
        cache = caches[w]
        for i in range(w, len(items), writers):
            request, response, prompt = items[i]
            key = request_key("/v1/chat/completions", json.loads(request), tenant="t")
            vector = rng.normal(size=DIM).astype(np.float32)
            record = VectorRecord("scope", prompt, vector / np.linalg.norm(vector), "",
                                  key.digest)
            await cache.put(key, cache.entry_for(200, response, "application/json", "chat"),
                            vector=record.encode())

    poller = asyncio.create_task(poll())
    started = time.perf_counter()
    await asyncio.gather(*(write(w) for w in range(writers)))
    elapsed = time.perf_counter() - started
    done.set()
    await poller
    usage = await caches[0].store.usage()
    used = int((await clients[0].info("memory"))["used_memory"]) - used0
    stream = int(await clients[0].memory_usage(layout.shard_keys(0).log) or 0)
    stream_counted, _ = await caches[0].store.stream_totals(0)
    evicted = sum(c.counts["evicted"] for c in caches)
    for c in clients:
        await close_client(c)
    return {"seconds": round(elapsed, 3), "max_seen": max(seen, default=0),
            "samples": len(seen), "entries": usage.entries, "bytes": usage.bytes,
            "evicted": evicted, "redis_used_memory_delta": used, "stream_bytes": stream,
            "stream_counted_bytes": stream_counted}


async def _sync_latency(url: str, samples: int) -> dict[str, float]:
    """Seconds from a writer's insert until a second node's IndexSync has indexed it."""
    layout = KeyLayout("bench:", 1)
    writer_client = redis_client(url, timeout=10.0)
    reader_client = redis_client(url, timeout=10.0)
    writer = BudgetStore(writer_client, layout, node="writer")
    reader = BudgetStore(reader_client, layout, node="reader")
    exact = ExactCache(reader)
    semantic = SemanticCache(exact, None, PartitionedIndex(DIM, "flat"), None)  # type: ignore[arg-type]
    sync = IndexSync(reader_client, semantic, reader, block_ms=1000)
    await writer_client.flushall()
    await sync.start()
    task = asyncio.create_task(sync.run())
    rng = np.random.default_rng(1)
    latencies = []
    try:
        for i in range(samples):
            digest = f"{i:032x}"
            vector = rng.normal(size=DIM).astype(np.float32)
            record = VectorRecord("scope", "text", vector / np.linalg.norm(vector), "", digest)
            started = time.perf_counter()
            await writer.put("", digest, b"entry", record.encode(), None)
            for _ in range(100_000):  # polled: the index has no change notification
                if vector_id(digest) in semantic.index:
                    break
                await asyncio.sleep(0.0001)
            else:
                raise RuntimeError(f"insert {i} did not reach the other node's index")
            latencies.append(time.perf_counter() - started)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await close_client(writer_client)
        await close_client(reader_client)
    latencies.sort()
    return {"p50_ms": round(latencies[len(latencies) // 2] * 1000, 3),
            "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 3),
            "max_ms": round(latencies[-1] * 1000, 3)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    items = _items(args.prompts, args.entries)
    raw = sum(len(r) + len(s) for r, s, _ in items) / len(items)
    with tempfile.TemporaryDirectory(prefix="pc-bench-budget-") as tmp:
        redis = EmbeddedRedis(Path(tmp) / "redis", persistence=False)
        url = redis.start()
        try:
            flood = asyncio.run(_fill(url, items, args.max_bytes, args.writers))
            fill = asyncio.run(_fill(url, items, 0, args.writers))
            sync = asyncio.run(_sync_latency(url, max(args.sync_samples, 1)))
        finally:
            redis.stop()
    # Per entry: the budget's count and Redis's growth, both without the change stream
    # (counted inside the budget, but not an entry's cost).
    counted = (fill["bytes"] - fill["stream_counted_bytes"]) / max(fill["entries"], 1)
    used = (fill["redis_used_memory_delta"] - fill["stream_bytes"]) / max(fill["entries"], 1)
    return {
        "entries": args.entries, "writers": args.writers, "max_bytes": args.max_bytes,
        "entry_overhead_bytes": ENTRY_OVERHEAD_BYTES,
        "flood": {**flood,
                  "overshoot_bytes": flood["max_seen"] - args.max_bytes,
                  "inserts_per_second": round(args.entries / flood["seconds"], 1),
                  "evictions_per_second": round(flood["evicted"] / flood["seconds"], 1)},
        "per_entry": {"raw_request_response_bytes": round(raw, 1),
                      "counted_bytes": round(counted, 1),
                      "redis_used_memory_bytes": round(used, 1),
                      "counted_over_raw": round(counted / raw, 3),
                      "used_memory_over_counted": round(used / counted, 3)},
        "unbounded_fill": fill,
        "sync_latency": sync,
    }


def report(r: dict[str, Any]) -> str:
    f, e = r["flood"], r["per_entry"]
    return "\n".join([
        f"write flood: {r['entries']} entries, {r['writers']} writers, budget "
        f"{r['max_bytes']} B",
        f"  largest total seen {f['max_seen']} B over {f['samples']} samples: overshoot "
        f"{f['overshoot_bytes']} B",
        f"  {f['inserts_per_second']} inserts/s, {f['evictions_per_second']} evictions/s",
        f"per entry: raw request+response {e['raw_request_response_bytes']} B, counted "
        f"{e['counted_bytes']} B ({e['counted_over_raw']}x), Redis used_memory "
        f"{e['redis_used_memory_bytes']} B ({e['used_memory_over_counted']}x of counted)",
        f"index sync: insert on one node -> in another node's index: p50 "
        f"{r['sync_latency']['p50_ms']} ms, p99 {r['sync_latency']['p99_ms']} ms, max "
        f"{r['sync_latency']['max_ms']} ms",
    ])


def main(args: argparse.Namespace) -> int:
    result = run(args)
    publish(result, args.out, "budget", report(result))
    return 0
