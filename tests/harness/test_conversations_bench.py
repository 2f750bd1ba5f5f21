"""``bench conversations``: the bundled labelled conversations are well formed, and the bench
replays a slice of them through its own sidecar and counts served pairs and false hits."""

from __future__ import annotations

import argparse
import hashlib
import json
from collections import Counter
from pathlib import Path

from promptcache.benchmarks import conversations


def test_bundled_conversations_are_well_formed_and_split_by_a_stable_hash() -> None:
    """At least 400 pairs over the four domains and seven kinds, labels matching kinds; every
    request a chat whose system prompt is shared within its pair and whose last message is
    the user's; about a third held out, by a hash of the id."""
    rows = conversations.read_conversations(conversations.DEFAULT_PAIRS)
    assert len(rows) >= 400 and len({r["id"] for r in rows}) == len(rows)
    assert set(Counter(r["domain"] for r in rows)) == {"support", "billing", "retail", "coding"}
    assert set(Counter(r["kind"] for r in rows)) == set(conversations.KINDS)
    for r in rows:
        a, b = r["a"], r["b"]
        assert a[0]["role"] == b[0]["role"] == "system" and a[0] == b[0], r["id"]
        for messages in (a, b):
            assert messages[-1]["role"] == "user"
            assert {m["role"] for m in messages[1:]} <= {"user", "assistant"}
            assert 1 <= sum(m["role"] == "user" for m in messages[1:-1]) <= 5
        held = int(hashlib.sha256(r["id"].encode()).hexdigest(), 16) % 3 == 0
        assert r["split"] == ("held_out" if held else "fit")
    held_out = sum(r["split"] == "held_out" for r in rows)
    assert 0.25 <= held_out / len(rows) <= 0.42


def test_bench_conversations_counts_served_and_false_hits_per_kind(tmp_path: Path) -> None:
    """A 12-pair slice (six of the kinds) runs through the sidecar: every ``a`` is a MISS, the
    counts add up per kind and label, and in strict mode (today's default) no multi-turn
    ``b`` is served, so there are no false hits either."""
    parser = argparse.ArgumentParser()
    conversations.add_arguments(parser)
    args = parser.parse_args(["--limit", "12", "--quiet", "--out", str(tmp_path)])
    assert conversations.main(args) == 0
    r = json.loads((tmp_path / "conversations.json").read_text())

    assert r["benchmark"] == "conversations"
    every = r["by_split"]["all"]
    assert every["label_0"]["pairs"] + every["label_1"]["pairs"] == 12
    assert sum(every[k]["pairs"] for k in conversations.KINDS if k in every) == 12
    assert all(key.startswith("MISS -> ") for key in r["x_cache"])
    assert every["label_0"]["false_hits"] == every["label_0"]["served"] == 0
    assert every["label_1"]["served"] == 0 and r["served_pairs"] == []


def test_dependent_mode_serves_small_talk_padded_pairs_and_no_trap(tmp_path: Path) -> None:
    """``--context-match dependent`` through the sidecar, on the pairs of two kinds: the same
    context with small talk around it is served at least sometimes, and a confirmation of a
    different offer never is."""
    rows = conversations.read_conversations(conversations.DEFAULT_PAIRS)
    picked = [r for r in rows if r["kind"] in ("context_smalltalk", "confirm_other_offer")]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in picked[:24]))
    parser = argparse.ArgumentParser()
    conversations.add_arguments(parser)
    args = parser.parse_args(["--pairs", str(pairs), "--context-match", "dependent",
                              "--quiet", "--out", str(tmp_path)])
    assert conversations.main(args) == 0
    r = json.loads((tmp_path / "conversations.json").read_text())

    every = r["by_split"]["all"]
    assert every["context_smalltalk"]["pairs"] > 0 and every["confirm_other_offer"]["pairs"] > 0
    assert every["context_smalltalk"]["served"] > 0
    assert every["confirm_other_offer"]["served"] == every["label_0"]["false_hits"] == 0
