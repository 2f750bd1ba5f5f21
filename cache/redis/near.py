"""The near cache: hot entries in this process, kept coherent by Redis's client tracking.

An exact hit on a hot entry is then served without a Redis round trip. :class:`NearCache` is
a byte-bounded LRU of entry keys to their bytes (no I/O of its own);
:class:`NearTracking` holds one tracking connection per Redis master and feeds it the
invalidations. :class:`~promptcache.cache.redis.budget.BudgetStore` consults it first.

**Tracking mode.** Each tracking connection is a dedicated RESP2 connection that runs
``CLIENT ID``, then ``CLIENT TRACKING ON REDIRECT <its own id> BCAST PREFIX <p>...`` with
the entry key prefix of every shard (:meth:`KeyLayout.script_prefixes`), then ``SUBSCRIBE
__redis__:invalidate``. In BCAST mode Redis reports every change to a key under those
prefixes, whoever made it: ``SET``/``UNLINK`` inside the Lua scripts (put, delete, eviction,
reaping), expiry, ``maxmemory`` eviction, ``DEL`` by hand; ``FLUSHALL``/``FLUSHDB`` send a
null message, which empties the near cache. Data connections need no tracking at all, and
Redis keeps no per-key table for BCAST. Why RESP2 and a redirect rather than ``HELLO 3``:
redis-py 8.1's asyncio connections speak RESP3 already, but they hand an ``invalidate``
push to a parser hook and skip it while waiting for a reply (a connection that only waits
for pushes needs private parser hooks, and the hiredis and Python parsers differ there);
a RESP2 connection in subscribe mode delivers the invalidations as ordinary replies that
``read_response`` returns, with both parsers, on Redis 6.0 and later, and needs no HELLO
(which some managed Redis forbid).

**Race safety.** A fill (:meth:`NearCache.begin`) registers a token for its key before its
read is sent; an invalidation of that key drops the token, a flush drops all tokens and
bumps the epoch. The value read is installed only if the token is still there and the epoch
unchanged, so a fill never installs a value invalidated while its read was in flight (an
invalidation that arrives after the install removes the entry, as for any entry).

**TTL.** A fill reads the value and its PTTL in one script; the near entry's deadline is
the monotonic time *before* the read was sent plus that PTTL, so it is never later than the
key's own expiry in Redis, and an expired near entry is never served (checked on read).

**Staleness.** A change made anywhere is seen here once its invalidation has crossed one
connection: well under a millisecond on one host. If a tracking connection dies the near
cache is flushed and off until every master is tracked again (reconnecting with backoff),
then refills as traffic comes. A connection that goes silent without closing is found by a
PING every :data:`PING_INTERVAL` seconds that must be answered within ``ping_timeout``: that
sum bounds the staleness in that case.

**Without tracking** (Redis older than 6, or ``CLIENT``/``SUBSCRIBE`` refused by an ACL or
renamed by a managed service) the near cache stays off for the life of the process, with
the reason logged once and shown in its stats.

**Redis Cluster.** One tracking connection per master (each with every shard's prefix); a
change of the masters the cluster client knows, or any connection error, flushes the near
cache and rebuilds every connection.

**Memory.** Counted per entry: key bytes + value bytes + :data:`NEAR_ENTRY_OVERHEAD_BYTES`;
the LRU evicts to stay within ``max_bytes``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError, ResponseError

from promptcache.cache.redis.layout import KeyLayout
from promptcache.cache.tasks import raise_if_cancelled

log = logging.getLogger(__name__)

#: Python's bytes per near entry on top of its key's and value's lengths: the OrderedDict
#: slot and link, the key ``str`` and value ``bytes`` object headers, the entry object and
#: its deadline float. Measured with ``tracemalloc`` on CPython 3.11 over 20k entries with
#: 62-character keys and 204-byte values: 178 B, plus the key's and value's object headers
#: (49 + 33 B) = 260 B; rounded up for malloc's block header and rounding of values over
#: 512 B (``tests/redis/test_near_cache.py`` re-measures it).
NEAR_ENTRY_OVERHEAD_BYTES: Final = 320
#: The near cache's size unless ``--near-cache-bytes`` says otherwise ...
DEFAULT_NEAR_BYTES: Final = 64 << 20
#: ... but at most this fraction of ``--max-bytes`` when there is a budget.
NEAR_BUDGET_SHARE: Final = 16
#: Seconds between PINGs on an idle tracking connection.
PING_INTERVAL: Final = 0.5
#: Seconds of the first reconnection wait; it doubles up to :data:`MAX_BACKOFF`.
BASE_BACKOFF: Final = 0.05
MAX_BACKOFF: Final = 5.0
CHANNEL: Final = "__redis__:invalidate"


def near_cache_bytes(option: int | None, max_bytes: int) -> int:
    """The near cache's bound for ``--near-cache-bytes`` (None: automatic) and the budget."""
    if option is not None:
        return option
    return min(DEFAULT_NEAR_BYTES, max_bytes // NEAR_BUDGET_SHARE) if max_bytes else (
        DEFAULT_NEAR_BYTES)


