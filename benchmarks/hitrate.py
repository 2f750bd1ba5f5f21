"""Hit-rate tuner: how often the semantic tier hits, and how often it is wrong.

Protocol, per split of the pair file: fill an empty cache with every distinct ``a``, look up
every ``b`` against its nearest cached ``a`` (all-MiniLM-L6-v2, cosine). Lookups whose ``b``
equals a cached ``a`` after collapsing whitespace and casefolding are left out (the exact
tier answers them). A lookup hits if the similarity reaches the threshold and the variant's
checks accept the candidate. For label 1, a hit on the pair's own ``a`` is a true hit and a
hit on another entry a wrong hit; for label 0 every hit is a false hit.

    HR = true hits / label-1 lookups      FHR = false hits / label-0 lookups
    wrong = wrong hits / label-1 lookups  precision = true hits / all hits

Variants, all from one run of the same embeddings: raw cosine (the baseline), each rule
check alone, all rules, and the full verifier (rules + the fitted model, ``--verifier-model``
or the shipped default). The threshold is swept; the best threshold for FHR <= 1% and <= 5%
is chosen on the train split and reported on the held-out split (``--holdout``, by a hash of
the pair: the split ``promptcache fit`` leaves alone). For the verifier the model's threshold
is chosen the same way; ``default`` is the verifier at the operating point stored with its
model, which is what the cache runs. The train pairs are replayed as caches the size of the
held-out one (a bigger cache has more near neighbours, hence more wrong and false hits at
the same threshold), so rates on the two splits are comparable.

With ``--target-fhr F`` it also recommends the settings (similarity threshold, which checks
on, the verifier's model or not) with the best hit rate at that false-hit rate; a pair file
with a ``category``, ``split`` or ``source`` field gets a breakdown by it. Besides
``hitrate.json`` it draws ``hitrate.png``: hit rate against false-hit rate per configuration,
the chosen operating points marked.

    promptcache bench hitrate --pairs FILE [--limit N] [--holdout 0.2] [--out DIR]
                              [--verifier-model PATH] [--tune-limit 20000]
                              [--target-fhr 0.01] [--quiet]
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from promptcache.benchmarks import plots, tuning
from promptcache.benchmarks.pairs import (
    CALIBRATION,
    Lookups,
    cache_lookups,
    embed_texts,
    read_pairs,
    sharded_lookups,
    split,
)
from promptcache.benchmarks.progress import add_quiet, progress
from promptcache.benchmarks.results import command, publish
from promptcache.cache.options import EngineOptions
from promptcache.cache.semantic.rules import CHECKS, RULES, STOPWORDS, words
from promptcache.cache.semantic.verifier import Verifier, VerifierConfig, required_similarity

THRESHOLDS = np.round(np.arange(0.70, 0.9976, 0.0025), 4)
TARGETS = (0.01, 0.05)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pairs", required=True, help="JSON lines of {a, b, label} (gzip or plain)")
    p.add_argument("--limit", type=int, default=None, help="read only the first N pairs")
    p.add_argument("--holdout", type=float, default=0.2,
                   help="share of pairs held out for reporting (default: 0.2)")
    p.add_argument("--out", default="bench-results", help="directory for hitrate.json")
    p.add_argument("--embedding-tuning", default=None,
                   help="a tuning file from `promptcache fit --embedder` for the embedder "
                   "under test (default: none); the raw-cosine baseline is always the bundled "
                   "model as it is")
    p.add_argument("--verifier-model", default="default",
                   help="the verifier's model: default (shipped), none, or a fitted path")
    p.add_argument("--tune-limit", type=int, default=20000,
                   help="train-split lookups used to choose thresholds (default: 20000; the "
                   "caches still hold every train entry)")
    p.add_argument("--target-fhr", type=float, default=None, metavar="F",
                   help="recommend settings for this false-hit rate, e.g. 0.01")
    add_quiet(p)


def curve(lookups: Lookups, accepted: np.ndarray) -> list[dict[str, float]]:
    """HR, FHR, wrong-hit rate and precision at each threshold in :data:`THRESHOLDS`."""
    n1 = max(int((lookups.label == 1).sum()), 1)
    n0 = max(int((lookups.label == 0).sum()), 1)
    rows = []
    for t in THRESHOLDS:
        hit = (lookups.similarity >= t) & accepted
        true = int((hit & lookups.true).sum())
        wrong = int((hit & (lookups.label == 1) & ~lookups.own).sum())
        false = int((hit & (lookups.label == 0)).sum())
        rows.append({"threshold": float(t), "hr": true / n1, "fhr": false / n0,
                     "wrong": wrong / n1, "precision": true / max(true + wrong + false, 1)})
    return rows


def choose(train: list[dict[str, float]], test: list[dict[str, float]], target: float
           ) -> dict[str, Any]:
    """The threshold with the best train HR at train FHR <= target, reported on test."""
    ok = [i for i, r in enumerate(train) if r["fhr"] <= target]
    if not ok:
        return {"threshold": None}
    i = max(ok, key=lambda k: (train[k]["hr"], k))  # ties: the higher threshold
    return {**test[i], "train_hr": train[i]["hr"], "train_fhr": train[i]["fhr"]}


def _accepts(lookups: Lookups, check: Callable[[str, str], bool]) -> np.ndarray:
    """One rule's verdict per lookup (lookups below the lowest threshold never hit)."""
    low = float(THRESHOLDS[0])
    return np.array([s >= low and check(q, c) for q, c, s in
                     zip(lookups.query, lookups.candidate, lookups.similarity, strict=True)],
                    dtype=bool)


