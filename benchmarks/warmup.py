"""Warm-up bench: how long a restarted node takes to load its semantic index from Redis.

A private Redis is filled with ``--vectors`` vector records (384-dimension float16 vectors
and real first-stage codes of short texts, spread over ``--scopes`` scopes) written
straight to their keys, as a node that stored them would leave them. Then a node starts
the way a sidecar does: :class:`IndexSync` marks the streams and loads the index in the
background (``start(wait=0)``), and the bench records

1. how long ``start`` took to return (what delays the first exact hit: the rest of the
   start-up does not wait for the index);
2. how long the load took until the node matched every stored entry (``warming`` false),
   with the first stage on (the default: codes and ids in the process, precise vectors
   left in Redis) and, with ``--precise``, with ``--first-stage false`` too (every precise
   vector loaded into the in-process FAISS index);
3. the process's index bytes per vector.

No model runs: the records name a stand-in model, so nothing is re-embedded. The load
generator and Redis share the host; say what else ran.

    python -m benchmarks.warmup [--vectors 100000] [--scopes 100] [--precise]
                                [--out bench-results]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from promptcache.benchmarks.results import command, publish
from promptcache.cache.exact import CachePolicy, ExactCache
from promptcache.cache.redis.budget import BudgetStore
from promptcache.cache.redis.client import close_client, redis_client
from promptcache.cache.redis.embedded import EmbeddedRedis
from promptcache.cache.redis.index_sync import IndexSync
from promptcache.cache.redis.layout import KeyLayout
from promptcache.cache.semantic.embedding import BatchingEmbedder
from promptcache.cache.semantic.first_stage import (
    FirstStage,
    StaticEmbedder,
    binary_codes,
    ensure_static_model,
)
from promptcache.cache.semantic.index import PartitionedIndex
from promptcache.cache.semantic.record import VectorRecord
from promptcache.cache.semantic.tier import REF_BYTES, SemanticCache

DIM = 384
MODEL = "bench-stand-in"
WRITE_BATCH = 5000


class StandIn:
    """An embedder that is never called: the records already carry their vectors."""

    dim = DIM
    name = MODEL

    def encode(self, texts: Any) -> np.ndarray:
        raise AssertionError("the warm-up must not embed anything")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vectors", type=int, default=100_000, help="records stored (100000)")
    p.add_argument("--scopes", type=int, default=100, help="scopes they spread over (100)")
    p.add_argument("--precise", action="store_true",
                   help="also load them without a first stage (every vector in FAISS)")
    p.add_argument("--out", default="bench-results/warmup", help="directory for warmup.json")


async def _fill(url: str, layout: KeyLayout, n: int, scopes: int, code_model: str,
                codes: np.ndarray) -> float:
    client = redis_client(url, timeout=60.0)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    try:
        for at in range(0, n, WRITE_BATCH):
            count = min(WRITE_BATCH, n - at)
            vectors = rng.normal(size=(count, DIM)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            pipe = client.pipeline(transaction=False)
            for k in range(count):
                i = at + k
                digest = hashlib.blake2b(str(i).encode(), digest_size=16).hexdigest()
                record = VectorRecord(f"scope-{i % scopes}", f"question number {i}",
                                      vectors[k], "", digest, MODEL,
                                      codes[i % len(codes)].tobytes(), code_model)
                pipe.set(layout.vector("", digest), record.encode())
            await pipe.execute()
    finally:
        await close_client(client)
    return time.perf_counter() - started


async def _load(url: str, layout: KeyLayout, first_stage: FirstStage | None) -> dict[str, Any]:
    client = redis_client(url, timeout=60.0)
    store = BudgetStore(client, layout, node="bench")
    semantic = SemanticCache(ExactCache(store, CachePolicy(op_timeout=60.0)),
                             BatchingEmbedder(StandIn()), PartitionedIndex(DIM, "auto"),
                             None, first_stage=first_stage)
    sync = IndexSync(client, semantic, store)
    try:
        started = time.perf_counter()
        await sync.start(wait=0)
        returned = time.perf_counter() - started
        run = asyncio.create_task(sync.run())
        await sync.warmed()
        loaded = time.perf_counter() - started
        await asyncio.to_thread(semantic.index.wait_idle)
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        vectors = len(semantic)
        return {"start_returned_s": round(returned, 4), "loaded_s": round(loaded, 2),
                "vectors": vectors, "per_second": round(vectors / loaded),
                "codes_computed": semantic.counts["codes_computed"],
                "reembedded": semantic.counts["reembedded"],
                # the codes (or vectors) and ids; the id -> entry map adds REF_BYTES each
                "index_bytes_per_vector": round(
                    (semantic.nbytes - vectors * REF_BYTES) / max(vectors, 1), 1),
                "map_bytes_per_vector": REF_BYTES}
    finally:
        await asyncio.to_thread(semantic.index.close)
        await close_client(client)


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    static = StaticEmbedder(ensure_static_model())
    codes = binary_codes(static.encode([f"question number {i}" for i in range(4096)]))
    layout = KeyLayout("pc:", 1)
    result: dict[str, Any] = {"benchmark": "warmup", "vectors": args.vectors,
                              "scopes": args.scopes}
    with tempfile.TemporaryDirectory(prefix="pc-bench-") as tmp, \
            EmbeddedRedis(Path(tmp) / "redis", persistence=False) as redis:
        result["fill_s"] = round(await _fill(redis.url, layout, args.vectors, args.scopes,
                                             static.name, codes), 1)
        result["first_stage"] = await _load(redis.url, layout, FirstStage(static))
        if args.precise:
            result["precise"] = await _load(redis.url, layout, None)
    return result


def report(r: dict[str, Any]) -> str:
    lines = [f"{r['vectors']:,} vector records in {r['scopes']} scopes (filled in "
             f"{r['fill_s']} s)", "",
             "| node | start returned s | index loaded s | vectors/s | bytes/vector |",
             "|---|---|---|---|---|"]
    for name in ("first_stage", "precise"):
        if name in r:
            x = r[name]
            lines.append(f"| {name.replace('_', ' ')} | {x['start_returned_s']} | "
                         f"{x['loaded_s']} | {x['per_second']:,} | "
                         f"{x['index_bytes_per_vector']} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    result = asyncio.run(_run(args))
    result["command"] = command(args) or (
        f"python -m benchmarks.warmup --vectors {args.vectors} --scopes {args.scopes}"
        + (" --precise" if args.precise else ""))
    publish(result, args.out, "warmup", report(result))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
