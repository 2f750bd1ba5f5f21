"""Multi-turn hit quality: labelled conversation pairs replayed through a real sidecar.

Each line of the pair file (default: the bundled ``benchmarks/data/conversations.jsonl``)
holds two chat requests ``a`` and ``b`` with the same system prompt, a ``kind``, a ``label``
(1: one answer serves both; 0: it must not) and a ``split`` (``fit`` or ``held_out``, by a
hash of the id; only ``held_out`` figures are judged). Kinds with label 1:
``standalone_after_unrelated``, ``context_reworded``, ``context_smalltalk``; with label 0:
``same_final_other_context``, ``changed_detail``, ``confirm_other_offer``,
``other_question_same_context`` (the same conversation, a follow-up that asks another
thing: "How do I add the second node?" / "How do I remove the second node?").

The command starts its own sidecar in this process (semantic tier on, default settings but
``--context-match`` when given) in front of the fake upstream, on a private Redis. For each
pair, in its own namespace (so a lookup can only find its own pair's entry), it sends ``a``
(a MISS, stored), waits until its vector is attached, then sends ``b``, and reads
``X-Cache``: ``b`` is *served* on a HIT or SEMANTIC-HIT, a *false hit* when served on label 0.

Reported per kind and per split: pairs, served, false hits; and on the held-out split the
targets of issue 13: zero false hits, and at least 40% of the should-hit pairs served.
Writes ``conversations.json`` to ``--out``.

    promptcache bench conversations [--pairs FILE] [--split held_out|fit|all]
                                    [--context-match MODE] [--limit N]
                                    [--out bench-results/conversations] [--quiet]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from promptcache.benchmarks.progress import add_quiet, progress
from promptcache.benchmarks.results import command, publish
from promptcache.cache.redis.embedded import EmbeddedRedis
from promptcache.server.app import create_app
from promptcache.server.config import Settings
from promptcache.server.state import SIDECAR
from promptcache.testing import running_fake_upstream

#: The bundled labelled conversations, found beside this module.
DEFAULT_PAIRS = Path(__file__).parent / "data" / "conversations.jsonl"
CHAT = "/v1/chat/completions"
MODEL = "gpt-4o-mini"
SERVED = frozenset({"HIT", "SEMANTIC-HIT"})
KINDS = {"standalone_after_unrelated": 1, "context_reworded": 1, "context_smalltalk": 1,
         "same_final_other_context": 0, "changed_detail": 0, "confirm_other_offer": 0,
         "other_question_same_context": 0}
TARGET_SERVED = 0.40


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pairs", default=str(DEFAULT_PAIRS), metavar="FILE",
                   help="JSON lines of {id, domain, kind, label, split, a, b} (default: the "
                   "bundled benchmarks/data/conversations.jsonl)")
    p.add_argument("--split", choices=("held_out", "fit", "all"), default="all",
                   help="which pairs to replay (default all; the targets are judged on "
                   "held_out)")
    p.add_argument("--context-match", default=None, metavar="MODE",
                   help="the sidecar's --context-match (default: the sidecar's own)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="replay only the first N pairs of the split")
    p.add_argument("--out", default="bench-results/conversations", metavar="DIR",
                   help="directory for conversations.json")
    add_quiet(p)


def read_conversations(path: str | Path, split: str = "all", limit: int | None = None
                       ) -> list[dict[str, Any]]:
    """The pairs of ``split`` (or all), checked for shape, the first ``limit`` of them."""
    rows = []
    with Path(path).open(encoding="utf-8") as lines:
        for line in lines:
            if not line.strip():
                continue
            row = json.loads(line)
            if row["kind"] not in KINDS or KINDS[row["kind"]] != row["label"]:
                raise ValueError(f"{row['id']}: kind {row['kind']!r} with label {row['label']}")
            if split in ("all", row["split"]):
                rows.append(row)
    return rows[:limit]


def settings_for(upstream: str, redis_url: str, context_match: str | None) -> Settings:
    """Default sidecar settings, semantic tier on, with generous timeouts (a shared machine
    must not turn a lookup into a BYPASS) and ``context_match`` if given."""
    overrides: dict[str, Any] = {"semantic": True, "redis_url": redis_url, "port": 0,
                                 "redis_timeout": 5.0, "embed_timeout": 30.0,
                                 "semantic_wait_budget": 5.0}
    if context_match is not None:
        overrides["context_match"] = context_match
    return replace(Settings(upstream=upstream), **overrides)


async def _post(http: aiohttp.ClientSession, url: str, messages: list[dict[str, Any]],
                namespace: str) -> str:
    body = {"model": MODEL, "temperature": 0, "messages": messages}
    headers = {"Authorization": "Bearer sk-bench", "X-Cache-Namespace": namespace}
    async with http.post(url + CHAT, json=body, headers=headers) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"{namespace}: status {r.status}")
        return r.headers.get("X-Cache", "")


async def replay(rows: list[dict[str, Any]], context_match: str | None, quiet: bool
                 ) -> list[dict[str, Any]]:
    """Each pair through one sidecar: ``a`` stored, then ``b`` looked up; X-Cache of both."""
    out = []
    with tempfile.TemporaryDirectory(prefix="pc-bench-") as tmp, \
            EmbeddedRedis(Path(tmp) / "redis", persistence=False) as store:
        async with running_fake_upstream() as fake:
            app = create_app(settings_for(fake.url, store.url, context_match))
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            try:
                site = web.TCPSite(runner, "127.0.0.1", 0)
                await site.start()
                url = f"http://127.0.0.1:{runner.addresses[0][1]}"
                semantic = app[SIDECAR].semantic
                assert semantic is not None, "the semantic tier did not start"
                async with aiohttp.ClientSession() as http:
                    with progress(len(rows), "pairs", quiet=quiet, unit="pair") as bar:
                        for row in rows:
                            first = await _post(http, url, row["a"], row["id"])
                            await semantic.drain()
                            second = await _post(http, url, row["b"], row["id"])
                            out.append({"id": row["id"], "kind": row["kind"],
                                        "domain": row["domain"], "label": row["label"],
                                        "split": row["split"], "a": first, "b": second,
                                        "served": second in SERVED})
                            bar.update(1)
            finally:
                await runner.cleanup()
    return out


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Pairs, served and false hits per split and kind; the targets on held_out."""
    groups: dict[str, dict[str, Counter[str]]] = defaultdict(lambda: defaultdict(Counter))
    for r in results:
        for split in (r["split"], "all"):
            for key in (r["kind"], f"label_{r['label']}"):
                c = groups[split][key]
                c["pairs"] += 1
                c["served"] += r["served"]
                c["false_hits"] += r["served"] and r["label"] == 0
    table = {split: {key: {**c, "served_share": round(c["served"] / c["pairs"], 4)}
                     for key, c in sorted(by.items())} for split, by in groups.items()}
    held = table.get("held_out", {})
    should, must_not = held.get("label_1"), held.get("label_0")
    target = None
    if should and must_not:
        target = {"false_hits": must_not["false_hits"],
                  "should_hit_served_share": should["served_share"],
                  "zero_false_hits": must_not["false_hits"] == 0,
                  "served_at_least_40pct": should["served_share"] >= TARGET_SERVED}
        target["met"] = target["zero_false_hits"] and target["served_at_least_40pct"]
    return {"by_split": table, "target": target}


