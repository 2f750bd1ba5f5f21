"""A clock for tests of TTLs, recency and the breaker: it moves only when a test says so."""

from __future__ import annotations


class FakeClock:
    """A clock that only moves when a test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
