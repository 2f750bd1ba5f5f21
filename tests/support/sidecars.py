"""Run a real sidecar in the test's event loop, on a free loopback port."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

from promptcache.cache.protocols import Embedder
from promptcache.server.app import create_app
from promptcache.server.config import Settings
from promptcache.server.state import SIDECAR, Sidecar


@dataclass
class RunningSidecar:
    url: str
    app: web.Application
    runner: web.AppRunner

    @property
    def state(self) -> Sidecar:
        return self.app[SIDECAR]

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_sidecar(upstream: str, redis_url: str, *, embedder: Embedder | None = None,
                        **overrides: Any) -> RunningSidecar:
    """A sidecar on a free port; the semantic tier is on only when given an embedder
    (tests share one loaded model instead of loading it per sidecar)."""
    overrides.setdefault("semantic", embedder is not None)
    # Tests run several sidecars, their clients and pollers on one event loop of a 2-core CI
    # machine, where a loop stall of a quarter second (the production default) is routine and
    # would turn a MISS into a fail-open BYPASS. Tests of fail-open set their own short timeout.
    overrides.setdefault("redis_timeout", 2.0)
    # Likewise one embedding can take a second there: tests of deadlines set their own.
    overrides.setdefault("embed_timeout", 30.0)
    # And a lookup must not be shed because the shared machine made the last batch slow:
    # tests of shedding set their own budget.
    overrides.setdefault("semantic_wait_budget", 5.0)
    # Tests that restart a sidecar expect its index loaded when it starts serving.
    overrides.setdefault("index_warmup_wait", 60.0)
    settings = replace(Settings(upstream=upstream), port=0, redis_url=redis_url, **overrides)
    app = create_app(settings, embedder=embedder)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return RunningSidecar(f"http://127.0.0.1:{port}", app, runner)


async def eventually(predicate: Callable[[], bool | Awaitable[bool]], within: float = 10.0,
                     step: float = 0.02) -> None:
    """Poll ``predicate`` until it holds; fail the test if it does not within ``within`` s."""
    deadline = time.monotonic() + within
    for _ in itertools.count():
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached within {within} s")
        await asyncio.sleep(step)
