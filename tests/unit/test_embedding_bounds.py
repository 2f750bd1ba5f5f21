"""The embedder's work is bounded on any input: a memo bounded in bytes, a deadline on every
lookup, a queue that says what it would add, lookups before background texts, and a window
that long texts do not fit."""

from __future__ import annotations

import asyncio
import hashlib
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence

import numpy as np
import pytest

from promptcache.cache.errors import EmbedTimeout
from promptcache.cache.semantic.embedding import (
    DEFAULT_MAX_CHARS,
    MEMO_ENTRY_OVERHEAD,
    BatchCost,
    BatchingEmbedder,
    SentenceTransformerEmbedder,
)

DIM = 8


class FakeClock:
    """A clock the fake model moves forward by what its batches would cost."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeEmbedder:
    """An Embedder that records its batches, can be stalled (``gate``), and moves ``clock``
    by ``per_text`` seconds a text."""

    name = "fake"
    dim = DIM

    def __init__(self, clock: FakeClock | None = None, per_text: float = 0.0) -> None:
        self.clock = clock
        self.per_text = per_text
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set when a batch reaches the model
        self.batches: list[list[str]] = []

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.batches.append(list(texts))
        self.entered.set()
        self.gate.wait(10)
        if self.clock is not None:
            self.clock.advance(self.per_text * len(texts))
        seeds = [int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "big") for t in texts]
        vectors = np.stack([np.random.default_rng(s).normal(size=DIM) for s in seeds])
        return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)

    @property
    def seen(self) -> list[str]:
        return [t for batch in self.batches for t in batch]

    async def stalled(self) -> None:
        """Wait until a batch is held in the model."""
        assert await asyncio.to_thread(self.entered.wait, 5), "no batch reached the model"


class WindowedFake(FakeEmbedder):
    """A fake with a window: a token a word, plus two special ones."""

    max_tokens = 10
    max_chars = 100

    def __init__(self) -> None:
        super().__init__()
        self.counted = 0

    def count_tokens(self, text: str) -> int:
        self.counted += 1
        return len(text.split()) + 2


@pytest.fixture
async def stoppable() -> AsyncIterator[list[tuple[FakeEmbedder, BatchingEmbedder]]]:
    """Closes the embedders a test makes, releasing any stalled fake model first."""
    made: list[tuple[FakeEmbedder, BatchingEmbedder]] = []
    yield made
    for fake, batching in made:
        fake.gate.set()
        await batching.close()


def make(made: list[tuple[FakeEmbedder, BatchingEmbedder]], fake: FakeEmbedder,
         **options: object) -> BatchingEmbedder:
    batching = BatchingEmbedder(fake, window=0.0, **options)  # type: ignore[arg-type]
    made.append((fake, batching))
    return batching


async def settled(batching: BatchingEmbedder, queued: tuple[int, int]) -> None:
    """Let the tasks just made run until ``queued`` texts (lookups, background) wait."""
    for _ in range(20):
        if batching.queued == queued:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{batching.queued} texts queued, not {queued}")


# -- the memo ---------------------------------------------------------------------------------


async def test_the_memo_is_bounded_in_bytes_keyed_by_digest_and_least_recently_used_goes(
    stoppable: list[tuple[FakeEmbedder, BatchingEmbedder]],
) -> None:
    fake = FakeEmbedder()
    entry = DIM * 4 + MEMO_ENTRY_OVERHEAD
    batching = make(stoppable, fake, memo_bytes=10 * entry)
    huge = "x" * 1_000_000 + " the end"
    first = await batching.embed(huge)
    assert all(len(t) <= DEFAULT_MAX_CHARS for t in fake.seen), "the model got a megabyte"
    held = sum(sys.getsizeof(k) + v.nbytes for k, v in batching._memo.items())
    assert held < 1_000, f"the memo holds {held} bytes for one 1 MB text"
    again = await batching.embed(huge)
    assert len(fake.seen) == 1 and batching.memo_hits == 1 and again is first

    for i in range(30):
        await batching.embed(f"text {i}")
        await batching.embed(huge)  # used again each time: the oldest others go first
        assert batching.memo_used <= 10 * entry
    assert len(batching._memo) == 10 and batching.memo_used == 10 * entry
    assert len(fake.seen) == 31, "the huge text was answered from the memo every time"
    await batching.embed("text 0")  # long gone from the memo: computed again
    assert len(fake.seen) == 32


# -- deadlines --------------------------------------------------------------------------------


async def test_a_stalled_model_means_EmbedTimeout_at_the_deadline_and_later_calls_work(
    stoppable: list[tuple[FakeEmbedder, BatchingEmbedder]],
) -> None:
    fake = FakeEmbedder()
    batching = make(stoppable, fake, timeout=0.2)
    fake.gate.clear()
    held = asyncio.create_task(batching.embed("held in the model"))
    await fake.stalled()
    started = time.monotonic()
    results = await asyncio.gather(batching.embed("queued behind it"),
                                   batching.embed_many(["also queued", "and this"]),
                                   return_exceptions=True)
    took = time.monotonic() - started
    assert all(isinstance(r, EmbedTimeout) for r in results), results
    assert 0.2 <= took < 0.45, f"the callers waited {took:.3f} s for a 0.2 s deadline"
    with pytest.raises(EmbedTimeout):
        await held
    assert batching.queued == (0, 0), "texts nobody waits for left the queue"
    assert batching.timeouts == 3

    fake.gate.set()
    vector = await batching.embed("after the stall")
    assert vector.shape == (DIM,)
    assert fake.batches == [["held in the model"], ["after the stall"]]
    await batching.embed("held in the model")  # it finished after all: memoised
    assert len(fake.batches) == 2


async def test_a_cancelled_background_caller_takes_its_texts_out_of_the_queue(
    stoppable: list[tuple[FakeEmbedder, BatchingEmbedder]],
) -> None:
    fake = FakeEmbedder()
    batching = make(stoppable, fake, background_batch=2)
    fake.gate.clear()
    stall = asyncio.create_task(batching.embed("stall"))
    await fake.stalled()
    background = asyncio.create_task(batching.embed_background(["b1", "b2", "b3"]))
    await settled(batching, (0, 3))
    background.cancel()
    await asyncio.gather(background, return_exceptions=True)
    assert batching.queued == (0, 0)
    fake.gate.set()
    await stall
    assert batching.idle() and fake.seen == ["stall"]


# -- the queue's estimate, and priorities -------------------------------------------------------


async def test_expected_wait_grows_with_the_queue_and_the_stall_and_is_zero_when_idle(
    stoppable: list[tuple[FakeEmbedder, BatchingEmbedder]],
) -> None:
    clock = FakeClock()
    fake = FakeEmbedder(clock, per_text=0.01)
    batching = make(stoppable, fake, max_batch=4, clock=clock)
    assert batching.expected_wait() == 0.0 and batching.idle()
    await batching.embed("warm 1")
    await batching.embed_many([f"warm {i}" for i in range(2, 6)])
    assert batching.cost(1) == pytest.approx(0.01) and batching.cost(4) == pytest.approx(0.04)
    assert batching.expected_wait() == 0.0 and batching.idle()

    fake.entered.clear()
    fake.gate.clear()
    tasks = [asyncio.create_task(batching.embed("held"))]
    await fake.stalled()
    waits = [batching.expected_wait()]  # the rest of the batch in progress: 0.01
    for n in range(10):
        tasks.append(asyncio.create_task(batching.embed(f"queued {n}")))
        await settled(batching, (n + 1, 0))
        waits.append(batching.expected_wait())
    assert waits == sorted(waits) and len(set(waits)) == len(waits), waits
    # 10 queued in batches of 4: two whole batches ahead, two more in the new text's own
    assert waits[-1] == pytest.approx(0.01 + 2 * 0.04 + 2 * 0.01)
    assert not batching.idle()

    clock.advance(0.05)  # the model is overdue by 0.04 s: expect as much again
    assert batching.expected_wait() == pytest.approx(0.04 + 0.10)
    fake.gate.set()
    await asyncio.gather(*tasks)
    assert batching.expected_wait() == 0.0 and batching.idle()


def test_the_batch_cost_estimate_separates_a_fixed_cost_from_the_cost_per_text() -> None:
    cost = BatchCost()
    for n in [1, 8, 3, 16, 1, 4] * 3:
        cost.add(n, 0.02 + 0.005 * n)
    assert cost.fixed == pytest.approx(0.02) and cost.per_text == pytest.approx(0.005)
    assert cost(10) == pytest.approx(0.07) and cost(0) == 0.0


async def test_lookups_are_served_before_background_texts_which_go_in_small_batches(
    stoppable: list[tuple[FakeEmbedder, BatchingEmbedder]],
) -> None:
    fake = FakeEmbedder()
    batching = make(stoppable, fake, background_batch=2)
    fake.gate.clear()
    first = asyncio.create_task(batching.embed("first lookup"))
    await fake.stalled()
    background = asyncio.create_task(
        batching.embed_background(["b1", "b2", "b3", "b4", "b5", "b6"]))
    await settled(batching, (0, 6))
    lookups = [asyncio.create_task(batching.embed(t)) for t in ("l1", "l2", "b5")]
    await settled(batching, (3, 5))  # a lookup takes a queued text along
    fake.gate.set()
    vectors = await background
    await asyncio.gather(first, *lookups)
    assert fake.batches == [["first lookup"], ["l1", "l2", "b5"], ["b1", "b2"], ["b3", "b4"],
                            ["b6"]]
    assert vectors.shape == (6, DIM) and batching.idle()
    assert np.array_equal(vectors[4], await batching.embed("b5"))


async def test_a_lookup_arriving_during_background_work_goes_before_the_rest_of_it(
    stoppable: list[tuple[FakeEmbedder, BatchingEmbedder]],
) -> None:
    fake = FakeEmbedder()
    batching = make(stoppable, fake, background_batch=2)
    fake.gate.clear()
    background = asyncio.create_task(batching.embed_background([f"b{i}" for i in range(6)]))
    await fake.stalled()
    assert not batching.idle() and batching.expected_wait() >= 0.0
    lookup = asyncio.create_task(batching.embed("urgent"))
    await settled(batching, (1, 4))
    fake.gate.set()
    await asyncio.gather(background, lookup)
    assert fake.batches[:2] == [["b0", "b1"], ["urgent"]]


# -- the window ---------------------------------------------------------------------------------


async def test_fits_refuses_texts_past_the_window_and_counts_a_text_once(
    stoppable: list[tuple[FakeEmbedder, BatchingEmbedder]],
) -> None:
    fake = WindowedFake()
    batching = make(stoppable, fake)
    assert batching.fits("eight words fit in a window of ten")
    assert not batching.fits("nine words do not fit in a window of ten")
    assert batching.fits("eight words fit in a window of ten")
    assert fake.counted == 2, "a text asked about again is not tokenised again"
    assert not batching.fits("x" * 101) and fake.counted == 2, "too long to need counting"
    assert BatchingEmbedder(FakeEmbedder(), max_chars=50).fits("y" * 50)
    assert not BatchingEmbedder(FakeEmbedder(), max_chars=50).fits("y" * 51)


SENTENCE = ("The committee reviewed the proposal to extend the municipal tram line through the "
            "old harbour district, weighing costs, ridership forecasts, noise, heritage "
            "concerns and the effect on local shops.")


def test_minilm_fits_only_texts_within_its_window_and_reads_at_most_max_chars(
    embedder: SentenceTransformerEmbedder,
) -> None:
    """The issue's pair: one long context, then 'in favour' / 'against'. Neither fits, so
    neither is compared on the prefix they share; megabytes cost one window."""
    batching = BatchingEmbedder(embedder)
    assert embedder.max_tokens == 256
    for context in (" ".join([SENTENCE] * 9), " ".join([SENTENCE] * 18)):  # 1.8 KB, 3.6 KB
        favour = f"{context}\n\nList the arguments in favour."
        against = f"{context}\n\nList the arguments against."
        assert not batching.fits(favour) and not batching.fits(against)
    assert len(favour) > embedder.max_chars > len(" ".join([SENTENCE] * 9))
    assert batching.fits("How do I reset my password?") and batching.fits(SENTENCE)
    assert batching.fits(" ".join(["word"] * 254)) and not batching.fits(" ".join(["word"] * 255))

    started = time.perf_counter()
    assert not batching.fits("ten kilobytes of text " * 500)
    assert time.perf_counter() - started < 0.001, "a long text is refused without tokenising"

    huge = SENTENCE * 6_000  # about 1.2 MB
    assert embedder.count_tokens(huge) == embedder.count_tokens(huge[:embedder.max_chars])
    both = embedder.encode([huge, huge[:embedder.max_chars]])
    assert float(np.dot(both[0], both[1])) > 0.9999
