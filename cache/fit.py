"""Fitting the verifier's model on labelled pairs, and loading fitted models.

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
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from promptcache.cache.errors import ConfigError
from promptcache.cache.verify import RULES, STOPWORDS, rule_flags, words

if TYPE_CHECKING:
    from promptcache.cache.embed import SentenceTransformerEmbedder

_QUESTION_WORDS = frozenset(
    "what how why when where which who whom whose is are can do does did should would will "
    "could".split())
FEATURES = ("similarity", "word_jaccard", "content_jaccard", "unmatched_query",
            "unmatched_candidate", "length_ratio", "log_length", "first_word_equal",
            "question_words_equal", *(f"rule_{r}" for r in RULES))


# --- pairs and the cache protocol ----------------------------------------------------------

@dataclass(frozen=True)
class Pair:
    a: str
    b: str
    label: int


def read_pairs(path: str | Path, limit: int | None = None) -> list[Pair]:
    """JSON lines of {"a", "b", "label"}, gzip or plain; the first ``limit`` rows."""
    with Path(path).open("rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    opener: Callable[..., Any] = gzip.open if gzipped else open
    pairs: list[Pair] = []
    with opener(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            if limit is not None and len(pairs) >= limit:
                break
            if line.strip():
                row = json.loads(line)
                pairs.append(Pair(str(row["a"]), str(row["b"]), int(row["label"])))
    return pairs


def _digest(pair: Pair) -> bytes:
    return hashlib.sha1(f"{pair.a}\0{pair.b}".encode()).digest()


def in_holdout(pair: Pair, fraction: float, *, draw: int = 0) -> bool:
    """Deterministic: a hash of the pair puts it in the held-out share or not.

    ``draw`` 1 uses other bits of the hash than draw 0, so a split of a split (the
    calibration quarter of the training split) is independent of the first.
    """
    offset = (0, 12)[draw]
    return int.from_bytes(_digest(pair)[offset:offset + 8], "big") / 2**64 < fraction


def split(pairs: Sequence[Pair], holdout: float, *, draw: int = 0
          ) -> tuple[list[Pair], list[Pair]]:
    """(train, test): test is the held-out share."""
    return ([p for p in pairs if not in_holdout(p, holdout, draw=draw)],
            [p for p in pairs if in_holdout(p, holdout, draw=draw)])


def normalise(text: str) -> str:
    """What the exact tier treats as the same prompt: whitespace collapsed, casefolded."""
    return " ".join(text.split()).casefold()


@dataclass
class Lookups:
    """Each lookup of the protocol: query ``b``, its nearest cached ``a``, and the truth."""

    query: list[str]
    candidate: list[str]
    similarity: np.ndarray  # cosine to the nearest cached entry
    label: np.ndarray  # the pair's label
    own: np.ndarray  # the nearest entry is the pair's own ``a``

    @property
    def true(self) -> np.ndarray:
        return (self.label == 1) & self.own

    def subset(self, index: np.ndarray) -> Lookups:
        return Lookups([self.query[i] for i in index], [self.candidate[i] for i in index],
                       self.similarity[index], self.label[index], self.own[index])

    @staticmethod
    def concat(parts: Sequence[Lookups]) -> Lookups:
        return Lookups([q for p in parts for q in p.query],
                       [c for p in parts for c in p.candidate],
                       np.concatenate([p.similarity for p in parts]),
                       np.concatenate([p.label for p in parts]),
                       np.concatenate([p.own for p in parts]))


def cache_lookups(pairs: Sequence[Pair], vectors: dict[str, np.ndarray]) -> Lookups:
    """Fill an empty cache with every distinct ``a``, look up every ``b``.

    Verbatim repeats (``b`` equal to a cached ``a`` after collapsing whitespace and
    casefolding) are left out: the exact tier answers those.
    """
    import faiss

    cached = list(dict.fromkeys(p.a for p in pairs))
    exact = {normalise(a) for a in cached}
    kept = [p for p in pairs if normalise(p.b) not in exact]
    if not cached or not kept:
        empty = np.zeros(0)
        return Lookups([], [], empty, empty.astype(int), empty.astype(bool))
    matrix = np.stack([vectors[a] for a in cached]).astype(np.float32)
    index = faiss.IndexFlatIP(matrix.shape[1])
    index.add(matrix)
    sims, ids = index.search(np.stack([vectors[p.b] for p in kept]).astype(np.float32), 1)
    candidates = [cached[i] for i in ids[:, 0]]
    return Lookups(
        query=[p.b for p in kept], candidate=candidates,
        similarity=sims[:, 0].astype(np.float64),
        label=np.array([p.label for p in kept]),
        own=np.array([normalise(c) == normalise(p.a) for c, p in zip(candidates, kept,
                                                                     strict=True)]))


def sharded_lookups(pairs: Sequence[Pair], vectors: dict[str, np.ndarray], size: int
                    ) -> Lookups:
    """The protocol over shards of about ``size`` pairs (the size of the held-out split).

    A bigger cache holds more near neighbours, so at a given threshold it hits other entries
    more often (wrong and false hits). Replaying the training pairs as caches of the held-out
    split's size keeps rates chosen on them comparable with rates reported on it.
    """
    shards = max(1, round(len(pairs) / max(size, 1)))
    buckets: list[list[Pair]] = [[] for _ in range(shards)]
    for pair in pairs:
        buckets[int.from_bytes(_digest(pair)[8:16], "big") % shards].append(pair)
    return Lookups.concat([cache_lookups(b, vectors) for b in buckets])


def embed_texts(embedder: SentenceTransformerEmbedder, texts: Iterable[str],
                batch: int = 256) -> dict[str, np.ndarray]:
    """Each distinct text's vector, batched (shortest first, which pads least)."""
    unique = sorted(set(texts), key=len)
    out: dict[str, np.ndarray] = {}
    for i in range(0, len(unique), batch):
        chunk = unique[i:i + batch]
        out.update(zip(chunk, embedder.encode(chunk), strict=True))
    return out