class _Entry:
    __slots__ = ("deadline", "size", "value")

    def __init__(self, value: bytes, deadline: float, size: int) -> None:
        self.value, self.deadline, self.size = value, deadline, size


@dataclass(frozen=True, slots=True)
class Fill:
    """A fill in flight: installed only if neither its key nor everything was invalidated
    meanwhile."""

    key: str
    token: object
    epoch: int
    started: float  # the monotonic time before the read was sent


class NearCache:
    """A byte-bounded LRU of entry keys to their bytes, served only while tracking is on.

    ``state``: ``starting`` (tracking not yet set up), ``on``, ``down`` (a tracking
    connection was lost: flushed, reconnecting), ``off`` (tracking unavailable, or a bound of
    0; ``reason`` says which).
    """

    def __init__(self, max_bytes: int, *, clock: Callable[[], float] = time.monotonic,
                 overhead: int = NEAR_ENTRY_OVERHEAD_BYTES) -> None:
        self.max_bytes = max_bytes
        self.overhead = overhead
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._pending: dict[str, object] = {}
        self.bytes = 0
        self.epoch = 0
        self.state = "starting" if max_bytes > 0 else "off"
        self.paused = False  # shed under --max-rss: holds nothing until resumed
        self.reason: str | None = None if max_bytes > 0 else "--near-cache-bytes is 0"
        self.counts = dict.fromkeys(("hits", "misses", "fills", "fills_dropped",
                                     "invalidations", "flushes", "evictions", "expired"), 0)

    @property
    def on(self) -> bool:
        return self.state == "on" and not self.paused

    def pause(self) -> None:
        """Hold nothing (its memory goes back) until :meth:`resume`: the memory guard's
        shedding (``--max-rss``). Reads go to Redis meanwhile."""
        self.paused = True
        self.flush()

    def resume(self) -> None:
        self.paused = False

    def __len__(self) -> int:
        return len(self._entries)

    # -- the request path ----------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        """The value of ``key`` if it is here and not expired (and tracking is on)."""
        if not self.on:
            return None
        entry = self._entries.get(key)
        if entry is None:
            self.counts["misses"] += 1
            return None
        if self._clock() >= entry.deadline:
            self._drop(key)
            self.counts["expired"] += 1
            self.counts["misses"] += 1
            return None
        self._entries.move_to_end(key)
        self.counts["hits"] += 1
        return entry.value

    def begin(self, key: str) -> Fill | None:
        """Start a fill of ``key`` (call before its read is sent); None while off."""
        if not self.on:
            return None
        token = object()
        self._pending[key] = token
        return Fill(key, token, self.epoch, self._clock())

    def install(self, fill: Fill, value: bytes | None, pttl_ms: int) -> bool:
        """End ``fill`` with what its read found (``pttl_ms``: -1 = no expiry, -2 = gone);
        whether the value was kept."""
        current = self._pending.get(fill.key)
        if current is fill.token:
            del self._pending[fill.key]
        if value is None or pttl_ms == -2 or pttl_ms == 0:
            return False
        if current is not fill.token or fill.epoch != self.epoch or not self.on:
            self.counts["fills_dropped"] += 1
            return False
        size = len(fill.key) + len(value) + self.overhead
        if size > self.max_bytes:
            return False
        # PTTL is whole milliseconds of Redis's clock, read after ``started``; a millisecond
        # off it covers Redis rounding its expiry to the millisecond it was set in.
        deadline = float("inf") if pttl_ms < 0 else fill.started + (pttl_ms - 1) / 1000
        self._drop(fill.key)
        while self.bytes + size > self.max_bytes and self._entries:
            _, old = self._entries.popitem(last=False)
            self.bytes -= old.size
            self.counts["evictions"] += 1
        self._entries[fill.key] = _Entry(value, deadline, size)
        self.bytes += size
        self.counts["fills"] += 1
        return True

    def abandon(self, fill: Fill) -> None:
        """End ``fill`` without a value (its read failed)."""
        if self._pending.get(fill.key) is fill.token:
            del self._pending[fill.key]

    # -- coherence -----------------------------------------------------------------------

    def invalidate(self, keys: Iterable[str]) -> None:
        """Forget ``keys`` (changed in Redis) and let no fill of them in flight install."""
        for key in keys:
            self.counts["invalidations"] += 1
            self._pending.pop(key, None)
            self._drop(key)

    def flush(self) -> None:
        """Forget everything, and every fill in flight."""
        self._entries.clear()
        self._pending.clear()
        self.bytes = 0
        self.epoch += 1
        self.counts["flushes"] += 1

    def set_state(self, state: str, reason: str | None = None) -> None:
        """Tracking is ``on``, ``down`` or ``off``; anything but on flushes."""
        if state != "on" or self.state != "on":
            self.flush()
        self.state, self.reason = state, reason

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry.size

    def stats(self) -> dict[str, Any]:
        return {"enabled": self.on, "state": self.state, "reason": self.reason,
                "paused": self.paused,
                **self.counts, "entries": len(self._entries), "bytes": self.bytes,
                "max_bytes": self.max_bytes}


