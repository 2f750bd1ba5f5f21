"""Progress bars for long benchmark runs: tqdm on stderr, off when stderr is not a terminal
or the caller asked for quiet (so logs and CI output stay clean)."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


def progress(total: int | None, desc: str, *, quiet: bool = False, unit: str = "it") -> Any:
    """A tqdm bar writing to stderr; a disabled one (same API, no output) when quiet."""
    enabled = not quiet and sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled,
                dynamic_ncols=True, leave=False)


def add_quiet(parser: Any) -> None:
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar (it is also off when stderr is not a terminal)")
