"""One request through the cache, independent of how it arrived (sidecar or in-process).

::

    prepare(engine, endpoint, body, credential, namespace, Cache-Control, mode, threshold)
        -> Prepared (key, semantic view, directives; RequestError on bad input)
    handle(engine, prepared, exchange) -> what the exchange returns:
        bypass (no-cache + no-store) -> forward, store nothing
        lookup: exact tier, then semantic (BYPASS if the cache fails) -> HIT: serve the entry
        MISS: join the single flight for the key; the leader forwards upstream and stores a
        complete 2xx answer (``store``), followers are served the leader's answer
    StreamCollector -> the non-streaming Answer of a streamed upstream answer, assembled as
                       its chunks pass through

The :class:`Exchange` is the caller's side: the sidecar answers an aiohttp request, the
in-process cache an httpx request or a function call.

Timings and outcomes go to a :class:`FlowMetrics` (the sidecar's Prometheus metrics; a
no-op for the in-process cache unless it is given one).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from promptcache.cache.cache_control import CacheControl
from promptcache.cache.engine import Answer, Engine
from promptcache.cache.entry import Entry
from promptcache.cache.errors import CacheUnavailable, RequestError
from promptcache.cache.keys import Api, CacheKey, check_namespace, loads_normalised, request_key
from promptcache.cache.redis.remote_flight import RemoteFlight
from promptcache.cache.semantic.scope import SemanticView, semantic_view, temperature
from promptcache.cache.semantic.tier import SemanticHit
from promptcache.cache.sse import SSEParser, assembler_for
from promptcache.cache.validate import validate_body

log = logging.getLogger(__name__)
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)

STREAMABLE: frozenset[Api] = frozenset({"chat", "completions", "messages"})
#: Raw SSE is several times larger than the answer it carries; past this we stop assembling.
SSE_OVERHEAD = 8


class FlowMetrics(Protocol):
    """Where the flow reports timings and outcomes."""

    def on_lookup(self, seconds: float) -> None: ...

    def on_semantic(self, seconds: float) -> None: ...

    def on_store(self, nbytes: int) -> None: ...

    def on_not_stored(self, reason: str) -> None: ...

    def on_outcome(self, endpoint: str, status: str) -> None:
        """One request's cache status: HIT, SEMANTIC-HIT, MISS or BYPASS."""

    def on_bypass(self) -> None:
        """A request went upstream because the cache failed."""

    def on_coalesced(self) -> None:
        """A miss was answered by another request's upstream call."""


class NoMetrics:
    def on_outcome(self, endpoint: str, status: str) -> None:
        pass

    def on_bypass(self) -> None:
        pass

    def on_coalesced(self) -> None:
        pass

    def on_lookup(self, seconds: float) -> None:
        pass

    def on_semantic(self, seconds: float) -> None:
        pass

    def on_store(self, nbytes: int) -> None:
        pass

    def on_not_stored(self, reason: str) -> None:
        pass


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


@dataclass(frozen=True, slots=True)
class Found:
    """An answer from the cache, and how it was found."""

    answer: Answer
    status: str  # HIT or SEMANTIC-HIT
    age: int
    key: str | None = None  # the matched entry, when it is not the request's own
    similarity: float | None = None


async def lookup(engine: Engine, req: Prepared, metrics: FlowMetrics | None = None
                 ) -> tuple[Found | None, bool]:
    """Exact tier, then semantic tier; and False if the cache failed (pass through)."""
    metrics = metrics or NoMetrics()
    started = time.perf_counter()
    try:
        entry = await engine.cache.lookup(req.key)
    except CacheUnavailable:
        return None, False
    finally:
        metrics.on_lookup(time.perf_counter() - started)
    if entry is not None and req.control.accepts_age(age := engine.cache.age(entry)):
        return Found(Answer(entry.status, entry.body, entry.content_type), "HIT", age), True
    if not (req.semantic_lookup and req.view is not None):
        return None, True
    try:
        hit = await _semantic_lookup(engine, req, metrics)
    except CacheUnavailable:
        return None, False
    if hit is None or not req.control.accepts_age(age := engine.cache.age(hit.entry)):
        return None, True
    e = hit.entry
    return Found(Answer(e.status, e.body, e.content_type), "SEMANTIC-HIT", age, hit.digest,
                 hit.similarity), True


async def _semantic_lookup(engine: Engine, req: Prepared, metrics: FlowMetrics
                           ) -> SemanticHit | None:
    """The semantic tier's answer; a failure of the model is a miss, never an error."""
    assert engine.semantic is not None and req.view is not None
    started = time.perf_counter()
    try:
        return await engine.semantic.lookup(req.view, threshold=req.threshold)
    except CacheUnavailable:
        raise
    except Exception:
        log.exception("semantic lookup failed; answering as a miss")
        return None
    finally:
        metrics.on_semantic(time.perf_counter() - started)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a request was answered, for the caller's headers (X-Cache, Age...)."""

    status: str  # HIT, SEMANTIC-HIT, MISS or BYPASS
    age: int | None = None
    key: str | None = None  # the matched entry, when it is not the request's own
    similarity: float | None = None
    coalesced: bool = False


class Exchange(Protocol[R_co]):
    """The caller's side of one request: answering it, and calling the upstream."""

    async def serve(self, answer: Answer, outcome: Outcome) -> R_co:
        """Answer with a cached or shared answer (replayed as a stream if it streams)."""
        ...

    async def forward(self, outcome: Outcome, store: bool) -> tuple[R_co, Answer | None]:
        """Call the upstream and answer with its response; if ``store``, store a complete
        answer with :func:`store`. Return the answer that followers may share, or None."""
        ...


