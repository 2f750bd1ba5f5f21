"""The cascade's first stage: the static model (distilled once, loaded without torch), its
binary codes, and the per-scope index that says whether any entry could match a text."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import pytest

from promptcache.cache.semantic import first_stage
from promptcache.cache.semantic.embedding import default_model_path
from promptcache.cache.semantic.first_stage import (
    CODE_BYTES,
    FirstStage,
    StaticEmbedder,
    ensure_static_model,
    source_key,
)

# The first run on a machine distils the static model into the user cache dir (about a
# minute of CPU, more on a busy machine); later sessions reuse it.
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(autouse=True)
def one_faiss_thread() -> Iterator[None]:
    """As the sidecar runs FAISS: one OpenMP thread a search (several spin on a busy
    machine and make a sub-millisecond scan take tens of milliseconds)."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


@pytest.fixture(scope="session")
def static_model() -> Path:
    return ensure_static_model()


@pytest.fixture(scope="session")
def static(static_model: Path) -> StaticEmbedder:
    return StaticEmbedder(static_model)


def random_codes(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, CODE_BYTES), dtype=np.uint8)


def flipped(codes: np.ndarray, bits: int, seed: int = 0) -> np.ndarray:
    """``codes`` (one or many) with ``bits`` random bits of each flipped: near neighbours
    at exactly that distance."""
    unpacked = np.unpackbits(np.atleast_2d(codes), axis=1)
    chosen = np.argsort(np.random.default_rng(seed).random(unpacked.shape), axis=1)[:, :bits]
    np.put_along_axis(unpacked, chosen, 1 - np.take_along_axis(unpacked, chosen, 1), 1)
    return np.packbits(unpacked, axis=1).reshape(codes.shape)


@pytest.mark.parametrize("flat_limit", [65536, 4000], ids=["flat", "inverted"])
def test_codes_take_at_most_64_bytes_a_vector_with_their_ids_and_id_map(
        flat_limit: int) -> None:
    stage = FirstStage(flat_limit=flat_limit, list_size=256, background=False)
    for start in range(0, 20_000, 1000):
        stage.add_codes("scope", np.arange(start, start + 1000) * 7919, random_codes(1000, start))
    for id_ in range(0, 300 * 7919, 7919):  # some single removals and adds as well
        stage.remove([id_])
    stage.add_codes("scope", np.arange(300) + 1, random_codes(300, 99))
    assert CODE_BYTES <= 64
    assert len(stage) == 20_000
    assert (stage.stats()["first_stage_inverted"] > 0) == (flat_limit < 20_000)
    assert stage.nbytes / len(stage) <= 64


def test_plausible_finds_an_identical_or_reworded_text_and_not_unrelated_ones(
        static: StaticEmbedder) -> None:
    stage = FirstStage(static)
    stage.add("scope", 1, "How do I reset my password?")
    stage.add("scope", 2, "What is the capital of France?")
    assert stage.plausible("scope", "How do I reset my password?") == [1]
    assert stage.plausible("scope", "how do I reset my password") == [1]
    assert stage.plausible("scope", "How can I reset my password?") == [1]
    assert stage.plausible("scope", "What's the capital city of France?") == [2]
    for unrelated in ("Write a haiku about autumn leaves.", "Give me a recipe for banana bread.",
                      "SELECT * FROM users WHERE id = 1;", ""):
        assert stage.plausible("scope", unrelated) == [], unrelated


def test_plausible_sees_only_its_own_scope(static: StaticEmbedder) -> None:
    stage = FirstStage(static)
    stage.add("tenant-a", 1, "How do I reset my password?")
    assert stage.plausible("tenant-b", "How do I reset my password?") == []
    assert stage.scope_size("tenant-a") == 1 and stage.scope_size("tenant-b") == 0


def test_removed_ids_are_never_returned_and_unknown_ones_are_ignored() -> None:
    stage = FirstStage()
    codes = random_codes(50)
    stage.add_codes("scope", np.arange(50), codes)
    assert stage.remove([3, 4, 1000]) == 2
    assert len(stage) == 48 and 3 not in stage and 5 in stage
    assert 3 not in stage.plausible_code("scope", codes[3])
    assert stage.plausible_code("scope", codes[5]) == [5]
    assert stage.remove(list(range(50))) == 48
    assert len(stage) == 0 and stage.scope_size("scope") == 0


