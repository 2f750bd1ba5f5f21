"""The semantic tier: near-duplicate requests answered from an entry, if a verifier agrees.

On a miss of the exact tier, the final user message is embedded and searched in the
FAISS partition of its scope (see :mod:`promptcache.cache.semantic.scope`); candidates at or
above the similarity threshold are fetched from Redis, dropped if their entry is gone
(expired, evicted or deleted: the index never resurrects one), and passed to the
verifier; the best one it accepts is served.

Each entry stored with a semantic view gets a vector record beside it in the entry store
(scope, text, float16 vector: :class:`VectorRecord`), written in the same
transaction and with the same TTL, so a sidecar rebuilds its index from Redis at start.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from promptcache.cache.entry import Entry
from promptcache.cache.errors import EntryFormatError
from promptcache.cache.exact import ExactCache
from promptcache.cache.keys import CacheKey
from promptcache.cache.protocols import CandidateVerifier, Verdict
from promptcache.cache.semantic.embedding import BatchingEmbedder
from promptcache.cache.semantic.index import PartitionedIndex
from promptcache.cache.semantic.record import VectorRecord, vector_id
from promptcache.cache.semantic.scope import SemanticView

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SemanticPolicy:
    """The tier's thresholds: similarity, temperature, candidates searched, index bound."""

    threshold: float = 0.975
    max_temperature: float = 1.0
    candidates: int = 4
    #: Bound of this node's index (0 = none). When reached, new vectors are not indexed
    #: here (their entries still answer exact matches) until removals make room.
    max_index_bytes: int = 0


class SemanticHit(NamedTuple):
    """A verified near-duplicate: the entry that answers, how similar its prompt was, and
    the entry's digest (its X-Cache-Key)."""

    entry: Entry
    similarity: float
    digest: str


