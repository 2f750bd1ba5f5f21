"""The ``promptcache`` command: ``serve`` runs the sidecar, ``fit`` fits the verifier,
``plan`` estimates memory, ``reconcile`` checks the byte accounting, ``bench`` runs a
benchmark."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from promptcache import __version__
from promptcache.cache.errors import PromptCacheError
from promptcache.server.config import add_arguments, build_settings

#: ``promptcache bench NAME``: the module (with add_arguments and main) and its help line.
BENCHMARKS = {
    "exact": ("promptcache.benchmarks.exact",
              "exact hits through the sidecar beside a one-GET aiohttp floor"),
    "semantic": ("promptcache.benchmarks.semantic_speed",
                 "semantic lookup throughput and latency against the model; index search"),
    "budget": ("promptcache.benchmarks.budget",
               "byte budget under a write flood (overshoot, evictions/s); bytes per entry"),
    "hitrate": ("promptcache.benchmarks.hitrate",
                "hit rate against false hits on labelled pairs: the semantic tier's tuner"),
    "load": ("promptcache.benchmarks.load",
             "replay real prompts against a sidecar, closed or open loop; latency by X-Cache"),
    "memory": ("promptcache.benchmarks.memory",
               "bytes per entry by tier and per vector by index kind, against the raw size"),
    "report": ("promptcache.benchmarks.report",
               "gather the latest results into docs/benchmarks.md with tables and plots"),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="promptcache",
        description="A prompt/response cache for LLM traffic.",
    )
    p.add_argument("--version", action="version", version=f"promptcache {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="run the caching sidecar in front of a model API",
        description="Run the caching sidecar: an OpenAI/Anthropic-compatible proxy that "
        "answers repeated requests from Redis. Without --redis-url it starts and owns a "
        "private redis-server with its data in --data-dir. Every option can also be set "
        "as the environment variable shown, or in the --config TOML file; flags win over "
        "the environment, which wins over the file.",
    )
    add_arguments(serve)
    from promptcache.benchmarks import fit

    fit.add_arguments(sub.add_parser(
        "fit", help="fit the verifier's model on labelled pairs (your own traffic too)",
        description=fit.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    from promptcache.benchmarks import plan

    plan.add_arguments(sub.add_parser(
        "plan", help="estimate the memory each tier needs (Redis, index, model, per node)",
        description=plan.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    rec = sub.add_parser(
        "reconcile", help="recompute the byte accounting from the live keys; report drift",
        description="Recompute the cache's byte accounting (sizes, totals, LRU and expiry "
        "bookkeeping) from the keys Redis holds, fix any difference, and print a JSON report. "
        "Exit status 0 if the accounting was exact, 1 if it had drifted (and is now fixed).")
    rec.add_argument("--redis-url", metavar="URL", help="the cache's Redis (redis+cluster:// "
                     "for a cluster); default: the embedded Redis of --data-dir")
    rec.add_argument("--data-dir", metavar="DIR", help="the embedded Redis's data directory")
    rec.add_argument("--key-prefix", metavar="PREFIX", default="pc:",
                     help="prefix of the cache's keys; default: pc:")
    bench = sub.add_parser("bench", help="benchmarks (see benchmarks/)",
                           description="Run a benchmark; each writes JSON to --out.")
    kinds = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    for name, (module, help_text) in BENCHMARKS.items():
        mod = importlib.import_module(module)
        mod.add_arguments(kinds.add_parser(
            name, help=help_text, description=mod.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "serve":
            from promptcache.server.app import serve

            return serve(build_settings(vars(args) | {"command": None}, os.environ))
        if args.command == "fit":
            from promptcache.benchmarks import fit

            return fit.main(args)
        if args.command == "reconcile":
            return _reconcile(args)
        if args.command == "plan":
            from promptcache.benchmarks import plan

            return plan.main(args)
        if args.command == "bench":
            args.argv = list(sys.argv[1:] if argv is None else argv)
            return int(importlib.import_module(BENCHMARKS[args.bench][0]).main(args))
    except PromptCacheError as exc:
        print(f"promptcache: error: {exc}", file=sys.stderr)
        return 2
    return 2


def _reconcile(args: argparse.Namespace) -> int:
    import asyncio
    import json
    from urllib.parse import quote

    from redis.exceptions import RedisError

    from promptcache.cache.redis.embedded import SOCKET_NAME
    from promptcache.cache.redis.reconcile import reconcile_url
    from promptcache.server.config import Settings

    url = args.redis_url
    if url is None:
        data_dir = Settings(upstream="http://unused", data_dir=args.data_dir).resolved_data_dir
        url = "unix://" + quote(str(data_dir / SOCKET_NAME))
    try:
        report = asyncio.run(reconcile_url(url, key_prefix=args.key_prefix))
    except (RedisError, OSError) as exc:
        print(f"promptcache: error: cannot reconcile the cache at {url}: {exc}",
              file=sys.stderr)
        return 2
    print(json.dumps(report.as_dict(), indent=2))
    return 0 if report.clean else 1
