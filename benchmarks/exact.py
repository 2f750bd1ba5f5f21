"""Exact-hit benchmark: the sidecar beside the floor, with and without its near cache, over
1..N workers, and how soon a change made through one node reaches another's near cache.

The floor is a minimal aiohttp handler doing one Redis GET of a stored payload
(:mod:`promptcache.benchmarks.floor`). The floor and the sidecars run in their own
processes on the same private Redis; one load generator (this process) drives each in
turn, interleaved over several rounds, at each concurrency, on a hot set of
:data:`HOT_SET` distinct requests (all stored first). Reported per server: throughput,
p50/p95/p99, and server CPU time per request (from /proc, the server's processes summed,
independent of how fast the client is); then the ratios against the floor, which are what
to compare across machines.

Servers: ``floor``; ``sidecar`` (``--near-cache-bytes 0``: every hit reads Redis);
``sidecar+near`` (the default near cache: hot entries answered from the process).

Workers (``--workers 1 2``): ``sidecar`` and ``sidecar+near`` again with ``--workers N``, at
the highest concurrency, as throughput against one worker; with the load generator's own
CPU share (of one core), since on a small machine it competes with the workers.

Coherence (``--trials``): two sidecars with near caches on one Redis. Each trial makes a
new entry hot in node B's near cache, then changes it from outside B (a ``DELETE /cache``
through node A, or an overwrite by another writer of the same entry store), and reads it
from B in a tight loop. A read that began after the change was acknowledged and still got
the old answer is stale; the trial's staleness is how long after the change the last such
read began (0 when none did).

    promptcache bench exact [--requests 4000] [--rounds 3] [--concurrency 1 32]
                            [--workers 1 2] [--trials 200] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import redis

from promptcache.benchmarks.loadgen import closed_loop
from promptcache.benchmarks.procs import free_port, python_process, tree_cpu_seconds
from promptcache.benchmarks.results import command, publish
from promptcache.cache.entry import Entry
from promptcache.cache.exact import ExactCache
from promptcache.cache.keys import CacheKey
from promptcache.cache.options import EngineOptions
from promptcache.cache.redis.budget import BudgetStore
from promptcache.cache.redis.client import close_client, redis_client
from promptcache.cache.redis.embedded import EmbeddedRedis
from promptcache.cache.redis.layout import KeyLayout

CHAT = "/v1/chat/completions"
#: Distinct requests in the hot set every server is driven with.
HOT_SET = 32
HEADERS = {"Authorization": "Bearer sk-bench"}
#: Words in each fake answer: about 2 KB of JSON, the size of a typical chat answer (stored
#: deflated, as the cache stores any answer of 1 KB or more).
ANSWER_WORDS = 300
JSON_HEADERS = {**HEADERS, "Content-Type": "application/json"}


def body(n: int, tag: str = "") -> bytes:
    return json.dumps({
        "model": "gpt-4o-mini",
        "temperature": 0,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": f"Explain in two sentences what a write-ahead log "
                                        f"is. ({tag}{n})"},
        ],
    }).encode()


BODIES = [body(n) for n in range(HOT_SET)]
#: One body of the set: the README's earlier single-request figure used this shape.
BODY = BODIES[0]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=4000,
                   help="requests per measurement (default: 4000)")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds; medians are reported (default: 3)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32],
                   help="concurrency levels (default: 1 32)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                   help="worker counts to compare at the highest concurrency; 1 alone "
                        "skips the comparison (default: 1 2)")
    p.add_argument("--trials", type=int, default=200,
                   help="coherence trials per kind of change, 0 to skip (default: 200)")
    p.add_argument("--out", default="bench-results",
                   help="directory for exact.json (default: bench-results)")


def _post(url: str, data: bytes) -> urllib.request.Request:
    return urllib.request.Request(url, data=data, method="POST", headers=JSON_HEADERS)


async def _measure(url: str, pid: int, concurrency: int, requests: int,
                   expect_hit: bool) -> dict[str, Any]:
    def is_hit(_status: int, headers: Any) -> bool:
        return not expect_hit or headers.get("X-Cache") == "HIT"

    cpu0, own0, wall0 = tree_cpu_seconds(pid), time.process_time(), time.perf_counter()
    result = await closed_loop(url, BODIES, concurrency=concurrency, requests=requests,
                               headers=HEADERS, check=is_hit)
    cpu = tree_cpu_seconds(pid) - cpu0
    own, wall = time.process_time() - own0, time.perf_counter() - wall0
    summary = result.summary()
    summary["server_cpu_us_per_request"] = round(cpu / max(result.requests, 1) * 1e6, 1)
    summary["loadgen_cpu_share"] = round(own / wall, 3)
    return summary


FIELDS = ("throughput_rps", "p50_ms", "p95_ms", "p99_ms", "server_cpu_us_per_request",
          "loadgen_cpu_share")


def _medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    return {f: float(statistics.median(r[f] for r in runs)) for f in FIELDS}


async def _levels(args: argparse.Namespace, urls: dict[str, str], pids: dict[str, int]
                  ) -> dict[str, Any]:
    levels: dict[str, Any] = {}
    for c in args.concurrency:
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in urls}
        for _ in range(args.rounds):
            for name, url in urls.items():
                runs[name].append(await _measure(url + CHAT, pids[name], c, args.requests,
                                                 expect_hit=name != "floor"))
        med = {name: _medians(rs) for name, rs in runs.items()}
        floor = med["floor"]
        levels[str(c)] = {
            "median": med,
            "runs": runs,
            "vs_floor": {name: {
                "throughput_ratio": round(m["throughput_rps"] / floor["throughput_rps"], 3),
                "p50_delta_ms": round(m["p50_ms"] - floor["p50_ms"], 4),
                "cpu_ratio": round(m["server_cpu_us_per_request"]
                                   / floor["server_cpu_us_per_request"], 3),
            } for name, m in med.items() if name != "floor"},
        }
    return levels


def _wait_for_workers(url: str, workers: int, within: float = 60.0) -> None:
    """Until ``workers`` different worker pids have answered /stats (each on a connection
    of its own: the kernel spreads new connections over the workers)."""
    seen: set[int] = set()
    deadline = time.monotonic() + within
    while len(seen) < workers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(seen)} of {workers} workers answered")
        with urllib.request.urlopen(url + "/stats") as r:
            seen.add(json.load(r)["worker"]["pid"])


@contextlib.contextmanager
def _sidecar(upstream: str, redis_url: str, *extra: str, workers: int = 1
             ) -> Iterator[tuple[str, int]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with python_process(["-m", "promptcache", "serve", "--upstream", upstream,
                         "--redis-url", redis_url, "--port", str(port), "--semantic", "false",
                         "--log-level", "warning", "--workers", str(workers), *extra],
                        url + "/healthz") as proc:
        _wait_for_workers(url, workers)
        for data in BODIES:  # stored (the first server started stores; the rest hit)
            with urllib.request.urlopen(_post(url + CHAT, data)) as r:
                r.read()
        yield url, proc.pid


NEAR_OFF = ("--near-cache-bytes", "0")
#: The admin token of the node the coherence trials delete through (a throw-away value).
ADMIN_TOKEN = "bench-admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def _workers(args: argparse.Namespace, upstream: str, redis_url: str
                   ) -> dict[str, Any]:
    """Throughput with N workers against one, near cache off and on."""
    c = max(args.concurrency)
    out: dict[str, Any] = {"concurrency": c, "cores": len(os.sched_getaffinity(0))}
    for name, extra in (("sidecar", NEAR_OFF), ("sidecar+near", ())):
        by_n: dict[str, Any] = {}
        for n in args.workers:
            with _sidecar(upstream, redis_url, *extra, workers=n) as (url, pid):
                runs = [await _measure(url + CHAT, pid, c, args.requests, expect_hit=True)
                        for _ in range(args.rounds)]
            by_n[str(n)] = _medians(runs)
        one = by_n[str(min(args.workers))]["throughput_rps"]
        for m in by_n.values():
            m["throughput_vs_fewest"] = round(m["throughput_rps"] / one, 3)
        out[name] = by_n
    return out


async def _coherence(trials: int, a: str, b: str, writer: ExactCache) -> dict[str, Any]:
    """Staleness of node B's near cache after a delete through node A or an overwrite by
    another writer (see the module doc)."""
    out: dict[str, Any] = {}
    async with aiohttp.ClientSession() as http:

        async def read(data: bytes) -> tuple[str, bytes, str]:
            async with http.post(b + CHAT, data=data, headers=JSON_HEADERS) as r:
                return r.headers.get("X-Cache", "-"), await r.read(), r.headers["X-Cache-Key"]

        for kind in ("delete", "overwrite"):
            windows: list[float] = []
            stale_trials = reads = 0
            for t in range(trials):
                data = body(t, f"{kind}-")
                for _ in range(3):  # stored, read into B's near cache, served from it
                    status, old, key = await read(data)
                assert status == "HIT", status
                new = b'{"choices": [{"message": {"content": "changed %d"}}]}' % t
                if kind == "delete":
                    async with http.delete(a + "/cache", json={"key": key},
                                           headers=ADMIN) as r:
                        assert r.status == 200, await r.text()
                else:
                    await writer.put(CacheKey("", "", CHAT, key),
                                     Entry(200, new, "application/json", time.time(), "chat"))
                done = time.perf_counter()
                last_stale = None
                deadline = done + 1.0
                while time.perf_counter() < deadline:
                    began = time.perf_counter()
                    status, got, _ = await read(data)
                    reads += 1
                    changed = status != "HIT" if kind == "delete" else got == new
                    if changed:
                        break
                    last_stale = began
                else:
                    raise AssertionError(f"{kind} trial {t}: still stale after 1 s")
                windows.append(0.0 if last_stale is None else last_stale - done)
                stale_trials += last_stale is not None
            windows.sort()
            out[kind] = {
                "trials": trials,
                "reads": reads,
                "trials_with_a_stale_read": stale_trials,
                "stale_ms_p50": round(windows[len(windows) // 2] * 1000, 3),
                "stale_ms_p99": round(windows[min(len(windows) - 1,
                                                  round(0.99 * (len(windows) - 1)))] * 1000, 3),
                "stale_ms_max": round(windows[-1] * 1000, 3),
            }
        async with http.get(b + "/stats") as r:  # proof that B's reads met its near cache
            out["near_hits_on_b"] = (await r.json())["near_cache"]["hits"]
    return out


async def _run(args: argparse.Namespace, upstream: str, redis_url: str, floor_url: str,
               floor_pid: int) -> dict[str, Any]:
    result: dict[str, Any] = {}
    with _sidecar(upstream, redis_url, *NEAR_OFF) as (plain, plain_pid), \
            _sidecar(upstream, redis_url) as (near, near_pid):
        result["levels"] = await _levels(
            args, {"floor": floor_url, "sidecar": plain, "sidecar+near": near},
            {"floor": floor_pid, "sidecar": plain_pid, "sidecar+near": near_pid})
    if len(args.workers) > 1:
        result["workers"] = await _workers(args, upstream, redis_url)
    if args.trials:
        client = redis_client(redis_url, timeout=1.0)
        writer = ExactCache(BudgetStore(client, KeyLayout.for_url(
            redis_url, EngineOptions().key_prefix)))
        try:
            with _sidecar(upstream, redis_url, "--admin-token", ADMIN_TOKEN) as (a, _), \
                    _sidecar(upstream, redis_url) as (b, _):
                result["coherence"] = await _coherence(args.trials, a, b, writer)
        finally:
            await close_client(client)
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pc-bench-") as tmp, \
            EmbeddedRedis(Path(tmp) / "redis", persistence=False) as store:
        up_port, fl_port = free_port(), free_port()
        upstream = f"http://127.0.0.1:{up_port}"
        floor = f"http://127.0.0.1:{fl_port}"
        with python_process(["-m", "promptcache.testing", "--port", str(up_port),
                             "--answer-words", str(ANSWER_WORDS)], upstream + "/v1/models"), \
                _sidecar(upstream, store.url, *NEAR_OFF):  # stores the hot set
            client = redis.Redis.from_url(store.url)
            key = next(iter(client.scan_iter(KeyLayout().patterns()[0])))
            payload_bytes = len(client.get(key) or b"")
            client.close()
            with python_process(["-m", "promptcache.benchmarks.floor", "--port", str(fl_port),
                                 "--redis-url", store.url, "--key", key.decode()],
                                floor + "/") as fl_proc:
                started = time.time()
                figures = asyncio.run(_run(args, upstream, store.url, floor, fl_proc.pid))
    return {
        "benchmark": "exact",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started)),
        "redis": "embedded redis-server 6.2 on a unix socket (every server)",
        "hot_set": HOT_SET,
        "stored_entry_bytes": payload_bytes,
        "requests_per_measurement": args.requests,
        "rounds": args.rounds,
        **figures,
    }


def report(result: dict[str, Any]) -> str:
    lines = [
        "| concurrency | server | throughput (req/s) | p50 ms | p95 ms | p99 ms | CPU us/req |",
        "|---|---|---|---|---|---|---|",
    ]
    for c, lv in result["levels"].items():
        for name, m in lv["median"].items():
            lines.append(f"| {c} | {name} | {m['throughput_rps']:.0f} | {m['p50_ms']:.3f} | "
                         f"{m['p95_ms']:.3f} | {m['p99_ms']:.3f} | "
                         f"{m['server_cpu_us_per_request']:.0f} |")
    lines.append("")
    for c, lv in result["levels"].items():
        for name, r in lv["vs_floor"].items():
            lines.append(f"concurrency {c}: {name}/floor throughput = {r['throughput_ratio']}, "
                         f"p50 {name} - floor = {r['p50_delta_ms']} ms, "
                         f"server CPU per request {name}/floor = {r['cpu_ratio']}")
    if "workers" in result:
        w = result["workers"]
        lines += ["", f"Workers (concurrency {w['concurrency']}, {w['cores']} cores):", "",
                  "| server | workers | throughput (req/s) | vs fewest | p99 ms | "
                  "CPU us/req | load generator CPU (of a core) |", "|---|---|---|---|---|---|---|"]
        for name in ("sidecar", "sidecar+near"):
            for n, m in w[name].items():
                lines.append(f"| {name} | {n} | {m['throughput_rps']:.0f} | "
                             f"{m['throughput_vs_fewest']} | {m['p99_ms']:.3f} | "
                             f"{m['server_cpu_us_per_request']:.0f} | "
                             f"{m['loadgen_cpu_share']:.2f} |")
    if "coherence" in result:
        lines += ["", "Coherence (a change through another node, read from a near cache):", "",
                  "| change | trials | reads | trials with a stale read | stale ms p50 | "
                  "p99 | max |", "|---|---|---|---|---|---|---|"]
        for kind in ("delete", "overwrite"):
            c = result["coherence"][kind]
            lines.append(f"| {kind} | {c['trials']} | {c['reads']} | "
                         f"{c['trials_with_a_stale_read']} | {c['stale_ms_p50']} | "
                         f"{c['stale_ms_p99']} | {c['stale_ms_max']} |")
        lines.append(f"\nNode B answered {result['coherence']['near_hits_on_b']} reads from "
                     "its near cache.")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    result = run(args)
    result["command"] = command(args)
    publish(result, args.out, "exact", report(result))
    return 0
