"""Cascade bench: how much of MiniLM's work the first stage saves, and what it misses.

The first stage (:mod:`promptcache.cache.semantic.first_stage`: a static model distilled
from MiniLM, 256-bit sign codes, the ``k`` nearest codes within a Hamming distance) sits
in front of the precise model. A lookup it finds no candidate for is a miss without MiniLM;
otherwise MiniLM decides among what it found. Per data set, with the protocol of
``bench hitrate`` (fill an empty cache with every distinct ``a``, look up every ``b``;
verbatim repeats left to the exact tier):

(a) recall: the share of MiniLM's hits (its nearest cached entry at cosine >= 0.975,
    both texts inside its 256-token window) whose entry is among the first stage's
    candidates. Hits past the window (two long prompts sharing their first 256 tokens)
    are reported apart: MiniLM alone matches them on a prefix, which the length policy
    forbids, and the first stage (which reads the whole text) rightly drops most;
(b) skip: the share of lookups with no candidate, which never wait for MiniLM;
(c) cost: static embedding per text against MiniLM's, one text at a time and batched;
(d) index: search, add and remove p50/p99 at 100k and 1M codes in one scope (past 65,536
    codes a scope is an inverted file), the inverted file's agreement with a full scan,
    and bytes per vector.

Data: QQP (its calibration quarter chooses the operating point: the smallest distance
whose recall at k=8 reaches ``--choose-recall``, plus ``--margin`` bits; the held-out
split reports it, as in ``bench hitrate``), the GPTCache paraphrases, and novel chat
prompts (half cached, the other half looked up: real traffic, almost no hits). Index
sizes use synthetic codes from mixtures of two real static vectors. The machine may be
shared: times are p50/p99 of many runs, and every ratio pairs figures measured in the
same run.

    python -m benchmarks.cascade [--datasets ../shared/datasets] [--limit N]
        [--holdout 0.2] [--choose-recall 0.995] [--margin 4] [--sizes 100000 1000000]
        [--static-dir DIR] [--out bench-results] [--quiet]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from promptcache.benchmarks.pairs import (
    CALIBRATION,
    Pair,
    embed_texts,
    normalise,
    read_pairs,
    split,
)
from promptcache.benchmarks.progress import add_quiet, progress
from promptcache.benchmarks.results import command, publish
from promptcache.cache.semantic.first_stage import (
    CODE_BYTES,
    DEFAULT_K,
    DEFAULT_MAX_DISTANCE,
    FirstStage,
    StaticEmbedder,
    binary_codes,
    ensure_static_model,
)

KS = (1, 2, 4, 8, 16, 32)
DISTANCES = tuple(range(30, 91, 2))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--datasets", default="../shared/datasets",
                   help="directory with qqp_pairs, gptcache_mock_pairs and chat_prompts")
    p.add_argument("--limit", type=int, default=None,
                   help="read only the first N pairs (prompts) of each data set")
    p.add_argument("--holdout", type=float, default=0.2, help="QQP held-out share (0.2)")
    p.add_argument("--threshold", type=float, default=0.975,
                   help="MiniLM's similarity threshold whose hits are counted (0.975)")
    p.add_argument("--choose-recall", type=float, default=0.995,
                   help="recall the operating point must reach on QQP calibration (0.995)")
    p.add_argument("--margin", type=int, default=4,
                   help="bits added to the chosen distance (default: 4)")
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000],
                   help="index sizes to time (default: 100000 1000000)")
    p.add_argument("--static-dir", default=None,
                   help="where the static model is distilled (default: the user cache dir)")
    p.add_argument("--out", default="bench-results", help="directory for cascade.json")
    add_quiet(p)


# --- data -----------------------------------------------------------------------------------

def _lookups(pairs: list[Pair]) -> tuple[list[str], list[str]]:
    """(cached, queries): every distinct ``a``; every ``b`` not verbatim a cached one."""
    cached = list(dict.fromkeys(p.a for p in pairs))
    exact = {normalise(a) for a in cached}
    return cached, [p.b for p in pairs if normalise(p.b) not in exact]


def _chat(path: Path, limit: int | None) -> tuple[list[str], list[str]]:
    """Half the distinct chat prompts cached (by a hash), the other half looked up."""
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        prompts = list(dict.fromkeys(json.loads(line)["prompt"] for line in lines
                                     if line.strip()))[:limit]
    unique = list({normalise(p): p for p in prompts}.values())
    cached = [p for p in unique if hashlib.sha1(p.encode()).digest()[0] % 2 == 0]
    return cached, [p for p in unique if hashlib.sha1(p.encode()).digest()[0] % 2 == 1]


def datasets(args: argparse.Namespace) -> dict[str, tuple[list[str], list[str]]]:
    root = Path(args.datasets)
    qqp = read_pairs(root / "qqp_pairs.jsonl.gz", args.limit)
    train, test = split(qqp, args.holdout)
    _, calibration = split(train, CALIBRATION, draw=1)
    return {"qqp_calibration": _lookups(calibration), "qqp_heldout": _lookups(test),
            "gptcache": _lookups(read_pairs(root / "gptcache_mock_pairs.jsonl.gz", args.limit)),
            "chat": _chat(root / "chat_prompts.jsonl.gz", args.limit)}


# --- (a) and (b): recall and skip -------------------------------------------------------------

def evaluate(name: str, cached: list[str], queries: list[str], precise: Any,
             static: StaticEmbedder, threshold: float, quiet: bool) -> dict[str, Any]:
    """MiniLM's nearest entry per query against the first stage's candidates."""
    import faiss

    vectors: dict[str, np.ndarray] = {}
    texts = sorted(set(cached) | set(queries), key=len)
    with progress(len(texts), f"MiniLM {name}", quiet=quiet, unit="text") as bar:
        for i in range(0, len(texts), 1024):
            vectors |= embed_texts(precise, texts[i:i + 1024])
            bar.update(len(texts[i:i + 1024]))
    index = faiss.IndexFlatIP(precise.dim)
    index.add(np.stack([vectors[t] for t in cached]))
    similarity, nearest = index.search(np.stack([vectors[t] for t in queries]), 1)
    hit = similarity[:, 0] >= threshold
    target = nearest[:, 0]
    window = precise.model.max_seq_length
    tokens = precise.model.tokenizer
    inside = np.array([bool(h) and max(len(tokens.tokenize(q)),
                                       len(tokens.tokenize(cached[t]))) + 2 <= window
                       for q, h, t in zip(queries, hit, target, strict=True)])

    stage = FirstStage(static, background=False)
    stage_codes = binary_codes(static.encode(cached))
    stage.add_codes(name, np.arange(len(cached)), stage_codes)
    query_codes = binary_codes(static.encode(queries))
    found_d = np.full((len(queries), max(KS)), 10**6)
    found_i = np.full((len(queries), max(KS)), -1)
    for n, code in enumerate(query_codes):
        row = stage.search_code(name, code, max(KS))
        found_i[n, :len(row)] = [i for i, _ in row]
        found_d[n, :len(row)] = [d for _, d in row]

    def recall(mask: np.ndarray, k: int, h: int) -> float | None:
        rows = np.flatnonzero(mask)
        if not len(rows):
            return None
        kept = (found_i[rows, :k] == target[rows, None]) & (found_d[rows, :k] <= h)
        return float(kept.any(axis=1).mean())

    curve = [{"max_distance": h, "skip": float((found_d[:, 0] > h).mean()),
              "skip_of_misses": float((found_d[~hit, 0] > h).mean()) if (~hit).any() else None,
              **{f"recall_k{k}": recall(inside, k, h) for k in KS},
              "recall_past_window_k8": recall(hit & ~inside, 8, h)}
             for h in DISTANCES]
    return {"cached": len(cached), "lookups": len(queries), "minilm_hits": int(inside.sum()),
            "minilm_hits_past_window": int((hit & ~inside).sum()), "curve": curve,
            "_real": {"cached": stage_codes, "queries": query_codes[inside],
                      "targets": target[inside]}}


def choose(calibration: dict[str, Any], target: float, margin: int, k: int = DEFAULT_K
           ) -> int:
    """The smallest distance whose recall at ``k`` reaches ``target`` on ``calibration``
    (the most lookups skip there), plus ``margin`` bits: near the edge a few hundred hits
    measure recall, one of them is worth a tenth of a point."""
    ok = [row["max_distance"] for row in calibration["curve"]
          if (row[f"recall_k{k}"] or 0) >= target]
    return (min(ok) if ok else max(DISTANCES)) + margin


def at(result: dict[str, Any], h: int, k: int = DEFAULT_K) -> dict[str, Any]:
    row = min(result["curve"], key=lambda r: abs(r["max_distance"] - h))
    return {"recall": row[f"recall_k{k}"], "skip": row["skip"],
            "skip_of_misses": row["skip_of_misses"],
            "recall_past_window": row["recall_past_window_k8"]}


# --- (c): cost per text -------------------------------------------------------------------------

def _per_text(encode: Any, texts: list[str], single: bool) -> float:
    """ms per text: one call a text, or one batched call for all (best of a warm run)."""
    encode(texts[:2])
    start = time.perf_counter()
    if single:
        for text in texts:
            encode([text])
    else:
        encode(texts)
    return (time.perf_counter() - start) * 1e3 / len(texts)


def cost(precise: Any, static: StaticEmbedder, sets: dict[str, tuple[list[str], list[str]]]
         ) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, n in (("qqp_heldout", 400), ("chat", 60)):
        texts = sets[name][1][::max(1, len(sets[name][1]) // n)][:n]  # spread over the file
        row = {"chars_mean": float(np.mean([len(t) for t in texts]))}
        for mode in ("single", "batched"):
            m = _per_text(precise.encode, texts, mode == "single")
            s = _per_text(static.encode, texts, mode == "single")
            row |= {f"minilm_ms_{mode}": m, f"static_ms_{mode}": s, f"speedup_{mode}": m / s}
        out[name] = row
    return out


# --- (d): the index at scale --------------------------------------------------------------------

def _percentiles(samples: list[float]) -> dict[str, float]:
    ms = np.array(samples) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def _synthetic(base: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` codes of mixtures of two real static vectors (text-like, all distinct)."""
    out = np.empty((n, CODE_BYTES), np.uint8)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        a, b = rng.integers(0, len(base), m), rng.integers(0, len(base), m)
        mix = base[a] + rng.uniform(0.5, 1.0, (m, 1)).astype(np.float32) * base[b]
        out[start:start + m] = binary_codes(mix)
    return out


