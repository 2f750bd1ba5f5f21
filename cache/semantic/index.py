"""Vector indexes (FAISS), one per scope.

:class:`VectorIndex` is the seam; three kinds implement it, all on inner product over
unit vectors (= cosine similarity):

- ``flat``: exact search (``IndexFlatIP``), 4 bytes per dimension; best below ~20k vectors.
- ``sq8``: exact scan over 8-bit scalar-quantized codes, 1 byte per dimension (4x smaller),
  a small loss of precision in the scores.
- ``hnsw``: an HNSW graph over float vectors, sub-linear search for large caches. FAISS
  cannot delete from HNSW, so removals are tombstoned, filtered out of results, and the
  graph is rebuilt once tombstones pass a quarter of it.

:class:`PartitionedIndex` keeps one index per scope (tenant, namespace, model, parameters,
earlier turns...), so a search only ever sees candidates of its own scope: a busy scope can
never crowd a valid match out of a quiet one's results. With ``kind="auto"`` each partition
starts flat and becomes HNSW when it grows past ``hnsw_threshold`` vectors.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import faiss
import numpy as np

from promptcache.cache.protocols import VectorIndex

IndexKind = Literal["flat", "sq8", "hnsw"]
KINDS: tuple[str, ...] = ("auto", "flat", "sq8", "hnsw")
#: Component range covered by the 8-bit quantizer: a unit vector never leaves [-1, 1].
SQ8_RANGE = 1.0


class _FaissIndex:
    """An ``IndexIDMap2`` over a FAISS index that supports ``remove_ids``."""

    kind = "flat"
    bytes_per_dim = 4

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.index = faiss.IndexIDMap2(self._make(dim))

    def _make(self, dim: int) -> faiss.Index:
        return faiss.IndexFlatIP(dim)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.remove(ids)  # re-adding an id replaces it
        self.index.add_with_ids(_f32(vectors), _i64(ids))

    def remove(self, ids: np.ndarray) -> int:
        return int(self.index.remove_ids(faiss.IDSelectorBatch(_i64(ids))))

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = max(1, min(k, len(self)))
        if not len(self):
            n = len(vectors)
            return np.zeros((n, 1), np.float32), np.full((n, 1), -1, np.int64)
        scores, ids = self.index.search(_f32(vectors), k)
        return scores, ids

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        if not len(ids):
            return ids, np.zeros((0, self.dim), np.float32)
        return ids, self.index.reconstruct_batch(ids)

    @property
    def nbytes(self) -> int:
        return len(self) * (self.dim * self.bytes_per_dim + 16)  # codes + id map (2 ways)


class FlatIndex(_FaissIndex):
    """Exact inner-product search over float vectors (4 bytes a dimension)."""

    kind = "flat"


class SQ8Index(_FaissIndex):
    """Exact search over 8-bit scalar-quantized codes (1 byte a dimension)."""

    kind = "sq8"
    bytes_per_dim = 1

    def _make(self, dim: int) -> faiss.Index:
        index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit,
                                           faiss.METRIC_INNER_PRODUCT)
        bounds = np.vstack([np.full(dim, -SQ8_RANGE), np.full(dim, SQ8_RANGE)])
        index.train(bounds.astype(np.float32))  # fixed range: no data needed to start
        return index


class HNSWIndex:
    """HNSW with tombstoned removal and rebuild-on-churn."""

    kind = "hnsw"

    def __init__(self, dim: int, *, m: int = 32, ef_search: int = 64,
                 ef_construction: int = 80) -> None:
        self.dim, self.m = dim, m
        self.ef_search, self.ef_construction = ef_search, ef_construction
        self._dead: set[int] = set()
        self.index = self._empty()

    def _empty(self) -> faiss.IndexIDMap2:
        hnsw = faiss.IndexHNSWFlat(self.dim, self.m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efSearch = self.ef_search
        hnsw.hnsw.efConstruction = self.ef_construction
        return faiss.IndexIDMap2(hnsw)

    def __len__(self) -> int:
        return int(self.index.ntotal) - len(self._dead)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = _i64(ids)
        live = set(faiss.vector_to_array(self.index.id_map).tolist()) - self._dead
        if any(int(i) in live or int(i) in self._dead for i in ids):
            self.remove(ids)
            self._rebuild()  # an id can occur once in the id map
        self.index.add_with_ids(_f32(vectors), ids)

    def remove(self, ids: np.ndarray) -> int:
        present = set(faiss.vector_to_array(self.index.id_map).tolist())
        removed = {int(i) for i in ids if int(i) in present} - self._dead
        self._dead |= removed
        if self._dead and len(self._dead) * 4 > int(self.index.ntotal):
            self._rebuild()
        return len(removed)

    def _rebuild(self) -> None:
        ids, vectors = self.vectors()
        self._dead.clear()
        self.index = self._empty()
        if len(ids):
            self.index.add_with_ids(vectors, ids)

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(vectors)
        if not len(self):
            return np.zeros((n, 1), np.float32), np.full((n, 1), -1, np.int64)
        wanted = max(1, min(k, len(self)))
        scores, ids = self.index.search(_f32(vectors), min(wanted + len(self._dead),
                                                           int(self.index.ntotal)))
        if not self._dead:
            return scores[:, :wanted], ids[:, :wanted]
        out_s = np.zeros((n, wanted), np.float32)
        out_i = np.full((n, wanted), -1, np.int64)
        for row in range(n):
            keep = [j for j, i in enumerate(ids[row]) if i >= 0 and int(i) not in self._dead]
            keep = keep[:wanted]
            out_s[row, : len(keep)] = scores[row, keep]
            out_i[row, : len(keep)] = ids[row, keep]
        return out_s, out_i

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        all_ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        ids = np.array([i for i in all_ids if int(i) not in self._dead], dtype=np.int64)
        if not len(ids):
            return ids, np.zeros((0, self.dim), np.float32)
        return ids, self.index.reconstruct_batch(ids)

    @property
    def nbytes(self) -> int:
        total = int(self.index.ntotal)
        # float vectors + about 2*M neighbour ids on level 0 (4 bytes) + id map (2 ways)
        return total * (self.dim * 4 + self.m * 2 * 4 + 16)


#: ``auto`` switches a scope's partition from flat to HNSW at this many vectors.
AUTO_HNSW_AT = 20_000


def make_index(kind: str, dim: int) -> VectorIndex:
    if kind == "flat":
        return FlatIndex(dim)
    if kind == "sq8":
        return SQ8Index(dim)
    if kind == "hnsw":
        return HNSWIndex(dim)
    raise ValueError(f"unknown index kind {kind!r} (one of {', '.join(KINDS)})")


class PartitionedIndex:
    """One vector index per scope; ``kind="auto"`` picks flat or HNSW by partition size."""

    def __init__(self, dim: int, kind: str = "auto", *, hnsw_threshold: int = AUTO_HNSW_AT) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r} (one of {', '.join(KINDS)})")
        self.dim, self.kind, self.hnsw_threshold = dim, kind, hnsw_threshold
        self._parts: dict[str, VectorIndex] = {}
        self._scope_of: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self._scope_of)

    def __contains__(self, id_: int) -> bool:
        return id_ in self._scope_of

    def partitions(self) -> Iterator[tuple[str, VectorIndex]]:
        return iter(list(self._parts.items()))

    def add(self, scope: str, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = _i64(ids)
        moved = [i for i in ids.tolist() if self._scope_of.get(i, scope) != scope]
        if moved:
            self.remove(np.array(moved, dtype=np.int64))
        part = self._parts.get(scope)
        if part is None:
            part = self._parts[scope] = make_index(self._initial_kind(), self.dim)
        part.add(ids, vectors)
        for i in ids.tolist():
            self._scope_of[i] = scope
        if self.kind == "auto" and part.kind == "flat" and len(part) > self.hnsw_threshold:
            self._parts[scope] = self._convert(part, "hnsw")

    def _initial_kind(self) -> str:
        return "flat" if self.kind == "auto" else self.kind

    def _convert(self, part: VectorIndex, kind: str) -> VectorIndex:
        ids, vectors = part.vectors()
        new = make_index(kind, self.dim)
        if len(ids):
            new.add(ids, vectors)
        return new

    def remove(self, ids: np.ndarray) -> int:
        by_scope: dict[str, list[int]] = {}
        for i in _i64(ids).tolist():
            scope = self._scope_of.pop(i, None)
            if scope is not None:
                by_scope.setdefault(scope, []).append(i)
        removed = 0
        for scope, members in by_scope.items():
            part = self._parts[scope]
            removed += part.remove(np.array(members, dtype=np.int64))
            if not len(part):
                del self._parts[scope]
        return removed

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
        return sum(p.nbytes for p in self._parts.values()) + len(self._scope_of) * 100

    def stats(self) -> dict[str, int]:
        kinds: dict[str, int] = {}
        for p in self._parts.values():
            kinds[p.kind] = kinds.get(p.kind, 0) + len(p)
        return {"vectors": len(self), "partitions": len(self._parts), "bytes": self.nbytes,
                **{f"vectors_{k}": v for k, v in kinds.items()}}


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).reshape(-1, a.shape[-1])


def _i64(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.int64).reshape(-1)
