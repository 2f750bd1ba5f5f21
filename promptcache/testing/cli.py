"""Run the fake as a process: ``python -m promptcache.testing --port 8001`` prints its URL and
serves until killed (``GET /_fake/stats`` then reports its call counts)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from promptcache.testing.server import running_fake_upstream


async def _serve(args: argparse.Namespace) -> None:
    async with running_fake_upstream(
        host=args.host, port=args.port, latency=args.latency, chunk_delay=args.chunk_delay,
        answer_words=args.answer_words,
    ) as fake:
        print(fake.url, flush=True)
        await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` (default: the command line) and serve the fake until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m promptcache.testing",
        description="Serve the fake OpenAI/Anthropic upstream.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--chunk-delay", type=float, default=0.0)
    parser.add_argument("--answer-words", type=int, default=0,
                        help="pad every answer with this many filler words")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(parser.parse_args(argv)))