def index_scale(base: np.ndarray, real: dict[str, Any], chat_codes: np.ndarray,
                sizes: list[int], quiet: bool) -> dict[str, Any]:
    """One scope of ``size`` codes: the QQP held-out cache's real codes among synthetic
    ones, indexed in one bulk add (as at a restart) and grown 10,000 at a time (rebuilt
    at each doubling). Its MiniLM hits are looked up (recall against a full scan, at k 8
    and 32: a dense scope crowds the nearest codes), then chat prompts (search time, and
    whether the inverted file's verdict is the full scan's); then single adds, re-adds
    and removes are timed."""
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    for size in sizes:
        synthetic = _synthetic(base, size - len(real["cached"]), rng)
        codes = np.concatenate([synthetic, real["cached"]])
        ids = np.arange(len(codes), dtype=np.int64) * 7919
        order = rng.permutation(len(codes))
        targets = ids[len(synthetic) + real["targets"]]
        flat = FirstStage(background=False, flat_limit=len(codes) + 1)
        flat.add_codes("s", ids, codes)
        stages: dict[str, FirstStage] = {}
        row: dict[str, Any] = {}
        for mode in ("bulk", "grown"):
            stage = stages[mode] = FirstStage(background=False)  # codes only: no embedder
            start = time.perf_counter()
            step = len(codes) if mode == "bulk" else 10_000
            for at in range(0, len(codes), step):
                stage.add_codes("s", ids[order[at:at + step]], codes[order[at:at + step]])
            row[f"{mode}_build_s"] = time.perf_counter() - start
            row[f"{mode}_lists"] = stage.stats()["first_stage_lists"]
        for k in (DEFAULT_K, 32):
            for name, index in (*stages.items(), ("full_scan", flat)):
                found = [int(t) in index.plausible_code("s", q, k)
                         for q, t in zip(real["queries"], targets, strict=True)]
                row[f"hit_recall_{name}_k{k}"] = float(np.mean(found)) if found else None
        stage = stages["grown"]
        times: dict[str, list[float]] = {"bulk": [], "grown": [], "full_scan": []}
        agree = 0
        with progress(len(chat_codes), f"search at {size}", quiet=quiet) as bar:
            for query in chat_codes:
                verdicts = []
                for name, index in (*stages.items(), ("full_scan", flat)):
                    t = time.perf_counter()
                    verdicts.append(bool(index.plausible_code("s", query)))
                    times[name].append(time.perf_counter() - t)
                agree += verdicts[1] == verdicts[2]
                bar.update()
        new_ids = np.arange(2000, dtype=np.int64) * 7919 + 1
        new_codes = _synthetic(base, 2000, rng)
        adds: list[float] = []
        readds: list[float] = []
        removes: list[float] = []
        for series, id_list in ((adds, new_ids), (readds, new_ids), (removes, ids[:2000])):
            for n, id_ in enumerate(id_list.tolist()):
                t = time.perf_counter()
                if series is removes:
                    stage.remove([id_])
                else:
                    stage.add_codes("s", np.array([id_]), new_codes[n:n + 1])
                series.append(time.perf_counter() - t)
        out[str(size)] = row | {
            "bytes_per_vector": stage.nbytes / len(stage),
            **{f"search_{name}": _percentiles(series) for name, series in times.items()},
            "add": _percentiles(adds), "readd": _percentiles(readds),
            "remove": _percentiles(removes),
            "verdict_agreement_with_full_scan": agree / max(len(chat_codes), 1)}
    return out


