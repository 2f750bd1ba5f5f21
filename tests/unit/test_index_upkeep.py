"""Index upkeep: changes cost O(1) and never rebuild; builds run beside searches, then swap."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from promptcache.cache.semantic import index as index_module
from promptcache.cache.semantic.index import HNSWIndex, PartitionedIndex, make_index

DIM = 32


def unit(rows: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(rows, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as executor:
        yield executor


def top(index: PartitionedIndex, scope: str, vector: np.ndarray, k: int = 1) -> list[int]:
    return [i for i, _ in index.search(scope, vector, k)]


def stored(index: PartitionedIndex, scope: str) -> dict[int, np.ndarray]:
    """Every id of ``scope`` with its vector; fails if an id is held twice."""
    ids, vectors = dict(index.partitions())[scope].vectors()
    assert len(set(ids.tolist())) == len(ids)
    return dict(zip(ids.tolist(), vectors, strict=True))


def forbid_new_faiss_indexes(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: Any) -> None:
        raise AssertionError("a FAISS index was built")

    monkeypatch.setattr(index_module._PositionalIndex, "_make", refuse)
    monkeypatch.setattr(HNSWIndex, "_make", refuse)
    monkeypatch.setattr(index_module.SQ8Index, "_make", refuse)


@pytest.mark.parametrize("kind", ["flat", "sq8", "hnsw"])
def test_re_adding_a_known_id_builds_nothing(kind: str, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    data, other = unit(400), unit(20, seed=1)
    standalone = make_index(kind, DIM)
    standalone.add(np.arange(400), data)
    index = PartitionedIndex(DIM, kind)
    index.add("s", np.arange(400), data)
    assert index.wait_idle(10)
    forbid_new_faiss_indexes(monkeypatch)
    for _ in range(3):  # the same ids again and again: a refresh, a re-store
        standalone.add(np.arange(20), other)
        index.add("s", np.arange(20), other)
    assert index.wait_idle(10)
    assert len(standalone) == len(index) == 400
    _, found = standalone.search(other[:5], 1)
    assert found[:, 0].tolist() == list(range(5))
    assert [top(index, "s", v)[0] for v in other[:5]] == list(range(5))
    held = stored(index, "s")
    assert np.allclose(held[3], other[3], atol=0.02) and np.allclose(held[30], data[30], atol=0.02)
    assert index.stats()["index_builds"] == 0


@pytest.mark.parametrize("kind", ["flat", "hnsw", "auto"])
def test_a_removed_id_is_never_returned_wherever_it_was(kind: str) -> None:
    """Removed from the fresh buffer, from the main index, or re-added elsewhere: gone."""
    index = PartitionedIndex(DIM, kind, hnsw_threshold=300)
    data = unit(600)
    rng = np.random.default_rng(3)
    present: set[int] = set()
    for step in range(12):
        batch = rng.choice(600, 80, replace=False)
        index.add("s", batch, data[batch])
        present |= set(batch.tolist())
        if step % 3 == 0:
            index.wait_idle(10)  # some removals hit the main index, others the buffer
        gone = rng.choice(sorted(present), 30, replace=False)
        assert index.remove(gone) == 30
        present -= set(gone.tolist())
        for g in gone[:10]:
            assert not set(top(index, "s", data[g], 5)) - present
    assert index.wait_idle(10)
    assert len(index) == len(present) == index.scope_size("s")
    for i in range(600):
        found = top(index, "s", data[i], 3)
        assert not set(found) - present
        if i in present:
            assert found[0] == i


def gate_hnsw_builds(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Hold a build after it has filled the new index and before it swaps it in."""
    filled, release = threading.Event(), threading.Event()
    append = HNSWIndex.append

    def gated(self: HNSWIndex, ids: np.ndarray, vectors: np.ndarray) -> None:
        append(self, ids, vectors)
        if threading.current_thread().name == "promptcache-index-build":
            filled.set()
            assert release.wait(20)

    monkeypatch.setattr(HNSWIndex, "append", gated)
    return filled, release


