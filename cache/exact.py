"""The exact-match cache: keys in, entries out, failures contained.

:class:`ExactCache` does the shared work once (encoding, TTL, size limit, timeouts, circuit
breaker) and calls an :class:`~promptcache.cache.protocols.EntryStore` (on Redis, the
:class:`~promptcache.cache.redis.budget.BudgetStore`, whose scripts keep the byte accounting,
the LRU and the change stream that other nodes follow; without a byte budget it is the same
store with an unbounded budget). Every backend failure, timeout or open circuit surfaces as
:class:`~promptcache.cache.errors.CacheUnavailable`, which callers turn into pass-through:
the cache never takes traffic down. Running out of this process's own Redis connections (a
burst that waited in vain for a free one) is no verdict on Redis: that request passes the
cache by, but the circuit breaker does not count it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.exceptions import MaxConnectionsError, RedisError

from promptcache.cache.breaker import CircuitBreaker
from promptcache.cache.entry import Entry
from promptcache.cache.errors import CacheUnavailable, EntryFormatError
from promptcache.cache.keys import CacheKey
from promptcache.cache.protocols import EntryStore
from promptcache.cache.redis.client import op_deadline

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """How entries are kept: default TTL, the largest entry, the time a backend call may take."""

    default_ttl: float | None = 86400.0  # seconds; None = no expiry
    max_entry_bytes: int = 1 << 20
    op_timeout: float = 0.25  # seconds per backend call


class ExactCache:
    """Entries by exact key in an :class:`EntryStore`, behind timeouts and a circuit breaker."""

    def __init__(
        self,
        store: EntryStore,
        policy: CachePolicy | None = None,
        *,
        breaker: CircuitBreaker | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.policy = policy or CachePolicy()
        self.counts: Counter[str] = Counter()
        self.breaker = breaker or CircuitBreaker()
        self._clock = clock

    async def _call(self, op: Callable[[], Awaitable[T]], *, scan: bool = False) -> T:
        """Run one backend call through the breaker, within ``op_timeout`` (a ``scan`` may
        take longer than one lookup: it has no timeout of its own)."""
        if not self.breaker.allow():
            raise CacheUnavailable("cache circuit is open")
        try:
            async with asyncio.timeout(None if scan else self.policy.op_timeout) as deadline:
                with op_deadline(deadline):  # a wait for a free connection is not counted
                    result = await op()
        except MaxConnectionsError as exc:
            # Every connection of ours stayed busy: a burst of this process's own, which
            # says nothing about Redis. This request passes the cache by; the breaker holds.
            self.breaker.release()
            raise CacheUnavailable(f"no free cache connection: {exc}") from exc
        except (RedisError, OSError, TimeoutError) as exc:
            self.breaker.record_failure()
            raise CacheUnavailable(f"cache backend failed: {exc!r}") from exc
        except BaseException:
            self.breaker.release()  # cancelled: no verdict on the backend
            raise
        self.breaker.record_success()
        return result

    async def lookup(self, key: CacheKey, *, inflate: bool = True) -> Entry | None:
        """The entry under ``key``; ``inflate=False`` leaves a deflated body deflated.

        An entry this process holds (the near cache, kept coherent by Redis) is served
        without a backend call, so past the breaker and the timeout too."""
        raw = self.store.held(key.namespace, key.digest)
        if raw is None:
            raw = await self._call(lambda: self.store.get(key.namespace, key.digest,
                                                          held_checked=True))
        if raw is None:
            return None
        try:
            return Entry.decode(raw, inflate=inflate)
        except EntryFormatError:
            log.warning("unreadable entry %s treated as a miss", key.digest)
            return None

    async def touch(self, namespace: str, digest: str) -> None:
        """Refresh an entry's recency (a semantic hit served it); failures are ignored."""
        with contextlib.suppress(CacheUnavailable):
            await self._call(lambda: self.store.touch(namespace, digest))

    def entry_for(self, status: int, body: bytes, content_type: str, api: str) -> Entry:
        return Entry(status, body, content_type, self._clock(), api)

    def ttl_ms(self, ttl: float | None) -> int | None:
        """Milliseconds to keep an entry: ``ttl`` seconds, or the default; None = forever."""
        ttl = self.policy.default_ttl if ttl is None else ttl
        return max(1, math.ceil(ttl * 1000)) if ttl else None

    async def put(self, key: CacheKey, entry: Entry, *, ttl: float | None = None,
                  vector: bytes | None = None) -> int:
        """Store ``entry`` (and its vector record, with the same TTL, atomically); return
        the bytes counted for it, or 0 if it is over the size limit or the budget."""
        data = entry.encode()
        if len(data) > self.policy.max_entry_bytes:
            return 0
        ttl_ms = self.ttl_ms(ttl)
        result = await self._call(
            lambda: self.store.put(key.namespace, key.digest, data, vector, ttl_ms))
        self.counts["evicted"] += len(result.evicted)
        if not result.stored:
            self.counts["over_budget"] += 1
        return result.size if result.stored else 0

    async def attach_vector(self, namespace: str, digest: str, vector: bytes) -> bool:
        """Give a stored entry its vector record (computed after the entry was written),
        if the entry still exists and the record fits; whether it was attached."""
        result = await self._call(lambda: self.store.attach_vector(namespace, digest, vector))
        self.counts["evicted"] += len(result.evicted)
        return result.stored

    async def get_with_vectors(self, refs: Sequence[tuple[str, str]]
                               ) -> list[tuple[bytes | None, bytes | None]]:
        """(entry, vector record) of each (namespace, digest); None where gone."""
        return await self._call(lambda: self.store.get_with_vectors(refs))

    def age(self, entry: Entry) -> int:
        return max(0, int(self._clock() - entry.created))

    async def invalidate_key(self, namespace: str, digest: str) -> int:
        """Delete one entry (and its vector record); return the entries deleted (0 or 1)."""
        return await self._call(lambda: self.store.delete(namespace, digest))

    async def invalidate_namespace(self, namespace: str) -> int:
        return await self._call(lambda: self.store.delete_matching(namespace), scan=True)

    async def invalidate_tenant(self, tenant_tag: str, namespace: str | None = None) -> int:
        """Delete one tenant's entries (in one namespace, or all): its digests end with
        ``tenant_tag`` (:func:`~promptcache.cache.keys.tenant_tag`)."""
        return await self._call(lambda: self.store.delete_matching(namespace, tenant_tag),
                                scan=True)

    async def invalidate_all(self) -> int:
        return await self._call(lambda: self.store.delete_matching(None), scan=True)

    async def ping(self) -> bool:
        try:
            await self._call(self.store.ping)
        except CacheUnavailable:
            return False
        return True

    async def info(self) -> dict[str, Any]:
        info = await self._call(self.store.info)
        usage = await self._call(self.store.usage)
        info.update(entries=usage.entries, bytes=usage.bytes, max_bytes=usage.max_bytes,
                    shards=usage.shards, evicted=self.counts["evicted"],
                    over_budget=self.counts["over_budget"])
        return info
