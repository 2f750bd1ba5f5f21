"""One request through the cache, the same whichever front end it arrived by.

::

    prepare / prepare_http (promptcache.cache.request)
        -> Prepared (key, semantic view, directives; RequestError on bad input)
    handle(engine, prepared, exchange) -> what the exchange returns:
        bypass (no-cache + no-store) -> forward, store nothing
        lookup: exact tier, then semantic (BYPASS if the cache fails) -> HIT: serve the entry
        MISS: join the single flight for the key.
          leader: looks up the exact entry once more (an identical request may have stored
            it since this one's lookup: then it is a HIT), else forwards upstream; the
            exchange reads the answer apart from its caller (a caller that reads slowly or
            leaves holds nothing up) and hands it, complete, to the flow (:data:`Store`),
            which stores it (if the request may be stored) and lands the flight at once
          followers: wait for the flight, up to ``flight_timeout``; are served the leader's
            answer if it may be shared (:func:`shareable`: a 2xx answer, not too large),
            else (or once the wait has run out) they forward too

Both front ends (the sidecar's aiohttp handler and the in-process cache, through an httpx
transport or a function call) are an :class:`Exchange`: they adapt I/O only. What they
share is here: the response headers (:func:`cache_headers`: X-Cache, Age, X-Cache-Key,
X-Cache-Similarity, X-Cache-Coalesced), a cached answer as the caller gets it
(:func:`served`: the body, or SSE frames replayed for a streaming request), and the rules
for what is stored (:func:`cacheable`) and shared (:func:`shareable`).

Timings and outcomes go to a :class:`FlowMetrics` (the sidecar's Prometheus metrics; a
no-op for the in-process cache unless it is given one); what hits saved, and the upstream
calls of followers that fell back, to a :class:`~promptcache.cache.savings.Savings`, if
given one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, TypeVar

from promptcache.cache import tracing
from promptcache.cache.engine import Engine
from promptcache.cache.entry import Answer, Entry
from promptcache.cache.errors import CacheUnavailable
from promptcache.cache.redis.remote_flight import RemoteFlight
from promptcache.cache.request import Prepared
from promptcache.cache.savings import Savings
from promptcache.cache.semantic.tier import SemanticHit
from promptcache.cache.singleflight import Flight
from promptcache.cache.sse import replay

log = logging.getLogger(__name__)
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)

#: Takes the upstream's answer to the request being handled the moment it has been read
#: (before the caller need have all of it): stores it if the request may be stored, and
#: shares it with the requests waiting on this one. None: there is no answer to keep (the
#: call failed, the stream broke or grew too large); the waiting requests go on their own.
#: Returns whether the answer was stored.
Store = Callable[[Answer | None], Awaitable[bool]]


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
    """A :class:`FlowMetrics` that records nothing."""

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


@dataclass(frozen=True, slots=True)
class Found:
    """An answer from the cache, and how it was found."""

    answer: Answer
    status: str  # HIT or SEMANTIC-HIT
    age: int
    key: str | None = None  # the matched entry, when it is not the request's own
    similarity: float | None = None
    text: str | None = None  # the matched entry's prompt (a semantic hit's)


async def lookup(engine: Engine, req: Prepared, metrics: FlowMetrics | None = None
                 ) -> tuple[Found | None, bool]:
    """Exact tier, then semantic tier; and False if the cache failed (pass through)."""
    metrics = metrics or NoMetrics()
    started = time.perf_counter()
    try:
        found = await (tracing.traced("promptcache.lookup", _exact(engine, req))
                       if tracing.active() else _exact(engine, req))
    except CacheUnavailable:
        return None, False
    finally:
        metrics.on_lookup(time.perf_counter() - started)
    if found is not None:
        return found, True
    if not (req.semantic_lookup and req.view is not None):
        return None, True
    threshold = req.threshold  # raised in a namespace by the false-hit bound, or None: off
    relief = None  # the tier's length relief
    if engine.audit is not None:
        if (threshold := engine.audit.floor(req.key.namespace, req.threshold)) is None:
            return None, True
        if engine.audit.exceeded(req.key.namespace):
            relief = 0.0  # a floor the bound raised is the least similarity it lets through
    lookup = _semantic_lookup(engine, req, metrics, threshold, relief)
    try:
        hit = await (tracing.traced_search(lookup) if tracing.active() else lookup)
    except CacheUnavailable:
        return None, False
    if hit is None or not req.control.accepts_age(age := engine.cache.age(hit.entry)):
        return None, True
    e = hit.entry
    return Found(Answer(e.status, e.body, e.content_type), "SEMANTIC-HIT", age, hit.digest,
                 hit.similarity, hit.text), True


async def _exact(engine: Engine, req: Prepared) -> Found | None:
    """The request's own entry, if there is one young enough for it; CacheUnavailable if
    the cache failed."""
    entry = await engine.cache.lookup(req.key, inflate=not req.accepts_deflate)
    if entry is None or not req.control.accepts_age(age := engine.cache.age(entry)):
        return None
    return Found(Answer(entry.status, entry.body, entry.content_type, entry.deflated), "HIT",
                 age)


async def _semantic_lookup(engine: Engine, req: Prepared, metrics: FlowMetrics,
                           threshold: float | None, relief: float | None
                           ) -> SemanticHit | None:
    """The semantic tier's answer; a failure of the model is a miss, never an error."""
    assert engine.semantic is not None and req.view is not None
    started = time.perf_counter()
    try:
        return await engine.semantic.lookup(req.view, threshold=threshold, relief=relief)
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
        """Answer with a cached or shared answer (:func:`served` says how, over HTTP)."""
        ...

    async def forward(self, outcome: Outcome, store: Store | None
                      ) -> tuple[R_co, Answer | None]:
        """Call the upstream and answer with its response.

        If ``store`` is given, read the upstream's answer apart from the caller (one that
        reads slowly, or leaves, must not hold it up) and hand it, complete, to ``store``
        as soon as it is read, before the caller need have all of it; or hand it None as
        soon as it is clear there will be no complete answer. Return the response and the
        complete answer (None if there is none: the call failed, or its stream broke)."""
        ...


