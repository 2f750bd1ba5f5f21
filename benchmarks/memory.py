"""Memory: what one cached request costs, by tier, beside its raw size.

A sidecar (in this process; nothing here is timed) in front of the fake upstream fills an
empty private Redis with ``--entries`` distinct real prompts, one request each, sent with
``X-Cache-Mode: exact`` so that a prompt close to an earlier one is stored, not answered
from it (the entry and its vector record are written either way). Then:

- per entry in Redis: ``MEMORY USAGE`` (key, value and Redis's own overhead) of the exact
  tier's entry keys and of the semantic tier's vector records (sampled, ``--sample``),
  and the growth of ``used_memory`` per request over the whole fill;
- per vector in the index: each index kind (flat, sq8, hnsw;
  :mod:`promptcache.cache.semantic.index`)
  built from the stored vectors, measured serialized, beside the bytes the index reports
  for itself (``nbytes``, what ``/stats`` shows);
- against the raw size: the request body the client sent plus the response body it got.

It also compares the byte budget's count with Redis's growth (:func:`budget_adherence`)
and ``promptcache plan``'s estimate with what was measured (:func:`plan_vs_measured`).

    promptcache bench memory [--prompts FILE] [--entries 2000] [--answer-words 150]
                             [--semantic true] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import faiss
import numpy as np
import redis
from aiohttp import web

from promptcache.benchmarks import plots
from promptcache.benchmarks.load import _bool
from promptcache.benchmarks.progress import add_quiet, progress
from promptcache.benchmarks.results import command, publish
from promptcache.benchmarks.workload import DEFAULT_PROMPTS, load_prompts
from promptcache.cache.protocols import Embedder
from promptcache.cache.redis.embedded import EmbeddedRedis
from promptcache.cache.redis.layout import KeyLayout
from promptcache.cache.semantic.index import make_index
from promptcache.cache.semantic.record import VectorRecord
from promptcache.server.app import create_app
from promptcache.server.config import Settings
from promptcache.server.state import SIDECAR
from promptcache.testing import running_fake_upstream

CHAT = "/v1/chat/completions"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", default=DEFAULT_PROMPTS, metavar="FILE",
                   help=f"JSON lines with a 'prompt' field (default: {DEFAULT_PROMPTS})")
    p.add_argument("--entries", type=int, metavar="N", default=2000,
                   help="distinct prompts cached (2000)")
    p.add_argument("--max-chars", type=int, metavar="N", default=900,
                   help="longest prompt taken from the file (default 900 characters: "
                        "longer ones may pass the model's window and be cached exactly only)")
    p.add_argument("--answer-words", type=int, metavar="N", default=150,
                   help="filler words in each fake answer (default 150)")
    p.add_argument("--semantic", type=_bool, default=True, metavar="BOOL",
                   help="the semantic tier on (default true): vector records and the index")
    p.add_argument("--kinds", nargs="+", metavar="KIND", default=["flat", "sq8", "hnsw"],
                   help="index kinds to size (default: flat sq8 hnsw)")
    p.add_argument("--sample", type=int, metavar="N", default=1000,
                   help="keys per tier measured with MEMORY USAGE (default 1000)")
    p.add_argument("--out", default="bench-results", metavar="DIR",
                   help="directory for memory.json")
    add_quiet(p)


async def _fill(settings: Settings, redis_url: str, embedder: Embedder | None,
                prompts: list[str], quiet: bool) -> tuple[list[int], list[int], dict[str, Any]]:
    """Send each prompt once through an in-process sidecar; (request sizes, response sizes,
    the sidecar's /stats)."""
    app = create_app(replace(settings, redis_url=redis_url), embedder=embedder)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    sent, got = [0] * len(prompts), [0] * len(prompts)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            todo = iter(range(len(prompts)))
            with progress(len(prompts), "filling", quiet=quiet, unit="entry") as bar:

                async def worker() -> None:
                    for i in todo:
                        body = json.dumps({"model": "gpt-4o-mini", "temperature": 0,
                                           "messages": [{"role": "user",
                                                         "content": prompts[i]}]}).encode()
                        async with http.post(url + CHAT, data=body, headers={
                                "Content-Type": "application/json",
                                "Authorization": "Bearer sk-bench",
                                "X-Cache-Mode": "exact"}) as r:
                            answer = await r.read()
                            if r.status != 200:
                                raise RuntimeError(f"fill request {i}: HTTP {r.status}")
                        sent[i], got[i] = len(body), len(answer)
                        bar.update(1)

                await asyncio.gather(*(worker() for _ in range(8)))
            semantic = app[SIDECAR].semantic
            if semantic is not None:  # vectors are attached off the request path
                await semantic.drain()
            async with http.get(url + "/stats") as r:
                stats = await r.json()
    finally:
        await runner.cleanup()
    return sent, got, stats


def _usage(client: redis.Redis, pattern: str, sample: int) -> dict[str, Any]:
    """MEMORY USAGE and value length of up to ``sample`` keys matching ``pattern``."""
    keys = []
    for key in client.scan_iter(match=pattern, count=1000):
        keys.append(key)
    usage, values = [], []
    for key in keys[:sample]:
        usage.append(int(client.memory_usage(key, samples=0) or 0))
        values.append(int(client.strlen(key)))
    return {"keys": len(keys), "sampled": len(usage),
            "memory_usage_mean": round(statistics.fmean(usage), 1) if usage else None,
            "value_bytes_mean": round(statistics.fmean(values), 1) if values else None}


def _index_sizes(client: redis.Redis, kinds: list[str]) -> list[dict[str, Any]]:
    vectors = []
    for key in client.scan_iter(match=KeyLayout().patterns()[1], count=1000):
        raw = client.get(key)
        if isinstance(raw, bytes):
            vectors.append(VectorRecord.decode(raw).vector)
    if not vectors:
        return []
    data = np.stack(vectors).astype(np.float32)
    out = []
    for kind in kinds:
        index = make_index(kind, data.shape[1])
        index.add(np.arange(len(data)), data)
        serialized = faiss.serialize_index(index.index)  # type: ignore[attr-defined]
        out.append({"kind": kind, "vectors": len(data), "dim": int(data.shape[1]),
                    "bytes_per_vector": round(len(serialized) / len(data), 1),
                    "reported_bytes_per_vector": round(index.nbytes / len(data), 1),
                    "raw_float32_bytes": int(data.shape[1]) * 4})
    return out


def budget_adherence(measured: dict[str, Any]) -> dict[str, Any] | None:
    """How well the byte budget's count tracks the memory Redis really used for the fill
    (a budget is a memory bound only if it counts what Redis spends). Overshoot under a
    concurrent write flood is ``promptcache bench budget``'s figure."""
    cache = (measured.get("sidecar_stats") or {}).get("cache") or {}
    counted, entries = cache.get("bytes"), cache.get("entries")
    if not counted or not entries:
        return None
    growth = measured["redis"]["used_memory_growth_bytes"]
    return {"counted_bytes": counted, "counted_entries": entries,
            "counted_per_entry": round(counted / entries, 1),
            "used_memory_growth_over_counted": round(growth / counted, 3)}


def plan_vs_measured(measured: dict[str, Any]) -> dict[str, Any] | None:
    """What ``promptcache plan`` predicts for these entries at these sizes, against the
    measured Redis growth and index bytes (ratios measured / planned)."""
    from promptcache.benchmarks import plan

    per = measured["per_entry"]
    predicted = plan.plan(plan.Workload(
        entries=measured["entries"], avg_request_chars=round(measured["avg_prompt_chars"]),
        avg_response_bytes=round(per["raw_response_bytes"]), index="flat",
        semantic=measured["semantic"]))
    out: dict[str, Any] = {
        "planned_redis_bytes_per_entry": predicted.redis_bytes_per_entry,
        "redis_measured_over_planned": round(
            per["used_memory_growth_per_entry"] / predicted.redis_bytes_per_entry, 3)}
    index = measured.get("sidecar_index") or {}
    vectors = index.get("first_stage_vectors") or index.get("vectors")
    if vectors:  # the precise index (without a first stage) or the first stage's codes
        measured_index = (index.get("bytes", 0) + index.get("first_stage_bytes", 0)
                          + vectors * plan.REFS_BYTES_PER_VECTOR)
        planned = (predicted.index_bytes_per_node
                   + predicted.first_stage_bytes_per_vector * measured["entries"])
        out["planned_index_bytes"] = planned
        out["index_measured_over_planned"] = round(measured_index / max(planned, 1), 3)
    return out


def run(args: argparse.Namespace, embedder: Embedder | None = None) -> dict[str, Any]:
    prompts = load_prompts(args.prompts, max_chars=args.max_chars)[: args.entries]
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="pc-bench-") as tmp, \
            EmbeddedRedis(Path(tmp) / "redis", persistence=False) as store:
        client = redis.Redis.from_url(store.url, socket_timeout=30)
        try:
            before = int(client.info("memory")["used_memory"])

            async def fill() -> tuple[list[int], list[int], dict[str, Any]]:
                async with running_fake_upstream(answer_words=args.answer_words) as fake:
                    settings = replace(Settings(upstream=fake.url), semantic=args.semantic,
                                       redis_timeout=5.0, port=0)
                    return await _fill(settings, store.url, embedder, prompts, args.quiet)

            sent, got, stats = asyncio.run(fill())
            after = int(client.info("memory")["used_memory"])
            entries, vectors = KeyLayout().patterns()
            exact = _usage(client, entries, args.sample)
            vector = _usage(client, vectors, args.sample)
            index = _index_sizes(client, args.kinds) if args.semantic else []
            measured: dict[str, Any] = {
                "benchmark": "memory",
                "date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started)),
                "prompts": str(args.prompts), "entries": len(prompts),
                "avg_prompt_chars": statistics.fmean(len(t) for t in prompts),
                "answer_words": args.answer_words, "semantic": args.semantic,
                "redis": {"exact_entries": exact, "vector_records": vector,
                          "used_memory_growth_bytes": after - before},
                "index": index,
                "sidecar_stats": {"cache": stats.get("cache")},
                "sidecar_index": stats.get("semantic") and {
                    k: stats["semantic"][k] for k in ("vectors", "partitions", "bytes",
                                                      "first_stage_vectors",
                                                      "first_stage_bytes")
                    if k in stats["semantic"]},
            }
            raw_req = statistics.fmean(sent)
            raw_resp = statistics.fmean(got)
            per_entry = {
                "raw_request_bytes": round(raw_req, 1), "raw_response_bytes": round(raw_resp, 1),
                "exact_entry_bytes": exact["memory_usage_mean"],
                "vector_record_bytes": vector["memory_usage_mean"],
                "used_memory_growth_per_entry": round((after - before) / len(prompts), 1),
            }
            stored = (exact["memory_usage_mean"] or 0) + (vector["memory_usage_mean"] or 0)
            per_entry["stored_over_raw"] = round(stored / (raw_req + raw_resp), 3)
            per_entry["exact_over_raw"] = round((exact["memory_usage_mean"] or 0)
                                                / (raw_req + raw_resp), 3)
            measured["per_entry"] = per_entry
            measured["budget_adherence"] = budget_adherence(measured)
            measured["plan_vs_measured"] = plan_vs_measured(measured)
        finally:
            client.close()
    return measured


