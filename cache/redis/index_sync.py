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
A Redis restart is detected two ways: the shard's sequence going backwards (a Redis that
lost its data starts again at 1; one that reloaded an AOF may have lost the last second),
and a new ``run_id`` (``INFO server``) of the server holding the shard, checked after every
failure and every ``verify_every`` seconds; the shard is then rebuilt as after a gap. A
rebuild also drops the vectors whose records are no longer in Redis, so entries lost in a
restart (or removed while this node was not following) leave the index too.
A Redis failure pauses the tail for a second and retries; lookups are not affected.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from promptcache.cache.redis.budget import BudgetStore
from promptcache.cache.redis.client import as_text
from promptcache.cache.semantic.record import vector_id
from promptcache.cache.semantic.tier import SemanticCache
from promptcache.cache.tasks import raise_if_cancelled, stop_task

log = logging.getLogger(__name__)


class IndexSync:
    """Keeps ``semantic``'s index in step with the change streams of ``store``'s shards.

    ``client`` reads the streams; its read timeout must exceed ``block_ms``. This node's own
    events are told apart by ``store.node``. ``verify_every`` seconds (and after a failure)
    a shard's tail checks that the server holding it was not restarted.
    """

    def __init__(self, client: Any, semantic: SemanticCache, store: BudgetStore, *,
                 block_ms: int = 1000, batch: int = 500, retry_after: float = 1.0,
                 verify_every: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.node = store.node.encode()  # this node's id in the stream's events
        self.redis = client
        self.semantic = semantic
        self.store = store
        self.layout = store.layout
        self.block_ms = block_ms
        self.batch = batch
        self.retry_after = retry_after
        self.verify_every = verify_every
        self._clock = clock
        self._last: dict[int, tuple[str, int]] = {}
        self._run_id: dict[int, str] = {}  # of the server that held the shard at _mark
        self._verify_at: dict[int, float] = {}  # when to check that run id next
        self.counts: Counter[str] = Counter()
        self._warmup: asyncio.Task[int] | None = None

    @property
    def warming(self) -> bool:
        """Whether the start-up rebuild is still loading the index (lookups meanwhile see
        what it has loaded so far; exact hits are not affected)."""
        return self._warmup is not None and not self._warmup.done()

    async def warmed(self) -> None:
        """Wait until the start-up rebuild is done (at once if there is none)."""
        if self._warmup is not None:
            await asyncio.wait({self._warmup})

    def _log_key(self, shard: int) -> str:
        return self.layout.shard_keys(shard).log

    async def _server_id(self, shard: int) -> str:
        """The run id of the server that holds ``shard`` (new after every restart)."""
        if self.store.cluster:
            await self.redis.initialize()  # a no-op once the slot map is known
            node = self.redis.get_node_from_key(self._log_key(shard))
            info = await self.redis.info("server", target_nodes=node)
        else:
            info = await self.redis.info("server")
        return str(info.get("run_id", ""))

    async def _mark(self, shard: int) -> None:
        # The run id first: a restart after it is noticed at the next check. The counter
        # before the stream: if the stream is empty after it was read, every later event
        # has a higher sequence number.
        self._run_id[shard] = await self._server_id(shard)
        self._verify_at[shard] = self._clock() + self.verify_every
        seq = await self.redis.hget(self.layout.shard_keys(shard).meta, "seq")
        last = await self.redis.xrevrange(self._log_key(shard), count=1)
        if last:
            event_id, fields = last[0]
            self._last[shard] = (as_text(event_id), int(fields[b"seq"]))
        else:  # an empty stream: the next event is the one after the shard's counter
            self._last[shard] = ("0-0", int(seq or 0))

    async def _restarted(self, shard: int) -> bool:
        """Whether the server holding ``shard`` was restarted since _mark (checked at most
        every ``verify_every`` seconds, and at once after a failure)."""
        if self._clock() < self._verify_at.get(shard, 0.0):
            return False
        self._verify_at[shard] = self._clock() + self.verify_every
        if await self._server_id(shard) == self._run_id.get(shard):
            return False
        self.counts["restarts"] += 1
        log.warning("index sync of shard %d: Redis was restarted (new run id): rebuilding "
                    "the shard", shard)
        return True

    async def _rebuild_shard(self, shard: int) -> int:
        """Reload ``shard`` from Redis, dropping its vectors that Redis no longer holds."""
        if self.layout.shards == 1:
            return await self.semantic.rebuild(shard)
        return await self.semantic.rebuild(
            shard, owns=lambda digest: self.layout.shard(digest) == shard)

    async def start(self, wait: float | None = None) -> None:
        """Note every stream's position, then rebuild the index from Redis in the
        background (:attr:`warming` until done), waiting at most ``wait`` seconds for it
        (None: until it is done). If marking fails, the error is raised; if the rebuild
        fails, each shard's tail rebuilds its part once Redis answers."""
        try:
            for shard in range(self.layout.shards):
                await self._mark(shard)
        except BaseException:
            self._last.clear()
            raise
        self._warmup = asyncio.get_running_loop().create_task(
            self._warm(), name="promptcache-index-warmup")
        await asyncio.wait({self._warmup}, timeout=wait)

    async def _warm(self) -> int:
        started = time.monotonic()
        try:
            loaded = await self.semantic.rebuild()
        except (RedisError, OSError) as exc:  # the tails rebuild each shard
            self._last.clear()
            log.warning("could not rebuild the semantic index from Redis: %r", exc)
            return 0
        self.counts["warmup_ms"] = round((time.monotonic() - started) * 1000)
        return loaded

    async def run(self) -> None:
        """Finish the start-up rebuild, then tail every shard until cancelled."""
        if self._warmup is not None:
            try:
                await self._warmup
            finally:
                if not self._warmup.done():  # cancelled while waiting: stop it too
                    await stop_task(self._warmup)
        await asyncio.gather(*(self._tail(s) for s in range(self.layout.shards)))

    async def _tail(self, shard: int) -> None:
        while True:
            try:
                if shard in self._last and await self._restarted(shard):
                    del self._last[shard]
                if shard not in self._last:
                    await self._mark(shard)
                    await self._rebuild_shard(shard)
                    self.counts["rebuilds"] += 1
                last_id = self._last[shard][0]
                reply = await self.redis.xread({self._log_key(shard): last_id},
                                               count=self.batch, block=self.block_ms)
                raise_if_cancelled()
                for _stream, events in reply or ():
                    await self._apply(shard, events)
            except (RedisError, OSError) as exc:
                raise_if_cancelled()
                self.counts["errors"] += 1
                self._verify_at[shard] = 0.0  # was it restarted? check before the next read
                log.info("index sync of shard %d paused: %r", shard, exc)
                await asyncio.sleep(self.retry_after)

    async def _apply(self, shard: int, events: list[tuple[Any, dict[bytes, bytes]]]) -> None:
        wanted: list[str] = []
        removed_first: set[str] = set()  # named by a '-' or '=' earlier in this read
        for _id, fields in events:
            members = as_text(fields[b"ids"]).split(",")
            if fields.get(b"op") == b"+":
                # A member indexed here already is fetched anyway if an earlier event of
                # this read will forget it first (its '=' at store, then '+' when its
                # vector was attached).
                wanted += [m for m in members if m in removed_first
                           or vector_id(self.layout.digest_of(m)) not in self.semantic.index]
            else:
                removed_first.update(members)
        records = dict(zip(wanted, await self.store.vectors_of(shard, wanted), strict=True))
        for event_id, fields in events:
            seq = int(fields[b"seq"])
            last_seq = self._last[shard][1]
            if seq <= last_seq:
                self.counts["restarts"] += 1
                log.warning("index sync of shard %d: the sequence went back from %d to %d "
                            "(Redis lost data: restarted without it, or flushed): "
                            "rebuilding the shard", shard, last_seq, seq)
                del self._last[shard]
                return
            if seq != last_seq + 1:
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
        return {"shards": self.layout.shards, "warming": self.warming, **dict(self.counts)}
