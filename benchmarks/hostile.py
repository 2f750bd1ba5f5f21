"""Hostile input beside exact hits: do huge and look-alike prompts slow the hits down, and
do long prompts that differ only past the model's window ever share an answer?

The command starts its own sidecar (semantic tier on, default settings; ``--max-body-bytes``
is the sidecar's default unless given) in front of a fake upstream that answers after
``--upstream-latency`` seconds, on a private Redis, each in its own process. (The fake is
:mod:`promptcache.testing`'s chat route served with the sidecar's body limit: ``python -m
promptcache.testing`` refuses bodies over aiohttp's 1 MiB and keeps every body it records.)
One exact entry is primed, ``--warmup`` seconds of exact hits are sent and not counted, then two
phases of ``--duration`` seconds each run:

- A, the baseline: ``--clients`` clients send the primed request back to back (exact hits);
- B, hostile: the same clients again, while ``--hostile-clients`` clients send in turn
  (a) a chat request whose message is ``--big-chars`` characters of real words (3.5 MB,
  different each time, so a miss); (b) a pair of ``--pair-words``-word prompts sharing every
  word (the second shuffled, or with two names swapped), one after the other; (c) a pair of
  prompts with the same ``--context-words``-word context and different final questions
  ("arguments in favour" / "against"), one after the other.

Reported: exact-hit p50/p95/p99/max in A and in B and the ratio B/A; hostile requests by
kind with their status codes and latencies; the pairs whose second prompt was answered with
the first's answer (SEMANTIC-HIT; for (c) the target is none); whether phase B kept the
exact hits' p99 under 100 ms (the target); the CPU seconds of the sidecar and the upstream
per phase and the load generator's own loop lag (so a slow generator cannot pass for a slow
sidecar); the sidecar's ``/stats`` (its ``semantic`` counts: too_long, shed...). Writes
``hostile.json`` to ``--out``.

    promptcache bench hostile [--duration 10] [--clients 4] [--hostile-clients 2]
                              [--upstream-latency 0.05] [--big-chars 3500000]
                              [--out bench-results/hostile] [--quiet]
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import random
import re
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from promptcache.benchmarks.procs import cpu_seconds, free_port, python_process
from promptcache.benchmarks.progress import add_quiet, progress
from promptcache.benchmarks.results import command, publish
from promptcache.benchmarks.workload import DEFAULT_PROMPTS
from promptcache.cache.redis.embedded import EmbeddedRedis
from promptcache.server.config import Settings, parse_size

CHAT = "/v1/chat/completions"
HEADERS = {"Authorization": "Bearer sk-bench", "Content-Type": "application/json"}
MODEL = "gpt-4o-mini"
EXACT_TEXT = "Explain in two sentences what a write-ahead log is."
QUESTIONS = ("What are the arguments in favour?", "What are the arguments against?")
NAMES = ("Alice", "Bob", "Carol", "Dmitri", "Priya", "Mohammed", "Chen", "Olga")
TARGET_P99_MS = 100.0
#: The sidecar's own request body limit (``--max-body-bytes``).
DEFAULT_MAX_BODY = Settings(upstream="http://upstream.invalid").max_body_bytes
#: Words for hostile texts when the prompt file is absent.
FALLBACK_WORDS = ("the of and to a in is that for it as with was on be by this are or from "
                  "at which an but not have has can will would should could data cache model "
                  "request server client latency memory network system user answer question "
                  "report budget policy process thread queue table index record value result "
                  "because between during without against within before after").split()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=float, default=10.0, metavar="SECONDS",
                   help="seconds of each phase, A (exact hits alone) and B (with hostile "
                   "traffic) (default 10)")
    p.add_argument("--warmup", type=float, default=1.0, metavar="SECONDS",
                   help="seconds of exact hits before phase A, not counted (default 1)")
    p.add_argument("--clients", type=int, default=4, metavar="N",
                   help="exact-hit clients, each in a closed loop (default 4)")
    p.add_argument("--hostile-clients", type=int, default=2, metavar="N",
                   help="hostile clients in phase B, each in a closed loop (default 2)")
    p.add_argument("--upstream-latency", type=float, default=0.05, metavar="SECONDS",
                   help="seconds the fake upstream takes per call (default 0.05)")
    p.add_argument("--answer-words", type=int, default=150, metavar="N",
                   help="filler words in each fake answer (default 150)")
    p.add_argument("--big-chars", type=int, default=3_500_000, metavar="N",
                   help="characters of the huge message (default 3500000)")
    p.add_argument("--pair-words", type=int, default=2500, metavar="N",
                   help="words of each prompt of a pair sharing every word (default 2500)")
    p.add_argument("--context-words", type=int, default=450, metavar="N",
                   help="words of the context two long prompts share (default 450)")
    p.add_argument("--max-body-bytes", type=parse_size, default=None, metavar="SIZE",
                   help="the sidecar's request body limit (default: the sidecar's own, "
                   f"{DEFAULT_MAX_BODY})")
    p.add_argument("--prompts", default=DEFAULT_PROMPTS, metavar="FILE",
                   help="JSON lines with a 'prompt' field, whose words make the hostile "
                   f"texts (default: {DEFAULT_PROMPTS}; a built-in list if absent)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="text seed (default 0)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="seconds a request may take before it counts as an error (60)")
    p.add_argument("--out", default="bench-results/hostile", metavar="DIR",
                   help="directory for hostile.json (default bench-results/hostile)")
    add_quiet(p)


# --- the texts -------------------------------------------------------------------------------

def vocabulary(path: str | Path) -> tuple[list[str], str]:
    """The words of the prompt file (repeats kept, so sampling follows their frequency) and
    where they came from; a small built-in list if the file is absent."""
    path = Path(path)
    if not path.exists():
        return list(FALLBACK_WORDS), "built-in list"
    opener = gzip.open if path.suffix == ".gz" else open
    words: list[str] = []
    with opener(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            words += re.findall(r"[A-Za-z]{2,}", str(json.loads(line).get("prompt", "")))
    return (words, str(path)) if words else (list(FALLBACK_WORDS), "built-in list")


def body(text: str) -> bytes:
    return json.dumps({"model": MODEL, "temperature": 0,
                       "messages": [{"role": "user", "content": text}]}).encode()


_HEAD = body("|").split(b"|")[0]
_TAIL = body("|").split(b"|")[1]


class Texts:
    """One hostile client's prompts, from its own seeded random source. ``pool`` holds
    letters and spaces only, so any slice of it is a JSON string's content as it is."""

    def __init__(self, words: Sequence[str], pool: bytes, seed: int, tag: str) -> None:
        self.words, self.pool, self.tag = words, pool, tag
        self.rng = random.Random(seed)
        self.sent = 0

    def big(self, chars: int) -> bytes:
        """A chat request whose message is ``chars`` characters of words: a window of the
        pool at a random place, after a unique lead-in (so every one is a miss)."""
        self.sent += 1
        lead = f"Request {self.tag}-{self.sent}: ".encode()
        start = self.rng.randrange(max(1, len(self.pool) - chars))
        return b"".join((_HEAD, lead, self.pool[start:start + chars - len(lead)], _TAIL))

    def pair(self, n: int, swap_names: bool) -> tuple[bytes, bytes]:
        """Two ``n``-word prompts with the same words: the second shuffled, or with the two
        names in it swapped."""
        words = self.rng.choices(self.words, k=max(2, n) - 2)
        a, b = self.rng.sample(NAMES, 2)
        i, j = sorted(self.rng.sample(range(len(words) + 2), 2))
        words.insert(i, a)
        words.insert(j, b)
        other = list(words)
        if swap_names:
            other[i], other[j] = b, a
        else:
            self.rng.shuffle(other)
        return body(" ".join(words)), body(" ".join(other))

    def context_pair(self, n: int) -> tuple[bytes, bytes]:
        """Two prompts with the same ``n``-word context and different final questions."""
        context = " ".join(self.rng.choices(self.words, k=n))
        return body(f"{context}\n\n{QUESTIONS[0]}"), body(f"{context}\n\n{QUESTIONS[1]}")