def report(r: dict[str, Any]) -> str:
    p = r["per_entry"]
    lines = [f"{r['entries']} entries ({'exact + semantic' if r['semantic'] else 'exact only'}"
             f", answers padded to {r['answer_words']} words)", "",
             "| per cached request | bytes |", "|---|---|",
             f"| raw request body | {p['raw_request_bytes']:.0f} |",
             f"| raw response body | {p['raw_response_bytes']:.0f} |",
             f"| exact entry in Redis (MEMORY USAGE) | {p['exact_entry_bytes']} |",
             f"| vector record in Redis (MEMORY USAGE) | {p['vector_record_bytes']} |",
             f"| Redis used_memory growth per entry | {p['used_memory_growth_per_entry']} |",
             "", f"stored / raw = {p['stored_over_raw']} (exact tier alone "
             f"{p['exact_over_raw']})"]
    if r["index"]:
        lines += ["", "| index kind | vectors | bytes/vector (serialized) | "
                  "bytes/vector (reported) |", "|---|---|---|---|"]
        for x in r["index"]:
            lines.append(f"| {x['kind']} | {x['vectors']} | {x['bytes_per_vector']} | "
                         f"{x['reported_bytes_per_vector']} |")
    if r.get("plan_vs_measured"):
        pv = r["plan_vs_measured"]
        lines += ["", f"promptcache plan: {pv['planned_redis_bytes_per_entry']} Redis bytes per "
                  f"entry planned, measured/planned {pv['redis_measured_over_planned']}"
                  + (f"; index measured/planned {pv['index_measured_over_planned']}"
                     if "index_measured_over_planned" in pv else "")]
    if r.get("budget_adherence"):
        ba = r["budget_adherence"]
        lines.append(f"byte budget: counts {ba['counted_per_entry']} bytes per entry; Redis "
                     f"used_memory grew {ba['used_memory_growth_over_counted']}x that "
                     "(overshoot under a flood: promptcache bench budget)")
    for name in ("budget_adherence", "plan_vs_measured"):
        if r[name] is None:
            lines.append(f"{name}: not measured")
    return "\n".join(lines)


def main(args: argparse.Namespace, embedder: Embedder | None = None) -> int:
    """``embedder`` lets a caller that already loaded the model (tests) share it."""
    result = run(args, embedder)
    result["plot"] = "memory.png"
    plots.memory_bars(result, Path(args.out) / "memory.png",
                      title=f"bench memory: {result['entries']} real prompts")
    result["command"] = command(args)
    publish(result, args.out, "memory", report(result))
    return 0