class _Refused(Exception):
    """Redis refused tracking (too old, ACL, renamed commands): the near cache stays off."""


class _Lost(Exception):
    """A tracking connection stopped answering, or the masters changed."""


def _is_pong(message: Any) -> bool:
    return (isinstance(message, list) and len(message) >= 1
            and message[0] in (b"pong", "pong"))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NearTracking:
    """The tracking connections of one deployment, feeding ``near`` its invalidations.

    ``client`` is the engine's ``redis.asyncio`` client or cluster client: its connection
    settings (host, TLS, password) are reused for one dedicated connection per master.
    :meth:`run` keeps them up until cancelled.
    """

    def __init__(self, client: Any, layout: KeyLayout, near: NearCache, *,
                 timeout: float = 1.0, ping_interval: float = PING_INTERVAL,
                 ping_timeout: float | None = None) -> None:
        self.client = client
        self.layout = layout
        self.near = near
        self.timeout = timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout if ping_timeout is not None else max(timeout, 0.5)
        self.prefixes = [layout.script_prefixes(shard)[0] for shard in range(layout.shards)]
        self.connects = 0  # tracking set up (all masters), since start
        self.client_ids: dict[str, int] = {}  # master -> the tracking connection's CLIENT ID
        self._settled = asyncio.Event()

    # -- the masters ---------------------------------------------------------------------

    def _masters(self) -> dict[str, tuple[type, dict[str, Any]]]:
        """Each master's name -> (connection class, connection settings)."""
        if isinstance(self.client, RedisCluster):
            return {n.name: (n.connection_class, dict(n.connection_kwargs))
                    for n in self.client.get_primaries()}
        pool = self.client.connection_pool
        kwargs = dict(pool.connection_kwargs)
        return {str(kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"):
                (pool.connection_class, kwargs)}

    async def _open(self, cls: type, kwargs: dict[str, Any]) -> tuple[Any, int]:
        """A connection to one master, tracking every entry prefix; its CLIENT ID."""
        conn = cls(**{**kwargs, "protocol": 2, "health_check_interval": 0})
        try:
            async with asyncio.timeout(self.timeout * 4):
                await conn.connect()
                try:
                    await conn.send_command("CLIENT", "ID")
                    client_id = int(await conn.read_response())
                    prefixes = [a for p in self.prefixes for a in ("PREFIX", p)]
                    await conn.send_command("CLIENT", "TRACKING", "ON", "REDIRECT", client_id,
                                            "BCAST", *prefixes)
                    await conn.read_response()
                    await conn.send_command("SUBSCRIBE", CHANNEL)
                    await conn.read_response()
                except ResponseError as exc:
                    raise _Refused(f"Redis refused client tracking: {exc}") from exc
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        return conn, client_id

    # -- running -------------------------------------------------------------------------

    async def settled(self, within: float) -> None:
        """Wait up to ``within`` seconds until tracking is on or known to be off."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._settled.wait()

    async def run(self) -> None:
        """Track, reconnecting with backoff after a loss, until cancelled or refused."""
        backoff = BASE_BACKOFF
        while True:
            conns: list[Any] = []
            try:
                if isinstance(self.client, RedisCluster):
                    async with asyncio.timeout(self.timeout * 4):
                        await self.client.initialize()  # the slot map, hence the masters
                masters = self._masters()
                if not masters:
                    raise _Lost("no master known")
                for name, (cls, kwargs) in masters.items():
                    conn, client_id = await self._open(cls, kwargs)
                    conns.append(conn)
                    self.client_ids[name] = client_id
                    raise_if_cancelled()
                self.near.set_state("on")
                self.connects += 1
                self._settled.set()
                backoff = BASE_BACKOFF
                await self._serve(conns, set(masters))
            except _Refused as exc:
                log.warning("near cache off: %s", exc)
                self.near.set_state("off", str(exc))
                self._settled.set()
                return
            except (RedisError, OSError, TimeoutError, _Lost) as exc:
                if self.near.state == "on":
                    log.warning("near cache flushed and off until tracking is back: %r", exc)
                self.near.set_state("down", f"tracking connection lost: {exc!r}")
                if self.connects == 0:
                    self._settled.set()  # start-up does not wait for an unreachable Redis
            finally:
                for conn in conns:
                    await conn.disconnect(nowait=True)
                self.client_ids.clear()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def _serve(self, conns: list[Any], masters: set[str]) -> None:
        readers = [asyncio.create_task(self._read(conn)) for conn in conns]
        if isinstance(self.client, RedisCluster):
            readers.append(asyncio.create_task(self._watch_masters(masters)))
        try:
            done, _ = await asyncio.wait(readers, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises what ended it
            raise _Lost("a tracking reader ended")
        finally:
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)

    async def _watch_masters(self, masters: set[str]) -> None:
        while True:
            await asyncio.sleep(self.ping_interval)
            if set(self._masters()) != masters:
                raise _Lost("the cluster's masters changed")

    async def _read(self, conn: Any) -> None:
        """Apply one connection's invalidations; PING it when idle, and give up on it
        when a PING goes unanswered for ``ping_timeout``."""
        loop = asyncio.get_running_loop()
        pinged: float | None = None
        while True:
            wait = (self.ping_interval if pinged is None
                    else pinged + self.ping_timeout - loop.time())
            message = await conn.read_response(timeout=max(wait, 0.001))
            raise_if_cancelled()
            if message is None:  # nothing came in ``wait``
                if pinged is not None:
                    raise _Lost(f"no answer to PING within {self.ping_timeout:g} s")
                await conn.send_command("PING")
                pinged = loop.time()
                continue
            pinged = None  # anything that came proves the connection alive
            if _is_pong(message) or not isinstance(message, list) or len(message) < 3:
                continue
            keys = message[2]
            if keys is None:  # FLUSHALL / FLUSHDB
                self.near.flush()
            else:
                self.near.invalidate(_text(k) for k in keys)
