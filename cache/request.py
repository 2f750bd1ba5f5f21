"""One request as the cache sees it: parsed, validated, keyed, with its per-request controls.

:func:`prepare` turns a body and the values of the control headers into a :class:`Prepared`
(the exact key, the semantic view, the Cache-Control directives; RequestError, a 4xx, on bad
input). :func:`prepare_http` reads those values from an HTTP request's headers, for both
HTTP front ends (the sidecar and the httpx transport). :data:`CONTROL_HEADERS` are the
cache's own request headers, which never reach the upstream.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Final, Protocol

from promptcache.cache.api import ENDPOINTS, STREAMABLE, Api
from promptcache.cache.cache_control import CacheControl
from promptcache.cache.engine import Engine
from promptcache.cache.errors import RequestError
from promptcache.cache.keys import ANONYMOUS_TENANT, CacheKey, check_namespace, request_key
from promptcache.cache.options import EngineOptions
from promptcache.cache.semantic.scope import SemanticView, semantic_view, temperature
from promptcache.cache.strict_json import parse_body
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


#: The request headers that identify a caller by default (``--credential-headers``); the
#: ``key`` query parameter does too (``--credential-params``).
CREDENTIAL_HEADERS: Final = EngineOptions().credential_headers

#: Request headers that change what the upstream answers, so they are part of the key.
VARY_HEADERS: Final = ("anthropic-version", "anthropic-beta", "openai-organization",
                       "openai-project")


def credential(headers: RequestHeaders, query: Iterable[tuple[str, str]] = (), *,
               names: Iterable[str] = CREDENTIAL_HEADERS, params: Iterable[str] = ()
               ) -> str | None:
    """What identifies the caller: every credential header and query parameter it sent
    (``name=value`` lines; ``?name=value`` for a parameter), or None if it sent none.

    RequestError (400) if a credential is not UTF-8: it could not be keyed, or forwarded
    faithfully."""
    parts = [f"{h}={v}" for h in names for v in headers.getall(h, [])]
    wanted = set(params)
    parts += sorted(f"?{k.lower()}={v}" for k, v in query if k.lower() in wanted)
    text = "\n".join(parts)
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        raise RequestError("credentials must be UTF-8 text", param="Authorization") from exc
    return text or None


def variant_of(headers: RequestHeaders, query: Iterable[tuple[str, str]] = (), *,
               params: Iterable[str] = ()) -> str:
    """What else changes the answer besides the body: the query string (less credential
    parameters), and the :data:`VARY_HEADERS`. Empty for a plain request."""
    skip = set(params)
    pairs = sorted((k, v) for k, v in query if k.lower() not in skip)
    vary = {h: headers.getall(h, []) for h in VARY_HEADERS if h in headers}
    if not pairs and not vary:
        return ""
    try:
        return json.dumps({"query": pairs, "headers": vary}, sort_keys=True,
                          separators=(",", ":"), ensure_ascii=False).encode().decode()
    except UnicodeEncodeError as exc:
        raise RequestError("query parameters and version headers must be UTF-8 text",
                           param="query") from exc


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
    #: The caller takes ``Content-Encoding: deflate`` and does not stream: an exact hit on
    #: a deflated entry is sent as stored.
    accepts_deflate: bool = False

    @property
    def include_usage(self) -> bool:
        opts = self.body.get("stream_options")
        return isinstance(opts, dict) and opts.get("include_usage") is True


#: Raw bytes of request bodies a :class:`PreparedMemo` keeps at most (default), ...
MEMO_BYTES: Final = 4 << 20
#: ... counted as this many times their length (the parsed body, key and view beside them),
#: plus :data:`MEMO_ENTRY_BYTES` each; a body longer than :data:`MEMO_MAX_BODY` is not kept.
MEMO_BODY_FACTOR: Final = 4
MEMO_ENTRY_BYTES: Final = 1024
MEMO_MAX_BODY: Final = 32 * 1024


class PreparedMemo:
    """Requests prepared lately, by everything :func:`prepare` reads: a request repeated
    byte for byte (the hot prompts an exact hit serves) skips parsing, validation and
    keying. Bounded by bytes (see :data:`MEMO_BYTES`), least recently used out first; only
    requests that prepared without error are kept, and a :class:`Prepared` is never changed
    after :func:`prepare`, so one may serve many requests."""

    def __init__(self, max_bytes: int = MEMO_BYTES) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = 0
        self._items: collections.OrderedDict[tuple[Any, ...], tuple[Prepared, int]] = (
            collections.OrderedDict())

    def get(self, key: tuple[Any, ...]) -> Prepared | None:
        found = self._items.get(key)
        if found is None:
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return found[0]

    def put(self, key: tuple[Any, ...], prepared: Prepared, body_bytes: int) -> None:
        cost = body_bytes * MEMO_BODY_FACTOR + MEMO_ENTRY_BYTES
        if body_bytes > MEMO_MAX_BODY or cost > self.max_bytes or key in self._items:
            return
        self._items[key] = (prepared, cost)
        self.nbytes += cost
        while self.nbytes > self.max_bytes:
            _, (_, gone) = self._items.popitem(last=False)
            self.nbytes -= gone

    def __len__(self) -> int:
        return len(self._items)


def prepare(engine: Engine, api: Api, endpoint: str, body_bytes: bytes, *,
            credential: str | None, namespace: str = "", cache_control: Iterable[str] = (),
            mode: str | None = None, threshold: str | None = None, variant: str = "",
            accepts_deflate: bool = False, memo: PreparedMemo | None = None) -> Prepared:
    """Parse, validate and key a request body; RequestError (a 4xx) on bad input.

    ``namespace``, ``cache_control``, ``mode`` and ``threshold`` are the values of the
    ``X-Cache-Namespace``, ``Cache-Control``, ``X-Cache-Mode`` and ``X-Cache-Threshold``
    headers (see the README's Per-request control); ``variant`` is :func:`variant_of`.
    ``accepts_deflate`` says the caller takes a deflated body. With a ``memo``, a request
    prepared before (same body bytes, caller and controls) is answered from it.

    A request without a credential is not cached (it passes through as BYPASS) unless the
    options allow an anonymous tenant; nor is a :func:`stateful` one. ``max-age`` may only
    shorten the configured TTL (:func:`retention`).
    """
    tenant = ANONYMOUS_TENANT if credential is None else engine.tenant(credential)
    memo_key: tuple[Any, ...] = ()
    if memo is not None:
        cache_control = tuple(cache_control)
        memo_key = (endpoint, credential is None, tenant, namespace, cache_control, mode,
                    threshold, variant, accepts_deflate, body_bytes)
        found = memo.get(memo_key)
        if found is not None:
            return found
    prepared = _prepare(engine, api, endpoint, body_bytes, tenant=tenant,
                        anonymous=credential is None, namespace=namespace,
                        cache_control=cache_control, mode=mode, threshold=threshold,
                        variant=variant)
    prepared.accepts_deflate = accepts_deflate and not prepared.streaming
    if memo is not None:
        memo.put(memo_key, prepared, len(body_bytes))
    return prepared


def _prepare(engine: Engine, api: Api, endpoint: str, body_bytes: bytes, *, tenant: str,
             anonymous: bool, namespace: str, cache_control: Iterable[str], mode: str | None,
             threshold: str | None, variant: str) -> Prepared:
    body = parse_body(body_bytes)
    validate_body(api, body)
    namespace = check_namespace(namespace)
    options = engine.options
    control = CacheControl.parse(cache_control)
    if anonymous and not options.anonymous_tenant or stateful(api, body):
        control = CacheControl(no_cache=True, no_store=True)
    control = retention(control, options.default_ttl, options.max_ttl)
    key = request_key(endpoint, body, tenant=tenant, namespace=namespace, variant=variant,
                      normalised=True, ignore=options.key_ignore)
    streaming = api in STREAMABLE and body.get("stream") is True
    prepared = Prepared(api, endpoint, body, key, control, streaming)
    if engine.semantic is not None and not control.bypass:
        policy = engine.semantic.policy
        mode = ("semantic" if mode is None else mode).strip().lower()
        if mode not in ("exact", "semantic"):
            raise RequestError("X-Cache-Mode must be 'exact' or 'semantic'", param="X-Cache-Mode")
        prepared.semantic_lookup = mode == "semantic"
        prepared.threshold = max(policy.threshold, _threshold(threshold))
        if temperature(body) <= policy.max_temperature:
            prepared.view = semantic_view(api, endpoint, body, tenant=tenant,
                                          context=options.context_match,
                                          namespace=namespace, variant=variant,
                                          normalised=True, ignore=options.key_ignore)
    return prepared


def stateful(api: Api, body: dict[str, Any]) -> bool:
    """Whether the answer depends on state the upstream keeps and the cache cannot see: a
    Responses API call that continues a stored response (``previous_response_id``) or a
    conversation (``conversation``), or runs in the background (its answer is fetched later
    by id). Such requests pass through uncached, as BYPASS."""
    return api == "responses" and (body.get("previous_response_id") is not None
                                   or body.get("conversation") is not None
                                   or body.get("background") is True)


def retention(control: CacheControl, default_ttl: float, max_ttl: float) -> CacheControl:
    """``control`` with ``max-age`` cut to the longest retention the operator allows:
    ``max_ttl``, or when that is 0 the default TTL (0 too: no bound)."""
    limit = int(max_ttl or default_ttl)
    if limit <= 0 or control.max_age is None or control.max_age <= limit:
        return control
    return replace(control, max_age=limit)


def prepare_http(engine: Engine, endpoint: str, body_bytes: bytes, headers: RequestHeaders,
                 query: Iterable[tuple[str, str]] = (), *, memo: PreparedMemo | None = None
                 ) -> Prepared:
    """:func:`prepare` for an HTTP request to ``endpoint`` (one of the cached routes) with
    query parameters ``query``: the credential (the options' credential headers and
    parameters), the variant and the controls come from ``headers`` and ``query``."""
    options = engine.options
    query = list(query)
    return prepare(engine, ENDPOINTS[endpoint], endpoint, body_bytes,
                   credential=credential(headers, query, names=options.credential_headers,
                                         params=options.credential_params),
                   variant=variant_of(headers, query, params=options.credential_params),
                   namespace=headers.get("x-cache-namespace") or "",
                   cache_control=headers.getall("cache-control", []),
                   mode=headers.get("x-cache-mode"), threshold=headers.get("x-cache-threshold"),
                   accepts_deflate=accepts_deflate(headers.get("accept-encoding")), memo=memo)


def accepts_deflate(accept_encoding: str | None) -> bool:
    """Whether an ``Accept-Encoding`` value takes ``deflate`` (named, or ``*``, and not
    with ``q=0``)."""
    if not accept_encoding:
        return False
    for item in accept_encoding.lower().split(","):
        coding, _, params = item.partition(";")
        if coding.strip() not in ("deflate", "*"):
            continue
        q = params.strip()
        if q.startswith("q="):
            try:
                return float(q[2:]) > 0
            except ValueError:
                return False
        return True
    return False


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