class SemanticCache:
    """Near-duplicate lookups over the exact cache's entries: embed, search, fetch, verify."""

    def __init__(self, exact: ExactCache, embedder: BatchingEmbedder, index: PartitionedIndex,
                 verifier: CandidateVerifier | None, policy: SemanticPolicy | None = None) -> None:
        self.exact = exact
        self.embedder = embedder
        self.index = index
        self.verifier = verifier
        self.policy = policy or SemanticPolicy()
        self._refs: dict[int, tuple[str, str]] = {}  # id -> (namespace, digest)
        self.counts: Counter[str] = Counter()

    @property
    def model(self) -> str:
        """The name of the embedder's vectors; records made by another are re-embedded."""
        return str(getattr(getattr(self.embedder, "embedder", None), "name", ""))

    async def lookup(self, view: SemanticView, *, threshold: float | None = None
                     ) -> SemanticHit | None:
        """The best verified entry of ``view``'s scope, or None. May raise CacheUnavailable."""
        threshold = self.policy.threshold if threshold is None else threshold
        self.counts["lookups"] += 1
        if not self.index.scope_size(view.scope):
            return None
        vector = await self.embedder.embed(view.text)
        found = [(i, s) for i, s in self.index.search(view.scope, vector, self.policy.candidates)
                 if s >= threshold and i in self._refs]
        if not found:
            self.counts["below_threshold"] += 1
            return None
        refs = [self._refs[i] for i, _ in found]
        raw = await self.exact.get_with_vectors(refs)
        candidates: list[tuple[float, Entry, VectorRecord]] = []
        for n, (id_, similarity) in enumerate(found):
            entry, record = self._decode(*raw[n])
            if entry is None or record is None or record.scope != view.scope:
                self.forget(id_)  # gone from Redis: never served again
                self.counts["stale"] += 1
                continue
            candidates.append((similarity, entry, record))
        if not candidates:
            return None
        verdicts = await self._verify([(view.text, r.text, s) for s, _, r in candidates])
        for (similarity, entry, record), verdict in zip(candidates, verdicts, strict=True):
            if verdict.ok:
                self.counts["hits"] += 1
                await self.exact.touch(record.namespace, record.digest)
                return SemanticHit(entry, similarity, record.digest)
            self.counts[f"rejected_{verdict.reason or 'model'}"] += 1
        return None

    async def _verify(self, items: list[tuple[str, str, float]]) -> Sequence[Verdict]:
        if self.verifier is None:
            return [Verdict(ok=True, reason=None, score=1.0) for _ in items]
        return await asyncio.to_thread(self.verifier.verify_batch, items)

    @staticmethod
    def _decode(entry_raw: bytes | None, record_raw: bytes | None
                ) -> tuple[Entry | None, VectorRecord | None]:
        if entry_raw is None or record_raw is None:
            return None, None
        try:
            return Entry.decode(entry_raw), VectorRecord.decode(record_raw)
        except EntryFormatError:
            return None, None

    async def put(self, key: CacheKey, entry: Entry, view: SemanticView, *,
                  ttl: float | None = None) -> int:
        """Store the entry and its vector record together; index it. Bytes written, or 0."""
        vector = await self.embedder.embed(view.text)
        record = VectorRecord(view.scope, view.text, vector, key.namespace, key.digest,
                              self.model)
        written = await self.exact.put(key, entry, ttl=ttl, vector=record.encode())
        if written:
            self._index(record)
        return written

    def _index(self, record: VectorRecord, *, count_full: bool = True) -> bool:
        """Add ``record`` to the index, unless the index is at its bound."""
        id_ = vector_id(record.digest)
        limit = self.policy.max_index_bytes
        if limit and id_ not in self._refs and self.index.nbytes >= limit:
            self.counts["index_full"] += count_full
            return False
        self.index.add(record.scope, np.array([id_], dtype=np.int64), record.vector[None, :])
        self._refs[id_] = (record.namespace, record.digest)
        return True

    async def add_records(self, raw: Sequence[bytes | None], *, count_full: bool = True
                          ) -> int:
        """Index encoded vector records (None, gone since, are skipped); return how many.

        A record made by another embedder (another model or tuning, or a record from before
        records named their model) is embedded again from its text: its vector means
        nothing in this index.
        """
        return await self._add_decoded(_decode_records(raw), count_full=count_full)

    async def _add_decoded(self, records: list[VectorRecord], *, count_full: bool = True
                           ) -> int:
        stale = [n for n, r in enumerate(records) if r.model != self.model]
        if stale:
            vectors = await self.embedder.embed_many([records[n].text for n in stale])
            for n, vector in zip(stale, vectors, strict=True):
                records[n] = dataclasses.replace(records[n], vector=vector)
            self.counts["reembedded"] += len(stale)
        return sum(self._index(r, count_full=count_full) for r in records)

    def forget_digests(self, digests: Sequence[str]) -> None:
        ids = [vector_id(d) for d in digests]
        self.index.remove(np.array(ids, dtype=np.int64))
        for id_ in ids:
            self._refs.pop(id_, None)

    def forget(self, id_: int) -> None:
        self.index.remove(np.array([id_], dtype=np.int64))
        self._refs.pop(id_, None)

    async def rebuild(self, shard: int | None = None, batch: int = 500, *,
                      owns: Callable[[str], bool] | None = None) -> int:
        """Make the index hold what the store holds (of one shard, or all): load every
        vector record found, and drop the indexed vectors that were not found (their
        entries are gone: evicted, expired, deleted, or lost when Redis restarted).

        ``owns(digest)`` says which indexed vectors this rebuild covers (those of ``shard``;
        by default every one, right for a whole-store rebuild or a single shard). Vectors
        indexed while it runs are kept. Returns how many vectors were loaded.
        """
        covered = [i for i, (_, digest) in self._refs.items() if owns is None or owns(digest)]
        found: set[int] = set()
        loaded = 0
        async for raw in self.exact.store.vector_batches(shard, batch):
            records = _decode_records(raw)
            found.update(vector_id(r.digest) for r in records)
            loaded += await self._add_decoded(records)
        gone = [i for i in covered if i not in found]
        if gone:
            self.index.remove(np.array(gone, dtype=np.int64))
            for id_ in gone:
                self._refs.pop(id_, None)
            self.counts["dropped_at_rebuild"] += len(gone)
        log.info("semantic index rebuilt from Redis: %d vectors loaded, %d dropped",
                 loaded, len(gone))
        return loaded

    def stats(self) -> dict[str, Any]:
        return {**self.index.stats(), **dict(self.counts),
                "embed_batches": self.embedder.batches, "embedded": self.embedder.embedded,
                "embed_memo_hits": self.embedder.memo_hits}


def _decode_records(raw: Sequence[bytes | None]) -> list[VectorRecord]:
    """The records of ``raw`` that decode (None, gone since, and malformed ones skipped)."""
    records = []
    for value in raw:
        if value is None:
            continue
        try:
            records.append(VectorRecord.decode(value))
        except EntryFormatError:
            continue
    return records
