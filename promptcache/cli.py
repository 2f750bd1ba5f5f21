"""The ``promptcache`` command: ``serve`` runs the sidecar, ``fit`` fits the verifier,
``plan`` estimates memory, ``reconcile`` checks the byte accounting, ``export`` and
``import`` carry entries from one deployment to another, ``bench`` runs a benchmark.

Commands load lazily. :data:`COMMANDS` holds each one's help line and the functions that
define and run it, which import what the command needs; :func:`main` loads only the command
its arguments name (for ``bench``, only the benchmark named), and lists the others by their
help line. So ``promptcache --help`` and ``promptcache serve`` import no plotting, progress
bars or training code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

from promptcache import __version__
from promptcache.benchmarks.registry import BENCHMARKS
from promptcache.cache.errors import PromptCacheError


class Command(NamedTuple):
    """A subcommand: its help line, ``define(parser, rest)`` that adds its options (``rest``:
    the arguments after its name, to load only what they name; None: load everything), and
    ``run(args)`` that runs it and returns the exit status."""

    help: str
    define: Callable[[argparse.ArgumentParser, Sequence[str] | None], None]
    run: Callable[[argparse.Namespace], int]


def parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``promptcache`` parser for the command line ``argv``: the command it names is
    loaded, the others have their name and help line only (enough for ``--help`` and for
    argparse's errors). Without ``argv``, every command and every benchmark is loaded, for
    whoever walks all the options."""
    p = argparse.ArgumentParser(
        prog="promptcache",
        description="A prompt/response cache for LLM traffic.",
    )
    p.add_argument("--version", action="version", version=f"promptcache {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    named, rest = _named(argv)
    for name, command in COMMANDS.items():
        command_parser = sub.add_parser(name, help=command.help)
        if argv is None or name == named:
            command.define(command_parser, None if argv is None else rest)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser(argv).parse_args(argv)
    if args.command == "bench":
        args.argv = argv  # the command line, which a benchmark writes beside its results
    try:
        return COMMANDS[args.command].run(args)
    except PromptCacheError as exc:
        print(f"promptcache: error: {exc}", file=sys.stderr)
        return 2


def _named(argv: Sequence[str] | None) -> tuple[str | None, list[str]]:
    """The first positional argument of ``argv`` (the options before a command's or a
    benchmark's name take no value) and the arguments after it."""
    args = list(argv or ())
    for i, arg in enumerate(args):
        if not arg.startswith("-"):
            return arg, args[i + 1:]
    return None, []


def _load(p: argparse.ArgumentParser, module: str) -> None:
    """Define ``p`` from a module with ``add_arguments(parser)``; its docstring describes it."""
    mod = importlib.import_module(module)
    p.description = mod.__doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    mod.add_arguments(p)


def _module_command(module: str, help_line: str) -> Command:
    """A command defined and run by a module of the harness (``add_arguments``, ``main``)."""
    return Command(help_line, lambda p, _rest: _load(p, module),
                   lambda args: int(importlib.import_module(module).main(args)))


def _serve_arguments(p: argparse.ArgumentParser, _rest: Sequence[str] | None) -> None:
    from promptcache.server.config import add_arguments

    p.description = (
        "Run the caching sidecar: an OpenAI/Anthropic-compatible proxy that "
        "answers repeated requests from Redis. Without --redis-url it starts and owns a "
        "private redis-server with its data in --data-dir. Every option can also be set "
        "as the environment variable shown, or in the --config TOML file; flags win over "
        "the environment, which wins over the file."
    )
    add_arguments(p)


def _serve(args: argparse.Namespace) -> int:
    from promptcache.server.config import build_settings

    settings = build_settings(vars(args) | {"command": None}, os.environ)
    if settings.workers > 1:  # the supervisor never loads the app, its engine or FAISS
        from promptcache.server.workers import supervise

        return supervise(settings)
    from promptcache.server.app import serve

    return serve(settings)


def _reconcile_arguments(p: argparse.ArgumentParser, _rest: Sequence[str] | None) -> None:
    p.description = (
        "Recompute the cache's byte accounting (sizes, totals, LRU and expiry "
        "bookkeeping) from the keys Redis holds, fix any difference, and print a JSON report. "
        "Exit status 0 if the accounting was exact, 1 if it had drifted (and is now fixed).")
    p.add_argument("--redis-url", metavar="URL", help="the cache's Redis (redis+cluster:// "
                   "for a cluster); default: the embedded Redis of --data-dir")
    p.add_argument("--data-dir", metavar="DIR", help="the embedded Redis's data directory")
    p.add_argument("--key-prefix", metavar="PREFIX", default="pc:",
                   help="prefix of the cache's keys; default: pc:")


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


def _transfer_arguments(p: argparse.ArgumentParser, importing: bool) -> None:
    from promptcache.benchmarks.progress import add_quiet

    verb = "import" if importing else "export"
    p.description = (
        "Load entries written by `promptcache export` into a deployment, within its byte "
        "budget (the least recently used entries are evicted to make room, as for any "
        "write); lines that are malformed, expired, or whose digest does not carry the "
        "tenant tag recorded beside it are counted and skipped. Prints a JSON report."
        if importing else
        "Write every entry of a deployment (request key, answer, TTL left, tenant tag, "
        "namespace, vector record) as JSON lines, for `promptcache import` to warm "
        "another deployment with. Prints a JSON report on stderr.")
    p.add_argument("--redis-url", metavar="URL", required=True,
                   help=f"the Redis to {verb} {'into' if importing else 'from'} "
                   "(redis+cluster:// for a cluster)")
    p.add_argument("--key-prefix", metavar="PREFIX", default="pc:",
                   help="prefix of the cache's keys; default: pc:")
    if importing:
        p.add_argument("--max-bytes", metavar="SIZE", default="0",
                       help="the target's byte budget (its --max-bytes); default: 0, "
                       "unbounded")
        p.add_argument("input", metavar="FILE", help="the export to load, or - for stdin")
    else:
        p.add_argument("output", metavar="FILE", help="where to write, or - for stdout")
    add_quiet(p)


def _transfer(args: argparse.Namespace) -> int:
    import asyncio
    import contextlib
    import io
    import json
    from typing import IO

    from redis.exceptions import RedisError

    from promptcache.benchmarks.progress import progress
    from promptcache.cache.redis.client import close_client, redis_client
    from promptcache.cache.redis.layout import KeyLayout
    from promptcache.cache.redis.transfer import export_entries, import_entries
    from promptcache.server.config import parse_size

    importing = args.command == "import"
    path = args.input if importing else args.output
    layout = KeyLayout.for_url(args.redis_url, args.key_prefix)
    try:
        max_bytes = parse_size(args.max_bytes) if importing else 0
    except ValueError as exc:
        print(f"promptcache: error: --max-bytes: {exc}", file=sys.stderr)
        return 2

    async def run(f: IO[str]) -> dict[str, int]:
        client = redis_client(args.redis_url, timeout=10.0, max_connections=8)
        bar = progress(None, args.command, quiet=args.quiet, unit="entry")
        try:
            if importing:
                report = await import_entries(client, layout, f, max_bytes=max_bytes,
                                              progress=bar.update)
            else:  # a CLI of its own: nothing else runs on this loop while it writes
                report = await export_entries(client, layout, f.write, progress=bar.update)
            return report.as_dict()
        finally:
            bar.close()
            await close_client(client)

    std = sys.stdin if importing else sys.stdout
    if importing and path == "-" and isinstance(sys.stdin, io.TextIOWrapper):
        sys.stdin.reconfigure(errors="replace")  # a bad byte makes a malformed line, no crash
    try:
        with (contextlib.nullcontext(std) if path == "-"
              else open(path, "r" if importing else "w", encoding="utf-8",
                        errors="replace" if importing else None)) as f:
            report = asyncio.run(run(f))
    except (RedisError, OSError) as exc:
        print(f"promptcache: error: cannot {args.command} ({path}): {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report), file=sys.stderr if path == "-" and not importing else sys.stdout)
    return 0


def _bench_arguments(p: argparse.ArgumentParser, rest: Sequence[str] | None) -> None:
    p.description = "Run a benchmark; each writes JSON to --out."
    kinds = p.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    named, _ = _named(rest)
    for name, (module, help_line) in BENCHMARKS.items():
        benchmark_parser = kinds.add_parser(name, help=help_line)
        if rest is None or name == named:
            _load(benchmark_parser, module)


def _bench(args: argparse.Namespace) -> int:
    return int(importlib.import_module(BENCHMARKS[args.bench][0]).main(args))


#: ``promptcache NAME``: what ``promptcache --help`` lists, in this order.
COMMANDS: dict[str, Command] = {
    "serve": Command("run the caching sidecar in front of a model API",
                     _serve_arguments, _serve),
    "fit": _module_command("promptcache.benchmarks.fit",
                           "fit the verifier's model on labelled pairs (your own traffic too)"),
    "plan": _module_command("promptcache.benchmarks.plan",
                            "estimate the memory each tier needs (Redis, index, model, per node)"),
    "reconcile": Command("recompute the byte accounting from the live keys; report drift",
                         _reconcile_arguments, _reconcile),
    "export": Command("write a deployment's entries as JSON lines (for a warm start)",
                      lambda p, _rest: _transfer_arguments(p, importing=False), _transfer),
    "import": Command("load exported entries into a deployment, within its budget",
                      lambda p, _rest: _transfer_arguments(p, importing=True), _transfer),
    "bench": Command("benchmarks (see benchmarks/)", _bench_arguments, _bench),
}
