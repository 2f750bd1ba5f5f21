"""The ``promptcache`` command: ``serve`` runs the sidecar, ``fit`` fits the verifier,
``bench`` runs a benchmark."""

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
    from promptcache.cache import fit

    fit.add_arguments(sub.add_parser(
        "fit", help="fit the verifier's model on labelled pairs (your own traffic too)",
        description=fit.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
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
            from promptcache.cache import fit

            return fit.main(args)
        if args.command == "bench":
            args.argv = list(sys.argv[1:] if argv is None else argv)
            return int(importlib.import_module(BENCHMARKS[args.bench][0]).main(args))
    except PromptCacheError as exc:
        print(f"promptcache: error: {exc}", file=sys.stderr)
        return 2
    return 2
