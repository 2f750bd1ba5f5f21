"""The Lua scripts of the entry store: every write, hit refresh and removal, atomic in Redis.

Every bookkeeping script takes a shard's keys as ``KEYS[1..5]`` (lru, exp, sizes, meta, log:
:meth:`~promptcache.cache.redis.layout.KeyLayout.shard_keys`) and, as ``ARGV[1..5]``, the
entry and vector key prefixes
(:meth:`~promptcache.cache.redis.layout.KeyLayout.script_prefixes`: an entry's key is
``ARGV[1] .. member``), this node's id, and the change stream's bounds: at most ``ARGV[4]``
events and ``ARGV[5]`` counted bytes. No key name is spelled here.

The change stream is counted in the shard's byte total like the entries (the meta HASH's
``bytes`` holds both, its ``stream`` field the stream's part). A stream costs
:data:`STREAM_BASE_BYTES` once and each event :func:`event bytes <event_bytes>`: the
lengths of its values plus :data:`STREAM_EVENT_BYTES`, plus a quarter for how listpack
nodes and the allocator round them. Removals are logged :data:`LOG_CHUNK` members an event,
so no event is large enough to round badly. A stream that an append took past either bound
loses its oldest events, exactly (``XTRIM MAXLEN =``, so a reader finds every event it has
not read yet or a gap in the sequence numbers), until it holds at most ``ARGV[4]`` events
and is 1/:data:`TRIM_SLACK` of its room under ``ARGV[5]``; their bytes, re-measured from the
events themselves, are taken off, so the count follows the stream exactly. (A count that
went wrong behind the scripts' back is redone from the events when it shows.)
"""

from __future__ import annotations

from typing import Final

#: Bytes counted for a stream that exists, on top of its events: the stream's own header
#: (176 B empty), the newest listpack node's unused room (redis 6.2 allocates 4 KiB when
#: it opens a node) and the oldest node's trimmed entries (exact trimming frees a node
#: only once all its entries went; a node takes up to 5 KiB), and their radix tree keys.
STREAM_BASE_BYTES: Final = 176 + 4096 + 5120 + 2 * 128
#: Bytes counted per event on top of its values and a quarter of them. An event takes its
#: values plus about 24 B in its listpack node (flags, id deltas, lengths); a node closes
#: once it passes 4 KiB, so it often ends in the allocator's 5 KiB class: a quarter more;
#: plus the node's share of the radix tree. Measured on redis 6.2.5 (``INFO memory``
#: ``used_memory``): a stream trimmed this way stays under its count for events of 1 to
#: 500 members and node ids of 0 to 36 characters.
STREAM_EVENT_BYTES: Final = 38
#: Members per removal event (a larger removal is logged as several events).
LOG_CHUNK: Final = 8
#: A stream over its share is trimmed to 1/TRIM_SLACK of its events' room (the share less
#: :data:`STREAM_BASE_BYTES`) under it, so that trimming runs once every so many writes.
TRIM_SLACK: Final = 8


def event_bytes(*values: str | bytes) -> int:
    """Bytes counted for a stream event with these values (what the scripts compute)."""
    n = sum(len(v) for v in values)
    return n + n // 4 + STREAM_EVENT_BYTES


