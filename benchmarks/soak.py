"""Soak: mixed traffic for a long while against a sidecar this command starts; its memory.

The command starts a private Redis, the fake upstream (``--upstream-latency`` seconds per
call, answers padded to ``--answer-words``) and ``promptcache serve`` in front of it
(``--semantic``, and ``--max-rss`` if given), each in its own process. The clock starts
when the sidecar answers, so the model's loading time is not part of the soak.

For ``--minutes``, ``--clients`` clients in a closed loop send an endless workload of real
chat prompts: half fresh, 30% exact repeats, 20% paraphrase-like repeats (the rewrites of
:mod:`promptcache.benchmarks.workload`), a fifth of them streamed. Once the prompt file is
used up, fresh prompts are its prompts again with a number added (" (ref 2)"): new to the
exact tier, and the semantic verifier's number check keeps them from being answered from
the originals. Every answer is counted by its X-Cache; a non-2xx status or a failed
connection is an error. Requests still in flight at the end are dropped, uncounted.

Every ``--sample-seconds`` the sidecar process's VmRSS, RssAnon and RssFile are read from
``/proc/<pid>/status``, with the numbers of ``GET /stats``'s ``memory`` object (whatever
parts this build reports), its ``semantic`` counts, its cache entries and the requests
answered so far.

Reported, from the samples after ``--warmup-minutes``: RSS growth, (RSS at the end - RSS at
the end of warm-up) / RSS at the end of warm-up (target: at most 10%); the largest RSS; the
steady state (the mean RSS); the slope (least squares, MB/min); ``promptcache plan``'s
node figure for the mean number of entries, beside the steady state (target: within 20%).
With ``--max-rss``: the largest RSS seen against the limit and the sheds ``/stats`` counts.
Writes ``soak.json`` (every sample) and ``soak.png`` (RSS and its parts over time) to
``--out``; ``promptcache bench report`` copies the plot to ``docs/img/soak.png``.

    promptcache bench soak [--minutes 30] [--clients 8] [--sample-seconds 5]
                           [--warmup-minutes 5] [--semantic true] [--max-rss SIZE]
                           [--out bench-results/soak] [--quiet]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import aiohttp

from promptcache.benchmarks import plots
from promptcache.benchmarks.load import CHAT, HEADERS, upstream_calls
from promptcache.benchmarks.loadgen import Outcome, replay
from promptcache.benchmarks.procs import children, free_port, python_process, wait_http
from promptcache.benchmarks.progress import add_quiet, progress
from promptcache.benchmarks.results import command, publish
from promptcache.benchmarks.workload import (
    DEFAULT_PROMPTS,
    KINDS,
    Mix,
    Request,
    load_prompts,
    paraphrase,
)
from promptcache.cache.errors import ConfigError
from promptcache.cache.redis.embedded import EmbeddedRedis
from promptcache.server.config import Settings, parse_bool, parse_size

#: The issue's targets: RSS growth after warm-up, and the steady state against the plan.
GROWTH_TARGET = 0.10
PLAN_TOLERANCE = 0.20
#: /proc/<pid>/status field -> sample key.
PROC_FIELDS = {"VmRSS": "vm_rss_bytes", "RssAnon": "rss_anon_bytes",
               "RssFile": "rss_file_bytes"}
MB = 1e6


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--minutes", type=float, default=30.0, metavar="M",
                   help="minutes of traffic, from the moment the sidecar answers (30)")
    p.add_argument("--clients", type=int, default=8, metavar="N",
                   help="clients, each in a closed loop (8)")
    p.add_argument("--sample-seconds", type=float, default=5.0, metavar="S",
                   help="seconds between memory samples (5)")
    p.add_argument("--warmup-minutes", type=float, default=5.0, metavar="W",
                   help="minutes left out of the growth, steady-state and slope figures (5)")
    p.add_argument("--prompts", default=DEFAULT_PROMPTS, metavar="FILE",
                   help=f"JSON lines with a 'prompt' field (default: {DEFAULT_PROMPTS})")
    p.add_argument("--max-chars", type=int, default=1000, metavar="N",
                   help="longest prompt taken from the file (default 1000 characters)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="workload seed (0)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="seconds a request may take before it counts as an error (60)")
    own = p.add_argument_group("the sidecar this command starts")
    own.add_argument("--semantic", type=parse_bool, default=True, metavar="BOOL",
                     help="the sidecar's semantic tier (default true; loads the model)")
    own.add_argument("--max-rss", type=parse_size, default=None, metavar="SIZE",
                     help="the sidecar's --max-rss (default: none)")
    own.add_argument("--workers", type=int, default=1, metavar="N",
                     help="the sidecar's --workers; memory is then sampled per worker, and "
                     "each sample's figures are the largest worker's (default: 1)")
    own.add_argument("--upstream-latency", type=float, default=0.3, metavar="SECONDS",
                     help="seconds the fake upstream takes per call (default 0.3)")
    own.add_argument("--answer-words", type=int, default=150, metavar="N",
                     help="filler words in each fake answer (default 150)")
    own.add_argument("--start-timeout", type=float, default=600.0, metavar="SECONDS",
                     help="seconds the sidecar may take to load and answer (600)")
    p.add_argument("--out", default="bench-results/soak", metavar="DIR",
                   help="directory for soak.json, soak.png (default bench-results/soak)")
    add_quiet(p)


# --- the traffic -----------------------------------------------------------------------------

class Traffic(Sequence[bytes]):
    """An endless workload in the shares of ``mix``, each request made when the load
    generator asks for it (its closed loop asks in order, once each).

    Fresh prompt ``n`` is the file's prompt ``n % len(prompts)``, with `` (ref k)`` added on
    its k-th reuse; repeats pick an earlier fresh prompt with the skew of
    :func:`workload.build` toward the first ones. Only a byte per request (its kind and
    stream flag) is kept, to count outcomes by kind; a paraphrase is rewritten anew.
    """

    def __init__(self, prompts: Sequence[str], mix: Mix, seed: int = 0) -> None:
        if not prompts:
            raise ConfigError("no prompts to send")
        self.prompts, self.mix = prompts, mix
        self._rng = random.Random(seed)
        self._fresh = 0
        self._made = bytearray()  # per request: KINDS index, + 4 if streamed

    def __len__(self) -> int:
        return sys.maxsize

    @overload
    def __getitem__(self, i: int) -> bytes: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[bytes]: ...

    def __getitem__(self, i: int | slice) -> bytes | Sequence[bytes]:
        if isinstance(i, slice) or i != len(self._made):
            raise IndexError("an endless workload's requests are made in order, once each")
        return self._next().body()

    def text(self, n: int) -> str:
        reuse, at = divmod(n, len(self.prompts))
        return self.prompts[at] + (f" (ref {reuse})" if reuse else "")

    def _next(self) -> Request:
        rng, mix = self._rng, self.mix
        u = rng.random()
        kind = ("fresh" if self._fresh == 0 or u >= mix.exact + mix.paraphrase
                else "exact" if u < mix.exact else "paraphrase")
        if kind == "fresh":
            self._fresh += 1
            text = self.text(self._fresh - 1)
        else:
            text = self.text(int(self._fresh * rng.random() ** 2))
            if kind == "paraphrase":
                text = paraphrase(text, rng.randrange(1000))
        stream = rng.random() < mix.stream
        self._made.append(KINDS.index(kind) | (4 if stream else 0))
        return Request(kind, text, stream)

    def kind(self, i: int) -> str:
        """Request ``i``'s kind, with ``/stream`` if it asked for a streamed answer."""
        code = self._made[i]
        return KINDS[code & 3] + ("/stream" if code & 4 else "")

    @property
    def fresh_reused(self) -> int:
        """Fresh prompts made from a file prompt already sent (with a number added)."""
        return max(0, self._fresh - len(self.prompts))


