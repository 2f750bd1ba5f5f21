"""This process's resident memory, split into the model, the vector index and the rest."""

from __future__ import annotations

import os
import resource
from typing import Any


def rss_bytes() -> int:
    """Current resident set size (Linux /proc); the peak (getrusage) elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def model_bytes(embedder: Any) -> int:
    """Bytes of a sentence-transformers model's parameters and buffers (0 if none)."""
    model = getattr(embedder, "model", None)
    if model is None or not hasattr(model, "parameters"):
        return 0
    tensors = [*model.parameters(), *model.buffers()]
    return int(sum(t.numel() * t.element_size() for t in tensors))


def memory_split(*, model: int = 0, index: int = 0) -> dict[str, int]:
    """RSS and its split: the model's weights, the index, and everything else."""
    rss = rss_bytes()
    return {"rss_bytes": rss, "model_bytes": model, "index_bytes": index,
            "other_bytes": max(0, rss - model - index)}