def run(args: argparse.Namespace) -> dict[str, Any]:
    rows = read_conversations(args.pairs, args.split, args.limit)
    started = time.time()
    t0 = time.perf_counter()
    results = asyncio.run(replay(rows, args.context_match, args.quiet))
    return {"benchmark": "conversations",
            "date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started)),
            "pairs_file": str(args.pairs), "split": args.split,
            "context_match": args.context_match or "default",
            "seconds": round(time.perf_counter() - t0, 1),
            **summarise(results),
            "x_cache": dict(Counter(f"{r['a']} -> {r['b']}" for r in results)),
            "served_pairs": [r["id"] for r in results if r["served"]]}


def report(r: dict[str, Any]) -> str:
    lines = [f"{r['pairs_file']} ({r['split']}), context match: {r['context_match']}", "",
             "| split | kind | pairs | served | share | false hits |", "|---|---|---|---|---|---|"]
    for split, by in sorted(r["by_split"].items()):
        for key, c in by.items():
            lines.append(f"| {split} | {key} | {c['pairs']} | {c['served']} | "
                         f"{c['served_share']:.1%} | {c['false_hits']} |")
    t = r["target"]
    if t is not None:
        lines += ["", f"held out: {t['false_hits']} false hits (target 0), "
                  f"{t['should_hit_served_share']:.1%} of should-hit pairs served (target >= "
                  f"{TARGET_SERVED:.0%}): {'met' if t['met'] else 'NOT met'}"]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    result = run(args)
    result["command"] = command(args)
    publish(result, args.out, "conversations", report(result))
    return 0
