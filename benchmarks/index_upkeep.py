"""Index upkeep at scale: what a change costs the caller, and what the upkeep does with it.

One scope of ``--vectors`` unit vectors (dim 384, clustered like sentence embeddings),
``kind="auto"`` (flat, then HNSW past 20,000 vectors), filled with ``add_many``. Then, each
figure beside its baseline from the same run:

1. insert, re-add (a known id, a new vector) and remove: p50/p99/max of single-id calls
   (what the request path pays), beside the graph insert they no longer wait for (the
   upkeep's merge time per vector, measured while it drains those changes);
2. search (k=4, one query, one OpenMP thread as in the sidecar): p50/p99 and recall@1
   against an exact scan of the same vectors (the exact scan's p50 is the baseline);
3. memory: bytes per vector as the index reports them (``nbytes``) and the process's
   resident growth per vector over the fill;
4. the flat-to-HNSW switch at 20,000 (a separate scope): the longest single ``add`` and
   the longest search while the graph is built in the background, and the build time.

    python -m benchmarks.index_upkeep --vectors 100000 [--ops 2000] [--out bench-results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import faiss
import numpy as np

from promptcache.benchmarks.results import command, publish
from promptcache.cache.semantic.index import AUTO_HNSW_AT, PartitionedIndex

DIM = 384
CHUNK = 50_000


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vectors", type=int, default=100_000, help="vectors in the scope")
    p.add_argument("--ops", type=int, default=2000, help="inserts, re-adds, removes timed")
    p.add_argument("--searches", type=int, default=1000, help="searches timed")
    p.add_argument("--switch", choices=("true", "false"), default="true",
                   help="also time the flat-to-HNSW switch at 20,000 vectors")
    p.add_argument("--upkeep-threads", type=int, default=1,
                   help="OpenMP threads of the index's upkeep (default 1, as in the sidecar)")
    p.add_argument("--out", default="bench-results", help="directory for index_upkeep.json")


class Vectors:
    """Unit vectors around ``n / 50`` centres (intra-cluster cosine about 0.6), made in
    chunks from their own seeds, so any chunk can be made again instead of kept."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed = n, seed
        self.centres = np.random.default_rng(seed).normal(size=(max(1, n // 50), DIM))

    def chunk(self, at: int, size: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, at))
        centre = self.centres[rng.integers(0, len(self.centres), size)]
        v = (centre + 0.8 * rng.normal(size=(size, DIM))).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def chunks(self) -> Iterator[tuple[int, np.ndarray]]:
        for at in range(0, self.n, CHUNK):
            yield at, self.chunk(at, min(CHUNK, self.n - at))


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def percentiles(times: list[float]) -> dict[str, float]:
    ms = np.array(times) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 4),
            "p99_ms": round(float(np.percentile(ms, 99)), 4),
            "max_ms": round(float(ms.max()), 3), "n": len(times)}


def timed(call: Callable[[int], object], count: int) -> list[float]:
    """The duration of each of ``call(0)``, ..., ``call(count - 1)``."""
    out = []
    for i in range(count):
        t0 = time.perf_counter()
        call(i)
        out.append(time.perf_counter() - t0)
    return out


def fill(index: PartitionedIndex, data: Vectors, scope: str) -> float:
    started = time.perf_counter()
    for at, chunk in data.chunks():
        index.add_many(scope, np.arange(at, at + len(chunk)), chunk)
        print(json.dumps({"filled": at + len(chunk), "s": round(time.perf_counter() - started)}),
              flush=True)
    assert index.wait_idle()
    return time.perf_counter() - started


def changes(index: PartitionedIndex, data: Vectors, ops: int) -> dict[str, Any]:
    """Single-id inserts, re-adds and removes, then the upkeep's drain of them."""
    n = data.n
    rng = np.random.default_rng(1)
    new = Vectors(ops, seed=7).chunk(0, ops)
    known = rng.choice(n, 2 * ops, replace=False)
    replacement = Vectors(ops, seed=8).chunk(0, ops)
    insert = timed(lambda i: index.add("s", np.array([n + i]), new[i : i + 1]), ops)
    readd = timed(lambda i: index.add("s", known[i : i + 1], replacement[i : i + 1]), ops)
    remove = timed(lambda i: index.remove(known[ops + i : ops + i + 1]), ops)
    t0 = time.perf_counter()
    assert index.wait_idle()
    drain = time.perf_counter() - t0
    return {"insert": percentiles(insert), "readd": percentiles(readd),
            "remove": percentiles(remove),
            "upkeep_drain_s": round(drain, 3),
            # what an insert cost the caller before: one graph insert (here off the path)
            "graph_insert_ms": round(drain / (2 * ops) * 1000, 4)}


