"""Where things are: the repository, and the shared datasets beside it."""

from __future__ import annotations

from pathlib import Path

#: The repository's root.
ROOT = Path(__file__).resolve().parents[2]
#: The labelled pairs and chat prompts of ../shared/datasets (tests that need them skip
#: when they are absent).
DATASETS = ROOT.parent / "shared" / "datasets"