# --- cheap features and the linear model ---------------------------------------------------

def pair_features(query: str, candidate: str, similarity: float) -> list[float]:
    """The features named in :data:`FEATURES`, in order."""
    wq, wc = words(query), words(candidate)
    sq, sc = set(wq), set(wc)
    cq, cc = sq - STOPWORDS, sc - STOPWORDS
    lq, lc = max(len(wq), 1), max(len(wc), 1)
    flags = rule_flags(query, candidate)
    return [similarity, len(sq & sc) / max(len(sq | sc), 1), len(cq & cc) / max(len(cq | cc), 1),
            float(len(cq - cc)), float(len(cc - cq)), min(lq, lc) / max(lq, lc),
            math.log(max(lq, lc)), float(bool(wq) and bool(wc) and wq[0] == wc[0]),
            float((sq & _QUESTION_WORDS) == (sc & _QUESTION_WORDS)),
            *(float(flags[r]) for r in RULES)]


class LinearScorer:
    """Logistic regression over :func:`pair_features`, from a JSON parameter file."""

    def __init__(self, params: dict[str, Any]) -> None:
        if tuple(params["features"]) != FEATURES:
            raise ConfigError("verifier parameters were fitted on other features; refit them")
        self.params = params
        self.mean = np.array(params["mean"], dtype=np.float64)
        self.scale = np.array(params["scale"], dtype=np.float64)
        self.weights = np.array(params["weights"], dtype=np.float64)
        self.bias = float(params["bias"])
        self.threshold = float(params["threshold"])

    def score_batch(self, items: Sequence[tuple[str, str, float]]) -> list[float]:
        if not items:
            return []
        x = np.array([pair_features(q, c, s) for q, c, s in items])
        # Row by row (no BLAS), so a pair scores the same alone or in any batch.
        z = (((x - self.mean) / self.scale) * self.weights).sum(axis=1) + self.bias
        return [float(v) for v in 1.0 / (1.0 + np.exp(-z))]


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


# --- the cross-encoder ---------------------------------------------------------------------

class CrossEncoderScorer:
    """A fine-tuned pair classifier in a directory (with its ``verifier.json``)."""

    def __init__(self, directory: Path, params: dict[str, Any]) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self._torch = torch
        self.params = params
        self.threshold = float(params["threshold"])
        self.max_length = int(params.get("max_length", 96))
        self.tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            str(directory), local_files_only=True).eval()

    def score_batch(self, items: Sequence[tuple[str, str, float]], batch: int = 128
                    ) -> list[float]:
        scores: list[float] = []
        with self._torch.inference_mode():
            for i in range(0, len(items), batch):
                chunk = items[i:i + batch]
                enc = self.tokenizer([q for q, _, _ in chunk], [c for _, c, _ in chunk],
                                     truncation=True, max_length=self.max_length,
                                     padding=True, return_tensors="pt")
                logits = self.model(**enc).logits[:, 0]
                scores += [float(v) for v in self._torch.sigmoid(logits)]
        return scores


