"""False-hit audit bench: the audit's estimate against the truth, the bound, and its cost.

Labelled pairs (QQP's held-out split, ``--holdout`` by a hash of the pair, as bench hitrate)
are replayed through in-process sidecars (semantic tier on, one private Redis) in front of
a fake upstream whose answers follow the labels: questions joined by label-1 pairs share one
answer, every other question has its own (the text of an unrelated question of the train
split); with ``--noise p`` a share p of calls answer with another text (sampling noise, which
the exact-hit control measures). The truth of a served hit is whether the served answer
belongs to the asked question's group.

1. Fill: every distinct ``a`` is asked once (stored); the bench waits for their vectors.
3. Audit on (``--audit-rate``): every ``b``, ``--repeat`` times (plus a share of repeated
   ``a``: exact hits), shuffled, through a fresh sidecar on the same Redis, until
   ``--audited`` semantic hits were audited; the estimate (overall, corrected by the
   control) against the true false-hit rate of the served semantic hits; latency against 2;
   audit calls per semantic hit.
2. Audit off: the same requests through another fresh sidecar on a Redis of its own, filled
   the same way (so both arms start from the same state).
4. The bound (``--max-false-hit-rate``): a stream of b's that hit in 3, drawn so that
   ``--start-rate`` of them were false hits, through a fresh sidecar; the served false-hit
   rate per window of ``--window`` semantic hits, and the bound's changes.

    promptcache bench audit [--pairs FILE] [--limit 20000] [--audit-rate 1.0] [--repeat 4]
                            [--audited 1000] [--max-false-hit-rate 0.01] [--out bench-results]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from promptcache.benchmarks.pairs import Pair, normalise, read_pairs, split
from promptcache.benchmarks.results import command, publish
from promptcache.cache.redis.embedded import EmbeddedRedis

DEFAULT_PAIRS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "qqp_pairs.jsonl.gz"
HEADERS = {"Authorization": "Bearer bench"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pairs", default=str(DEFAULT_PAIRS), help="labelled pairs (JSON lines)")
    p.add_argument("--limit", type=int, default=20000, help="pairs read")
    p.add_argument("--holdout", type=float, default=0.2, help="held-out share replayed")
    p.add_argument("--audit-rate", type=float, default=1.0)
    p.add_argument("--audited", type=int, default=1000, help="audited semantic hits wanted")
    p.add_argument("--max-false-hit-rate", type=float, default=0.01)
    p.add_argument("--start-rate", type=float, default=0.05, help="false hits in stream 4")
    p.add_argument("--window", type=int, default=500, help="semantic hits a window")
    p.add_argument("--bound-hits", type=int, default=3000, help="requests of phase 4 (each "
                   "a semantic hit of phase 3)")
    p.add_argument("--noise", type=float, default=0.02, help="share of noisy upstream answers")
    p.add_argument("--exact-share", type=float, default=0.2, help="repeated a's in the stream")
    p.add_argument("--threshold", type=float, default=0.85, help="the sidecars' "
                   "--similarity-threshold (lower than the default: more semantic hits)")
    p.add_argument("--repeat", type=int, default=4, help="times each b is asked (a b that "
                   "missed is an exact hit after; one that hit is a semantic hit again)")
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--out", default="bench-results")


@dataclass
class Truth:
    """The fake upstream's answers: question -> group -> answer text; text -> group."""

    group: dict[str, int]
    answers: dict[int, str]
    pool: list[str]
    noise: float
    rng: random.Random
    text_group: dict[str, int] = field(default_factory=dict)
    calls: int = 0

    def answer(self, question: str) -> str:
        g = self.group.get(normalise(question), -1)
        text = self.answers.get(g, f"no idea about {question[:40]}")
        if self.noise and self.rng.random() < self.noise:
            text = self.rng.choice(self.pool)
        self.text_group.setdefault(text, g)
        return text


def build_truth(test: list[Pair], train: list[Pair], noise: float, seed: int) -> Truth:
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for p in test:
        a, b = find(normalise(p.a)), find(normalise(p.b))
        if p.label == 1:
            parent[a] = b
    roots = {q: find(q) for q in list(parent)}
    ids = {r: n for n, r in enumerate(dict.fromkeys(roots.values()))}
    pool = list(dict.fromkeys(p.b for p in train or test))
    rng = random.Random(seed)
    rng.shuffle(pool)
    answers = {n: pool[n % len(pool)] for n in ids.values()}
    rest = pool[len(ids):] or pool
    return Truth({q: ids[r] for q, r in roots.items()}, answers, rest, noise, rng)