def test_re_adding_an_id_replaces_its_code_and_its_scope() -> None:
    stage = FirstStage()
    old, new = random_codes(2)
    stage.add_codes("a", [7], old[None])
    stage.add_codes("b", [7], new[None])
    assert len(stage) == 1
    assert stage.plausible_code("a", old) == []
    assert stage.plausible_code("b", new) == [7]


def test_a_bulk_re_add_replaces_codes_without_growing() -> None:
    stage = FirstStage()
    first, second = random_codes(1000, seed=1), random_codes(1000, seed=2)
    stage.add_codes("s", np.arange(1000), first)
    stage.add_codes("s", np.arange(1000), second)
    assert len(stage) == 1000 and stage.scope_size("s") == 1000
    assert stage.plausible_code("s", second[17]) == [17]
    assert stage.plausible_code("s", first[17]) == []


def test_distance_bounds_what_is_plausible() -> None:
    stage = FirstStage(max_distance=60)
    code = random_codes(1)[0]
    assert np.unpackbits(flipped(code, 50) ^ code).sum() == 50
    stage.add_codes("s", [1, 2], np.stack([flipped(code, 50), flipped(code, 70, seed=1)]))
    assert stage.search_code("s", code) == [(1, 50), (2, 70)]
    assert stage.plausible_code("s", code) == [1]


def test_a_large_scope_becomes_an_inverted_file_and_still_finds_near_codes() -> None:
    stage = FirstStage(flat_limit=3000, list_size=100, min_scan=1000)
    centres = random_codes(40, seed=1)
    codes = flipped(centres[np.arange(12_000) % 40], 40)
    stage.add_codes("s", np.arange(4000), codes[:4000])
    stage.wait(timeout=60)
    assert stage.stats()["first_stage_inverted"] == 4000
    lists = stage.stats()["first_stage_lists"]
    for start in range(4000, 12_000, 500):  # rebuilt with more lists when it doubles
        stage.add_codes("s", np.arange(start, start + 500), codes[start:start + 500])
        stage.wait(timeout=60)
    assert stage.stats()["first_stage_lists"] > lists
    queries = flipped(codes[::120], 20, seed=1)
    found = [n in stage.plausible_code("s", q) for n, q in zip(range(0, 12_000, 120), queries,
                                                              strict=True)]
    assert np.mean(found) >= 0.95
    assert stage.remove(list(range(0, 12_000, 2))) == 6000
    assert all(n not in stage.plausible_code("s", codes[n]) for n in range(0, 400, 2))
    assert all(n in stage.plausible_code("s", codes[n]) for n in range(1, 12_000, 40))
    assert stage.stats()["first_stage_strays"] == 0