def word_pool(words: Sequence[str], chars: int, seed: int) -> bytes:
    """At least ``chars`` characters of words drawn from ``words``, separated by spaces."""
    rng = random.Random(seed)
    mean = statistics.fmean(len(w) + 1 for w in words[:10_000])
    return " ".join(rng.choices(words, k=int(chars / mean * 1.05) + 100)).encode()


# --- the processes ---------------------------------------------------------------------------

def serve_upstream(port: int, latency: float, answer_words: int, max_body: int) -> None:
    """The fake upstream's chat route in this process, taking bodies up to ``max_body``
    bytes and keeping none; ``GET /_fake/stats`` gives its calls and the bytes received."""
    from promptcache.testing import openai_routes

    seen: Counter[str] = Counter()

    async def chat(request: web.Request) -> web.StreamResponse:
        seen["calls"] += 1
        seen["bytes"] += request.content_length or 0
        await asyncio.sleep(latency)
        reply = await openai_routes.chat(request, answer_words)
        if isinstance(reply, list):
            raise web.HTTPBadRequest(text="streamed answers are not served here")
        return reply

    async def models(request: web.Request) -> web.StreamResponse:
        reply = await openai_routes.models(request, 0)
        assert not isinstance(reply, list)
        return reply

    async def stats(request: web.Request) -> web.StreamResponse:
        return web.json_response(dict(seen))

    app = web.Application(client_max_size=max_body)
    app.router.add_post(CHAT, chat)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/_fake/stats", stats)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


