"""Exact-hit benchmark: the sidecar beside the floor, in one run.

The floor is a minimal aiohttp handler doing one Redis GET of the same stored payload
(:mod:`promptcache.benchmarks.floor`). Both servers run in their own processes on the
same private Redis; one load generator (this process) drives each in turn, interleaved
over several rounds, at each concurrency. Reported per server: throughput, p50/p95/p99,
and server CPU time per request (from /proc, independent of how fast the client is);
then the ratios sidecar/floor, which are what to compare across machines.

    promptcache bench exact [--requests 4000] [--rounds 3] [--concurrency 1 32] [--out DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import redis

from promptcache.benchmarks.loadgen import closed_loop
from promptcache.benchmarks.procs import cpu_seconds, free_port, python_process
from promptcache.benchmarks.results import command, publish
from promptcache.cache.redis.embedded import EmbeddedRedis
from promptcache.cache.redis.layout import KeyLayout

CHAT = "/v1/chat/completions"
BODY = json.dumps({
    "model": "gpt-4o-mini",
    "temperature": 0,
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Explain in two sentences what a write-ahead log is."},
    ],
}).encode()
HEADERS = {"Authorization": "Bearer sk-bench"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--requests", type=int, default=4000,
                   help="requests per measurement (default: 4000)")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds; medians are reported (default: 3)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32],
                   help="concurrency levels (default: 1 32)")
    p.add_argument("--out", default="bench-results",
                   help="directory for exact.json (default: bench-results)")


async def _measure(url: str, pid: int, concurrency: int, requests: int,
                   expect_hit: bool) -> dict[str, Any]:
    def is_hit(_status: int, headers: Any) -> bool:
        return not expect_hit or headers.get("X-Cache") == "HIT"

    cpu0 = cpu_seconds(pid)
    result = await closed_loop(url, BODY, concurrency=concurrency, requests=requests,
                               headers=HEADERS, check=is_hit)
    cpu = cpu_seconds(pid) - cpu0
    summary = result.summary()
    summary["server_cpu_us_per_request"] = round(cpu / max(result.requests, 1) * 1e6, 1)
    return summary


def _median(runs: list[dict[str, Any]], field: str) -> float:
    return float(statistics.median(r[field] for r in runs))


async def _run(args: argparse.Namespace, sidecar: str, floor: str, pids: dict[str, int]
               ) -> dict[str, Any]:
    levels: dict[str, Any] = {}
    for c in args.concurrency:
        runs: dict[str, list[dict[str, Any]]] = {"floor": [], "sidecar": []}
        for _ in range(args.rounds):
            for name, url in (("floor", floor), ("sidecar", sidecar)):
                runs[name].append(await _measure(url + CHAT, pids[name], c, args.requests,
                                                 expect_hit=name == "sidecar"))
        med = {name: {f: _median(rs, f) for f in (
            "throughput_rps", "p50_ms", "p95_ms", "p99_ms", "server_cpu_us_per_request")}
            for name, rs in runs.items()}
        levels[str(c)] = {
            "median": med,
            "runs": runs,
            "throughput_ratio": round(med["sidecar"]["throughput_rps"]
                                      / med["floor"]["throughput_rps"], 3),
            "p50_delta_ms": round(med["sidecar"]["p50_ms"] - med["floor"]["p50_ms"], 4),
            "cpu_ratio": round(med["sidecar"]["server_cpu_us_per_request"]
                               / med["floor"]["server_cpu_us_per_request"], 3),
        }
    return levels


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pc-bench-") as tmp, \
            EmbeddedRedis(Path(tmp) / "redis", persistence=False) as store:
        up_port, sc_port, fl_port = free_port(), free_port(), free_port()
        upstream = f"http://127.0.0.1:{up_port}"
        sidecar = f"http://127.0.0.1:{sc_port}"
        floor = f"http://127.0.0.1:{fl_port}"
        with python_process(["-m", "promptcache.testing", "--port",
                             str(up_port)], upstream + "/v1/models"), \
                python_process(["-m", "promptcache", "serve", "--upstream", upstream,
                                "--redis-url", store.url, "--port", str(sc_port),
                                "--log-level", "warning"], sidecar + "/healthz") as sc_proc:
            fill = urllib.request.Request(sidecar + CHAT, data=BODY, method="POST",
                                          headers={**HEADERS,
                                                   "Content-Type": "application/json"})
            with urllib.request.urlopen(fill) as r:
                assert r.headers["X-Cache"] == "MISS"
            client = redis.Redis.from_url(store.url)
            (key,) = list(client.scan_iter(KeyLayout().patterns()[0]))
            payload_bytes = len(client.get(key) or b"")
            client.close()
            with python_process(["-m", "promptcache.benchmarks.floor", "--port", str(fl_port),
                                 "--redis-url", store.url, "--key", key.decode()],
                                floor + "/") as fl_proc:
                started = time.time()
                levels = asyncio.run(_run(args, sidecar, floor,
                                          {"sidecar": sc_proc.pid, "floor": fl_proc.pid}))
    return {
        "benchmark": "exact",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(started)),
        "redis": "embedded redis-server 6.2 on a unix socket (both servers)",
        "stored_entry_bytes": payload_bytes,
        "requests_per_measurement": args.requests,
        "rounds": args.rounds,
        "levels": levels,
    }


def report(result: dict[str, Any]) -> str:
    lines = [
        "| concurrency | server | throughput (req/s) | p50 ms | p95 ms | p99 ms | CPU us/req |",
        "|---|---|---|---|---|---|---|",
    ]
    for c, lv in result["levels"].items():
        for name in ("floor", "sidecar"):
            m = lv["median"][name]
            lines.append(f"| {c} | {name} | {m['throughput_rps']:.0f} | {m['p50_ms']:.3f} | "
                         f"{m['p95_ms']:.3f} | {m['p99_ms']:.3f} | "
                         f"{m['server_cpu_us_per_request']:.0f} |")
    lines.append("")
    for c, lv in result["levels"].items():
        lines.append(f"concurrency {c}: throughput sidecar/floor = {lv['throughput_ratio']}, "
                     f"p50 sidecar - floor = {lv['p50_delta_ms']} ms, "
                     f"server CPU per request sidecar/floor = {lv['cpu_ratio']}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    result = run(args)
    result["command"] = command(args)
    publish(result, args.out, "exact", report(result))
    return 0
