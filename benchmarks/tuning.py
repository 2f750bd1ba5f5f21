"""What the hit-rate tuner recommends for a target false-hit rate, and how the chosen
operating points hold up per category of the pair file.

Both work on the tuner's per-lookup verdicts (see :mod:`promptcache.benchmarks.hitrate`):
``accepted[name] = (train, test)`` boolean arrays saying whether configuration ``name``'s
checks let each lookup's candidate through, before the similarity threshold.

Configurations considered by :func:`recommend`: raw cosine, every subset of the rule checks
(``--verify-numbers/--verify-negation/--verify-entities``), and the full verifier (all rules
and the fitted model at the threshold stored with it, ``--verifier-model default``): the
settings a sidecar can run. The choice is made on the train split and reported on the
held-out split, like every threshold of the tuner.
"""

from __future__ import annotations

import gzip
import itertools
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from promptcache.benchmarks.pairs import Lookups
from promptcache.cache.semantic.rules import RULES

#: Fields of a pair file that name a category, in order of preference.
CATEGORY_FIELDS = ("category", "split", "source")

Choose = Callable[[list[dict[str, float]], list[dict[str, float]], float], dict[str, Any]]
Curve = Callable[[Lookups, np.ndarray], list[dict[str, float]]]


def configurations(accepted: Mapping[str, tuple[np.ndarray, np.ndarray]]
                   ) -> dict[str, tuple[dict[str, Any], tuple[np.ndarray, np.ndarray]]]:
    """name -> (settings, (train, test) verdicts) for every configuration a sidecar can run."""
    out: dict[str, tuple[dict[str, Any], tuple[np.ndarray, np.ndarray]]] = {}
    train_n, test_n = (len(a) for a in accepted["embedder"])
    for size in range(len(RULES) + 1):
        for on in itertools.combinations(RULES, size):
            train = np.ones(train_n, bool)
            test = np.ones(test_n, bool)
            for rule in on:
                train &= accepted[rule][0]
                test &= accepted[rule][1]
            name = "embedder" if not on else "rules:" + "+".join(on)
            settings = {"checks": {r: r in on for r in RULES}, "verifier_model": "none"}
            out[name] = (settings, (train, test))
    if "verifier" in accepted:
        out["verifier"] = ({"checks": dict.fromkeys(RULES, True), "verifier_model": "default"},
                           accepted["verifier"])
    return out


def recommend(train: Lookups, test: Lookups,
              accepted: Mapping[str, tuple[np.ndarray, np.ndarray]], target_fhr: float,
              curve: Curve, choose: Choose) -> dict[str, Any]:
    """The configuration and similarity threshold with the best train hit rate at a train
    false-hit rate <= ``target_fhr``, with its held-out figures and the ``serve`` flags."""
    candidates = []
    best: dict[str, Any] | None = None
    for name, (settings, (on_train, on_test)) in configurations(accepted).items():
        picked = choose(curve(train, on_train), curve(test, on_test), target_fhr)
        if picked["threshold"] is None:
            candidates.append({"config": name, "threshold": None})
            continue
        row = {"config": name, "threshold": picked["threshold"],
               "train_hr": picked["train_hr"], "train_fhr": picked["train_fhr"],
               "test_hr": picked["hr"], "test_fhr": picked["fhr"]}
        candidates.append(row)
        # Strictly better only: a simpler configuration (listed first) wins ties.
        if best is None or picked["train_hr"] > best["train"]["hr"]:
            best = {"config": name, **settings, "similarity_threshold": picked["threshold"],
                    "train": {"hr": picked["train_hr"], "fhr": picked["train_fhr"]},
                    "test": {k: picked[k] for k in ("hr", "fhr", "wrong", "precision")}}
    result: dict[str, Any] = {"target_fhr": target_fhr, "candidates": candidates}
    if best is None:
        return {**result, "config": None, "test": None,
                "note": "no configuration reaches this false-hit rate on the train split"}
    checks = best["checks"]
    flags = [f"--similarity-threshold {best['similarity_threshold']:g}",
             *(f"--verify-{r} {'true' if checks[r] else 'false'}" for r in RULES),
             f"--verifier-model {best['verifier_model']}"]
    return {**result, **best, "serve_flags": " ".join(flags)}


