"""Speed of the semantic tier, each figure beside its baseline from the same run.

1. Throughput: semantic lookups per second through the sidecar (a real process, default
   settings) at concurrency 32, against the raw batched throughput of the same model on
   the same texts (``encode`` in batches of 64). Target: at least 0.8x.
2. Latency: p50 of a semantic hit at concurrency 1, against the p50 of embedding one text.
   Target: at most 2x.
3. Index: search p50 (one query, k=4) and measured bytes per vector (the serialized
   index) for each index kind, from 10k up to 1M vectors, with build time.

Every lookup text is distinct (a base prompt with a harmless variation: whitespace or
final punctuation), so no request is answered from the embedding memo.

    promptcache bench semantic --prompts ../shared/datasets/chat_prompts.jsonl.gz
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from promptcache.benchmarks.loadgen import closed_loop
from promptcache.benchmarks.procs import free_port, python_process
from promptcache.benchmarks.results import command, publish
from promptcache.benchmarks.workload import load_prompts
from promptcache.cache.protocols import Embedder
from promptcache.cache.redis.embedded import EmbeddedRedis
from promptcache.cache.semantic.embedding import load_embedder
from promptcache.cache.semantic.index import make_index

CHAT = "/v1/chat/completions"
VARIANTS = ("", " ", "  ", "?", " ?", "!", ".", "...", "\n", " :)", "??", "!!")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", required=True,
                   help="JSON lines (gzip or plain) with a 'prompt' field, e.g. "
                   "../shared/datasets/chat_prompts.jsonl.gz")
    p.add_argument("--base", type=int, default=200, help="distinct stored prompts")
    p.add_argument("--requests", type=int, default=1500, help="lookups at concurrency 32")
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000],
                   help="index sizes to time (default: 10000 100000 1000000)")
    p.add_argument("--kinds", nargs="+", default=["flat", "sq8", "hnsw"])
    p.add_argument("--out", default="bench-results", help="directory for semantic.json")


def base_prompts(path: str, n: int, max_chars: int = 300) -> list[str]:
    """The first ``n`` distinct printable prompts of 20 to ``max_chars`` characters, without
    final punctuation (the lookups add their own variation)."""
    seen: dict[str, None] = {}
    for prompt in load_prompts(path, max_chars=10**9, min_chars=0):
        text = prompt.rstrip("?!.: ")
        if 20 <= len(text) <= max_chars and text.isprintable():
            seen.setdefault(text)
            if len(seen) >= n:
                break
    return list(seen)


def body(text: str) -> bytes:
    return json.dumps({"model": "gpt-4o-mini", "temperature": 0,
                       "messages": [{"role": "user", "content": text}]}).encode()


def model_baseline(embedder: Embedder, texts: list[str]) -> dict[str, Any]:
    embedder.encode(texts[:64])  # warm up
    started = time.perf_counter()
    for i in range(0, len(texts), 64):
        embedder.encode(texts[i : i + 64])
    batched = len(texts) / (time.perf_counter() - started)
    singles = []
    for text in texts[:200]:
        t0 = time.perf_counter()
        embedder.encode([text])
        singles.append(time.perf_counter() - t0)
    return {"batched_texts_per_s": round(batched, 1),
            "single_text_p50_ms": round(statistics.median(singles) * 1000, 3)}


#: Requests without a credential are not cached (the sidecar's default): the bench has one.
HEADERS = {"Authorization": "Bearer sk-bench"}


async def sidecar_run(url: str, base: list[str], lookups: list[str], single: list[str]
                      ) -> dict[str, Any]:
    c1 = await closed_loop(url + CHAT, [body(t) for t in single], concurrency=1,
                           requests=len(single), warmup=0, headers=HEADERS)
    c32 = await closed_loop(url + CHAT, [body(t) for t in lookups], concurrency=32,
                            requests=len(lookups), warmup=0, headers=HEADERS)
    return {"c1": c1.summary(), "c32": c32.summary()}


def _wait_for_vectors(sidecar: str, within: float = 300.0) -> None:
    """Until the stored prompts have their vectors (computed off the request path, when
    the model is idle): the lookups measure semantic hits, not a backlog."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with urllib.request.urlopen(sidecar + "/stats") as r:
            if not json.load(r)["semantic"].get("vector_backlog"):
                return
        time.sleep(0.2)
    raise RuntimeError(f"the sidecar's vector backlog did not drain within {within:g} s")


