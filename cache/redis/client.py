"""Redis clients: the URL schemes the cache accepts, and clients with short timeouts.

``redis://``, ``rediss://`` and ``unix://`` (with a password in the URL) name one Redis;
``redis+cluster://`` and ``rediss+cluster://`` name a Redis Cluster by any one of its nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Final
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

#: URL schemes that name a Redis Cluster (any one node of it; the rest is discovered).
CLUSTER_SCHEMES: Final = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def as_text(value: Any) -> str:
    """A Redis reply (bytes, or str with ``decode_responses``) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


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
