"""Redis clients: the URL schemes the cache accepts, and clients with short timeouts.

``redis://``, ``rediss://`` and ``unix://`` (with a password in the URL) name one Redis;
``redis+cluster://`` and ``rediss+cluster://`` name a Redis Cluster by any one of its nodes.

A client's pool is never run dry: a :class:`ConnectionGate` lets at most as many commands
run at once as the pool has connections (per node, on a cluster), and a burst beyond that
waits briefly for a free one instead of failing. A wait that runs out raises
``MaxConnectionsError``, which says "this client is busy", not "Redis failed"; and time spent
waiting does not count against the deadline of the cache operation it is part of
(:func:`op_deadline`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from typing import Any, Final, TypeVar, cast
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import MaxConnectionsError, RedisClusterException

from promptcache.cache.redis.lane import GetLane, LaneBusy, lane_for

T = TypeVar("T")

#: URL schemes that name a Redis Cluster (any one node of it; the rest is discovered).
CLUSTER_SCHEMES: Final = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def as_text(value: Any) -> str:
    """A Redis reply (bytes, or str with ``decode_responses``) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def is_cluster_url(url: str) -> bool:
    return urlsplit(url).scheme in CLUSTER_SCHEMES


#: The deadline of the cache operation this task is running, if any (see :func:`op_deadline`).
_DEADLINE: ContextVar[asyncio.Timeout | None] = ContextVar("promptcache_redis_op_deadline",
                                                           default=None)
#: Whether this task already holds a slot of a gate (a cluster pipeline re-sending a
#: redirected command does not queue behind itself).
_HOLDING: ContextVar[bool] = ContextVar("promptcache_redis_gate_held", default=False)


@contextlib.contextmanager
def op_deadline(deadline: asyncio.Timeout) -> Iterator[None]:
    """Within this block, a wait for a free connection stops the clock of ``deadline``: the
    operation's time budget is spent on Redis, not in this process's queue."""
    token = _DEADLINE.set(deadline)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


class ConnectionGate:
    """At most ``limit`` commands of one client in flight, so that its pool of ``limit``
    connections (per node) is never exhausted; a command that finds them all in use waits
    up to ``wait`` seconds for one, then raises ``MaxConnectionsError``."""

    def __init__(self, limit: int, wait: float) -> None:
        self.limit, self.wait = limit, wait
        self._slots = asyncio.Semaphore(limit)

    async def run(self, call: Callable[[], Awaitable[T]]) -> T:
        """Await ``call()`` holding one slot (a task that holds one already passes through).

        A plain method rather than a context manager: every Redis command passes here, and
        an async context manager costs more than the command's own bookkeeping."""
        if _HOLDING.get():
            return await call()
        if self._slots.locked():
            await self._wait()
        else:
            await self._slots.acquire()  # free: returns at once
        token = _HOLDING.set(True)
        try:
            return await call()
        finally:
            _HOLDING.reset(token)
            self._slots.release()

    async def _wait(self) -> None:
        with _deadline_paused():
            try:
                async with asyncio.timeout(self.wait):
                    await self._slots.acquire()
            except TimeoutError as exc:
                raise MaxConnectionsError(
                    f"all {self.limit} Redis connections stayed busy for {self.wait:g} s"
                ) from exc


@contextlib.contextmanager
def _deadline_paused() -> Iterator[None]:
    """Stop the clock of this task's operation deadline (if any) for the block."""
    deadline = _DEADLINE.get()
    when = deadline.when() if deadline is not None else None
    paused = False
    if deadline is not None and when is not None and not deadline.expired():
        with contextlib.suppress(RuntimeError):  # the operation is over: nothing to pause
            deadline.reschedule(None)
            paused = True
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        yield
    finally:
        if paused:
            assert deadline is not None and when is not None
            deadline.reschedule(when + loop.time() - started)


class _GatedRedis(aioredis.Redis):
    """A Redis client whose commands pass its :class:`ConnectionGate`, and whose GETs take
    its :class:`~promptcache.cache.redis.lane.GetLane` where it has one."""

    gate: ConnectionGate | None = None
    lane: GetLane | None = None

    async def get(self, name: Any) -> Any:
        if self.lane is not None:
            with contextlib.suppress(LaneBusy):
                return await self.lane.get(name)
        return await super().get(name)

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        if self.lane is not None:
            await self.lane.aclose()
        await super().aclose(close_connection_pool)

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        if self.gate is None:
            return await super().execute_command(*args, **options)
        return await self.gate.run(lambda: super(_GatedRedis, self).execute_command(
            *args, **options))


class _GatedCluster(RedisCluster):
    """A cluster client whose commands and pipelines pass its :class:`ConnectionGate`: each
    holds at most one connection per node, so the gate bounds every node's pool."""

    gate: ConnectionGate | None = None

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self.gate is None:
            return await super().execute_command(*args, **kwargs)
        return await self.gate.run(lambda: super(_GatedCluster, self).execute_command(
            *args, **kwargs))

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None
                 ) -> ClusterPipeline:
        if shard_hint:
            raise RedisClusterException("shard_hint is deprecated in cluster mode")
        return _GatedPipeline(self, transaction)  # type: ignore[abstract]  # redis-py's own typing


class _GatedPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True
                      ) -> list[Any]:
        gate = getattr(self.cluster_client, "gate", None)
        if gate is None:
            return await super().execute(raise_on_error, allow_redirections)
        return await gate.run(lambda: super(_GatedPipeline, self).execute(
            raise_on_error, allow_redirections))


def redis_client(url: str, *, timeout: float, max_connections: int = 256,
                 read_timeout: float | None = None) -> Any:
    """A client for ``url`` (redis://, rediss://, unix://, with password) with short timeouts;
    ``redis+cluster://`` / ``rediss+cluster://`` give a cluster client seeded by that node.

    At most ``max_connections`` commands run at once (connections per node); one more waits
    up to ``timeout`` for a free connection. One immediate retry covers a pooled connection
    that went stale when Redis restarted; anything longer is the circuit breaker's decision,
    not the client's.
    """
    scheme = urlsplit(url).scheme
    client: _GatedRedis | _GatedCluster
    if scheme in CLUSTER_SCHEMES:
        client = cast(_GatedCluster, _GatedCluster.from_url(
            CLUSTER_SCHEMES[scheme] + url[len(scheme):],
            socket_timeout=read_timeout or timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1),
            max_connections=max_connections,
        ))
    else:
        client = cast(_GatedRedis, _GatedRedis.from_url(
            url,
            socket_timeout=read_timeout or timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1),
            max_connections=max_connections,
            health_check_interval=30,
        ))
    client.gate = ConnectionGate(max_connections, timeout)
    if isinstance(client, _GatedRedis) and not client.get_encoder().decode_responses:
        client.lane = lane_for(client, timeout)
    return client


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
