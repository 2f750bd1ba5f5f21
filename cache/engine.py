"""The exact-match cache engine: keys in, entries out, failures contained.

:class:`ExactCache` does the shared work once (Redis keys, encoding, TTL, size limit,
timeouts, circuit breaker) and calls a small :class:`~promptcache.cache.store.EntryStore`.
Every backend failure, timeout or open circuit surfaces as
:class:`~promptcache.cache.errors.CacheUnavailable`, which callers turn into
pass-through: the cache never takes traffic down.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.exceptions import RedisError

from promptcache.cache.breaker import CircuitBreaker
from promptcache.cache.entry import Entry, EntryFormatError
from promptcache.cache.errors import CacheUnavailable
from promptcache.cache.keys import CacheKey, entry_key, namespace_patterns, vector_key
from promptcache.cache.store import EntryStore

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class CachePolicy:
    default_ttl: float | None = 86400.0  # seconds; None = no expiry
    max_entry_bytes: int = 1 << 20
    op_timeout: float = 0.25  # seconds per backend call
    key_prefix: str = "pc:"


class ExactCache:
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
        raw = await self._call(lambda: self.store.get(key.redis_key(self.policy.key_prefix)))
        if raw is None:
            return None
        try:
            return Entry.decode(raw)
        except EntryFormatError:
            log.warning("unreadable entry %s treated as a miss", key.digest)
            return None

    def entry_for(self, status: int, body: bytes, content_type: str, api: str) -> Entry:
        return Entry(status, body, content_type, self._clock(), api)

    def ttl_ms(self, ttl: float | None) -> int | None:
        """Milliseconds to keep an entry: ``ttl`` seconds, or the default; None = forever."""
        ttl = self.policy.default_ttl if ttl is None else ttl
        return max(1, math.ceil(ttl * 1000)) if ttl else None

    async def put(self, key: CacheKey, entry: Entry, *, ttl: float | None = None,
                  extra: Sequence[tuple[str, bytes]] = ()) -> int:
        """Store ``entry`` (and ``extra`` keys with the same TTL, in one transaction);
        return the bytes written, or 0 if the entry is over the size limit."""
        data = entry.encode()
        if len(data) > self.policy.max_entry_bytes:
            return 0
        ttl_ms = self.ttl_ms(ttl)
        items = [(key.redis_key(self.policy.key_prefix), data), *extra]
        if len(items) == 1:
            await self._call(lambda: self.store.set(items[0][0], data, ttl_ms))
        else:
            await self._call(lambda: self.store.set_many(items, ttl_ms))
        return len(data) + sum(len(v) for _, v in extra)

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        return await self._call(lambda: self.store.get_many(keys))

    def age(self, entry: Entry) -> int:
        return max(0, int(self._clock() - entry.created))

    async def invalidate_key(self, namespace: str, digest: str) -> int:
        """Delete one entry (and its vector record); return the entries deleted (0 or 1)."""
        prefix = self.policy.key_prefix
        entry = entry_key(prefix, namespace, digest)
        existed = await self._call(lambda: self.store.get_many([entry]))
        await self._call(lambda: self.store.delete(entry, vector_key(prefix, namespace, digest)))
        return int(existed[0] is not None)

    async def invalidate_namespace(self, namespace: str) -> int:
        entries, vectors = namespace_patterns(self.policy.key_prefix, namespace)
        deleted = await self._delete_matching(entries)
        await self._delete_matching(vectors)
        return deleted

    async def invalidate_all(self) -> int:
        deleted = await self._delete_matching(f"{self.policy.key_prefix}e:*")
        await self._delete_matching(f"{self.policy.key_prefix}v:*")
        return deleted

    async def _delete_matching(self, pattern: str) -> int:
        # A scan may take longer than one lookup: no per-op timeout here.
        if not self.breaker.allow():
            raise CacheUnavailable("cache circuit is open")
        try:
            deleted = await self.store.delete_matching(pattern)
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
        return await self._call(self.store.info)
