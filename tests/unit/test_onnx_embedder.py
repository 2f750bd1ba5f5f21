"""The ONNX backend gives sentence-transformers' vectors without torch, in bounded work."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from promptcache.cache.errors import ConfigError
from promptcache.cache.semantic import onnx_embedder
from promptcache.cache.semantic.embedding import SentenceTransformerEmbedder, load_embedder
from promptcache.cache.semantic.model_files import default_model_path
from promptcache.cache.semantic.onnx_embedder import OnnxEmbedder, _chunks, ensure_onnx_model

PROMPTS = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "chat_prompts.jsonl.gz"


@pytest.fixture(scope="module")
def torch_embedder() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder()


def texts() -> list[str]:
    """Real chat prompts of every length (some far past the window), and edge cases."""
    with gzip.open(PROMPTS, "rt") as f:
        prompts = [json.loads(line)["prompt"] for _, line in zip(range(400), f, strict=False)]
    by_length = sorted(prompts, key=len)
    picked = by_length[::20] + by_length[-5:]
    return picked + ["", "   ", "  leading and trailing  ", "emoji \U0001f600 and accents: déjà vu",
                     "lone surrogate \ud800 here", "a" * 5000, "word " * 400]


def test_vectors_match_sentence_transformers(embedder: OnnxEmbedder,
                                             torch_embedder: SentenceTransformerEmbedder
                                             ) -> None:
    batch = texts()
    ours = embedder.encode(batch)
    theirs = torch_embedder.encode(batch)
    assert ours.shape == theirs.shape == (len(batch), 384)
    assert np.abs(ours - theirs).max() < 1e-5
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_a_text_has_the_same_vector_alone_and_in_any_batch(embedder: OnnxEmbedder) -> None:
    batch = texts()
    together = embedder.encode(batch)
    alone = np.stack([embedder.encode([t])[0] for t in batch[::7]])
    assert np.abs(together[::7] - alone).max() < 1e-5


def test_token_counts_match_what_the_model_reads(embedder: OnnxEmbedder,
                                                 torch_embedder: SentenceTransformerEmbedder
                                                 ) -> None:
    for text in texts():
        assert embedder.count_tokens(text) == torch_embedder.count_tokens(text.strip())
    assert embedder.max_tokens == 256 and embedder.max_chars == 256 * 8


def test_batches_run_in_chunks_that_bound_the_attention_buffers() -> None:
    lengths = sorted([16] * 100 + [64] * 40 + [256] * 20)
    chunks = _chunks(lengths)
    assert [n for c in chunks for n in c] == list(range(len(lengths)))  # each text once
    for chunk in chunks:
        longest = lengths[chunk[-1]]
        assert len(chunk) * longest ** 2 <= onnx_embedder.MAX_CHUNK_CELLS
    assert [len(c) for c in chunks if lengths[c[0]] == 256] == [8, 8, 4]  # 8 a pass
    for chunk, after in zip(chunks, chunks[1:], strict=False):  # none could take one more
        assert (len(chunk) + 1) * lengths[after[0]] ** 2 > onnx_embedder.MAX_CHUNK_CELLS
    assert _chunks([]) == []


def test_the_graph_is_written_once_and_reused(tmp_path: Path) -> None:
    first = ensure_onnx_model(tmp_path)
    stamp = (first / "weights.bin").stat().st_mtime_ns
    assert ensure_onnx_model(tmp_path) == first
    assert (first / "weights.bin").stat().st_mtime_ns == stamp
    assert json.loads((first / "config.json").read_text())["dim"] == 384
    assert OnnxEmbedder(model_dir=tmp_path).weight_bytes == (first / "weights.bin").stat().st_size


def test_a_model_this_backend_cannot_run_is_refused_with_the_way_out(tmp_path: Path) -> None:
    source = tmp_path / "model"
    shutil.copytree(default_model_path(), source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "model_type": "roberta"}))
    with pytest.raises(ConfigError, match="--embed-backend torch"):
        OnnxEmbedder(source, model_dir=tmp_path / "cache")
    with pytest.raises(ConfigError, match="onnx or torch"):
        load_embedder("tensorflow")