@dataclass(frozen=True)
class Stack:
    """The sidecar and the upstream of a run: their URLs and process ids."""

    url: str
    upstream: str
    sidecar_pid: int
    upstream_pid: int


@contextmanager
def own_sidecar(args: argparse.Namespace, max_body: int) -> Iterator[Stack]:
    """A sidecar (semantic tier on) in front of the fake chat route, on a private Redis,
    each in its own process."""
    from promptcache.cache.semantic.first_stage import ensure_static_model

    ensure_static_model()  # distilled once per machine: a minute, before the sidecar starts
    with tempfile.TemporaryDirectory(prefix="pc-bench-") as tmp, \
            EmbeddedRedis(Path(tmp) / "redis", persistence=False) as store:
        up_port, sc_port = free_port(), free_port()
        upstream, sidecar = f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{sc_port}"
        serve = (f"from promptcache.benchmarks.hostile import serve_upstream; serve_upstream("
                 f"{up_port}, {args.upstream_latency!r}, {args.answer_words}, {max_body + 65536})")
        flags = ["--max-body-bytes", str(max_body)] if args.max_body_bytes else []
        with python_process(["-c", serve], upstream + "/v1/models") as up, \
                python_process(["-m", "promptcache", "serve", "--upstream", upstream,
                                "--redis-url", store.url, "--port", str(sc_port),
                                "--semantic", "true", "--log-level", "warning", *flags],
                               sidecar + "/healthz") as sc:
            yield Stack(sidecar, upstream, sc.pid, up.pid)


# --- the load --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Sample:
    """One request: its kind, HTTP status (None if it failed), X-Cache and seconds taken."""

    kind: str
    status: int | None
    x_cache: str
    latency: float | None
    size: int


async def post(http: aiohttp.ClientSession, url: str, data: bytes, kind: str) -> Sample:
    t0 = time.perf_counter()
    try:
        async with http.post(url, data=data, headers=HEADERS) as r:
            await r.read()
            return Sample(kind, r.status, r.headers.get("X-Cache", "-"),
                          time.perf_counter() - t0, len(data))
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Sample(kind, None, f"ERROR {type(exc).__name__}", None, len(data))


