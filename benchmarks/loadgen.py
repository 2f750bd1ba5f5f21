"""A small closed-loop HTTP load generator: N workers, each sending requests back to back.

Kept apart from the servers it measures: benchmarks run the servers in their own
processes, so the load generator and the server under test do not share an event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class LoadResult:
    """What one load run measured: latencies, statuses, errors and its duration."""

    concurrency: int
    requests: int
    seconds: float
    errors: int
    latencies: list[float] = field(repr=False)
    statuses: dict[str, int] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        data = sorted(self.latencies)
        if not data:
            return float("nan")
        k = min(len(data) - 1, max(0, round(p / 100 * (len(data) - 1))))
        return data[k]

    def summary(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "requests": self.requests,
            "errors": self.errors,
            "seconds": round(self.seconds, 4),
            "throughput_rps": round(self.throughput, 1),
            "p50_ms": round(self.percentile(50) * 1000, 4),
            "p95_ms": round(self.percentile(95) * 1000, 4),
            "p99_ms": round(self.percentile(99) * 1000, 4),
            "mean_ms": round(statistics.fmean(self.latencies) * 1000, 4)
            if self.latencies else None,
            "x_cache": self.statuses,
        }


async def closed_loop(
    url: str,
    body: bytes | Sequence[bytes],
    *,
    concurrency: int,
    requests: int,
    headers: Mapping[str, str] | None = None,
    warmup: int = 50,
    check: Callable[[int, Mapping[str, str]], bool] | None = None,
) -> LoadResult:
    """Send ``requests`` POSTs to ``url`` from ``concurrency`` workers.

    ``body`` is one body for every request, or a sequence taken in turn (cycling).
    """
    bodies = [body] if isinstance(body, bytes) else list(body)
    counter = itertools.count()
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors = 0
    async with aiohttp.ClientSession(connector=connector) as http:

        async def one() -> tuple[float, int, Mapping[str, str]]:
            data = bodies[next(counter) % len(bodies)]
            t0 = time.perf_counter()
            async with http.post(url, data=data, headers=hdrs) as r:
                await r.read()
                return time.perf_counter() - t0, r.status, r.headers

        for _ in range(warmup):
            await one()
        remaining = requests

        async def worker() -> None:
            nonlocal remaining, errors
            while remaining > 0:
                remaining -= 1
                try:
                    dt, status, h = await one()
                except aiohttp.ClientError:
                    errors += 1
                    continue
                if status != 200 or (check is not None and not check(status, h)):
                    errors += 1
                latencies.append(dt)
                tag = h.get("X-Cache", "-")
                statuses[tag] = statuses.get(tag, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return LoadResult(concurrency, len(latencies), elapsed, errors, latencies, statuses)


@dataclass(frozen=True, slots=True)
class Outcome:
    """One replayed request. ``latency`` runs from the scheduled send time (open loop) or
    the actual send time (closed loop) to the last byte; None if it failed."""

    index: int
    latency: float | None
    ttfb: float | None  # to the response headers
    status: int | None
    x_cache: str
    error: str | None


async def replay(url: str, bodies: Sequence[bytes], *, concurrency: int | None = None,
                 rate: float | None = None, headers: Mapping[str, str] | None = None,
                 request_timeout: float = 60.0, on_done: Callable[[Outcome], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter,
                 ) -> tuple[list[Outcome], float]:
    """POST every body to ``url`` once, in order; return the outcomes and the wall time.

    Closed loop (``concurrency``): that many workers, each sending its next request when
    the previous one returned. Open loop (``rate`` per second): request i is sent at
    ``i / rate`` s whether or not earlier ones returned, and its latency counts from
    then, so a server that falls behind shows it in the latencies (no coordinated
    omission). Each request has a total ``request_timeout``; failures are outcomes, not raised.
    """
    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of concurrency (closed loop) or rate (open loop)")
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    limit = concurrency if concurrency is not None else 1000
    connector = aiohttp.TCPConnector(limit=limit)
    outcomes: list[Outcome] = []
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=request_timeout)) as http:

        async def one(i: int, scheduled: float) -> None:
            ttfb = None
            try:
                async with http.post(url, data=bodies[i], headers=hdrs) as r:
                    ttfb = clock() - scheduled
                    await r.read()
                    status, tag = r.status, r.headers.get("X-Cache", "-")
                error = None if status == 200 else f"HTTP {status}"
                outcome = Outcome(i, clock() - scheduled, ttfb, status, tag, error)
            except (aiohttp.ClientError, TimeoutError) as exc:
                outcome = Outcome(i, None, ttfb, None, "ERROR", type(exc).__name__)
            outcomes.append(outcome)
            if on_done is not None:
                on_done(outcome)

        started = clock()
        if concurrency is not None:
            queue = iter(range(len(bodies)))

            async def worker() -> None:
                for i in queue:
                    await one(i, clock())

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        else:
            assert rate is not None
            tasks = []
            for i in range(len(bodies)):
                scheduled = started + i / rate
                delay = scheduled - clock()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i, scheduled)))
            await asyncio.gather(*tasks)
        elapsed = clock() - started
    return sorted(outcomes, key=lambda o: o.index), elapsed
