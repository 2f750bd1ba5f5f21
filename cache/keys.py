"""Canonical request -> cache key.

An exact entry is keyed by a hash of the canonical JSON of everything that changes the
answer: the endpoint and the whole request body (model, messages, system prompt, every
generation parameter, tools...) except the transport-only fields ``stream`` and
``stream_options``, and the fields the operator chose to leave out (``--key-ignore``, never
one of :data:`UNIGNORABLE_FIELDS`). Canonical JSON sorts keys, drops insignificant
whitespace and writes integral floats as integers (``1.0`` and ``1`` are the same
temperature), so the key never depends on how a client serialised its body. String
contents are kept byte for byte.

Keys are scoped: the tenant (a hash of the caller's credential, unless sharing across
credentials is switched on), the namespace (``X-Cache-Namespace``) and the *variant* (the
request's query string and the headers that change answers, such as ``anthropic-version``)
are hashed into the digest, so two scopes can never share an entry. The namespace is also
part of the entry's Redis key (:mod:`promptcache.cache.redis.layout` spells those), so that
a namespace can be invalidated with one prefix scan; and the digest's last 8 hex digits are
the tenant's tag (:func:`tenant_tag`), so that one tenant's entries can be purged by a scan
too.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any, Final

from promptcache.cache.errors import ConfigError, RequestError

#: Fields that change how an answer is delivered, not what it is.
TRANSPORT_FIELDS: Final = frozenset({"stream", "stream_options"})
#: Fields ``--key-ignore`` may never leave out of the key: they are what is asked.
UNIGNORABLE_FIELDS: Final = frozenset({"messages", "model", "input", "prompt", "system",
                                       "instructions", "tools"})

SHARED_TENANT: Final = "shared"
#: The tenant of requests that carry no credential, where the operator allows caching them.
ANONYMOUS_TENANT: Final = "anonymous"
DEFAULT_NAMESPACE: Final = ""
MAX_NAMESPACE_LEN: Final = 128
#: Hex digits of the digest that tag its tenant (the rest is the request's hash).
TENANT_TAG_LEN: Final = 8
_KEY_VERSION: Final = b"promptcache/exact/v2"


@dataclass(frozen=True, slots=True)
class CacheKey:
    """The identity of one exact entry."""

    tenant: str
    namespace: str
    endpoint: str
    digest: str  # 32 hex characters (128 bits); shown to callers as the key id


def tenant_id(credential: str | None, *, shared: bool = False) -> str:
    """Scope by credential: callers with different keys never share an entry."""
    if shared:
        return SHARED_TENANT
    return hashlib.sha256(b"tenant\0" + (credential or "").encode()).hexdigest()[:24]


def tenant_tag(tenant: str) -> str:
    """The last :data:`TENANT_TAG_LEN` hex digits of every digest of ``tenant``'s entries."""
    return hashlib.sha256(b"tag\0" + tenant.encode()).hexdigest()[:TENANT_TAG_LEN]


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


def check_key_ignore(names: Iterable[str]) -> tuple[str, ...]:
    """``--key-ignore``'s fields, or ConfigError if one of them is what is asked (the
    :data:`UNIGNORABLE_FIELDS`): ignoring it would serve answers to other questions."""
    names = tuple(names)
    refused = sorted(set(names) & UNIGNORABLE_FIELDS)
    if refused:
        raise ConfigError(f"--key-ignore may not leave {', '.join(refused)} out of the key: "
                          "it changes the answer")
    return names


def keyed_fields(body: dict[str, Any], ignore: Collection[str] = ()) -> dict[str, Any]:
    """The part of a request body that determines the answer; ``ignore`` is the fields
    the operator left out of the key (``--key-ignore``)."""
    if ignore:
        return {k: v for k, v in body.items() if k not in TRANSPORT_FIELDS and k not in ignore}
    return {k: v for k, v in body.items() if k not in TRANSPORT_FIELDS}


def request_key(
    endpoint: str,
    body: dict[str, Any],
    *,
    tenant: str,
    namespace: str = DEFAULT_NAMESPACE,
    variant: str = "",
    normalised: bool = False,
    ignore: Collection[str] = (),
) -> CacheKey:
    """The key of ``body`` sent to ``endpoint`` in a scope; ``variant`` is what else changes
    the answer (:func:`promptcache.cache.request.variant_of`: query string, version headers);
    ``ignore``, top-level fields left out (``--key-ignore``)."""
    h = hashlib.sha256(_KEY_VERSION)
    for part in (tenant.encode(), namespace.encode(), endpoint.encode(), variant.encode()):
        h.update(b"\0" + part)
    h.update(b"\0" + canonical_json(keyed_fields(body, ignore), normalised=normalised))
    digest = h.hexdigest()[:32 - TENANT_TAG_LEN] + tenant_tag(tenant)
    return CacheKey(tenant, namespace, endpoint, digest)
