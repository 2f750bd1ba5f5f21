"""The byte budget and LRU eviction, atomic in Redis.

Every write of an entry goes through one Lua script per shard (see
:class:`~promptcache.cache.keys.KeyLayout` for the keys) that, in one atomic step:

1. reaps the accounting of entries whose TTL has passed (a ZSET of expiry deadlines,
   compared with Redis's own ``TIME``; Redis expires the keys, the script takes their bytes
   off the total and unlinks any not yet expired lazily);
2. evicts least-recently-used entries (a ZSET scored by the last hit on any node) until the
   new entry fits in the shard's budget;
3. writes the entry and its vector record with the same PX;
4. updates sizes, recency, deadlines and the byte total;
5. appends the removals and the insert to the shard's change stream (``XADD MAXLEN ~``),
   which every sidecar tails to keep its vector index in step (:mod:`.sync`).

Because the check and the eviction run inside Redis, writers on any number of nodes can
never push a shard over its budget: the total after every script is at most the budget.

Bytes counted per entry = entry payload + vector record + both key names +
:data:`ENTRY_OVERHEAD_BYTES` (Redis's per-key and per-ZSET/HASH-member bookkeeping, measured
on redis 6.2; see the README). Eviction policy lives in the script rather than in a Python
object with ``touch``/``evict_next``: only a script can make check-and-evict atomic across
nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from redis.exceptions import RedisError

from promptcache.cache.keys import KeyLayout

#: Bookkeeping bytes counted per entry on top of payload, vector record and key names:
#: Redis's main-dict and expiry-dict entries for two keys, an LRU and an expiry ZSET
#: member, a sizes HASH field, and allocator rounding of the values. Measured on redis
#: 6.2.5 (jemalloc), 20k entries of 300-4000 B with a 1 KB vector record and a TTL: 857 B
#: (644 B without TTL, 676 B without vector); ``promptcache bench budget`` re-measures it.
ENTRY_OVERHEAD_BYTES: Final = 860
#: Events kept per shard's change stream (approximate trim); a node that falls further
#: behind than this rebuilds its index from Redis.
STREAM_MAXLEN: Final = 10_000
#: Keys whose last touch a node remembers (see :meth:`Budget.get`); cleared when full.
TOUCH_MEMO: Final = 8192
#: Expired entries reaped per script call (the rest on the next call).
REAP_BATCH: Final = 64

_PRELUDE = """
local K_LRU, K_EXP, K_SIZES, K_META, K_LOG = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function drop(tag, m)
  local sz = tonumber(redis.call('HGET', K_SIZES, m) or '0')
  redis.call('UNLINK', tag .. 'e:' .. m, tag .. 'v:' .. m)
  redis.call('ZREM', K_LRU, m)
  redis.call('ZREM', K_EXP, m)
  if redis.call('HDEL', K_SIZES, m) == 1 then
    redis.call('HINCRBY', K_META, 'bytes', -sz)
    redis.call('HINCRBY', K_META, 'entries', -1)
  end
  return sz
end
local function log(op, ids, node, maxlen)
  if #ids == 0 then return end
  local seq = redis.call('HINCRBY', K_META, 'seq', 1)
  redis.call('XADD', K_LOG, 'MAXLEN', '~', maxlen, '*', 'op', op,
             'ids', table.concat(ids, ','), 'node', node, 'seq', seq)
end
local function reap(tag, now, limit)
  local due = redis.call('ZRANGEBYSCORE', K_EXP, '-inf', now, 'LIMIT', 0, limit)
  for _, m in ipairs(due) do drop(tag, m) end
  return due
end
local function size_of(tag, m, entry_len, vector_len, overhead)
  local n = entry_len + #tag + 2 + #m + overhead
  if vector_len > 0 then n = n + vector_len + #tag + 2 + #m end
  return n