def load_model(path: str | Path
               ) -> tuple[dict[str, Any], LinearScorer | CrossEncoderScorer | None]:
    """What ``promptcache fit`` wrote: a JSON file, or a directory holding ``verifier.json``.

    Returns the parameters and the model to score with; kind ``rules`` (the fit found no
    model that beat the rule checks alone) has none.
    """
    path = Path(path)
    directory = path if path.is_dir() else None
    try:
        params = json.loads((path / "verifier.json" if directory else path).read_text())
        kind = params.get("kind")
        if kind == "rules":
            return params, None
        if kind == "linear":
            return params, LinearScorer(params)
        if kind == "cross-encoder" and directory is not None:
            return params, CrossEncoderScorer(directory, params)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"verifier model {path}: {exc}") from exc
    raise ConfigError(f"verifier model {path}: not written by `promptcache fit`")


# --- choosing the operating point ------------------------------------------------------------

#: The share of the training split kept from every fitting step (the embedder's tuning and
#: the verifier's model) to choose the operating point on; bench hitrate chooses there too.
CALIBRATION = 0.25
SIMILARITY_GRID = np.round(np.arange(0.70, 0.9976, 0.0025), 4)
MIN_GAIN = 0.05  # a model must beat the rules alone by 5% (relative HR) to be worth running


