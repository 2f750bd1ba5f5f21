"""Vector indexes (FAISS), one per scope, kept current at O(1) or O(log n) per change.

:class:`VectorIndex` is the seam; three kinds implement it, all on inner product over
unit vectors (= cosine similarity):

- ``flat``: exact search (``IndexFlatIP``), 4 bytes per dimension; best below ~20k vectors.
- ``sq8``: exact scan over 8-bit scalar-quantized codes, 1 byte per dimension (4x smaller),
  a small loss of precision in the scores.
- ``hnsw``: an HNSW graph over float vectors, sub-linear search for large caches.

Each is a FAISS index addressed by position, with the ids beside it (position -> id array,
id -> position dict, a bitmap of live positions). Removing or re-adding an id never asks
FAISS to delete (HNSW cannot): the old position is tombstoned (its bit cleared; searches
hand the bitmap to FAISS as an ``IDSelectorBitmap``, so a removed id is never returned)
and a re-added vector is appended. Past a quarter of tombstones the index is compacted.

:class:`PartitionedIndex` keeps one partition per scope (tenant, namespace, model,
parameters, earlier turns...), so a search only ever sees candidates of its own scope: a
busy scope can never crowd a valid match out of a quiet one's results. With
``kind="auto"`` a partition starts flat and becomes HNSW past ``hnsw_threshold`` vectors.

Upkeep. A partition is a *main* index of one kind plus a *fresh* buffer. ``add`` appends
to the buffer (searched exactly, beside the main index) and returns: it never waits for
FAISS. One upkeep thread moves buffered vectors into the main index, about
``MERGE_SLICE_S`` of work at a time (its FAISS calls use ``upkeep_threads`` OpenMP
threads, one by default, leaving the other cores to requests). Kind switches and
compactions build a new main index on a builder thread from the old one's live vectors
while searches keep using the old one; removals made meanwhile are replayed onto the new
one (adds wait in the buffer, merged after), then it replaces the old one. Threads exit
when idle; :meth:`PartitionedIndex.close` stops them.

Locking, always taken in this order (a thread holding one never waits for an earlier one):

1. ``PartitionedIndex._lock`` (writers): the scope map and the partitions; held by
   ``add``/``remove`` for bookkeeping of their own ids only.
2. ``Partition.search_lock``: the main FAISS index. Held by a search (one FAISS search,
   O(log n) for HNSW, a scan for flat and sq8, plus the scan of the fresh buffer), by the
   upkeep thread for one merge slice, and for a swap.
3. ``Partition.state``: ids, bitmap, buffer rows; held only for O(1) work per id.

``add`` and ``remove`` take 1 and 3, never 2: a search or a merge never delays them.
Byte totals are kept running under a leaf lock. Every method of :class:`PartitionedIndex`
may be called from any thread; ``search`` may wait up to one merge slice, ``add_many``
waits for the upkeep to drain its backlog (call both off the event loop). The standalone
kinds of :func:`make_index` are not thread-safe.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Literal

import faiss
import numpy as np

from promptcache.cache.protocols import VectorIndex

log = logging.getLogger(__name__)

IndexKind = Literal["flat", "sq8", "hnsw"]
KINDS: tuple[str, ...] = ("auto", "flat", "sq8", "hnsw")
#: Component range covered by the 8-bit quantizer: a unit vector never leaves [-1, 1].
SQ8_RANGE = 1.0
#: ``auto`` switches a scope's partition from flat to HNSW at this many vectors.
AUTO_HNSW_AT = 20_000
#: Compact an index once this share of its positions are tombstones.
COMPACT_AT = 0.25
#: Estimated bytes of one entry of a Python dict from an int id (key, value, slot).
ID_MAP_BYTES = 100
#: Work the upkeep thread does per hold of a partition's search lock (seconds).
MERGE_SLICE_S = 0.002
#: Most vectors ``add_many`` leaves waiting in a partition's fresh buffer.
ADD_MANY_BACKLOG = 8192
#: The upkeep merges once writes have paused this long (or the backlog is large).
WRITE_QUIET_S = 0.002
#: An idle upkeep thread exits after this long (seconds).
IDLE_EXIT_S = 1.0
#: Most failed builds of a partition before its upkeep stops trying (it stays as it is).
MAX_BUILD_FAILURES = 3
_BUILD_CHUNK = 4096
#: Rows a fresh buffer starts with; a drained buffer larger than twice this is freed.
FRESH_MIN_ROWS = 8
_WRITE_SLICE = 256


class _PositionalIndex:
    """A FAISS index addressed by position, with ids, tombstones and selector search.

    Standalone (``compact_at`` set) it compacts itself in place when tombstones pass that
    share; inside a partition (``compact_at=None``) the partition compacts it off-thread.
    """

    kind = "flat"

    def __init__(self, dim: int, *, compact_at: float | None = COMPACT_AT) -> None:
        self.dim, self.compact_at = dim, compact_at
        self.index = self._make()
        self._ids = np.zeros(0, np.int64)  # position -> id (capacity >= slots)
        self._bits = np.zeros(0, np.uint8)  # live positions, bit p % 8 of byte p // 8
        self._pos: dict[int, int] = {}  # live id -> position

    def _make(self) -> faiss.Index:
        return faiss.IndexFlatIP(self.dim)

    def empty(self) -> _PositionalIndex:
        """A new empty index of the same kind and parameters, compacted by its owner."""
        return type(self)(self.dim, compact_at=None)

    @property
    def slot_bytes(self) -> int:
        """Bytes one position holds: the FAISS code, its id, its bit."""
        return self.dim * 4 + 8

    @property
    def slots(self) -> int:
        return int(self.index.ntotal)

    @property
    def dead(self) -> int:
        return self.slots - len(self._pos)

    def __len__(self) -> int:
        return len(self._pos)

    def __contains__(self, id_: int) -> bool:
        return id_ in self._pos

    # -- VectorIndex -------------------------------------------------------------------

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors; an id already held is replaced (tombstoned, then appended)."""
        ids, vectors = _last_wins(_i64(ids), _f32(vectors))
        self.tombstone(ids)
        self.append(ids, vectors)
        self._maybe_compact()

    def remove(self, ids: np.ndarray) -> int:
        removed = self.tombstone(_i64(ids))
        self._maybe_compact()
        return removed

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (n, k) with k at most the live count; missing ids are -1."""
        queries = _f32(vectors)
        if not self._pos:
            return _nothing(len(queries))
        k = max(1, min(k, len(self._pos)))
        bits = self._bits  # kept referenced for the selector's lifetime
        params = self._params(k, bits if self.dead else None)
        scores, labels = self.index.search(queries, k, params=params)
        ids = np.where(labels >= 0, self._ids[np.maximum(labels, 0)], -1)
        return scores, ids

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        positions = self.live_positions()
        return self._ids[positions].copy(), self.reconstruct(positions)

    @property
    def nbytes(self) -> int:
        return self.slots * self.slot_bytes + len(self._pos) * ID_MAP_BYTES

    # -- building blocks of partitions ---------------------------------------------------

    def _params(self, k: int, bits: np.ndarray | None) -> faiss.SearchParameters | None:
        if bits is None:
            return None
        params = faiss.SearchParameters()
        params.sel = faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits))
        return params

    def append(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Append vectors of ids not held (the caller tombstones replaced ones first)."""
        start = self.slots
        if len(ids):
            self.index.add(vectors)
            self.register(start, ids)

    def register(self, start: int, ids: np.ndarray) -> None:
        """Record ``ids`` at positions ``start...`` (vectors already added to FAISS)."""
        end = start + len(ids)
        if end > len(self._ids):
            size = max(64, end, 2 * len(self._ids))
            self._ids = np.concatenate([self._ids, np.zeros(size - len(self._ids), np.int64)])
            bits = np.zeros((size + 7) // 8, np.uint8)
            bits[: len(self._bits)] = self._bits
            self._bits = bits
        self._ids[start:end] = ids
        positions = np.arange(start, end)
        np.bitwise_or.at(self._bits, positions >> 3, (1 << (positions & 7)).astype(np.uint8))
        self._pos.update(zip(ids.tolist(), positions.tolist(), strict=True))

    def tombstone(self, ids: np.ndarray) -> int:
        """Clear the positions of ``ids``; O(1) each. Returns how many were held."""
        found = []
        for id_ in ids.tolist():
            position = self._pos.pop(id_, None)
            if position is not None:
                found.append(position)
        if found:
            positions = np.array(found, np.int64)
            np.bitwise_and.at(self._bits, positions >> 3,
                              (~(1 << (positions & 7)) & 0xFF).astype(np.uint8))
        return len(found)

    def live_positions(self) -> np.ndarray:
        bits = np.unpackbits(self._bits, bitorder="little")[: self.slots]
        return np.flatnonzero(bits).astype(np.int64)

    def reconstruct(self, positions: np.ndarray) -> np.ndarray:
        if not len(positions):
            return np.zeros((0, self.dim), np.float32)
        return np.asarray(self.index.reconstruct_batch(positions), np.float32)

    def _maybe_compact(self) -> None:
        if self.compact_at is not None and self.dead > self.compact_at * self.slots:
            ids, vectors = self.vectors()
            self.index = self._make()
            self._ids, self._bits, self._pos = np.zeros(0, np.int64), np.zeros(0, np.uint8), {}
            self.append(ids, vectors)


class FlatIndex(_PositionalIndex):
    """Exact inner-product search over float vectors (4 bytes a dimension)."""

    kind = "flat"


class SQ8Index(_PositionalIndex):
    """Exact search over 8-bit scalar-quantized codes (1 byte a dimension)."""

    kind = "sq8"

    def _make(self) -> faiss.Index:
        index = faiss.IndexScalarQuantizer(self.dim, faiss.ScalarQuantizer.QT_8bit,
                                           faiss.METRIC_INNER_PRODUCT)
        bounds = np.vstack([np.full(self.dim, -SQ8_RANGE), np.full(self.dim, SQ8_RANGE)])
        index.train(bounds.astype(np.float32))  # fixed range: no data needed to start
        return index

    @property
    def slot_bytes(self) -> int:
        return self.dim + 8


class HNSWIndex(_PositionalIndex):
    """An HNSW graph; removed vectors stay in the graph as tombstones until compaction."""

    kind = "hnsw"

    def __init__(self, dim: int, *, m: int = 32, ef_search: int = 64,
                 ef_construction: int = 80, compact_at: float | None = COMPACT_AT) -> None:
        self.m, self.ef_search, self.ef_construction = m, ef_search, ef_construction
        super().__init__(dim, compact_at=compact_at)

    def _make(self) -> faiss.Index:
        hnsw = faiss.IndexHNSWFlat(self.dim, self.m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efSearch = self.ef_search
        hnsw.hnsw.efConstruction = self.ef_construction
        return hnsw

    def empty(self) -> HNSWIndex:
        return HNSWIndex(self.dim, m=self.m, ef_search=self.ef_search,
                         ef_construction=self.ef_construction, compact_at=None)

    @property
    def slot_bytes(self) -> int:
        # float vector + 2*M level-0 neighbours (4 bytes) + level and offsets + id
        return self.dim * 4 + self.m * 2 * 4 + 12 + 8

    def _params(self, k: int, bits: np.ndarray | None) -> faiss.SearchParameters | None:
        if bits is None and k <= self.ef_search:
            return None
        params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]
        params.efSearch = max(self.ef_search, k)
        if bits is not None:
            params.sel = faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits))
        return params


