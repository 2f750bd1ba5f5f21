"""The verifier: a semantic candidate is served only if it passes these checks.

A cached answer is served for a paraphrase only if the two prompts ask the same thing.
Cosine similarity alone cannot tell that: "cancel my subscription" and "don't cancel my
subscription" score above 0.95. Before a candidate is served, :class:`Verifier` runs the rule
checks of :mod:`.rules` (``numbers``, ``negation``, ``entities``, ``contrast``), then the
fitted model of :mod:`.scorers` on the pairs they let through:

- ``model``: what ``promptcache fit`` wrote: a logistic regression over cheap features
  (similarity, word overlap, length ratio, the rule flags), a fine-tuned cross-encoder
  directory, or ``kind: rules`` when no model beat the rules alone on the calibration
  lookups. ``VerifierConfig.model`` is ``"default"`` (the file shipped as
  ``models/verifier.json``, fitted on QQP), ``None`` (rules only) or a path.

Each check can be switched off in :class:`VerifierConfig`; a check switched off does not run,
and the linear model takes its flag as agreeing (see
:class:`~promptcache.cache.semantic.scorers.LinearScorer`). The rules and the linear model
cost about 0.1-0.2 ms a candidate; a cross-encoder one forward pass per pair. Work is bounded
on any input: a pair with a text longer than ``VerifierConfig.max_chars`` is rejected
(reason ``"length"``, a miss) before any check or model reads it, and each check reads at
most :data:`~promptcache.cache.semantic.rules.MAX_TOKENS` tokens of a text, in time linear
in them but for a sort, with its searches capped (see :mod:`.rules`): a few tens of
milliseconds a check on the worst inputs found, 5-20 ms on a 2,500-word pair.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from promptcache.cache.protocols import Scorer, Verdict
from promptcache.cache.semantic.rules import CHECKS, RULES, iter_words
from promptcache.cache.semantic.scorers import load_model

if TYPE_CHECKING:
    from promptcache.cache.semantic.embedding import SentenceTransformerEmbedder

DEFAULT_PARAMS = Path(__file__).resolve().parent / "models" / "verifier.json"

#: How far the similarity floor falls for long prompts (``--length-relief``): rewrites of a
#: long prompt change more words, so they sit at a lower cosine than rewrites of a short
#: question (LLM rewrites of 18-word sentences at 0.85-0.95), while the near-miss questions
#: the floor keeps out are short. The shorter text of a pair decides: up to
#: :data:`RELIEF_FROM_WORDS` words the floor is the threshold, from :data:`RELIEF_FULL_WORDS`
#: it is the threshold less the relief, linear between. The rules (``contrast`` among them:
#: an opposite or one swapped word, which long prompts hide best) still judge every pair.
DEFAULT_LENGTH_RELIEF = 0.045
RELIEF_FROM_WORDS = 10
RELIEF_FULL_WORDS = 15


def _count_words(text: str) -> int:
    return sum(1 for _ in itertools.islice(iter_words(text), RELIEF_FULL_WORDS))


def required_similarity(threshold: float, relief: float, query: str, candidate: str) -> float:
    """The similarity a candidate needs: ``threshold`` less the part of ``relief`` the
    shorter text's length earns (see :data:`DEFAULT_LENGTH_RELIEF`)."""
    if relief <= 0:
        return threshold
    # counted up to where the relief is full: a long text costs no more than a short one
    n = min(_count_words(query), _count_words(candidate))
    share = min(max(n - RELIEF_FROM_WORDS, 0) / (RELIEF_FULL_WORDS - RELIEF_FROM_WORDS), 1.0)
    return threshold - relief * share


@dataclass(frozen=True)
class VerifierConfig:
    """Which checks run: each rule, and the model (``"default"``, None or a path).

    ``max_chars``: the longest text (query or candidate) the checks read, about 5,000 words;
    a pair with a longer one is rejected (a miss), unless no check and no model is on.
    """

    numbers: bool = True
    negation: bool = True
    entities: bool = True
    contrast: bool = True
    model: str | None = "default"
    max_chars: int = 32_768


class Verifier:
    """Rules first (cheap, each switchable), then the fitted model on what they let through.

    ``verify_batch`` scores every rule-passing pair in one model call; ``verify`` is the
    batch of one, and gives the same verdict. Both block: call them from a thread.
    """

    def __init__(self, config: VerifierConfig = VerifierConfig(), *,
                 embedder: SentenceTransformerEmbedder | None = None) -> None:
        self.config = config
        self._checks = [(n, CHECKS[n]) for n in RULES if getattr(config, n)]
        self.scorer: Scorer | None = None
        self.params: dict[str, Any] = {}  # what `promptcache fit` wrote, if a model is set
        if config.model is not None:
            path = DEFAULT_PARAMS if config.model == "default" else Path(config.model)
            # The model scores only pairs the rules passed: it need not run them again.
            self.params, self.scorer = load_model(path, rules_passed=True)
        self.embedder = embedder  # the fitted kinds shipped today score without it
        self._reads = bool(self._checks) or self.scorer is not None

    def _rules(self, query: str, candidate: str) -> str | None:
        limit = self.config.max_chars
        if self._reads and (len(query) > limit or len(candidate) > limit):
            return "length"
        for name, check in self._checks:
            if not check(query, candidate):
                return name
        return None

    def verify(self, query: str, candidate: str, similarity: float) -> Verdict:
        return self.verify_batch([(query, candidate, similarity)])[0]

    def verify_batch(self, items: Sequence[tuple[str, str, float]]) -> list[Verdict]:
        reasons = [self._rules(q, c) for q, c, _ in items]
        scores = [1.0 if r is None else 0.0 for r in reasons]
        if self.scorer is not None:
            todo = [i for i, r in enumerate(reasons) if r is None]
            if todo:
                for i, s in zip(todo, self.scorer.score_batch([items[i] for i in todo]),
                                strict=True):
                    scores[i] = s
                    if s < self.scorer.threshold:
                        reasons[i] = "model"
        return [Verdict(ok=r is None, reason=r, score=float(s))
                for r, s in zip(reasons, scores, strict=True)]
