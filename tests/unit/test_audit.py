"""The false-hit audit: estimator, control correction, interval, bound, queue, judge, pairs."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from promptcache.cache.entry import Answer
from promptcache.cache.protocols import Embedder
from promptcache.cache.semantic.audit import (
    AnswerJudge,
    Auditor,
    Tally,
    answer_text,
    corrected,
    enough,
    estimate,
    wilson,
)
from promptcache.cache.semantic.embedding import BatchingEmbedder
from tests.support.clock import FakeClock
from tests.support.sidecars import eventually


def chat(text: str) -> Answer:
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
    return Answer(200, json.dumps(body).encode(), "application/json")


def req(namespace: str = "", text: str = "how do I reset my password?") -> Any:
    return SimpleNamespace(api="chat", key=SimpleNamespace(namespace=namespace),
                           view=SimpleNamespace(text=text), streaming=False, body={})


class FixedJudge:
    """Disagrees when the two answers' bodies differ."""

    async def disagree(self, api: str, served: Answer, fresh: Answer) -> bool:
        return served.body != fresh.body


def test_wilson_interval_matches_the_textbook_values() -> None:
    lo, hi = wilson(5, 100)
    assert lo == pytest.approx(0.02154, abs=1e-4) and hi == pytest.approx(0.11175, abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)
    assert wilson(0, 381)[1] < 0.01 < wilson(0, 380)[1] + 1e-3
    assert enough(0.01) == 381


def test_the_control_is_taken_off_the_disagreement_rate() -> None:
    assert corrected(0.10, 0.0) == pytest.approx(0.10)
    assert corrected(0.10, 0.05) == pytest.approx(0.05 / 0.95)
    assert corrected(0.02, 0.05) == 0.0  # clipped: less disagreement than noise
    est = estimate(Tally(1000, 100), Tally(1000, 50))
    assert est.rate == pytest.approx((0.1 - 0.05) / 0.95)
    assert est.low <= est.rate <= est.high
    no_control = estimate(Tally(1000, 100), Tally())
    assert no_control.rate == pytest.approx(0.1)
    assert estimate(Tally(), Tally()).rate is None


def test_answer_text_reads_each_api_shape() -> None:
    assert answer_text("chat", chat("hi")) == "hi"
    msg = Answer(200, json.dumps({"content": [{"type": "text", "text": "yo"}]}).encode(), "")
    assert answer_text("messages", msg) == "yo"
    resp = Answer(200, json.dumps({"output": [{"type": "message", "content": [
        {"type": "output_text", "text": "r"}]}]}).encode(), "")
    assert answer_text("responses", resp) == "r"
    comp = Answer(200, json.dumps({"choices": [{"text": "c"}]}).encode(), "")
    assert answer_text("completions", comp) == "c"
    assert answer_text("chat", Answer(200, b"not json", "")) is None


def _auditor(**kw: Any) -> tuple[Auditor, list[Any]]:
    asked: list[Any] = []
    fresh = kw.pop("fresh", chat("same"))

    async def ask(r: Any, origin: Any) -> Answer:
        asked.append(r)
        return fresh

    a = Auditor(kw.pop("rate", 1.0), kw.pop("judge", FixedJudge()), threshold=0.9, **kw)
    a.connect(ask, spent=lambda r, ans: asked.append(("spent", ans is not None)))
    return a, asked


async def test_offers_are_sampled_at_the_rate_and_a_full_queue_drops() -> None:
    a, _ = _auditor(rate=0.5, queue=8, rng=random.Random(1))
    for _ in range(400):
        a.offer(req(), chat("x"), exact=False)
    assert a.counts["queued"] == 8  # never queued past the bound
    assert a.counts["dropped"] > 150  # about half of 400 sampled, 8 kept
    assert a.counts["queued"] + a.counts["dropped"] == pytest.approx(200, abs=30)


async def test_without_an_upstream_call_nothing_is_offered() -> None:
    a = Auditor(1.0, FixedJudge(), threshold=0.9)
    a.offer(req(), chat("x"), exact=False)
    assert a.counts["offered"] == 0 and a.stats()["pending"] == 0