_CLASSES: dict[str, type[_PositionalIndex]] = {"flat": FlatIndex, "sq8": SQ8Index,
                                               "hnsw": HNSWIndex}


def make_index(kind: str, dim: int) -> VectorIndex:
    """A standalone index of ``kind`` (not thread-safe; compacts itself in place)."""
    return _positional(kind, dim, compact_at=COMPACT_AT)


def _positional(kind: str, dim: int, *, compact_at: float | None = None) -> _PositionalIndex:
    if kind not in _CLASSES:
        raise ValueError(f"unknown index kind {kind!r} (one of {', '.join(KINDS)})")
    return _CLASSES[kind](dim, compact_at=compact_at)


class _Fresh:
    """Vectors not yet in the main index, searched exactly.

    Rows are written once: removal clears a flag and growth copies into new arrays, and
    rows are reused only by :meth:`take` (under the partition's search lock). So a search
    holding that lock may scan a snapshot of the arrays without the state lock.
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.vecs = np.zeros((0, dim), np.float32)
        self.ids = np.zeros(0, np.int64)
        self.live = np.zeros(0, bool)
        self.head = self.n = 0  # rows before head are all dead; rows from n are unused
        self.row: dict[int, int] = {}  # live id -> row

    def __len__(self) -> int:
        return len(self.row)

    def __contains__(self, id_: int) -> bool:
        return id_ in self.row

    @property
    def nbytes(self) -> int:
        return len(self.ids) * (self.dim * 4 + 9) + len(self.row) * ID_MAP_BYTES

    def put(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Append ``ids`` (none held here: the caller drops replaced ones first)."""
        end = self.n + len(ids)
        if end > len(self.ids):
            self._regrow(len(ids))
            end = self.n + len(ids)
        self.vecs[self.n : end] = vectors
        self.ids[self.n : end] = ids
        self.live[self.n : end] = True
        self.row.update(zip(ids.tolist(), range(self.n, end), strict=True))
        self.n = end

    def _regrow(self, extra: int) -> None:
        """New arrays holding the live rows, with room for ``extra`` more (amortised O(1))."""
        rows = np.flatnonzero(self.live[self.head : self.n]) + self.head
        size = max(FRESH_MIN_ROWS, 2 * (len(rows) + extra))
        vecs, ids, live = (np.zeros((size, self.dim), np.float32), np.zeros(size, np.int64),
                           np.zeros(size, bool))
        vecs[: len(rows)], ids[: len(rows)] = self.vecs[rows], self.ids[rows]
        live[: len(rows)] = True
        self.vecs, self.ids, self.live = vecs, ids, live
        self.head, self.n = 0, len(rows)
        self.row = dict(zip(ids[: len(rows)].tolist(), range(len(rows)), strict=True))

    def drop(self, id_: int) -> bool:
        row = self.row.pop(id_, None)
        if row is None:
            return False
        self.live[row] = False
        return True

    def take(self, most: int) -> tuple[np.ndarray, np.ndarray]:
        """Remove and return up to ``most`` live rows, oldest first (search lock held)."""
        rows = np.flatnonzero(self.live[self.head : self.n])[:most] + self.head
        ids, vecs = self.ids[rows].copy(), self.vecs[rows].copy()
        self.live[rows] = False
        for id_ in ids.tolist():
            del self.row[id_]
        self.head = int(rows[-1]) + 1 if len(rows) == most else self.n
        if self.head == self.n:
            self.head = self.n = 0  # no scan runs now: rows may be reused
            if len(self.ids) > 2 * FRESH_MIN_ROWS:  # an idle scope keeps (almost) nothing
                self.vecs, self.ids, self.live = (np.zeros((0, self.dim), np.float32),
                                                  np.zeros(0, np.int64), np.zeros(0, bool))
        return ids, vecs

    def snapshot(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(vectors, ids, live) of the rows in use, as views (state lock held)."""
        return (self.vecs[self.head : self.n], self.ids[self.head : self.n],
                self.live[self.head : self.n])


def _scan(snapshot: tuple[np.ndarray, np.ndarray, np.ndarray], queries: np.ndarray, k: int
          ) -> tuple[np.ndarray, np.ndarray]:
    """Exact search of the fresh rows (FAISS's SIMD scan: one thread, no BLAS threads)."""
    vecs, ids, live = snapshot
    alive = live.copy()
    count = int(alive.sum())
    if not count:
        return _nothing(len(queries))
    k = min(k, count)
    vecs = np.ascontiguousarray(vecs)
    scores = np.empty((len(queries), k), np.float32)
    rows = np.empty((len(queries), k), np.int64)
    args = [faiss.swig_ptr(queries), faiss.swig_ptr(vecs), vecs.shape[1], len(queries),
            len(vecs), k, faiss.swig_ptr(scores), faiss.swig_ptr(rows)]
    if count < len(alive):
        bits = np.packbits(alive, bitorder="little")
        selector = faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits))
        faiss.knn_inner_product(*args, selector)  # type: ignore[call-arg]
    else:
        faiss.knn_inner_product(*args)
    return scores, np.where(rows >= 0, ids[np.maximum(rows, 0)], -1)


