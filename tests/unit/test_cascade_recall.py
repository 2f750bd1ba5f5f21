"""The cascade against the precise model on real pairs: of the Quora pairs MiniLM alone
would match at the default threshold, the first stage keeps (nearly) every one among its
candidates, while most lookups of unrelated questions never reach MiniLM."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from promptcache.cache.protocols import Embedder
from promptcache.cache.semantic.first_stage import FirstStage, StaticEmbedder, find_static_model
from tests.support.paths import DATASETS

PAIRS = 1500
THRESHOLD = 0.975  # the tier's default


@pytest.fixture(scope="module")
def pairs() -> list[tuple[str, str]]:
    path = DATASETS / "qqp_pairs.jsonl.gz"
    if not path.exists():
        pytest.skip(f"{path} is not there")
    out = []
    with gzip.open(path, "rt") as f:
        for line in f:
            row = json.loads(line)
            if row["a"].strip().casefold() != row["b"].strip().casefold():
                out.append((row["a"], row["b"]))
            if len(out) == PAIRS:
                break
    return out


def test_the_first_stage_keeps_the_precise_models_hits_and_skips_most_lookups(
        pairs: list[tuple[str, str]], embedder: Embedder) -> None:
    path = find_static_model()
    assert path is not None  # the session's embedder fixture distilled it
    stage = FirstStage(StaticEmbedder(path))
    a_texts = [a for a, _ in pairs]
    stage.add_codes("scope", np.arange(len(pairs), dtype=np.int64), stage.codes(a_texts))
    a_vectors = embedder.encode(a_texts)
    b_vectors = embedder.encode([b for _, b in pairs])
    similarity = b_vectors @ a_vectors.T  # every b against every cached a
    nearest = similarity.argmax(axis=1)
    precise_hits = [n for n in range(len(pairs)) if similarity[n, nearest[n]] >= THRESHOLD]
    assert len(precise_hits) >= 30, "too few precise hits to measure recall on"
    kept = sum(int(nearest[n]) in stage.plausible("scope", pairs[n][1])
               for n in precise_hits)
    assert kept / len(precise_hits) >= 0.97, (kept, len(precise_hits))
    skipped = sum(not stage.plausible("scope", b) for _, b in pairs)
    assert skipped / len(pairs) >= 0.3, skipped  # lookups that never wait for MiniLM


def test_the_first_stage_keeps_long_rewrites_the_length_relief_lets_through(
        embedder: Embedder) -> None:
    """Under the length relief a long rewrite is a hit down to 0.93: the first stage (tuned
    at the threshold) must still keep those among its candidates."""
    from promptcache.cache.options import EngineOptions
    from promptcache.cache.semantic.verifier import required_similarity

    path = DATASETS / "gptcache_mock_pairs.jsonl.gz"
    if not path.exists():
        pytest.skip(f"{path} is not there")
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for line in f][:500]
    pairs = [(r["a"], r["b"]) for r in rows]
    static = find_static_model()
    assert static is not None
    stage = FirstStage(StaticEmbedder(static))
    a_texts = [a for a, _ in pairs]
    stage.add_codes("scope", np.arange(len(pairs), dtype=np.int64), stage.codes(a_texts))
    similarity = embedder.encode([b for _, b in pairs]) @ embedder.encode(a_texts).T
    nearest = similarity.argmax(axis=1)
    relief = EngineOptions().length_relief
    relieved = [n for n in range(len(pairs))
                if THRESHOLD > similarity[n, nearest[n]] >= required_similarity(
                    THRESHOLD, relief, pairs[n][1], pairs[int(nearest[n])][0])]
    assert len(relieved) >= 50, "too few relieved hits to measure recall on"
    kept = sum(int(nearest[n]) in stage.plausible("scope", pairs[n][1]) for n in relieved)
    assert kept / len(relieved) >= 0.97, (kept, len(relieved))
