"""The savings ledger (cache/savings.py): the price table (TOML, validation, prefix
matching), usage read per API shape, the tallies and their bounds."""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

from promptcache.cache.cache_control import CacheControl
from promptcache.cache.entry import Answer
from promptcache.cache.errors import ConfigError
from promptcache.cache.keys import request_key, tenant_tag
from promptcache.cache.request import Prepared
from promptcache.cache.savings import (
    OTHER,
    BoundedLabels,
    Price,
    PriceTable,
    Savings,
    Usage,
    load_prices,
    parse_prices,
    read_answer,
    usage_of,
)
from promptcache.server.config import build_settings
from tests.support.paths import ROOT

EXAMPLE = ROOT / "docs" / "prices.example.toml"
MINI = Price(0.15, 0.60, 0.075)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "prices.toml"
    path.write_text(text)
    return str(path)


# --- the price table ----------------------------------------------------------------------


def test_the_documented_example_loads_and_says_prices_must_be_checked() -> None:
    table = load_prices(str(EXAMPLE))
    assert table.currency == "USD"
    assert table.models["gpt-4o-mini"] == MINI
    text = EXAMPLE.read_text()
    assert "PRICES CHANGE" in text and "never fetches" in text


def test_a_table_parses_currency_models_and_an_optional_cached_price(tmp_path: Path) -> None:
    table = load_prices(write(tmp_path, 'currency = "EUR"\n[models."m"]\n'
                                        "input_per_million = 1\noutput_per_million = 2.5\n"))
    assert table == PriceTable({"m": Price(1.0, 2.5, None)}, "EUR")
    assert load_prices(write(tmp_path, "")).currency == "USD"  # the default


@pytest.mark.parametrize(("text", "names"), [
    ('[models."m"]\ninput_per_million = 1\n', ["models.\"m\"", "output_per_million"]),
    ('[models."m"]\ninput_per_million = 1\noutput_per_million = 1\ninput = 3\n',
     ["models.\"m\"", "unknown", "input"]),
    ('[models."m"]\ninput_per_million = -1\noutput_per_million = 1\n',
     ["models.\"m\".input_per_million", ">= 0"]),
    ('[models."m"]\ninput_per_million = "cheap"\noutput_per_million = 1\n',
     ["models.\"m\".input_per_million"]),
    ('[models."m"]\ninput_per_million = true\noutput_per_million = 1\n',
     ["input_per_million"]),
    ('[models."m"]\ninput_per_million = nan\noutput_per_million = 1\n',
     ["input_per_million"]),
    ('[models]\nm = 3\n', ["models.\"m\"", "table"]),
    ('[models.""]\ninput_per_million = 1\noutput_per_million = 1\n', ["empty"]),
    ("models = 3\n", ["models must be a table"]),
    ("currency = 5\n", ["currency"]),
    ('currency = "USD"\nprice = 3\n', ["unknown", "price"]),
])
def test_a_bad_table_is_a_config_error_naming_the_key(tmp_path: Path, text: str,
                                                      names: list[str]) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_prices(path)
    message = str(info.value)
    assert path in message
    for name in names:
        assert name in message, message


def test_bad_toml_is_a_config_error_naming_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[models."m"]\ninput_per_million = = 1\n')
    with pytest.raises(ConfigError, match=r"not valid TOML.*line 2"):
        load_prices(path)


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.toml"):
        load_prices(str(tmp_path / "nope.toml"))


def test_the_prices_option_checks_the_table_at_start_up(tmp_path: Path) -> None:
    """--prices names the flag and the bad key; a good table's path is kept."""
    bad = write(tmp_path, '[models."m"]\ninput_per_million = 1\n')
    with pytest.raises(ConfigError, match=r"--prices: .*output_per_million"):
        build_settings({"upstream": "http://u.test", "prices": bad}, {})
    with pytest.raises(ConfigError, match="PROMPTCACHE_PRICES"):
        build_settings({"upstream": "http://u.test"}, {"PROMPTCACHE_PRICES": bad})
    s = build_settings({"upstream": "http://u.test", "prices": str(EXAMPLE)}, {})
    assert s.prices == str(EXAMPLE)


def test_models_match_exactly_then_by_the_longest_prefix() -> None:
    table = parse_prices({"models": {
        "gpt-4o": {"input_per_million": 2.5, "output_per_million": 10},
        "gpt-4o-mini": {"input_per_million": 0.15, "output_per_million": 0.6},
        "gpt-4o-mini-2024-07-18": {"input_per_million": 0.1, "output_per_million": 0.5}}})
    assert table.lookup("gpt-4o-mini-2024-07-18") == Price(0.1, 0.5)  # exact beats prefix
    assert table.lookup("gpt-4o-mini-2025-01-01") == Price(0.15, 0.6)  # longest prefix
    assert table.lookup("gpt-4o-2024-08-06") == Price(2.5, 10.0)
    assert table.lookup("gpt-4") is None and table.lookup("o1") is None