@dataclass
class Phase:
    """What one phase measured."""

    exact: list[Sample]
    hostile: list[Sample]
    shared: Counter[str]  # pairs whose second prompt was a SEMANTIC-HIT, by kind
    pairs: Counter[str]
    seconds: float
    lag: list[float]  # the load generator's own event-loop lag, seconds
    cpu: dict[str, float]


async def exact_client(http: aiohttp.ClientSession, url: str, until: float,
                       out: list[Sample], bar: Any) -> None:
    data = body(EXACT_TEXT)
    while time.perf_counter() < until:
        out.append(await post(http, url, data, "exact"))
        bar.update(1)


async def hostile_client(http: aiohttp.ClientSession, url: str, texts: Texts,
                         args: argparse.Namespace, until: float, phase: Phase) -> None:
    """(a) a huge message, (b) a pair sharing every word, (c) a pair sharing a long context,
    in turn until ``until``. Texts are built on a thread, off this loop."""
    turn = 0
    while time.perf_counter() < until:
        data = await asyncio.to_thread(texts.big, args.big_chars)
        phase.hostile.append(await post(http, url, data, "big"))
        for kind in ("pair", "context"):
            if time.perf_counter() >= until:
                return
            if kind == "pair":
                first, second = await asyncio.to_thread(texts.pair, args.pair_words,
                                                          bool(turn % 2))
            else:
                first, second = await asyncio.to_thread(texts.context_pair, args.context_words)
            a = await post(http, url, first, kind)
            b = await post(http, url, second, kind)
            phase.hostile += (a, b)
            phase.pairs[kind] += 1
            phase.shared[kind] += b.x_cache == "SEMANTIC-HIT"
        turn += 1


async def loop_lag(until: float, out: list[float], step: float = 0.01) -> None:
    while time.perf_counter() < until:
        t0 = time.perf_counter()
        await asyncio.sleep(step)
        out.append(max(0.0, time.perf_counter() - t0 - step))


async def run_phase(http: aiohttp.ClientSession, stack: Stack, args: argparse.Namespace,
                    texts: Sequence[Texts], desc: str, seconds: float) -> Phase:
    url = stack.url + CHAT
    phase = Phase([], [], Counter(), Counter(), 0.0, [], {})
    pids = {"sidecar": stack.sidecar_pid, "upstream": stack.upstream_pid}
    cpu0 = {k: cpu_seconds(p) for k, p in pids.items()} | {"load_generator": time.process_time()}
    started = time.perf_counter()
    until = started + seconds
    with progress(None, desc, quiet=args.quiet, unit="hit") as bar:
        await asyncio.gather(
            loop_lag(until, phase.lag),
            *(exact_client(http, url, until, phase.exact, bar) for _ in range(args.clients)),
            *(hostile_client(http, url, t, args, until, phase) for t in texts))
    phase.seconds = time.perf_counter() - started
    cpu1 = {k: cpu_seconds(p) for k, p in pids.items()} | {"load_generator": time.process_time()}
    phase.cpu = {k: round(cpu1[k] - cpu0[k], 3) for k in cpu0}
    return phase


async def measure(stack: Stack, args: argparse.Namespace, texts: Sequence[Texts]
                  ) -> tuple[Phase, Phase, dict[str, Any], dict[str, Any]]:
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=timeout) as http:
        url = stack.url + CHAT
        first = await post(http, url, body(EXACT_TEXT), "prime")
        if first.status != 200:
            raise RuntimeError(f"priming the exact entry: HTTP {first.status} {first.x_cache}")
        for _ in range(100):  # stored at once; a hit within a few tries
            if (await post(http, url, body(EXACT_TEXT), "prime")).x_cache == "HIT":
                break
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError("the primed request never became an exact hit")
        await run_phase(http, stack, args, [], "warm-up", args.warmup)  # connections, caches
        a = await run_phase(http, stack, args, [], "A: exact hits", args.duration)
        b = await run_phase(http, stack, args, texts, "B: exact hits + hostile", args.duration)
        async with http.get(stack.url + "/stats") as r:
            stats = dict(await r.json())
        async with http.get(stack.upstream + "/_fake/stats") as r:
            upstream = dict(await r.json())
    return a, b, stats, upstream


