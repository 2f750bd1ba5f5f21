"""bench audit: labelled pairs through sidecars with the audit on, off, and bounded."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from promptcache.benchmarks import audit

PAIRS = [
    ("How do I reset my password?", "How can I reset my password?", 1),
    ("What is the best way to learn Python?", "What's the best way to learn Python?", 1),
    ("How do I lose weight fast?", "How can I lose weight fast?", 1),
    ("What are good books to read?", "What are some good books to read?", 1),
    ("How do I become a better writer?", "How can I become a better writer?", 1),
    ("Why is the sky blue?", "Why is the sky blue in color?", 1),
    ("How do I learn to cook?", "How do I learn cooking?", 0),
    ("What is the meaning of life?", "What is the meaning of my life?", 0),
]


def test_audit_bench_reports_the_estimate_the_cost_and_the_bound(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"a": a, "b": b, "label": label}) + "\n"
                             for a, b, label in PAIRS))
    args = argparse.Namespace(
        pairs=str(pairs), limit=None, holdout=1.0, audit_rate=1.0, audited=5,
        max_false_hit_rate=0.01, start_rate=0.05, window=10, bound_hits=20,
        bound_requests=40, latency_rates=[1.0], cycles=1, round_requests=6, noise=0.0,
        exact_share=0.5, threshold=0.9, repeat=1, seed=1, out=str(tmp_path))
    assert audit.main(args) == 0
    r = json.loads((tmp_path / "audit.json").read_text())
    on = r["audit_on"]
    assert r["pairs"] == len(PAIRS) and on["semantic_hits"] > 0
    assert on["audited"] == on["semantic_hits"]  # R = 1: every semantic hit, no more
    assert on["audit_calls_per_semantic_hit"] == 1.0 and on["dropped"] == 0
    assert 0 <= on["estimate"] <= 1 and on["true_false_hit_rate"] is not None
    lat = r["latency"]
    assert set(lat["arms"]) == {"off", "off'", "R=1"}
    assert "SEMANTIC-HIT" in lat["arms"]["off"] and "SEMANTIC-HIT" in lat["arms"]["R=1"]
    assert lat["audit_counts"]["queued"] >= 1  # the R = 1 round audited its hits
    assert "R=1" in lat["differences_ms"]["SEMANTIC-HIT"]
    b = r["bound"]
    assert "windows" in b or "skipped" in b
    if "windows" in b:
        assert b["windows"] and b["requests"] <= 40 and b["semantic_hits"] <= 20
    printed = capsys.readouterr().out
    assert "latency, 1 cycles" in printed and "SEMANTIC-HIT less off: off'" in printed
