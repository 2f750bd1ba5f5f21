"""``promptcache fit``: fitting the verifier's model (and the embedder) on labelled pairs.

Users run the same fitting on their own labelled traffic as the shipped default came from::

    promptcache fit --pairs FILE [--limit N] [--holdout 0.2] [--out PATH]
    promptcache fit --pairs FILE --cross-encoder --budget 900 --out DIR

``FILE`` is JSON lines (gzip or plain) of ``{"a", "b", "label"}``; label 1 means one answer
serves both prompts. A deterministic ``--holdout`` share of the pairs (by a hash of the pair,
the same split ``promptcache bench hitrate`` reports on) is never looked at. The rest is
replayed through the cache protocol (every distinct ``a`` cached, every ``b`` looked up
against its nearest neighbour, in caches the size of the held-out split), so the model
learns from the candidates a cache really sees: label 1 and the pair's own ``a`` is a
positive, anything else a negative. A quarter of those lookups is kept aside to choose the
operating point: the cosine threshold and the model threshold with the best hit rate at a
false-hit rate of at most ``--target-fhr``. The rule
checks alone get an operating point the same way; unless the model's hit rate beats theirs
by 5% (or ``--keep-model``), the fit writes ``kind: rules`` with the rules' threshold, as a
model that does not earn its place should not run.

Two kinds of model:

- ``linear`` (default): logistic regression over cheap features (similarity, word and
  content-word overlap, unmatched content words, length ratio, question words, the rule
  flags), written as a small JSON file. Scoring costs about 0.1 ms a pair.
- ``cross-encoder`` (``--cross-encoder``): the bundled all-MiniLM-L6-v2 weights fine-tuned as a
  pair classifier for ``--budget`` seconds on the CPU, saved as a directory that
  ``VerifierConfig(model=DIR)`` or ``--verifier-model DIR`` loads. One forward pass per pair.

The scorers that run these models at lookup time are :mod:`promptcache.cache.semantic.scorers`;
the training loops (torch, imported when called) are :mod:`.training`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from promptcache.benchmarks.pairs import (
    CALIBRATION,
    MIN_GAIN,
    embed_texts,
    operating_point,
    read_pairs,
    sharded_lookups,
    split,
)
from promptcache.benchmarks.training import train_cross_encoder, train_embedder
from promptcache.cache.errors import ConfigError
from promptcache.cache.semantic.rules import rule_flags
from promptcache.cache.semantic.scorers import (
    FEATURES,
    CrossEncoderScorer,
    LinearScorer,
    pair_features,
)


def fit_linear(x: np.ndarray, y: np.ndarray, *, l2: float = 1e-3, steps: int = 500
               ) -> dict[str, Any]:
    """L2-regularised logistic regression by full-batch L-BFGS (torch; deterministic)."""
    import torch

    mean, scale = x.mean(0), x.std(0)
    scale[scale < 1e-9] = 1.0
    xt = torch.tensor((x - mean) / scale, dtype=torch.float64)
    yt = torch.tensor(y, dtype=torch.float64)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt)
        loss = loss + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return {"kind": "linear", "features": list(FEATURES), "mean": _round(mean),
            "scale": _round(scale), "weights": _round(w.detach().numpy()),
            "bias": round(float(b.detach()[0]), 6)}


def _round(values: np.ndarray) -> list[float]:
    return [round(float(v), 6) for v in values]


# --- the command ---------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pairs", required=True, help="JSON lines of {a, b, label} (gzip or plain)")
    p.add_argument("--limit", type=int, default=None, help="read only the first N pairs")
    p.add_argument("--holdout", type=float, default=0.2,
                   help="share of pairs never used (bench hitrate reports on it; default 0.2)")
    p.add_argument("--out", default="verifier.json",
                   help="where to write: a JSON file (linear) or a directory (cross-encoder)")
    p.add_argument("--target-fhr", type=float, default=0.0075,
                   help="false-hit rate the operating point may reach on the calibration "
                   "lookups (default 0.0075: a margin under 1%% for sampling noise)")
    p.add_argument("--keep-model", action="store_true",
                   help="write the model even if it does not beat the rule checks alone on "
                   "the calibration lookups (by default the fit then writes kind: rules)")
    p.add_argument("--embedder", action="store_true",
                   help="also fine-tune the embedder's top layers (--tune-layers) for --budget "
                   "seconds; --out is then a directory: embedder.safetensors + verifier.json")
    p.add_argument("--tune-layers", type=int, default=2,
                   help="transformer layers the embedder fine-tuning changes (default 2)")
    p.add_argument("--embedding-tuning", default=None,
                   help="without --embedder: a tuning file the verifier is fitted for "
                   "(default: the bundled model as it is)")
    p.add_argument("--cross-encoder", action="store_true",
                   help="fine-tune the bundled MiniLM as a pair classifier (slow on a CPU)")
    p.add_argument("--budget", type=float, default=900,
                   help="embedder or cross-encoder training time in seconds (default 900)")
    p.add_argument("--max-length", type=int, default=96,
                   help="cross-encoder tokens per pair (default 96)")


def _log(message: str) -> None:
    print(f"fit: {message}", file=sys.stderr, flush=True)


def main(args: argparse.Namespace) -> int:
    from promptcache.cache.semantic.embedding import SentenceTransformerEmbedder, resolve_tuning

    started = time.perf_counter()
    train_pairs, test_pairs = split(read_pairs(args.pairs, args.limit), args.holdout)
    size = max(len(test_pairs), 1)  # caches the size of the held-out split
    tune_pairs, cal_pairs = split(train_pairs, CALIBRATION, draw=1)
    if not tune_pairs or not cal_pairs:
        raise ConfigError(f"{args.pairs}: too few pairs to fit and calibrate on")
    source = {"pairs": str(args.pairs), "limit": args.limit, "holdout": args.holdout,
              "target_fhr": args.target_fhr}
    out = Path(args.out)
    tuning: Path | None
    if args.embedder:
        base = SentenceTransformerEmbedder()
        base_vectors = embed_texts(base, (t for p in tune_pairs for t in (p.a, p.b)))
        del base
        tuning = out / "embedder.safetensors"
        meta = train_embedder(tune_pairs, sharded_lookups(tune_pairs, base_vectors, size),
                              tuning, budget=args.budget, layers=args.tune_layers)
        _log(f"wrote {tuning} (layers {meta['layers']}, {meta['pairs']} pairs)")
    else:
        tuning = resolve_tuning(args.embedding_tuning)
    embedder = SentenceTransformerEmbedder(tuning=tuning)
    vectors = embed_texts(embedder, (t for p in train_pairs for t in (p.a, p.b)))
    fit_on = sharded_lookups(tune_pairs, vectors, size)
    cal_on = sharded_lookups(cal_pairs, vectors, size)
    _log(f"{len(train_pairs)} training pairs, {len(fit_on.query)} lookups to fit on, "
         f"{len(cal_on.query)} to calibrate on ({time.perf_counter() - started:.0f}s)")
    if len(fit_on.query) < 10 or len(set(fit_on.true.tolist())) < 2:
        raise ConfigError(f"{args.pairs}: too few lookups with both outcomes to fit on")
    params: dict[str, Any]
    if args.cross_encoder:
        train_cross_encoder(tune_pairs, fit_on, out, budget=args.budget,
                             max_length=args.max_length)
        params = {"kind": "cross-encoder", "max_length": args.max_length, "threshold": 0.5}
        scorer: LinearScorer | CrossEncoderScorer = CrossEncoderScorer(out, params)
    else:
        x = np.array([pair_features(q, c, float(s)) for q, c, s in
                      zip(fit_on.query, fit_on.candidate, fit_on.similarity, strict=True)])
        params = fit_linear(x, fit_on.true.astype(np.float64))
        scorer = LinearScorer({**params, "threshold": 0.5})
    cal_items = list(zip(cal_on.query, cal_on.candidate, cal_on.similarity.tolist(),
                         strict=True))
    rules_ok = np.array([all(rule_flags(q, c).values()) for q, c, _ in cal_items], dtype=bool)
    model = operating_point(cal_on, np.array(scorer.score_batch(cal_items)) * rules_ok,
                            args.target_fhr)
    rules = operating_point(cal_on, rules_ok.astype(np.float64), args.target_fhr)
    keep = args.keep_model or model[2] > rules[2] * (1 + MIN_GAIN)
    sim_t, cut = (model[0], model[1]) if keep else (rules[0], None)
    params = {"command": "promptcache fit " + " ".join(_argv(args)), "fitted_on": source,
              "fit_seconds": round(time.perf_counter() - started, 1),
              "embedder": embedder.name,
              **(params if keep else {"kind": "rules"}),
              "similarity_threshold": sim_t,
              **({"threshold": round(cut, 6)} if cut is not None else {}),
              "calibration": {"lookups": len(cal_on.query), **{
                  name: {"hr": round(hr, 4), "fhr": round(fhr, 4), "similarity": t}
                  for name, (t, _, hr, fhr) in (("model", model), ("rules", rules))}}}
    directory = args.cross_encoder or args.embedder
    target = out / "verifier.json" if directory else out
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(params, indent=1) + "\n")
    for name, (t, c, hr, fhr) in (("model", model), ("rules alone", rules)):
        _log(f"calibration, {name}: HR {hr:.1%} at FHR {fhr:.2%} with similarity >= {t}"
             + (f" and model score >= {c:.4f}" if name == "model" else ""))
    kept = "the model" if keep else f"the rules alone (the model gained < {MIN_GAIN:.0%})"
    _log(f"kept {kept}; wrote {target} ({time.perf_counter() - started:.0f}s)")
    return 0


def _argv(args: argparse.Namespace) -> list[str]:
    words = [f"--pairs {args.pairs}"]
    if args.limit is not None:
        words.append(f"--limit {args.limit}")
    words.append(f"--holdout {args.holdout} --target-fhr {args.target_fhr}")
    if args.keep_model:
        words.append("--keep-model")
    if args.embedder:
        words.append(f"--embedder --budget {args.budget:g} --tune-layers {args.tune_layers}")
    elif args.embedding_tuning not in (None, "", "none"):
        words.append(f"--embedding-tuning {args.embedding_tuning}")
    if args.cross_encoder:
        words.append(f"--cross-encoder --budget {args.budget:g} --max-length {args.max_length}")
    return [*words, f"--out {args.out}"]
