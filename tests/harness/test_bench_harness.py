"""The benchmark harness on small slices: each ``bench`` command runs, its JSON is sane and
its plots are PNG files that open; the load generator's open loop keeps its schedule."""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import matplotlib.image
import pytest

from promptcache.benchmarks import hitrate, load, loadgen, memory, report
from promptcache.benchmarks.workload import Mix, build, load_prompts, paraphrase
from promptcache.cache.semantic.embedding import SentenceTransformerEmbedder
from promptcache.cache.semantic.rules import rule_flags
from promptcache.testing import FakeUpstream, running_fake_upstream
from tests.support.paths import DATASETS
from tests.support.sidecars import RunningSidecar, start_sidecar

DATA = DATASETS
PROMPTS = DATA / "chat_prompts.jsonl.gz"
STSB = DATA / "stsb_pairs.jsonl.gz"
needs_data = pytest.mark.skipif(not (PROMPTS.exists() and STSB.exists()),
                                reason=f"{DATA} is not there (shared datasets)")
CHAT = "/v1/chat/completions"


def _args(add: Callable[[argparse.ArgumentParser], None], argv: list[str]
          ) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add(parser)
    return parser.parse_args(argv)


def assert_png(path: Path, min_side: int = 200) -> None:
    """A real PNG that decodes to an image of a plausible size."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) >= min_side, image.shape


# --- the workload and the load generator ------------------------------------------------------

def test_workload_follows_the_mix_deterministically() -> None:
    prompts = [f"How do I solve problem number {i} in chapter {i % 7}?" for i in range(2000)]
    mix = Mix(exact=0.3, paraphrase=0.2, stream=0.25)
    work = build(prompts, 2000, mix, seed=3)
    assert work == build(prompts, 2000, mix, seed=3)
    kinds = {k: sum(r.kind == k for r in work) for k in ("fresh", "exact", "paraphrase")}
    assert abs(kinds["exact"] / 2000 - 0.3) < 0.04 and abs(kinds["paraphrase"] / 2000 - 0.2) < 0.04
    assert abs(sum(r.stream for r in work) / 2000 - 0.25) < 0.04
    sent: set[str] = set()
    for r in work:
        if r.kind == "fresh":
            assert r.text not in sent
        elif r.kind == "exact":
            assert r.text in sent
        sent.add(r.text)
    assert json.loads(work[0].body())["messages"][0]["content"] == prompts[0]


def test_paraphrases_differ_but_keep_numbers_names_and_negation() -> None:
    for text in ["How do I convert 5 kg to lb?", "Can you explain what a B-tree is in Postgres?",
                 "I don't want to cancel my order #1234, what is the fix?"]:
        rewrites = {paraphrase(text, v) for v in range(12)}
        assert text not in rewrites and len(rewrites) >= 4
        for p in rewrites:  # the facts stay (contrast may still reject a one-word swap)
            flags = rule_flags(text, p)
            assert flags["numbers"] and flags["negation"] and flags["entities"], (text, p)


async def test_open_loop_keeps_sending_on_schedule_while_nothing_returns(
        fake: FakeUpstream) -> None:
    """Open loop: all requests go out while the upstream holds every answer, and latency
    counts from each request's scheduled time."""
    fake.hold()
    bodies = [json.dumps({"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]}
                         ).encode() for i in range(5)]
    task = asyncio.create_task(loadgen.replay(fake.url + CHAT, bodies, rate=50))
    await fake.wait_for_requests(5, CHAT)  # none answered yet
    fake.release()
    outcomes, seconds = await task
    assert [o.status for o in outcomes] == [200] * 5
    assert outcomes[0].latency is not None and outcomes[0].latency >= 4 / 50 - 0.005
    assert seconds >= 4 / 50


async def test_closed_loop_waits_for_answers(fake: FakeUpstream) -> None:
    fake.hold()
    bodies = [json.dumps({"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]}
                         ).encode() for i in range(4)]
    task = asyncio.create_task(loadgen.replay(fake.url + CHAT, bodies, concurrency=2))
    await fake.wait_for_requests(2, CHAT)
    with pytest.raises(TimeoutError):
        await fake.wait_for_requests(3, CHAT, within=0.3)
    fake.release()
    outcomes, _ = await task
    assert len(outcomes) == 4 and all(o.error is None for o in outcomes)


async def test_fake_upstream_pads_answers_and_reports_its_calls(
        http: aiohttp.ClientSession) -> None:
    """``answer_words`` makes answers of a realistic size, still a pure function of the
    request; ``GET /_fake/stats`` gives the call counts to a benchmark in another process."""
    async with running_fake_upstream(answer_words=40) as fake:
        body = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
        answers = []
        for _ in range(2):
            async with http.post(fake.url + CHAT, json=body) as r:
                answers.append((await r.json())["choices"][0]["message"]["content"])
        async with http.get(fake.url + "/_fake/stats") as r:
            stats = await r.json()
    assert answers[0] == answers[1] and len(answers[0].split()) >= 40 + 3
    assert stats["calls"] == {CHAT: 2} and stats["total"] == 2


# --- the bench commands, on small slices ------------------------------------------------------

@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory: pytest.TempPathFactory,
              embedder: SentenceTransformerEmbedder) -> Path:
    """One small run of bench load (own sidecar), memory and hitrate, in one results dir."""
    if not (PROMPTS.exists() and STSB.exists()):
        pytest.skip(f"{DATA} is not there (shared datasets)")
    out = tmp_path_factory.mktemp("bench")
    assert load.main(_args(load.add_arguments, [
        "--prompts", str(PROMPTS), "--requests", "80", "--concurrency", "8",
        "--semantic", "false", "--upstream-latency", "0.02", "--answer-words", "20",
        "--quiet", "--out", str(out / "load")])) == 0
    assert memory.main(_args(memory.add_arguments, [
        "--prompts", str(PROMPTS), "--entries", "24", "--quiet", "--out",
        str(out / "memory")]), embedder) == 0
    # A plain-text slice of STS-B with rows from each of its splits.
    rows: dict[str, list[str]] = {}
    with gzip.open(STSB, "rt") as lines:
        for line in lines:
            split = json.loads(line)["split"]
            if len(rows.setdefault(split, [])) < 60:
                rows[split].append(line)
    pairs = out / "stsb_slice.jsonl"
    pairs.write_text("".join(r for group in rows.values() for r in group))
    assert hitrate.main(_args(hitrate.add_arguments, [
        "--pairs", str(pairs), "--holdout", "0.5", "--target-fhr", "0.05", "--quiet",
        "--out", str(out / "hitrate")])) == 0
    return out


def _json(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


@needs_data
def test_bench_load_reports_latency_by_cache_status_and_saved_calls(bench_dir: Path) -> None:
    r = _json(bench_dir / "load" / "load.json")
    s = r["sidecar"]
    assert r["mode"] == "closed" and s["requests"] == 80 and s["errors"] == 0
    assert set(s["by_status"]) <= {"HIT", "MISS"} and s["by_status"]["HIT"]["requests"] > 0
    assert s["throughput_rps"] > 0 and 0 < s["p50_ms"] <= s["p95_ms"] <= s["p99_ms"]
    hit = s["by_status"]["HIT"]
    assert hit["p50_ms"] < s["by_status"]["MISS"]["p50_ms"]  # a miss waits for the upstream
    calls = r["upstream"]["calls"]
    # Followers of a coalesced miss also say MISS, so the fake saw at most that many calls.
    assert 0 < calls <= s["by_status"]["MISS"]["requests"]
    assert r["upstream"]["saved"] == 80 - calls >= hit["requests"]
    assert r["baseline"]["requests"] == 80 and r["baseline"]["errors"] == 0
    assert set(r["workload"]["kinds"]) == {"fresh", "exact", "paraphrase"}
    assert_png(bench_dir / "load" / "load.png")


def memory_max_chars() -> int:
    """bench memory's default --max-chars."""
    p = argparse.ArgumentParser()
    memory.add_arguments(p)
    return int(p.get_default("max_chars"))


@needs_data
def test_bench_memory_reports_bytes_per_entry_and_per_vector(
        bench_dir: Path, embedder: SentenceTransformerEmbedder) -> None:
    r = _json(bench_dir / "memory" / "memory.json")
    assert r["entries"] == 24
    # Every entry gets a vector record, except those whose prompt passes the model's window
    # (cached exactly only; the bench's default --max-chars keeps those few).
    prompts = load_prompts(PROMPTS, max_chars=memory_max_chars())[:24]
    fitting = sum(embedder.count_tokens(t) <= embedder.max_tokens for t in prompts)
    assert fitting >= 12
    assert r["redis"]["exact_entries"]["keys"] == 24
    assert r["redis"]["vector_records"]["keys"] == fitting
    p = r["per_entry"]
    assert p["raw_request_bytes"] > 50 and p["raw_response_bytes"] > 50
    # A vector record holds the text and a float16 vector (384 dims: 768 bytes).
    assert p["exact_entry_bytes"] > 50 and p["vector_record_bytes"] > 768
    sizes = {x["kind"]: x["bytes_per_vector"] for x in r["index"]}
    assert set(sizes) == {"flat", "sq8", "hnsw"}
    assert sizes["sq8"] < sizes["flat"] < sizes["hnsw"] and sizes["flat"] >= 384 * 4
    ba = r["budget_adherence"]
    # 24 small entries: Redis's fixed costs (the Lua scripts, dict and stream blocks) weigh
    # more than at a real fill, where the ratio is about 1 (the README's memory table).
    assert ba["counted_entries"] == 24 and 0.5 < ba["used_memory_growth_over_counted"] < 4
    pv = r["plan_vs_measured"]
    assert pv["planned_redis_bytes_per_entry"] > 860 and pv["redis_measured_over_planned"] > 0
    assert 0.5 < pv["index_measured_over_planned"] < 2
    assert_png(bench_dir / "memory" / "memory.png")


@needs_data
def test_bench_hitrate_plots_recommends_and_breaks_down_by_category(bench_dir: Path) -> None:
    r = _json(bench_dir / "hitrate" / "hitrate.json")
    rec = r["recommendation"]
    assert rec["target_fhr"] == 0.05
    if rec["config"] is not None:
        assert rec["train"]["fhr"] <= 0.05 and 0.70 <= rec["similarity_threshold"] < 1.0
        assert f"--similarity-threshold {rec['similarity_threshold']:g}" in rec["serve_flags"]
        assert set(rec["checks"]) == {"numbers", "negation", "entities", "contrast"}
    assert len(rec["candidates"]) == 17  # raw, 15 rule subsets, the verifier
    cats = r["categories"]
    assert cats["field"] == "split"
    assert set(cats["by_category"]) == {"train", "dev", "test"}
    assert sum(c["label1"] for c in cats["by_category"].values()) == r["lookups"]["test"][
        "label1"]
    for row in cats["by_category"].values():
        for name, point in row.items():
            if name not in ("label1", "label0"):
                assert 0 <= point["hr"] <= 1 and 0 <= point["fhr"] <= 1
    assert_png(bench_dir / "hitrate" / "hitrate.png")


@needs_data
def test_bench_report_gathers_the_results_into_one_page(bench_dir: Path, tmp_path: Path
                                                         ) -> None:
    page = report.build_page([bench_dir], tmp_path / "docs")
    text = page.read_text()
    for heading in ("## Semantic tier: hit quality: stsb_slice.jsonl",
                    "## Load test (closed loop, semantic tier off)", "## Memory per entry"):
        assert heading in text
    images = sorted((tmp_path / "docs" / "img").glob("*.png"))
    assert [i.name for i in images] == ["hitrate-stsb_slice.png", "load-closed-exact-only.png",
                                        "memory.png"]
    for image in images:
        assert f"(img/{image.name})" in text
        assert_png(image)
    assert "| X-Cache | requests |" in text and "| configuration | HR at FHR <= 1%" in text


@needs_data
async def test_bench_load_against_a_running_sidecar(
        fake: FakeUpstream, redis_url: str, embedder: SentenceTransformerEmbedder,
        sidecars: list[RunningSidecar], tmp_path: Path) -> None:
    """--target: the workload goes to the given sidecar; paraphrases get semantic hits and,
    one request at a time, the MISS count is exactly the upstream's call count."""
    # Vectors are computed while the model is idle, off the request path: an upstream that
    # takes a while, as real ones do, leaves it idle during each miss. A generous wait
    # budget keeps a loaded test machine from shedding the lookups themselves.
    fake.latency = 0.3
    semantic_sidecar = await start_sidecar(fake.url, redis_url, embedder=embedder,
                                           semantic_wait_budget=5.0)
    sidecars.append(semantic_sidecar)
    args = _args(load.add_arguments, [
        "--target", semantic_sidecar.url, "--prompts", str(PROMPTS), "--requests", "30",
        "--concurrency", "1", "--exact", "0.2", "--paraphrase", "0.5", "--max-chars", "300",
        "--quiet", "--out", str(tmp_path)])
    assert await asyncio.to_thread(load.main, args) == 0
    r = _json(tmp_path / "load.json")
    statuses = r["sidecar"]["by_status"]
    assert r["target"] == semantic_sidecar.url and r["sidecar"]["errors"] == 0
    assert statuses["SEMANTIC-HIT"]["requests"] > 0 and statuses["HIT"]["requests"] > 0
    assert r["upstream"]["calls"] == statuses["MISS"]["requests"] == fake.calls[CHAT]
    assert "baseline" not in r
    assert_png(tmp_path / "load.png")