async def fake_upstream(truth: Truth) -> tuple[web.AppRunner, str]:
    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        truth.calls += 1
        text = truth.answer(body["messages"][-1]["content"])
        return web.json_response({
            "id": "chatcmpl-bench", "object": "chat.completion", "model": body.get("model"),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def sidecar(upstream: str, redis_url: str, **overrides: Any) -> tuple[web.AppRunner, str,
                                                                            web.Application]:
    from promptcache.server.app import create_app
    from promptcache.server.config import Settings

    settings = replace(Settings(upstream=upstream), port=0, redis_url=redis_url,
                       index_warmup_wait=300.0, semantic_wait_budget=1.0, redis_timeout=2.0,
                       **overrides)
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}", app


async def ask(http: aiohttp.ClientSession, url: str, question: str
              ) -> tuple[str, str, float]:
    started = time.perf_counter()
    async with http.post(url + "/v1/chat/completions", headers=HEADERS, json={
            "model": "gpt-bench", "messages": [{"role": "user", "content": question}]}) as r:
        body = await r.json()
        status = r.headers.get("X-Cache", "")
    return status, body["choices"][0]["message"]["content"], time.perf_counter() - started


async def stats(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(url + "/stats") as r:
        return dict(await r.json())


async def until(http: aiohttp.ClientSession, url: str, done: Any, within: float = 600) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:  # polling a server: no event to wait on
        if done(await stats(http, url)):
            return
        await asyncio.sleep(0.2)  # noqa: ASYNC110


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 3)


def latency(seconds: dict[str, list[float]]) -> dict[str, Any]:
    return {k: {"n": len(v), "p50_ms": pct(v, 0.5), "p99_ms": pct(v, 0.99),
                "mean_ms": round(statistics.fmean(v) * 1000, 3) if v else None}
            for k, v in seconds.items()}


async def replay(http: aiohttp.ClientSession, url: str, stream: list[str], truth: Truth,
                 stop: Any = None) -> dict[str, Any]:
    """Ask each question in turn; per status latencies; served semantic hits and their truth."""
    seconds: dict[str, list[float]] = {}
    hits: list[tuple[str, bool]] = []
    for n, q in enumerate(stream):
        status, text, took = await ask(http, url, q)
        seconds.setdefault(status, []).append(took)
        seconds.setdefault("all", []).append(took)
        if status == "SEMANTIC-HIT":
            hits.append((q, truth.text_group.get(text, -2) != truth.group.get(normalise(q))))
        if stop is not None and n % 50 == 0 and await stop(len(hits)):
            break
    return {"seconds": seconds, "hits": hits}


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    pairs = read_pairs(args.pairs, args.limit)
    train, test = split(pairs, args.holdout)
    truth = build_truth(test, train, args.noise, args.seed)
    rng = random.Random(args.seed)
    fills = list(dict.fromkeys(p.a for p in test))
    exact = {normalise(a) for a in fills}
    queries = [p.b for p in test if normalise(p.b) not in exact]
    stream = queries * args.repeat + rng.sample(fills, int(len(queries) * args.exact_share))
    rng.shuffle(stream)
    result: dict[str, Any] = {"command": command(args), "pairs": len(test),
                              "fills": len(fills), "stream": len(stream),
                              "audit_rate": args.audit_rate, "noise": args.noise}
    up_runner, upstream = await fake_upstream(truth)
    try:
        with tempfile.TemporaryDirectory() as tmp, \
                EmbeddedRedis(Path(tmp) / "on", persistence=False) as on, \
                EmbeddedRedis(Path(tmp) / "off", persistence=False) as off:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16)) as http:
                await _phases(args, http, upstream, (on.url, off.url), truth, fills, stream,
                              result)
    finally:
        await up_runner.cleanup()
    return result


async def _fill(args: argparse.Namespace, http: aiohttp.ClientSession, upstream: str,
                redis_url: str, fills: list[str]) -> float:
    """Phase 1: every distinct ``a`` stored, with its vector; the seconds it took."""
    runner, url, _ = await sidecar(upstream, redis_url, similarity_threshold=args.threshold)
    try:
        started = time.perf_counter()
        sem = asyncio.Semaphore(8)

        async def fill(q: str) -> None:
            async with sem:
                await ask(http, url, q)

        await asyncio.gather(*(fill(q) for q in fills))
        await until(http, url, lambda s: s["semantic"]["vector_backlog"] == 0)
        return round(time.perf_counter() - started, 1)
    finally:
        await runner.cleanup()


