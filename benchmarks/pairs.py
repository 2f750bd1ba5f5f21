"""Labelled pairs and the evaluation protocol shared by fitting and the hit-rate bench.

Pairs are JSON lines (gzip or plain) of ``{"a", "b", "label"}``; label 1 means one answer
serves both prompts. A deterministic share of them (by a hash of the pair) is held out, and a
calibration quarter of the rest is kept from every fitting step. The protocol replays pairs
through a cache: fill an empty cache with every distinct ``a``, look up every ``b`` against
its nearest cached ``a`` (:func:`cache_lookups`), in caches the size of the held-out split
(:func:`sharded_lookups`). :func:`operating_point` chooses the thresholds with the best hit
rate at a false-hit rate target.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from promptcache.cache.protocols import Embedder


@dataclass(frozen=True)
class Pair:
    """Two prompts and whether one answer serves both (label 1)."""

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


def embed_texts(embedder: Embedder, texts: Iterable[str],
                batch: int = 256) -> dict[str, np.ndarray]:
    """Each distinct text's vector, batched (shortest first, which pads least)."""
    unique = sorted(set(texts), key=len)
    out: dict[str, np.ndarray] = {}
    for i in range(0, len(unique), batch):
        chunk = unique[i:i + batch]
        out.update(zip(chunk, embedder.encode(chunk), strict=True))
    return out


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