# --- the run ------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict[str, Any]:
    import faiss

    from promptcache.cache.semantic.embedding import load_embedder

    faiss.omp_set_num_threads(1)  # as the sidecar: one thread a search
    started = time.perf_counter()
    model_dir = ensure_static_model(args.static_dir)
    ensured = time.perf_counter() - started
    static = StaticEmbedder(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    precise = load_embedder("onnx", threads=0)
    sets = datasets(args)
    results = {name: evaluate(name, cached, queries, precise, static, args.threshold,
                              args.quiet) for name, (cached, queries) in sets.items()}
    chosen = choose(results["qqp_calibration"], args.choose_recall, args.margin)
    base = static.encode([t for cached, _ in sets.values() for t in cached])
    chat = binary_codes(static.encode(sets["chat"][1][:1000]))
    real = results["qqp_heldout"]["_real"]
    for r in results.values():
        r.pop("_real")
    return {
        "benchmark": "cascade", "date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
        "static_model": {"dir": str(model_dir), "distill_s": config.get("seconds"),
                         "ensure_s": ensured,
                         "bytes_on_disk": sum(f.stat().st_size for f in model_dir.iterdir())},
        "threshold": args.threshold, "choose_recall": args.choose_recall,
        "margin": args.margin,
        "chosen": {"k": DEFAULT_K, "max_distance": chosen,
                   "default_max_distance": DEFAULT_MAX_DISTANCE,
                   **{name: at(r, chosen) for name, r in results.items()}},
        "default": {name: at(r, DEFAULT_MAX_DISTANCE) for name, r in results.items()},
        "datasets": results, "cost": cost(precise, static, sets),
        "index": index_scale(base, real, chat, args.sizes, args.quiet),
        "total_s": time.perf_counter() - started,
    }


def report(result: dict[str, Any]) -> str:
    m = result["static_model"]
    lines = [f"static model: {m['bytes_on_disk'] / 1e6:.1f} MB on disk, distilled in "
             f"{m['distill_s']} s ({m['dir']})", ""]
    lines.append(f"{'data set':16} {'lookups':>8} {'hits':>5} {'past':>5}   "
                 f"recall@k8 / skip at max distance ...")
    shown = (40, 48, 52, 56, 60, 64, 70)
    for name, r in result["datasets"].items():
        rows = {row["max_distance"]: row for row in r["curve"]}
        cells = "  ".join(f"{h}: {_pct(rows[h]['recall_k8'])}/{rows[h]['skip']:.0%}"
                          for h in shown)
        lines.append(f"{name:16} {r['lookups']:8d} {r['minilm_hits']:5d} "
                     f"{r['minilm_hits_past_window']:5d}   {cells}")
    c = result["chosen"]
    lines.append("")
    lines.append(f"chosen on qqp_calibration (the smallest distance with recall >= "
                 f"{result['choose_recall']:.1%} at k=8, plus {result['margin']} bits): "
                 f"max distance {c['max_distance']} (default in the code: "
                 f"{c['default_max_distance']})")
    for name, point in result["default"].items():
        lines.append(f"  at the default {c['default_max_distance']}: {name:16} recall "
                     f"{_pct(point['recall'])}  skip {point['skip']:.1%}  (of misses "
                     f"{_pct(point['skip_of_misses'])}; past-window hits kept "
                     f"{_pct(point['recall_past_window'])})")
    lines.append("")
    for name, row in result["cost"].items():
        lines.append(f"cost {name} ({row['chars_mean']:.0f} chars): one text MiniLM "
                     f"{row['minilm_ms_single']:.2f} ms, static {row['static_ms_single']:.3f} ms "
                     f"({row['speedup_single']:.0f}x); batched {row['minilm_ms_batched']:.2f} / "
                     f"{row['static_ms_batched']:.3f} ms ({row['speedup_batched']:.0f}x)")
    lines.append("")
    for size, row in result["index"].items():
        lines.append(
            f"index {int(size):>9,}: search p50/p99 ms: grown {_ms(row['search_grown'])}, "
            f"bulk {_ms(row['search_bulk'])}, full scan {_ms(row['search_full_scan'])}; "
            f"add p99 {row['add']['p99_ms']:.3f}, re-add p99 {row['readd']['p99_ms']:.3f}, "
            f"remove p99 {row['remove']['p99_ms']:.3f} ms; {row['bytes_per_vector']:.1f} "
            f"B/vector")
        lines.append(
            f"{'':16} QQP hits kept at k=8/32: grown {_pct(row['hit_recall_grown_k8'])}/"
            f"{_pct(row['hit_recall_grown_k32'])}, bulk {_pct(row['hit_recall_bulk_k8'])}/"
            f"{_pct(row['hit_recall_bulk_k32'])}, full scan "
            f"{_pct(row['hit_recall_full_scan_k8'])}/{_pct(row['hit_recall_full_scan_k32'])}; "
            f"chat verdicts as the full scan's {row['verdict_agreement_with_full_scan']:.1%}; "
            f"built in {row['grown_build_s']:.0f} s grown ({row['grown_lists']} lists), "
            f"{row['bulk_build_s']:.0f} s bulk")
    lines.append(f"\ntotal {result['total_s']:.0f} s (shared machine: times are indicative)")
    return "\n".join(lines)


def _ms(p: dict[str, float]) -> str:
    return f"{p['p50_ms']:.3f}/{p['p99_ms']:.3f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def main(args: argparse.Namespace) -> int:
    result = run(args)
    result["command"] = command(args) or "python -m benchmarks.cascade " + " ".join(
        getattr(args, "raw_argv", []))
    publish(result, args.out, "cascade", report(result))
    return 0


if __name__ == "__main__":
    import sys

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parsed = parser.parse_args()
    parsed.raw_argv = sys.argv[1:]
    raise SystemExit(main(parsed))