async def _phases(args: argparse.Namespace, http: aiohttp.ClientSession, upstream: str,
                  redis_urls: tuple[str, str], truth: Truth, fills: list[str],
                  stream: list[str], result: dict[str, Any]) -> None:
    # 1: fill (each arm of the A/B has a Redis of its own, filled alike).
    t = args.threshold
    redis_url, off_url = redis_urls
    result["fill_s"] = await _fill(args, http, upstream, redis_url, fills)
    # 3: the audit on.
    runner, url, _ = await sidecar(upstream, redis_url, audit_rate=args.audit_rate,
                                   similarity_threshold=t)
    try:
        async def enough(_: int) -> bool:
            return bool((await stats(http, url))["audit"]["audited"] >= args.audited)

        calls_before = truth.calls
        on = await replay(http, url, stream, truth, stop=enough)
        await until(http, url, lambda s: s["audit"]["pending"] == 0, within=120)
        audit = (await stats(http, url))["audit"]
    finally:
        await runner.cleanup()
    hits = on["hits"]
    asked = len(on["seconds"]["all"])
    on_calls = truth.calls - calls_before
    # 2: the audit off, on the same requests, from the same state (its own Redis, filled).
    await _fill(args, http, upstream, off_url, fills)
    runner, url, _ = await sidecar(upstream, off_url, similarity_threshold=t)
    try:
        off = await replay(http, url, stream[:asked], truth)
    finally:
        await runner.cleanup()
    result["audit_off"] = {"latency": latency(off["seconds"]), "semantic_hits": len(off["hits"]),
                           "false_hits": sum(f for _, f in off["hits"])}
    true_rate = sum(f for _, f in hits) / len(hits) if hits else None
    result["audit_on"] = {
        "latency": latency(on["seconds"]), "semantic_hits": len(hits),
        "true_false_hit_rate": true_rate, "estimate": audit["false_hit_rate"],
        "interval": audit["interval"], "audited": audit["audited"],
        "disagreed": audit["disagreed"], "control": audit["control"],
        "dropped": audit["dropped"], "asked": audit["asked"],
        "audit_calls_per_semantic_hit": round(audit["audited"] / len(hits), 4) if hits else None,
        "upstream_calls": on_calls,
        "error_points": (round(abs(audit["false_hit_rate"] - true_rate) * 100, 2)
                         if true_rate is not None and audit["false_hit_rate"] is not None
                         else None)}
    # 4: the bound, on a stream that starts at --start-rate false hits.
    good = list(dict.fromkeys(q for q, f in hits if not f))
    bad = list(dict.fromkeys(q for q, f in hits if f))
    result["bound"] = await _bound(args, http, upstream, redis_url, truth, good, bad)


async def _bound(args: argparse.Namespace, http: aiohttp.ClientSession, upstream: str,
                 redis_url: str, truth: Truth, good: list[str], bad: list[str]
                 ) -> dict[str, Any]:
    if not good or not bad:
        return {"skipped": "no true or no false hits to draw from"}
    rng = random.Random(args.seed + 1)
    stream = [rng.choice(bad) if rng.random() < args.start_rate else rng.choice(good)
              for _ in range(args.bound_hits * 4)]
    runner, url, _ = await sidecar(upstream, redis_url, audit_rate=args.audit_rate,
                                   max_false_hit_rate=args.max_false_hit_rate,
                                   similarity_threshold=args.threshold)
    windows: list[dict[str, Any]] = []
    try:
        hits = 0
        sent = 0
        served: list[bool] = []
        while sent < len(stream) and sent < args.bound_hits:
            q = stream[sent]
            sent += 1
            status, text, _ = await ask(http, url, q)
            if status == "SEMANTIC-HIT":
                hits += 1
                served.append(truth.text_group.get(text, -2) != truth.group.get(normalise(q)))
            if sent % args.window == 0:  # every request here was a semantic hit in phase 3
                windows.append({"requests_to": sent, "semantic_hits": len(served),
                                "false_hits": sum(served),
                                "served_false_hit_rate": round(sum(served) / len(served), 4)
                                if served else 0.0,
                                "false_hits_per_request": round(sum(served) / args.window, 4)})
                served = []
        audit = (await stats(http, url))["audit"]
    finally:
        await runner.cleanup()
    under = next((w["requests_to"] for w in windows
                  if w["served_false_hit_rate"] < args.max_false_hit_rate), None)
    return {"requests": sent, "semantic_hits": hits, "windows": windows,
            "tail": {"semantic_hits": len(served),
                     "served_false_hit_rate": round(sum(served) / len(served), 4)
                     if served else None},
            "under_bound_by_request": under, "changes": audit["changes"],
            "good": len(good), "bad": len(bad)}


def report(r: dict[str, Any]) -> str:
    on, off, b = r["audit_on"], r["audit_off"], r["bound"]
    lines = [f"pairs {r['pairs']}, stream {r['stream']}, fill {r['fill_s']} s",
             f"audit on: {on['semantic_hits']} semantic hits, {on['audited']} audited; "
             f"true false-hit rate {on['true_false_hit_rate']}, estimate {on['estimate']} "
             f"{on['interval']} (error {on['error_points']} points); control {on['control']}",
             f"audit calls / semantic hits: {on['audit_calls_per_semantic_hit']}, "
             f"dropped {on['dropped']}",
             "latency (ms)   off p50/p99        on p50/p99"]
    for k in ("all", "SEMANTIC-HIT", "HIT", "MISS"):
        a, c = off["latency"].get(k), on["latency"].get(k)
        if a and c:
            lines.append(f"  {k:13} {a['p50_ms']}/{a['p99_ms']}   {c['p50_ms']}/{c['p99_ms']}")
    lines.append(f"bound: windows {b.get('windows')}, "
                 f"under at {b.get('under_bound_by_request')}, "
                 f"changes {[(c['floor'], c['off']) for c in b.get('changes', [])]}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    result = asyncio.run(_run(args))
    publish(result, args.out, "audit", report(result))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