async def handle(engine: Engine, req: Prepared, exchange: Exchange[R],
                 metrics: FlowMetrics | None = None, savings: Savings | None = None) -> R:
    """Answer one prepared request from the cache or the upstream (see the module doc);
    hits, and followers' fallbacks upstream, are counted in ``savings``."""
    metrics = metrics or NoMetrics()
    cc = req.control
    if cc.bypass:
        metrics.on_outcome(req.endpoint, "BYPASS")
        return await _forward(engine, req, exchange, Outcome("BYPASS"), metrics)
    found, cache_ok = (None, True) if cc.no_cache else await lookup(engine, req, metrics)
    if found is not None:
        metrics.on_outcome(req.endpoint, found.status)
        if savings is not None:
            savings.hit(req, found.answer, found.key)
        result = await exchange.serve(found.answer, Outcome(found.status, found.age, found.key,
                                                            found.similarity))
        if engine.audit is not None:  # sampled, queued for the background: O(1)
            engine.audit.offer(req, found.answer, exact=found.status == "HIT", origin=exchange,
                               candidate=found.text, similarity=found.similarity)
        return result
    status = "MISS" if cache_ok else "BYPASS"
    if not cache_ok:
        metrics.on_bypass()
    store_it = cache_ok and not cc.no_store
    if cc.no_cache:  # a refresh wants its own upstream answer, not a shared one
        metrics.on_outcome(req.endpoint, status)
        return await _forward(engine, req, exchange, Outcome(status), metrics, store_it=store_it)
    flight, leader = engine.flights.join(req.key.digest)
    if leader:
        return await _lead(engine, req, exchange, flight, status, store_it, metrics, savings)
    metrics.on_outcome(req.endpoint, status)
    shared = await _follow(flight, engine.options.flight_timeout)
    if shared is not None:
        metrics.on_coalesced()
        return await exchange.serve(shared, Outcome(status, coalesced=True))
    return await _forward(engine, req, exchange, Outcome(status), metrics, store_it=store_it,
                          spent=savings)


async def _follow(flight: Flight[Answer], deadline: float) -> Answer | None:
    """The leader's answer, if it shares one within ``deadline`` seconds."""
    try:
        async with asyncio.timeout(deadline):
            return await flight.wait()
    except TimeoutError:
        return None


async def _lead(engine: Engine, req: Prepared, exchange: Exchange[R], flight: Flight[Answer],
                status: str, store_it: bool, metrics: FlowMetrics,
                savings: Savings | None = None) -> R:
    """Answer as the leader of ``flight``: from the entry, if an identical request stored
    it since this one's lookup; else from upstream. The flight lands as soon as the answer
    is known, and at the latest when this returns."""
    try:
        found = await _recheck(engine, req) if status == "MISS" else None
        if found is not None:
            engine.flights.land(req.key.digest, flight, found.answer)
            metrics.on_outcome(req.endpoint, found.status)
            if savings is not None:
                savings.hit(req, found.answer)
            return await exchange.serve(found.answer, Outcome(found.status, found.age))
        metrics.on_outcome(req.endpoint, status)
        if engine.remote is not None and store_it:
            return await _lead_across_nodes(engine, req, exchange, engine.remote, flight,
                                            status, metrics, savings)
        return await _forward(engine, req, exchange, Outcome(status), metrics,
                              store_it=store_it, flight=flight)
    finally:
        engine.flights.land(req.key.digest, flight, None)  # nothing, if it landed already


