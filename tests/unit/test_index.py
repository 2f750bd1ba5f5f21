"""One contract suite for every vector index kind, and the partitioned index over them."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from promptcache.cache.protocols import VectorIndex
from promptcache.cache.semantic.index import KINDS, PartitionedIndex, make_index

DIM = 32
KINDS_ = [k for k in KINDS if k != "auto"]


def unit(rows: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(rows, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.fixture(params=KINDS_)
def index(request: pytest.FixtureRequest) -> VectorIndex:
    return make_index(request.param, DIM)


def test_each_vector_finds_itself_with_similarity_near_one(index: VectorIndex) -> None:
    data = unit(200)
    ids = np.arange(200) + 10**15
    index.add(ids, data)
    scores, found = index.search(data, 1)
    assert len(index) == 200
    assert (found[:, 0] == ids).all()
    assert np.allclose(scores[:, 0], 1.0, atol=0.01)


def test_removed_vectors_are_never_returned(index: VectorIndex) -> None:
    data = unit(100)
    index.add(np.arange(100), data)
    assert index.remove(np.arange(0, 100, 2)) == 50
    assert len(index) == 50
    _, found = index.search(data, 5)
    assert not set(found.ravel().tolist()) & set(range(0, 100, 2))
    assert index.remove(np.array([0, 999])) == 0  # already gone / never there


def test_re_adding_an_id_replaces_its_vector(index: VectorIndex) -> None:
    data = unit(20)
    index.add(np.arange(20), data)
    index.add(np.array([3]), data[7:8])
    assert len(index) == 20
    _, found = index.search(data[7:8], 2)
    assert set(found[0].tolist()) == {3, 7}


def test_vectors_returns_what_is_held(index: VectorIndex) -> None:
    data = unit(30)
    index.add(np.arange(30), data)
    index.remove(np.array([5]))
    ids, vectors = index.vectors()
    assert sorted(ids.tolist()) == [i for i in range(30) if i != 5]
    order = np.argsort(ids)
    expected = np.delete(data, 5, axis=0)
    assert np.allclose(vectors[order], expected, atol=0.01)


def test_empty_index_searches_to_nothing(index: VectorIndex) -> None:
    scores, found = index.search(unit(2), 3)
    assert (found == -1).all() and len(index) == 0


def test_removing_everything_then_searching_is_safe(index: VectorIndex) -> None:
    index.add(np.arange(10), unit(10))
    index.remove(np.arange(10))
    _, found = index.search(unit(1), 3)
    assert (found == -1).all()


def test_sq8_takes_a_quarter_of_flat_memory() -> None:
    """Its FAISS codes are a quarter of flat's; with the id bookkeeping, under a third."""
    flat, sq8 = make_index("flat", 384), make_index("sq8", 384)
    data = np.random.default_rng(0).normal(size=(1000, 384)).astype(np.float32)
    data /= np.linalg.norm(data, axis=1, keepdims=True)
    flat.add(np.arange(1000), data)
    sq8.add(np.arange(1000), data)
    codes = {name: len(faiss.serialize_index(i.index))  # type: ignore[attr-defined]
             for name, i in (("flat", flat), ("sq8", sq8))}
    assert codes["sq8"] * 3.5 < codes["flat"]
    assert sq8.nbytes * 3 < flat.nbytes


def test_auto_partitions_switch_to_hnsw_when_large() -> None:
    """The switch is built in the background; once the upkeep is idle it has happened."""
    index = PartitionedIndex(DIM, "auto", hnsw_threshold=50)
    index.add("s", np.arange(40), unit(40))
    index.add("t", np.arange(100, 110), unit(10, seed=2))
    assert index.wait_idle(10)
    assert dict(index.partitions())["s"].kind == "flat"
    index.add("s", np.arange(40, 80), unit(40, seed=1))
    assert index.wait_idle(10)
    parts = dict(index.partitions())
    assert parts["s"].kind == "hnsw" and parts["t"].kind == "flat"
    assert len(index) == 90
    data = np.vstack([unit(40), unit(40, seed=1)])
    hits = [index.search("s", v, 1)[0][0] for v in data[:10]]
    assert hits == list(range(10))


def test_an_id_moved_to_another_scope_leaves_the_first() -> None:
    index = PartitionedIndex(DIM, "flat")
    v = unit(1)
    index.add("a", np.array([1]), v)
    index.add("b", np.array([1]), v)
    assert index.search("a", v[0], 1) == [] and index.search("b", v[0], 1)[0][0] == 1
    assert len(index) == 1


def test_empty_partitions_are_dropped() -> None:
    index = PartitionedIndex(DIM, "flat")
    index.add("a", np.array([1, 2]), unit(2))
    index.remove(np.array([1, 2]))
    assert index.stats()["partitions"] == 0 and index.scope_size("a") == 0


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown index kind"):
        PartitionedIndex(DIM, "ivf")
