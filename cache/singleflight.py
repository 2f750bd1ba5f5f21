"""Single flight: concurrent identical misses make one upstream call.

The first caller for a key becomes the leader and does the work; callers that arrive
while it runs wait for its result instead of repeating the call. A leader that cannot
share (its call failed, or the answer is too large to hold or not one to share) publishes
``None`` and the followers fall back to doing the work themselves; so does a follower whose
wait runs past its deadline (the leader's call hangs).
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Flight(Generic[V]):
    """One call in the air: its followers wait for the leader's result."""

    def __init__(self) -> None:
        self._future: asyncio.Future[V | None] = asyncio.get_running_loop().create_future()
        self.followers = 0

    async def wait(self) -> V | None:
        """The leader's result, or None if it had nothing to share. Cancelling the wait
        (a follower's deadline) leaves the flight alone."""
        try:
            return await asyncio.shield(self._future)
        finally:
            self.followers -= 1


class SingleFlight(Generic[K, V]):
    """The flights in the air in this process, by key."""

    def __init__(self) -> None:
        self._flights: dict[K, Flight[V]] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def __iter__(self) -> Iterator[K]:
        """The keys of the flights in the air."""
        return iter(list(self._flights))

    def followers(self, key: K) -> int:
        """How many callers joined the flight for ``key`` and still wait on it (0 if none
        is in the air)."""
        flight = self._flights.get(key)
        return flight.followers if flight is not None else 0

    def join(self, key: K) -> tuple[Flight[V], bool]:
        """Return the flight for ``key`` and whether the caller is its leader."""
        flight = self._flights.get(key)
        if flight is not None:
            flight.followers += 1
            return flight, False
        flight = Flight()
        self._flights[key] = flight
        return flight, True

    def land(self, key: K, flight: Flight[V], result: V | None) -> None:
        """Publish the leader's result (idempotent) and let new callers start afresh."""
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not flight._future.done():
            flight._future.set_result(result)
