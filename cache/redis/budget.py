"""The entry store on Redis: entries, vector records, the byte budget and LRU eviction.

:class:`BudgetStore` is the :class:`~promptcache.cache.protocols.EntryStore`. Every write of
an entry goes through one Lua script per shard (:mod:`.scripts`; the keys are
:class:`~promptcache.cache.redis.layout.KeyLayout`'s) that, in one atomic step:

1. reaps the accounting of entries whose TTL has passed (a ZSET of expiry deadlines,
   compared with Redis's own ``TIME``; Redis expires the keys, the script takes their bytes
   off the total and unlinks any not yet expired lazily);
2. evicts least-recently-used entries (a ZSET scored by the last hit on any node) until the
   new entry fits in the shard's budget;
3. writes the entry and its vector record with the same PX (or the entry alone, its
   record attached later, with the entry's remaining PX, if the entry still exists:
   :meth:`BudgetStore.attach_vector`);
4. updates sizes, recency, deadlines and the byte total;
5. appends the removals and the insert to the shard's change stream, which every sidecar
   tails to keep its vector index in step (:mod:`.index_sync`), and trims the stream's
   oldest events to keep it within its share of the budget.

The budget counts everything the cache stores in Redis. Bytes counted per entry = entry
payload + vector record + both key names + :data:`ENTRY_OVERHEAD_BYTES` (Redis's per-key
and per-ZSET/HASH-member bookkeeping, measured on redis 6.2; see the README). The change
stream is counted too, by bytes (:mod:`.scripts` says how), and kept within
:func:`stream_share` of the shard's budget; the entries may take the rest. So entries and
stream together never exceed the budget, and because the check and the eviction run
inside Redis, writers on any number of nodes can never push a shard over it: the total
after every script is at most the budget. A store without a byte budget (``max_bytes=0``)
runs the same scripts, evicts nothing and keeps the stream within
:data:`STREAM_MAX_BYTES`.

Eviction policy lives in the script rather than in a Python object with
``touch``/``evict_next``: only a script can make check-and-evict atomic across nodes.

With a :class:`~promptcache.cache.redis.near.NearCache` (``near=``), :meth:`BudgetStore.get`
serves hot entries from this process: a near miss reads the entry and its PTTL in one script
(:data:`~.scripts.GET_TTL`, which also refreshes recency as a plain hit would) and fills the near
cache; a near hit is queued, and :meth:`BudgetStore.flush_touches_forever` tells each
shard's LRU about the queued hits every ``touch_interval`` in one ``ZADD XX``. This node's
own writes and deletes drop their keys from its near cache at once; every node's tracking
connection (:mod:`.near`) drops them within milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, Final

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from promptcache.cache.protocols import PutResult, Usage
from promptcache.cache.redis import scripts
from promptcache.cache.redis.client import as_text
from promptcache.cache.redis.layout import KeyLayout
from promptcache.cache.redis.near import NearCache
from promptcache.cache.tasks import raise_if_cancelled

#: Bookkeeping bytes counted per entry on top of payload, vector record and key names:
#: Redis's main-dict and expiry-dict entries for two keys, an LRU and an expiry ZSET
#: member, a sizes HASH field, and allocator rounding of the values. Measured on redis
#: 6.2.5 (jemalloc), 20k entries of 300-4000 B with a 1 KB vector record and a TTL: 857 B
#: (644 B without TTL, 676 B without vector); ``promptcache bench budget`` re-measures it.
ENTRY_OVERHEAD_BYTES: Final = 860
#: Events kept at most per shard's change stream, whatever its byte share; a node that
#: falls further behind than the stream reaches rebuilds its index from Redis.
STREAM_MAXLEN: Final = 10_000
#: The change stream's share of a shard's budget: this fraction of it, ...
STREAM_SHARE: Final = 0.05
#: ... but at least this much over all shards (about 400 one-entry events: a node may lag
#: that many writes behind before it has to rebuild; each shard sees its part of them), ...
STREAM_MIN_BYTES: Final = 64 * 1024
#: ... and at most this much a shard (about 9,000 events) or half the shard's budget,
#: whichever is less; never less than :data:`STREAM_LEAST_BYTES`.
STREAM_MAX_BYTES: Final = 1 << 20
#: The least a shard's stream is given: its fixed cost and about 35 events. A shard budget
#: of twice this or less leaves (almost) no room for entries: a Redis Cluster's 16 shards
#: need a budget of at least 16 x 2 x this, about 440 KB.
STREAM_LEAST_BYTES: Final = scripts.STREAM_BASE_BYTES + 4096
#: Keys whose last touch a node remembers (see :meth:`BudgetStore.get`); cleared when full.
TOUCH_MEMO: Final = 8192
#: Expired entries reaped per script call (the rest on the next call).
REAP_BATCH: Final = 64
#: Near hits queued for the LRU between two flushes, at most (more wait for the next hit).
NEAR_TOUCH_QUEUE: Final = 8192

def _bytes(value: Any) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


def stream_share(shard_budget: int, shards: int = 1) -> int:
    """Bytes of a shard's budget (0 = unbounded) that its change stream may take, with the
    budget split over ``shards``; the shard's entries may take the rest."""
    if not shard_budget:
        return STREAM_MAX_BYTES
    share = min(max(int(shard_budget * STREAM_SHARE), STREAM_MIN_BYTES // shards),
                STREAM_MAX_BYTES, shard_budget // 2)
    return max(share, STREAM_LEAST_BYTES)


class BudgetStore:
    """Entries of one deployment in Redis, within a byte budget enforced per shard by scripts.

    ``max_bytes=0`` means unbounded: nothing is evicted, but sizes, expiries and the change
    stream are still kept (the stream is how other nodes' indexes learn of inserts).
    Each shard gets ``max_bytes // shards``, so the total never exceeds ``max_bytes``; of
    that, the shard's change stream keeps at most ``stream_bytes`` (default
    :func:`stream_share`) and ``stream_maxlen`` events.
    ``client`` is a ``redis.asyncio`` client or cluster client (see :mod:`.client`).
    """

    def __init__(self, client: Any, layout: KeyLayout, *, max_bytes: int = 0, node: str = "",
                 clock: Callable[[], float] = time.time,
                 overhead: int = ENTRY_OVERHEAD_BYTES, stream_maxlen: int = STREAM_MAXLEN,
                 stream_bytes: int | None = None, touch_interval: float = 0.1,
                 near: NearCache | None = None) -> None:
        self.redis = client
        self.cluster = isinstance(client, RedisCluster)
        self.layout = layout
        self.max_bytes = max_bytes
        self.shard_budget = max_bytes // layout.shards if max_bytes else 0
        self.node = node
        self.overhead = overhead
        self.stream_maxlen = stream_maxlen
        self.stream_bytes = (stream_share(self.shard_budget, layout.shards)
                             if stream_bytes is None else stream_bytes)
        self._clock = clock
        self.touch_interval = touch_interval
        self._touched: dict[str, float] = {}  # digest -> when this node last touched it
        self.near = near if near is not None and near.max_bytes > 0 else None
        self._near_touches: dict[int, set[str]] = {}  # shard -> members hit in the near cache
        self._get_ttl = client.register_script(scripts.GET_TTL)
        self._put = client.register_script(scripts.PUT)
        self._get_touch = client.register_script(scripts.GET_TOUCH)
        self._delete = client.register_script(scripts.DELETE)
        self._reap = client.register_script(scripts.REAP)
        self._reconcile = client.register_script(scripts.RECONCILE)
        self._totals = client.register_script(scripts.TOTALS)
        self._attach = client.register_script(scripts.ATTACH)

    def _score(self) -> int:
        return int(self._clock() * 1000)

    def _common(self, shard: int) -> list[Any]:
        """ARGV[1..5] of every bookkeeping script."""
        return [*self.layout.script_prefixes(shard), self.node, self.stream_maxlen,
                self.stream_bytes]

    # -- entries -------------------------------------------------------------------------

    def held(self, namespace: str, digest: str) -> bytes | None:
        """The entry's bytes if this process's near cache holds them (no I/O), else None."""
        if self.near is None:
            return None
        value = self.near.get(self.layout.entry(namespace, digest))
        if value is not None:
            self._queue_touch(namespace, digest)
        return value

    async def get(self, namespace: str, digest: str, *, held_checked: bool = False
                  ) -> bytes | None:
        """The entry's bytes; a hit refreshes its recency when there is a budget to keep.
        ``held_checked``: the caller asked :meth:`held` already (a near miss).

        Recency has a resolution of ``touch_interval`` per node: a key this node touched
        less than that long ago is read with a plain GET (hot keys cost one GET a hit).
        """
        key = self.layout.entry(namespace, digest)
        if self.near is not None:
            if not held_checked:
                value = self.held(namespace, digest)
                if value is not None:
                    return value
            fill = self.near.begin(key)
            if fill is not None:
                try:
                    value, pttl = await self._read_for_near(namespace, digest, key)
                except BaseException:
                    self.near.abandon(fill)
                    raise
                self.near.install(fill, value, pttl)
                return value
        now = self._clock()
        if not self.max_bytes or now - self._touched.get(digest, -1e18) < self.touch_interval:
            value = await self.redis.get(key)
        else:
            value = await self._get_touch(
                keys=[key, self.layout.shard_keys(self.layout.shard(digest)).lru],
                args=[self.layout.member(namespace, digest), int(now * 1000)])
            if value is not None:
                if len(self._touched) >= TOUCH_MEMO:
                    self._touched.clear()
                self._touched[digest] = now
        return _bytes(value)

    async def _read_for_near(self, namespace: str, digest: str, key: str
                             ) -> tuple[bytes | None, int]:
        """The entry and its PTTL, refreshing recency as :meth:`get` does."""
        now = self._clock()
        touch = bool(self.max_bytes) and (
            now - self._touched.get(digest, -1e18) >= self.touch_interval)
        value, pttl = await self._get_ttl(
            keys=[key, self.layout.shard_keys(self.layout.shard(digest)).lru],
            args=[self.layout.member(namespace, digest) if touch else "", int(now * 1000)])
        if touch and value is not None:
            if len(self._touched) >= TOUCH_MEMO:
                self._touched.clear()
            self._touched[digest] = now
        return _bytes(value), int(pttl)

    def _queue_touch(self, namespace: str, digest: str) -> None:
        """Note a near hit for the next :meth:`flush_touches` (with a budget to keep)."""
        if not self.max_bytes:
            return
        members = self._near_touches.setdefault(self.layout.shard(digest), set())
        if len(members) < NEAR_TOUCH_QUEUE:
            members.add(self.layout.member(namespace, digest))

    async def flush_touches(self) -> None:
        """Refresh the recency of the entries hit in the near cache since the last flush:
        one ``ZADD XX`` per shard; failures are ignored (recency is a hint)."""
        batch, self._near_touches = self._near_touches, {}
        score = self._score()
        for shard, members in batch.items():
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await self.redis.zadd(self.layout.shard_keys(shard).lru,
                                      dict.fromkeys(members, score), xx=True)
            raise_if_cancelled()

    async def flush_touches_forever(self) -> None:
        """:meth:`flush_touches` every ``touch_interval`` (a background task)."""
        while True:
            await asyncio.sleep(self.touch_interval)
            if self._near_touches:
                await self.flush_touches()

    def _forget_near(self, shard: int, members: Iterable[str]) -> None:
        """Drop entries this node changed from its own near cache now (the tracking
        connection would too, a moment later)."""
        if self.near is not None:
            self.near.invalidate(self.layout.entry_of(shard, m) for m in members)

    async def touch(self, namespace: str, digest: str) -> None:
        """Refresh recency (a semantic hit served this entry)."""
        if self.max_bytes:
            lru = self.layout.shard_keys(self.layout.shard(digest)).lru
            await self.redis.zadd(lru, {self.layout.member(namespace, digest): self._score()},
                                  xx=True)

    async def put(self, namespace: str, digest: str, entry: bytes, vector: bytes | None,
                  ttl_ms: int | None) -> PutResult:
        shard = self.layout.shard(digest)
        out = await self._put(
            keys=list(self.layout.shard_keys(shard)),
            args=[*self._common(shard), self.layout.member(namespace, digest), entry,
                  vector or b"", ttl_ms or 0, self.shard_budget, self.overhead, self._score(),
                  REAP_BATCH])
        evicted = [as_text(m) for m in out[2:]]
        self._forget_near(shard, [self.layout.member(namespace, digest), *evicted])
        return PutResult(bool(int(out[0])), int(out[1]), evicted)

    async def attach_vector(self, namespace: str, digest: str, vector: bytes) -> PutResult:
        """Give an entry stored without a vector record its record (with the entry's
        remaining TTL), evicting to fit; not stored if the entry is gone (never
        resurrected) or the record does not fit in the budget."""
        shard = self.layout.shard(digest)
        out = await self._attach(
            keys=list(self.layout.shard_keys(shard)),
            args=[*self._common(shard), self.layout.member(namespace, digest), vector,
                  self.shard_budget, self.overhead, REAP_BATCH])
        evicted = [as_text(m) for m in out[2:]]
        self._forget_near(shard, evicted)
        return PutResult(bool(int(out[0])), int(out[1]), evicted)

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        """Values of raw keys (split by slot on a cluster)."""
        if not keys:
            return []
        values = await (self.redis.mget_nonatomic(keys) if self.cluster
                        else self.redis.mget(keys))
        return [_bytes(v) for v in values]

    async def get_with_vectors(self, refs: Sequence[tuple[str, str]]
                               ) -> list[tuple[bytes | None, bytes | None]]:
        layout = self.layout
        raw = await self.get_many([k for ns, d in refs
                                   for k in (layout.entry(ns, d), layout.vector(ns, d))])
        return [(raw[2 * n], raw[2 * n + 1]) for n in range(len(refs))]

    async def vectors_of(self, shard: int, members: list[str]) -> list[bytes | None]:
        """The vector records of ``members`` of ``shard`` (None where gone)."""
        return await self.get_many([self.layout.vector_of(shard, m) for m in members])

    async def vector_batches(self, shard: int | None = None, batch: int = 500
                             ) -> AsyncIterator[list[bytes | None]]:
        pattern = (self.layout.patterns()[1] if shard is None
                   else self.layout.shard_patterns(shard)[1])
        keys: list[str] = []
        async for key in self.redis.scan_iter(match=pattern, count=1000):
            keys.append(as_text(key))
            if len(keys) >= batch:
                yield await self.get_many(keys)
                keys = []
        if keys:
            yield await self.get_many(keys)

    # -- removal -------------------------------------------------------------------------

    async def delete(self, namespace: str, digest: str) -> int:
        member = (self.layout.shard(digest), self.layout.member(namespace, digest))
        return await self.delete_members([member])

    async def delete_members(self, members: Iterable[tuple[int, str]], batch: int = 500) -> int:
        """Delete entries given as (shard, member), keeping the accounting exact."""
        by_shard: dict[int, list[str]] = {}
        for shard, member in members:
            by_shard.setdefault(shard, []).append(member)
        existed = 0
        for shard, ms in by_shard.items():
            for i in range(0, len(ms), batch):
                existed += int(await self._delete(keys=list(self.layout.shard_keys(shard)),
                                                  args=[*self._common(shard),
                                                        *ms[i:i + batch]]))
                self._forget_near(shard, ms[i:i + batch])
        return existed

    async def delete_matching(self, namespace: str | None, tenant_tag: str | None = None
                              ) -> int:
        """Delete what SCAN finds of ``namespace`` and the tenant tagged ``tenant_tag``
        (None: all) on every master of a cluster; every entry or vector key found goes
        through the delete script, so the accounting stays exact even for keys written
        without it."""
        patterns = self.layout.patterns(namespace, tenant_tag)
        found = {self.layout.split(as_text(k)) for pattern in patterns
                 async for k in self.redis.scan_iter(match=pattern, count=1000)}
        return await self.delete_members(sorted(found))

    async def members(self, shard: int) -> AsyncIterator[str]:
        """The members the accounting knows of in ``shard``."""
        async for m, _ in self.redis.hscan_iter(self.layout.shard_keys(shard).sizes,
                                                count=1000):
            yield as_text(m)

    async def members_found(self, shard: int) -> AsyncIterator[str]:
        """The members whose entry or vector key SCAN finds in ``shard`` (every master)."""
        for pattern in self.layout.shard_patterns(shard):
            async for key in self.redis.scan_iter(match=pattern, count=1000):
                yield self.layout.split(as_text(key))[1]

    # -- accounting ----------------------------------------------------------------------

    async def usage(self) -> Usage:
        """Bytes (entries and change streams) and entries accounted now (expired entries
        are reaped first)."""
        total = entries = reaped = 0
        for shard in range(self.layout.shards):
            out = await self._reap(keys=list(self.layout.shard_keys(shard)),
                                   args=[*self._common(shard), 1000])
            total, entries, reaped = total + int(out[0]), entries + int(out[1]), reaped + int(
                out[2])
        return Usage(total, entries, self.max_bytes, self.layout.shards, reaped)

    async def reconcile_members(self, shard: int, members: list[str]) -> list[int]:
        out = await self._reconcile(keys=list(self.layout.shard_keys(shard)),
                                    args=[*self._common(shard), self.overhead, self._score(),
                                          *members])
        return [int(x) for x in out]

    async def recount(self, shard: int) -> list[int]:
        """Recompute the shard's totals from its sizes and its stream's events: [bytes
        before, after, entries before, after]."""
        return [int(x) for x in await self._totals(keys=list(self.layout.shard_keys(shard)),
                                                   args=self._common(shard))]

    async def totals(self, shard: int) -> tuple[int, int]:
        """(bytes, entries) the shard's accounting holds, as is (no reaping); bytes include
        the change stream's (:meth:`stream_totals` has that part)."""
        raw = await self.redis.hmget(self.layout.shard_keys(shard).meta, ["bytes", "entries"])
        return int(raw[0] or 0), int(raw[1] or 0)

    async def stream_totals(self, shard: int) -> tuple[int, int]:
        """(bytes counted, events) of the shard's change stream, as is."""
        keys = self.layout.shard_keys(shard)
        counted = await self.redis.hget(keys.meta, "stream")
        return int(counted or 0), int(await self.redis.xlen(keys.log))

    async def reap_forever(self, interval: float = 1.0) -> None:
        """Reap expired entries' accounting now and then, so totals and the other nodes'
        indexes follow expiry even when nothing is written. Failures wait for the next
        round (the breaker-free path: this never touches request handling)."""
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(RedisError, OSError):
                await self.usage()

    # -- the server ----------------------------------------------------------------------

    async def ping(self) -> None:
        await self.redis.ping()

    async def info(self) -> dict[str, Any]:
        memory = await self.redis.info("memory")
        if self.cluster:  # one section per node
            used = sum(int(m.get("used_memory", 0)) for m in memory.values()
                       if isinstance(m, dict))
        else:
            used = int(memory.get("used_memory", 0))
        return {"keys": int(await self.redis.dbsize()), "used_memory_bytes": used}
