"""Entry stores: where encoded entries live.

:class:`EntryStore` is the seam; :class:`RedisStore` is the implementation (a single
Redis, reached through ``redis.asyncio``). Stores deal in bytes and Redis keys only;
keys, encoding, timeouts and the circuit breaker are the engine's job
(:mod:`promptcache.cache.exact`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, Final, Protocol
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


class EntryStore(Protocol):
    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl_ms: int | None) -> None: ...

    async def get_many(self, keys: list[str]) -> list[bytes | None]: ...

    async def set_many(self, items: list[tuple[str, bytes]], ttl_ms: int | None) -> None:
        """Write all items, atomically where the backend can."""
        ...

    def scan(self, pattern: str) -> AsyncIterator[bytes]: ...

    async def delete(self, key: str, *more: str) -> int: ...

    async def delete_matching(self, pattern: str) -> int: ...

    async def ping(self) -> None: ...

    async def info(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...


#: URL schemes that name a Redis Cluster (any one node of it; the rest is discovered).
CLUSTER_SCHEMES: Final = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def is_cluster_url(url: str) -> bool:
    return urlsplit(url).scheme in CLUSTER_SCHEMES


def redis_client(url: str, *, timeout: float, max_connections: int = 256,
                 read_timeout: float | None = None) -> Any:
    """A client for ``url`` (redis://, rediss://, unix://, with password) with short timeouts;
    ``redis+cluster://`` / ``rediss+cluster://`` give a cluster client seeded by that node.

    One immediate retry covers a pooled connection that went stale when Redis restarted;
    anything longer is the circuit breaker's decision, not the client's.
    """
    scheme = urlsplit(url).scheme
    if scheme in CLUSTER_SCHEMES:
        return RedisCluster.from_url(
            CLUSTER_SCHEMES[scheme] + url[len(scheme):],
            socket_timeout=read_timeout or timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1),
            max_connections=max_connections,
        )
    return aioredis.Redis.from_url(
        url,
        socket_timeout=read_timeout or timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 1),
        max_connections=max_connections,
        health_check_interval=30,
    )


async def close_client(client: Any) -> None:
    """Close a client from :func:`redis_client`, connections and all.

    A cluster client's ``aclose()`` does nothing while the client is still learning the slot
    map, and that learning, if it is in flight, then finishes with open connections nobody
    closes. So wait (briefly) for an initialisation in flight before closing.
    """
    lock = getattr(client, "_lock", None) if isinstance(client, RedisCluster) else None
    if lock is not None:
        with contextlib.suppress(asyncio.TimeoutError):
            async with asyncio.timeout(5.0), lock:
                pass
    await client.aclose()


class RedisStore:
    """A single Redis or a Redis Cluster (multi-key reads are split by slot there)."""

    def __init__(self, client: aioredis.Redis | RedisCluster) -> None:
        self._redis: Any = client
        self.cluster = isinstance(client, RedisCluster)

    async def get(self, key: str) -> bytes | None:
        value = await self._redis.get(key)
        return value if isinstance(value, bytes) or value is None else value.encode()

    async def set(self, key: str, value: bytes, ttl_ms: int | None) -> None:
        await self._redis.set(key, value, px=ttl_ms)

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        if not keys:
            return []
        values = await (self._redis.mget_nonatomic(keys) if self.cluster
                        else self._redis.mget(keys))
        return [v.encode() if isinstance(v, str) else v for v in values]

    async def set_many(self, items: list[tuple[str, bytes]], ttl_ms: int | None) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            for key, value in items:
                pipe.set(key, value, px=ttl_ms)  # one slot: the keys share a hash tag
            await pipe.execute()

    def scan(self, pattern: str) -> AsyncIterator[bytes]:
        return self._redis.scan_iter(match=pattern, count=1000)

    async def delete(self, key: str, *more: str) -> int:
        return int(await self._redis.unlink(key, *more))

    async def delete_matching(self, pattern: str) -> int:
        deleted = 0
        batch: list[bytes] = []
        async for key in self._redis.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += int(await self._redis.unlink(*batch))
                batch.clear()
        if batch:
            deleted += int(await self._redis.unlink(*batch))
        return deleted

    async def ping(self) -> None:
        await self._redis.ping()

    async def info(self) -> dict[str, Any]:
        memory = await self._redis.info("memory")
        if self.cluster:  # one section per node
            used = sum(int(m.get("used_memory", 0)) for m in memory.values()
                       if isinstance(m, dict))
        else:
            used = int(memory.get("used_memory", 0))
        return {"keys": int(await self._redis.dbsize()), "used_memory_bytes": used}

    async def close(self) -> None:
        await self._redis.aclose()
