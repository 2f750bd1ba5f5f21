"""The cascade's first stage: can any entry of a scope plausibly match a text?

A static embedding model distilled from the bundled MiniLM answers in a fraction of a
millisecond what the transformer answers in tens of milliseconds, well enough to say
"nothing here is close": a lookup the first stage finds no candidate for is a miss without
waiting for MiniLM; otherwise MiniLM (and the verifier) decide among its candidates.

- :func:`ensure_static_model` distils the static model once (every vocabulary token is run
  through MiniLM's ONNX graph; PCA, SIF weights by rank, the direction all texts share
  taken out) into ``static-<digest of the source model and recipe>``, so a changed model
  distils again; written into a temporary directory and renamed, reused afterwards.
- :class:`StaticEmbedder` loads it with numpy, safetensors and tokenizers only (no torch):
  a text's vector is the mean of its tokens' rows, normalised.
- :func:`binary_codes`: a vector's 256 sign bits (32 bytes); the Hamming distance between
  two codes is the first stage's dissimilarity.
- :class:`FirstStage` holds the codes per scope (with their ids and the id map: under 64
  bytes a vector), scans a scope whole up to 65,536 codes and through an inverted file
  (trained off the caller's thread) past that, and answers :meth:`FirstStage.plausible`.

FAISS should run one OpenMP thread (``faiss.omp_set_num_threads(1)``, as the sidecar
sets): its Hamming scans otherwise spread one query over threads that spin on a busy host.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from promptcache.cache.protocols import Embedder
from promptcache.cache.semantic.model_files import (
    build_once,
    default_cache_dir,
    default_model_path,
    files_key,
)

#: Bump when the distillation recipe changes: the directory name changes with it.
RECIPE = "promptcache-static/4"
STATIC_DIM = 256
SIF_COEFFICIENT = 1e-4
#: Texts are cut to this many characters before tokenising: bounded work on any input.
MAX_CHARS = 16384
_SKIPPED_TOKEN = re.compile(r"\[(unused\d+|PAD|CLS|SEP|MASK)\]")
_SPECIAL = re.compile(r"\[\w+\]")


# --- the static model: distilled once, loaded without torch ----------------------------------

def source_key(source: Path) -> str:
    """A digest of the source model's files (names and content) and of the recipe."""
    return files_key(source, RECIPE)


def find_static_model(dest_dir: str | Path | None = None, *,
                      source: str | Path | None = None) -> Path | None:
    """The directory :func:`ensure_static_model` would return, if it is there already."""
    target = _static_target(dest_dir, source)
    return target if (target / "config.json").is_file() else None


def _static_target(dest_dir: str | Path | None, source: str | Path | None) -> Path:
    parent = Path(dest_dir) if dest_dir is not None else default_cache_dir()
    return parent / f"static-{source_key(Path(source or default_model_path()))}"


def ensure_static_model(dest_dir: str | Path | None = None, *,
                        source: str | Path | None = None) -> Path:
    """The directory of the static model distilled from ``source`` (default: the bundled
    MiniLM), under ``dest_dir`` (default: the user cache dir) as ``static-<key>``.

    An existing directory is reused; otherwise the model is distilled (about 15 s
    of CPU, on ONNX Runtime: no torch) and written once (:func:`build_once`).
    """
    src = Path(source or default_model_path())
    return build_once(_static_target(dest_dir, src),
                      lambda tmp: distill(src, tmp, model_dir=dest_dir))


async def distil_in_subprocess(dest_dir: str | Path | None, source: Path, *,
                               niceness: int = 10) -> Path:
    """:func:`ensure_static_model` in a child process at ``niceness``: its CPU is what
    serving leaves, and its memory (a second model session, every token's output) is
    returned to the system when it exits. Raises RuntimeError if it fails."""
    import asyncio
    import sys

    args = [sys.executable, "-m", "promptcache.cache.semantic.first_stage", str(source),
            str(dest_dir or ""), str(niceness)]
    child = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                 stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await child.communicate()
    except BaseException:  # cancelled: the child goes too, and is reaped
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        await asyncio.shield(child.wait())
        raise
    if child.returncode != 0:
        raise RuntimeError(f"distillation failed ({child.returncode}): "
                           f"{out.decode(errors='replace')[-2000:]}")
    return Path(out.decode().strip().splitlines()[-1])


