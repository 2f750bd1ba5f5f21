"""Recompute the byte accounting from the live keys, and report any difference.

The entry store's scripts keep sizes, recency, deadlines and totals exact as entries are
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

from promptcache.cache.redis.budget import BudgetStore
from promptcache.cache.redis.client import close_client, redis_client
from promptcache.cache.redis.layout import KeyLayout


@dataclass(slots=True)
class Report:
    """What reconciling found: members checked, and what was wrong before the fix."""

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


async def reconcile(store: BudgetStore, *, batch: int = 200) -> Report:
    """Re-measure every member of every shard of ``store`` and fix its accounting."""
    report = Report(shards=store.layout.shards)
    await store.usage()  # reap what expired: that is accounting working, not drift
    for shard in range(store.layout.shards):
        before, n_before = await store.totals(shard)
        members: set[str] = {m async for m in store.members(shard)}
        members |= {m async for m in store.members_found(shard)}
        ordered = sorted(members)
        for i in range(0, len(ordered), batch):
            checked, resized, untracked, stale = await store.reconcile_members(
                shard, ordered[i:i + batch])
            report.checked += checked
            report.resized += resized
            report.untracked += untracked
            report.stale += stale
        _, after, _, n_after = await store.recount(shard)
        report.bytes_before += before
        report.bytes_after += after
        report.entries_before += n_before
        report.entries_after += n_after
    return report


async def reconcile_url(url: str, *, key_prefix: str = "pc:", socket_timeout: float = 30.0
                        ) -> Report:
    """Reconcile the cache at ``url`` (``redis+cluster://`` for a cluster)."""
    client = redis_client(url, timeout=socket_timeout)
    try:
        store = BudgetStore(client, KeyLayout.for_url(url, key_prefix), node="reconcile")
        return await reconcile(store)
    finally:
        await close_client(client)
