"""Canonical request -> cache key.

An exact entry is keyed by a hash of the canonical JSON of everything that changes the
answer: the endpoint and the whole request body (model, messages, system prompt, every
generation parameter, tools...) except the transport-only fields ``stream`` and
``stream_options``. Canonical JSON sorts keys, drops insignificant whitespace and writes
integral floats as integers (``1.0`` and ``1`` are the same temperature), so the key never
depends on how a client serialised its body. String contents are kept byte for byte.

Keys are scoped: the tenant (a hash of the caller's credential, unless sharing across
credentials is switched on) and the namespace (``X-Cache-Namespace``) are hashed into the
digest, so two scopes can never share an entry, and the namespace is also part of the Redis
key so that a namespace can be invalidated with one prefix scan.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from promptcache.cache.errors import RequestError

Api = Literal["chat", "completions", "embeddings", "messages"]

#: The cached routes and the API shape each one speaks.
ENDPOINTS: Final[dict[str, Api]] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/messages": "messages",
}

#: Fields that change how an answer is delivered, not what it is.
TRANSPORT_FIELDS: Final = frozenset({"stream", "stream_options"})

SHARED_TENANT: Final = "shared"
DEFAULT_NAMESPACE: Final = ""
MAX_NAMESPACE_LEN: Final = 128
_KEY_VERSION: Final = b"promptcache/exact/v1"


@dataclass(frozen=True, slots=True)
class CacheKey:
    """The identity of one exact entry."""

    tenant: str
    namespace: str
    endpoint: str
    digest: str  # 32 hex characters (128 bits); shown to callers as the key id

    @property
    def namespace_id(self) -> str:
        return namespace_id(self.namespace)

    def redis_key(self, prefix: str) -> str:
        return entry_key(prefix, self.namespace, self.digest)


def namespace_id(namespace: str) -> str:
    """A short, glob-safe id of a namespace name (names are caller-chosen strings)."""
    return hashlib.sha256(b"ns\0" + namespace.encode()).hexdigest()[:16]


def entry_key(prefix: str, namespace: str, digest: str) -> str:
    return f"{prefix}e:{namespace_id(namespace)}:{digest}"


def vector_key(prefix: str, namespace: str, digest: str) -> str:
    """Where the semantic record (scope, text, vector) of an entry lives."""
    return f"{prefix}v:{namespace_id(namespace)}:{digest}"


def namespace_patterns(prefix: str, namespace: str) -> tuple[str, str]:
    """The Redis SCAN patterns that match every entry and vector record of a namespace."""
    nsid = namespace_id(namespace)
    return f"{prefix}e:{nsid}:*", f"{prefix}v:{nsid}:*"


#: The request headers that identify a caller to the upstream (and so scope its entries).
CREDENTIAL_HEADERS: Final = ("authorization", "x-api-key")


def credential(headers: Mapping[str, str]) -> str | None:
    """What identifies the caller (both headers, if both are sent); ``headers`` must look
    names up case-insensitively (aiohttp's and httpx's header mappings do)."""
    parts = [f"{h}={headers[h]}" for h in CREDENTIAL_HEADERS if h in headers]
    return "\n".join(parts) or None


def tenant_id(credential: str | None, *, shared: bool = False) -> str:
    """Scope by credential: callers with different keys never share an entry."""
    if shared:
        return SHARED_TENANT
    return hashlib.sha256(b"tenant\0" + (credential or "").encode()).hexdigest()[:24]


def check_namespace(value: str) -> str:
    if len(value) > MAX_NAMESPACE_LEN or not value.isprintable():
        raise RequestError(
            f"X-Cache-Namespace must be printable and at most {MAX_NAMESPACE_LEN} characters",
            param="X-Cache-Namespace",
        )
    return value


def _normalise(value: Any) -> Any:
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer():
            return int(value)
        return value
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    return value


def parse_number(text: str) -> int | float:
    """``json.loads(..., parse_float=parse_number)`` yields bodies already normalised."""
    value = float(text)
    return int(value) if math.isfinite(value) and value.is_integer() else value


def loads_normalised(data: bytes | str) -> Any:
    """Parse JSON with integral floats as ints, so :func:`request_key` can skip a pass."""
    return json.loads(data, parse_float=parse_number)


def canonical_json(value: Any, *, normalised: bool = False) -> bytes:
    """Sorted keys, no whitespace, integral floats as ints, UTF-8 kept as is.

    ``normalised=True`` says ``value`` came from :func:`loads_normalised` (no float to fix).
    """
    return json.dumps(
        value if normalised else _normalise(value),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    ).encode()


def keyed_fields(body: dict[str, Any]) -> dict[str, Any]:
    """The part of a request body that determines the answer."""
    return {k: v for k, v in body.items() if k not in TRANSPORT_FIELDS}


def request_key(
    endpoint: str,
    body: dict[str, Any],
    *,
    tenant: str,
    namespace: str = DEFAULT_NAMESPACE,
    normalised: bool = False,
) -> CacheKey:
    h = hashlib.sha256(_KEY_VERSION)
    for part in (tenant.encode(), namespace.encode(), endpoint.encode()):
        h.update(b"\0" + part)
    h.update(b"\0" + canonical_json(keyed_fields(body), normalised=normalised))
    return CacheKey(tenant, namespace, endpoint, h.hexdigest()[:32])


#: Hash-tag shards of a Redis Cluster deployment: the byte budget and the LRU are split
#: evenly over this many tags (``{0}`` .. ``{15}``), each one slot on one master. A single
#: Redis uses one shard with no tag, so every entry competes in one global LRU.
CLUSTER_SHARDS: Final = 16


@dataclass(frozen=True, slots=True)
class KeyLayout:
    """Where everything the cache writes lives in Redis.

    An entry is ``member = "{nsid}:{digest}"``; its keys and its shard's bookkeeping share
    the shard's tag, so one script touches one slot::

        {tag}e:{member}   the entry             {tag}lru    ZSET member -> last hit (ms)
        {tag}v:{member}   its vector record     {tag}exp    ZSET member -> expires at (ms)
        {tag}l:{member}   the single-flight     {tag}sizes  HASH member -> bytes counted
                          lease                 {tag}meta   HASH bytes, entries, seq
                                                {tag}log    STREAM of inserts and removals

    ``tag`` is the prefix (``pc:``) with one shard, ``pc:{3}:`` with several.
    """

    prefix: str = "pc:"
    shards: int = 1

    def shard(self, digest: str) -> int:
        return int(digest[:8], 16) % self.shards if self.shards > 1 else 0

    def tag(self, shard: int) -> str:
        return self.prefix if self.shards == 1 else f"{self.prefix}{{{shard}}}:"

    def member(self, namespace: str, digest: str) -> str:
        return f"{namespace_id(namespace)}:{digest}"

    def entry(self, namespace: str, digest: str) -> str:
        return f"{self.tag(self.shard(digest))}e:{namespace_id(namespace)}:{digest}"

    def vector(self, namespace: str, digest: str) -> str:
        return f"{self.tag(self.shard(digest))}v:{namespace_id(namespace)}:{digest}"

    def lease(self, namespace: str, digest: str) -> str:
        return f"{self.tag(self.shard(digest))}l:{namespace_id(namespace)}:{digest}"

    def shard_keys(self, shard: int) -> list[str]:
        """KEYS[1..5] of every bookkeeping script: lru, exp, sizes, meta, log."""
        tag = self.tag(shard)
        return [f"{tag}lru", f"{tag}exp", f"{tag}sizes", f"{tag}meta", f"{tag}log"]

    def _any_tag(self) -> str:
        return self.prefix if self.shards == 1 else f"{self.prefix}{{*}}:"

    def patterns(self, namespace: str | None = None) -> tuple[str, str]:
        """SCAN patterns of the entries and vector records (of one namespace, or all)."""
        rest = "*" if namespace is None else f"{namespace_id(namespace)}:*"
        return f"{self._any_tag()}e:{rest}", f"{self._any_tag()}v:{rest}"

    def split(self, key: str) -> tuple[int, str]:
        """(shard, member) of an entry or vector key found by SCAN."""
        rest = key[len(self.prefix):]
        shard = 0
        if self.shards > 1:
            tag, _, rest = rest.partition(":")
            shard = int(tag.strip("{}"))
        return shard, rest[2:]  # drop "e:" / "v:"

    def digest_of(self, member: str) -> str:
        return member.rpartition(":")[2]