def distill(source: Path, out: Path, *, dim: int = STATIC_DIM, batch: int = 1024,
            model_dir: str | Path | None = None) -> dict[str, Any]:
    """Write a static model of ``source`` to ``out``: each vocabulary token's MiniLM output
    (``[CLS] token [SEP]``, the last layer's mean), PCA to ``dim`` components, times a SIF
    weight of the token's rank (model2vec's recipe). MiniLM runs as its ONNX graph (made
    under ``model_dir`` if it is not there yet). Returns the config written beside it."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer

    from promptcache.cache.semantic.onnx_embedder import OnnxEmbedder, cpu_threads

    started = time.perf_counter()
    model = OnnxEmbedder(source, threads=cpu_threads(), model_dir=model_dir)
    vocab = Tokenizer.from_file(str(source / "tokenizer.json")).get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    keep = [vocab[t] for t in tokens if not _SKIPPED_TOKEN.fullmatch(t)]
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    outputs = np.zeros((len(keep), model.dim), np.float32)
    for start in range(0, len(keep), batch):
        ids = [[cls, i, sep] for i in keep[start:start + batch]]
        outputs[start:start + len(ids)] = model.hidden_means(ids)
    del model
    table = np.zeros((len(tokens), dim), np.float32)
    table[keep] = _static_rows(outputs, [tokens[i] for i in keep], dim)
    save_file({"embeddings": table.astype(np.float16)}, str(out / "embeddings.safetensors"))
    shutil.copyfile(source / "tokenizer.json", out / "tokenizer.json")
    config = {"recipe": RECIPE, "source": str(source), "source_key": source_key(source),
              "dim": dim, "vocabulary": len(tokens), "distilled_tokens": len(keep),
              "seconds": round(time.perf_counter() - started, 1)}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return config


def _static_rows(outputs: np.ndarray, tokens: Sequence[str], dim: int) -> np.ndarray:
    """The static model's rows from the transformer's outputs (one a token of ``tokens``,
    in vocabulary order), reduced to ``dim`` columns:

    1. PCA to ``dim`` components and SIF weights by rank (model2vec's recipe);
    2. the direction every text shares is taken out: the rows' mean weighted as Zipf's law
       weights a token of that rank (words ranked before the single characters, which a
       BERT vocabulary lists first but which are rare as tokens). Texts then differ in sign
       on most axes, which makes sign bits informative: on real chat prompts the share of
       lookups that skip the precise model at the same recall goes from about 75% to 93%.

    A random rotation before taking signs (SimHash) measured worse: it spreads what
    remains of the shared direction over every bit.
    """
    centred = outputs - outputs.mean(axis=0)
    _, eigenvectors = np.linalg.eigh(centred.T.astype(np.float64) @ centred)
    axes = eigenvectors[:, ::-1][:, :dim]
    # an eigenvector's sign is arbitrary (and may differ between BLAS builds): fix it, so
    # every machine that distils the same model writes the same codes
    axes *= np.where(axes[np.abs(axes).argmax(axis=0), np.arange(dim)] < 0, -1.0, 1.0)
    rows = centred @ axes
    rank_probability = 1 / np.arange(2, len(rows) + 2)
    rank_probability /= rank_probability.sum()
    rows *= (SIF_COEFFICIENT / (SIF_COEFFICIENT + rank_probability))[:, None]
    by_use = sorted((n for n, t in enumerate(tokens) if not _SPECIAL.fullmatch(t)),
                    key=lambda n: (len(tokens[n].removeprefix("##")) <= 1, n))
    shared = rank_probability[:len(by_use)] @ rows[by_use]
    shared /= np.linalg.norm(shared)
    rows -= np.outer(rows @ shared, shared)
    return rows.astype(np.float32)


class StaticEmbedder:
    """Text -> unit vector as the mean of its tokens' static rows (numpy; no torch).

    Texts are cut to ``max_chars`` characters first. A text without tokens (empty) gets
    the ``[UNK]`` row, so two such texts still look alike to the first stage.
    """

    def __init__(self, path: str | Path, *, max_chars: int = MAX_CHARS) -> None:
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        self.path = Path(path)
        self.config = json.loads((self.path / "config.json").read_text())
        # float16 as stored (16 MB for MiniLM's vocabulary): a text's rows are widened
        # to float32 before they are averaged
        self.table = np.ascontiguousarray(
            load_file(str(self.path / "embeddings.safetensors"))["embeddings"], np.float16)
        self.tokenizer = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self._unk = int(self.tokenizer.token_to_id("[UNK]") or 0)
        self.max_chars = max_chars

    @property
    def dim(self) -> int:
        return int(self.table.shape[1])

    @property
    def name(self) -> str:
        return f"static-{self.config['source_key']}"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(n, dim) float32 unit vectors."""
        out = np.empty((len(texts), self.dim), np.float32)
        if not texts:
            return out
        encodings = self.tokenizer.encode_batch_fast(
            [t[:self.max_chars] for t in texts], add_special_tokens=False)
        for n, encoding in enumerate(encodings):
            out[n] = self.table[encoding.ids or [self._unk]].mean(axis=0, dtype=np.float32)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)