# --- the figures -----------------------------------------------------------------------------

def latency(values: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99/max/mean in milliseconds (nearest rank); None without values."""
    if not values:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None, "mean_ms": None}
    data = sorted(values)

    def pct(p: float) -> float:
        return round(data[min(len(data) - 1, round(p / 100 * (len(data) - 1)))] * 1e3, 3)

    return {"p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99), "max_ms": pct(100),
            "mean_ms": round(statistics.fmean(data) * 1e3, 3)}


def group(samples: Sequence[Sample], seconds: float | None = None) -> dict[str, Any]:
    done = [s.latency for s in samples if s.status is not None and s.latency is not None]
    out: dict[str, Any] = {
        "requests": len(samples),
        "status": dict(sorted(Counter(str(s.status or "error") for s in samples).items())),
        "x_cache": dict(sorted(Counter(s.x_cache for s in samples).items())),
        **latency(done),
        "request_bytes_mean": round(statistics.fmean(s.size for s in samples), 1)
        if samples else None}
    if seconds:
        out["throughput_rps"] = round(len(done) / seconds, 1)
    return out


def summarise(a: Phase, b: Phase) -> dict[str, Any]:
    ea, eb = group(a.exact, a.seconds), group(b.exact, b.seconds)
    by_kind = {k: group([s for s in b.hostile if s.kind == k]) for k in ("big", "pair", "context")}
    ratio = {f"{p}_ratio": round(eb[f"{p}_ms"] / ea[f"{p}_ms"], 2)
             if ea[f"{p}_ms"] and eb[f"{p}_ms"] else None for p in ("p50", "p99")}
    return {
        "exact": {"A": ea, "B": eb, "B_over_A": ratio},
        "hostile": {"requests": len(b.hostile), "by_kind": by_kind,
                    "statuses": dict(sorted(Counter(str(s.status or "error")
                                                    for s in b.hostile).items())),
                    "big_mb_per_s": round(sum(s.size for s in b.hostile if s.kind == "big")
                                          / 1e6 / b.seconds, 2)},
        "pairs": {"sent": b.pairs["pair"], "shared": b.shared["pair"]},
        "long_context": {"sent": b.pairs["context"], "wrongly_shared": b.shared["context"]},
        "target": {"exact_p99_ms_limit": TARGET_P99_MS, "exact_p99_ms_B": eb["p99_ms"],
                   "exact_over_limit_B": sum(s.latency is not None
                                             and s.latency * 1e3 >= TARGET_P99_MS
                                             for s in b.exact),
                   "exact_p99_under_limit": eb["p99_ms"] is not None
                   and eb["p99_ms"] < TARGET_P99_MS,
                   "long_context_never_shared": b.shared["context"] == 0},
        "phases": {name: {"seconds": round(p.seconds, 3), "cpu_seconds": p.cpu,
                          "load_generator_lag_ms": {
                              k: v for k, v in latency(p.lag).items() if k in ("p99_ms", "max_ms")}}
                   for name, p in (("A", a), ("B", b))},
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    max_body = args.max_body_bytes or DEFAULT_MAX_BODY
    if args.big_chars + len(_HEAD) + len(_TAIL) > max_body:
        raise SystemExit(f"--big-chars {args.big_chars} would be refused by the sidecar's "
                         f"body limit of {max_body} bytes: raise --max-body-bytes")
    words, source = vocabulary(args.prompts)
    pool = word_pool(words, 2 * args.big_chars, args.seed)
    texts = [Texts(words, pool, args.seed + 1 + i, f"h{i}")
             for i in range(args.hostile_clients)]
    started = time.time()
    with own_sidecar(args, max_body) as stack:
        a, b, stats, upstream = asyncio.run(measure(stack, args, texts))
    return {
        "benchmark": "hostile", "date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started)),
        "setup": {"duration_s": args.duration, "clients": args.clients,
                  "hostile_clients": args.hostile_clients,
                  "upstream_latency_s": args.upstream_latency, "answer_words": args.answer_words,
                  "big_chars": args.big_chars, "pair_words": args.pair_words,
                  "context_words": args.context_words, "semantic": True,
                  "max_body_bytes": max_body,
                  "max_body_bytes_from": "--max-body-bytes" if args.max_body_bytes
                  else "the sidecar's default", "words_from": source},
        **summarise(a, b),
        "upstream": upstream,
        "sidecar_requests": stats.get("requests"),
        "sidecar_semantic": stats.get("semantic"),
    }


def report(r: dict[str, Any]) -> str:
    s, e = r["setup"], r["exact"]
    lines = [f"{s['clients']} exact-hit clients, {s['duration_s']} s per phase; phase B adds "
             f"{s['hostile_clients']} hostile clients ({s['big_chars']:,}-character messages, "
             f"{s['pair_words']}-word pairs, {s['context_words']}-word shared contexts); "
             f"sidecar body limit {s['max_body_bytes']:,} bytes ({s['max_body_bytes_from']})",
             "", "| exact hits | requests | req/s | p50 ms | p95 ms | p99 ms | max ms | X-Cache |",
             "|---|---|---|---|---|---|---|---|"]
    for name in ("A", "B"):
        g = e[name]
        tags = ", ".join(f"{t} {n}" for t, n in g["x_cache"].items())
        lines.append(f"| phase {name} | {g['requests']} | {g.get('throughput_rps')} | "
                     f"{g['p50_ms']} | {g['p95_ms']} | {g['p99_ms']} | {g['max_ms']} | {tags} |")
    t = r["target"]
    lines += [f"\nB/A: p50 x{e['B_over_A']['p50_ratio']}, p99 x{e['B_over_A']['p99_ratio']}; "
              f"target p99 < {t['exact_p99_ms_limit']:g} ms in B: "
              f"{'met' if t['exact_p99_under_limit'] else 'MISSED'} "
              f"({t['exact_over_limit_B']} exact hits of B took {t['exact_p99_ms_limit']:g} ms "
              "or more)", "",
              "| hostile (phase B) | requests | status | X-Cache | p50 ms | p99 ms |",
              "|---|---|---|---|---|---|"]
    for kind, g in r["hostile"]["by_kind"].items():
        status = ", ".join(f"{t} {n}" for t, n in g["status"].items())
        tags = ", ".join(f"{t} {n}" for t, n in g["x_cache"].items())
        lines.append(f"| {kind} | {g['requests']} | {status} | {tags} | {g['p50_ms']} | "
                     f"{g['p99_ms']} |")
    sem = r.get("sidecar_semantic") or {}
    counts = ", ".join(f"{k} {sem[k]}" for k in ("lookups", "too_long", "shed", "deadline",
                                                 "first_stage_miss", "hits") if k in sem)
    pb = r["phases"]["B"]
    lines += ["", f"pairs sharing every word: {r['pairs']['sent']} sent, {r['pairs']['shared']} "
              f"answered from the first; long prompts differing past the window: "
              f"{r['long_context']['sent']} sent, {r['long_context']['wrongly_shared']} "
              "wrongly shared (target 0)",
              f"CPU seconds in phase B: {pb['cpu_seconds']}; load generator loop lag "
              f"{pb['load_generator_lag_ms']}",
              f"sidecar semantic counts: {counts or 'n/a'}"]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    result = run(args)
    result["command"] = command(args) or "python -m benchmarks.hostile " + " ".join(
        getattr(args, "raw_argv", []))
    publish(result, args.out, "hostile", report(result))
    return 0


if __name__ == "__main__":
    import sys

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parsed = parser.parse_args()
    parsed.raw_argv = sys.argv[1:]
    raise SystemExit(main(parsed))
