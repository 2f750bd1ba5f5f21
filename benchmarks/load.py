"""Load test: replay a workload of real prompts against a sidecar, closed or open loop.

Against a running sidecar (``--target URL``), or one this command starts itself: a
private Redis, the fake upstream (``--upstream-latency`` seconds per call, answers padded
to ``--answer-words``) and ``promptcache serve`` in front of it, each in its own process.

The workload (:mod:`promptcache.benchmarks.workload`) mixes fresh prompts, exact repeats,
paraphrase-like repeats and streamed requests in the given shares. At a fixed
``--concurrency`` (closed loop) or a fixed ``--rate`` per second (open loop: requests go out
on schedule whether or not earlier ones returned, and latency counts from the scheduled
time, so an overloaded sidecar cannot hide it).

Reported: throughput, p50/p95/p99 per X-Cache status and per request kind, upstream calls
(counted by the fake upstream; with --target, estimated as the MISS and BYPASS answers)
and the calls the cache saved, errors, and the tokens and cost the hits saved (the
sidecar's ``/stats`` ``savings`` at the end; its own sidecar prices them with ``--prices``,
by default the example table docs/prices.example.toml). With ``--baseline`` (own sidecar
only) the same workload also goes straight to the fake upstream, the no-cache figure of the
same run.
Writes ``load.json`` (with every latency, by X-Cache status, so the plot can be redrawn) and
``load.png`` (latency histogram by cache status) to ``--out``.

    promptcache bench load [--target URL] [--prompts FILE] [--requests 2000]
                           [--concurrency 32 | --rate 20] [--exact 0.3] [--paraphrase 0.2]
                           [--stream 0.2] [--upstream-latency 0.3] [--semantic true]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from promptcache.benchmarks import plots
from promptcache.benchmarks.loadgen import Outcome, replay
from promptcache.benchmarks.procs import free_port, python_process
from promptcache.benchmarks.progress import add_quiet, progress
from promptcache.benchmarks.results import command, publish
from promptcache.benchmarks.workload import DEFAULT_PROMPTS, Mix, Request, build, load_prompts
from promptcache.cache.redis.embedded import EmbeddedRedis

CHAT = "/v1/chat/completions"
HEADERS = {"Authorization": "Bearer sk-bench"}
#: The documented example price table, which the bench's own sidecar is given.
EXAMPLE_PRICES = Path(__file__).resolve().parents[1] / "docs" / "prices.example.toml"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", metavar="URL", default=None,
                   help="base URL of a running sidecar (default: start one, with a fake "
                   "upstream and a private Redis)")
    p.add_argument("--prompts", default=DEFAULT_PROMPTS, metavar="FILE",
                   help=f"JSON lines with a 'prompt' field (default: {DEFAULT_PROMPTS})")
    p.add_argument("--requests", type=int, metavar="N", default=2000,
                   help="requests to send (default 2000)")
    loop = p.add_mutually_exclusive_group()
    loop.add_argument("--concurrency", type=int, metavar="N", default=None,
                      help="closed loop: this many requests in flight (default 32)")
    loop.add_argument("--rate", type=float, metavar="PER_S", default=None,
                      help="open loop: send this many requests per second on schedule")
    p.add_argument("--exact", type=float, metavar="SHARE", default=0.3,
                   help="share of exact repeats (0.3)")
    p.add_argument("--paraphrase", type=float, metavar="SHARE", default=0.2,
                   help="share of paraphrase-like repeats (0.2)")
    p.add_argument("--stream", type=float, metavar="SHARE", default=0.2,
                   help="share of streamed requests (0.2)")
    p.add_argument("--max-chars", type=int, metavar="N", default=1000,
                   help="longest prompt taken from the file (default 1000 characters)")
    p.add_argument("--seed", type=int, metavar="N", default=0, help="workload seed (default 0)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", default=60.0,
                   help="seconds a request may take before it counts as an error (60)")
    own = p.add_argument_group("own sidecar (without --target)")
    own.add_argument("--upstream-latency", type=float, metavar="SECONDS", default=0.3,
                     help="seconds the fake upstream takes per call (default 0.3)")
    own.add_argument("--answer-words", type=int, metavar="N", default=150,
                     help="filler words in each fake answer (default 150)")
    own.add_argument("--semantic", type=_bool, default=True, metavar="BOOL",
                     help="the sidecar's semantic tier (default true; loads the model)")
    own.add_argument("--prices", metavar="FILE",
                     default=str(EXAMPLE_PRICES) if EXAMPLE_PRICES.exists() else "",
                     help="the sidecar's price table (default: the example, "
                     "docs/prices.example.toml; '' for none)")
    own.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                     help="also replay the workload straight at the fake upstream (default on)")
    p.add_argument("--out", default="bench-results", metavar="DIR",
                   help="directory for load.json, load.png")
    add_quiet(p)


def _bool(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _ms(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "mean_ms": None}
    data = sorted(values)

    def pct(p: float) -> float:
        return round(data[min(len(data) - 1, round(p / 100 * (len(data) - 1)))] * 1e3, 3)

    return {"p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99),
            "mean_ms": round(statistics.fmean(data) * 1e3, 3)}


def summarise(workload: Sequence[Request], outcomes: Sequence[Outcome], seconds: float
              ) -> dict[str, Any]:
    """Throughput, latency percentiles per X-Cache status and per request kind, errors."""
    ok = [o for o in outcomes if o.error is None and o.latency is not None]
    by_status: dict[str, list[Outcome]] = {}
    by_kind: dict[str, list[Outcome]] = {}
    for o in outcomes:
        by_status.setdefault(o.x_cache, []).append(o)
        by_kind.setdefault(workload[o.index].kind + ("/stream" if workload[o.index].stream
                                                     else ""), []).append(o)

    def group(items: list[Outcome]) -> dict[str, Any]:
        lat = [o.latency for o in items if o.error is None and o.latency is not None]
        tags: dict[str, int] = {}
        for o in items:
            tags[o.x_cache] = tags.get(o.x_cache, 0) + 1
        return {"requests": len(items), "errors": sum(o.error is not None for o in items),
                **_ms(lat), "x_cache": dict(sorted(tags.items()))}

    errors: dict[str, int] = {}
    for o in outcomes:
        if o.error is not None:
            errors[o.error] = errors.get(o.error, 0) + 1
    return {
        "requests": len(outcomes), "completed": len(ok), "errors": sum(errors.values()),
        "error_kinds": errors, "seconds": round(seconds, 3),
        "throughput_rps": round(len(ok) / seconds, 2) if seconds else 0.0,
        **_ms([o.latency for o in ok if o.latency is not None]),
        "ttfb": _ms([o.ttfb for o in ok if o.ttfb is not None]),
        "by_status": {k: group(v) for k, v in sorted(by_status.items())},
        "by_kind": {k: group(v) for k, v in sorted(by_kind.items())},
    }


async def _run_phase(url: str, bodies: list[bytes], args: argparse.Namespace, desc: str
                     ) -> tuple[list[Outcome], float]:
    with progress(len(bodies), desc, quiet=args.quiet, unit="req") as bar:
        return await replay(url + CHAT, bodies, concurrency=args.concurrency, rate=args.rate,
                            headers=HEADERS, request_timeout=args.timeout,
                            on_done=lambda _o: bar.update(1))


def _get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return dict(json.load(r))


def upstream_calls(upstream: str) -> int:
    return int(_get_json(upstream + "/_fake/stats")["calls"].get(CHAT, 0))


def _sidecar_stats(url: str) -> dict[str, Any] | None:
    """The sidecar's /stats after the run (its semantic tier's counts: what was shed, what
    the first stage answered...); None if it does not answer."""
    try:
        return _get_json(url + "/stats")
    except (OSError, ValueError):
        return None


@contextmanager
def own_sidecar(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """(sidecar URL, fake upstream URL), each in its own process, on a private Redis."""
    with tempfile.TemporaryDirectory(prefix="pc-bench-") as tmp, \
            EmbeddedRedis(Path(tmp) / "redis", persistence=False) as store:
        up_port, sc_port = free_port(), free_port()
        upstream, sidecar = f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{sc_port}"
        with python_process(["-m", "promptcache.testing", "--port",
                             str(up_port), "--latency", str(args.upstream_latency),
                             "--answer-words", str(args.answer_words)],
                            upstream + "/v1/models"), \
                python_process(["-m", "promptcache", "serve", "--upstream", upstream,
                                "--redis-url", store.url, "--port", str(sc_port),
                                "--semantic", str(args.semantic).lower(),
                                *(["--prices", args.prices] if args.prices else []),
                                "--log-level", "warning"], sidecar + "/healthz"):
            yield sidecar, upstream


def run(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, list[float]]]:
    if args.concurrency is None and args.rate is None:
        args.concurrency = 32
    mix = Mix(args.exact, args.paraphrase, args.stream)
    workload = build(load_prompts(args.prompts, max_chars=args.max_chars), args.requests, mix,
                     args.seed)
    bodies = [r.body() for r in workload]
    started = time.time()
    result: dict[str, Any] = {
        "benchmark": "load", "date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started)),
        "mode": "closed" if args.concurrency else "open",
        "concurrency": args.concurrency, "rate_per_s": args.rate,
        "workload": {"prompts": str(args.prompts), "requests": args.requests,
                     "seed": args.seed, "max_chars": args.max_chars,
                     "shares": {"fresh": round(mix.fresh, 4), "exact": mix.exact,
                                "paraphrase": mix.paraphrase, "stream": mix.stream},
                     "kinds": {k: sum(r.kind == k for r in workload)
                               for k in ("fresh", "exact", "paraphrase")},
                     "streamed": sum(r.stream for r in workload),
                     "request_bytes_mean": round(statistics.fmean(map(len, bodies)), 1)}}
    if args.target:
        url = args.target.rstrip("/")
        outcomes, seconds = asyncio.run(_run_phase(url, bodies, args, "load"))
        result |= {"target": url, "sidecar": summarise(workload, outcomes, seconds),
                   "sidecar_stats": _sidecar_stats(url)}
        tags = result["sidecar"]["by_status"]
        calls = sum(tags.get(t, {}).get("requests", 0) for t in ("MISS", "BYPASS"))
        result["upstream"] = {"calls": calls, "counted_by": "X-Cache MISS + BYPASS (estimate; "
                              "coalesced followers also say MISS)"}
    else:
        with own_sidecar(args) as (url, upstream):
            before = upstream_calls(upstream)
            outcomes, seconds = asyncio.run(_run_phase(url, bodies, args, "sidecar"))
            calls = upstream_calls(upstream) - before
            result["sidecar_stats"] = _sidecar_stats(url)
            result |= {"target": None, "sidecar": summarise(workload, outcomes, seconds),
                       "setup": {"upstream_latency_s": args.upstream_latency,
                                 "answer_words": args.answer_words,
                                 "semantic": args.semantic}}
            result["upstream"] = {"calls": calls, "counted_by": "the fake upstream"}
            if args.baseline:
                base, base_s = asyncio.run(_run_phase(upstream, bodies, args, "baseline"))
                result["baseline"] = summarise(workload, base, base_s)
    result["savings"] = savings(result.get("sidecar_stats"))
    calls = result["upstream"]["calls"]
    result["upstream"] |= {"saved": args.requests - calls,
                           "saved_share": round((args.requests - calls) / args.requests, 4)}
    if "baseline" in result:
        s, b = result["sidecar"], result["baseline"]
        result["vs_baseline"] = {
            "throughput_ratio": round(s["throughput_rps"] / b["throughput_rps"], 3)
            if b["throughput_rps"] else None,
            "p50_ratio": round(s["p50_ms"] / b["p50_ms"], 3)
            if s["p50_ms"] and b["p50_ms"] else None}
    latencies: dict[str, list[float]] = {}
    for o in outcomes:
        if o.latency is not None and o.error is None:
            latencies.setdefault(o.x_cache, []).append(o.latency * 1e3)
    return result, latencies


def savings(stats: dict[str, Any] | None) -> dict[str, Any] | None:
    """The totals of the sidecar's ``/stats`` ``savings`` (None if it has none)."""
    found = (stats or {}).get("savings")
    if not isinstance(found, dict):
        return None
    keys = ("hits_counted", "tokens_saved", "cost_saved", "currency", "spent",
            "net_cost_saved", "unpriced_models")
    return {k: found.get(k) for k in keys}


