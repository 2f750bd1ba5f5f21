"""The exact-match cache engine: keys in, entries out, failures contained.

:class:`ExactCache` does the shared work once (Redis keys, encoding, TTL, size limit,
timeouts, circuit breaker) and calls a small :class:`~promptcache.cache.redis.client.EntryStore`.
Given a :class:`~promptcache.cache.redis.budget.Budget` (as the sidecar always does), writes,
hits and deletes go through the budget's scripts instead, which keep the byte accounting,
the LRU and the change stream that other nodes follow.
Every backend failure, timeout or open circuit surfaces as
:class:`~promptcache.cache.errors.CacheUnavailable`, which callers turn into
pass-through: the cache never takes traffic down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.exceptions import RedisError

from promptcache.cache.breaker import CircuitBreaker
from promptcache.cache.entry import Entry, EntryFormatError
from promptcache.cache.errors import CacheUnavailable
from promptcache.cache.keys import CacheKey, KeyLayout
from promptcache.cache.redis.budget import Budget
from promptcache.cache.redis.client import EntryStore

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class CachePolicy:
    default_ttl: float | None = 86400.0  # seconds; None = no expiry
    max_entry_bytes: int = 1 << 20
    op_timeout: float = 0.25  # seconds per backend call
    key_prefix: str = "pc:"
    shards: int = 1  # budget/LRU shards (hash tags): 1 on a single Redis

    @property
    def layout(self) -> KeyLayout:
        return KeyLayout(self.key_prefix, self.shards)


class ExactCache:
    def __init__(
        self,
        store: EntryStore,
        policy: CachePolicy | None = None,
        *,
        breaker: CircuitBreaker | None = None,
        clock: Callable[[], float] = time.time,
        budget: Budget | None = None,
    ) -> None:
        self.store = store
        self.policy = policy or CachePolicy()
        self.layout = self.policy.layout
        self.budget = budget
        self.counts: Counter[str] = Counter()
        self.breaker = breaker or CircuitBreaker()
        self._clock = clock

    async def _call(self, op: Callable[[], Awaitable[T]]) -> T:
        if not self.breaker.allow():
            raise CacheUnavailable("cache circuit is open")
        try:
            async with asyncio.timeout(self.policy.op_timeout):
                result = await op()
        except (RedisError, OSError, TimeoutError) as exc:
            self.breaker.record_failure()
            raise CacheUnavailable(f"cache backend failed: {exc!r}") from exc
        except BaseException:
            self.breaker.release()  # cancelled: no verdict on the backend
            raise
        self.breaker.record_success()
        return result

    async def lookup(self, key: CacheKey) -> Entry | None:
        if self.budget is not None:
            budget = self.budget
            raw = await self._call(lambda: budget.get(key.namespace, key.digest))
        else:
            raw = await self._call(
                lambda: self.store.get(self.layout.entry(key.namespace, key.digest)))
        if raw is None:
            return None
        try:
            return Entry.decode(raw)
        except EntryFormatError:
            log.warning("unreadable entry %s treated as a miss", key.digest)
            return None

    async def touch(self, namespace: str, digest: str) -> None:
        """Refresh an entry's recency (a semantic hit served it); failures are ignored."""
        if self.budget is not None:
            budget = self.budget
            with contextlib.suppress(CacheUnavailable):
                await self._call(lambda: budget.touch(namespace, digest))

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
        if self.budget is not None:
            budget = self.budget
            result = await self._call(
                lambda: budget.put(key.namespace, key.digest, data, vector, ttl_ms))
            self.counts["evicted"] += len(result.evicted)
            if not result.stored:
                self.counts["over_budget"] += 1
            return result.size if result.stored else 0
        items = [(self.layout.entry(key.namespace, key.digest), data)]
        if vector is not None:
            items.append((self.layout.vector(key.namespace, key.digest), vector))
        if len(items) == 1:
            await self._call(lambda: self.store.set(items[0][0], data, ttl_ms))
        else:
            await self._call(lambda: self.store.set_many(items, ttl_ms))
        return len(data) + (len(vector) if vector is not None else 0)

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        return await self._call(lambda: self.store.get_many(keys))

    def age(self, entry: Entry) -> int:
        return max(0, int(self._clock() - entry.created))

    async def invalidate_key(self, namespace: str, digest: str) -> int:
        """Delete one entry (and its vector record); return the entries deleted (0 or 1)."""
        layout = self.layout
        if self.budget is not None:
            budget = self.budget
            member = (layout.shard(digest), layout.member(namespace, digest))
            return await self._call(lambda: budget.delete([member]))
        entry = layout.entry(namespace, digest)
        existed = await self._call(lambda: self.store.get_many([entry]))
        await self._call(lambda: self.store.delete(entry, layout.vector(namespace, digest)))
        return int(existed[0] is not None)

    async def invalidate_namespace(self, namespace: str) -> int:
        return await self._invalidate(*self.layout.patterns(namespace))

    async def invalidate_all(self) -> int:
        return await self._invalidate(*self.layout.patterns())

    async def _invalidate(self, entries: str, vectors: str) -> int:
        """Delete what the patterns match (SCAN visits every master of a cluster). With a
        budget, every entry or vector key found goes through its script, so the accounting
        stays exact even for keys written without it."""
        if self.budget is None:
            deleted = await self._scan_op(lambda: self.store.delete_matching(entries))
            await self._scan_op(lambda: self.store.delete_matching(vectors))
            return deleted
        budget, layout = self.budget, self.layout

        async def scripted() -> int:
            found = {layout.split(k.decode() if isinstance(k, bytes) else k)
                     for pattern in (entries, vectors) async for k in self.store.scan(pattern)}
            return await budget.delete(sorted(found))

        return await self._scan_op(scripted)

    async def _scan_op(self, op: Callable[[], Awaitable[int]]) -> int:
        # A scan may take longer than one lookup: no per-op timeout here.
        if not self.breaker.allow():
            raise CacheUnavailable("cache circuit is open")
        try:
            deleted = await op()
        except (RedisError, OSError) as exc:
            self.breaker.record_failure()
            raise CacheUnavailable(f"cache backend failed: {exc!r}") from exc
        except BaseException:
            self.breaker.release()
            raise
        self.breaker.record_success()
        return deleted

    async def ping(self) -> bool:
        try:
            await self._call(self.store.ping)
        except CacheUnavailable:
            return False
        return True

    async def info(self) -> dict[str, Any]:
        info = await self._call(self.store.info)
        if self.budget is not None:
            usage = await self._call(self.budget.usage)
            info.update(entries=usage.entries, bytes=usage.bytes, max_bytes=usage.max_bytes,
                        shards=usage.shards, evicted=self.counts["evicted"],
                        over_budget=self.counts["over_budget"])
        return info