@dataclass
class Tally:
    """The answers so far: by X-Cache, errors by kind, and by request kind."""

    traffic: Traffic
    x_cache: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    by_kind: dict[str, Counter[str]] = field(default_factory=dict)

    def add(self, o: Outcome) -> None:
        tag = o.x_cache if o.error is None else "error"
        if o.error is None:
            self.x_cache[o.x_cache] += 1
        else:
            self.errors[o.error] += 1
        self.by_kind.setdefault(self.traffic.kind(o.index), Counter())[tag] += 1

    @property
    def answered(self) -> int:
        return sum(self.x_cache.values())


# --- the sidecar and its samples -------------------------------------------------------------

@dataclass(frozen=True)
class Stack:
    """The sidecar of a soak (its process, to read its memory) and the fake upstream."""

    url: str
    upstream: str
    proc: subprocess.Popen[bytes]
    ready_s: float
    workers: int = 1  # with more, ``proc`` is the supervisor and memory is read per worker


@contextlib.contextmanager
def own_sidecar(args: argparse.Namespace) -> Iterator[Stack]:
    """The fake upstream and a sidecar in front of it, on a private Redis, each in its own
    process; yielded once the sidecar answers (after its model loaded)."""
    if args.semantic:
        from promptcache.cache.semantic.first_stage import ensure_static_model

        ensure_static_model()  # distilled once per machine, here: not in the sidecar's RSS
    up_port, sc_port = free_port(), free_port()
    upstream, url = f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{sc_port}"
    fake = ["-m", "promptcache.testing", "--port", str(up_port), "--latency",
            str(args.upstream_latency), "--answer-words", str(args.answer_words)]
    limit = ["--max-rss", str(args.max_rss)] if args.max_rss else []
    with tempfile.TemporaryDirectory(prefix="pc-bench-") as tmp, \
            EmbeddedRedis(Path(tmp) / "redis", persistence=False) as store, \
            python_process(fake, upstream + "/v1/models"):
        serve = ["-m", "promptcache", "serve", "--upstream", upstream, "--redis-url",
                 store.url, "--port", str(sc_port), "--semantic", str(args.semantic).lower(),
                 "--log-level", "warning", "--workers", str(args.workers), *limit]
        launched = time.monotonic()
        # python_process waits 30 s for its URL: given the upstream's (answering already),
        # it returns at once, and the sidecar, loading its model, gets --start-timeout here.
        with python_process(serve, upstream + "/v1/models") as proc:
            wait_http(url + "/healthz", proc, within=args.start_timeout)
            yield Stack(url, upstream, proc, time.monotonic() - launched, args.workers)