def test_cost_prices_cached_input_apart_and_defaults_it_to_the_input_price() -> None:
    usage = Usage(input=1_000_000, output=500_000, cached=400_000)
    assert MINI.cost(usage) == pytest.approx(0.6 * 0.15 + 0.4 * 0.075 + 0.5 * 0.60)
    assert Price(1.0, 2.0).cost(usage) == pytest.approx(1.0 + 1.0)


# --- usage, per API shape --------------------------------------------------------------------


@pytest.mark.parametrize(("api", "doc", "usage"), [
    ("chat", {"usage": {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42,
                        "prompt_tokens_details": {"cached_tokens": 8}}}, Usage(12, 30, 8)),
    ("completions", {"usage": {"prompt_tokens": 5, "completion_tokens": 7}}, Usage(5, 7)),
    ("embeddings", {"usage": {"prompt_tokens": 9, "total_tokens": 9}}, Usage(9, 0)),
    ("messages", {"usage": {"input_tokens": 10, "output_tokens": 20,
                            "cache_read_input_tokens": 100,
                            "cache_creation_input_tokens": 50}}, Usage(160, 20, 100)),
    ("responses", {"usage": {"input_tokens": 11, "output_tokens": 22, "total_tokens": 33,
                             "input_tokens_details": {"cached_tokens": 4}}}, Usage(11, 22, 4)),
    ("chat", {"choices": []}, Usage(0, 0)),  # a streamed answer stored without usage
    ("chat", {"usage": None}, Usage(0, 0)),
    ("chat", {"usage": {"prompt_tokens": -3, "completion_tokens": True}}, Usage(0, 0)),
    ("chat", [1, 2], Usage(0, 0)),
])
def test_usage_is_read_from_each_api_shape(api: str, doc: Any, usage: Usage) -> None:
    assert usage_of(api, doc) == usage


def test_read_answer_takes_the_answers_model_and_tolerates_junk() -> None:
    body = json.dumps({"model": "gpt-4o-mini-2024-07-18",
                       "usage": {"prompt_tokens": 3, "completion_tokens": 4}}).encode()
    assert read_answer("chat", body) == ("gpt-4o-mini-2024-07-18", Usage(3, 4))
    assert read_answer("chat", b"not json") == (None, Usage(0, 0))
    assert read_answer("chat", b"\xff\xfe") == (None, Usage(0, 0))
    assert read_answer("chat", b'"a string"') == (None, Usage(0, 0))


# --- the tallies ---------------------------------------------------------------------------


def prepared(model: str = "gpt-4o-mini", *, tenant: str = "t1", namespace: str = "",
             api: Any = "chat", content: str = "hi") -> Prepared:
    body = {"model": model, "messages": [{"role": "user", "content": content}]}
    key = request_key("/v1/chat/completions", body, tenant=tenant, namespace=namespace)
    return Prepared(api, "/v1/chat/completions", body, key, CacheControl(), False)


def answer(model: str | None = "gpt-4o-mini-2024-07-18", prompt: int = 100,
           completion: int = 50, *, deflate: bool = False) -> Answer:
    doc: dict[str, Any] = {"object": "chat.completion", "choices": [],
                           "usage": {"prompt_tokens": prompt, "completion_tokens": completion}}
    if model is not None:
        doc["model"] = model
    body = json.dumps(doc).encode()
    return Answer(200, zlib.compress(body) if deflate else body, "application/json", deflate)


def test_a_hit_counts_the_answers_usage_and_cost_by_model_namespace_and_tenant() -> None:
    savings = Savings(PriceTable({"gpt-4o-mini": MINI}))
    req = prepared(namespace="team-a", tenant="alice")
    savings.hit(req, answer())
    savings.hit(req, answer(deflate=True))  # an exact hit sent as stored, deflated
    stats = savings.stats()
    cost = 2 * (100 * 0.15 + 50 * 0.60) / 1e6
    assert stats["hits_counted"] == 2
    assert stats["tokens_saved"] == {"input": 200, "output": 100}
    assert stats["cost_saved"] == pytest.approx(cost) and stats["currency"] == "USD"
    assert stats["spent"] == {"calls": 0, "tokens": {"input": 0, "output": 0}, "cost": 0.0}
    assert stats["net_cost_saved"] == pytest.approx(cost)
    assert list(stats["by_model"]) == ["gpt-4o-mini-2024-07-18"]  # the answer's model
    assert list(stats["by_namespace"]) == ["team-a"]
    assert list(stats["by_tenant"]) == [tenant_tag("alice")]
    assert stats["by_tenant"][tenant_tag("alice")]["tokens_saved"] == {"input": 200,
                                                                       "output": 100}
    assert stats["unpriced_models"] == []
    assert [(m, ns, t.cost) for m, ns, t in savings.series()] == [
        ("gpt-4o-mini-2024-07-18", "team-a", pytest.approx(cost))]


