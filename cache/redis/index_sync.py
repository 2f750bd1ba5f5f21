"""Index sync: every sidecar's vector index follows the change streams of all shards.

The entry store's scripts (:mod:`.budget`) append one event per write to their shard's
stream: ``+`` (an entry with a vector record was stored), ``=`` (stored without one) or
``-`` (entries removed: evicted, expired, deleted), each with a per-shard sequence number.
:class:`IndexSync` tails each shard (``XREAD BLOCK``), fetches the vector records of inserts
and adds them to the local index, and forgets removed entries, so a node learns of other
nodes' writes within about a second and never keeps serving an evicted entry's vector.

Start-up: note each stream's last event, rebuild the index from Redis, then tail from the
noted position (an event that the rebuild already reflected is applied again harmlessly).
A gap in the sequence numbers means the stream was trimmed past this node's position
(``MAXLEN``): the node rebuilds that shard from Redis and carries on from the stream's end.
A Redis failure pauses the tail for a second and retries; lookups are not affected.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import Any

from redis.exceptions import RedisError

from promptcache.cache.redis.budget import BudgetStore
from promptcache.cache.redis.client import as_text
from promptcache.cache.semantic.record import vector_id
from promptcache.cache.semantic.tier import SemanticCache

log = logging.getLogger(__name__)


def _raise_if_cancelled() -> None:
    """redis-py's blocking XREAD can swallow a cancel (the call returns or fails once the
    block times out, and the task goes on): honour a pending cancel after every read."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class IndexSync:
    """Keeps ``semantic``'s index in step with the change streams of ``store``'s shards.

    ``client`` reads the streams; its read timeout must exceed ``block_ms``. This node's own
    events are told apart by ``store.node``.
    """

    def __init__(self, client: Any, semantic: SemanticCache, store: BudgetStore, *,
                 block_ms: int = 1000, batch: int = 500, retry_after: float = 1.0) -> None:
        self.node = store.node.encode()  # this node's id in the stream's events
        self.redis = client
        self.semantic = semantic
        self.store = store
        self.layout = store.layout
        self.block_ms = block_ms
        self.batch = batch
        self.retry_after = retry_after
        self._last: dict[int, tuple[str, int | None]] = {}
        self.counts: Counter[str] = Counter()

    def _log_key(self, shard: int) -> str:
        return self.layout.shard_keys(shard).log

    async def _mark(self, shard: int) -> None:
        last = await self.redis.xrevrange(self._log_key(shard), count=1)
        if last:
            event_id, fields = last[0]
            self._last[shard] = (as_text(event_id), int(fields[b"seq"]))
        else:  # an empty stream: the next event is the one after the shard's counter
            seq = await self.redis.hget(self.layout.shard_keys(shard).meta, "seq")
            self._last[shard] = ("0-0", int(seq or 0))

    async def start(self) -> int:
        """Note every stream's position, then rebuild the index from Redis. If that fails,
        each shard's tail rebuilds it once Redis answers."""
        try:
            for shard in range(self.layout.shards):
                await self._mark(shard)
            return await self.semantic.rebuild()
        except BaseException:
            self._last.clear()
            raise

    async def run(self) -> None:
        """Tail every shard until cancelled."""
        await asyncio.gather(*(self._tail(s) for s in range(self.layout.shards)))

    async def _tail(self, shard: int) -> None:
        while True:
            try:
                if shard not in self._last:
                    await self._mark(shard)
                    await self.semantic.rebuild(shard)
                    self.counts["rebuilds"] += 1
                last_id = self._last[shard][0]
                reply = await self.redis.xread({self._log_key(shard): last_id},
                                               count=self.batch, block=self.block_ms)
                _raise_if_cancelled()
                for _stream, events in reply or ():
                    await self._apply(shard, events)
            except (RedisError, OSError) as exc:
                _raise_if_cancelled()
                self.counts["errors"] += 1
                log.info("index sync of shard %d paused: %r", shard, exc)
                await asyncio.sleep(self.retry_after)

    async def _apply(self, shard: int, events: list[tuple[Any, dict[bytes, bytes]]]) -> None:
        wanted: list[str] = []
        for _id, fields in events:
            if fields.get(b"op") == b"+":
                wanted += [m for m in as_text(fields[b"ids"]).split(",")
                           if vector_id(self.layout.digest_of(m)) not in self.semantic.index]
        records = dict(zip(wanted, await self.store.vectors_of(shard, wanted), strict=True))
        for event_id, fields in events:
            seq = int(fields[b"seq"])
            last_seq = self._last[shard][1]
            if last_seq is not None and seq != last_seq + 1 and seq > last_seq:
                self.counts["gaps"] += 1
                log.warning("index sync of shard %d missed events %d..%d (stream trimmed): "
                            "rebuilding it", shard, last_seq + 1, seq - 1)
                del self._last[shard]
                return
            self._last[shard] = (as_text(event_id), seq)
            members = as_text(fields[b"ids"]).split(",")
            if fields.get(b"op") == b"+":
                # This node's own inserts are indexed already; one is missing only if a
                # removal logged before it was applied after it (or the index is full).
                self.counts["added"] += await self.semantic.add_records(
                    [records.pop(m, None) for m in members],
                    count_full=fields.get(b"node") != self.node)
            else:
                self.semantic.forget_digests([self.layout.digest_of(m) for m in members])
                self.counts["removed"] += len(members)

    def stats(self) -> dict[str, Any]:
        return {"shards": self.layout.shards, **dict(self.counts)}
