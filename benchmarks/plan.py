"""The capacity planner: the memory each tier needs before anything is deployed.

``promptcache plan --entries N --avg-request-chars C --avg-response-bytes B [--index KIND]
[--nodes K]`` estimates, from what this code stores and constants measured on it:

- **Redis** (shared by every node): per entry, the encoded entry (the response body, zlib
  deflated when >= 1 KiB at :data:`COMPRESSION` of its size, the ratio measured on real chat
  text), the vector record (the final user message, 384 float16, scope and ids), both key
  names, and :data:`~promptcache.cache.redis.budget.ENTRY_OVERHEAD_BYTES` of Redis bookkeeping
  (dict entries, LRU/expiry/size members, allocator rounding). ``--max-bytes`` counts
  these and each shard's change stream, which takes its share of the budget
  (:func:`~promptcache.cache.redis.budget.stream_share`): the planned ``--max-bytes`` is the
  budget whose entries' part holds N entries. Redis's own ``maxmemory`` should leave room
  above it for client buffers and fragmentation (:data:`REDIS_HEADROOM`) and for Redis's
  own memory (:data:`REDIS_BASELINE_BYTES`).
- **Each node** (the sidecar process, as ``bench soak`` measures it under sustained traffic):
  the vector index (bytes per vector by kind, as ``/stats`` reports them, plus the
  per-vector map from ids to entries), the first stage (codes and static model), the
  embedding model (its weights file, mapped, plus ONNX Runtime and its packed copies of the
  weights), the embedding memo (``--embed-memo-bytes``, full under sustained traffic), and
  the rest of the process (Python, aiohttp, redis-py, FAISS, buffers) measured exact-only,
  and the exact-hit path's memos at their bounds: the near cache (``--near-cache-bytes``;
  automatic: 64 MiB or a sixteenth of the planned ``--max-bytes``) and the memo of prepared
  requests (:data:`~promptcache.cache.request.MEMO_BYTES`).
  ``node = process + model + model runtime + memo + index + first stage + hot path``.
- **Workers** (``--workers N``, as ``serve --workers N`` runs): every worker is a process of
  its own with its own engine, so each of those parts but the model's weights counts N
  times; the weights are a file the workers map read-only, whose pages they share (each
  worker's RSS shows them, the machine holds them once). ``worker`` is one worker's RSS,
  what its ``--max-rss`` applies to. The supervisor (about 25 MB) is left out.

The estimate is checked against a real filled cache in ``tests/harness/test_plan.py`` (within 20%).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Final

import numpy as np

from promptcache.cache.entry import COMPRESS_MIN_BYTES, Entry
from promptcache.cache.redis.budget import ENTRY_OVERHEAD_BYTES, stream_share
from promptcache.cache.redis.layout import CLUSTER_SHARDS, KeyLayout, namespace_id
from promptcache.cache.redis.near import near_cache_bytes
from promptcache.cache.request import MEMO_BYTES as REQUEST_MEMO_BYTES
from promptcache.cache.semantic.first_stage import CODE_BYTES, FirstStage
from promptcache.cache.semantic.index import AUTO_HNSW_AT, make_index
from promptcache.cache.semantic.record import VectorRecord
from promptcache.cache.semantic.tier import REF_BYTES

#: zlib (level 1) size / raw size of chat-completion JSON bodies >= 1 KiB whose content is
#: real chat text (the 769 such bodies made from ../shared/datasets/chat_prompts: mean 0.465,
#: median 0.484, p10-p90 0.36-0.55).
COMPRESSION: Final = 0.47
#: Dimensions of the default model's vectors (all-MiniLM-L6-v2).
DIM: Final = 384
#: The node's map from vector ids to entries (a dict entry and a tuple of two strings per
#: vector), measured with tracemalloc over 100k vectors: about 330 bytes.
REFS_BYTES_PER_VECTOR: Final = REF_BYTES
#: all-MiniLM-L6-v2's weights file as the ONNX backend maps it (float32): every page is
#: resident once traffic has used the layers and a wide enough vocabulary.
MODEL_BYTES: Final = 90_258_432
#: The first stage's static model in memory: 30,522 tokens x 256 float16 components.
STATIC_MODEL_BYTES: Final = 30_522 * 256 * 2
#: ONNX Runtime with the model's session, less the weights file: the runtime's code, its
#: packed copies of the matrix weights, the tokenizers and per-call buffers. Measured with
#: the embedder alone fed the 4,207 real chat prompts twice over (1-4 a batch, allocator
#: bounded as the sidecar bounds it): RSS 20 MB before the runtime was imported, 179 MB at
#: its plateau, less the 90 MB of weights: 69 MB.
MODEL_RUNTIME_BYTES: Final = 69_000_000
#: The sidecar process without the semantic tier, under sustained traffic (Python, aiohttp,
#: redis-py, FAISS, msgpack, buffers): ``bench soak --minutes 5 --semantic false``'s steady
#: state, 77.7 MB (11,294 requests, 8 clients).
PROCESS_BYTES: Final = 77_700_000
#: The embedding memo's default bound (``--embed-memo-bytes``).
MEMO_BYTES: Final = 16 << 20
#: Redis ``maxmemory`` over the planned ``--max-bytes``: client buffers (20-60 KB per open
#: connection) and allocator fragmentation.
REDIS_HEADROOM: Final = 1.25
#: Redis's own memory before anything is stored (``used_memory`` of an empty redis 6.2:
#: about 0.9 MB).
REDIS_BASELINE_BYTES: Final = 1 << 20


@dataclass(frozen=True)
class Workload:
    """What a deployment will hold: entries, their sizes, index kind, nodes."""

    entries: int
    avg_request_chars: int  # the final user message: what the vector record keeps
    avg_response_bytes: int  # the upstream's JSON answer
    index: str = "auto"
    nodes: int = 1
    semantic: bool = True
    cluster: bool = False
    compression: float = COMPRESSION
    first_stage: bool = True
    memo_bytes: int = MEMO_BYTES
    workers: int = 1  # processes per node (serve --workers)
    near_cache_bytes: int | None = None  # --near-cache-bytes; None: automatic


@dataclass(frozen=True)
class Plan:
    """The memory each tier needs for a workload, per entry and in total."""

    workload: Workload
    entry_bytes: int  # the encoded entry
    vector_record_bytes: int
    key_bytes: int  # both key names
    bookkeeping_bytes: int
    redis_bytes_per_entry: int
    redis_bytes: int  # what the entries take, all nodes together
    stream_bytes: int  # the change streams' share of the budget, all shards
    max_bytes: int  # the --max-bytes to set: entries and change streams
    redis_maxmemory: int  # a Redis maxmemory with headroom
    index_kind: str
    index_bytes_per_vector: int
    index_bytes_per_node: int
    model_bytes_per_node: int  # the weights file
    model_runtime_bytes_per_node: int  # ONNX Runtime, packed weights, tokenizers, buffers
    memo_bytes_per_node: int
    first_stage_bytes_per_vector: int  # its code, id and id map
    first_stage_bytes_per_node: int  # the codes and the static model
    process_bytes_per_node: int
    hot_path_bytes_per_node: int  # the near cache and the memo of prepared requests
    node_bytes: int  # process + model + runtime + memo + index + first stage + hot path
    total_bytes: int  # Redis + every node
    worker_bytes: int  # one worker process (its RSS, the mapped weights included)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def encoded_entry_bytes(response_bytes: int, compression: float = COMPRESSION) -> int:
    """The stored size of a response body of ``response_bytes`` (msgpack around the body)."""
    stored = (math.ceil(response_bytes * compression)
              if response_bytes >= COMPRESS_MIN_BYTES and compression < 1 else response_bytes)
    header = len(Entry(200, b"", "application/json", 1.7e9, "openai.chat").encode())
    return header + stored + (5 if stored >= 1 << 16 else 3 if stored >= 256 else 2)


def vector_record_bytes(request_chars: int, first_stage: bool = True) -> int:
    """A vector record for a final user message of ``request_chars`` (ASCII) characters
    (with its first-stage code when the first stage is on)."""
    code, code_model = (bytes(CODE_BYTES), "static-" + "0" * 16) if first_stage else (b"", "")
    record = VectorRecord("0" * 32, "x" * request_chars, np.zeros(DIM, np.float32),
                          namespace_id(""), "0" * 32, "all-MiniLM-L6-v2", code, code_model)
    return len(record.encode())


def first_stage_bytes_per_vector() -> int:
    """Bytes of one entry in the first stage (code, id, id map), as it reports them."""
    stage = FirstStage()
    probe = 4096
    codes = np.random.default_rng(0).integers(0, 256, (probe, CODE_BYTES), dtype=np.uint8)
    stage.add_codes("0" * 32, np.arange(probe, dtype=np.int64), codes)
    return math.ceil(stage.nbytes / probe)


def index_bytes_per_vector(kind: str, entries: int) -> tuple[str, int]:
    """(the kind used, FAISS bytes per vector as the index reports them + the id map)."""
    used = ("hnsw" if entries >= AUTO_HNSW_AT else "flat") if kind == "auto" else kind
    index = make_index(used, DIM)
    probe = 1000
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(probe, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index.add(np.arange(probe, dtype=np.int64), vectors)
    return used, math.ceil(index.nbytes / probe) + REFS_BYTES_PER_VECTOR


def budget_for(entry_bytes: int, shards: int) -> tuple[int, int]:
    """(the smallest ``--max-bytes`` whose entries' part holds ``entry_bytes`` over
    ``shards`` shards, the change streams' part of it)."""
    if entry_bytes <= 0:
        return 0, 0
    budget = max(entry_bytes, shards)
    for _ in range(128):  # the streams' share grows with the budget: find the fixed point
        # The store splits the budget evenly (``max_bytes // shards``): a multiple of the
        # shard count loses nothing to that rounding.
        budget = -(-budget // shards) * shards
        streams = shards * stream_share(budget // shards, shards)
        if budget - streams >= entry_bytes:
            break
        budget = entry_bytes + streams
    return budget, streams


def plan(w: Workload) -> Plan:
    if (w.entries < 0 or w.avg_request_chars < 0 or w.avg_response_bytes < 0 or w.nodes < 1
            or w.workers < 1):
        raise ValueError("entries, sizes, nodes and workers must be positive")
    layout = KeyLayout("pc:", CLUSTER_SHARDS if w.cluster else 1)
    digest = "0" * 32
    keys = len(layout.entry("", digest)) + (len(layout.vector("", digest)) if w.semantic else 0)
    entry = encoded_entry_bytes(w.avg_response_bytes, w.compression)
    record = vector_record_bytes(w.avg_request_chars, w.first_stage) if w.semantic else 0
    per_entry = entry + record + keys + ENTRY_OVERHEAD_BYTES
    staged = w.semantic and w.first_stage
    if staged:  # the first stage finds candidates; their precise vectors are read from Redis
        kind, per_vector = "none (first stage)", REFS_BYTES_PER_VECTOR
    elif w.semantic:
        kind, per_vector = index_bytes_per_vector(w.index, w.entries)
    else:
        kind, per_vector = "none", 0
    index = per_vector * w.entries
    model = MODEL_BYTES if w.semantic else 0  # mapped: the workers share its pages
    runtime = MODEL_RUNTIME_BYTES if w.semantic else 0
    memo = w.memo_bytes if w.semantic else 0
    fs_per_vector = first_stage_bytes_per_vector() if staged else 0
    fs_worker = fs_per_vector * w.entries + (STATIC_MODEL_BYTES if staged else 0)
    redis = per_entry * w.entries
    max_bytes, streams = budget_for(redis, layout.shards)
    hot = near_cache_bytes(w.near_cache_bytes, max_bytes) + REQUEST_MEMO_BYTES
    worker = index + model + runtime + memo + PROCESS_BYTES + fs_worker + hot
    n = w.workers  # each worker holds its own of every part but the mapped weights
    node = model + n * (index + runtime + memo + PROCESS_BYTES + fs_worker + hot)
    return Plan(w, entry, record, keys, ENTRY_OVERHEAD_BYTES, per_entry, redis, streams,
                max_bytes, math.ceil(max_bytes * REDIS_HEADROOM) + REDIS_BASELINE_BYTES,
                kind, per_vector, n * index, model, n * runtime, n * memo, fs_per_vector,
                n * fs_worker, n * PROCESS_BYTES, n * hot, node,
                max_bytes + node * w.nodes, worker)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    raise AssertionError


def report(p: Plan) -> str:
    w = p.workload
    lines = [
        f"{w.entries:,} entries, requests of {w.avg_request_chars:,} chars, responses of "
        f"{w.avg_response_bytes:,} B, {w.nodes} node(s)"
        + (f" of {w.workers} workers" if w.workers > 1 else "") + f", index {p.index_kind}"
        + (", Redis Cluster" if w.cluster else ""),
        "",
        "Redis (all nodes together)",
        f"  per entry          {_size(p.redis_bytes_per_entry):>12}   = entry "
        f"{p.entry_bytes:,} + vector record {p.vector_record_bytes:,} + keys {p.key_bytes:,}"
        f" + bookkeeping {p.bookkeeping_bytes:,}",
        f"  entries            {_size(p.redis_bytes):>12}",
        f"  change streams     {_size(p.stream_bytes):>12}   (their share of the budget)",
        f"  total              {_size(p.max_bytes):>12}   (--max-bytes {p.max_bytes})",
        f"  maxmemory          {_size(p.redis_maxmemory):>12}   (with headroom for client "
        "buffers and fragmentation)",
        "",
        "Each node",
        f"  index              {_size(p.index_bytes_per_node):>12}   "
        + (f"(the id map, {p.index_bytes_per_vector:,} B per vector: precise vectors "
           "stay in Redis)" if w.semantic and w.first_stage else
           f"({p.index_bytes_per_vector:,} B per vector; --index-max-bytes caps it)"),
        f"  model              {_size(p.model_bytes_per_node):>12}   (weights, mapped)",
        f"  model runtime      {_size(p.model_runtime_bytes_per_node):>12}   (ONNX Runtime, "
        "packed weights, tokenizers)",
        f"  memo               {_size(p.memo_bytes_per_node):>12}   (--embed-memo-bytes)",
        f"  first stage        {_size(p.first_stage_bytes_per_node):>12}   "
        f"({p.first_stage_bytes_per_vector:,} B per vector + the static model)",
        f"  process            {_size(p.process_bytes_per_node):>12}   (the sidecar "
        "without the semantic tier)",
        f"  hot path           {_size(p.hot_path_bytes_per_node):>12}   (--near-cache-bytes "
        "and the memo of prepared requests, at their bounds)",
        f"  node total         {_size(p.node_bytes):>12}"
        + (f"   (every line but the model for each of {w.workers} workers; one worker "
           f"{_size(p.worker_bytes)}, what its --max-rss applies to)" if w.workers > 1 else ""),
        "",
        f"Deployment total     {_size(p.total_bytes):>12}",
    ]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--entries", type=int, required=True, help="entries to hold")
    p.add_argument("--avg-request-chars", type=int, required=True,
                   help="mean length of the final user message (what the semantic tier keeps)")
    p.add_argument("--avg-response-bytes", type=int, required=True,
                   help="mean size of the upstream's JSON answer")
    p.add_argument("--index", default="auto", choices=("auto", "flat", "sq8", "hnsw"),
                   help="vector index kind (default auto: flat, HNSW from 20k vectors)")
    p.add_argument("--nodes", type=int, default=1, help="sidecars (default 1)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes per sidecar (serve --workers): each holds its own index, "
                   "model runtime, memo, first stage and process; the model's mapped weights "
                   "are shared (default 1)")
    p.add_argument("--no-semantic", action="store_true",
                   help="exact tier only: no vector records, index or model")
    p.add_argument("--cluster", action="store_true", help="keys carry cluster hash tags")
    p.add_argument("--no-first-stage", action="store_true",
                   help="the sidecar runs with --first-stage false")
    p.add_argument("--embed-memo-bytes", type=int, default=MEMO_BYTES,
                   help=f"the sidecar's --embed-memo-bytes (default {MEMO_BYTES})")
    p.add_argument("--near-cache-bytes", type=int, default=None,
                   help="the sidecar's --near-cache-bytes (default: automatic, 64 MiB or a "
                   "sixteenth of the planned --max-bytes)")
    p.add_argument("--compression", type=float, default=COMPRESSION,
                   help=f"stored/raw size of response bodies >= 1 KiB (default {COMPRESSION}, "
                   "measured on real chat text)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def main(args: argparse.Namespace) -> int:
    try:
        p = plan(Workload(args.entries, args.avg_request_chars, args.avg_response_bytes,
                          args.index, args.nodes, not args.no_semantic, args.cluster,
                          args.compression, not args.no_first_stage, args.embed_memo_bytes,
                          args.workers, args.near_cache_bytes))
    except ValueError as exc:
        raise SystemExit(f"promptcache plan: {exc}") from exc
    print(json.dumps(p.as_dict(), indent=1) if args.json else report(p))
    return 0