end
"""

# KEYS: shard keys; ARGV: tag, member, entry, vector ('' = none), ttl_ms (0 = none),
# budget (0 = none), overhead, lru score, node, maxlen, reap batch.
# Returns {stored (0/1), size, evicted..., '|', reaped...}.
_PUT = _PRELUDE + """
local tag, m, value, vec = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local ttl, budget, overhead = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local score, node, maxlen = ARGV[8], ARGV[9], ARGV[10]
local now = now_ms()
local gone = reap(tag, now, tonumber(ARGV[11]))
local size = size_of(tag, m, #value, #vec, overhead)
if budget > 0 and size > budget then
  log('-', gone, node, maxlen)
  return {0, size}
end
drop(tag, m)
local evicted = {}
if budget > 0 then
  local total = tonumber(redis.call('HGET', K_META, 'bytes') or '0')
  while total + size > budget do
    local victim = redis.call('ZRANGE', K_LRU, 0, 0)[1]
    if not victim then break end
    total = total - drop(tag, victim)
    evicted[#evicted + 1] = victim
    gone[#gone + 1] = victim
  end
end
if ttl > 0 then
  redis.call('SET', tag .. 'e:' .. m, value, 'PX', ttl)
  if #vec > 0 then redis.call('SET', tag .. 'v:' .. m, vec, 'PX', ttl) end
  redis.call('ZADD', K_EXP, now + ttl, m)
else
  redis.call('SET', tag .. 'e:' .. m, value)
  if #vec > 0 then redis.call('SET', tag .. 'v:' .. m, vec) end
end
redis.call('HSET', K_SIZES, m, size)
redis.call('ZADD', K_LRU, score, m)
redis.call('HINCRBY', K_META, 'bytes', size)
redis.call('HINCRBY', K_META, 'entries', 1)
log('-', gone, node, maxlen)
if #vec > 0 then log('+', {m}, node, maxlen) else log('=', {m}, node, maxlen) end
local out = {1, size}
for _, v in ipairs(evicted) do out[#out + 1] = v end
return out
"""

# KEYS[1]: entry key, KEYS[2]: lru; ARGV: member, score. GET that refreshes recency.
_GET_TOUCH = """
local v = redis.call('GET', KEYS[1])
if v then redis.call('ZADD', KEYS[2], 'XX', ARGV[2], ARGV[1]) end
return v
"""

# KEYS: shard keys; ARGV: tag, node, maxlen, members... Returns how many entries existed.
_DELETE = _PRELUDE + """
local tag, node, maxlen = ARGV[1], ARGV[2], ARGV[3]
local ids, existed = {}, 0
for i = 4, #ARGV do
  local m = ARGV[i]
  existed = existed + redis.call('EXISTS', tag .. 'e:' .. m)
  drop(tag, m)
  ids[#ids + 1] = m
end
log('-', ids, node, maxlen)
return existed
"""

# KEYS: shard keys; ARGV: tag, node, maxlen, limit. Returns {bytes, entries} after reaping.
_REAP = _PRELUDE + """
local gone = reap(ARGV[1], now_ms(), tonumber(ARGV[4]))
log('-', gone, ARGV[2], ARGV[3])
return {tonumber(redis.call('HGET', K_META, 'bytes') or '0'),
        tonumber(redis.call('HGET', K_META, 'entries') or '0'), #gone}
"""

# KEYS: shard keys; ARGV: tag, node, maxlen, overhead, score, members...
# Recomputes each member's accounting from its live keys.
# Returns {checked, resized, untracked, stale}.
_RECONCILE = _PRELUDE + """
local tag, node, maxlen, overhead, score = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local now = now_ms()
local checked, resized, untracked, stale, gone = 0, 0, 0, 0, {}
for i = 6, #ARGV do
  local m = ARGV[i]
  checked = checked + 1
  local ekey, vkey = tag .. 'e:' .. m, tag .. 'v:' .. m
  local elen = redis.call('STRLEN', ekey)
  local known = redis.call('HGET', K_SIZES, m)
  if elen == 0 then
    if known then stale = stale + 1 end
    drop(tag, m)
    gone[#gone + 1] = m
  else
    local size = size_of(tag, m, elen, redis.call('STRLEN', vkey), overhead)
    if not known then
      untracked = untracked + 1
      redis.call('HSET', K_SIZES, m, size)
      redis.call('HINCRBY', K_META, 'bytes', size)
      redis.call('HINCRBY', K_META, 'entries', 1)
    elseif tonumber(known) ~= size then
      resized = resized + 1
      redis.call('HSET', K_SIZES, m, size)
      redis.call('HINCRBY', K_META, 'bytes', size - tonumber(known))
    end
    redis.call('ZADD', K_LRU, 'NX', score, m)
    local pttl = redis.call('PTTL', ekey)
    if pttl > 0 then redis.call('ZADD', K_EXP, now + pttl, m)
    else redis.call('ZREM', K_EXP, m) end
  end
end
log('-', gone, node, maxlen)
return {checked, resized, untracked, stale}
"""

# KEYS: shard keys. Recomputes the shard's totals from its sizes HASH.
# Returns {bytes before, bytes after, entries before, entries after}.
_TOTALS = """
local total, n = 0, 0
local vals = redis.call('HVALS', KEYS[3])
for _, v in ipairs(vals) do total = total + tonumber(v); n = n + 1 end
local before = tonumber(redis.call('HGET', KEYS[4], 'bytes') or '0')
local before_n = tonumber(redis.call('HGET', KEYS[4], 'entries') or '0')
redis.call('HSET', KEYS[4], 'bytes', total, 'entries', n)
return {before, total, before_n, n}
"""


@dataclass(frozen=True, slots=True)
class PutResult:
    stored: bool
    size: int  # bytes counted for the entry
    evicted: list[str] = field(default_factory=list)  # members evicted to make room


@dataclass(frozen=True, slots=True)
class Usage:
    bytes: int
    entries: int
    max_bytes: int
    shards: int
    reaped: int = 0


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Budget:
    """The byte budget of one deployment, enforced per shard by Redis scripts.

    ``max_bytes=0`` means unbounded: nothing is evicted, but sizes, expiries and the change
    stream are still kept (the stream is how other nodes' indexes learn of inserts).
    Each shard gets ``max_bytes // shards``, so the total never exceeds ``max_bytes``.
    """

    def __init__(self, client: Any, layout: KeyLayout, *, max_bytes: int = 0, node: str = "",
                 clock: Callable[[], float] = time.time,
                 overhead: int = ENTRY_OVERHEAD_BYTES, stream_maxlen: int = STREAM_MAXLEN,
                 touch_interval: float = 0.1) -> None:
        self.redis = client
        self.layout = layout
        self.max_bytes = max_bytes
        self.shard_budget = max_bytes // layout.shards if max_bytes else 0
        self.node = node
        self.overhead = overhead
        self.stream_maxlen = stream_maxlen
        self._clock = clock
        self.touch_interval = touch_interval
        self._touched: dict[str, float] = {}  # digest -> when this node last touched it
        self._put = client.register_script(_PUT)
        self._get_touch = client.register_script(_GET_TOUCH)
        self._delete = client.register_script(_DELETE)
        self._reap = client.register_script(_REAP)
        self._reconcile = client.register_script(_RECONCILE)
        self._totals = client.register_script(_TOTALS)

    def _score(self) -> int:
        return int(self._clock() * 1000)

    def _common(self, shard: int) -> list[Any]:
        return [self.layout.tag(shard), self.node, self.stream_maxlen]

    async def get(self, namespace: str, digest: str) -> bytes | None:
        """The entry's bytes; a hit refreshes its recency when there is a budget to keep.

        Recency has a resolution of ``touch_interval`` per node: a key this node touched
        less than that long ago is read with a plain GET (hot keys cost one GET a hit).
        """
        key = self.layout.entry(namespace, digest)
        now = self._clock()
        if not self.max_bytes or now - self._touched.get(digest, -1e18) < self.touch_interval:
            value = await self.redis.get(key)
        else:
            value = await self._get_touch(
                keys=[key, self.layout.shard_keys(self.layout.shard(digest))[0]],
                args=[self.layout.member(namespace, digest), int(now * 1000)])
            if value is not None:
                if len(self._touched) >= TOUCH_MEMO:
                    self._touched.clear()
                self._touched[digest] = now
        return value.encode() if isinstance(value, str) else value

    async def touch(self, namespace: str, digest: str) -> None:
        """Refresh recency (a semantic hit served this entry)."""
        if self.max_bytes:
            lru = self.layout.shard_keys(self.layout.shard(digest))[0]
            await self.redis.zadd(lru, {self.layout.member(namespace, digest): self._score()},
                                  xx=True)

    async def put(self, namespace: str, digest: str, entry: bytes, vector: bytes | None,
                  ttl_ms: int | None) -> PutResult:
        shard = self.layout.shard(digest)
        out = await self._put(
            keys=self.layout.shard_keys(shard),
            args=[self.layout.tag(shard), self.layout.member(namespace, digest), entry,
                  vector or b"", ttl_ms or 0, self.shard_budget, self.overhead, self._score(),
                  self.node, self.stream_maxlen, REAP_BATCH])
        return PutResult(bool(int(out[0])), int(out[1]), [_str(m) for m in out[2:]])

    async def delete(self, members: Iterable[tuple[int, str]], batch: int = 500) -> int:
        """Delete entries given as (shard, member), keeping the accounting exact."""
        by_shard: dict[int, list[str]] = {}
        for shard, member in members:
            by_shard.setdefault(shard, []).append(member)
        existed = 0
        for shard, ms in by_shard.items():
            for i in range(0, len(ms), batch):
                existed += int(await self._delete(keys=self.layout.shard_keys(shard),
                                                  args=[*self._common(shard),
                                                        *ms[i:i + batch]]))
        return existed

    async def members(self, shard: int) -> AsyncIterator[str]:
        """The members the accounting knows of in ``shard``."""
        async for m, _ in self.redis.hscan_iter(self.layout.shard_keys(shard)[2], count=1000):
            yield _str(m)

    async def clear(self) -> int:
        """Delete every accounted entry (the cache's part of ``DELETE /cache {"all"}``)."""
        deleted = 0
        for shard in range(self.layout.shards):
            batch = [(shard, m) async for m in self.members(shard)]
            deleted += await self.delete(batch)
        return deleted

    async def usage(self) -> Usage:
        """Bytes and entries accounted now (expired entries are reaped first)."""
        total = entries = reaped = 0
        for shard in range(self.layout.shards):
            out = await self._reap(keys=self.layout.shard_keys(shard),
                                   args=[*self._common(shard), 1000])
            total, entries, reaped = total + int(out[0]), entries + int(out[1]), reaped + int(
                out[2])
        return Usage(total, entries, self.max_bytes, self.layout.shards, reaped)

    async def reconcile_members(self, shard: int, members: list[str]) -> list[int]:
        out = await self._reconcile(keys=self.layout.shard_keys(shard),
                                    args=[*self._common(shard), self.overhead, self._score(),
                                          *members])
        return [int(x) for x in out]

    async def recount(self, shard: int) -> list[int]:
        return [int(x) for x in await self._totals(keys=self.layout.shard_keys(shard))]

    async def reap_forever(self, interval: float = 1.0) -> None:
        """Reap expired entries' accounting now and then, so totals and the other nodes'
        indexes follow expiry even when nothing is written. Failures wait for the next
        round (the breaker-free path: this never touches request handling)."""
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(RedisError, OSError):
                await self.usage()

    async def totals(self, shard: int) -> tuple[int, int]:
        """(bytes, entries) the shard's accounting holds, as is (no reaping)."""
        raw = await self.redis.hmget(self.layout.shard_keys(shard)[3], ["bytes", "entries"])
        return int(raw[0] or 0), int(raw[1] or 0)