async def _recheck(engine: Engine, req: Prepared) -> Found | None:
    """The exact entry, looked up once more by a request about to call upstream: an
    identical request may have stored it (and landed its flight) since this one missed."""
    try:
        return await _exact(engine, req)
    except CacheUnavailable:
        return None


async def _forward(engine: Engine, req: Prepared, exchange: Exchange[R], outcome: Outcome,
                   metrics: FlowMetrics, *, store_it: bool = False,
                   flight: Flight[Answer] | None = None, spent: Savings | None = None) -> R:
    """Forward upstream; the answer, once read, is stored if ``store_it`` and lands
    ``flight`` (shared only if :func:`shareable`). ``spent``: the call is a follower's
    fallback, counted there against the savings."""
    result, answer = await exchange.forward(outcome, _taker(engine, req, metrics, store_it,
                                                            flight))
    if spent is not None:
        spent.spent(req, answer)
    if flight is not None:  # for an exchange that returned an answer it did not hand over
        engine.flights.land(req.key.digest, flight, _shared(engine, answer))
    return result


def _taker(engine: Engine, req: Prepared, metrics: FlowMetrics, store_it: bool,
           flight: Flight[Answer] | None) -> Store | None:
    """The :data:`Store` for one forward: None if the answer is neither stored nor shared."""
    if not store_it and flight is None:
        return None

    async def take(answer: Answer | None) -> bool:
        stored = answer is not None and store_it and await store(engine, req, answer, metrics)
        if flight is not None:  # after the store: a request that leads next finds the entry
            engine.flights.land(req.key.digest, flight, _shared(engine, answer))
        return stored

    return take


async def _lead_across_nodes(engine: Engine, req: Prepared, exchange: Exchange[R],
                             remote: RemoteFlight, flight: Flight[Answer], status: str,
                             metrics: FlowMetrics, savings: Savings | None = None) -> R:
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
            engine.flights.land(digest, flight, answer)
            return await exchange.serve(answer, Outcome(status, coalesced=True))
    try:  # without the lease: a follower across nodes, falling back
        return await _forward(engine, req, exchange, Outcome(status), metrics, store_it=True,
                              flight=flight, spent=savings if lease is None else None)
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
    # A Responses API object carries "error": null when all went well.
    if not isinstance(doc, dict) or doc.get("error") is not None or doc.get("type") == "error":
        return "error_body"
    return None


def shareable(engine: Engine, answer: Answer) -> bool:
    """May waiting followers be served ``answer``? Only a 2xx answer: an error belongs to
    the call that got it (in shared mode, one caller's 401 for a revoked key must not reach
    a caller whose key is valid). And not one larger than ``max_entry_bytes``. Followers
    who are not served call upstream themselves."""
    return 200 <= answer.status < 300 and len(answer.body) <= engine.options.max_entry_bytes


def _shared(engine: Engine, answer: Answer | None) -> Answer | None:
    return answer if answer is not None and shareable(engine, answer) else None


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
        written = await (tracing.traced("promptcache.store", _put(engine, req, entry))
                         if tracing.active() else _put(engine, req, entry))
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


def cache_headers(req: Prepared, outcome: Outcome) -> dict[str, str]:
    """The response headers that say where an answer came from (the README's table)."""
    h = {"X-Cache": outcome.status, "X-Cache-Key": outcome.key or req.key.digest}
    if outcome.age is not None:
        h["Age"] = str(outcome.age)
    if outcome.similarity is not None:
        h["X-Cache-Similarity"] = f"{outcome.similarity:.4f}"
    if outcome.coalesced:
        h["X-Cache-Coalesced"] = "1"
    return h


@dataclass(frozen=True, slots=True)
class Served:
    """A cached or shared answer as an HTTP caller gets it: a body, or for a streaming
    request SSE ``frames`` replayed from the stored body."""

    status: int
    headers: dict[str, str]
    body: bytes = b""
    frames: Iterator[bytes] | None = None


def served(req: Prepared, answer: Answer, outcome: Outcome) -> Served:
    """How to answer ``req`` with ``answer`` over HTTP: headers included."""
    headers = cache_headers(req, outcome)
    if not (req.streaming and 200 <= answer.status < 300):
        headers["Content-Type"] = answer.content_type
        if answer.deflated and req.accepts_deflate:  # the stored bytes, as stored
            headers["Content-Encoding"] = "deflate"
            return Served(answer.status, headers, answer.body)
        return Served(answer.status, headers, answer.inflated())
    headers["Content-Type"] = "text/event-stream; charset=utf-8"
    headers["Cache-Control"] = "no-cache"
    frames = replay(req.api, json.loads(answer.inflated()), include_usage=req.include_usage)
    return Served(answer.status, headers, frames=frames)