def _verify(verifier: Verifier, lookups: Lookups) -> tuple[np.ndarray, float]:
    """The verifier's score per lookup (0 if a rule rejects it), and ms per candidate."""
    todo = np.flatnonzero(lookups.similarity >= THRESHOLDS[0])
    scores = np.zeros(len(lookups.query))
    start = time.perf_counter()
    verdicts = verifier.verify_batch([(lookups.query[i], lookups.candidate[i],
                                       float(lookups.similarity[i])) for i in todo])
    cost = (time.perf_counter() - start) * 1e3 / max(len(todo), 1)
    scores[todo] = [v.score if v.reason in (None, "model") else 0.0 for v in verdicts]
    return scores, cost


def choose_with_model(train: Lookups, test: Lookups, train_scores: np.ndarray,
                      test_scores: np.ndarray, target: float) -> dict[str, Any]:
    """Like :func:`choose`, over the model threshold as well as the similarity threshold."""
    positive = train_scores[train_scores > 0]
    cuts = np.unique(np.quantile(positive, np.linspace(0, 0.99, 100))) if len(positive) else [1.0]
    best: dict[str, Any] = {"threshold": None, "train_hr": -1.0}
    for cut in cuts:
        picked = choose(curve(train, train_scores >= cut), curve(test, test_scores >= cut),
                        target)
        if picked["threshold"] is not None and picked["train_hr"] > best["train_hr"]:
            best = {**picked, "model_threshold": float(cut)}
    return best


