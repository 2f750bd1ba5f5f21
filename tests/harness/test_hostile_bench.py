"""``bench hostile`` on a small slice: its own sidecar (semantic tier on) answers exact hits
alone and beside huge and look-alike long prompts, every request is measured, and long
prompts that differ only past the model's window never share an answer."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from promptcache.benchmarks import hostile

BIG_CHARS = 200_000


@pytest.mark.slow
def test_bench_hostile_measures_exact_hits_beside_hostile_traffic(tmp_path: Path) -> None:
    """Both phases measure exact hits (HIT, positive latencies); phase B sends every
    hostile kind, each accepted (200) and sent upstream as a miss; the long prompts sharing
    their first 450 words are never answered from each other (too long for the window)."""
    parser = argparse.ArgumentParser()
    hostile.add_arguments(parser)
    args = parser.parse_args([
        "--duration", "1.5", "--warmup", "0.2", "--clients", "2", "--hostile-clients", "1",
        "--big-chars", str(BIG_CHARS), "--upstream-latency", "0.02", "--answer-words", "20",
        "--quiet", "--out", str(tmp_path)])
    assert hostile.main(args) == 0
    r = json.loads((tmp_path / "hostile.json").read_text())

    assert r["benchmark"] == "hostile" and r["setup"]["big_chars"] == BIG_CHARS
    for name in ("A", "B"):
        e = r["exact"][name]
        assert e["requests"] > 0 and e["status"] == {"200": e["requests"]}
        # All exact hits (a Redis call past its timeout on a busy machine would be a BYPASS).
        assert e["x_cache"].get("HIT", 0) >= 0.9 * e["requests"]
        assert 0 < e["p50_ms"] <= e["p95_ms"] <= e["p99_ms"] <= e["max_ms"]
        assert r["phases"][name]["cpu_seconds"]["sidecar"] > 0
    assert r["exact"]["B_over_A"]["p99_ratio"] > 0
    assert isinstance(r["target"]["exact_p99_under_limit"], bool)

    kinds = r["hostile"]["by_kind"]
    assert kinds["big"]["requests"] >= 1 and kinds["big"]["request_bytes_mean"] > BIG_CHARS
    assert kinds["pair"]["requests"] >= 2 and kinds["context"]["requests"] >= 2
    assert r["hostile"]["statuses"] == {"200": r["hostile"]["requests"]}
    for g in kinds.values():
        assert g["x_cache"].get("MISS", 0) > 0 and set(g["x_cache"]) <= {"MISS", "BYPASS"}
        assert 0 < g["p50_ms"] <= g["p99_ms"]
    # Every hostile request reached the upstream (a miss), big bodies whole.
    assert r["upstream"]["calls"] >= r["hostile"]["requests"] + 1
    assert r["upstream"]["bytes"] >= kinds["big"]["requests"] * BIG_CHARS

    assert r["long_context"]["sent"] >= 1 and r["long_context"]["wrongly_shared"] == 0
    assert r["target"]["long_context_never_shared"] is True
    assert r["pairs"]["sent"] >= 1 and r["pairs"]["shared"] == 0
    assert r["sidecar_semantic"]["too_long"] >= 1
