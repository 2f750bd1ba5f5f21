"""The semantic tier: near-duplicate requests answered from an entry, if a verifier agrees.

On a miss of the exact tier, the lookup is a cascade. The first stage
(:class:`~promptcache.cache.semantic.first_stage.FirstStage`, when it is on: a static
model's binary codes, well under a millisecond) asks whether any entry of the scope could
plausibly match; when none can, the lookup is a miss without the transformer. Otherwise the
final user message is embedded by the precise model and searched in the FAISS partition of
its scope (see :mod:`promptcache.cache.semantic.scope`); candidates at or above the
similarity threshold are fetched from Redis, dropped if their entry is gone (expired,
evicted or deleted: the index never resurrects one), and passed to the verifier; the best
one it accepts is served.

Nothing on a request's path waits for the model when that would cost more than the
policy's ``wait_budget``: a lookup that would queue longer is skipped (a miss, counted
``shed``), a text longer than the model's window is never matched on a prefix (the request
is exact-only, counted ``too_long``), and an embed or verify call that passes its deadline
makes the lookup a miss (counted ``deadline``). While the process is over ``--max-rss``
(:meth:`SemanticCache.shed_memory`), the model is released and every lookup and store is
exact-only (counted ``memory``) until :meth:`SemanticCache.resume_memory`.

Storing writes the exact entry at once and queues its text on a bounded backlog (past the
bound the entry stays exact-only, counted ``exact_only``). The tier's background worker
(:meth:`SemanticCache.start`) takes the vector from the embedder's memo when the miss's
lookup computed it, and otherwise embeds the text at low priority while the model is idle;
it then attaches the vector record (scope, text, float16 vector: :class:`VectorRecord`) to
the entry in the store, with the entry's remaining TTL, only if the entry still exists
(:meth:`~promptcache.cache.exact.ExactCache.attach_vector`: an entry purged, evicted or
expired meanwhile is never resurrected), and indexes it. So a sidecar rebuilds its index
from Redis at start, and other nodes learn the vector from the change stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import numpy as np

from promptcache.cache.entry import Entry
from promptcache.cache.errors import CacheUnavailable, EmbedTimeout, EntryFormatError
from promptcache.cache.exact import ExactCache
from promptcache.cache.keys import CacheKey
from promptcache.cache.protocols import CandidateVerifier, Verdict
from promptcache.cache.semantic.embedding import BatchingEmbedder
from promptcache.cache.semantic.first_stage import CODE_BYTES, FirstStage
from promptcache.cache.semantic.index import PartitionedIndex
from promptcache.cache.semantic.record import VectorRecord, vector_id
from promptcache.cache.semantic.scope import SemanticView
from promptcache.cache.semantic.verifier import DEFAULT_LENGTH_RELIEF, required_similarity
from promptcache.cache.tasks import raise_if_cancelled, stop_task

log = logging.getLogger(__name__)

#: What one indexed entry costs in the tier's id -> (namespace, digest) map: a dict entry
#: and a tuple of two strings, measured with tracemalloc over 100k vectors.
REF_BYTES: Final = 330
#: The counts of work the tier skipped rather than wait for (see the module doc).
SKIP_REASONS: Final = ("shed", "deadline", "too_long", "exact_only", "memory")
#: Up to this many records are indexed on the loop (O(1) each); more go in bulk on a thread.
INLINE_ADD = 32


@dataclass(frozen=True, slots=True)
class SemanticPolicy:
    """The tier's thresholds: similarity, temperature, candidates searched, index bound."""

    threshold: float = 0.975
    #: How far the floor falls for long prompts (:func:`~.verifier.required_similarity`).
    length_relief: float = DEFAULT_LENGTH_RELIEF
    max_temperature: float = 1.0
    candidates: int = 4
    #: Bound of this node's index (0 = none). When reached, new vectors are not indexed
    #: here (their entries still answer exact matches) until removals make room.
    max_index_bytes: int = 0  # bounds ``SemanticCache.nbytes``: vectors or codes, and refs
    #: Seconds the embedder's queue may add to a lookup; a lookup that would wait longer
    #: is skipped (a miss) rather than queued.
    wait_budget: float = 0.010
    #: Deadline of one embed or verify call on a lookup (seconds); past it, a miss.
    embed_timeout: float = 1.0
    #: Stored entries waiting for their vector, at most; past it new ones stay exact-only.
    vector_backlog: int = 4096
    #: Seconds without a lookup wanting the model before the backlog is embedded (as long
    #: as a lookup may wait, by default): vectors for storage give way to lookups, yet a
    #: steady trickle of traffic still leaves them gaps to run in.
    background_quiet: float = 0.01
    #: Seconds after which a backlog batch runs whenever the model is idle, even without a
    #: quiet spell (steady traffic would otherwise starve it).
    background_every: float = 0.5


