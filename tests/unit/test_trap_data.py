"""The bundled single-turn trap set (``benchmarks/data/traps.jsonl``) is well formed: it parses,
ships as package data, holds enough pairs of each kind, and no text repeats, so no two pairs
collide in a cache."""

from __future__ import annotations

import json
from collections import Counter
from importlib.resources import files

import pytest

TRAP_CATEGORIES = {"antonym", "number", "date", "negation", "role_swap", "entity", "quantifier",
                   "comparative", "unit", "scope"}


def fold(text: str) -> str:
    """Case and whitespace folded, as a cache key normaliser might see the text."""
    return " ".join(text.split()).casefold()


@pytest.fixture(scope="module")
def rows() -> list[dict[str, object]]:
    path = files("promptcache.benchmarks") / "data" / "traps.jsonl"
    assert path.is_file(), "traps.jsonl is not found through the installed package"
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        row = json.loads(line)
        assert isinstance(row, dict), f"line {number} is not an object"
        out.append(row)
    return out


def test_every_row_has_the_four_fields_with_the_right_types(rows: list[dict[str, object]]) -> None:
    for row in rows:
        assert set(row) == {"a", "b", "label", "category"}, row
        assert isinstance(row["a"], str) and row["a"].strip(), row
        assert isinstance(row["b"], str) and row["b"].strip(), row
        assert row["label"] in (0, 1) and not isinstance(row["label"], bool), row
        assert row["category"] in TRAP_CATEGORIES | {"paraphrase"}, row


def test_traps_are_label_0_and_paraphrases_label_1(rows: list[dict[str, object]]) -> None:
    for row in rows:
        assert row["label"] == (1 if row["category"] == "paraphrase" else 0), row


def test_there_are_at_least_300_traps_and_100_paraphrases(rows: list[dict[str, object]]) -> None:
    labels = Counter(row["label"] for row in rows)
    assert labels[0] >= 300
    assert labels[1] >= 100


def test_every_category_has_at_least_25_rows(rows: list[dict[str, object]]) -> None:
    counts = Counter(row["category"] for row in rows)
    assert set(counts) == TRAP_CATEGORIES | {"paraphrase"}
    assert min(counts.values()) >= 25, counts


def test_no_text_appears_twice_anywhere_in_the_file(rows: list[dict[str, object]]) -> None:
    texts = Counter(fold(str(row[side])) for row in rows for side in ("a", "b"))
    repeated = [text for text, count in texts.items() if count > 1]
    assert not repeated


def test_the_two_sides_of_a_pair_differ_after_folding(rows: list[dict[str, object]]) -> None:
    same = [row for row in rows if fold(str(row["a"])) == fold(str(row["b"]))]
    assert not same


def test_short_and_long_prompts_are_both_well_represented(rows: list[dict[str, object]]) -> None:
    """About half the pairs are short questions (5-12 words), about half long requests with
    context (20-45 words)."""
    words = [len(str(row["a"]).split()) for row in rows]
    short = sum(5 <= n <= 12 for n in words)
    long = sum(20 <= n <= 45 for n in words)
    assert short >= len(rows) // 3 and long >= len(rows) // 3, (short, long)
