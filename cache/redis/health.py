"""Start-up checks of an external Redis: settings under which the cache cannot keep its word.

:func:`check_eviction_policy` reads ``maxmemory-policy`` and ``maxmemory`` (``CONFIG GET``)
of the Redis at ``--redis-url``, or of every master of a Redis Cluster, and logs what is
wrong with them. The byte budget's scripts evict, account and announce every removal
(:mod:`.budget`, :mod:`.index_sync`); a policy other than ``noeviction`` lets Redis evict
entries, vector records, bookkeeping keys or a change stream behind their back once
``maxmemory`` is reached: the byte total drifts, other nodes' indexes keep vectors of
entries that are gone, and a lost bookkeeping key loses a shard's accounting. A warning
says so and how to fix it. A ``maxmemory`` below ``--max-bytes`` is warned of too: Redis
then refuses writes (OOM) before the budget evicts, and those failures open the breaker.
A managed Redis that forbids ``CONFIG`` is reported as not checked (info).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Final

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError, ResponseError

from promptcache.cache.redis.client import as_text

log = logging.getLogger(__name__)

#: The only ``maxmemory-policy`` under which Redis never removes the cache's keys itself.
SAFE_POLICY: Final = "noeviction"
#: Seconds the whole check may take (every master of a cluster) before it is given up.
CHECK_TIMEOUT: Final = 5.0


@dataclass(frozen=True, slots=True)
class MemoryPolicy:
    """One server's eviction settings; ``policy`` is None when they could not be read."""

    node: str
    policy: str | None
    maxmemory: int = 0
    refusal: str = ""  # Redis's answer to CONFIG GET when it refused it

    @property
    def evicts(self) -> bool:
        """Redis may evict keys of its own accord (now, or once ``maxmemory`` is set)."""
        return self.policy is not None and self.policy != SAFE_POLICY


async def check_eviction_policy(client: Any, *, max_bytes: int = 0) -> list[MemoryPolicy]:
    """Read and report the eviction settings of the Redis behind ``client`` (every master
    of a cluster): a warning for a policy other than ``noeviction`` or a ``maxmemory`` below
    ``max_bytes``, an info line when ``CONFIG`` is forbidden or Redis does not answer."""
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            found = await _read(client)
    except (RedisError, OSError, TimeoutError) as exc:
        log.info("could not check Redis's maxmemory-policy: %r", exc)
        return []
    for server in found:
        _report(server, max_bytes)
    return found


async def _read(client: Any) -> list[MemoryPolicy]:
    if not isinstance(client, RedisCluster):
        return [await _read_node(client, _address(client), {})]
    await client.initialize()  # a no-op once the slot map is known
    return [await _read_node(client, node.name, {"target_nodes": node})
            for node in client.get_primaries()]


async def _read_node(client: Any, name: str, route: dict[str, Any]) -> MemoryPolicy:
    try:
        reply = await client.config_get("maxmemory*", **route)
    except ResponseError as exc:  # unknown or renamed command, NOPERM (ACL)
        return MemoryPolicy(name, None, refusal=str(exc))
    values = {as_text(k): as_text(v) for k, v in reply.items()}
    return MemoryPolicy(name, values.get("maxmemory-policy"),
                        int(values.get("maxmemory") or 0))


def _address(client: Any) -> str:
    """``host:port`` or the socket path of a single-server client (never its password)."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return str(kwargs["path"])
    return f"{kwargs.get('host')}:{kwargs.get('port')}"


def _report(server: MemoryPolicy, max_bytes: int) -> None:
    if server.policy is None:
        log.info("could not check maxmemory-policy on %s (CONFIG GET refused: %s); it must "
                 "be 'noeviction', or Redis may evict the cache's entries and their "
                 "bookkeeping behind the byte budget's back", server.node, server.refusal)
        return
    limit = f"maxmemory {server.maxmemory} B" if server.maxmemory else "no maxmemory set yet"
    if server.evicts:
        log.warning(
            "Redis %s has maxmemory-policy '%s' (%s): at maxmemory it evicts the cache's "
            "entries, vector records and bookkeeping behind the byte budget's back, so the "
            "accounting drifts and other nodes keep vectors of entries that are gone. "
            "Bound the cache with --max-bytes and set 'CONFIG SET maxmemory-policy "
            "noeviction' (and in redis.conf or your provider's parameter group)",
            server.node, server.policy, limit)
    if server.maxmemory and max_bytes and server.maxmemory < max_bytes:
        log.warning(
            "Redis %s has maxmemory %d B, below --max-bytes %d B: Redis will refuse (or, "
            "with an eviction policy, evict) before the budget evicts, and failed writes open "
            "the circuit breaker. Lower --max-bytes or raise maxmemory (leave headroom for "
            "Redis's own memory; see `promptcache plan`)",
            server.node, server.maxmemory, max_bytes)