def _single_cost(verifier: Verifier, lookups: Lookups, n: int = 200) -> float:
    """ms per candidate verified one at a time (as a lone lookup would)."""
    items = list(zip(lookups.query, lookups.candidate, lookups.similarity, strict=True))[:n]
    start = time.perf_counter()
    for q, c, s in items:
        verifier.verify(q, c, float(s))
    return (time.perf_counter() - start) * 1e3 / max(len(items), 1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from promptcache.cache.protocols import Embedder
    from promptcache.cache.semantic.embedding import load_embedder, resolve_tuning

    timings: dict[str, float] = {}
    started = time.perf_counter()
    pairs = read_pairs(args.pairs, args.limit)
    train_pairs, test_pairs = split(pairs, args.holdout)
    _, cal_pairs = split(train_pairs, CALIBRATION, draw=1)  # what no fitting step saw
    texts = {t for p in (*cal_pairs, *test_pairs) for t in (p.a, p.b)}
    size = max(len(test_pairs), 1)

    def lookups(embedder: Embedder, label: str) -> tuple[Lookups, Lookups]:
        vectors: dict[str, np.ndarray] = {}
        ordered = sorted(texts, key=len)
        with progress(len(ordered), label, quiet=args.quiet, unit="text") as bar:
            for i in range(0, len(ordered), 2048):
                vectors |= embed_texts(embedder, ordered[i:i + 2048])
                bar.update(len(ordered[i:i + 2048]))
        return sharded_lookups(cal_pairs, vectors, size), cache_lookups(test_pairs, vectors)

    base_train, base_test = lookups(load_embedder("onnx", threads=0), "embedding (base)")
    timings["embed_s"] = time.perf_counter() - started
    timings["texts_per_s"] = len(texts) / max(timings["embed_s"], 1e-9)
    tuned_with = resolve_tuning(args.embedding_tuning)
    train, test = lookups(load_embedder("onnx", tuning=tuned_with, threads=0),
                          "embedding (tuned)") if tuned_with else (base_train, base_test)
    if args.tune_limit and len(train.query) > args.tune_limit:
        keep = random.Random(0).sample(range(len(train.query)), args.tune_limit)
        train = train.subset(np.array(sorted(keep)))

    model = None if args.verifier_model in (None, "none") else args.verifier_model
    verifier = Verifier(VerifierConfig(model=model))
    accepted: dict[str, tuple[np.ndarray, np.ndarray]] = {
        "embedder": (np.ones(len(train.query), bool), np.ones(len(test.query), bool))}
    for name in RULES:
        accepted[name] = (_accepts(train, CHECKS[name]), _accepts(test, CHECKS[name]))
    accepted["rules"] = (np.logical_and.reduce([accepted[n][0] for n in RULES]),
                         np.logical_and.reduce([accepted[n][1] for n in RULES]))
    s_train, _ = _verify(verifier, train)
    s_test, batch_cost = _verify(verifier, test)
    cut = verifier.scorer.threshold if verifier.scorer else 0.0
    accepted["verifier"] = (s_train >= max(cut, 1e-12), s_test >= max(cut, 1e-12))

    variants: dict[str, Any] = {}
    every = {"raw": (base_train, base_test, np.ones(len(base_train.query), bool),
                     np.ones(len(base_test.query), bool)),
             **{name: (train, test, *on) for name, on in accepted.items()}}
    for name, (on_train_lk, on_test_lk, on_train, on_test) in every.items():
        train_curve, test_curve = curve(on_train_lk, on_train), curve(on_test_lk, on_test)
        variants[name] = {
            "test_curve": test_curve,
            **{f"at_fhr_{round(t * 100)}pct": choose(train_curve, test_curve, t)
               for t in TARGETS}}
    if verifier.scorer is not None:
        variants["verifier"] |= {f"at_fhr_{round(t * 100)}pct": choose_with_model(
            train, test, s_train, s_test, t) for t in TARGETS}
    for variant in variants.values():
        for key in (f"at_fhr_{round(t * 100)}pct" for t in TARGETS):
            base = variants["raw"][key]
            if variant[key]["threshold"] is not None and base["threshold"] is not None:
                variant[key]["hr_vs_raw"] = variant[key]["hr"] / max(base["hr"], 1e-9)
    default = _default_point(verifier, test, accepted["verifier"][1])
    default_hits = None
    if default["threshold"] is not None:
        default |= raw_at_same_fhr(base_test, default)
        default_hits = accepted["verifier"][1] & (
            test.similarity >= default_floor(default["threshold"], test))
        default["false_hits"] = audit_false_hits(test, default_hits)
        default["ceiling"] = noise_ceiling(base_test, default["false_hits"], default["fhr"])
    recommendation = (tuning.recommend(train, test, accepted, args.target_fhr, curve, choose)
                      if args.target_fhr is not None else None)
    field, categories = tuning.read_categories(args.pairs, args.limit)
    points = tuning.operating_points(test, accepted, s_test, variants, recommendation)
    if default_hits is not None:
        points["default"] = default_hits
    timings["total_s"] = time.perf_counter() - started
    return {
        "benchmark": "hitrate", "date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
        "recommendation": recommendation,
        "categories": tuning.breakdown(field, categories, test, points),
        "pairs": str(args.pairs), "limit": args.limit, "holdout": args.holdout,
        "model": "all-MiniLM-L6-v2", "embedding_tuning": str(tuned_with),
        "verifier_model": args.verifier_model,
        "lookups": {name: {"label1": int((lk.label == 1).sum()),
                           "label0": int((lk.label == 0).sum())}
                    for name, lk in (("train", train), ("test", test))},
        "variants": variants, "default": default,
        "cost_ms_per_candidate": {
            "rules": _single_cost(Verifier(VerifierConfig(model=None)), test),
            "verifier_single": _single_cost(verifier, test),
            "verifier_batched": batch_cost},
        "timings": timings,
    }


def default_floor(threshold: float, test: Lookups, relief: float | None = None) -> np.ndarray:
    """Each lookup's similarity floor at the sidecar's defaults: ``threshold`` less the
    length relief (``--length-relief``) its pair earns."""
    relief = EngineOptions().length_relief if relief is None else relief
    return np.array([required_similarity(threshold, relief, q, c)
                     for q, c in zip(test.query, test.candidate, strict=True)])


def _default_point(verifier: Verifier, test: Lookups, accepted: np.ndarray) -> dict[str, Any]:
    """The verifier at the similarity threshold `promptcache fit` chose (if any), with the
    default length relief, as the sidecar runs it."""
    threshold = verifier.params.get("similarity_threshold")
    if threshold is None:
        return {"threshold": None}
    rows = curve(test, accepted & (test.similarity >= default_floor(threshold, test)))
    return {**rows[0], "threshold": float(threshold),
            "length_relief": EngineOptions().length_relief}


def _raw_best(raw: Lookups, fhr: float) -> tuple[float, float | None]:
    """(HR, threshold): raw cosine's best hit rate at a false-hit rate <= ``fhr``, over every
    threshold (each distinct similarity), not only the sweep's grid."""
    n1 = max(int((raw.label == 1).sum()), 1)
    n0 = max(int((raw.label == 0).sum()), 1)
    order = np.argsort(-raw.similarity, kind="stable")
    sims = raw.similarity[order]
    false = np.cumsum(raw.label[order] == 0) / n0
    true = np.cumsum(raw.true[order]) / n1
    last = np.r_[sims[1:] != sims[:-1], True]  # a threshold takes every tie or none
    ok = np.flatnonzero(last & (false <= fhr + 1e-12))
    if not len(ok):
        return 0.0, None
    best = ok[np.argmax(true[ok])]
    return float(true[best]), float(sims[best])


def raw_at_same_fhr(raw: Lookups, point: dict[str, Any]) -> dict[str, Any]:
    """Raw cosine's best held-out hit rate at a false-hit rate no higher than ``point``'s.

    The baseline gets its threshold chosen on the held-out split itself, from every
    possible threshold (an oracle), so the ratio is if anything unfair to the verifier.
    """
    hr, threshold = _raw_best(raw, point["fhr"])
    return {"raw_hr_at_same_fhr": hr,
            "raw_threshold_at_same_fhr": round(threshold, 6) if threshold else None,
            "hr_vs_raw_at_same_fhr": point["hr"] / hr if hr else None}


def _content(text: str) -> frozenset[str]:
    return frozenset(w for w in words(text) if w not in STOPWORDS)


def audit_false_hits(test: Lookups, hit: np.ndarray, examples: int = 40) -> dict[str, Any]:
    """What the false hits at an operating point are, to tell label noise from real errors.

    ``same_content_words``: the prompt and the served entry have the same content words
    (stopwords aside), so the hit can only be wrong through word order or function words
    ("How do I ask a girl out?" / "How do I ask a girl out." is labelled 0 in QQP).
    ``true_same_content_words`` counts true hits of that kind, for the share of label 0
    among them. ``on_other_entry``: the hit was on an entry other than the pair's own
    ``a``, which the labels say nothing about.
    """
    false = np.flatnonzero(hit & (test.label == 0))
    true = np.flatnonzero(hit & test.true)
    same = [i for i in false if _content(test.query[i]) == _content(test.candidate[i])]
    true_same = sum(_content(test.query[i]) == _content(test.candidate[i]) for i in true)
    shown = sorted(false, key=lambda i: -test.similarity[i])[:examples]
    return {"count": len(false), "on_other_entry": int((~test.own[false]).sum()),
            "same_content_words": len(same), "true_same_content_words": int(true_same),
            "examples": [{"query": test.query[i], "served": test.candidate[i],
                          "similarity": round(float(test.similarity[i]), 4),
                          "own_entry": bool(test.own[i])} for i in shown]}


def noise_ceiling(raw: Lookups, audit: dict[str, Any], fhr: float) -> dict[str, Any] | None:
    """An estimate of the best any judge of meaning could do here, given the labels.

    If a share ``r`` of hits that keep every content word is labelled 0, take ``r`` as the
    labels' disagreement on prompts that mean the same. A judge that served only prompts
    meaning the same would then pay one false hit per ``(1 - r) / r`` true hits, so at a
    false-hit rate ``fhr`` its hit rate is at most ``fhr * n0 * (1 - r) / r / n1`` (capped
    by the lookups whose nearest entry is their own). An estimate, not a bound: it assumes
    the disagreement on same-content pairs holds for all paraphrases.
    """
    same, true_same = audit["same_content_words"], audit["true_same_content_words"]
    if not same or not true_same:
        return None
    r = same / (same + true_same)
    n1 = max(int((raw.label == 1).sum()), 1)
    n0 = max(int((raw.label == 0).sum()), 1)
    reachable = float(((raw.label == 1) & raw.own).sum()) / n1
    hr = min(reachable, fhr * n0 * (1 - r) / r / n1)
    raw_hr, _ = _raw_best(raw, fhr)
    return {"label0_share_same_content": round(r, 4), "hr": hr,
            "hr_vs_raw": hr / raw_hr if raw_hr else None}


def report(result: dict[str, Any]) -> str:
    lines = []
    v = result["variants"]
    lines.append("threshold  " + "  ".join(f"{n + ' HR/FHR':>18}" for n in ("raw", "verifier")))
    for raw, ver in zip(v["raw"]["test_curve"], v["verifier"]["test_curve"], strict=True):
        if round(raw["threshold"] * 100, 4) % 1 == 0:
            lines.append(f"{raw['threshold']:9.2f}  " + "  ".join(
                f"{r['hr']:8.1%}/{r['fhr']:6.2%} w{r['wrong']:4.1%} p{r['precision']:4.0%}"
                for r in (raw, ver)))
    lines.append("")
    lines.append(f"{'variant':10} {'HR@FHR<=1%':>11} {'FHR':>6} {'thr':>6} {'xraw':>5}   "
                 f"{'HR@FHR<=5%':>11} {'FHR':>6} {'thr':>6} {'xraw':>5}")
    for name, data in v.items():
        cells = []
        for key in ("at_fhr_1pct", "at_fhr_5pct"):
            r = data[key]
            cells.append(f"{'n/a':>11}" + " " * 26 if r["threshold"] is None else
                         f"{r['hr']:11.1%} {r['fhr']:6.2%} {r['threshold']:6.4f} "
                         f"{r.get('hr_vs_raw', 0):5.2f}")
        lines.append(f"{name:10} " + "   ".join(cells))
    for key in ("at_fhr_1pct", "at_fhr_5pct"):
        r = v["verifier"][key]
        if "model_threshold" in r:
            lines.append(f"verifier {key}: similarity >= {r['threshold']}, model score >= "
                         f"{r['model_threshold']:.4f} (both chosen on the train split)")
    d = result["default"]
    if d["threshold"] is not None:
        ratio = d.get("hr_vs_raw_at_same_fhr")
        lines.append(f"raw cosine at FHR <= {d['fhr']:.2%} (threshold chosen on the held-out "
                     f"split): HR {d.get('raw_hr_at_same_fhr', 0):.1%}; default/raw "
                     + (f"{ratio:.2f}x" if ratio else "n/a"))
        lines.append(f"default verifier at similarity >= {d['threshold']} (less up to "
                     f"{d.get('length_relief', 0)} for long prompts): HR {d['hr']:.1%}, "
                     f"FHR {d['fhr']:.2%}, wrong {d['wrong']:.1%}, precision {d['precision']:.0%}")
        f = d["false_hits"]
        lines.append(f"its {f['count']} false hits: {f['same_content_words']} keep every "
                     f"content word (against {f['true_same_content_words']} true hits that "
                     f"do), {f['on_other_entry']} on another pair's entry")
        if d.get("ceiling"):
            c = d["ceiling"]
            lines.append(f"label-noise ceiling (an estimate): {c['label0_share_same_content']:.0%}"
                         f" of same-content hits are labelled 0, so a perfect judge of meaning "
                         f"would reach about HR {c['hr']:.1%} at FHR {d['fhr']:.2%} "
                         + (f"({c['hr_vs_raw']:.2f}x raw)" if c["hr_vs_raw"] else ""))
    costs = result["cost_ms_per_candidate"]
    lines.append("cost per candidate: " + ", ".join(f"{k} {c:.3f} ms" for k, c in costs.items()))
    return "\n".join(lines + tuning.report_lines(result))


def main(args: argparse.Namespace) -> int:
    result = run(args)
    result["plot"] = "hitrate.png"
    plots.hitrate_curves(result, f"{args.out}/hitrate.png",
                         title=f"{Path(args.pairs).name}: hit rate against false-hit rate "
                         "(held-out split)")
    result["command"] = command(args)
    publish(result, args.out, "hitrate", report(result))
    return 0
