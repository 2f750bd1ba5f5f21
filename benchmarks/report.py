"""Gather the latest benchmark results into one Markdown page, with their plots.

Reads every ``*.json`` a benchmark wrote (through :func:`results.publish`) under the
``--results`` directories, keeps the newest of each kind (hit-rate results: the newest per
pair file; load results: per loop mode), copies their PNGs next to the page (``img/``) and
writes the page (default ``docs/benchmarks.md``) with each result's command, tables and
plot. Nothing is measured here: the page shows what the JSON files hold.

    promptcache bench report [--results bench-results ...] [--docs docs]
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from promptcache.benchmarks.registry import BENCHMARKS

#: Section order on the page; the module whose ``report()`` renders each kind. Other
#: benchmarks of ``promptcache bench`` follow, rendered by their own ``report()``.
KINDS = {
    "exact": "promptcache.benchmarks.exact",
    "semantic": "promptcache.benchmarks.semantic_speed",
    "hitrate": "promptcache.benchmarks.hitrate",
    "load": "promptcache.benchmarks.load",
    "memory": "promptcache.benchmarks.memory",
}
TITLES = {"exact": "Exact hits against a one-GET floor", "semantic": "Semantic tier: speed",
          "hitrate": "Semantic tier: hit quality", "load": "Load test",
          "memory": "Memory per entry"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", nargs="+", default=["bench-results"],
                   help="directories searched (recursively) for result JSON files "
                   "(default: bench-results)")
    p.add_argument("--docs", default="docs",
                   help="where the page and its img/ folder go (default: docs)")
    p.add_argument("--page", default="benchmarks.md", help="page file name (benchmarks.md)")


def modules() -> dict[str, str]:
    """Benchmark kind -> module: :data:`KINDS`, then the rest of the CLI's benchmarks."""
    return KINDS | {k: m for k, (m, _) in BENCHMARKS.items() if k not in KINDS | {"report": ""}}


def _kind(path: Path, data: dict[str, Any]) -> str | None:
    kind = data.get("benchmark") or path.stem
    return kind if kind in modules() else None


def _slot(kind: str, data: dict[str, Any]) -> str:
    """Results sharing a slot replace each other; the newest is shown."""
    if kind == "hitrate":
        return "hitrate-" + Path(str(data.get("pairs", ""))).name.split(".")[0]
    if kind == "load":
        exact_only = (data.get("setup") or {}).get("semantic") is False
        return f"load-{data.get('mode', 'closed')}{'-exact-only' if exact_only else ''}"
    return kind


def gather(dirs: Iterable[str | Path]) -> dict[str, tuple[Path, dict[str, Any]]]:
    """slot -> (path, result) of the newest result of each slot."""
    latest: dict[str, tuple[float, Path, dict[str, Any]]] = {}
    for d in dirs:
        for path in sorted(Path(d).rglob("*.json")):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            kind = _kind(path, data) if isinstance(data, dict) else None
            if kind is None:
                continue
            slot = _slot(kind, data)
            stamp = path.stat().st_mtime
            if slot not in latest or stamp > latest[slot][0]:
                latest[slot] = (stamp, path, data)
    order = {k: i for i, k in enumerate(modules())}
    return {slot: (p, d) for slot, (_, p, d) in sorted(
        latest.items(), key=lambda kv: (order[_kind(kv[1][1], kv[1][2]) or ""], kv[0]))}


