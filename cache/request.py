"""One request as the cache sees it: parsed, validated, keyed, with its per-request controls.

:func:`prepare` turns a body and the values of the control headers into a :class:`Prepared`
(the exact key, the semantic view, the Cache-Control directives; RequestError, a 4xx, on bad
input). :func:`prepare_http` reads those values from an HTTP request's headers, for both
HTTP front ends (the sidecar and the httpx transport). :data:`CONTROL_HEADERS` are the
cache's own request headers, which never reach the upstream.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from promptcache.cache.api import ENDPOINTS, STREAMABLE, Api
from promptcache.cache.cache_control import CacheControl
from promptcache.cache.engine import Engine
from promptcache.cache.errors import RequestError
from promptcache.cache.keys import CacheKey, check_namespace, loads_normalised, request_key
from promptcache.cache.semantic.scope import SemanticView, semantic_view, temperature
from promptcache.cache.validate import validate_body

#: The cache's per-request controls (the README's Per-request control); the upstream never
#: sees them. Cache-Control is the standard header and is passed on.
CONTROL_HEADERS: Final = ("x-cache-namespace", "x-cache-mode", "x-cache-threshold")


class RequestHeaders(Protocol):
    """A request's headers, looked up case-insensitively (aiohttp's ``request.headers``)."""

    def get(self, key: str, /) -> str | None: ...

    def getall(self, key: str, default: list[str], /) -> list[str]:
        """Every value of a header sent more than once (``default`` if it is absent)."""
        ...

    def __contains__(self, key: object, /) -> bool: ...

    def __getitem__(self, key: str, /) -> str: ...


#: The request headers that identify a caller to the upstream (and so scope its entries).
CREDENTIAL_HEADERS: Final = ("authorization", "x-api-key")


def credential(headers: RequestHeaders) -> str | None:
    """What identifies the caller (both headers, if both are sent)."""
    parts = [f"{h}={headers[h]}" for h in CREDENTIAL_HEADERS if h in headers]
    return "\n".join(parts) or None


@dataclass(slots=True)
class Prepared:
    """Everything the cache knows about one request to a cached endpoint."""

    api: Api
    endpoint: str
    body: dict[str, Any]
    key: CacheKey
    control: CacheControl
    streaming: bool
    view: SemanticView | None = None  # set when the request may be stored for semantic hits
    semantic_lookup: bool = False  # the cache mode is not "exact"
    threshold: float | None = None  # the request's threshold, raised to the configured one

    @property
    def include_usage(self) -> bool:
        opts = self.body.get("stream_options")
        return isinstance(opts, dict) and opts.get("include_usage") is True


def prepare(engine: Engine, api: Api, endpoint: str, body_bytes: bytes, *,
            credential: str | None, namespace: str = "", cache_control: Iterable[str] = (),
            mode: str | None = None, threshold: str | None = None) -> Prepared:
    """Parse, validate and key a request body; RequestError (a 4xx) on bad input.

    ``namespace``, ``cache_control``, ``mode`` and ``threshold`` are the values of the
    ``X-Cache-Namespace``, ``Cache-Control``, ``X-Cache-Mode`` and ``X-Cache-Threshold``
    headers (see the README's Per-request control).
    """
    try:
        body = loads_normalised(body_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}", param="body") from exc
    validate_body(api, body)
    namespace = check_namespace(namespace)
    control = CacheControl.parse(cache_control)
    tenant = engine.tenant(credential)
    key = request_key(endpoint, body, tenant=tenant, namespace=namespace, normalised=True)
    streaming = api in STREAMABLE and body.get("stream") is True
    prepared = Prepared(api, endpoint, body, key, control, streaming)
    if engine.semantic is not None:
        policy = engine.semantic.policy
        mode = ("semantic" if mode is None else mode).strip().lower()
        if mode not in ("exact", "semantic"):
            raise RequestError("X-Cache-Mode must be 'exact' or 'semantic'", param="X-Cache-Mode")
        prepared.semantic_lookup = mode == "semantic"
        prepared.threshold = max(policy.threshold, _threshold(threshold))
        if temperature(body) <= policy.max_temperature:
            prepared.view = semantic_view(api, endpoint, body, tenant=tenant,
                                          namespace=namespace, normalised=True)
    return prepared


def prepare_http(engine: Engine, endpoint: str, body_bytes: bytes, headers: RequestHeaders
                 ) -> Prepared:
    """:func:`prepare` for an HTTP request to ``endpoint`` (one of the cached routes): the
    credential (``Authorization`` / ``x-api-key``) and the controls come from ``headers``."""
    return prepare(engine, ENDPOINTS[endpoint], endpoint, body_bytes,
                   credential=credential(headers),
                   namespace=headers.get("x-cache-namespace") or "",
                   cache_control=headers.getall("cache-control", []),
                   mode=headers.get("x-cache-mode"), threshold=headers.get("x-cache-threshold"))


def _threshold(raw: str | None) -> float:
    if raw is None:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise RequestError("X-Cache-Threshold must be a cosine similarity from 0 to 1",
                           param="X-Cache-Threshold")
    return value
