"""The Lua scripts of the entry store: every write, hit refresh and removal, atomic in Redis.

Every bookkeeping script takes a shard's keys as ``KEYS[1..5]`` (lru, exp, sizes, meta, log:
:meth:`~promptcache.cache.redis.layout.KeyLayout.shard_keys`) and the entry and vector key
prefixes as ``ARGV[1..2]`` (:meth:`~promptcache.cache.redis.layout.KeyLayout.script_prefixes`):
an entry's key is ``ARGV[1] .. member``. No key name is spelled here.
"""

from __future__ import annotations

from typing import Final

_PRELUDE: Final = """
local K_LRU, K_EXP, K_SIZES, K_META, K_LOG = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local EP, VP = ARGV[1], ARGV[2]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function drop(m)
  local sz = tonumber(redis.call('HGET', K_SIZES, m) or '0')
  redis.call('UNLINK', EP .. m, VP .. m)
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
local function reap(now, limit)
  local due = redis.call('ZRANGEBYSCORE', K_EXP, '-inf', now, 'LIMIT', 0, limit)
  for _, m in ipairs(due) do drop(m) end
  return due
end
local function size_of(m, entry_len, vector_len, overhead)
  local n = entry_len + #EP + #m + overhead
  if vector_len > 0 then n = n + vector_len + #VP + #m end
  return n
end
"""

#: ARGV: prefixes (2), member, entry, vector ('' = none), ttl_ms (0 = none), budget
#: (0 = none), overhead, lru score, node, maxlen, reap batch.
#: Returns {stored (0/1), size, evicted...}.
PUT: Final = _PRELUDE + """
local m, value, vec = ARGV[3], ARGV[4], ARGV[5]
local ttl, budget, overhead = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local score, node, maxlen = ARGV[9], ARGV[10], ARGV[11]
local now = now_ms()
local gone = reap(now, tonumber(ARGV[12]))
local size = size_of(m, #value, #vec, overhead)
if budget > 0 and size > budget then
  log('-', gone, node, maxlen)
  return {0, size}
end
drop(m)
local evicted = {}
if budget > 0 then
  local total = tonumber(redis.call('HGET', K_META, 'bytes') or '0')
  while total + size > budget do
    local victim = redis.call('ZRANGE', K_LRU, 0, 0)[1]
    if not victim then break end
    total = total - drop(victim)
    evicted[#evicted + 1] = victim
    gone[#gone + 1] = victim
  end
end
if ttl > 0 then
  redis.call('SET', EP .. m, value, 'PX', ttl)
  if #vec > 0 then redis.call('SET', VP .. m, vec, 'PX', ttl) end
  redis.call('ZADD', K_EXP, now + ttl, m)
else
  redis.call('SET', EP .. m, value)
  if #vec > 0 then redis.call('SET', VP .. m, vec) end
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

#: KEYS[1]: entry key, KEYS[2]: lru; ARGV: member, score. A GET that refreshes recency.
GET_TOUCH: Final = """
local v = redis.call('GET', KEYS[1])
if v then redis.call('ZADD', KEYS[2], 'XX', ARGV[2], ARGV[1]) end
return v
"""

#: ARGV: prefixes (2), node, maxlen, members... Returns how many entries existed.
DELETE: Final = _PRELUDE + """
local node, maxlen = ARGV[3], ARGV[4]
local ids, existed = {}, 0
for i = 5, #ARGV do
  local m = ARGV[i]
  existed = existed + redis.call('EXISTS', EP .. m)
  drop(m)
  ids[#ids + 1] = m
end
log('-', ids, node, maxlen)
return existed
"""

#: ARGV: prefixes (2), node, maxlen, limit. Returns {bytes, entries, reaped} after reaping.
REAP: Final = _PRELUDE + """
local gone = reap(now_ms(), tonumber(ARGV[5]))
log('-', gone, ARGV[3], ARGV[4])
return {tonumber(redis.call('HGET', K_META, 'bytes') or '0'),
        tonumber(redis.call('HGET', K_META, 'entries') or '0'), #gone}
"""

#: ARGV: prefixes (2), node, maxlen, overhead, score, members...
#: Recomputes each member's accounting from its live keys.
#: Returns {checked, resized, untracked, stale}.
RECONCILE: Final = _PRELUDE + """
local node, maxlen, overhead, score = ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6]
local now = now_ms()
local checked, resized, untracked, stale, gone = 0, 0, 0, 0, {}
for i = 7, #ARGV do
  local m = ARGV[i]
  checked = checked + 1
  local ekey, vkey = EP .. m, VP .. m
  local elen = redis.call('STRLEN', ekey)
  local known = redis.call('HGET', K_SIZES, m)
  if elen == 0 then
    if known then stale = stale + 1 end
    drop(m)
    gone[#gone + 1] = m
  else
    local size = size_of(m, elen, redis.call('STRLEN', vkey), overhead)
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

#: KEYS: shard keys. Recomputes the shard's totals from its sizes HASH.
#: Returns {bytes before, bytes after, entries before, entries after}.
TOTALS: Final = """
local total, n = 0, 0
local vals = redis.call('HVALS', KEYS[3])
for _, v in ipairs(vals) do total = total + tonumber(v); n = n + 1 end
local before = tonumber(redis.call('HGET', KEYS[4], 'bytes') or '0')
local before_n = tonumber(redis.call('HGET', KEYS[4], 'entries') or '0')
redis.call('HSET', KEYS[4], 'bytes', total, 'entries', n)
return {before, total, before_n, n}
"""