class Partition:
    """One scope: a main index, a fresh buffer, and the ids moving between them."""

    def __init__(self, main: _PositionalIndex, account: Callable[[int], None]) -> None:
        self.main = main
        self.fresh = _Fresh(main.dim)
        self.search_lock = threading.Lock()
        self.state = threading.Lock()
        self.moving: set[int] = set()  # taken from fresh, being added to main
        self.cancelled: set[int] = set()  # moving ids removed or replaced meanwhile
        self.journal: set[int] | None = None  # ids removed from main during a build
        self.building = self.dropped = False
        self.builds = self.failures = 0
        self.merge_batch = _first_batch(main)
        self._account = account
        self._bytes = 0

    @property
    def kind(self) -> str:
        return self.main.kind

    @property
    def dim(self) -> int:
        return self.main.dim

    def __len__(self) -> int:
        return len(self.main) + len(self.fresh) + len(self.moving)

    def backlog(self) -> int:
        return len(self.fresh)

    def count_bytes(self) -> int:
        return self.main.nbytes + self.fresh.nbytes

    def _reaccount(self) -> None:  # state held
        now = 0 if self.dropped else self.count_bytes()
        if now != self._bytes:
            self._account(now - self._bytes)
            self._bytes = now

    # -- writers (state lock only) -------------------------------------------------------

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids, vectors = _last_wins(_i64(ids), _f32(vectors))
        with self.state:
            self._forget(ids)
            self.fresh.put(ids, vectors)
            self._reaccount()

    def remove(self, ids: np.ndarray) -> int:
        with self.state:
            removed = self._forget(_i64(ids))
            self._reaccount()
        return removed

    def _forget(self, ids: np.ndarray) -> int:
        count, in_main = 0, []
        for id_ in ids.tolist():
            if id_ in self.main:
                in_main.append(id_)
            elif self.fresh.drop(id_):
                count += 1
            elif id_ in self.moving:
                self.moving.discard(id_)
                self.cancelled.add(id_)
                count += 1
        if in_main:
            count += self.main.tombstone(np.array(in_main, np.int64))
            if self.journal is not None:
                self.journal.update(in_main)
        return count

    def drop(self) -> None:
        with self.state:
            self.dropped = True
            self._reaccount()

    # -- readers -------------------------------------------------------------------------

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = _f32(vectors)
        with self.search_lock:
            main_scores, main_ids = self.main.search(queries, k)
            with self.state:
                snapshot = self.fresh.snapshot()
            fresh_scores, fresh_ids = _scan(snapshot, queries, k)
        scores = np.hstack([main_scores, fresh_scores])
        ids = np.hstack([main_ids, fresh_ids])
        scores = np.where(ids >= 0, scores, -np.inf)
        k = max(1, min(k, scores.shape[1]))
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        scores, ids = np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)
        return np.where(ids >= 0, scores, 0).astype(np.float32), ids

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        with self.search_lock, self.state:
            ids, vectors = self.main.vectors()
            rows = np.flatnonzero(self.fresh.live[: self.fresh.n])
            return (np.concatenate([ids, self.fresh.ids[rows]]),
                    np.vstack([vectors, self.fresh.vecs[rows]]))

    @property
    def nbytes(self) -> int:
        return self._bytes

    # -- upkeep (the upkeep and builder threads) -----------------------------------------

    def merge_slice(self) -> bool:
        """Move a slice of the fresh buffer into the main index; True if more is left."""
        with self.search_lock:
            if self.building or self.dropped:
                return False
            with self.state:
                ids, vectors = self.fresh.take(self.merge_batch)
                self.moving.update(ids.tolist())
            if not len(ids):
                return False
            started = time.perf_counter()
            start = self.main.slots
            try:
                self.main.index.add(vectors)
            except BaseException:  # put them back: nothing is lost (FAISS adds all or none)
                with self.state:
                    keep = np.array([i not in self.cancelled for i in ids.tolist()], bool)
                    self.fresh.put(ids[keep], vectors[keep])
                    self.moving.clear()
                    self.cancelled.clear()
                raise
            elapsed = time.perf_counter() - started
            with self.state:
                self.main.register(start, ids)
                if self.cancelled:
                    self.main.tombstone(np.array(list(self.cancelled), np.int64))
                self.moving.clear()
                self.cancelled.clear()
                self._reaccount()
                more = bool(len(self.fresh))
        scale = MERGE_SLICE_S / max(elapsed, 1e-6)
        self.merge_batch = int(min(4096, max(1, self.merge_batch * min(2.0, max(0.5, scale)))))
        return more

    def begin_build(self) -> bool:
        with self.search_lock, self.state:
            if self.building or self.dropped:
                return False
            self.building, self.journal = True, set()
            return True

    def build(self, new: _PositionalIndex, stop: Callable[[], bool]) -> bool:
        """Fill ``new`` from the live vectors of the main index, replay the removals made
        meanwhile, and swap it in. Returns False if stopped (``stop()``) or dropped."""
        try:
            old = self.main  # replaced only here, and no merge runs while building
            positions = old.live_positions()  # removals after this are in the journal
            for at in range(0, len(positions), _BUILD_CHUNK):
                if stop():
                    return False
                chunk = positions[at : at + _BUILD_CHUNK]
                new.append(old._ids[chunk], old.reconstruct(chunk))
            with self.search_lock, self.state:
                if self.dropped:
                    return False
                assert self.journal is not None
                new.tombstone(np.array(list(self.journal), np.int64))
                self.main = new
                self.merge_batch = _first_batch(new)
                self.builds += 1
                self._reaccount()
            return True
        finally:
            with self.state:
                self.building, self.journal = False, None