def worker_memory(stack: Stack) -> dict[str, Any]:
    """The sidecar's memory; with workers, the largest worker's, and each worker's RSS."""
    if stack.workers == 1:
        return proc_memory(stack.proc.pid)
    workers = []
    for pid in children(stack.proc.pid):
        with contextlib.suppress(OSError):  # a worker that just exited
            workers.append(proc_memory(pid))
    if not workers:
        return {}
    largest = max(workers, key=lambda m: m.get("vm_rss_bytes", 0))
    return {**largest, "workers_rss_bytes": [m.get("vm_rss_bytes", 0) for m in workers]}


def proc_memory(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of process ``pid`` in bytes (Linux ``/proc``)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in PROC_FIELDS:
                out[PROC_FIELDS[name]] = int(value.split()[0]) * 1024
    return out


def numbers(obj: Any) -> dict[str, Any] | None:
    """The numeric (and true/false) items of a ``/stats`` object; None if it is not one."""
    if not isinstance(obj, dict):
        return None
    return {k: v for k, v in obj.items() if isinstance(v, int | float)}


async def sample(http: aiohttp.ClientSession, stack: Stack, t: float, tally: Tally
                 ) -> dict[str, Any]:
    row: dict[str, Any] = {"t_s": round(t, 3), **worker_memory(stack),
                           "answered": tally.answered, "errors": sum(tally.errors.values()),
                           "x_cache": dict(tally.x_cache)}
    try:
        async with http.get(stack.url + "/stats") as r:
            r.raise_for_status()
            stats, row["stats_error"] = dict(await r.json()), None
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        stats, row["stats_error"] = {}, f"{type(exc).__name__}: {exc}"[:200]
    cache = stats.get("cache") or {}
    return row | {"memory": numbers(stats.get("memory")),
                  "semantic": numbers(stats.get("semantic")),
                  "entries": cache.get("entries", cache.get("keys"))}


def sample_times(seconds: float, every: float) -> list[float]:
    """0, every, 2 every... up to ``seconds``, and ``seconds`` itself."""
    steps = math.ceil(seconds / every - 1e-9)
    return [min(k * every, seconds) for k in range(steps + 1)]


async def soak(stack: Stack, traffic: Traffic, args: argparse.Namespace,
               clock: Callable[[], float] = time.monotonic
               ) -> tuple[list[dict[str, Any]], Tally, float, int | None]:
    """Run the traffic for ``--minutes`` while sampling; (samples, tally, seconds, the
    sidecar's exit status if it exited)."""
    tally = Tally(traffic)
    samples: list[dict[str, Any]] = []
    exited = None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        started = clock()
        load = asyncio.create_task(replay(
            stack.url + CHAT, traffic, concurrency=args.clients, headers=HEADERS,
            request_timeout=args.timeout, on_done=tally.add))
        times = sample_times(args.minutes * 60, args.sample_seconds)
        with progress(len(times), "soak", quiet=args.quiet, unit="sample") as bar:
            for at in times:
                await asyncio.sleep(max(0.0, started + at - clock()))
                if load.done():
                    load.result()  # replay counts failures: it ends early only by a bug
                if (exited := stack.proc.poll()) is not None:
                    break
                samples.append(await sample(http, stack, clock() - started, tally))
                bar.update(1)
        seconds = clock() - started
        load.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await load
    return samples, tally, seconds, exited


# --- the figures -----------------------------------------------------------------------------

def figures(samples: Sequence[dict[str, Any]], warmup_s: float) -> dict[str, Any]:
    """The memory figures of the samples from the end of warm-up (the first sample at or
    after ``warmup_s``) to the last one, on VmRSS."""
    after = [s for s in samples if s["t_s"] >= warmup_s]
    if len(after) < 2:
        raise ValueError(f"{len(after)} samples after the warm-up: too few for a figure")
    rss = [s["vm_rss_bytes"] for s in after]
    minutes = [s["t_s"] / 60 for s in after]
    fit = statistics.linear_regression(minutes, [r / MB for r in rss])
    growth = (rss[-1] - rss[0]) / rss[0]
    return {"warmup_end_s": after[0]["t_s"], "rss_at_warmup_end_bytes": rss[0],
            "rss_at_end_bytes": rss[-1], "growth": round(growth, 6),
            "growth_target": GROWTH_TARGET, "growth_within_target": growth <= GROWTH_TARGET,
            "max_rss_after_warmup_bytes": max(rss),
            "steady_mean_rss_bytes": round(statistics.fmean(rss)),
            "slope_mb_per_min": round(fit.slope, 4), "samples": len(after)}


def against_plan(samples: Sequence[dict[str, Any]], warmup_s: float, steady: float,
                 prompts: Sequence[str], semantic: bool) -> dict[str, Any] | None:
    """``promptcache plan``'s node figure (index + model + process + hot path) for the mean
    number of entries after warm-up, beside the soak's steady state. The planner counts the
    near cache at its bound; here it is given what the near cache held (``/stats``), so the
    comparison checks the rest of the formula."""
    from promptcache.benchmarks.plan import Workload, plan

    after = [s for s in samples if s["t_s"] >= warmup_s and s["entries"]]
    if not after:
        return None
    near = round(statistics.fmean((s.get("memory") or {}).get("near_bytes", 0) for s in after))
    first_stage = Settings(upstream="http://upstream.invalid").first_stage
    p = plan(Workload(round(statistics.fmean(s["entries"] for s in after)),
                      round(statistics.fmean(map(len, prompts))), 0, semantic=semantic,
                      first_stage=first_stage, near_cache_bytes=near))
    ratio = steady / p.node_bytes
    return {"entries_mean": p.workload.entries, "first_stage": first_stage,
            "near_cache_bytes_mean": near,
            "plan_node_bytes": p.node_bytes, "plan_process_bytes": p.process_bytes_per_node,
            "steady_over_plan": round(ratio, 3),
            "within_tolerance": abs(ratio - 1) <= PLAN_TOLERANCE,
            "tolerance": PLAN_TOLERANCE}


def limit_figures(samples: Sequence[dict[str, Any]], limit: int) -> dict[str, Any]:
    """The largest RSS seen against ``--max-rss``, and the shedding ``/stats`` reports."""
    memory = [s["memory"] or {} for s in samples]
    sheds = [m["sheds"] for m in memory if "sheds" in m]
    return {"limit_bytes": limit, "max_seen_bytes": max(s["vm_rss_bytes"] for s in samples),
            "samples_over": sum(s["vm_rss_bytes"] > limit for s in samples),
            "sheds": sheds[-1] if sheds else None,
            "samples_shedding": sum(bool(m.get("shedding")) for m in memory)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.sample_seconds <= 0 or args.clients < 1 or args.warmup_minutes < 0 or (
            (args.minutes - args.warmup_minutes) * 60 < args.sample_seconds):
        raise ConfigError("need --sample-seconds > 0, --clients >= 1, --warmup-minutes >= 0 "
                          "and a sample's time or more between --warmup-minutes and --minutes")
    prompts = load_prompts(args.prompts, max_chars=args.max_chars)
    traffic = Traffic(prompts, Mix(), args.seed)
    date = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    with own_sidecar(args) as stack:
        samples, tally, seconds, exited = asyncio.run(soak(stack, traffic, args))
        calls = upstream_calls(stack.upstream)
    warmup_s = args.warmup_minutes * 60
    result: dict[str, Any] = {
        "benchmark": "soak", "date": date,
        "setup": {"minutes": args.minutes, "clients": args.clients,
                  "sample_seconds": args.sample_seconds, "warmup_minutes": args.warmup_minutes,
                  "semantic": args.semantic, "max_rss_bytes": args.max_rss,
                  "workers": args.workers,
                  "upstream_latency_s": args.upstream_latency,
                  "answer_words": args.answer_words, "prompts": str(args.prompts),
                  "prompts_in_file": len(prompts), "seed": args.seed,
                  "shares": {"fresh": round(traffic.mix.fresh, 4), "exact": traffic.mix.exact,
                             "paraphrase": traffic.mix.paraphrase,
                             "stream": traffic.mix.stream}},
        "sidecar_ready_s": round(stack.ready_s, 2), "sidecar_exit": exited,
        "seconds": round(seconds, 2),
        "requests": {"answered": tally.answered, "errors": sum(tally.errors.values()),
                     "error_kinds": dict(tally.errors), "x_cache": dict(tally.x_cache),
                     "by_kind": {k: dict(v) for k, v in sorted(tally.by_kind.items())},
                     "fresh_reused": traffic.fresh_reused,
                     "throughput_rps": round(tally.answered / seconds, 2)},
        "upstream_calls": calls,
        "memory": figures(samples, warmup_s), "samples": samples}
    result["plan"] = against_plan(samples, warmup_s, result["memory"]["steady_mean_rss_bytes"],
                                  prompts, args.semantic)
    if args.max_rss:
        result["max_rss"] = limit_figures(samples, args.max_rss)
    return result


# --- the report and the plot -----------------------------------------------------------------

def _mb(n: float) -> str:
    return f"{n / MB:,.1f} MB"


def report(r: dict[str, Any]) -> str:
    s, q, m = r["setup"], r["requests"], r["memory"]
    tags = ", ".join(f"{t} {n:,}" for t, n in sorted(q["x_cache"].items()))
    lines = [f"{s['minutes']:g} min of mixed traffic ({s['clients']} clients, closed loop; "
             "fresh 50%, exact repeats 30%, paraphrases 20%, streamed 20%), semantic tier "
             f"{'on' if s['semantic'] else 'off'}, sampled every {s['sample_seconds']:g} s; "
             f"the sidecar answered {r['sidecar_ready_s']} s after its start",
             f"requests answered {q['answered']:,} ({q['throughput_rps']} req/s), errors "
             f"{q['errors']}; X-Cache: {tags}; upstream calls {r['upstream_calls']:,}"
             + (f"; fresh prompts reused with a number: {q['fresh_reused']:,}"
                if q["fresh_reused"] else "")]
    if r.get("sidecar_exit") is not None:
        lines.append(f"THE SIDECAR EXITED (status {r['sidecar_exit']}) before the end")
    workers = r["setup"].get("workers", 1)
    lines.append(
        ("" if workers == 1 else f"per worker (the largest of {workers}): ")
        + f"RSS {_mb(m['rss_at_warmup_end_bytes'])} at the end of warm-up "
        f"({m['warmup_end_s'] / 60:.2f} min), {_mb(m['rss_at_end_bytes'])} at the end: growth "
        f"{m['growth']:+.1%} (target <= {m['growth_target']:.0%}: "
        f"{'met' if m['growth_within_target'] else 'MISSED'}); after warm-up max "
        f"{_mb(m['max_rss_after_warmup_bytes'])}, steady state (mean) "
        f"{_mb(m['steady_mean_rss_bytes'])}, slope {m['slope_mb_per_min']:+.3f} MB/min")
    p = r.get("plan")
    if p:
        lines.append(f"promptcache plan, {p['entries_mean']:,} entries: node "
                     f"{_mb(p['plan_node_bytes'])} (process {_mb(p['plan_process_bytes'])}); "
                     f"steady state / plan = {p['steady_over_plan']} (target within "
                     f"{p['tolerance']:.0%}: {'met' if p['within_tolerance'] else 'MISSED'})")
    x = r.get("max_rss")
    if x:
        lines.append(f"--max-rss {_mb(x['limit_bytes'])}: max RSS seen {_mb(x['max_seen_bytes'])}"
                     f" ({x['samples_over']} samples over it), sheds "
                     f"{'not reported by this build' if x['sheds'] is None else x['sheds']}, "
                     f"shedding in {x['samples_shedding']} samples")
    failed = [x["stats_error"] for x in r["samples"] if x.get("stats_error")]
    if failed:
        lines.append(f"GET /stats failed in {len(failed)} of {len(r['samples'])} samples "
                     f"(first: {failed[0]})")
    last = r["samples"][-1]["memory"] if r["samples"] else None
    if last:
        parts = ", ".join(f"{k.removesuffix('_bytes')} {_mb(v)}" for k, v in last.items()
                          if k.endswith("_bytes"))
        lines.append(f"/stats memory at the end: {parts}")
    lines += ["", "| request kind | answered + errors | X-Cache |", "|---|---|---|"]
    for kind, counts in q["by_kind"].items():
        lines.append(f"| {kind} | {sum(counts.values()):,} | "
                     + ", ".join(f"{t} {n:,}" for t, n in sorted(counts.items())) + " |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    result = run(args)
    result["plot"] = "soak.png"
    plots.soak_memory(result, Path(args.out) / "soak.png")
    result["command"] = command(args)
    publish(result, args.out, "soak", report(result))
    return 0
