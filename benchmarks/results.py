"""Where every benchmark's figures go: a JSON file in --out, and a report on stdout."""

from __future__ import annotations

import json
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