class PartitionedIndex:
    """One vector index per scope; ``kind="auto"`` picks flat or HNSW by partition size.

    Writers (``add``, ``add_many``, ``remove``) cost O(1) per id plus an amortised copy
    into the fresh buffer; the FAISS work runs on an upkeep thread (see the module
    docstring for the threads and the locking).
    """

    def __init__(self, dim: int, kind: str = "auto", *, hnsw_threshold: int = AUTO_HNSW_AT,
                 compact_at: float = COMPACT_AT, upkeep_threads: int = 1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r} (one of {', '.join(KINDS)})")
        self.dim, self.kind, self.hnsw_threshold = dim, kind, hnsw_threshold
        self.compact_at = compact_at
        #: OpenMP threads of the upkeep and builder threads' FAISS calls: by default one,
        #: so background work leaves the other cores to requests.
        self.upkeep_threads = upkeep_threads
        self._parts: dict[str, Partition] = {}
        self._scope_of: dict[int, str] = {}
        self._lock = threading.Lock()
        self._bytes_lock = threading.Lock()
        self._bytes = 0
        self._work = threading.Condition()  # guards everything below; a leaf lock
        self._queue: dict[int, Partition] = {}
        self._worker: threading.Thread | None = None
        self._busy = False
        self._builds = 0
        self._closed = False
        self._clock = clock
        self._last_write = -1e9  # when add or remove last ran (the upkeep lets bursts pass)

    def __len__(self) -> int:
        return len(self._scope_of)

    def __contains__(self, id_: int) -> bool:
        return id_ in self._scope_of

    def ids(self) -> np.ndarray:
        """Every indexed id (a copy)."""
        with self._lock:
            return np.fromiter(self._scope_of, dtype=np.int64, count=len(self._scope_of))

    def partitions(self) -> Iterator[tuple[str, Partition]]:
        return iter(list(self._parts.items()))

    # -- writers -------------------------------------------------------------------------

    def add(self, scope: str, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Index ``vectors`` under ``ids`` in ``scope``; a held id is replaced (moved from
        another scope if need be). Never waits for FAISS; a kind switch it triggers runs
        in the background."""
        ids, vectors = _last_wins(_i64(ids), _f32(vectors))
        if not len(ids):
            return
        self._last_write = self._clock()
        with self._lock:
            before = len(self._scope_of)
            moved = [i for i in ids.tolist() if self._scope_of.get(i, scope) != scope]
            if moved:
                self._remove_locked(np.array(moved, np.int64))
            part = self._parts.get(scope)
            if part is None:
                part = self._parts[scope] = Partition(
                    _positional(self._initial_kind(), self.dim), self._account)
            part.add(ids, vectors)
            self._scope_of.update(dict.fromkeys(ids.tolist(), scope))
            self._account((len(self._scope_of) - before) * ID_MAP_BYTES)
        self._schedule(part)

    def add_many(self, scope: str, ids: np.ndarray, vectors: np.ndarray, *,
                 replace: bool = True, backlog: int = ADD_MANY_BACKLOG) -> int:
        """Bulk :meth:`add` for start-up and gap rebuilds: blocking (call it on a thread),
        it waits while more than ``backlog`` of the scope's vectors await the upkeep, so a
        large load never leaves searches scanning a large buffer. With ``replace=False``
        ids already indexed in ``scope`` are kept as they are (a rebuild re-reading
        records already indexed re-adds nothing). Returns how many vectors were added."""
        ids, vectors = _last_wins(_i64(ids), _f32(vectors))
        if not replace:
            keep = np.array([self._scope_of.get(i) != scope for i in ids.tolist()], bool)
            ids, vectors = ids[keep], vectors[keep]
        for at in range(0, len(ids), _WRITE_SLICE):  # short holds of the writer lock
            self.add(scope, ids[at : at + _WRITE_SLICE], vectors[at : at + _WRITE_SLICE])
            part = self._parts.get(scope)
            if part is not None and part.backlog() > backlog:
                self._wait_backlog(part, backlog)
        return len(ids)

    def _wait_backlog(self, part: Partition, backlog: int) -> None:
        def drained() -> bool:
            return self._closed or part.dropped or part.backlog() <= backlog

        with self._work:
            self._work.wait_for(drained)

    def remove(self, ids: np.ndarray) -> int:
        """Forget ``ids`` (unknown ones are ignored); returns how many were indexed."""
        ids, removed = _i64(ids), 0
        self._last_write = self._clock()
        for at in range(0, len(ids), _WRITE_SLICE):  # short holds of the writer lock
            with self._lock:
                before = len(self._scope_of)
                removed += self._remove_locked(ids[at : at + _WRITE_SLICE])
                self._account((len(self._scope_of) - before) * ID_MAP_BYTES)
        return removed

    def _remove_locked(self, ids: np.ndarray) -> int:
        by_scope: dict[str, list[int]] = {}
        for i in ids.tolist():
            scope = self._scope_of.pop(i, None)
            if scope is not None:
                by_scope.setdefault(scope, []).append(i)
        removed = 0
        for scope, members in by_scope.items():
            part = self._parts[scope]
            removed += part.remove(np.array(members, dtype=np.int64))
            if not len(part):
                del self._parts[scope]
                part.drop()
            elif part.main.dead > self.compact_at * part.main.slots:
                self._schedule(part)
        return removed

    def _initial_kind(self) -> str:
        return "flat" if self.kind == "auto" else self.kind

    def _account(self, delta: int) -> None:
        with self._bytes_lock:
            self._bytes += delta

    # -- readers -------------------------------------------------------------------------

    def search(self, scope: str, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        """The ``k`` nearest (id, similarity) of ``scope``, best first."""
        part = self._parts.get(scope)
        if part is None:
            return []
        scores, ids = part.search(vector.reshape(1, -1), k)
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]

    def scope_size(self, scope: str) -> int:
        part = self._parts.get(scope)
        return len(part) if part is not None else 0

    @property
    def nbytes(self) -> int:
        """Bytes held (running total: tombstones count until compacted)."""
        return self._bytes

    def recount_bytes(self) -> int:
        """:attr:`nbytes` recomputed from every partition (O(partitions), for checks)."""
        total = len(self._scope_of) * ID_MAP_BYTES
        for part in list(self._parts.values()):
            with part.state:
                total += part.count_bytes()
        return total

    def stats(self) -> dict[str, int]:
        kinds: dict[str, int] = {}
        unmerged = builds = 0
        for p in list(self._parts.values()):
            kinds[p.kind] = kinds.get(p.kind, 0) + len(p)
            unmerged += p.backlog()
            builds += p.builds
        return {"vectors": len(self), "partitions": len(self._parts), "bytes": self.nbytes,
                "index_unmerged": unmerged, "index_builds": builds,
                **{f"vectors_{k}": v for k, v in kinds.items()}}

    # -- upkeep --------------------------------------------------------------------------

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every buffered vector is merged and no build runs; False on timeout."""
        with self._work:
            return self._work.wait_for(
                lambda: self._closed or (not self._queue and not self._busy
                                         and not self._builds), timeout)

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop the upkeep: builds in progress are abandoned at their next chunk. The index
        still answers (vectors added later stay in the fresh buffers)."""
        with self._work:
            self._closed = True
            self._queue.clear()
            self._work.notify_all()
            self._work.wait_for(lambda: self._worker is None and not self._builds, timeout)

    def _schedule(self, part: Partition) -> None:
        with self._work:
            if self._closed:
                return
            self._queue[id(part)] = part
            if self._worker is None:
                self._worker = threading.Thread(target=self._upkeep, daemon=True,
                                                name="promptcache-index-upkeep")
                self._worker.start()
            self._work.notify_all()

    def _upkeep(self) -> None:
        faiss.omp_set_num_threads(self.upkeep_threads)  # this thread's own setting
        while True:
            with self._work:
                while not self._queue and not self._closed:
                    if not self._work.wait(IDLE_EXIT_S) and not self._queue:
                        break
                if self._closed or not self._queue:
                    self._worker = None
                    self._work.notify_all()
                    return
                key = next(iter(self._queue))
                part = self._queue.pop(key)
                self._busy = True
                self._let_writes_pass(part)
            try:
                more = self._tend(part)
            except Exception:  # never let one partition stop the upkeep of the others
                log.exception("index upkeep failed for a partition")
                more = False
            with self._work:
                self._busy = False
                if more and not self._closed:
                    self._queue.setdefault(key, part)
                self._work.notify_all()

    def _let_writes_pass(self, part: Partition) -> None:  # self._work held
        """Merge between bursts of writes, not during them: a merge slice's return from
        FAISS takes the GIL from the writer's thread. A backlog past ``ADD_MANY_BACKLOG``
        is merged regardless."""
        while not self._closed and part.backlog() < ADD_MANY_BACKLOG:
            quiet = WRITE_QUIET_S - (self._clock() - self._last_write)
            if quiet <= 0:
                return
            self._work.wait(quiet)

    def _tend(self, part: Partition) -> bool:
        """One step of upkeep for ``part``: start a build it needs, or merge a slice."""
        if part.dropped or part.building:
            return False
        kind = self._wanted_build(part)
        if kind is not None and part.begin_build():
            with self._work:
                self._builds += 1
            threading.Thread(target=self._build, args=(part, kind), daemon=True,
                             name="promptcache-index-build").start()
            return False
        return part.merge_slice()

    def _wanted_build(self, part: Partition) -> str | None:
        """The kind ``part``'s main index should be rebuilt as, or None."""
        main, size = part.main, len(part)
        if part.failures >= MAX_BUILD_FAILURES:
            return None
        if self.kind == "auto" and main.kind == "flat" and size > self.hnsw_threshold:
            return "hnsw"
        if main.dead > self.compact_at * main.slots and main.dead >= 64:
            if self.kind == "auto" and size < self.hnsw_threshold // 2:
                return "flat"
            return main.kind
        return None

    def _build(self, part: Partition, kind: str) -> None:
        faiss.omp_set_num_threads(self.upkeep_threads)
        try:
            new = part.main.empty() if kind == part.main.kind else _positional(kind, self.dim)
            started = time.perf_counter()
            if part.build(new, lambda: self._closed or part.dropped):
                log.info("index partition rebuilt as %s: %d vectors in %.1f s", kind,
                         len(new), time.perf_counter() - started)
        except Exception:
            part.failures += 1
            log.exception("index build failed; the old index stays")
        finally:
            with self._work:
                self._builds -= 1
                self._work.notify_all()
            self._schedule(part)


def _first_batch(main: _PositionalIndex) -> int:
    """The first merge slice into ``main``: one HNSW insert can take a millisecond."""
    return 1 if main.kind == "hnsw" else 64


def _last_wins(ids: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``ids`` without repeats, each with its last vector."""
    if len(ids) < 2:
        return ids, vectors
    _, last = np.unique(ids[::-1], return_index=True)
    if len(last) == len(ids):
        return ids, vectors
    keep = np.sort(len(ids) - 1 - last)
    return ids[keep], vectors[keep]


def _nothing(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((n, 1), np.float32), np.full((n, 1), -1, np.int64)


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).reshape(-1, a.shape[-1])


def _i64(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.int64).reshape(-1)
