"""The hit-rate tuner and the verifier's fitting run end to end on a small slice of QQP."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest

from promptcache.benchmarks import fit, hitrate, pairs
from promptcache.cache.semantic.embedding import resolve_tuning
from promptcache.cache.semantic.verifier import Verifier, VerifierConfig
from tests.support.paths import DATASETS

QQP = DATASETS / "qqp_pairs.jsonl.gz"
needs_qqp = pytest.mark.skipif(not QQP.exists(), reason=f"{QQP} is not there (shared datasets)")


def _args(add: object, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add(parser)  # type: ignore[operator]
    return parser.parse_args(argv)


def test_pairs_read_from_gzip_or_plain_lines_and_split_by_hash(tmp_path: Path) -> None:
    rows = [{"a": f"question {i}", "b": f"query {i}", "label": i % 2} for i in range(200)]
    plain = tmp_path / "pairs.jsonl"
    plain.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    read = pairs.read_pairs(plain, limit=150)
    assert len(read) == 150 and read[3] == pairs.Pair("question 3", "query 3", 1)
    train, test = pairs.split(read, 0.2)
    assert len(train) + len(test) == 150 and 10 < len(test) < 60
    assert pairs.split(read, 0.2) == (train, test)  # deterministic


@needs_qqp
def test_bench_hitrate_writes_sane_json(tmp_path: Path) -> None:
    args = _args(hitrate.add_arguments,
                 ["--pairs", str(QQP), "--limit", "300", "--out", str(tmp_path)])
    assert hitrate.main(args) == 0
    result = json.loads((tmp_path / "hitrate.json").read_text())
    assert set(result["variants"]) == {"raw", "embedder", "numbers", "negation", "entities",
                                       "contrast", "rules", "verifier"}
    assert result["embedding_tuning"] == str(resolve_tuning(None))
    assert result["lookups"]["test"]["label1"] > 0 and result["lookups"]["test"]["label0"] > 0
    for name, variant in result["variants"].items():
        assert len(variant["test_curve"]) == len(hitrate.THRESHOLDS)
        for row in variant["test_curve"]:
            for key in ("hr", "fhr", "wrong", "precision"):
                assert 0.0 <= row[key] <= 1.0, (name, row)
        hrs = [row["hr"] for row in variant["test_curve"]]
        assert hrs == sorted(hrs, reverse=True), "HR never rises with the threshold"
        for key in ("at_fhr_1pct", "at_fhr_5pct"):
            chosen = variant[key]
            if chosen["threshold"] is not None:
                assert 0.70 <= chosen["threshold"] < 1.0
                assert chosen["train_fhr"] <= float(key[7]) / 100
    v = result["variants"]
    raw, rules = v["embedder"]["test_curve"], v["rules"]["test_curve"]
    assert all(r["fhr"] <= b["fhr"] and r["hr"] <= b["hr"] for r, b in zip(rules, raw,
                                                                           strict=True))
    assert all(math.isfinite(c) and c >= 0 for c in result["cost_ms_per_candidate"].values())


@needs_qqp
def test_fit_linear_writes_parameters_the_verifier_loads(tmp_path: Path) -> None:
    out = tmp_path / "verifier.json"
    args = _args(fit.add_arguments, ["--pairs", str(QQP), "--limit", "400", "--out", str(out),
                                     "--keep-model"])
    assert fit.main(args) == 0
    params = json.loads(out.read_text())
    assert params["kind"] == "linear" and params["features"] == list(fit.FEATURES)
    assert params["command"] == (f"promptcache fit --pairs {QQP} --limit 400 --holdout 0.2 "
                                 f"--target-fhr 0.0075 --keep-model --out {out}")
    assert 0.70 <= params["similarity_threshold"] < 1.0 and 0.0 <= params["threshold"] <= 1.0
    for side in ("model", "rules"):
        assert 0.0 <= params["calibration"][side]["fhr"] <= 0.0075
    verifier = Verifier(VerifierConfig(model=str(out)))
    assert not verifier.verify("cancel my plan", "don't cancel my plan", 0.99).ok
    assert 0.0 <= verifier.verify("How do I cook rice?", "How can I cook rice?", 0.98).score <= 1


@needs_qqp
def test_fit_cross_encoder_code_path_on_a_tiny_budget(tmp_path: Path) -> None:
    """The cross-encoder fitting runs and saves a model the verifier loads (quality aside)."""
    out = tmp_path / "ce"
    args = _args(fit.add_arguments, ["--pairs", str(QQP), "--limit", "150", "--out", str(out),
                                     "--cross-encoder", "--budget", "2", "--max-length", "32",
                                     "--keep-model"])
    assert fit.main(args) == 0
    params = json.loads((out / "verifier.json").read_text())
    assert params["kind"] == "cross-encoder" and params["max_length"] == 32
    verifier = Verifier(VerifierConfig(model=str(out)))
    items = [("How do I cook rice?", "How can I cook rice?", 0.98),
             ("cancel my plan", "don't cancel my plan", 0.99)]
    verdicts = verifier.verify_batch(items)
    assert verdicts == [verifier.verify(*item) for item in items]
    assert verdicts[1].reason == "negation" and 0.0 <= verdicts[0].score <= 1.0


@needs_qqp
def test_fit_embedder_writes_a_tuning_the_embedder_loads(tmp_path: Path) -> None:
    """fit --embedder tunes the top layers, writes them with the verifier fitted on top, and
    the embedder loads them (vectors change, names say which tuning made them)."""
    from promptcache.cache.semantic.embedding import SentenceTransformerEmbedder

    out = tmp_path / "tuned"
    args = _args(fit.add_arguments, ["--pairs", str(QQP), "--limit", "200", "--out", str(out),
                                     "--embedder", "--budget", "3", "--tune-layers", "1",
                                     "--keep-model"])
    assert fit.main(args) == 0
    params = json.loads((out / "verifier.json").read_text())
    tuned = SentenceTransformerEmbedder(tuning=out / "embedder.safetensors")
    assert params["embedder"] == tuned.name and tuned.name.startswith("all-MiniLM-L6-v2+")
    assert tuned.tuning_meta["layers"] == "5"
    base = SentenceTransformerEmbedder(tuning=None)
    text = ["How do I cook rice?"]
    assert not (tuned.encode(text) == base.encode(text)).all()


def test_a_tuning_file_that_is_not_ours_is_a_config_error(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    from promptcache.cache.errors import ConfigError
    from promptcache.cache.semantic.embedding import SentenceTransformerEmbedder

    alien = tmp_path / "alien.safetensors"
    save_file({"encoder.layer.5.output.dense.weight": np.zeros((3, 3), np.float32)},
              str(alien), metadata={"kind": "promptcache-embedder-tuning", "base": "other"})
    with pytest.raises(ConfigError, match="does not fit this model"):
        SentenceTransformerEmbedder(tuning=alien)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": np.zeros(2, np.float32)}, str(plain))
    with pytest.raises(ConfigError, match="not written by"):
        SentenceTransformerEmbedder(tuning=plain)


def _lookups(rows: list[tuple[float, int, bool]], texts: list[tuple[str, str]] | None = None
             ) -> pairs.Lookups:
    """Lookups from (similarity, label, own) rows."""
    texts = texts or [(f"q{i}", f"c{i}") for i in range(len(rows))]
    return pairs.Lookups([q for q, _ in texts], [c for _, c in texts],
                       np.array([r[0] for r in rows]), np.array([r[1] for r in rows]),
                       np.array([r[2] for r in rows]))


def test_raw_at_same_fhr_takes_the_baselines_best_threshold_at_no_higher_fhr() -> None:
    # 5 label-1 lookups (4 reachable), 10 label-0 ones
    raw = _lookups([(0.99, 1, True), (0.98, 0, False), (0.97, 1, True), (0.97, 1, True),
                    (0.96, 0, True), (0.95, 1, True), (0.5, 1, False)]
                   + [(0.3, 0, True)] * 8)
    got = hitrate.raw_at_same_fhr(raw, {"hr": 0.9, "fhr": 0.1})
    assert got["raw_hr_at_same_fhr"] == pytest.approx(0.6)
    assert got["raw_threshold_at_same_fhr"] == 0.97
    assert got["hr_vs_raw_at_same_fhr"] == pytest.approx(1.5)
    strict = hitrate.raw_at_same_fhr(raw, {"hr": 0.4, "fhr": 0.0})
    assert strict["raw_hr_at_same_fhr"] == pytest.approx(0.2)
    # a threshold takes every tied lookup or none: a false hit tied with the best true one
    tied = _lookups([(0.99, 1, True), (0.99, 0, True), (0.3, 0, True)])
    none = hitrate.raw_at_same_fhr(tied, {"hr": 0.1, "fhr": 0.0})
    assert none["raw_hr_at_same_fhr"] == 0.0 and none["hr_vs_raw_at_same_fhr"] is None


def test_false_hits_are_audited_and_give_a_label_noise_ceiling() -> None:
    texts = [("How do I ask a girl out?", "How do I ask a girl out."),  # label 0, same words
             ("Why is the sky blue?", "Why is the sea blue?"),  # label 0, other words
             ("How can I cook rice?", "How do I cook rice?"),  # true, same content words
             ("How can I learn Go?", "How do I learn Go?"),  # true, same content words
             ("How can I learn Rust?", "How do I start with Rust?"),  # true, other words
             ("a", "b"), ("c", "d"), ("e", "f")]
    test = _lookups([(0.99, 0, True), (0.98, 0, False), (0.99, 1, True), (0.99, 1, True),
                     (0.98, 1, True), (0.5, 0, True), (0.5, 0, True), (0.5, 1, True)], texts)
    hit = test.similarity >= 0.95
    audit = hitrate.audit_false_hits(test, hit)
    assert (audit["count"], audit["same_content_words"], audit["true_same_content_words"],
            audit["on_other_entry"]) == (2, 1, 2, 1)
    assert audit["examples"][0] == {"query": texts[0][0], "served": texts[0][1],
                                    "similarity": 0.99, "own_entry": True}
    ceiling = hitrate.noise_ceiling(test, audit, 0.25)
    assert ceiling is not None
    assert ceiling["label0_share_same_content"] == pytest.approx(1 / 3, abs=1e-4)
    # one false hit of 4 label-0 lookups buys two true hits of 4: HR 0.5 (raw there: 0.5)
    assert ceiling["hr"] == pytest.approx(0.5) and ceiling["hr_vs_raw"] == pytest.approx(1.0)
    assert hitrate.noise_ceiling(test, {**audit, "same_content_words": 0}, 0.25) is None