async def test_the_worker_counts_disagreements_and_spends_each_call(tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.jsonl"
    a, asked = _auditor(fresh=chat("fresh"), pairs=str(pairs))
    a.offer(req("ns"), chat("fresh"), exact=False, candidate="reset my password?")
    a.offer(req("ns"), chat("stale"), exact=False, candidate="reset my email?")
    a.offer(req("ns"), chat("fresh"), exact=True)
    worker = asyncio.create_task(a.run())
    try:
        await eventually(lambda: a.overall.audited + a.control.audited == 3)
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
    s = a.stats()
    assert (s["audited"], s["disagreed"]) == (2, 1)
    assert s["control"] == {"audited": 1, "disagreed": 0, "rate": 0.0}
    assert s["namespaces"]["ns"]["audited"] == 2
    assert asked.count(("spent", True)) == 3
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert rows == [{"a": "reset my password?", "b": "how do I reset my password?", "label": 1},
                    {"a": "reset my email?", "b": "how do I reset my password?", "label": 0}]


def test_the_bound_raises_the_floor_then_turns_the_tier_off_then_retries() -> None:
    clock = FakeClock()
    a, _ = _auditor(max_rate=0.01, hold=60.0, clock=clock)
    assert a.floor("ns", None) == 0.9 and a.floor("ns", 0.95) == 0.95
    for _ in range(30):  # 10% false hits: the lower end is over 1% within 30
        a.record("ns", True, exact=False)
    assert a.floor("ns", None) == pytest.approx(0.92)
    assert a.exceeded("ns") and not a.exceeded("other")
    assert a.floor("other", None) == 0.9  # other namespaces keep theirs
    a.step = 0.05
    for _ in range(30):
        a.record("ns", True, exact=False)
    assert a.floor("ns", None) is None  # 0.9 + 2 * 0.05 > cap: off
    s = a.stats()
    assert s["namespaces"]["ns"]["off"] and [c["off"] for c in s["changes"]] == [False, True]
    clock.advance(61)
    assert a.floor("ns", None) == pytest.approx(0.95)  # tried again at the top floor


def test_the_bound_comes_back_down_on_a_clean_record() -> None:
    a, _ = _auditor(max_rate=0.01)
    for _ in range(30):
        a.record("ns", True, exact=False)
    assert a.floor("ns", None) == pytest.approx(0.92)
    for _ in range(enough(0.01) - 1):
        a.record("ns", False, exact=False)
    assert a.floor("ns", None) == pytest.approx(0.92)  # not yet enough for a clean record
    a.record("ns", False, exact=False)
    assert a.floor("ns", None) == 0.9 and not a.exceeded("ns")


def test_a_noisy_judge_on_true_hits_is_corrected_to_no_false_hits() -> None:
    a, _ = _auditor()
    for n in range(2000):  # the judge disagrees on 3% of same-by-construction answers
        a.record("", n % 33 == 0, exact=True)
    for n in range(400):  # and on as many of the semantic hits: none is false
        a.record("ns", n % 33 == 0, exact=False)
    ns = a.stats()["namespaces"]["ns"]
    assert ns["false_hit_rate"] < 0.005 and ns["interval"][0] == 0.0
    assert ns["disagreed"] / ns["audited"] > 0.02  # what an uncorrected estimate would say


async def test_the_default_judge_on_same_and_different_answers(embedder: Embedder) -> None:
    model = BatchingEmbedder(embedder)
    try:
        judge = AnswerJudge(model)
        same = chat("Open Settings, choose Security, then Reset password.")
        assert not await judge.disagree("chat", same, same)
        reworded = chat("Go to Settings, pick Security and then Reset password.")
        assert not await judge.disagree("chat", same, reworded)
        other = chat("The Eiffel Tower is 330 metres tall.")
        assert await judge.disagree("chat", same, other)
        numbers = chat("The Eiffel Tower is 300 metres tall.")
        assert await judge.disagree("chat", other, numbers)  # the rules: numbers differ
        vec = (await model.embed_background(["x"]))[0]
        assert np.isclose(np.linalg.norm(vec), 1.0, atol=1e-3)
    finally:
        await model.close()
