"""The engine's seams: one ``typing.Protocol`` for each thing a deployment may swap.

- :class:`EntryStore`: where encoded entries, their vector records and their byte
  accounting live (:class:`~promptcache.cache.redis.budget.BudgetStore` on Redis);
- :class:`Embedder`: text -> unit vectors
  (:class:`~promptcache.cache.semantic.embedding.SentenceTransformerEmbedder`);
- :class:`VectorIndex`: nearest neighbours by inner product
  (:mod:`promptcache.cache.semantic.index`);
- :class:`CandidateVerifier` and :class:`Scorer`: whether a semantic candidate may be served
  (:class:`~promptcache.cache.semantic.verifier.Verifier`, whose fitted model is a Scorer).

The request flow's own seams (the caller's side of a request, and where it reports metrics)
live with it in :mod:`promptcache.cache.flow`. The value types the seams return
(:class:`PutResult`, :class:`Usage`, :class:`Verdict`) are here too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True, slots=True)
class PutResult:
    """What a write did: stored or not (larger than the budget), bytes counted, evictions."""

    stored: bool
    size: int  # bytes counted for the entry
    evicted: list[str] = field(default_factory=list)  # members evicted to make room


@dataclass(frozen=True, slots=True)
class Usage:
    """The bytes and entries a store accounts for, against its budget (0 = unbounded)."""

    bytes: int
    entries: int
    max_bytes: int
    shards: int
    reaped: int = 0


@dataclass(frozen=True, slots=True)
class Verdict:
    """One candidate's verdict: served or not, the check that said no, the model's score."""

    ok: bool
    reason: str | None  # the first check that rejected: "numbers", "negation", ...
    score: float  # the model's probability that one answer serves both (1 without a model,
    # 0 if a rule rejected the pair)


class EntryStore(Protocol):
    """Encoded entries and their vector records, by (namespace, digest), with a byte budget.

    A store without a bound is the same store with an unbounded budget (``max_bytes=0``).
    Every method may raise the backend's errors; the exact cache turns them into misses.
    """

    def held(self, namespace: str, digest: str) -> bytes | None:
        """The entry's bytes if this process holds them (a near cache), without I/O; None
        if it does not (then :meth:`get` asks the backend)."""
        ...

    async def get(self, namespace: str, digest: str, *, held_checked: bool = False
                  ) -> bytes | None:
        """The entry's bytes; a hit refreshes its recency. ``held_checked``: :meth:`held`
        was asked already and said None."""
        ...

    async def touch(self, namespace: str, digest: str) -> None:
        """Refresh an entry's recency (a semantic hit served it)."""
        ...

    async def put(self, namespace: str, digest: str, entry: bytes, vector: bytes | None,
                  ttl_ms: int | None) -> PutResult:
        """Write the entry and its vector record together (same TTL), evicting to fit."""
        ...

    async def attach_vector(self, namespace: str, digest: str, vector: bytes) -> PutResult:
        """Add a vector record to an entry that exists (never to one that is gone), with
        the entry's remaining TTL, evicting to fit."""
        ...

    async def get_with_vectors(self, refs: Sequence[tuple[str, str]]
                               ) -> list[tuple[bytes | None, bytes | None]]:
        """(entry, vector record) of each (namespace, digest); None where gone."""
        ...

    def vector_batches(self, shard: int | None = None, batch: int = 500
                       ) -> AsyncIterator[list[bytes | None]]:
        """Every vector record held (of one shard, or all), in batches."""
        ...

    async def delete(self, namespace: str, digest: str) -> int:
        """Delete one entry and its vector record; 1 if the entry existed, else 0."""
        ...

    async def delete_matching(self, namespace: str | None, tenant_tag: str | None = None
                              ) -> int:
        """Delete every entry of ``namespace`` (None: of every namespace) and of the tenant
        whose digests end with ``tenant_tag`` (None: of every tenant); how many."""
        ...

    async def usage(self) -> Usage: ...

    async def info(self) -> dict[str, Any]:
        """Backend figures for /stats: at least ``keys`` and ``used_memory_bytes``."""
        ...

    async def ping(self) -> None: ...


class Embedder(Protocol):
    """A text embedding model."""

    @property
    def dim(self) -> int: ...

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Blocking: an (n, dim) float32 array of unit vectors. Call from a thread."""
        ...


class VectorIndex(Protocol):
    """Nearest neighbours by inner product over unit vectors, with removal by id."""

    kind: str

    def __len__(self) -> int: ...

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None: ...

    def remove(self, ids: np.ndarray) -> int: ...

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), each (n, k); missing results have id -1."""
        ...

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """All (ids, vectors) held, for re-indexing."""
        ...

    @property
    def nbytes(self) -> int: ...


class CandidateVerifier(Protocol):
    """Decides whether a semantic candidate's answer may serve the query."""

    def verify_batch(self, items: Sequence[tuple[str, str, float]]) -> Sequence[Verdict]:
        """Blocking: one verdict per (query, candidate, similarity)."""
        ...


class Scorer(Protocol):
    """A fitted model: the probability that one answer serves both prompts, per pair."""

    threshold: float  # scores below it are rejected

    def score_batch(self, items: Sequence[tuple[str, str, float]]) -> list[float]: ...
