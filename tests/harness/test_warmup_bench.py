"""bench warmup: a node loads stored vector records in the background, nothing embedded."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from promptcache.benchmarks import warmup


def test_warmup_bench_loads_every_record_without_embedding(tmp_path: Path) -> None:
    args = argparse.Namespace(vectors=3000, scopes=7, precise=True, out=str(tmp_path))
    assert warmup.main(args) == 0
    result = json.loads((tmp_path / "warmup.json").read_text())
    for node in ("first_stage", "precise"):
        r = result[node]
        assert r["vectors"] == 3000 and r["codes_computed"] == 0 and r["reembedded"] == 0
        assert r["start_returned_s"] <= r["loaded_s"]
        assert r["per_second"] > 0
    assert result["first_stage"]["index_bytes_per_vector"] <= 64  # codes and ids only
    assert result["precise"]["index_bytes_per_vector"] > 4 * warmup.DIM  # float32 vectors
