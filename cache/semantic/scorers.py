"""The verifier's fitted models at lookup time: features of a pair, and the scorers.

What ``promptcache fit`` (:mod:`promptcache.benchmarks.fit`) writes, loaded and run here:

- ``linear``: logistic regression over cheap features of a pair (:func:`pair_features`:
  similarity, word and content-word overlap, unmatched content words, length ratio, question
  words, the rule flags), a small JSON file. Scoring costs about 0.1 ms a pair. Loaded for
  :class:`~promptcache.cache.semantic.verifier.Verifier` (``rules_passed``), it takes every
  rule flag as True instead of running the rules again: see :class:`LinearScorer`.
- ``cross-encoder``: a fine-tuned pair classifier in a directory; one forward pass per pair
  (torch and transformers are imported only when one is loaded).
- ``rules``: no model (the fit found none that beat the rule checks alone).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from promptcache.cache.errors import ConfigError
from promptcache.cache.semantic.rules import STOPWORDS, rule_flags, words

_QUESTION_WORDS = frozenset(
    "what how why when where which who whom whose is are can do does did should would will "
    "could".split())
#: The rules whose flags are features: the three the shipped model was fitted with. The
#: ``contrast`` rule came later; like every rule it vetoes a pair before any model scores
#: it, so a fitted model never sees a pair it rejected.
MODEL_RULES = ("numbers", "negation", "entities")
FEATURES = ("similarity", "word_jaccard", "content_jaccard", "unmatched_query",
            "unmatched_candidate", "length_ratio", "log_length", "first_word_equal",
            "question_words_equal", *(f"rule_{r}" for r in MODEL_RULES))


#: The rule flags of a pair that every rule passed (or that a rule switched off did not judge).
ALL_AGREE: Mapping[str, bool] = MappingProxyType(dict.fromkeys(MODEL_RULES, True))


def pair_features(query: str, candidate: str, similarity: float,
                  flags: Mapping[str, bool] | None = None) -> list[float]:
    """The features named in :data:`FEATURES`, in order.

    ``flags`` are the rule verdicts when the caller knows them; without, every rule runs
    (as ``promptcache fit`` does, to learn from them).
    """
    wq, wc = words(query), words(candidate)
    sq, sc = set(wq), set(wc)
    cq, cc = sq - STOPWORDS, sc - STOPWORDS
    lq, lc = max(len(wq), 1), max(len(wc), 1)
    if flags is None:
        flags = rule_flags(query, candidate)
    return [similarity, len(sq & sc) / max(len(sq | sc), 1), len(cq & cc) / max(len(cq | cc), 1),
            float(len(cq - cc)), float(len(cc - cq)), min(lq, lc) / max(lq, lc),
            math.log(max(lq, lc)), float(bool(wq) and bool(wc) and wq[0] == wc[0]),
            float((sq & _QUESTION_WORDS) == (sc & _QUESTION_WORDS)),
            *(float(flags[r]) for r in MODEL_RULES)]


class LinearScorer:
    """Logistic regression over :func:`pair_features`, from a JSON parameter file.

    With ``rules_passed`` (how the verifier loads it), the caller scores only pairs that its
    switched-on rules passed, so every rule flag is fed as True and no rule runs twice; a
    rule switched off is fed as True as well. ``promptcache fit`` chose the threshold among
    pairs that every rule passed, where all flags are True, so switching a rule off removes
    its veto and leaves the scores as calibrated.
    """

    def __init__(self, params: dict[str, Any], *, rules_passed: bool = False) -> None:
        if tuple(params["features"]) != FEATURES:
            raise ConfigError("verifier parameters were fitted on other features; refit them")
        self.params = params
        self.rules_passed = rules_passed
        self.mean = np.array(params["mean"], dtype=np.float64)
        self.scale = np.array(params["scale"], dtype=np.float64)
        self.weights = np.array(params["weights"], dtype=np.float64)
        self.bias = float(params["bias"])
        self.threshold = float(params["threshold"])

    def score_batch(self, items: Sequence[tuple[str, str, float]]) -> list[float]:
        if not items:
            return []
        flags = ALL_AGREE if self.rules_passed else None
        x = np.array([pair_features(q, c, s, flags) for q, c, s in items])
        # Row by row (no BLAS), so a pair scores the same alone or in any batch.
        z = (((x - self.mean) / self.scale) * self.weights).sum(axis=1) + self.bias
        return [float(v) for v in 1.0 / (1.0 + np.exp(-z))]


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


def load_model(path: str | Path, *, rules_passed: bool = False
               ) -> tuple[dict[str, Any], LinearScorer | CrossEncoderScorer | None]:
    """What ``promptcache fit`` wrote: a JSON file, or a directory holding ``verifier.json``.

    Returns the parameters and the model to score with; kind ``rules`` (the fit found no
    model that beat the rule checks alone) has none. ``rules_passed``: see
    :class:`LinearScorer`.
    """
    path = Path(path)
    directory = path if path.is_dir() else None
    try:
        params = json.loads((path / "verifier.json" if directory else path).read_text())
        kind = params.get("kind")
        if kind == "rules":
            return params, None
        if kind == "linear":
            return params, LinearScorer(params, rules_passed=rules_passed)
        if kind == "cross-encoder" and directory is not None:
            return params, CrossEncoderScorer(directory, params)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"verifier model {path}: {exc}") from exc
    raise ConfigError(f"verifier model {path}: not written by `promptcache fit`")