# --- binary codes and the per-scope index ---------------------------------------------------

CODE_BITS = 256
CODE_BYTES = CODE_BITS // 8


def binary_codes(vectors: np.ndarray) -> np.ndarray:
    """(n, 32) uint8: the sign bits of (n, 256) static vectors. The Hamming distance of two
    codes (0..256) is the first stage's dissimilarity: identical texts are at 0, unrelated
    ones near 128."""
    return np.packbits(np.asarray(vectors) > 0, axis=1)


class _Block:
    """Codes and their ids in growable arrays; removal moves the last one into the gap."""

    __slots__ = ("codes", "ids", "n")

    def __init__(self, codes: np.ndarray | None = None, ids: np.ndarray | None = None) -> None:
        self.codes = codes if codes is not None else np.empty((0, CODE_BYTES), np.uint8)
        self.ids = ids if ids is not None else np.empty(0, np.int64)
        self.n = len(self.ids)

    def extend(self, ids: np.ndarray, codes: np.ndarray) -> None:
        end = self.n + len(ids)
        if end > len(self.ids):
            cap = max(end, len(self.ids) + len(self.ids) // 8, 16)  # 12.5% spare at most
            self.codes = np.resize(self.codes, (cap, CODE_BYTES))  # copies what exists
            self.ids = np.resize(self.ids, cap)
        self.codes[self.n:end] = codes
        self.ids[self.n:end] = ids
        self.n = end

    def remove(self, id_: int) -> bool:
        where = np.flatnonzero(self.ids[:self.n] == id_)
        if not len(where):
            return False
        i, last = int(where[0]), self.n - 1
        self.codes[i], self.ids[i] = self.codes[last], self.ids[last]
        self.n = last
        if self.n * 5 < len(self.ids) * 4 and len(self.ids) > 64:  # 25% spare: give it back
            keep = self.n + self.n // 16 + 8
            self.codes, self.ids = self.codes[:keep].copy(), self.ids[:keep].copy()
        return True

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes + self.ids.nbytes)


