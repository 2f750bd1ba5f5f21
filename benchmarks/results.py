"""Where every benchmark's figures go: a JSON file in --out, and a report on stdout."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any


def publish(result: dict[str, Any], out_dir: str, name: str, report: str) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=2))
    print(report)
    print(f"\nwrote {path}")
    return path


def command(args: argparse.Namespace) -> str | None:
    """The command line that ran this benchmark (None when not run through the CLI)."""
    argv = getattr(args, "argv", None)
    return "promptcache " + shlex.join(argv) if argv else None
