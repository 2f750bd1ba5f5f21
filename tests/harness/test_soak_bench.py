"""``bench soak``: an endless mixed workload, and a short soak of its own sidecar (semantic
tier off) sampled every second, whose figures are those its samples give."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib.image
import pytest

from promptcache.benchmarks import soak
from promptcache.benchmarks.workload import Mix
from tests.support.paths import DATASETS

PROMPTS = DATASETS / "chat_prompts.jsonl.gz"


def test_traffic_keeps_the_mix_and_fresh_prompts_stay_new_past_the_file() -> None:
    """Shares near 50/30/20 and a fifth streamed; fresh prompts never repeat, even once the
    50 prompts are used up; repeats are of prompts sent before; requests go in order."""
    prompts = [f"How do I solve problem number {i} in chapter {i % 7}?" for i in range(50)]
    traffic = soak.Traffic(prompts, Mix(), seed=1)
    sent: set[str] = set()
    for i in range(2000):
        text = json.loads(traffic[i])["messages"][0]["content"]
        kind = traffic.kind(i).removesuffix("/stream")
        if kind == "fresh":
            assert text not in sent
        elif kind == "exact":
            assert text in sent
        else:  # a rewrite of a prompt sent before, never one of those not sent yet
            assert text not in set(prompts) - sent
        sent.add(text)
    kinds = [traffic.kind(i) for i in range(2000)]
    share = {k: sum(x.removesuffix("/stream") == k for x in kinds) / 2000
             for k in ("fresh", "exact", "paraphrase")}
    assert abs(share["fresh"] - 0.5) < 0.04 and abs(share["exact"] - 0.3) < 0.04
    assert abs(share["paraphrase"] - 0.2) < 0.04
    assert abs(sum(k.endswith("/stream") for k in kinds) / 2000 - 0.2) < 0.04
    assert traffic.fresh_reused > 0 and traffic.text(50) == prompts[0] + " (ref 1)"
    with pytest.raises(IndexError):
        traffic[5]  # already made: the closed loop asks for each request once, in order


def test_figures_come_from_the_samples_after_warm_up() -> None:
    """A ramp of 2 MB a minute after a warm-up spike: the spike is left out of the growth,
    the steady state and the slope."""
    samples = [{"t_s": t, "vm_rss_bytes": int((300 if t < 60 else 100 + 2 * t / 60) * 1e6)}
               for t in range(0, 601, 30)]
    m = soak.figures(samples, warmup_s=60)
    assert m["warmup_end_s"] == 60 and m["rss_at_warmup_end_bytes"] == 102_000_000
    assert m["growth"] == pytest.approx((120e6 - 102e6) / 102e6, abs=1e-6)
    assert m["growth_within_target"] is False
    assert m["slope_mb_per_min"] == pytest.approx(2.0)
    assert m["max_rss_after_warmup_bytes"] == 120_000_000
    assert m["steady_mean_rss_bytes"] == pytest.approx(111e6, abs=1)


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.skipif(not PROMPTS.exists(), reason=f"{PROMPTS} is not there (shared datasets)")
def test_short_soak_samples_memory_and_answers_every_request(tmp_path: Path) -> None:
    """15 s of traffic sampled every second: samples in time order with RSS and /stats's
    memory parts, every request answered (hits and misses, no error), the growth figure the
    samples give, and a PNG that decodes."""
    parser = argparse.ArgumentParser()
    soak.add_arguments(parser)
    args = parser.parse_args([
        "--minutes", "0.25", "--sample-seconds", "1", "--warmup-minutes", "0.05",
        "--semantic", "false", "--clients", "4", "--upstream-latency", "0.02",
        "--answer-words", "20", "--prompts", str(PROMPTS), "--quiet", "--out", str(tmp_path)])
    assert soak.main(args) == 0
    r = json.loads((tmp_path / "soak.json").read_text())

    samples = r["samples"]
    times = [s["t_s"] for s in samples]
    assert times == sorted(set(times)) and times[0] < 1 and 14 <= times[-1] <= 16
    assert len(samples) == 16 and r["sidecar_exit"] is None
    for s in samples:
        assert s["vm_rss_bytes"] > 20e6
        assert 0 < s["rss_anon_bytes"] + s["rss_file_bytes"] <= s["vm_rss_bytes"]
        # /stats answered; its parts vary by build, its total is there.
        assert s["stats_error"] is None and s["memory"]["rss_bytes"] > 20e6
        assert s["memory"].get("model_bytes", 0) == 0  # the semantic tier is off: no model
    answered = [s["answered"] for s in samples]
    assert answered == sorted(answered) and answered[-1] > answered[0]
    assert [s["entries"] for s in samples][-1] > 0

    q = r["requests"]
    assert q["errors"] == 0 and q["answered"] >= answered[-1] > 100
    assert set(q["x_cache"]) == {"HIT", "MISS"}  # semantic off: no SEMANTIC-HIT
    assert q["by_kind"]["exact"].get("HIT", 0) > 0 and "HIT" not in q["by_kind"]["fresh"]

    after = [s for s in samples if s["t_s"] >= 3]
    m = r["memory"]
    assert m["warmup_end_s"] == after[0]["t_s"] and m["samples"] == len(after)
    base, end = after[0]["vm_rss_bytes"], after[-1]["vm_rss_bytes"]
    assert m["growth"] == pytest.approx((end - base) / base, abs=1e-6)
    assert m["max_rss_after_warmup_bytes"] == max(s["vm_rss_bytes"] for s in after)
    assert m["steady_mean_rss_bytes"] == pytest.approx(
        statistics.fmean(s["vm_rss_bytes"] for s in after), abs=1)
    assert r["plan"]["plan_node_bytes"] > 0 and "max_rss" not in r

    png = tmp_path / r["plot"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert min(matplotlib.image.imread(png).shape[:2]) >= 200
    assert f"growth {m['growth']:+.1%}" in soak.report(r)


@pytest.mark.slow
@pytest.mark.timeout(90)
@pytest.mark.skipif(not PROMPTS.exists(), reason=f"{PROMPTS} is not there (shared datasets)")
def test_a_soak_of_two_workers_samples_each_and_reports_the_largest(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    soak.add_arguments(parser)
    args = parser.parse_args([
        "--minutes", "0.15", "--sample-seconds", "1", "--warmup-minutes", "0.03",
        "--semantic", "false", "--clients", "4", "--upstream-latency", "0.02",
        "--answer-words", "20", "--prompts", str(PROMPTS), "--workers", "2", "--quiet",
        "--out", str(tmp_path)])
    assert soak.main(args) == 0
    r = json.loads((tmp_path / "soak.json").read_text())

    assert r["setup"]["workers"] == 2 and r["requests"]["errors"] == 0
    sampled = [s for s in r["samples"] if s.get("workers_rss_bytes")]
    assert len(sampled) >= len(r["samples"]) - 1  # the first may come before both started
    for s in sampled:
        assert len(s["workers_rss_bytes"]) == 2 and all(b > 20e6 for b in s["workers_rss_bytes"])
        assert s["vm_rss_bytes"] == max(s["workers_rss_bytes"])  # the largest worker's
    assert "per worker (the largest of 2)" in soak.report(r)