class _Partition:
    """One scope's codes: one block scanned whole, or (past ``flat_limit`` codes) an
    inverted file: one block per centroid, each code in its nearest centroid's block, the
    blocks of the centroids nearest a query scanned until ``min_scan`` codes are covered.

    While a background rebuild runs, every change is also written to ``journal``, which
    the rebuild replays onto the new blocks before they replace these."""

    def __init__(self, number: int, scope: str) -> None:
        self.number, self.scope = number, scope
        self.blocks = [_Block()]
        self.counts = np.zeros(1, np.int64)  # codes in each block
        self.centroids: np.ndarray | None = None  # (blocks, 32) uint8 once inverted
        self.size = 0
        self.built_at = 0  # size when the inverted file was last trained
        self.strays = 0  # ids removed from another block than the id map said
        self.journal: list[tuple[np.ndarray, np.ndarray | None]] | None = None

    def add(self, ids: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Append ``codes``, each to its nearest centroid's block; the blocks used."""
        if self.centroids is None:
            blocks = np.zeros(len(codes), np.int64)
        else:
            blocks = _knn_hamming(codes, self.centroids, 1)[1][:, 0]
        for block in np.unique(blocks).tolist():
            members = blocks == block
            self.blocks[block].extend(ids[members], codes[members])
        np.add.at(self.counts, blocks, 1)
        self.size += len(ids)
        if self.journal is not None:
            self.journal.append((ids.copy(), codes.copy()))
        return blocks

    def remove(self, block: int, id_: int) -> bool:
        if not self.blocks[block].remove(id_):
            # Never expected: a safety net (counted) should the id map be stale.
            found = [b for b, blk in enumerate(self.blocks) if blk.remove(id_)]
            if not found:
                return False
            block = found[0]
            self.strays += 1
        self.counts[block] -= 1
        self.size -= 1
        if self.journal is not None:
            self.journal.append((np.array([id_], np.int64), None))
        return True

    def search(self, code: np.ndarray, k: int, min_scan: int, ranked: int
               ) -> tuple[np.ndarray, np.ndarray]:
        """(distances, ids) of the ``k`` nearest codes found, nearest first; an inverted
        file ranks the ``ranked`` nearest centroids and scans their blocks in that order
        until ``min_scan`` codes are covered."""
        if self.centroids is None:
            blocks = self.blocks
        else:
            _, order = _knn_hamming(code, self.centroids, min(ranked, len(self.centroids)))
            covered = np.cumsum(self.counts[order[0]])
            blocks = [self.blocks[b] for b in
                      order[0][:int(np.searchsorted(covered, min_scan)) + 1].tolist()]
        codes = [b.codes[:b.n] for b in blocks if b.n]
        if not codes:
            return np.empty(0, np.int32), np.empty(0, np.int64)
        ids = [b.ids[:b.n] for b in blocks if b.n]
        codes_all = codes[0] if len(codes) == 1 else np.concatenate(codes)
        ids_all = ids[0] if len(ids) == 1 else np.concatenate(ids)
        distances, rows = _knn_hamming(code, codes_all, min(k, len(ids_all)))
        found = rows[0] >= 0
        return distances[0][found], ids_all[rows[0][found]]

    @property
    def nbytes(self) -> int:
        extra = 0 if self.centroids is None else self.centroids.nbytes + self.counts.nbytes
        return sum(b.nbytes for b in self.blocks) + extra


class _Rebuilt:
    """A partition's inverted file rebuilt off the lock from a snapshot of its codes:
    blocks, and each snapshot id's block (sorted by id) for the id map."""

    def __init__(self, ids: np.ndarray, codes: np.ndarray, list_size: int) -> None:
        self.centroids = _train_centroids(codes, max(1, len(codes) // list_size))
        blocks = _knn_hamming(codes, self.centroids, 1)[1][:, 0]
        order = np.argsort(blocks, kind="stable")
        bounds = np.searchsorted(blocks[order], np.arange(len(self.centroids) + 1))
        self.blocks = [_Block(codes[order[a:b]], ids[order[a:b]])
                       for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        self.counts = np.diff(bounds).astype(np.int64)
        by_id = np.argsort(ids)
        self.ids, self.block_of = ids[by_id], blocks[by_id]
        self.added: dict[int, int] = {}  # ids the journal added: their block

    def find(self, id_: int) -> int | None:
        """``id_``'s block in the rebuilt file, or None (not in it)."""
        if id_ in self.added:
            block = self.added[id_]
            return None if block < 0 else block
        i = int(np.searchsorted(self.ids, id_))
        return int(self.block_of[i]) if i < len(self.ids) and self.ids[i] == id_ else None

    def placed(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, block) of every id in the rebuilt file, sorted by id."""
        if not self.added:
            return self.ids, self.block_of
        added = np.fromiter(self.added, np.int64, len(self.added))
        blocks = np.fromiter(self.added.values(), np.int64, len(self.added))
        kept = ~np.isin(self.ids, added)
        ids = np.concatenate([self.ids[kept], added[blocks >= 0]])
        block_of = np.concatenate([self.block_of[kept], blocks[blocks >= 0]])
        order = np.argsort(ids)
        return ids[order], block_of[order]

    def replay(self, journal: list[tuple[np.ndarray, np.ndarray | None]]) -> None:
        """Apply the changes made since the snapshot began (some may be in it already:
        each is applied as "remove if present, then add")."""
        for ids, codes in journal:
            where = np.minimum(np.searchsorted(self.ids, ids), max(len(self.ids) - 1, 0))
            present = (self.ids[where] == ids) if len(self.ids) else np.zeros(len(ids), bool)
            if self.added:
                present |= np.fromiter((i in self.added for i in ids.tolist()), bool, len(ids))
            for id_ in ids[present].tolist():
                block = self.find(id_)
                if block is not None and self.blocks[block].remove(id_):
                    self.counts[block] -= 1
                self.added[id_] = -1  # not in the rebuilt file, unless added back below
            if codes is not None:
                blocks = _knn_hamming(codes, self.centroids, 1)[1][:, 0]
                for block in np.unique(blocks).tolist():
                    members = blocks == block
                    self.blocks[block].extend(ids[members], codes[members])
                np.add.at(self.counts, blocks, 1)
                self.added.update(zip(ids.tolist(), blocks.tolist(), strict=True))


def _knn_hamming(queries: np.ndarray, codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    return faiss.knn_hamming(np.ascontiguousarray(queries), np.ascontiguousarray(codes), k)


class _IdMap:
    """id -> int64 in about 16 bytes an id: sorted arrays, plus a dict of recent ids (a
    Python dict costs ~100 bytes an entry) merged into them when it holds 1/64 of the ids
    (at least 256, at most ``buffer``): an insertion costs O(log n) and, amortised, one
    merge's copy divided by at least 256."""

    def __init__(self, buffer: int = 4096) -> None:
        self.keys = np.empty(0, np.int64)
        self.values = np.empty(0, np.int64)  # -1: removed
        self.recent: dict[int, int] = {}
        self.buffer = buffer
        self.live = 0

    def _full(self) -> bool:
        return len(self.recent) >= max(256, min(self.buffer, self.live // 64))

    def __len__(self) -> int:
        return self.live

    def _find(self, id_: int) -> int:
        i = int(np.searchsorted(self.keys, id_))
        return i if i < len(self.keys) and self.keys[i] == id_ else -1

    def get(self, id_: int) -> int | None:
        value = self.recent.get(id_)
        if value is not None:
            return value
        i = self._find(id_)
        return None if i < 0 or self.values[i] < 0 else int(self.values[i])

    def set(self, id_: int, value: int) -> None:
        i = self._find(id_)
        if i >= 0:
            self.live += self.values[i] < 0
            self.values[i] = value
            return
        self.live += id_ not in self.recent
        self.recent[id_] = value
        if self._full():
            self._merge()

    def set_many(self, ids: np.ndarray, values: np.ndarray) -> None:
        """Set each of ``ids`` (distinct) to its value: those in the sorted arrays in place,
        new ones through the dict, or (a large batch) in one sorted insertion."""
        ids, values = np.asarray(ids, np.int64), np.asarray(values, np.int64)
        old = np.zeros(len(ids), bool)
        if len(self.keys):
            where = np.minimum(np.searchsorted(self.keys, ids), len(self.keys) - 1)
            old = self.keys[where] == ids
            self.live += int((self.values[where[old]] < 0).sum())
            self.values[where[old]] = values[old]
        new, new_values = ids[~old], values[~old]
        if len(new) < 256:
            for id_, value in zip(new.tolist(), new_values.tolist(), strict=True):
                self.set(id_, value)
            return
        for id_ in new.tolist():  # a large batch goes to the arrays: none stays in the dict
            if self.recent.pop(id_, None) is not None:
                self.live -= 1
        order = np.argsort(new)
        at = np.searchsorted(self.keys, new[order])
        self.keys = np.insert(self.keys, at, new[order])
        self.values = np.insert(self.values, at, new_values[order])
        self.live += len(new)

    def known(self, ids: np.ndarray) -> np.ndarray:
        """A mask of the ``ids`` held (vectorised: a bulk add checks a million at once)."""
        held = np.isin(ids, np.fromiter(self.recent, np.int64, len(self.recent)))
        if len(self.keys):
            where = np.minimum(np.searchsorted(self.keys, ids), len(self.keys) - 1)
            held |= (self.keys[where] == ids) & (self.values[where] >= 0)
        return held

    def pop(self, id_: int) -> int | None:
        value = self.recent.pop(id_, None)
        if value is None:
            i = self._find(id_)
            if i < 0 or self.values[i] < 0:
                return None
            value, self.values[i] = int(self.values[i]), -1
        self.live -= 1
        return value

    def positions(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where ``ids`` (sorted) are in the sorted arrays, for :meth:`repoint` (valid
        while those arrays are not replaced by a merge)."""
        keys = self.keys  # read once: another thread may replace it meanwhile
        return keys, np.minimum(np.searchsorted(keys, ids), max(len(keys) - 1, 0))

    def repoint(self, ids: np.ndarray, values: np.ndarray, owner: int,
                positions: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Set each of ``ids`` (sorted) whose value is not negative to it, where the id is
        held with ``owner`` in its high bits (``value >> 16``); vectorised but for the
        few ids in the dict. ``positions`` from :meth:`positions` spares the search."""
        if positions is None or positions[0] is not self.keys:
            positions = self.positions(ids)
        at = positions[1]
        if len(self.keys) and len(ids):
            ours = ((self.keys[at] == ids) & (self.values[at] >= 0)
                    & ((self.values[at] >> 16) == owner) & (values >= 0))
            self.values[at[ours]] = values[ours]
        for id_, value in list(self.recent.items()):
            i = int(np.searchsorted(ids, id_))
            if value >> 16 == owner and i < len(ids) and ids[i] == id_ and values[i] >= 0:
                self.recent[id_] = int(values[i])

    def _merge(self) -> None:
        alive = self.values >= 0
        keys, values = self.keys, self.values
        if (~alive).sum() * 4 > len(keys):  # compact when a quarter are removed
            keys, values = keys[alive], values[alive]
        new = np.fromiter(self.recent, np.int64, len(self.recent))
        order = np.argsort(new)
        new_values = np.fromiter(self.recent.values(), np.int64, len(self.recent))[order]
        where = np.searchsorted(keys, new[order])
        self.keys = np.insert(keys, where, new[order])
        self.values = np.insert(values, where, new_values)
        self.recent = {}

    @property
    def nbytes(self) -> int:
        return int(self.keys.nbytes + self.values.nbytes) + 100 * len(self.recent)


#: The operating point chosen by ``python -m benchmarks.cascade`` (see its report): the
#: 8 nearest codes, kept if at most this many of their 256 bits differ from the query's.
DEFAULT_K = 8
DEFAULT_MAX_DISTANCE = 60


class FirstStage:
    """Binary codes of the static vectors of every indexed entry, per scope.

    :meth:`plausible` returns the ids (at most ``k``) of entries of a scope whose code is
    within ``max_distance`` bits of the text's: an empty list means no entry can match,
    so the lookup is a miss without the precise model. Thread-safe: one lock guards the
    structure, held for a search (well under a millisecond) or an update (microseconds);
    embedding happens outside it. A partition past ``flat_limit`` codes is rebuilt as an
    inverted file (one centroid per ``list_size`` codes, k-means on the codes' bits), and
    rebuilt again each time it doubles, on a background thread from a snapshot while
    searches and updates go on against the old one; the changes made meanwhile are
    replayed and the new file swapped in under the lock (milliseconds). A search there
    scans the blocks of the nearest centroids until ``min_scan`` codes are covered: about
    the cost of a 32k-code scan whatever the scope's size.
    """

    def __init__(self, embedder: Embedder | None = None, *, k: int = DEFAULT_K,
                 max_distance: int = DEFAULT_MAX_DISTANCE, flat_limit: int = 65536,
                 list_size: int = 512, min_scan: int = 32768, background: bool = True) -> None:
        self.embedder = embedder
        self.k, self.max_distance = k, max_distance
        self.flat_limit, self.list_size, self.min_scan = flat_limit, list_size, min_scan
        self.background = background
        self._lock = threading.Lock()
        self._parts: dict[int, _Partition] = {}
        self._by_scope: dict[str, _Partition] = {}
        self._where = _IdMap()  # id -> partition number << 16 | block
        self._next = 0
        self._trainers: list[threading.Thread] = []
        self._strays = 0  # of partitions since removed

    # -- what callers use -------------------------------------------------------------------

    @property
    def embedder_bytes(self) -> int:
        """Bytes of the static model's table (0 without one)."""
        table = getattr(self.embedder, "table", None)
        return int(table.nbytes) if isinstance(table, np.ndarray) else 0

    def codes(self, texts: Sequence[str]) -> np.ndarray:
        """(n, 32) uint8 codes of ``texts`` (blocking: call from a thread); a record may
        store them, so a restart indexes without embedding again."""
        if self.embedder is None:
            raise TypeError("this FirstStage was made without an embedder: add codes")
        return binary_codes(self.embedder.encode(texts))

    def add(self, scope: str, id_: int, text: str) -> None:
        self.add_codes(scope, np.array([id_], np.int64), self.codes([text]))

    def add_codes(self, scope: str, ids: np.ndarray, codes: np.ndarray) -> None:
        """Index ``codes`` under ``ids`` in ``scope``; re-adding an id replaces it."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        codes = np.asarray(codes, np.uint8).reshape(len(ids), CODE_BYTES)
        if not len(ids):
            return
        if len(np.unique(ids)) < len(ids):  # the last code of a repeated id wins
            last = len(ids) - 1 - np.unique(ids[::-1], return_index=True)[1]
            ids, codes = ids[last], codes[last]
        train = None
        with self._lock:
            self._remove_locked(ids[self._where.known(ids)].tolist())
            part = self._by_scope.get(scope)
            if part is None:
                part = self._by_scope[scope] = self._parts[self._next] = _Partition(
                    self._next, scope)
                self._next += 1
            blocks = part.add(ids, codes)
            self._where.set_many(ids, (part.number << 16) | blocks)
            due = self.flat_limit if part.centroids is None else 2 * part.built_at
            if part.size > due and part.journal is None:
                part.journal = []  # from here on, changes are replayed onto the rebuild
                train = part
        if train is not None:
            self._train(train)

    def remove(self, ids: Sequence[int] | np.ndarray) -> int:
        """Forget ``ids`` (unknown ones are ignored); how many were held."""
        with self._lock:
            return self._remove_locked(np.asarray(ids, np.int64).reshape(-1).tolist())

    def plausible(self, scope: str, text: str, k: int | None = None) -> list[int]:
        """Ids of entries of ``scope`` that may match ``text``, nearest first (blocking)."""
        if not self.scope_size(scope):
            return []
        return self.plausible_code(scope, self.codes([text])[0], k)

    def plausible_code(self, scope: str, code: np.ndarray, k: int | None = None) -> list[int]:
        return [i for i, d in self.search_code(scope, code, k) if d <= self.max_distance]

    def search_code(self, scope: str, code: np.ndarray, k: int | None = None
                    ) -> list[tuple[int, int]]:
        """The (id, Hamming distance) of the ``k`` nearest codes of ``scope`` found."""
        query = np.asarray(code, np.uint8).reshape(1, CODE_BYTES)
        with self._lock:
            part = self._by_scope.get(scope)
            if part is None:
                return []
            distances, ids = part.search(query, k or self.k, self.min_scan,
                                         4 * self.min_scan // self.list_size)
        return list(zip(ids.tolist(), distances.tolist(), strict=True))

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, id_: int) -> bool:
        with self._lock:
            return self._where.get(int(id_)) is not None

    def scope_size(self, scope: str) -> int:
        part = self._by_scope.get(scope)
        return part.size if part is not None else 0

    @property
    def nbytes(self) -> int:
        """Bytes held: codes, ids and spare capacity, centroids, and the id map."""
        with self._lock:
            return sum(p.nbytes for p in self._parts.values()) + self._where.nbytes

    def stats(self) -> dict[str, int]:
        with self._lock:
            inverted = [p for p in self._parts.values() if p.centroids is not None]
            return {"first_stage_vectors": len(self._where),
                    "first_stage_partitions": len(self._parts),
                    "first_stage_inverted": sum(p.size for p in inverted),
                    "first_stage_lists": sum(len(p.blocks) for p in inverted),
                    "first_stage_strays": self._strays + sum(
                        p.strays for p in self._parts.values())}

    def wait(self, timeout: float | None = None) -> None:
        """Wait for background training to finish (tests, benchmarks, shutdown)."""
        for thread in list(self._trainers):
            thread.join(timeout)

    # -- inside ------------------------------------------------------------------------------

    def _remove_locked(self, ids: list[int]) -> int:
        removed = 0
        for id_ in ids:
            where = self._where.pop(id_)
            if where is None:
                continue
            part = self._parts[where >> 16]
            removed += part.remove(where & 0xFFFF, id_)
            if not part.size and part.journal is None:
                self._strays += part.strays
                del self._parts[part.number], self._by_scope[part.scope]
        return removed

    def _train(self, part: _Partition) -> None:
        if not self.background:
            self._rebuild(part)
            return
        self._trainers = [t for t in self._trainers if t.is_alive()]
        thread = threading.Thread(target=self._rebuild, args=(part,), daemon=True,
                                  name=f"first-stage-rebuild-{part.number}")
        self._trainers.append(thread)
        thread.start()

    def _rebuild(self, part: _Partition) -> None:
        """Snapshot the partition block by block (the lock taken for each copy), train and
        fill a new inverted file and replay the journal off the lock, then under it replay
        the journal's last entries, point the id map at the new blocks and swap them in."""
        try:
            with self._lock:
                blocks = list(part.blocks)
            copies = []
            for block in blocks:
                with self._lock:
                    copies.append((block.ids[:block.n].copy(), block.codes[:block.n].copy()))
            if not sum(len(i) for i, _ in copies):
                return  # emptied meanwhile
            rebuilt = _Rebuilt(np.concatenate([i for i, _ in copies]),
                               np.concatenate([c for _, c in copies]), self.list_size)
            done = 0
            while True:  # catch up off the lock while changes keep coming
                with self._lock:
                    pending = part.journal[done:] if part.journal is not None else []
                    if len(pending) <= 16:
                        break
                rebuilt.replay(pending)
                done += len(pending)
            ids, block_of = rebuilt.placed()
            tag = part.number << 16
            positions = self._where.positions(ids)  # its arrays are replaced, never changed
            with self._lock:
                if self._parts.get(part.number) is not part or part.journal is None:
                    return
                last = part.journal[done:]
                rebuilt.replay(last)
                self._where.repoint(ids, tag | block_of, part.number, positions)
                if last:  # the ids these last changes touched, as they are now
                    touched = np.unique(np.concatenate([i for i, _ in last]))
                    now = np.array([rebuilt.added.get(i, -1) for i in touched.tolist()])
                    self._where.repoint(touched, np.where(now >= 0, tag | now, -1),
                                        part.number)
                part.blocks, part.counts = rebuilt.blocks, rebuilt.counts
                part.centroids = rebuilt.centroids
                part.built_at = part.size
        finally:
            with self._lock:
                part.journal = None
                if not part.size and self._parts.get(part.number) is part:
                    del self._parts[part.number], self._by_scope[part.scope]


def _train_centroids(codes: np.ndarray, nlist: int, *, sample: int = 131072,
                     iterations: int = 8) -> np.ndarray:
    """``nlist`` binary centroids: k-means in Hamming space (assign each code to its
    nearest centroid by popcount, set each centroid bit to its members' majority), which
    costs a few popcounts a pair where float k-means on the bits costs 256 products."""
    rng = np.random.default_rng(0)
    if len(codes) > sample:
        codes = codes[rng.choice(len(codes), sample, replace=False)]
    nlist = max(1, min(nlist, len(codes) // 16, 0xFFFF))
    centroids = codes[rng.choice(len(codes), nlist, replace=False)].copy()
    bits = np.unpackbits(codes, axis=1)
    for _ in range(iterations):
        assigned = _knn_hamming(codes, centroids, 1)[1][:, 0]
        order = np.argsort(assigned, kind="stable")
        starts = np.searchsorted(assigned[order], np.arange(nlist))
        counts = np.diff(np.append(starts, len(codes)))
        filled = counts > 0
        sums = np.add.reduceat(bits[order], starts[filled], axis=0, dtype=np.int32)
        centroids[filled] = np.packbits(sums * 2 > counts[filled, None], axis=1)
    return centroids


def main(argv: Sequence[str]) -> None:
    """``python -m promptcache.cache.semantic.first_stage SOURCE [DEST [NICENESS]]``: distil
    the static model of the model directory SOURCE once, into DEST (default: the user cache
    dir), at NICENESS; print its directory."""
    if not 1 <= len(argv) <= 3:
        raise SystemExit(main.__doc__)
    source, dest, nice = argv[0], (argv[1:2] or [""])[0] or None, int((argv[2:3] or ["0"])[0])
    if nice > 0:
        with contextlib.suppress(OSError):
            os.nice(nice)
    print(ensure_static_model(dest, source=source), flush=True)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