def test_a_follower_fallback_counts_against_the_savings() -> None:
    savings = Savings(PriceTable({"gpt-4o-mini": MINI}))
    req = prepared()
    savings.hit(req, answer(prompt=1000, completion=1000))
    savings.spent(req, answer(prompt=100, completion=100))
    savings.spent(req, None)  # a call that failed: a call, no tokens
    stats = savings.stats()
    assert stats["spent"]["calls"] == 2
    assert stats["spent"]["tokens"] == {"input": 100, "output": 100}
    assert stats["spent"]["cost"] == pytest.approx(100 * 0.75 / 1e6)
    assert stats["net_cost_saved"] == pytest.approx(1000 * 0.75 / 1e6 - 100 * 0.75 / 1e6)
    assert stats["hits_counted"] == 1


def test_an_unpriced_model_counts_tokens_at_no_cost_and_is_listed() -> None:
    savings = Savings(PriceTable({"gpt-4o-mini": MINI}))
    savings.hit(prepared("llama-3"), answer(model=None))  # no model in the answer: request's
    savings.hit(prepared(""), answer(model=None))
    stats = savings.stats()
    assert stats["tokens_saved"] == {"input": 200, "output": 100}
    assert stats["cost_saved"] == 0.0
    assert stats["unpriced_models"] == ["llama-3", "unknown"]


def test_without_a_table_every_model_is_unpriced() -> None:
    savings = Savings()
    savings.hit(prepared(), answer())
    assert savings.stats()["unpriced_models"] == ["gpt-4o-mini-2024-07-18"]
    assert savings.stats()["cost_saved"] == 0.0


def test_bounded_labels_send_values_past_the_cap_to_other() -> None:
    labels = BoundedLabels(2)
    assert [labels(v) for v in ("a", "b", "c", "a", "d")] == ["a", "b", OTHER, "a", OTHER]
    assert len(labels) == 2


def test_hostile_label_values_cannot_grow_the_tallies_without_bound() -> None:
    """Distinct models, namespaces and tenants past the cap all land in "other"; the
    totals still count everything, and the cost of each is still its own model's."""
    savings = Savings(PriceTable({"gpt-4o-mini": MINI}), max_labels=5, memo_entries=8)
    for i in range(50):
        savings.hit(prepared(f"gpt-4o-mini-{i}", tenant=f"t{i}", namespace=f"ns{i}",
                             content=str(i)), answer(model=None))
    stats = savings.stats()
    assert stats["hits_counted"] == 50
    assert stats["cost_saved"] == pytest.approx(50 * (100 * 0.15 + 50 * 0.6) / 1e6)
    for dim in ("by_model", "by_namespace", "by_tenant"):
        assert len(stats[dim]) == 6 and stats[dim][OTHER]["hits_counted"] == 45
    assert len(list(savings.series())) == 6  # pairs too: 5 and (other, other)
    assert len(savings._memo) <= 8


def test_usage_is_parsed_once_per_entry() -> None:
    """The memo: a second hit on an entry reuses its parsed model and usage."""
    savings = Savings()
    req, first = prepared(), answer(prompt=7, completion=9)
    savings.hit(req, first)
    assert len(savings._memo) == 1
    savings.hit(req, Answer(200, b"junk of a different length", "application/json"))
    savings.hit(req, first)
    assert savings.stats()["tokens_saved"] == {"input": 14, "output": 18}


def test_a_memoised_hit_costs_microseconds() -> None:
    """The exact-hit path: counting one hit on a known entry stays cheap (measured here at
    a few microseconds; the bound is loose for shared CI machines)."""
    savings = Savings(load_prices(str(EXAMPLE)))
    req, ans = prepared(), answer()
    savings.hit(req, ans)
    n = 20_000
    started = time.perf_counter()
    for _ in range(n):
        savings.hit(req, ans)
    per_hit = (time.perf_counter() - started) / n
    assert per_hit < 50e-6, per_hit