class SemanticHit(NamedTuple):
    """A verified near-duplicate: the entry that answers, how similar its prompt was, and
    the entry's digest (its X-Cache-Key)."""

    entry: Entry
    similarity: float
    digest: str
    text: str = ""  # the entry's prompt (its vector record's text)


class _Queued(NamedTuple):
    """A stored entry waiting for its vector record: its key, its view, when it expires (on
    the tier's clock; inf = never), and its vector if the memo had it (a lookup embedded
    the text) or None (the model must compute it)."""

    key: CacheKey
    view: SemanticView
    expires: float
    vector: np.ndarray | None


class SemanticCache:
    """Near-duplicate lookups over the exact cache's entries: embed, search, fetch, verify.

    :meth:`start` runs the worker that gives stored entries their vectors (:meth:`stop`
    ends it); ``idle_poll`` is how often it checks whether the model is free.
    ``first_stage`` (or :meth:`use_first_stage` later) is the cascade's first stage; it
    filters lookups only once :attr:`first_stage_ready` (every indexed entry has its code).
    """

    def __init__(self, exact: ExactCache, embedder: BatchingEmbedder, index: PartitionedIndex,
                 verifier: CandidateVerifier | None, policy: SemanticPolicy | None = None, *,
                 clock: Callable[[], float] = time.monotonic, idle_poll: float = 0.01,
                 first_stage: FirstStage | None = None) -> None:
        self.exact = exact
        self.embedder = embedder
        self.index = index
        self.first_stage = first_stage
        #: Whether the first stage holds a code for every indexed entry (so it may filter).
        self.first_stage_ready = first_stage is not None
        self.verifier = verifier
        self.policy = policy or SemanticPolicy()
        self._refs: dict[int, tuple[str, str]] = {}  # id -> (namespace, digest)
        self.counts: Counter[str] = Counter()
        self._clock = clock
        self.idle_poll = idle_poll
        # (namespace, digest) -> entry waiting: for the model, or (ready) for Redis only
        self._backlog: OrderedDict[tuple[str, str], _Queued] = OrderedDict()
        self._ready: OrderedDict[tuple[str, str], _Queued] = OrderedDict()
        self._queued = asyncio.Event()  # set while an entry waits (in either queue)
        self._drained = asyncio.Event()  # set while nothing waits for a vector
        self._drained.set()
        self._worker: asyncio.Task[None] | None = None
        self._wanted_at = -math.inf  # when a lookup last wanted the model
        #: Whether the tier is shed for memory (see :meth:`shed_memory`).
        self.memory_shed = False

    @property
    def model(self) -> str:
        """The name of the embedder's vectors; records made by another are re-embedded."""
        return str(getattr(getattr(self.embedder, "embedder", None), "name", ""))

    @property
    def code_model(self) -> str:
        """The name of the first stage's static model ("" without one)."""
        fs = self.first_stage
        return str(getattr(fs.embedder, "name", "")) if fs is not None else ""

    async def use_first_stage(self, first_stage: FirstStage) -> None:
        """Start using ``first_stage`` (made after the index was filled, e.g. when its model
        had to be distilled first): new entries get codes at once, the indexed ones from
        a pass over the store, after which it filters lookups and the in-process index of
        precise vectors is emptied (they are read from the candidates' records)."""
        self.first_stage, self.first_stage_ready = first_stage, False
        await self.rebuild()
        if self.first_stage is first_stage:
            self.first_stage_ready = True
            self.index.remove(self.index.ids())

    def __len__(self) -> int:
        """Entries this node can match (their vectors or codes are indexed)."""
        return len(self._refs)

    def __contains__(self, id_: int) -> bool:
        return id_ in self._refs

    @property
    def nbytes(self) -> int:
        """Bytes of this node's indexes: precise vectors (without a first stage), codes, and
        the map from ids to entries."""
        fs = self.first_stage
        return (self.index.nbytes + (fs.nbytes if fs is not None else 0)
                + len(self._refs) * REF_BYTES)

    async def lookup(self, view: SemanticView, *, threshold: float | None = None,
                     relief: float | None = None) -> SemanticHit | None:
        """The best verified entry of ``view``'s scope, or None. May raise CacheUnavailable.
        ``threshold`` and ``relief`` replace the policy's for this lookup."""
        threshold = self.policy.threshold if threshold is None else threshold
        relief = self.policy.length_relief if relief is None else relief
        cut = threshold - relief  # what a long enough pair needs; shorter ones need more
        self.counts["lookups"] += 1
        if self.memory_shed:
            self.counts["memory"] += 1
            return None
        if not self.embedder.fits(view.text):  # never matched on a prefix: exact-only
            self.counts["too_long"] += 1
            return None
        fs = self.first_stage if self.first_stage_ready else None
        plausible: list[int] = []
        if fs is not None:
            if not fs.scope_size(view.scope):
                return None
            code = fs.codes([view.text])[0]  # a static model: ~1 ms for 2,000 characters
            plausible = [i for i in fs.plausible_code(view.scope, code) if i in self._refs]
            if not plausible:
                self.counts["first_stage_miss"] += 1  # nothing close: the model is not asked
                return None
        elif not self.index.scope_size(view.scope):
            return None
        vector = self.embedder.memoised(view.text)
        if vector is None:
            self._wanted_at = self._clock()
            if self.embedder.expected_wait() > self.policy.wait_budget:
                self.counts["shed"] += 1  # a miss now rather than a wait in the queue
                return None
            try:
                async with asyncio.timeout(self.policy.embed_timeout):
                    vector = await self.embedder.embed(view.text)
            except (EmbedTimeout, TimeoutError):
                self.counts["deadline"] += 1
                return None
        if fs is not None:  # the precise vectors of the plausible few, from their records
            found = [(i, 1.0) for i in plausible]
        else:
            found = [(i, s) for i, s in self.index.search(view.scope, vector,
                                                          self.policy.candidates)
                     if s >= cut and i in self._refs]
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
            if fs is not None:
                if record.model != self.model or record.vector.shape != vector.shape:
                    continue  # another model's vector: not comparable
                similarity = float(np.dot(record.vector, vector))
            if similarity < threshold and similarity < required_similarity(
                    threshold, relief, view.text, record.text):
                continue
            candidates.append((similarity, entry, record))
        if fs is not None:
            candidates.sort(key=lambda c: -c[0])
            del candidates[self.policy.candidates:]
        if not candidates:
            self.counts["below_threshold"] += 1
            return None
        try:
            async with asyncio.timeout(self.policy.embed_timeout):
                verdicts = await self._verify([(view.text, r.text, s) for s, _, r in candidates])
        except (EmbedTimeout, TimeoutError):
            self.counts["deadline"] += 1
            return None
        for (similarity, entry, record), verdict in zip(candidates, verdicts, strict=True):
            if verdict.ok:
                self.counts["hits"] += 1
                await self.exact.touch(record.namespace, record.digest)
                return SemanticHit(entry, similarity, record.digest, record.text)
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
        """Store the entry now; queue it for its vector record (computed, attached and
        indexed by the worker), unless its text is too long to match. Bytes written, or 0."""
        written = await self.exact.put(key, entry, ttl=ttl)
        if written and self.memory_shed:
            self.counts["memory"] += 1
        elif written and self.embedder.fits(view.text):
            ttl_ms = self.exact.ttl_ms(ttl)
            expires = self._clock() + ttl_ms / 1000 if ttl_ms else math.inf
            self._enqueue(_Queued(key, view, expires, self.embedder.memoised(view.text)))
        return written

    def _enqueue(self, item: _Queued) -> None:
        ref = (item.key.namespace, item.key.digest)
        self._ready.pop(ref, None)
        self._backlog.pop(ref, None)  # a re-store goes to the back
        if len(self._backlog) + len(self._ready) >= self.policy.vector_backlog:
            self.counts["exact_only"] += 1
            return
        (self._backlog if item.vector is None else self._ready)[ref] = item
        self._drained.clear()
        self._queued.set()

    async def shed_memory(self) -> None:
        """Memory is over its limit: lookups and stores become exact-only, the entries
        waiting for vectors stay exact-only, and the model is released (its memory and
        the memos go back to the system). The index is kept, to resume with."""
        self.memory_shed = True
        self.counts["memory"] += len(self._backlog) + len(self._ready)
        self._backlog.clear()
        self._ready.clear()
        await self.embedder.pause()

    async def resume_memory(self) -> None:
        """Memory is back under its limit: load the model, then match and index again."""
        await self.embedder.resume()
        self.memory_shed = False

    # -- the vector worker ---------------------------------------------------------------

    def start(self) -> None:
        """Start the worker that gives stored entries their vectors (idempotent)."""
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(
                self._work(), name="promptcache-semantic-vectors")

    async def stop(self) -> None:
        """Stop the worker; entries still queued stay exact-only."""
        await stop_task(self._worker)
        self._worker = None

    async def drain(self) -> None:
        """Wait until every queued entry has its vector attached (or was given up on)."""
        if self._worker is None or self._worker.done():
            raise RuntimeError("the semantic tier's vector worker is not running")
        await self._drained.wait()

    async def _work(self) -> None:
        """Attach the vectors the memo had at once; compute the others at low priority,
        a few at a time, only while the model is idle (lookups come first): after
        ``background_quiet`` without a lookup wanting it, or, so that steady traffic cannot
        starve the backlog, whenever it is idle and no batch has run for ``background_every``
        seconds."""
        last_batch = self._clock()
        while True:
            await self._queued.wait()
            if not (self._backlog or self._ready):
                self._queued.clear()
                self._drained.set()
                last_batch = self._clock()
                continue
            now = self._clock()
            if self._ready:
                batch = self._take(self._ready, self.embedder.background_batch)
            elif self.embedder.idle() and (
                    now - self._wanted_at >= self.policy.background_quiet
                    or now - last_batch >= self.policy.background_every):
                batch = self._take(self._backlog, self.embedder.background_batch)
                last_batch = now
            else:
                await asyncio.sleep(self.idle_poll)
                continue
            try:
                if batch:
                    await self._attach(batch)
            except Exception:  # never let one batch end the worker
                self.counts["vector_failed"] += len(batch)
                log.exception("computing vectors for stored entries failed")
            raise_if_cancelled()  # a Redis call may have swallowed a cancel

    def _take(self, queue: OrderedDict[tuple[str, str], _Queued], n: int) -> list[_Queued]:
        """Up to ``n`` entries of ``queue`` that have not expired yet."""
        now = self._clock()
        batch: list[_Queued] = []
        while queue and len(batch) < n:
            _, item = queue.popitem(last=False)
            if item.expires > now:
                batch.append(item)
            else:
                self.counts["vector_expired"] += 1
        return batch

    async def _attach(self, batch: list[_Queued]) -> None:
        """Attach each entry's vector record (embedding, at low priority, those not known
        yet) if the entry still exists, and index it."""
        missing = [item.view.text for item in batch if item.vector is None]
        computed = iter(await self.embedder.embed_background(missing) if missing else [])
        fs, code_model = self.first_stage, self.code_model
        codes = fs.codes([item.view.text for item in batch]) if fs is not None else None
        for n, item in enumerate(batch):
            key, view = item.key, item.view
            vector = item.vector if item.vector is not None else next(computed)
            record = VectorRecord(view.scope, view.text, vector, key.namespace, key.digest,
                                  self.model, codes[n].tobytes() if codes is not None else b"",
                                  code_model)
            try:
                attached = await self.exact.attach_vector(key.namespace, key.digest,
                                                          record.encode())
            except CacheUnavailable:
                self.counts["vector_failed"] += 1
                continue
            if attached:
                self.counts["vectors_attached"] += 1
                self._index(record)
            else:  # purged, evicted or expired meanwhile (or no room): never resurrected
                self.counts["vector_gone"] += 1

    def _index(self, record: VectorRecord, *, count_full: bool = True) -> bool:
        """Add ``record`` to the index (and its code to the first stage), unless the index
        is at its bound. O(1): the index buffers it (see :mod:`.index`)."""
        id_ = vector_id(record.digest)
        limit = self.policy.max_index_bytes
        if limit and id_ not in self._refs and self.nbytes >= limit:
            self.counts["index_full"] += count_full
            return False
        ids = np.array([id_], dtype=np.int64)
        if not self.first_stage_ready:  # else the first stage finds, the records' vectors rank
            self.index.add(record.scope, ids, record.vector[None, :])
        self._refs[id_] = (record.namespace, record.digest)
        fs = self.first_stage
        if fs is not None:
            if len(record.code) == CODE_BYTES and record.code_model == self.code_model:
                code = np.frombuffer(record.code, np.uint8)
            else:
                code = fs.codes([record.text])[0]
                self.counts["codes_computed"] += 1
            fs.add_codes(record.scope, ids, code[None, :])
        return True

    async def add_records(self, raw: Sequence[bytes | None], *, count_full: bool = True
                          ) -> int:
        """Index encoded vector records (None, gone since, are skipped); return how many.

        A record made by another embedder (another model or tuning, or a record from before
        records named their model) is embedded again from its text: its vector means
        nothing in this index.
        """
        return await self._add_decoded(_decode_records(raw), count_full=count_full)

    async def _add_decoded(self, records: list[VectorRecord], *, count_full: bool = True,
                           replace: bool = True) -> int:
        """Index ``records`` in bulk: re-embed those of another model, compute first-stage
        codes that are missing (both off the loop), and add them per scope on a thread.
        With ``replace=False`` ids already indexed are left as they are."""
        stale = [n for n, r in enumerate(records) if r.model != self.model]
        if stale and self.memory_shed:  # no model to embed them with: not indexed
            self.counts["memory"] += len(stale)
            records = [r for r in records if r.model == self.model]
        elif stale:
            vectors = await self.embedder.embed_many([records[n].text for n in stale])
            for n, vector in zip(stale, vectors, strict=True):
                records[n] = dataclasses.replace(records[n], vector=vector, model=self.model)
            self.counts["reembedded"] += len(stale)
            if self.first_stage is not None:  # lookups read the candidates' records
                await self._write_back([records[n] for n in stale])
        if len(records) <= INLINE_ADD:  # a change event: O(1) adds, codes stored with them
            return sum(self._index(r, count_full=count_full) for r in records)
        limit = self.policy.max_index_bytes
        if limit:  # room left, in records (a new one costs at least its code or its floats)
            least = REF_BYTES + (CODE_BYTES if self.first_stage_ready
                                 else 4 * records[0].vector.size)
            room = max(0, limit - self.nbytes) // least + 1
            fresh = [r for r in records if vector_id(r.digest) not in self._refs]
            if len(fresh) > room:
                dropped = {id(r) for r in fresh[room:]}
                records = [r for r in records if id(r) not in dropped]
                self.counts["index_full"] += count_full * len(dropped)
        codes = await asyncio.to_thread(self._codes_of, records)
        by_scope: dict[str, list[int]] = {}
        for n, record in enumerate(records):
            by_scope.setdefault(record.scope, []).append(n)
        for scope, members in by_scope.items():
            ids = np.array([vector_id(records[n].digest) for n in members], dtype=np.int64)
            vectors = np.stack([records[n].vector for n in members]).astype(np.float32)
            if not self.first_stage_ready:
                await asyncio.to_thread(self.index.add_many, scope, ids, vectors,
                                        replace=replace)
            if codes is not None and self.first_stage is not None:
                self.first_stage.add_codes(scope, ids, codes[members])
            for n in members:
                self._refs[vector_id(records[n].digest)] = (records[n].namespace,
                                                           records[n].digest)
        return len(records)

    async def _write_back(self, records: list[VectorRecord]) -> None:
        """Store re-embedded records (with their codes) in place of the old ones, where the
        entry still exists."""
        codes = await asyncio.to_thread(self._codes_of, records)
        for n, record in enumerate(records):
            if codes is not None:
                record = dataclasses.replace(record, code=codes[n].tobytes(),
                                             code_model=self.code_model)
            try:
                await self.exact.attach_vector(record.namespace, record.digest,
                                               record.encode())
            except CacheUnavailable:
                self.counts["vector_failed"] += 1

    def _codes_of(self, records: list[VectorRecord]) -> np.ndarray | None:
        """(n, CODE_BYTES) first-stage codes of ``records``: stored ones if the same static
        model made them, else computed (blocking: on a thread). None without a first stage."""
        fs, code_model = self.first_stage, self.code_model
        if fs is None:
            return None
        codes = np.zeros((len(records), CODE_BYTES), np.uint8)
        missing = []
        for n, record in enumerate(records):
            if len(record.code) == CODE_BYTES and record.code_model == code_model:
                codes[n] = np.frombuffer(record.code, np.uint8)
            else:
                missing.append(n)
        if missing:
            codes[missing] = fs.codes([records[n].text for n in missing])
            self.counts["codes_computed"] += len(missing)
        return codes

    def forget_digests(self, digests: Sequence[str]) -> None:
        self._forget_ids([vector_id(d) for d in digests])

    def forget(self, id_: int) -> None:
        self._forget_ids([id_])

    def _forget_ids(self, ids: list[int]) -> None:
        array = np.array(ids, dtype=np.int64)
        self.index.remove(array)
        if self.first_stage is not None:
            self.first_stage.remove(array)
        for id_ in ids:
            self._refs.pop(id_, None)

    async def rebuild(self, shard: int | None = None, batch: int = 4096, *,
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
            loaded += await self._add_decoded(records, replace=False)
        gone = [i for i in covered if i not in found]
        if gone:
            self._forget_ids(gone)
            self.counts["dropped_at_rebuild"] += len(gone)
        log.info("semantic index rebuilt from Redis: %d vectors loaded, %d dropped",
                 loaded, len(gone))
        return loaded

    def stats(self) -> dict[str, Any]:
        fs = self.first_stage
        first = ({**fs.stats(), "first_stage_bytes": fs.nbytes,
                  "first_stage_ready": self.first_stage_ready} if fs is not None else {})
        return {**self.index.stats(), **first, **dict(self.counts),
                "vector_backlog": len(self._backlog) + len(self._ready),
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
