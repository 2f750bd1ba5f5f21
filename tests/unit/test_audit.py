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

    a = Auditor(kw.pop("rate", 1.0), kw.pop("judge", FixedJudge()),
                threshold=kw.pop("threshold", 0.9), **kw)
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


def _stream(a: Auditor, n: int, false_at: Any, rng: random.Random, ns: str = "ns",
            noise: float = 0.0) -> list[float | None]:
    """``n`` semantic hits at similarities drawn uniformly over [0.85, 1) and served while
    the namespace's floor lets them through (the rest miss), each false where
    ``false_at(similarity)`` says; the judge also disagrees on a share ``noise`` of all
    audits (the control too). Returns the floor after each hit."""
    floors = []
    for _ in range(n):
        floor = a.floor(ns, None)
        a.record("", rng.random() < noise, exact=True)
        s = rng.uniform(0.85, 1.0)
        if floor is not None and s >= floor:
            a.record(ns, bool(false_at(s)) or rng.random() < noise, exact=False,
                     similarity=s, level=a.namespaces[ns].level if ns in a.namespaces else 0)
        floors.append(a.floor(ns, None))
    return floors


def test_the_floor_rises_at_once_above_false_hits_at_low_similarity() -> None:
    """7% of hits are false, all under 0.86: the floor goes just above them in one change
    within two hundred audits, and holds there (its record stays clean)."""
    a, _ = _auditor(max_rate=0.01, threshold=0.85, rng=random.Random(3))
    floors = _stream(a, 2000, lambda s: s < 0.86, random.Random(7))
    first = next(n for n, f in enumerate(floors) if f != 0.85)
    assert first < 200 and set(floors[first:]) == {0.86}
    assert [c["floor"] for c in a.changes] == [0.86]
    assert a.stats()["namespaces"]["ns"]["recorded"] == a.namespaces["ns"].total.audited


def test_with_a_noisy_judge_the_floor_still_goes_above_the_false_hits_and_stays() -> None:
    """The same with a judge that disagrees on 2% of all answers (the control sees it too):
    the floor passes the false hits within a few hundred audits and never comes back among
    them (noise may raise it further: the bound errs toward fewer hits)."""
    a, _ = _auditor(max_rate=0.01, threshold=0.85, rng=random.Random(3))
    floors = _stream(a, 2000, lambda s: s < 0.8575, random.Random(7), noise=0.02)
    first = next(n for n, f in enumerate(floors) if f is not None and f >= 0.8575)
    assert first < 400
    assert all(f is not None and f >= 0.8575 for f in floors[first:])


def test_false_hits_at_every_similarity_turn_the_tier_off_then_it_is_tried_again() -> None:
    """5% of hits false at any similarity: no floor is under 1%, the tier is turned off in
    the namespace (only there), and after ``hold`` it is tried again at the top floor."""
    clock = FakeClock()
    a, _ = _auditor(max_rate=0.01, threshold=0.85, hold=60.0, clock=clock)
    rng = random.Random(11)
    floors = _stream(a, 2000, lambda s: rng.random() < 0.05, random.Random(5))
    assert floors[-1] is None and a.floor("other", None) == 0.85
    off = next(n for n, f in enumerate(floors) if f is None)
    assert off < 1500 and all(f is None for f in floors[off:])
    s = a.stats()
    assert s["namespaces"]["ns"]["off"] and s["changes"][-1]["off"]
    assert a.exceeded("ns") and not a.exceeded("other")
    clock.advance(61)
    assert a.floor("ns", None) == pytest.approx(0.99)  # the top floor, its record afresh
    assert a.stats()["namespaces"]["ns"]["recorded"] == 0
    assert a.stats()["changes"][-1]["why"] == "tried again after hold"


def test_a_clean_stream_brings_the_floor_down_a_step_at_a_time() -> None:
    """Raised by false hits at low similarity, then a clean stream: once the record no
    longer shows the floor below over the bound, the floor steps down, one step per full
    clean record, to the configured floor."""
    a, _ = _auditor(max_rate=0.01, threshold=0.85, keep=500, rng=random.Random(3))
    _stream(a, 600, lambda s: s < 0.87, random.Random(1))
    raised = a.namespaces["ns"].level
    assert raised >= 2 and a.exceeded("ns")
    floors = _stream(a, 6000, lambda s: False, random.Random(2))
    assert floors[-1] == 0.85 and not a.exceeded("ns")
    downs = [c for c in a.changes if "a step down" in c["why"]]
    assert [c["level"] for c in downs] == list(range(raised - 1, -1, -1))


def test_the_record_is_a_sample_of_each_floor_and_is_bounded() -> None:
    """A hit at similarity s served under floor f counts for every floor from f to s; the
    record keeps the last ``keep`` audits."""
    a, _ = _auditor(threshold=0.85, keep=3)
    a.record("ns", True, exact=False, similarity=0.874, level=0)  # floors 0.85 .. 0.87
    a.record("ns", False, exact=False, similarity=0.999, level=2)  # 0.87 .. 0.99
    ev = a.namespaces["ns"].evidence()
    assert [(t.audited, t.disagreed) for t in ev[:4]] == [(1, 1), (1, 1), (2, 1), (1, 0)]
    assert (ev[-1].audited, len(ev)) == (1, 15)
    for _ in range(3):
        a.record("ns", False, exact=False, similarity=0.9, level=0)
    ev = a.namespaces["ns"].evidence()
    assert [t.audited for t in ev[:7]] == [3, 3, 3, 3, 3, 3, 0]  # the first two are gone
    assert sum(t.disagreed for t in ev) == 0 and a.namespaces["ns"].total.audited == 5


async def test_a_hits_similarity_and_floor_reach_the_record_through_the_worker() -> None:
    """offer() keeps the hit's similarity and the floor it was served under."""
    a, _ = _auditor(threshold=0.85, fresh=chat("x"))
    a.offer(req("ns"), chat("x"), exact=False, similarity=0.93)
    worker = asyncio.create_task(a.run())
    try:
        await eventually(lambda: a.overall.audited == 1)
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
    assert list(a.namespaces["ns"].records) == [(0, 8, False)]


async def test_the_worker_waits_while_the_model_is_busy_and_drops_stale_audits() -> None:
    """No upstream call while ``busy`` says the request path's model has work; an audit that
    waited past ``max_wait`` is dropped and counted ``expired``; then the next one runs."""
    clock = FakeClock()
    busy = [True]
    a, asked = _auditor(busy=lambda: busy[0], pause=0.001, max_wait=5.0, clock=clock)
    a.offer(req("ns"), chat("same"), exact=False, similarity=0.95)
    worker = asyncio.create_task(a.run())
    try:
        for _ in range(20):
            await asyncio.sleep(0.002)
        assert asked == [] and a.counts["expired"] == 0  # waiting, not asking
        clock.advance(6)
        await eventually(lambda: a.counts["expired"] == 1)
        assert asked == []  # dropped without a call
        busy[0] = False
        a.offer(req("ns"), chat("same"), exact=False, similarity=0.95)
        await eventually(lambda: a.overall.audited == 1)
    finally:
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
    assert len([x for x in asked if not isinstance(x, tuple)]) == 1


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
