"""Recompute the byte accounting from the live keys, and report any difference.

The budget's scripts keep sizes, recency, deadlines and totals exact as entries are
written, hit, expired, evicted and deleted. ``promptcache reconcile`` checks that claim
against what Redis actually holds, shard by shard: every member the accounting knows of and
every entry or vector key a SCAN finds (on every master of a cluster) is re-measured in a
script; entries the accounting missed are added, stale ones dropped, wrong sizes fixed,
orphaned vector records deleted; then each shard's totals are recomputed from its sizes.
A non-zero ``drift_bytes`` in the report means the accounting was wrong (and is now fixed).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from promptcache.cache.redis.budget import Budget
from promptcache.cache.redis.client import EntryStore


@dataclass(slots=True)
class Report:
    shards: int = 0
    checked: int = 0
    resized: int = 0  # accounted size differed from the live keys
    untracked: int = 0  # live entries the accounting did not know of
    stale: int = 0  # accounted entries whose keys were gone
    bytes_before: int = 0
    bytes_after: int = 0
    entries_before: int = 0
    entries_after: int = 0

    @property
    def drift_bytes(self) -> int:
        return self.bytes_before - self.bytes_after

    @property
    def clean(self) -> bool:
        return not (self.resized or self.untracked or self.stale or self.drift_bytes
                    or self.entries_before != self.entries_after)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "drift_bytes": self.drift_bytes, "clean": self.clean}


async def reconcile(budget: Budget, store: EntryStore, *, batch: int = 200) -> Report:
    layout = budget.layout
    report = Report(shards=layout.shards)
    await budget.usage()  # reap what expired: that is accounting working, not drift
    for shard in range(layout.shards):
        tag = layout.tag(shard)
        before, n_before = await budget.totals(shard)
        members: set[str] = {m async for m in budget.members(shard)}
        for kind in ("e", "v"):
            async for key in store.scan(f"{tag}{kind}:*"):
                members.add(layout.split(key.decode() if isinstance(key, bytes) else key)[1])
        ordered = sorted(members)
        for i in range(0, len(ordered), batch):
            checked, resized, untracked, stale = await budget.reconcile_members(
                shard, ordered[i:i + batch])
            report.checked += checked
            report.resized += resized
            report.untracked += untracked
            report.stale += stale
        _, after, _, n_after = await budget.recount(shard)
        report.bytes_before += before
        report.bytes_after += after
        report.entries_before += n_before
        report.entries_after += n_after
    return report


async def reconcile_url(url: str, *, key_prefix: str = "pc:", socket_timeout: float = 30.0
                        ) -> Report:
    """Reconcile the cache at ``url`` (``redis+cluster://`` for a cluster)."""
    from promptcache.cache.keys import CLUSTER_SHARDS, KeyLayout
    from promptcache.cache.redis.client import (
        RedisStore,
        close_client,
        is_cluster_url,
        redis_client,
    )

    client = redis_client(url, timeout=socket_timeout)
    try:
        layout = KeyLayout(key_prefix, CLUSTER_SHARDS if is_cluster_url(url) else 1)
        return await reconcile(Budget(client, layout, node="reconcile"), RedisStore(client))
    finally:
        await close_client(client)