def sidecar_figures(args: argparse.Namespace, base: list[str], lookups: list[str],
                    single: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pc-bench-") as tmp, \
            EmbeddedRedis(Path(tmp) / "redis", persistence=False) as store:
        up_port, sc_port = free_port(), free_port()
        upstream, sidecar = f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{sc_port}"
        with python_process(["-m", "promptcache.testing", "--port",
                             str(up_port)], upstream + "/v1/models"), \
                python_process(["-m", "promptcache", "serve", "--upstream", upstream,
                                "--redis-url", store.url, "--port", str(sc_port),
                                "--log-level", "warning"], sidecar + "/healthz"):
            for text in base:
                req = urllib.request.Request(sidecar + CHAT, data=body(text), method="POST",
                                             headers={"Content-Type": "application/json",
                                                      **HEADERS})
                urllib.request.urlopen(req).close()
            _wait_for_vectors(sidecar)
            result = asyncio.run(sidecar_run(sidecar, base, lookups, single))
            with urllib.request.urlopen(sidecar + "/stats") as r:
                result["stats"] = json.load(r)["semantic"]
    return result


def index_figures(vectors: np.ndarray, sizes: list[int], kinds: list[str]
                  ) -> list[dict[str, Any]]:
    """Vectors near the real embeddings (real ones plus noise), so the geometry is real."""
    rng = np.random.default_rng(0)
    out = []
    threads = faiss.omp_get_max_threads()
    for size in sizes:
        base = vectors[rng.integers(0, len(vectors), size)]
        data = base + rng.normal(scale=0.05, size=base.shape).astype(np.float32)
        data /= np.linalg.norm(data, axis=1, keepdims=True)
        queries = data[rng.integers(0, size, 200)] + rng.normal(
            scale=0.02, size=(200, data.shape[1])).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        exact = faiss.IndexFlatIP(data.shape[1])
        exact.add(data)
        _, truth = exact.search(queries, 1)
        for kind in kinds:
            index = make_index(kind, data.shape[1])
            faiss.omp_set_num_threads(threads)  # build with every core
            t0 = time.perf_counter()
            for i in range(0, size, 50_000):
                index.add(np.arange(i, min(i + 50_000, size)), data[i : i + 50_000])
            build = time.perf_counter() - t0
            faiss.omp_set_num_threads(1)  # search as the sidecar does: one thread a query
            times, found = [], []
            for q in queries:
                t0 = time.perf_counter()
                _, ids = index.search(q[None, :], 4)
                times.append(time.perf_counter() - t0)
                found.append(ids[0, 0])
            raw = faiss.serialize_index(index.index)  # type: ignore[attr-defined]
            out.append({
                "kind": kind, "vectors": size, "build_s": round(build, 2),
                "search_p50_ms": round(statistics.median(times) * 1000, 4),
                "search_p99_ms": round(float(np.percentile(times, 99)) * 1000, 4),
                "recall_at_1": round(float(np.mean(np.array(found) == truth[:, 0])), 4),
                "bytes_per_vector": round(len(raw) / size, 1),
            })
            print(json.dumps(out[-1]), flush=True)
            del index, raw
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    base = base_prompts(args.prompts, args.base)
    lookups = [b + v for v in VARIANTS[1:] for b in base][: args.requests]
    single = [b + "  ." for b in base][:200]
    assert len(set(lookups)) == len(lookups), "every lookup text must be distinct"
    embedder = load_embedder("onnx")  # as the sidecar runs it
    model = model_baseline(embedder, [b + " ;" for b in base] * 4)
    vectors = embedder.encode(base + lookups)
    del embedder
    sidecar = sidecar_figures(args, base, lookups, single)
    c32, c1 = sidecar["c32"], sidecar["c1"]
    return {
        "benchmark": "semantic",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
        "model": model,
        "sidecar": sidecar,
        "lookups_per_s_c32": c32["throughput_rps"],
        "throughput_ratio": round(c32["throughput_rps"] / model["batched_texts_per_s"], 3),
        "semantic_hit_p50_ms_c1": c1["p50_ms"],
        "latency_ratio": round(c1["p50_ms"] / model["single_text_p50_ms"], 3),
        "index": index_figures(vectors, args.sizes, args.kinds),
    }


def report(r: dict[str, Any]) -> str:
    lines = [
        f"model: {r['model']['batched_texts_per_s']} texts/s batched, "
        f"{r['model']['single_text_p50_ms']} ms p50 for one text",
        f"sidecar c=32: {r['lookups_per_s_c32']} lookups/s "
        f"({r['sidecar']['c32']['x_cache']}), ratio to raw batched model "
        f"= {r['throughput_ratio']}",
        f"sidecar c=1: semantic hit p50 {r['semantic_hit_p50_ms_c1']} ms "
        f"({r['sidecar']['c1']['x_cache']}), ratio to one embedding = {r['latency_ratio']}",
        "", "| kind | vectors | build s | search p50 ms | p99 ms | recall@1 | bytes/vector |",
        "|---|---|---|---|---|---|---|",
    ]
    for x in r["index"]:
        lines.append(f"| {x['kind']} | {x['vectors']} | {x['build_s']} | {x['search_p50_ms']} | "
                     f"{x['search_p99_ms']} | {x['recall_at_1']} | {x['bytes_per_vector']} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    result = run(args)
    result["command"] = command(args)
    publish(result, args.out, "semantic", report(result))
    return 0
