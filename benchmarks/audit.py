"""False-hit audit bench: the audit's estimate against the truth, the bound, and its cost.

Labelled pairs (QQP's held-out split, ``--holdout`` by a hash of the pair, as bench hitrate)
are replayed through in-process sidecars (semantic tier on, one private Redis) in front of
a fake upstream whose answers follow the labels: questions joined by label-1 pairs share one
answer, every other question has its own (the text of an unrelated question of the train
split); with ``--noise p`` a share p of calls answer with another text (sampling noise, which
the exact-hit control measures). The truth of a served hit is whether the served answer
belongs to the asked question's group.

1. Fill: every distinct ``a`` is asked once (stored); the bench waits for their vectors.
2. The estimate (``--audit-rate``): every ``b``, ``--repeat`` times (plus a share of repeated
   ``a``: exact hits), shuffled, through a fresh sidecar, until ``--audited`` semantic hits
   were audited; the estimate (overall, corrected by the control) against the true
   false-hit rate of the served semantic hits; audit calls per semantic hit.
3. Latency: rounds of ``--round-requests`` hits of 2 (half semantic, half exact: they change
   nothing in the cache) through one sidecar whose audit rate is set per round: two arms
   off (their difference is the noise floor) and one per ``--latency-rates``, each cycle
   in a shuffled order, the audits of a round drained before the next; p50/p99/mean per
   arm, and each arm less the off arm.
4. The bound (``--max-false-hit-rate``): a stream of b's that hit in 2, drawn so that
   ``--start-rate`` of them were false hits, with repeated a's (the control), through a
   fresh sidecar; the served false-hit rate per ``--window`` semantic hits, the floor after
   each window, the semantic hit from which every window is under the bound, the changes.

    promptcache bench audit [--pairs FILE] [--limit 20000] [--audit-rate 1.0] [--repeat 5]
                            [--audited 1000] [--latency-rates 0.05 0.2 1.0] [--cycles 10]
                            [--max-false-hit-rate 0.01] [--bound-hits 3000] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import random
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
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
    p.add_argument("--window", type=int, default=250, help="semantic hits a window")
    p.add_argument("--bound-hits", type=int, default=3000, help="semantic hits of phase 4")
    p.add_argument("--bound-requests", type=int, default=8000, help="requests of phase 4, "
                   "at most (a raised floor, or the tier off, serves fewer semantic hits)")
    p.add_argument("--latency-rates", type=float, nargs="+", default=[0.05, 0.2, 1.0],
                   help="audit rates of phase 3's rounds (each against two arms off)")
    p.add_argument("--cycles", type=int, default=10, help="rounds of each arm in phase 3")
    p.add_argument("--round-requests", type=int, default=300, help="requests a round: half "
                   "semantic hits, half exact hits")
    p.add_argument("--noise", type=float, default=0.02, help="share of noisy upstream answers")
    p.add_argument("--exact-share", type=float, default=0.2, help="repeated a's in the stream")
    p.add_argument("--threshold", type=float, default=0.85, help="the sidecars' "
                   "--similarity-threshold (lower than the default: more semantic hits)")
    p.add_argument("--repeat", type=int, default=5, help="times each b is asked (a b that "
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


def _serve_upstream(args: argparse.Namespace, port: Connection) -> None:
    """In a process of its own: the fake upstream of the same pairs, until terminated (so
    that, as a real upstream's, its work is not on the sidecar's event loop)."""
    pairs = read_pairs(args.pairs, args.limit)
    train, test = split(pairs, args.holdout)
    truth = build_truth(test, train, args.noise, args.seed)

    async def serve() -> None:
        _, url = await fake_upstream(truth)
        port.send(url)
        await asyncio.Event().wait()

    asyncio.run(serve())


@contextlib.contextmanager
def upstream_process(args: argparse.Namespace) -> Iterator[str]:
    """The fake upstream in a child process; its URL."""
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_serve_upstream, args=(args, theirs), daemon=True)
    child.start()
    try:
        if not ours.poll(120):
            raise RuntimeError("the fake upstream did not start")
        yield str(ours.recv())
    finally:
        child.terminate()
        child.join(10)


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
    status, text, took, _ = await ask_similarity(http, url, question)
    return status, text, took


async def ask_similarity(http: aiohttp.ClientSession, url: str, question: str
                         ) -> tuple[str, str, float, float | None]:
    """The X-Cache status, the answer's text, the seconds it took, a semantic hit's
    similarity."""
    started = time.perf_counter()
    async with http.post(url + "/v1/chat/completions", headers=HEADERS, json={
            "model": "gpt-bench", "messages": [{"role": "user", "content": question}]}) as r:
        body = await r.json()
        status = r.headers.get("X-Cache", "")
        similarity = r.headers.get("X-Cache-Similarity")
    return (status, body["choices"][0]["message"]["content"], time.perf_counter() - started,
            float(similarity) if similarity else None)


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
    statuses: dict[str, list[str]] = {}
    hits: list[tuple[str, bool]] = []
    for n, q in enumerate(stream):
        status, text, took = await ask(http, url, q)
        seconds.setdefault(status, []).append(took)
        statuses.setdefault(status, []).append(q)
        seconds.setdefault("all", []).append(took)
        if status == "SEMANTIC-HIT":
            hits.append((q, truth.text_group.get(text, -2) != truth.group.get(normalise(q))))
        if stop is not None and n % 50 == 0 and await stop(len(hits)):
            break
    return {"seconds": seconds, "hits": hits, "statuses": statuses}


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
                EmbeddedRedis(Path(tmp) / "redis", persistence=False) as redis:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16)) as http:
                await _phases(args, http, upstream, redis.url, truth, fills, stream, result)
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
                  redis_url: str, truth: Truth, fills: list[str], stream: list[str],
                  result: dict[str, Any]) -> None:
    t = args.threshold
    result["fill_s"] = await _fill(args, http, upstream, redis_url, fills)
    # 2: the estimate, with the audit on.
    runner, url, _ = await sidecar(upstream, redis_url, audit_rate=args.audit_rate,
                                   similarity_threshold=t)
    try:
        async def enough(_: int) -> bool:
            return bool((await stats(http, url))["audit"]["audited"] >= args.audited)

        calls_before = truth.calls
        on = await replay(http, url, stream, truth, stop=enough)
        await until(http, url, _drained, within=120)
        audit = (await stats(http, url))["audit"]
    finally:
        await runner.cleanup()
    hits = on["hits"]
    true_rate = sum(f for _, f in hits) / len(hits) if hits else None
    result["audit_on"] = {
        "latency": latency(on["seconds"]), "semantic_hits": len(hits),
        "true_false_hit_rate": true_rate, "estimate": audit["false_hit_rate"],
        "interval": audit["interval"], "audited": audit["audited"],
        "disagreed": audit["disagreed"], "control": audit["control"],
        "dropped": audit["dropped"], "expired": audit["expired"], "asked": audit["asked"],
        "audit_calls_per_semantic_hit": round(audit["audited"] / len(hits), 4) if hits else None,
        "upstream_calls": truth.calls - calls_before,
        "error_points": (round(abs(audit["false_hit_rate"] - true_rate) * 100, 2)
                         if true_rate is not None and audit["false_hit_rate"] is not None
                         else None)}
    # 3: latency, the audit on at each rate against off, in interleaved rounds of hits.
    semantic = list(dict.fromkeys(q for q, _ in hits))
    exact_hits = list(dict.fromkeys(q for q in on["statuses"].get("HIT", [])))
    with upstream_process(args) as remote:  # not on the sidecar's loop, as in production
        result["latency"] = await _latency(args, http, remote, redis_url, semantic,
                                           exact_hits)
    # 4: the bound, on a stream that starts at --start-rate false hits.
    good = list(dict.fromkeys(q for q, f in hits if not f))
    bad = list(dict.fromkeys(q for q, f in hits if f))
    result["bound"] = await _bound(args, http, upstream, redis_url, truth, good, bad, fills)


def _drained(s: dict[str, Any]) -> bool:
    """Every queued audit has ended (judged, failed, or expired)."""
    a = s["audit"]
    return bool(a["pending"] == 0 and a["queued"] == a["audited"] + a["control"]["audited"]
                + a["failed"] + a["expired"])


async def _latency(args: argparse.Namespace, http: aiohttp.ClientSession, upstream: str,
                   redis_url: str, semantic: list[str], exact_hits: list[str]
                   ) -> dict[str, Any]:
    """Rounds of the same hits (semantic and exact, which change nothing in the cache)
    through one sidecar whose audit rate is set per round: each cycle runs every arm once,
    in a shuffled order; two arms are off, so their difference is the noise floor."""
    if not semantic:
        return {"skipped": "no semantic hits"}
    from promptcache.server.state import SIDECAR

    rng = random.Random(args.seed + 2)
    half = args.round_requests // 2
    rounds = [rng.sample(semantic, min(half, len(semantic)))
              + rng.sample(exact_hits, min(half, len(exact_hits))) for _ in range(2)]
    for r in rounds:
        rng.shuffle(r)
    arms = ["off", "off'"] + [f"R={r:g}" for r in args.latency_rates]
    rate = {"off": 0.0, "off'": 0.0} | {f"R={r:g}": r for r in args.latency_rates}
    seconds: dict[str, dict[str, list[float]]] = {arm: {} for arm in arms}
    per_round: dict[str, dict[str, list[float]]] = {arm: {} for arm in arms}  # p50s
    runner, url, app = await sidecar(upstream, redis_url, audit_rate=1.0,
                                     similarity_threshold=args.threshold)
    auditor = app[SIDECAR].engine.audit
    assert auditor is not None
    try:
        auditor.rate = 0.0
        for q in rounds[0][:50]:  # warm-up, not counted
            await ask(http, url, q)
        before = dict(auditor.counts)
        for cycle in range(args.cycles):
            order = arms[:]
            rng.shuffle(order)
            for arm in order:
                auditor.rate = rate[arm]
                lap: dict[str, list[float]] = {}
                for q in rounds[cycle % 2]:
                    status, _, took = await ask(http, url, q)
                    lap.setdefault(status, []).append(took)
                auditor.rate = 0.0
                await until(http, url, _drained, within=300)
                for status, v in lap.items():
                    seconds[arm].setdefault(status, []).extend(v)
                for status in ("SEMANTIC-HIT", "HIT"):
                    per_round[arm].setdefault(status, []).append(
                        pct(lap.get(status, []), 0.5) or 0.0)
        counts = {k: v - before.get(k, 0) for k, v in auditor.counts.items()}
    finally:
        await runner.cleanup()
    table = {arm: latency(seconds[arm]) for arm in arms}
    paired = {status: {arm: round(statistics.median(
        a - b for a, b in zip(per_round[arm][status], per_round["off"][status], strict=True)),
        3) for arm in arms[1:]} for status in ("SEMANTIC-HIT", "HIT")}
    return {"round_requests": len(rounds[0]), "cycles": args.cycles, "arms": table,
            "p50_per_round": per_round, "audit_counts": counts,
            "differences_ms": _differences(table, arms), "paired_p50_differences_ms": paired}


def _differences(table: dict[str, Any], arms: list[str]) -> dict[str, Any]:
    """Each arm's p50 and p99 less the pooled off arms' (off' less off: the noise floor)."""
    out: dict[str, Any] = {}
    for status in ("SEMANTIC-HIT", "HIT"):
        base = table["off"].get(status)
        if not base:
            continue
        row = {}
        for arm in arms[1:]:
            cur = table[arm].get(status)
            if cur:
                row[arm] = {q: round(cur[q] - base[q], 3) for q in ("p50_ms", "p99_ms",
                                                                   "mean_ms")}
        out[status] = row
    return out


async def _bound(args: argparse.Namespace, http: aiohttp.ClientSession, upstream: str,
                 redis_url: str, truth: Truth, good: list[str], bad: list[str],
                 fills: list[str]) -> dict[str, Any]:
    """Phase 4: b's that hit in phase 2, ``--start-rate`` of them false hits, and repeated
    a's (exact hits, the control), until ``--bound-hits`` semantic hits were served or
    ``--bound-requests`` requests sent; the served false-hit rate per ``--window`` semantic
    hits, the namespace's floor at the end of each window, and the bound's changes."""
    if not good or not bad:
        return {"skipped": "no true or no false hits to draw from"}
    rng = random.Random(args.seed + 1)
    f = args.max_false_hit_rate
    runner, url, _ = await sidecar(upstream, redis_url, audit_rate=args.audit_rate,
                                   max_false_hit_rate=f, similarity_threshold=args.threshold)
    windows: list[dict[str, Any]] = []
    try:
        hits = sent = 0
        served: list[bool] = []
        false_at: list[float] = []  # the similarities of the window's false hits
        # a window ends every --window semantic hits, and where the floor changed
        before: tuple[Any, bool] = (args.threshold, False)
        while hits < args.bound_hits and sent < args.bound_requests:
            if rng.random() < args.exact_share:
                q = rng.choice(fills)
            else:
                q = rng.choice(bad) if rng.random() < args.start_rate else rng.choice(good)
            sent += 1
            status, text, _, similarity = await ask_similarity(http, url, q)
            if status == "SEMANTIC-HIT":
                hits += 1
                false = truth.text_group.get(text, -2) != truth.group.get(normalise(q))
                served.append(false)
                if false and similarity is not None:
                    false_at.append(round(similarity, 4))
            last = sent == args.bound_requests or hits == args.bound_hits
            if sent % 25 == 0 or last or len(served) == args.window:
                ns = (await stats(http, url))["audit"]["namespaces"].get("", {})
                state = (ns.get("floor", args.threshold), ns.get("off", False))
                changed, before = state != before, state
                if not (changed or last or len(served) == args.window):
                    continue
                windows.append({"hits_to": hits, "requests_to": sent,
                                "semantic_hits": len(served), "false_hits": sum(served),
                                "served_false_hit_rate": round(sum(served) / len(served), 4)
                                if served else None,
                                "floor_after": state[0], "off_after": state[1],
                                "false_at": false_at})
                served, false_at = [], []
        audit = (await stats(http, url))["audit"]
    finally:
        await runner.cleanup()
    return {"max_false_hit_rate": f, "namespace": audit["namespaces"].get(""),
            "start_rate": args.start_rate, "requests": sent,
            "semantic_hits": hits, "windows": windows,
            "under_from_hit": _under_from(windows, f), "changes": audit["changes"],
            "audited": audit["audited"], "control": audit["control"],
            "good": len(good), "bad": len(bad)}


def _under_from(windows: list[dict[str, Any]], f: float) -> int | None:
    """The semantic hits served before the window from which every window's served
    false-hit rate is under ``f`` (a window without hits counts as under); None if the last
    is not."""
    start = None
    for n, w in enumerate(windows):
        rate = w["served_false_hit_rate"]
        if rate is not None and rate >= f:
            start = None
        elif start is None:
            start = windows[n - 1]["hits_to"] if n else 0
    return start


def report(r: dict[str, Any]) -> str:
    on, b, lat = r["audit_on"], r["bound"], r["latency"]
    lines = [f"pairs {r['pairs']}, stream {r['stream']}, fill {r['fill_s']} s",
             f"audit on: {on['semantic_hits']} semantic hits, {on['audited']} audited; "
             f"true false-hit rate {on['true_false_hit_rate']}, estimate {on['estimate']} "
             f"{on['interval']} (error {on['error_points']} points); control {on['control']}",
             f"audit calls / semantic hits: {on['audit_calls_per_semantic_hit']}, "
             f"dropped {on['dropped']}, expired {on['expired']}"]
    if "arms" in lat:
        lines.append(f"latency, {lat['cycles']} cycles of {lat['round_requests']} hits per "
                     "arm (ms; p50/p99/mean):")
        for arm, table in lat["arms"].items():
            cells = [f"{k} {v['p50_ms']}/{v['p99_ms']}/{v['mean_ms']} (n {v['n']})"
                     for k, v in table.items() if k in ("SEMANTIC-HIT", "HIT")]
            lines.append(f"  {arm:7} " + "   ".join(cells))
        for status, row in lat["differences_ms"].items():
            lines.append(f"  {status} less off: " + ", ".join(
                f"{arm} {d['p50_ms']:+.3f}/{d['p99_ms']:+.3f}/{d['mean_ms']:+.3f}"
                for arm, d in row.items()))
        lines.append("  p50 less the same cycle's off, median over cycles: " + "; ".join(
            f"{status} " + ", ".join(f"{arm} {d:+.3f}" for arm, d in row.items())
            for status, row in lat["paired_p50_differences_ms"].items()))
        lines.append(f"  audits in the rounds: {lat['audit_counts']}")
    if "windows" in b:
        lines.append(f"bound (F = {b['max_false_hit_rate']}, {b['start_rate']} false at the "
                     f"start; control {b['control']}): served false-hit rate per window of "
                     "semantic hits:")
        for w in b["windows"]:
            lines.append(f"  hits {w['hits_to']:5} (requests {w['requests_to']:5}): "
                         f"{w['false_hits']}/{w['semantic_hits']} = "
                         f"{w['served_false_hit_rate']}; then floor {w['floor_after']}, "
                         f"off {w['off_after']}")
        lines.append(f"  under the bound from semantic hit {b['under_from_hit']} on; changes "
                     f"{[(c['floor'], c['off']) for c in b['changes']]}")
    else:
        lines.append(f"bound: {b}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    result = asyncio.run(_run(args))
    publish(result, args.out, "audit", report(result))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
