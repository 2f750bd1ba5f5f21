"""A circuit breaker, so a dead or slow cache costs one timeout, not one per request.

closed --(``failure_threshold`` consecutive failures)--> open
open --(``reset_timeout`` elapsed)--> half-open: one probe is let through
half-open --probe succeeds--> closed;  --probe fails--> open, with the wait doubled
(capped at ``max_reset_timeout``).

Only the backend's answers count: a call that ends without reaching it (cancelled, or no
free connection in this process's pool) is released (:meth:`CircuitBreaker.release`), not
counted as a failure.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

State = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Closed, open or half-open: whether a call may go to the backend now."""

    def __init__(
        self,
        *,
        failure_threshold: int = 3,
        reset_timeout: float = 1.0,
        max_reset_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.base_reset_timeout = reset_timeout
        self.max_reset_timeout = max_reset_timeout
        self._clock = clock
        self._state: State = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._reset_timeout = reset_timeout
        self._probe_in_flight = False
        self.trips = 0

    @property
    def state(self) -> State:
        if self._state == "open" and self._clock() - self._opened_at >= self._reset_timeout:
            return "half_open"
        return self._state

    def allow(self) -> bool:
        """May a call go to the backend now? In half-open state, one caller at a time."""
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._probe_in_flight:
            self._state = "half_open"
            self._probe_in_flight = True
            return True
        return False

    def record_success(self) -> None:
        self._state = "closed"
        self._failures = 0
        self._probe_in_flight = False
        self._reset_timeout = self.base_reset_timeout

    def release(self) -> None:
        """A call ended without a verdict on the backend (it was cancelled, or never got a
        connection to send on): neither a success nor a failure; let another probe through."""
        self._probe_in_flight = False

    def record_failure(self) -> None:
        if self._state == "half_open":
            self._reset_timeout = min(self._reset_timeout * 2, self.max_reset_timeout)
            self._open()
            return
        self._failures += 1
        if self._failures >= self.failure_threshold and self._state == "closed":
            self._open()

    def _open(self) -> None:
        self._state = "open"
        self._opened_at = self._clock()
        self._probe_in_flight = False
        self._failures = 0
        self.trips += 1