def read_categories(path: str | Path, limit: int | None = None) -> tuple[str, dict[str, str]]:
    """(field, query text -> category) from the first of :data:`CATEGORY_FIELDS` the pair
    file has; ("", {}) when it has none. A ``b`` seen under two categories keeps the first."""
    with Path(path).open("rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
    opener: Any = gzip.open if gzipped else open
    rows: list[dict[str, Any]] = []
    with opener(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            if limit is not None and len(rows) >= limit:
                break
            if line.strip():
                rows.append(json.loads(line))
    field = next((f for f in CATEGORY_FIELDS if rows and all(f in r for r in rows)), "")
    if not field:
        return "", {}
    mapping: dict[str, str] = {}
    for row in rows:
        mapping.setdefault(str(row["b"]), str(row[field]))
    return field, mapping


def hits_at(point: Mapping[str, Any], lookups: Lookups, accepted: np.ndarray,
            scores: np.ndarray | None = None) -> np.ndarray:
    """Which lookups hit at a chosen operating point. A point chosen with its own model
    threshold (the tuner's verifier points) is judged by the model ``scores`` (0 where a rule
    rejected) instead of ``accepted``, which holds the verdicts at the stored threshold."""
    if scores is not None and "model_threshold" in point:
        accepted = scores >= max(point["model_threshold"], 1e-12)
    return np.asarray((lookups.similarity >= point["threshold"]) & accepted, dtype=bool)


def operating_points(test: Lookups, accepted: Mapping[str, tuple[np.ndarray, np.ndarray]],
                     scores: np.ndarray, variants: Mapping[str, Any],
                     recommendation: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
    """Hit masks over ``test`` at the tuner's chosen points (raw, rules and the verifier at
    FHR <= 1% and <= 5%) and at the recommendation, named for the breakdown's columns."""
    points = {f"{name}@{key[7:]}": hits_at(variants[name][key], test, accepted[name][1],
                                           scores)
              for name in ("embedder", "rules", "verifier") if name in variants
              for key in ("at_fhr_1pct", "at_fhr_5pct") if variants[name][key]["threshold"]}
    if recommendation and recommendation.get("config"):
        points["recommended"] = hits_at(
            {"threshold": recommendation["similarity_threshold"]}, test,
            configurations(accepted)[recommendation["config"]][1][1])
    return points


def breakdown(field: str, categories: Mapping[str, str], test: Lookups,
              points: Mapping[str, np.ndarray]) -> dict[str, Any] | None:
    """Per category: label-1/label-0 lookups and HR/FHR/wrong at each named operating point
    (``points``: name -> hit mask over ``test``)."""
    if not field:
        return None
    of = np.array([categories.get(q, "?") for q in test.query])
    out: dict[str, Any] = {"field": field, "by_category": {}}
    for cat in sorted(set(of.tolist())):
        mask = of == cat
        n1 = int((mask & (test.label == 1)).sum())
        n0 = int((mask & (test.label == 0)).sum())
        row: dict[str, Any] = {"label1": n1, "label0": n0}
        for name, hit in points.items():
            h = hit & mask
            row[name] = {
                "hr": int((h & test.true).sum()) / max(n1, 1),
                "fhr": int((h & (test.label == 0)).sum()) / max(n0, 1),
                "wrong": int((h & (test.label == 1) & ~test.own).sum()) / max(n1, 1)}
        out["by_category"][cat] = row
    return out


def report_lines(result: Mapping[str, Any]) -> list[str]:
    """The recommendation and the per-category table, for the tuner's text report."""
    lines: list[str] = []
    rec = result.get("recommendation")
    if rec:
        lines.append("")
        if rec.get("config") is None:
            lines.append(f"recommendation for FHR <= {rec['target_fhr']:.2%}: {rec['note']}")
        else:
            t = rec["test"]
            lines.append(f"recommendation for FHR <= {rec['target_fhr']:.2%}: {rec['config']} "
                         f"at similarity >= {rec['similarity_threshold']} -> held-out HR "
                         f"{t['hr']:.1%}, FHR {t['fhr']:.2%}, precision {t['precision']:.0%}")
            lines.append(f"  promptcache serve ... {rec['serve_flags']}")
    cats = result.get("categories")
    if cats:
        names = list(next(iter(cats["by_category"].values())).keys())[2:]
        lines.append("")
        lines.append(f"by {cats['field']} (held-out lookups; HR/FHR at each chosen point):")
        lines.append(f"{'category':12} {'n1':>5} {'n0':>5}  " + "  ".join(
            f"{n:>20}" for n in names))
        for cat, row in cats["by_category"].items():
            lines.append(f"{cat[:12]:12} {row['label1']:5d} {row['label0']:5d}  " + "  ".join(
                f"{row[n]['hr']:9.1%}/{row[n]['fhr']:<9.2%}" + " " for n in names))
    return lines