def _savings_line(s: dict[str, Any] | None) -> list[str]:
    if s is None:
        return []
    tokens, spent = s["tokens_saved"], s["spent"]
    return [f"hits counted {s['hits_counted']}: tokens saved {tokens['input']} in, "
            f"{tokens['output']} out; cost saved {s['cost_saved']:.6f} {s['currency']} "
            f"(spent by fallbacks: {spent['calls']} calls, {spent['cost']:.6f}; net "
            f"{s['net_cost_saved']:.6f})"
            + (f"; unpriced: {', '.join(s['unpriced_models'])}" if s["unpriced_models"]
               else "")]


def report(r: dict[str, Any]) -> str:
    s = r["sidecar"]
    loop = (f"closed loop, concurrency {r['concurrency']}" if r["mode"] == "closed"
            else f"open loop, {r['rate_per_s']} requests/s offered")
    lines = [f"{r['workload']['requests']} requests ({loop}): {s['throughput_rps']} req/s, "
             f"p50 {s['p50_ms']} ms, p95 {s['p95_ms']} ms, p99 {s['p99_ms']} ms, "
             f"errors {s['errors']}",
             f"upstream calls {r['upstream']['calls']} ({r['upstream']['counted_by']}), "
             f"saved {r['upstream']['saved']} ({r['upstream']['saved_share']:.1%})",
             *_savings_line(r.get("savings")), "",
             "| X-Cache | requests | p50 ms | p95 ms | p99 ms |", "|---|---|---|---|---|"]
    for tag, g in s["by_status"].items():
        lines.append(f"| {tag} | {g['requests']} | {g['p50_ms']} | {g['p95_ms']} | "
                     f"{g['p99_ms']} |")
    lines += ["", "| request kind | requests | X-Cache | p50 ms |", "|---|---|---|---|"]
    for kind, g in s["by_kind"].items():
        tags = ", ".join(f"{t} {n}" for t, n in g["x_cache"].items())
        lines.append(f"| {kind} | {g['requests']} | {tags} | {g['p50_ms']} |")
    if "baseline" in r:
        b = r["baseline"]
        lines.append("")
        lines.append(f"baseline (no cache, same workload): {b['throughput_rps']} req/s, "
                     f"p50 {b['p50_ms']} ms, p99 {b['p99_ms']} ms; sidecar/baseline "
                     f"throughput {r['vs_baseline']['throughput_ratio']}, "
                     f"p50 {r['vs_baseline']['p50_ratio']}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    result, latencies = run(args)
    result["plot"] = "load.png"
    result["latencies_ms"] = {k: [round(v, 3) for v in vs] for k, vs in latencies.items()}
    loop = (f"concurrency {result['concurrency']}" if result["mode"] == "closed"
            else f"{result['rate_per_s']} req/s offered")
    plots.latency_histogram(latencies, Path(args.out) / "load.png",
                            title=f"bench load: {result['workload']['requests']} requests, "
                            f"{loop}", open_loop=result["mode"] == "open")
    result["command"] = command(args)
    publish(result, args.out, "load", report(result))
    return 0