def test_a_kind_switch_keeps_answering_and_keeps_what_changed_meanwhile(
        monkeypatch: pytest.MonkeyPatch, pool: ThreadPoolExecutor) -> None:
    filled, release = gate_hnsw_builds(monkeypatch)
    index = PartitionedIndex(DIM, "auto", hnsw_threshold=200)
    data, later = unit(300), unit(50, seed=1)
    index.add("s", np.arange(150), data[:150])
    assert index.wait_idle(10)  # in the flat main index
    index.add("s", np.arange(150, 300), data[150:])
    assert filled.wait(10)  # the HNSW index is built; the flat one still serves
    assert dict(index.partitions())["s"].kind == "flat"
    lookups = [pool.submit(top, index, "s", v) for v in data[:50]]
    assert [f.result(timeout=5)[0] for f in lookups] == list(range(50))
    index.add("s", np.arange(1000, 1050), later)  # added during the build
    index.remove(np.arange(100, 120))  # removed during the build
    index.add("s", np.array([5]), later[:1])  # re-added with another vector
    assert top(index, "s", later[10])[0] == 1010
    release.set()
    assert index.wait_idle(10)
    assert dict(index.partitions())["s"].kind == "hnsw"
    assert [top(index, "s", v)[0] for v in later[1:]] == list(range(1001, 1050))
    assert set(top(index, "s", later[0], 2)) == {5, 1000}
    for i in range(100, 120):
        assert not set(top(index, "s", data[i], 5)) & set(range(100, 120))
    assert np.allclose(stored(index, "s")[5], later[0], atol=1e-6)
    assert len(index) == 300 + 50 - 20
    assert index.nbytes == index.recount_bytes()


def test_writers_never_wait_for_a_search_or_a_merge(pool: ThreadPoolExecutor) -> None:
    """add and remove take only the state lock: a FAISS call in progress never delays them."""
    index = PartitionedIndex(DIM, "flat")
    index.add("s", np.arange(100), unit(100))
    assert index.wait_idle(10)
    part = dict(index.partitions())["s"]
    with part.search_lock:  # as a long search or a merge slice would
        pool.submit(index.add, "s", np.array([500]), unit(1, seed=9)).result(timeout=5)
        assert pool.submit(index.remove, np.array([1, 2])).result(timeout=5) == 2
    assert index.wait_idle(10)
    assert top(index, "s", unit(1, seed=9)[0]) == [500]


def test_ids_removed_or_replaced_while_being_merged_stay_so(monkeypatch: pytest.MonkeyPatch,
                                                            pool: ThreadPoolExecutor) -> None:
    index = PartitionedIndex(DIM, "flat")
    data = unit(10)
    index.add("s", np.array([100]), unit(1, seed=8))
    assert index.wait_idle(10)
    part = dict(index.partitions())["s"]
    adding, release = threading.Event(), threading.Event()
    faiss_index = part.main.index

    class Slow:  # the main index, held inside FAISS's add while ids are in flight
        def add(self, vectors: np.ndarray) -> None:
            adding.set()
            assert release.wait(10)
            faiss_index.add(vectors)

        def __getattr__(self, name: str) -> Any:
            return getattr(faiss_index, name)

    part.main.index = Slow()  # type: ignore[assignment]
    index.add("s", np.arange(10), data)
    assert adding.wait(10)  # ids 0..9 are in flight from the buffer to the main index
    part.main.index = faiss_index
    index.remove(np.array([1]))
    index.add("s", np.array([2]), unit(1, seed=5))
    release.set()
    assert index.wait_idle(10)
    assert 1 not in top(index, "s", data[1], 10)
    assert top(index, "s", unit(1, seed=5)[0], 2)[0] == 2
    held = stored(index, "s")
    assert 1 not in held and np.allclose(held[2], unit(1, seed=5)[0], atol=1e-6)
    assert len(index) == len(part) == len(held) == 10