def test_changes_made_during_a_rebuild_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    gate, started = threading.Event(), threading.Event()
    train = first_stage._train_centroids

    def held_training(*args: object, **kwargs: object) -> np.ndarray:
        started.set()
        assert gate.wait(timeout=30)
        return train(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(first_stage, "_train_centroids", held_training)
    stage = FirstStage(flat_limit=2000, list_size=50, min_scan=400)
    codes = random_codes(3000, seed=3)
    stage.add_codes("s", np.arange(2500), codes[:2500])
    assert started.wait(timeout=30)  # the rebuild has its snapshot; now change things
    stage.remove(list(range(500)))
    replaced = random_codes(500, seed=4)
    stage.add_codes("s", np.arange(500, 1000), replaced)
    stage.add_codes("s", np.arange(2500, 3000), codes[2500:])
    stage.add_codes("elsewhere", [2400], codes[2400:2401])
    gate.set()
    stage.wait(timeout=60)
    current = dict(enumerate(codes)) | dict(zip(range(500, 1000), replaced, strict=True))
    present = [i for i in range(500, 3000) if i != 2400]
    assert stage.stats()["first_stage_inverted"] == len(present)
    assert all(i in stage.plausible_code("s", current[i]) for i in present)
    assert not any(i in stage.plausible_code("s", codes[i]) for i in range(500))
    assert stage.plausible_code("elsewhere", codes[2400]) == [2400]
    assert stage.remove(list(range(3000))) == len(present) + 1
    assert stage.stats()["first_stage_strays"] == 0  # the id map knew each one's block
    assert len(stage) == 0 and stage.stats()["first_stage_partitions"] == 0


def test_searches_on_a_thread_see_a_consistent_index_while_adds_and_training_happen() -> None:
    stage = FirstStage(flat_limit=2000, list_size=64)
    anchor = random_codes(1, seed=5)[0]
    stage.add_codes("s", [-1], anchor[None])
    errors: list[BaseException] = []
    misses = 0
    done = threading.Event()

    def search() -> None:
        nonlocal misses
        try:
            while not done.is_set():
                misses += -1 not in stage.plausible_code("s", anchor, k=1)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    searcher = threading.Thread(target=search)
    searcher.start()
    try:
        for start in range(0, 8000, 100):
            stage.add_codes("s", np.arange(start, start + 100), random_codes(100, seed=start))
        stage.wait(timeout=60)
    finally:
        done.set()
        searcher.join(timeout=10)
    assert not errors
    assert misses == 0  # the anchor (distance 0) stays findable before, during and after
    assert stage.stats()["first_stage_inverted"] == 8001


def test_the_id_map_agrees_with_a_dict_through_merges_and_removals() -> None:
    ids = first_stage._IdMap(buffer=256)
    reference: dict[int, int] = {}
    rng = np.random.default_rng(0)
    for step in range(5000):
        id_ = int(rng.integers(0, 3000))
        if rng.random() < 0.3:
            assert ids.pop(id_) == reference.pop(id_, None)
        else:
            ids.set(id_, step)
            reference[id_] = step
    bulk = rng.choice(10**6, 1000, replace=False)
    ids.set_many(bulk, bulk * 2)
    reference.update({int(i): int(i) * 2 for i in bulk})
    assert len(ids) == len(reference)
    assert all(ids.get(i) == v for i, v in reference.items())
    assert ids.get(-5) is None


def test_loading_the_static_model_does_not_import_torch(static_model: Path) -> None:
    code = ("import sys\n"
            "from promptcache.cache.semantic.first_stage import FirstStage, StaticEmbedder\n"
            f"stage = FirstStage(StaticEmbedder({str(static_model)!r}))\n"
            "stage.add('s', 1, 'hello there')\n"
            "assert stage.plausible('s', 'Hello there!') == [1]\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "False"


def test_the_static_model_is_small_and_names_its_source(static_model: Path) -> None:
    config = json.loads((static_model / "config.json").read_text())
    assert config["source_key"] == source_key(default_model_path())
    assert static_model.name == f"static-{config['source_key']}"
    size = sum(f.stat().st_size for f in static_model.iterdir())
    assert size < 20_000_000


def test_ensure_static_model_reuses_an_existing_directory(
        tmp_path: Path, static_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_distilling(*args: object, **kwargs: object) -> None:
        raise AssertionError("distilled again")

    target = tmp_path / static_model.name
    target.mkdir()
    (target / "config.json").write_text("{}")
    monkeypatch.setattr(first_stage, "distill", no_distilling)
    assert ensure_static_model(tmp_path) == target


def test_a_changed_source_model_gets_another_directory(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "model"
    source.mkdir()
    (source / "weights.bin").write_bytes(b"one")
    made: list[Path] = []

    def fake_distill(src: Path, out: Path, **_: object) -> None:
        (out / "config.json").write_text("{}")
        made.append(out)

    monkeypatch.setattr(first_stage, "distill", fake_distill)
    first = ensure_static_model(tmp_path / "static", source=source)
    assert ensure_static_model(tmp_path / "static", source=source) == first
    (source / "weights.bin").write_bytes(b"two")
    second = ensure_static_model(tmp_path / "static", source=source)
    assert second != first and len(made) == 2
    assert sorted(p.name for p in (tmp_path / "static").iterdir()
                  if not p.name.startswith(".")) == sorted([first.name, second.name])
