"""The precise model on ONNX Runtime: the sentence-transformers vectors without torch.

:func:`ensure_onnx_model` writes the model's ONNX graph once per machine (from its
safetensors weights, by :mod:`~promptcache.cache.semantic.onnx_graph`: a second or two, no
torch) into ``onnx-<digest of the model, tuning and recipe>`` under the model cache
directory. :class:`OnnxEmbedder` runs it: the vectors are those of
``SentenceTransformer.encode(normalize_embeddings=True)`` to within 1e-5 (the same
tokenizer, truncation, stripping, mean pooling and normalisation), at 0.38x torch's CPU time
for a short text (0.86x near the 256-token window), and the sidecar idles at 188 MB
instead of 525 MB (no torch runtime).

Memory stays bounded whatever the traffic: the session runs on the caller's thread only
(``threads=1``) or on a fixed pool, without ONNX Runtime's growing memory arena; a batch's
length is padded up to a multiple of ``PAD_MULTIPLE`` tokens, so the shapes the runtime sees
are few; and a batch runs in chunks of at most ``MAX_CHUNK_CELLS`` attention cells (texts x
tokens squared), so the transient buffers of one call stay under about 40 MB.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from promptcache.cache.errors import ConfigError
from promptcache.cache.semantic.model_files import (
    CHARS_PER_TOKEN,
    build_once,
    clean_text,
    default_cache_dir,
    default_model_path,
    files_key,
    load_tuning,
)

#: Bump when the graph changes: the directory name changes with it.
ONNX_RECIPE = "promptcache-onnx/1"
#: A batch's token count is rounded up to a multiple of this (padding is masked out).
PAD_MULTIPLE = 16
#: The most (texts x tokens^2) one forward pass may have: 8 texts of 256 tokens.
MAX_CHUNK_CELLS = 8 * 256 * 256


def onnx_target(dest_dir: str | Path | None, source: Path, tuning: Path | None) -> Path:
    parent = Path(dest_dir) if dest_dir is not None else default_cache_dir()
    extra = (tuning,) if tuning is not None else ()
    return parent / f"onnx-{files_key(source, ONNX_RECIPE, *extra)}"


def ensure_onnx_model(dest_dir: str | Path | None = None, *,
                      source: str | Path | None = None,
                      tuning: str | Path | None = None) -> Path:
    """The directory of ``source``'s ONNX graph (default: the bundled MiniLM), with
    ``tuning`` (a ``promptcache fit --embedder`` file) applied to its weights; written once
    (about a second), reused afterwards."""
    from promptcache.cache.semantic.onnx_graph import check_supported

    src = Path(source) if source is not None else default_model_path()
    tuned = Path(tuning) if tuning is not None else None
    config = check_supported(src)
    return build_once(onnx_target(dest_dir, src, tuned),
                      lambda tmp: _write(src, tuned, config, tmp))


def _write(source: Path, tuning: Path | None, config: dict[str, Any], out: Path) -> None:
    import onnx
    from safetensors.numpy import load_file

    from promptcache.cache.semantic.onnx_graph import bert_graph

    weights = load_file(str(source / "model.safetensors"))
    weights = {k.removeprefix("bert."): v for k, v in weights.items()}
    meta: dict[str, str] = {}
    if tuning is not None:
        tensors, meta = load_tuning(tuning, framework="numpy")
        bad = [k for k, v in tensors.items()
               if k not in weights or weights[k].shape != v.shape]
        if bad:
            raise ConfigError(f"embedder tuning {tuning} does not fit this model ({bad[0]}, "
                              f"...): it was fitted on {meta.get('base', 'another model')}")
        weights.update(tensors)
    # weights in a file of their own, which ONNX Runtime maps rather than copies: pages of
    # the word table that no text uses are never read, and processes share the rest
    onnx.save(bert_graph(config, weights), str(out / "model.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="weights.bin", size_threshold=1024)
    for name in ("tokenizer.json", "sentence_bert_config.json"):
        if (source / name).is_file():
            (out / name).write_bytes((source / name).read_bytes())
    (out / "config.json").write_text(json.dumps({
        "recipe": ONNX_RECIPE, "source": str(source), "tuning": str(tuning or ""),
        "tuning_fingerprint": meta.get("fingerprint", ""),
        "dim": int(config["hidden_size"]), "model_type": config["model_type"],
    }, indent=2))


def session_options(threads: int) -> Any:
    """ONNX Runtime options for a bounded, polite session: ``threads`` intra-op threads
    (1: the calling thread only), no spinning, no growing arena, no memory-pattern plans
    per shape."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


