"""Cross-node single flight: one upstream call for identical misses on different sidecars.

Within one process :mod:`.singleflight` already coalesces; across processes the local
leader takes a short lease in Redis (``SET {tag}l:{member} TOKEN NX PX lease``). The node
that gets it calls upstream and stores the answer; the others poll for the entry to land
and serve it, or call upstream themselves once the lease is gone without an entry (the
leader failed, its answer was not cacheable, or the lease ran out). A Redis failure on
this path degrades to calling upstream: the lease is an optimisation, never a gate.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.exceptions import RedisError

from promptcache.cache.redis.layout import KeyLayout

T = TypeVar("T")

# Delete the lease only if it is still ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Lease:
    """One held lease; ``release()`` is idempotent and never raises."""

    def __init__(self, owner: RemoteFlight, key: str, token: str) -> None:
        self._owner, self.key, self.token = owner, key, token

    async def release(self) -> None:
        await self._owner._release(self)


class RemoteFlight:
    """Leases in Redis that make identical misses on other nodes wait for one call."""

    def __init__(self, client: Any, layout: KeyLayout, *, lease: float = 30.0,
                 timeout: float = 0.25, poll: float = 0.02, max_poll: float = 0.2,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.redis = client
        self.layout = layout
        self.lease_ms = max(1, int(lease * 1000))
        self.timeout = timeout
        self.poll, self.max_poll = poll, max_poll
        self._clock = clock
        self._release_script = client.register_script(_RELEASE)
        self.led = self.waited = self.landed = self.expired = self.failed = 0

    async def acquire(self, namespace: str, digest: str) -> Lease | None:
        """A lease if this node should call upstream; None if another node holds it.
        A Redis failure grants the call (a lease with nothing to release)."""
        key = self.layout.lease(namespace, digest)
        token = secrets.token_hex(8)
        try:
            async with asyncio.timeout(self.timeout):
                won = await self.redis.set(key, token, nx=True, px=self.lease_ms)
        except (RedisError, OSError, TimeoutError):
            self.failed += 1
            return Lease(self, "", "")
        if won:
            self.led += 1
            return Lease(self, key, token)
        return None

    async def _release(self, lease: Lease) -> None:
        if not lease.key:
            return
        key, lease.key = lease.key, ""
        try:
            async with asyncio.timeout(self.timeout):
                await self._release_script(keys=[key], args=[lease.token])
        except (RedisError, OSError, TimeoutError):
            self.failed += 1  # the lease runs out by itself

    async def wait(self, namespace: str, digest: str,
                   lookup: Callable[[], Awaitable[T | None]]) -> T | None:
        """Poll ``lookup`` until it finds the entry, or the lease is gone (None: call
        upstream). Any failure (Redis down, a lookup error) also answers None."""
        self.waited += 1
        key = self.layout.lease(namespace, digest)
        deadline = self._clock() + self.lease_ms / 1000 + 1.0
        delay = self.poll
        try:
            while self._clock() < deadline:
                found = await lookup()
                if found is not None:
                    self.landed += 1
                    return found
                async with asyncio.timeout(self.timeout):
                    held = await self.redis.exists(key)
                if not held:
                    found = await lookup()  # it may have landed just before the release
                    if found is None:
                        self.expired += 1
                    else:
                        self.landed += 1
                    return found
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, self.max_poll)
        except Exception:  # any failure here means: call upstream yourself
            self.failed += 1
            return None
        self.expired += 1
        return None

    def stats(self) -> dict[str, int]:
        return {"led": self.led, "waited": self.waited, "landed": self.landed,
                "expired": self.expired, "failed": self.failed}
