"""The harness's figures, as PNG files.

Drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas (no display, no
pyplot state shared between calls), from the same dicts the benchmarks write as JSON.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

#: Variant name in hitrate results -> legend label, in drawing order.
HITRATE_VARIANTS = {"raw": "raw cosine (baseline)",
                    "embedder": "raw cosine, tuned embedder", "rules": "rule checks",
                    "verifier": "verifier (as configured)"}
#: X-Cache value -> colour, so every latency plot reads the same way.
STATUS_COLOURS = {"HIT": "tab:green", "SEMANTIC-HIT": "tab:blue", "MISS": "tab:red",
                  "BYPASS": "tab:orange", "ERROR": "black"}


def _figure(width: float = 7.0, height: float = 4.5) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def hitrate_curves(result: Mapping[str, Any], path: str | Path, *, title: str = "") -> Path:
    """Hit rate against false-hit rate on the held-out split, one curve per configuration;
    each configuration's point chosen for FHR <= 1% is a circle, the default operating point
    a diamond, and the ``--target-fhr`` recommendation (if any) a star."""
    fig = _figure()
    ax = fig.add_subplot()
    variants = result["variants"]
    colours = {}
    tuned = result.get("embedding_tuning") not in (None, "None")
    for name, label in HITRATE_VARIANTS.items():
        if name not in variants or (name == "embedder" and not tuned):
            continue
        curve = variants[name]["test_curve"]
        fhr = [100 * r["fhr"] for r in curve]
        hr = [100 * r["hr"] for r in curve]
        (line,) = ax.plot(fhr, hr, marker=".", markersize=3, linewidth=1.2, label=label)
        colours[name] = line.get_color()
        chosen = variants[name].get("at_fhr_1pct", {})
        if chosen.get("threshold") is not None:
            ax.plot(100 * chosen["fhr"], 100 * chosen["hr"], "o", color=line.get_color(),
                    markersize=8, markerfacecolor="none", markeredgewidth=1.5)
    default = result.get("default", {})
    if default.get("threshold") is not None:
        ax.plot(100 * default["fhr"], 100 * default["hr"], "D", color="black", markersize=7,
                label=f"default (similarity >= {default['threshold']})")
    rec = result.get("recommendation") or {}
    if rec.get("test"):
        ax.plot(100 * rec["test"]["fhr"], 100 * rec["test"]["hr"], "*", color="crimson",
                markersize=15, label=f"recommended for FHR <= {100 * rec['target_fhr']:g}%")
    for x in (1, 5):
        ax.axvline(x, color="grey", linestyle=":", linewidth=0.8)
    top = max([100 * r["fhr"] for v in variants.values() for r in v["test_curve"]] + [6.0])
    ax.set_xlim(0, min(top * 1.02, 12.0))  # the region a cache can run in
    ax.set_ylim(bottom=0)
    ax.set_xlabel("false-hit rate on label-0 lookups (%)")
    ax.set_ylabel("hit rate on label-1 lookups (%)")
    ax.set_title(title or "Hit rate against false-hit rate (held-out split)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def latency_histogram(latencies_ms: Mapping[str, Sequence[float]], path: str | Path, *,
                      title: str = "", open_loop: bool = True) -> Path:
    """Latency histogram per X-Cache status on log-spaced bins (counts on a log axis)."""
    fig = _figure()
    ax = fig.add_subplot()
    values = [v for vs in latencies_ms.values() for v in vs if v > 0]
    if values:
        lo, hi = max(min(values), 1e-3), max(values)
        bins = np.geomspace(lo * 0.9, hi * 1.1 if hi > lo else lo * 2, 60).tolist()
        for status, vs in sorted(latencies_ms.items(), key=lambda kv: -len(kv[1])):
            if vs:
                ax.hist(vs, bins=bins, histtype="step", linewidth=1.5,
                        color=STATUS_COLOURS.get(status), label=f"{status} ({len(vs)})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_xlabel("latency (ms, from the scheduled send time)" if open_loop
                  else "latency (ms, from the send time)")
    ax.set_ylabel("requests")
    ax.set_title(title or "Latency by cache status", fontsize=10)
    ax.grid(True, alpha=0.3, which="both")
    return _save(fig, path)


def memory_bars(result: Mapping[str, Any], path: str | Path, *, title: str = "") -> Path:
    """Bytes per cached request: raw request + response, each tier's stored bytes in Redis,
    and the in-process index bytes per vector for each index kind."""
    fig = _figure(8.0, 4.0)
    left, right = fig.subplots(1, 2)
    per = result["per_entry"]
    labels = ["raw request\n+ response", "exact entry\n(Redis)", "vector record\n(Redis)"]
    values = [per["raw_request_bytes"] + per["raw_response_bytes"],
              per["exact_entry_bytes"], per["vector_record_bytes"] or 0]
    left.bar(labels, values, color=["grey", "tab:green", "tab:blue"])
    left.set_ylabel("bytes per entry (mean)")
    left.set_title("Redis: MEMORY USAGE per key", fontsize=9)
    kinds = result.get("index", [])
    right.bar([k["kind"] for k in kinds], [k["bytes_per_vector"] for k in kinds],
              color="tab:purple")
    right.set_ylabel("bytes per vector")
    right.set_title("Index (serialized FAISS)", fontsize=9)
    for ax in (left, right):
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(True, axis="y", alpha=0.3)
        for bar in ax.patches:
            ax.annotate(f"{bar.get_height():.0f}", (bar.get_x() + bar.get_width() / 2,
                                                    bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def soak_memory(r: Mapping[str, Any], path: str | Path) -> Path:
    """RSS over minutes with its parts (``/proc`` and ``/stats``), the end of warm-up and
    the ``--max-rss`` limit; the growth in the title."""
    fig = _figure(8.0, 4.5)
    ax = fig.add_subplot()
    samples, s = r["samples"], r["setup"]
    t = [x["t_s"] / 60 for x in samples]

    def line(values: list[float], label: str, **style: Any) -> None:
        ax.plot(t, [v / 1e6 for v in values], label=label, **style)

    line([x["vm_rss_bytes"] for x in samples], "RSS (VmRSS)", color="black", linewidth=2)
    for key, label in (("rss_anon_bytes", "RssAnon"), ("rss_file_bytes", "RssFile")):
        line([x.get(key, math.nan) for x in samples], label, linestyle="--", linewidth=1)
    drawn = {"rss_bytes", "max_rss_bytes"}  # VmRSS again, and the limit (a line below)
    parts = sorted({k for x in samples for k in (x["memory"] or {})
                    if k.endswith("_bytes") and k not in drawn})
    for key in parts:
        line([(x["memory"] or {}).get(key, math.nan) for x in samples],
             f"/stats {key.removesuffix('_bytes')}", linewidth=1)
    ax.axvline(s["warmup_minutes"], color="grey", linestyle=":", label="end of warm-up")
    if s["max_rss_bytes"]:
        ax.axhline(s["max_rss_bytes"] / 1e6, color="crimson", linestyle="--",
                   label=f"--max-rss {s['max_rss_bytes'] / 1e6:.1f} MB")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("minutes since the sidecar answered")
    ax.set_ylabel("MB")
    ax.set_title(f"bench soak: RSS growth after warm-up {r['memory']['growth']:+.1%} "
                 f"({s['minutes']:g} min, {s['clients']} clients, semantic "
                 f"{'on' if s['semantic'] else 'off'})", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(fig, path)