def operating_point(lookups: Lookups, scores: np.ndarray, target_fhr: float
                    ) -> tuple[float, float, float, float]:
    """(similarity threshold, model threshold, HR, FHR) with the best HR at FHR <= target.

    ``scores`` are 0 for candidates the rules reject (they never hit).
    """
    n1 = max(int((lookups.label == 1).sum()), 1)
    n0 = max(int((lookups.label == 0).sum()), 1)
    cuts = np.unique(np.quantile(scores[scores > 0], np.linspace(0, 1, 201))) if (
        scores > 0).any() else np.array([1.0])
    best = (float(SIMILARITY_GRID[-1]), 1.0, 0.0, 0.0)
    for t in SIMILARITY_GRID:
        above = lookups.similarity >= t
        for cut in cuts:
            hit = above & (scores >= cut)
            fhr = int((hit & (lookups.label == 0)).sum()) / n0
            if fhr <= target_fhr:
                hr = int((hit & lookups.true).sum()) / n1
                if hr > best[2]:
                    best = (float(t), float(cut), hr, fhr)
                break  # higher cuts only lose hits at this similarity
    return best


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
    from promptcache.cache.embed import SentenceTransformerEmbedder, resolve_tuning

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
        _train_cross_encoder(tune_pairs, fit_on, out, budget=args.budget,
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


def _train_cross_encoder(pairs: Sequence[Pair], lookups: Lookups, out: Path, *,
                         budget: float, max_length: int, batch: int = 32, seed: int = 0
                         ) -> None:
    """Fine-tune the bundled MiniLM as a pair classifier for ``budget`` seconds."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from promptcache.cache.embed import default_model_path

    hf_logging.set_verbosity_error()  # "newly initialised classifier" is the point here
    rng = random.Random(seed)
    torch.manual_seed(seed)
    examples = [(p.a, p.b, float(p.label)) for p in pairs if normalise(p.a) != normalise(p.b)]
    examples += [(q, c, 0.0) for q, c, own in zip(lookups.query, lookups.candidate,
                                                  lookups.own, strict=True) if not own]
    base = str(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1,
                                                               local_files_only=True)
    model.bert.embeddings.requires_grad_(False)  # word embeddings: most weights, least gain
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=4e-5, weight_decay=0.01)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    start, step, seen, per_step = time.perf_counter(), 0, 0, 0.0
    while time.perf_counter() - start < budget:
        rng.shuffle(examples)
        for i in range(0, len(examples), batch):
            elapsed = time.perf_counter() - start
            if elapsed >= budget:
                break
            left = budget - elapsed  # linear decay to the end of the budget
            per_step = elapsed / step if step else 1.0
            for group in opt.param_groups:
                group["lr"] = 4e-5 * min(1.0, (step + 1) / 100) * min(1.0, left / (
                    0.5 * budget)) + 1e-7
            chunk = [(b, a, y) if rng.random() < 0.5 else (a, b, y)
                     for a, b, y in examples[i:i + batch]]
            enc = tokenizer([a for a, _, _ in chunk], [b for _, b, _ in chunk],
                            truncation=True, max_length=max_length, padding=True,
                            return_tensors="pt")
            loss = loss_fn(model(**enc).logits[:, 0], torch.tensor([y for *_, y in chunk]))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            opt.zero_grad()
            step, seen = step + 1, seen + len(chunk)
            if step % 100 == 0:
                _log(f"step {step}, {seen} pairs, {elapsed:.0f}s, loss {loss.item():.3f}")
    _log(f"trained {step} steps on {seen} pairs in {time.perf_counter() - start:.0f}s "
         f"({per_step:.2f}s per step)")
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def train_embedder(pairs: Sequence[Pair], lookups: Lookups, out: Path, *, budget: float,
                   layers: int, lr: float = 5e-5, batch: int = 64, max_length: int = 64,
                   seed: int = 0, base: str | Path | None = None) -> dict[str, str]:
    """Fine-tune the top ``layers`` transformer layers of the embedder for ``budget`` seconds.

    The loss is CoSENT (every label-1 pair of a batch should score a higher cosine than every
    label-0 pair), over the training pairs plus the lookups' wrong nearest neighbours as
    extra negatives: exactly the ordering a similarity threshold needs. Only the tuned
    layers are written (a few MB of safetensors), and loaded on top of the base model.
    """
    import torch
    from safetensors.torch import save_file
    from sentence_transformers import SentenceTransformer

    from promptcache.cache.embed import default_model_path

    rng = random.Random(seed)
    torch.manual_seed(seed)
    base_path = Path(base) if base else default_model_path()
    model = SentenceTransformer(str(base_path), device="cpu", local_files_only=True)
    model.max_seq_length = max_length
    encoder: Any = model[0].auto_model
    stack = encoder.encoder.layer
    if not 0 < layers <= len(stack):
        raise ConfigError(f"--tune-layers must be 1..{len(stack)}")
    model.requires_grad_(False)
    tuned = [f"encoder.layer.{i}." for i in range(len(stack) - layers, len(stack))]
    trainable = [p for n, p in encoder.named_parameters() if n.startswith(tuple(tuned))]
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.01)
    examples = [(p.a, p.b, p.label) for p in pairs if normalise(p.a) != normalise(p.b)]
    examples += [(q, c, 0) for q, c, own in zip(lookups.query, lookups.candidate, lookups.own,
                                                strict=True) if not own]

    def embed(texts: list[str]) -> torch.Tensor:
        features = model.tokenize(texts)
        return torch.nn.functional.normalize(model(features)["sentence_embedding"], dim=-1)

    model.train()
    start, step, seen = time.perf_counter(), 0, 0
    while time.perf_counter() - start < budget:
        rng.shuffle(examples)
        for i in range(0, len(examples) - batch + 1, batch):
            elapsed = time.perf_counter() - start
            if elapsed >= budget:
                break
            for group in opt.param_groups:  # warm up, then decay to the end of the budget
                group["lr"] = lr * min(1.0, (step + 1) / 50) * min(
                    1.0, (budget - elapsed) / (0.5 * budget)) + 1e-7
            chunk = examples[i:i + batch]
            cos = (embed([a for a, _, _ in chunk]) * embed([b for _, b, _ in chunk])).sum(-1)
            label = torch.tensor([y for *_, y in chunk])
            gap = (cos[None, :] - cos[:, None]) * 20.0  # gap[i, j] = cos_j - cos_i
            loss = torch.logsumexp(torch.cat([torch.zeros(1),
                                              gap[label[:, None] > label[None, :]]]), 0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step, seen = step + 1, seen + len(chunk)
            if step % 50 == 0:
                _log(f"step {step}, {seen} pairs, {elapsed:.0f}s, loss {loss.item():.3f}")
    _log(f"trained {step} steps on {seen} pairs in {time.perf_counter() - start:.0f}s")
    state = {n: p.detach().to(torch.float16).contiguous()
             for n, p in encoder.named_parameters() if n.startswith(tuple(tuned))}
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].numpy().tobytes())
    meta = {"kind": "promptcache-embedder-tuning", "base": base_path.name,
            "layers": ",".join(t.split(".")[2] for t in tuned),
            "fingerprint": digest.hexdigest()[:12], "steps": str(step), "pairs": str(seen)}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata=meta)
    return meta