def _markdown(text: str) -> list[str]:
    """A benchmark's text report as Markdown: table rows kept, other lines as bullets."""
    out: list[str] = []
    for line in text.splitlines():
        if line.startswith("|"):
            out.append(line)
        elif line.strip():
            if out and out[-1].startswith("|"):
                out.append("")
            out.append(f"- {line.strip()}")
        elif out and out[-1] != "":
            out.append("")
    return out


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def hitrate_markdown(r: dict[str, Any]) -> list[str]:
    lines = [f"Pairs: `{r.get('pairs')}` (held-out share {r.get('holdout')}; lookups on the "
             f"held-out split: {r['lookups']['test']['label1']} label-1, "
             f"{r['lookups']['test']['label0']} label-0). Thresholds chosen on the train "
             "split, figures from the held-out split.", "",
             "| configuration | HR at FHR <= 1% | FHR | threshold | x raw | HR at FHR <= 5% "
             "| FHR | threshold | x raw |", "|---|---|---|---|---|---|---|---|---|"]
    for name, v in r["variants"].items():
        cells = []
        for key in ("at_fhr_1pct", "at_fhr_5pct"):
            c = v[key]
            if c.get("threshold") is None:
                cells.append("n/a | | |")
            else:
                cells.append(f"{_pct(c['hr'])} | {c['fhr']:.2%} | {c['threshold']:.4f} | "
                             f"{c.get('hr_vs_raw', 0):.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    d = r.get("default") or {}
    if d.get("threshold") is not None:
        lines += ["", f"- Default settings (verifier on, similarity >= {d['threshold']}): "
                  f"HR {_pct(d['hr'])}, FHR {d['fhr']:.2%}, precision {d['precision']:.0%}."]
        if d.get("hr_vs_raw_at_same_fhr"):
            lines.append(f"- Raw cosine at that false-hit rate (its best threshold on the "
                         f"held-out split): HR {_pct(d['raw_hr_at_same_fhr'])}; the default "
                         f"gives {d['hr_vs_raw_at_same_fhr']:.2f}x.")
        f = d.get("false_hits")
        if f and f["count"]:
            lines.append(f"- The default's {f['count']} false hits: {f['same_content_words']} "
                         f"keep every content word of the entry served (as do "
                         f"{f['true_same_content_words']} true hits), {f['on_other_entry']} "
                         f"are on another pair's entry.")
        c = d.get("ceiling")
        if c and c.get("hr_vs_raw"):
            lines.append(f"- Label-noise ceiling (an estimate): with "
                         f"{c['label0_share_same_content']:.0%} of same-content hits labelled "
                         f"0, a perfect judge of meaning would reach about HR {_pct(c['hr'])} "
                         f"at FHR {d['fhr']:.2%} ({c['hr_vs_raw']:.2f}x raw).")
    rec = r.get("recommendation")
    if rec and rec.get("config"):
        t = rec["test"]
        lines += [f"- Recommended for FHR <= {rec['target_fhr']:.1%}: `{rec['config']}` -> "
                  f"held-out HR {_pct(t['hr'])}, FHR {t['fhr']:.2%}; run the sidecar with "
                  f"`{rec['serve_flags']}`."]
    elif rec:
        lines += [f"- Recommendation for FHR <= {rec['target_fhr']:.1%}: {rec.get('note')}"]
    cats = r.get("categories")
    if cats:
        names = [k for k in next(iter(cats["by_category"].values())) if k not in (
            "label1", "label0")]
        lines += ["", f"By `{cats['field']}` (held-out lookups; HR / FHR at each chosen "
                  "point):", "", "| " + " | ".join(["category", "label 1", "label 0", *names])
                  + " |", "|" + "---|" * (3 + len(names))]
        for cat, row in cats["by_category"].items():
            lines.append(f"| {cat} | {row['label1']} | {row['label0']} | " + " | ".join(
                f"{_pct(row[n]['hr'])} / {row[n]['fhr']:.1%}" for n in names) + " |")
    return lines


def title(path: Path, result: dict[str, Any]) -> str:
    kind = _kind(path, result) or ""
    text = TITLES.get(kind, f"bench {kind}")
    if kind == "hitrate":
        text += f": {Path(str(result.get('pairs', ''))).name}"
    elif kind == "load":
        exact_only = (result.get("setup") or {}).get("semantic") is False
        text += (f" ({result.get('mode', 'closed')} loop"
                 f"{', semantic tier off' if exact_only else ''})")
    return text


def section(slot: str, path: Path, result: dict[str, Any], img_dir: Path) -> list[str]:
    kind = _kind(path, result) or slot
    heading = title(path, result)
    lines = [f"## {heading}", ""]
    if result.get("command"):
        lines += ["```bash", result["command"], "```", ""]
    lines.append(f"Result: `{path.name}`, measured {result.get('date', 'at an unrecorded time')}"
                 " UTC.")
    lines.append("")
    if kind == "hitrate":
        lines += hitrate_markdown(result)
    else:
        lines += _markdown(importlib.import_module(modules()[kind]).report(result))
    plot = result.get("plot")
    if plot and (path.parent / plot).exists():
        img_dir.mkdir(parents=True, exist_ok=True)
        target = img_dir / f"{slot}.png"
        shutil.copyfile(path.parent / plot, target)
        lines += ["", f"![{heading}]({img_dir.name}/{target.name})"]
    return [*lines, ""]


def build_page(dirs: Iterable[str | Path], docs: str | Path, page: str = "benchmarks.md"
               ) -> Path:
    docs = Path(docs)
    docs.mkdir(parents=True, exist_ok=True)
    found = gather(dirs)
    lines = ["# Benchmarks", "",
             "Generated by `promptcache bench report` from the latest result of each "
             f"benchmark ({time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC). Each section "
             "gives the command that produced it; run it to reproduce the figure. Figures "
             "come from a 2-core development machine where the load generator shares the "
             "CPU with the servers: compare ratios and shapes, not absolute numbers.", ""]
    lines += [f"- [{title(p, d)}](#{s})" for s, (p, d) in found.items()]
    lines.append("")
    for slot, (path, result) in found.items():
        lines += [f'<a id="{slot}"></a>', ""]
        lines += section(slot, path, result, docs / "img")
    target = docs / page
    target.write_text("\n".join(lines).rstrip() + "\n")
    return target


def main(args: argparse.Namespace) -> int:
    target = build_page(args.results, args.docs, args.page)
    print(f"wrote {target}")
    return 0