async def handle(engine: Engine, req: Prepared, exchange: Exchange[R],
                 metrics: FlowMetrics | None = None) -> R:
    """Answer one prepared request from the cache or the upstream (see the module doc)."""
    metrics = metrics or NoMetrics()
    cc = req.control
    if cc.bypass:
        metrics.on_outcome(req.endpoint, "BYPASS")
        return (await exchange.forward(Outcome("BYPASS"), False))[0]
    found, cache_ok = (None, True) if cc.no_cache else await lookup(engine, req, metrics)
    if found is not None:
        metrics.on_outcome(req.endpoint, found.status)
        return await exchange.serve(found.answer, Outcome(found.status, found.age, found.key,
                                                          found.similarity))
    status = "MISS" if cache_ok else "BYPASS"
    if not cache_ok:
        metrics.on_bypass()
    metrics.on_outcome(req.endpoint, status)
    store_it = cache_ok and not cc.no_store
    if cc.no_cache:  # a refresh wants its own upstream answer, not a shared one
        return (await exchange.forward(Outcome(status), store_it))[0]
    flight, leader = engine.flights.join(req.key.digest)
    if not leader:
        shared = await flight.wait()
        if shared is not None:
            metrics.on_coalesced()
            return await exchange.serve(shared, Outcome(status, coalesced=True))
        return (await exchange.forward(Outcome(status), store_it))[0]
    answer: Answer | None = None
    try:
        if engine.remote is not None and store_it:
            result, answer = await _lead_across_nodes(engine, req, exchange, engine.remote,
                                                      status, metrics)
            return result
        result, answer = await exchange.forward(Outcome(status), store_it)
        return result
    finally:
        engine.flights.land(req.key.digest, flight, answer)


async def _lead_across_nodes(engine: Engine, req: Prepared, exchange: Exchange[R],
                             remote: RemoteFlight, status: str, metrics: FlowMetrics
                             ) -> tuple[R, Answer | None]:
    """This node's leader of a miss: call upstream if it gets the Redis lease (or Redis
    fails); otherwise wait for the node holding it to store the answer, and serve that
    (to local followers too)."""
    ns, digest = req.key.namespace, req.key.digest
    lease = await remote.acquire(ns, digest)
    if lease is None:
        entry = await remote.wait(ns, digest, lambda: engine.cache.lookup(req.key))
        if entry is not None:
            metrics.on_coalesced()
            answer = Answer(entry.status, entry.body, entry.content_type)
            return await exchange.serve(answer, Outcome(status, coalesced=True)), answer
    try:
        return await exchange.forward(Outcome(status), True)
    finally:
        if lease is not None:
            await lease.release()


def cacheable(status: int, body: bytes, max_bytes: int) -> str | None:
    """Why an upstream answer must not be stored, or None if it may be."""
    if not 200 <= status < 300:
        return "status"
    if len(body) > max_bytes:
        return "too_large"
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "not_json"
    if not isinstance(doc, dict) or "error" in doc or doc.get("type") == "error":
        return "error_body"
    return None


async def store(engine: Engine, req: Prepared, answer: Answer,
                metrics: FlowMetrics | None = None) -> bool:
    """Write a complete answer; a cache failure is logged and counted, never raised."""
    metrics = metrics or NoMetrics()
    why = cacheable(answer.status, answer.body, engine.options.max_entry_bytes)
    if why is not None:
        metrics.on_not_stored(why)
        return False
    entry = engine.cache.entry_for(answer.status, answer.body, answer.content_type, req.api)
    try:
        written = await _put(engine, req, entry)
    except CacheUnavailable as exc:
        metrics.on_not_stored("cache_unavailable")
        log.warning("could not store %s: %s", req.key.digest, exc)
        return False
    if not written:
        metrics.on_not_stored("too_large")
        return False
    metrics.on_store(written)
    return True


async def _put(engine: Engine, req: Prepared, entry: Entry) -> int:
    ttl = req.control.max_age
    if engine.semantic is not None and req.view is not None:
        try:
            return await engine.semantic.put(req.key, entry, req.view, ttl=ttl)
        except CacheUnavailable:
            raise
        except Exception:
            log.exception("semantic store failed; storing the exact entry only")
    return await engine.cache.put(req.key, entry, ttl=ttl)


class StreamCollector:
    """Assembles a streamed (SSE) answer into its non-streaming form as chunks pass by.

    ``feed`` returns the :class:`Answer` once, when the chunk that completes the stream
    arrives (so the caller can store it before passing that chunk on), else None. Past
    ``SSE_OVERHEAD`` times the entry size limit it stops assembling.
    """

    def __init__(self, api: Api, status: int, max_entry_bytes: int) -> None:
        self._parser, self._assembler = SSEParser(), assembler_for(api)  # type: ignore[arg-type]
        self._status = status
        self._budget, self._seen = max_entry_bytes * SSE_OVERHEAD, 0
        self.answer: Answer | None = None

    def feed(self, chunk: bytes) -> Answer | None:
        if self.answer is not None or self._seen > self._budget:
            return None
        self._seen += len(chunk)
        if self._seen > self._budget:
            return None
        for event in self._parser.feed(chunk):
            self._assembler.add(event)
        if self._assembler.complete and not self._assembler.failed:
            doc = self._assembler.result()
            self.answer = Answer(self._status, json.dumps(doc, separators=(",", ":"),
                                                          ensure_ascii=False).encode(),
                                 "application/json")
            return self.answer
        return None