class OnnxEmbedder:
    """A BERT sentence-transformers model on ONNX Runtime (no torch), loaded from a local
    directory only; the ``Embedder`` protocol, with the window and token counting that
    :class:`~promptcache.cache.semantic.embedding.BatchingEmbedder` uses."""

    def __init__(self, model_path: str | Path | None = None, *,
                 tuning: str | Path | None = None, threads: int = 1,
                 max_seq_length: int | None = 256, model_dir: str | Path | None = None
                 ) -> None:
        from tokenizers import Tokenizer

        self.model_path = Path(model_path) if model_path else default_model_path()
        self.tuning = Path(tuning) if tuning else None
        self.directory = ensure_onnx_model(model_dir, source=self.model_path,
                                           tuning=self.tuning)
        config = json.loads((self.directory / "config.json").read_text())
        self._fingerprint = str(config.get("tuning_fingerprint", ""))
        self._dim = int(config["dim"])
        window = max_seq_length or _declared_window(self.directory)
        #: The model's window: the tokens it reads, [CLS] and [SEP] included.
        self.max_tokens = int(window)
        #: The most of a text ever tokenised; a longer text does not fit the window.
        self.max_chars = self.max_tokens * CHARS_PER_TOKEN
        self._lock = threading.Lock()  # one forward pass (or load, or release) at a time
        #: Intra-op threads of the session (fixed when it is made).
        self.default_threads = max(1, threads)
        #: Bytes of the weights file the session maps (the memory report's model part).
        self.weight_bytes = (self.directory / "weights.bin").stat().st_size
        self.session: Any = None
        self.load()
        tokenizer = Tokenizer.from_file(str(self.directory / "tokenizer.json"))
        self._counter = Tokenizer.from_str(tokenizer.to_str())
        self._counter.no_truncation()
        self._counter.no_padding()
        pad = tokenizer.token_to_id("[PAD]")
        tokenizer.enable_truncation(self.max_tokens)
        tokenizer.enable_padding(pad_id=int(pad or 0), pad_token="[PAD]",
                                 pad_to_multiple_of=PAD_MULTIPLE)
        self.tokenizer = tokenizer
        self._count_lock = threading.Lock()

    @property
    def dim(self) -> int:
        return self._dim

    def load(self) -> None:
        """Open the session (idempotent): about 0.3 s; the weights file is mapped."""
        with self._lock:
            self._open()

    def _open(self) -> Any:
        """The session, opened if it is not (call with ``_lock`` held)."""
        if self.session is None:
            import onnxruntime as ort

            self.session = ort.InferenceSession(str(self.directory / "model.onnx"),
                                                session_options(self.default_threads),
                                                providers=["CPUExecutionProvider"])
        return self.session

    def release(self) -> None:
        """Close the session: its memory (mapped weights, packed copies, buffers) goes back
        to the system; the next :meth:`encode` (or :meth:`load`) opens it again."""
        with self._lock:
            self.session = None

    @property
    def name(self) -> str:
        """As the sentence-transformers embedder names the same vectors."""
        base = ("all-MiniLM-L6-v2" if self.model_path == default_model_path()
                else self.model_path.name)
        return f"{base}+{self._fingerprint}" if self.tuning else base

    def count_tokens(self, text: str) -> int:
        """The tokens the model would see of ``text`` untruncated (special ones included),
        counting at most its first ``max_chars`` characters."""
        with self._count_lock:
            return len(self._counter.encode(clean_text(text[:self.max_chars].strip()),
                                            add_special_tokens=True).ids)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors of ``texts`` (each read up to ``max_chars`` characters, stripped as
        sentence-transformers strips them, and ``max_tokens`` tokens of those)."""
        return self.run(texts, "sentence")

    def hidden_means(self, token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """The last layer's mean over every position of each (unpadded, equally long) id
        sequence: what the first stage's distillation reads."""
        ids = np.asarray(token_ids, np.int64)
        with self._lock:
            hidden = self._open().run(["hidden"], {"input_ids": ids,
                                                   "attention_mask": np.ones_like(ids)})[0]
        return np.asarray(hidden.mean(axis=1), np.float32)

    def run(self, texts: Sequence[str], output: str) -> np.ndarray:
        out = np.zeros((len(texts), self._dim), np.float32)
        if not texts:
            return out
        encodings = self.tokenizer.encode_batch(
            [clean_text(t[:self.max_chars]).strip() for t in texts])
        lengths = [-(-sum(e.attention_mask) // PAD_MULTIPLE) * PAD_MULTIPLE
                   for e in encodings]  # each text's tokens, padded up to the multiple
        order = sorted(range(len(texts)), key=lengths.__getitem__)
        with self._lock:
            session = self._open()
            for chunk in _chunks([lengths[n] for n in order]):
                rows = [order[n] for n in chunk]
                width = lengths[rows[-1]]
                ids = np.array([encodings[n].ids[:width] for n in rows], np.int64)
                mask = np.array([encodings[n].attention_mask[:width] for n in rows], np.int64)
                out[rows] = session.run([output], {"input_ids": ids,
                                                   "attention_mask": mask})[0]
        return out


def _chunks(lengths: list[int]) -> list[range]:
    """Consecutive runs of (sorted) texts whose count x longest^2 stays within
    ``MAX_CHUNK_CELLS``."""
    chunks: list[range] = []
    start = 0
    for end in range(1, len(lengths) + 1):
        if end == len(lengths) or (end + 1 - start) * lengths[end] ** 2 > MAX_CHUNK_CELLS:
            chunks.append(range(start, end))
            start = end
    return chunks


def _declared_window(directory: Path) -> int:
    try:
        return int(json.loads((directory / "sentence_bert_config.json").read_text())
                   ["max_seq_length"])
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{directory} does not declare a maximum sequence length") from exc


def cpu_threads() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