@pytest.mark.parametrize("kind", ["flat", "sq8", "hnsw", "auto"])
def test_add_many_equals_repeated_add(kind: str) -> None:
    data = unit(900)
    ids = np.concatenate([np.arange(600), np.arange(100, 400)])  # repeats: the last wins
    vectors = np.vstack([data[:600], data[600:900]])
    bulk, one_by_one = (PartitionedIndex(DIM, kind, hnsw_threshold=300) for _ in range(2))
    assert bulk.add_many("s", ids, vectors, backlog=64) == 600
    for i, v in zip(ids, vectors, strict=True):
        one_by_one.add("s", np.array([i]), v[None, :])
    assert bulk.wait_idle(10) and one_by_one.wait_idle(10)
    assert len(bulk) == len(one_by_one) == 600
    for index in (bulk, one_by_one):
        got_ids, got = dict(index.partitions())["s"].vectors()
        order = np.argsort(got_ids)
        assert got_ids[order].tolist() == list(range(600))
        expected = np.vstack([data[:100], data[600:900], data[400:600]])
        assert np.allclose(got[order], expected, atol=0.02)
    for v in vectors[::37]:
        assert top(bulk, "s", v) == top(one_by_one, "s", v)


def test_add_many_without_replace_keeps_what_is_indexed() -> None:
    index = PartitionedIndex(DIM, "flat")
    data = unit(20)
    index.add("s", np.arange(10), data[:10])
    assert index.add_many("s", np.arange(20), unit(20, seed=4), replace=False) == 10
    assert index.wait_idle(10)
    assert [top(index, "s", v)[0] for v in data[:10]] == list(range(10))


def test_tombstones_are_compacted_in_the_background() -> None:
    index = PartitionedIndex(DIM, "hnsw")
    data = unit(400)
    index.add("s", np.arange(400), data)
    assert index.wait_idle(10)
    index.remove(np.arange(0, 400, 2))  # half of the graph dead
    assert index.wait_idle(10)
    part = dict(index.partitions())["s"]
    assert part.main.dead == 0 and part.builds == 1 and part.kind == "hnsw"
    assert [top(index, "s", v)[0] for v in data[1:40:2]] == list(range(1, 40, 2))


def test_the_running_byte_total_equals_a_recount() -> None:
    index = PartitionedIndex(DIM, "auto", hnsw_threshold=150)
    rng = np.random.default_rng(7)
    data = unit(500)
    for _ in range(20):
        scope = str(rng.integers(3))
        batch = rng.choice(500, 40, replace=False)
        index.add(scope, batch, data[batch])  # some ids move from scope to scope
        index.remove(rng.choice(500, 15, replace=False))
    assert index.wait_idle(10)
    assert index.nbytes == index.recount_bytes() > 0
    index.add("big", np.arange(1000, 1100), unit(100, seed=1))
    assert index.wait_idle(10)
    index.add("big", np.arange(1100, 1200), unit(100, seed=2))  # switches to HNSW
    index.remove(np.arange(1000, 1010))
    assert index.wait_idle(10)
    assert index.stats()["index_builds"] >= 1
    assert index.nbytes == index.recount_bytes()
    index.remove(np.arange(500))
    index.remove(np.arange(1000, 1200))
    assert index.nbytes == index.recount_bytes() == 0
    assert index.stats()["partitions"] == 0


def test_a_closed_index_still_answers_and_runs_no_upkeep() -> None:
    index = PartitionedIndex(DIM, "flat")
    index.add("s", np.arange(10), unit(10))
    index.close()
    index.add("s", np.array([50]), unit(1, seed=3))
    assert index.wait_idle(1)
    assert top(index, "s", unit(1, seed=3)[0]) == [50]
    assert index.stats()["index_unmerged"] >= 1


def test_vectors_waiting_in_the_buffer_are_searched_exactly() -> None:
    index = PartitionedIndex(DIM, "hnsw")
    index.close()  # no upkeep: everything stays in the fresh buffer
    data = unit(300)
    index.add("s", np.arange(300), data)
    index.remove(np.arange(0, 300, 3))
    index.add("s", np.array([1]), data[2:3])  # re-added: its old row is dead
    held = {i: data[2] if i == 1 else data[i] for i in range(300) if i % 3}
    ids = np.array(sorted(held))
    matrix = np.stack([held[i] for i in ids])
    for q in unit(20, seed=6):
        expected = ids[np.argsort(-(matrix @ q))[:5]].tolist()
        assert top(index, "s", q, 5) == expected
    assert dict(index.partitions())["s"].backlog() == 200