def searches(index: PartitionedIndex, data: Vectors, count: int) -> dict[str, Any]:
    """Near-duplicates of held vectors (before any change), against an exact scan."""
    rng = np.random.default_rng(2)
    everything = np.vstack([chunk for _, chunk in data.chunks()])
    rows = rng.choice(data.n, count, replace=False)
    queries = everything[rows] + rng.normal(scale=0.01, size=(count, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    found: list[int] = []
    times = timed(lambda i: found.append(index.search("s", queries[i], 4)[0][0]), count)
    exact_times, truth = [], []
    for q in queries[: min(50, count)]:  # the baseline: one exact scan of every vector
        t0 = time.perf_counter()
        truth.append(int(np.argmax(everything @ q)))
        exact_times.append(time.perf_counter() - t0)
    del everything
    hits = [f == t for f, t in zip(found, truth, strict=False)]
    return {"search": percentiles(times),
            "exact_scan": percentiles(exact_times),
            "recall_at_1": round(sum(hits) / len(hits), 4),
            "search_over_exact_p50": round(statistics.median(times)
                                           / statistics.median(exact_times), 5)}


def switch(upkeep_threads: int, threshold: int = AUTO_HNSW_AT) -> dict[str, Any]:
    """Cross the flat-to-HNSW threshold one add at a time, with searches running beside."""
    index = PartitionedIndex(DIM, "auto", hnsw_threshold=threshold,
                             upkeep_threads=upkeep_threads)
    data = Vectors(threshold + 2000, seed=3)
    start = data.chunk(0, threshold - 10)
    t0 = time.perf_counter()
    index.add_many("w", np.arange(threshold - 10), start)
    assert index.wait_idle()
    bulk = time.perf_counter() - t0
    part = dict(index.partitions())["w"]
    stop, search_times = threading.Event(), list[float]()

    def lookups() -> None:
        faiss.omp_set_num_threads(1)
        while not stop.is_set():
            q = start[len(search_times) % len(start)]
            s0 = time.perf_counter()
            index.search("w", q, 4)
            search_times.append(time.perf_counter() - s0)
            time.sleep(0.0005)

    searcher = threading.Thread(target=lookups)
    searcher.start()
    extra = data.chunk(threshold, 2000)
    def paced_add(i: int) -> None:
        time.sleep(0.001)  # a request rate, not a flood (the sleep is not timed)
        t = time.perf_counter()
        index.add("w", np.array([threshold + i]), extra[i : i + 1])
        adds.append(time.perf_counter() - t)

    adds: list[float] = []
    t0 = time.perf_counter()
    timed(paced_add, 2000)
    assert index.wait_idle()
    build = time.perf_counter() - t0
    stop.set()
    searcher.join()
    index.close()
    return {"bulk_add_many_s": round(bulk, 3), "vectors_at_bulk": threshold - 10,
            "kind_after": part.kind, "switch_and_drain_s": round(build, 2),
            "add_during_switch": percentiles(adds),
            "search_during_switch": percentiles(search_times)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    faiss.omp_set_num_threads(1)  # searches on this thread, one OpenMP thread as the sidecar
    result: dict[str, Any] = {
        "benchmark": "index_upkeep", "date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
        "vectors": args.vectors, "dim": DIM, "kind": "auto",
        "upkeep_threads": args.upkeep_threads, "note": "2 cores shared with other work",
    }
    if args.switch == "true":
        result["switch"] = switch(args.upkeep_threads)
        print(json.dumps(result["switch"]), flush=True)
    index = PartitionedIndex(DIM, "auto", upkeep_threads=args.upkeep_threads)
    data = Vectors(args.vectors)
    rss0 = rss_bytes()
    result["fill_s"] = round(fill(index, data, "s"), 1)
    result["kind_after_fill"] = dict(index.partitions())["s"].kind
    result["rss_per_vector"] = round((rss_bytes() - rss0) / args.vectors, 1)
    result["nbytes_per_vector"] = round(index.nbytes / len(index), 1)
    result["index_stats"] = index.stats()
    result.update(searches(index, data, args.searches))
    result.update(changes(index, data, args.ops))
    result["recount_matches"] = index.nbytes == index.recount_bytes()
    index.close()
    return result


def report(r: dict[str, Any]) -> str:
    lines = [f"{r['vectors']} vectors, dim {r['dim']}, kind auto ({r['kind_after_fill']} "
             f"after the fill, {r['fill_s']} s)", "",
             "| call | p50 ms | p99 ms | max ms |", "|---|---|---|---|"]
    for name in ("insert", "readd", "remove", "search", "exact_scan"):
        x = r[name]
        lines.append(f"| {name} | {x['p50_ms']} | {x['p99_ms']} | {x['max_ms']} |")
    lines += ["", f"graph insert (upkeep, off the request path): {r['graph_insert_ms']} ms a "
              f"vector; recall@1 {r['recall_at_1']}; search/exact p50 "
              f"{r['search_over_exact_p50']}",
              f"memory: {r['nbytes_per_vector']} bytes/vector reported, "
              f"{r['rss_per_vector']} bytes/vector resident growth"]
    if "switch" in r:
        s = r["switch"]
        lines.append(f"switch at 20,000: bulk add_many of {s['vectors_at_bulk']} in "
                     f"{s['bulk_add_many_s']} s; during the switch add p99 "
                     f"{s['add_during_switch']['p99_ms']} ms (max "
                     f"{s['add_during_switch']['max_ms']}), search p99 "
                     f"{s['search_during_switch']['p99_ms']} ms (max "
                     f"{s['search_during_switch']['max_ms']}); switch+drain "
                     f"{s['switch_and_drain_s']} s -> {s['kind_after']}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    result = run(args)
    result["command"] = command(args) or (
        f"python -m benchmarks.index_upkeep --vectors {args.vectors} --ops {args.ops} "
        f"--upkeep-threads {args.upkeep_threads}")
    publish(result, args.out, "index_upkeep", report(result))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
