"""``bench exact`` on a small slice: floor, sidecar and sidecar with its near cache measured
side by side, one and two workers, and the coherence trials that look for a stale read."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from promptcache.benchmarks import exact


@pytest.mark.slow
def test_bench_exact_measures_every_server_workers_and_staleness(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    exact.add_arguments(parser)
    args = parser.parse_args(["--requests", "150", "--rounds", "1", "--concurrency", "4",
                              "--workers", "1", "2", "--trials", "5", "--out", str(tmp_path)])
    assert exact.main(args) == 0
    r = json.loads((tmp_path / "exact.json").read_text())

    level = r["levels"]["4"]
    assert set(level["median"]) == {"floor", "sidecar", "sidecar+near"}
    for name, runs in level["runs"].items():
        (run,) = runs
        assert run["errors"] == 0 and run["requests"] == 150
        if name != "floor":  # every request a hit (the check counts anything else an error)
            assert run["x_cache"] == {"HIT": 150}
        assert run["server_cpu_us_per_request"] > 0 and 0 < run["loadgen_cpu_share"] <= 1.5
    assert set(level["vs_floor"]) == {"sidecar", "sidecar+near"}

    w = r["workers"]
    for name in ("sidecar", "sidecar+near"):
        assert set(w[name]) == {"1", "2"} and w[name]["1"]["throughput_vs_fewest"] == 1.0
        assert w[name]["2"]["throughput_rps"] > 0

    for kind in ("delete", "overwrite"):
        c = r["coherence"][kind]
        assert c["trials"] == 5 and c["reads"] >= 5
        assert 0 <= c["stale_ms_p50"] <= c["stale_ms_p99"] <= c["stale_ms_max"] < 1000
    assert r["coherence"]["near_hits_on_b"] >= 5  # the trials really read a near cache
