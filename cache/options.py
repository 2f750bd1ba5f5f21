"""The cache's own options, one typed object: what both front ends pass to the engine.

:class:`EngineOptions` holds every option that shapes the cache itself (Redis, TTL, sizes,
breaker, budget, the semantic tier); the sidecar's ``Settings`` extends it with the HTTP-side
ones, so an option has one name and one default everywhere. Nothing heavy is imported here:
``promptcache serve --help`` reads these defaults.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs

from promptcache.cache.errors import ConfigError


def default_data_dir() -> str:
    """Where the sidecar's embedded Redis keeps its data unless told otherwise."""
    return str(Path(platformdirs.user_cache_dir("promptcache")) / "redis")


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineOptions:
    """The cache's own options; names, meanings and defaults as in the README's
    Configuration table (``--redis-url`` is ``redis_url`` here, and so on)."""

    redis_url: str | None = None
    data_dir: str | None = None
    default_ttl: float = 86400.0
    max_entry_bytes: int = 1 << 20
    max_bytes: int = 0
    index_max_bytes: int = 0
    flight_lease: float = 30.0
    flight_timeout: float = 60.0
    shared_cache: bool = False
    anonymous_tenant: bool = False
    credential_headers: tuple[str, ...] = ("authorization", "x-api-key", "api-key",
                                           "x-goog-api-key")
    credential_params: tuple[str, ...] = ("key",)
    max_ttl: float = 0.0
    redis_timeout: float = 0.25
    redis_max_connections: int = 256
    breaker_threshold: int = 3
    breaker_reset: float = 1.0
    semantic: bool = True
    similarity_threshold: float = 0.975
    length_relief: float = 0.045
    semantic_max_temperature: float = 1.0
    embedding_model: str | None = None
    embedding_tuning: str | None = None
    embed_backend: str = "onnx"
    index_kind: str = "auto"
    first_stage: bool = True
    index_warmup_wait: float = 1.0
    static_model_dir: str | None = None
    verifier_model: str = "default"
    verify_numbers: bool = True
    verify_negation: bool = True
    verify_entities: bool = True
    verify_contrast: bool = True
    embed_window: float = 0.001
    embed_max_batch: int = 64
    embed_threads: int = 1
    embed_niceness: int = 10
    semantic_wait_budget: float = 0.010
    embed_timeout: float = 1.0
    embed_memo_bytes: int = 16 << 20
    max_rss: int = 0
    near_cache_bytes: int | None = None  # None: min(64 MiB, max_bytes / 16)
    vector_backlog: int = 4096
    context_match: str = "strict"  # strict | dependent (cache/semantic/context.py)
    audit_rate: float = 0.0
    max_false_hit_rate: float = 0.0  # 0: no bound
    audit_pairs: str | None = None
    key_prefix: str = "pc:"
    key_ignore: tuple[str, ...] = ()


def read_toml(path: str, what: str) -> dict[str, Any]:
    """The TOML file at ``path``; a ConfigError naming ``what`` it is (e.g. "config file")
    if it cannot be read or parsed."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {path} is not valid TOML: {exc}") from exc