_PRELUDE: Final = f"""
local K_LRU, K_EXP, K_SIZES, K_META, K_LOG = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local EP, VP, NODE = ARGV[1], ARGV[2], ARGV[3]
local MAXLEN, SHARE = tonumber(ARGV[4]), tonumber(ARGV[5])
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
local function event_bytes(n)
  return n + math.floor(n / 4) + {STREAM_EVENT_BYTES}
end
local function fields_bytes(f)
  local n = 0
  for i = 2, #f, 2 do n = n + #f[i] end
  return event_bytes(n)
end
-- The stream's bytes as counted from its events (its header included if it exists).
local function measure_stream()
  if redis.call('EXISTS', K_LOG) == 0 then return 0 end
  local n = {STREAM_BASE_BYTES}
  for _, e in ipairs(redis.call('XRANGE', K_LOG, '-', '+')) do n = n + fields_bytes(e[2]) end
  return n
end
local function add_stream(n)
  redis.call('HINCRBY', K_META, 'stream', n)
  redis.call('HINCRBY', K_META, 'bytes', n)
end
-- The stream's counted bytes; a stream nobody counted yet (written by an older version)
-- is measured once and its bytes added to the total.
local function stream_bytes()
  local n = redis.call('HGET', K_META, 'stream')
  if n then return tonumber(n) end
  n = measure_stream()
  add_stream(n)
  return n
end
-- Drop the oldest events until the stream is within MAXLEN events and SHARE bytes.
local function trim()
  local counted, len = stream_bytes(), redis.call('XLEN', K_LOG)
  if counted <= SHARE and len <= MAXLEN then return end
  local target = SHARE - math.floor((SHARE - {STREAM_BASE_BYTES}) / {TRIM_SLACK})
  local cut, freed, after, count = 0, 0, '-', 16
  while (counted - freed > target or len - cut > MAXLEN) and cut < len do
    local batch = redis.call('XRANGE', K_LOG, after, '+', 'COUNT', count)
    if #batch == 0 then break end
    for _, e in ipairs(batch) do
      if counted - freed <= target and len - cut <= MAXLEN then break end
      freed = freed + fields_bytes(e[2])
      cut = cut + 1
      after = '(' .. e[1]
    end
    count = math.min(count * 4, 1024)
  end
  if cut == 0 then return end
  redis.call('XTRIM', K_LOG, 'MAXLEN', '=', len - cut)
  local left = counted - freed
  -- Over its share with no event left: the count was wrong (keys changed behind the
  -- scripts' back); count the stream afresh.
  if left > SHARE and cut == len then left = measure_stream() end
  add_stream(left - counted)
end
local function log(op, ids)
  if #ids == 0 then return end
  local grown = 0
  if stream_bytes() == 0 then grown = {STREAM_BASE_BYTES} end
  for i = 1, #ids, {LOG_CHUNK} do
    local part = table.concat(ids, ',', i, math.min(i + {LOG_CHUNK - 1}, #ids))
    local seq = string.format('%d', redis.call('HINCRBY', K_META, 'seq', 1))
    redis.call('XADD', K_LOG, '*', 'op', op, 'ids', part, 'node', NODE, 'seq', seq)
    grown = grown + event_bytes(#op + #part + #NODE + #seq)
  end
  add_stream(grown)
  trim()
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

#: ARGV: common (5), member, entry, vector ('' = none), ttl_ms (0 = none), budget
#: (0 = none), overhead, lru score, reap batch.
#: The entries may take the budget less the stream's share (ARGV[5]), so that entries and
#: stream together stay within the budget. Returns {stored (0/1), size, evicted...}.
PUT: Final = _PRELUDE + """
local m, value, vec = ARGV[6], ARGV[7], ARGV[8]
local ttl, budget, overhead = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local score = ARGV[12]
local now = now_ms()
local gone = reap(now, tonumber(ARGV[13]))
local size = size_of(m, #value, #vec, overhead)
local room = budget - SHARE
if budget > 0 and size > room then
  log('-', gone)
  return {0, size}
end
drop(m)
local evicted = {}
if budget > 0 then
  local stream = stream_bytes()  -- first: it may count an older version's stream
  local total = tonumber(redis.call('HGET', K_META, 'bytes') or '0') - stream
  while total + size > room do
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
log('-', gone)
if #vec > 0 then log('+', {m}) else log('=', {m}) end
local out = {1, size}
for _, v in ipairs(evicted) do out[#out + 1] = v end
return out
"""

#: ARGV: common (5), member, vector record, budget (0 = none), overhead, reap batch.
#: Attaches a vector record to an entry stored without one, if the entry still exists (it
#: may have expired, been evicted or deleted since: it is never resurrected). The record
#: gets the entry's remaining PTTL; the entry's counted size becomes what PUT would have
#: counted for both (so RECONCILE finds nothing to fix), evicting least-recently-used
#: entries (never this one) to stay within the budget; a '+' event tells the other nodes.
#: Returns {attached (0/1), size, evicted...}.
ATTACH: Final = _PRELUDE + """
local m, vec = ARGV[6], ARGV[7]
local budget, overhead = tonumber(ARGV[8]), tonumber(ARGV[9])
local gone = reap(now_ms(), tonumber(ARGV[10]))
local ekey = EP .. m
local elen = redis.call('STRLEN', ekey)
local known = redis.call('HGET', K_SIZES, m)
if elen == 0 or not known then
  log('-', gone)
  return {0, 0}
end
known = tonumber(known)
local size = size_of(m, elen, #vec, overhead)
local evicted = {}
if budget > 0 and size > known then
  local room = budget - SHARE
  if size > room then
    log('-', gone)
    return {0, size}
  end
  local stream = stream_bytes()  -- first: it may count an older version's stream
  local total = tonumber(redis.call('HGET', K_META, 'bytes') or '0') - stream
  while total - known + size > room do
    local victim = nil
    for _, v in ipairs(redis.call('ZRANGE', K_LRU, 0, 1)) do
      if v ~= m then victim = v; break end
    end
    if not victim then break end
    total = total - drop(victim)
    evicted[#evicted + 1] = victim
    gone[#gone + 1] = victim
  end
  if total - known + size > room then  -- bytes no eviction frees: leave the entry as is
    log('-', gone)
    local out = {0, size}
    for _, v in ipairs(evicted) do out[#out + 1] = v end
    return out
  end
end
local pttl = redis.call('PTTL', ekey)
if pttl > 0 then
  redis.call('SET', VP .. m, vec, 'PX', pttl)
else
  redis.call('SET', VP .. m, vec)
end
redis.call('HSET', K_SIZES, m, size)
redis.call('HINCRBY', K_META, 'bytes', size - known)
log('-', gone)
log('+', {m})
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

#: ARGV: common (5), members... Returns how many entries existed.
DELETE: Final = _PRELUDE + """
local ids, existed = {}, 0
for i = 6, #ARGV do
  local m = ARGV[i]
  existed = existed + redis.call('EXISTS', EP .. m)
  drop(m)
  ids[#ids + 1] = m
end
log('-', ids)
return existed
"""

#: ARGV: common (5), limit. Returns {bytes, entries, reaped} after reaping (bytes: the
#: counted total, the change stream included).
REAP: Final = _PRELUDE + """
local gone = reap(now_ms(), tonumber(ARGV[6]))
log('-', gone)
stream_bytes()  -- counts a stream an older version wrote, even when nothing was reaped
return {tonumber(redis.call('HGET', K_META, 'bytes') or '0'),
        tonumber(redis.call('HGET', K_META, 'entries') or '0'), #gone}
"""

#: ARGV: common (5), overhead, score, members...
#: Recomputes each member's accounting from its live keys.
#: Returns {checked, resized, untracked, stale}.
RECONCILE: Final = _PRELUDE + """
local overhead, score = tonumber(ARGV[6]), ARGV[7]
local now = now_ms()
local checked, resized, untracked, stale, gone = 0, 0, 0, 0, {}
for i = 8, #ARGV do
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
log('-', gone)
return {checked, resized, untracked, stale}
"""

#: ARGV: common (5). Recomputes the shard's totals from its sizes HASH and its change
#: stream's events. Returns {bytes before, bytes after, entries before, entries after}.
TOTALS: Final = _PRELUDE + """
local total, n = 0, 0
local vals = redis.call('HVALS', K_SIZES)
for _, v in ipairs(vals) do total = total + tonumber(v); n = n + 1 end
local before = tonumber(redis.call('HGET', K_META, 'bytes') or '0')
local before_n = tonumber(redis.call('HGET', K_META, 'entries') or '0')
local stream = measure_stream()
redis.call('HSET', K_META, 'bytes', total + stream, 'entries', n, 'stream', stream)
return {before, total + stream, before_n, n}
"""


#: A near cache fill: the entry and its PTTL (-1: no expiry, -2: gone) as one reply, and
#: the LRU refreshed as :data:`GET_TOUCH` does when ARGV[1] names the member
#: (KEYS: entry, the shard's lru; ARGV: member or "", score).
GET_TTL: Final = """
local v = redis.call('GET', KEYS[1])
if not v then return {false, -2} end
if ARGV[1] ~= '' then redis.call('ZADD', KEYS[2], 'XX', ARGV[2], ARGV[1]) end
return {v, redis.call('PTTL', KEYS[1])}
"""
