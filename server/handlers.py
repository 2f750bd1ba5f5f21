"""The cached routes: lookup, single flight, upstream call, store, and replay.

Flow of one request to a cached route::

    read + validate body (4xx on bad input) -> key (tenant, namespace, endpoint, body)
    -> lookup (skipped on no-cache; BYPASS if the cache fails)
    -> HIT: answer from the entry, replayed as SSE if the request streams
    -> MISS: join the single flight for the key; the leader calls upstream (streaming
       the answer through as it arrives), stores a complete 2xx answer, and shares it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from promptcache.cache.entry import Entry
from promptcache.cache.errors import BodyTooLarge, CacheUnavailable, RequestError
from promptcache.cache.keys import (
    ENDPOINTS,
    Api,
    CacheKey,
    check_namespace,
    loads_normalised,
    request_key,
)
from promptcache.cache.lease import RemoteFlight
from promptcache.cache.scope import SemanticView, semantic_view, temperature
from promptcache.cache.semantic import SemanticHit
from promptcache.cache.streams import SSEParser, assembler_for, replay
from promptcache.cache.validate import validate_body
from promptcache.server.control import CacheControl
from promptcache.server.proxy import abort, credential, upstream_unavailable
from promptcache.server.state import SIDECAR, Answer, Sidecar

log = logging.getLogger(__name__)

STREAMABLE: frozenset[Api] = frozenset({"chat", "completions", "messages"})
#: Raw SSE is several times larger than the answer it carries; past this we stop assembling.
SSE_OVERHEAD = 8


@dataclass(slots=True)
class Call:
    """Everything known about one request to a cached route."""

    request: web.Request
    api: Api
    body_bytes: bytes
    body: dict[str, Any]
    key: CacheKey
    control: CacheControl
    streaming: bool
    view: SemanticView | None = None  # set when the request may be stored for semantic hits
    semantic_lookup: bool = False  # X-Cache-Mode is not "exact"
    threshold: float | None = None  # X-Cache-Threshold, already raised to the configured one

    @property
    def include_usage(self) -> bool:
        opts = self.body.get("stream_options")
        return isinstance(opts, dict) and opts.get("include_usage") is True


def error_response(api: Api, status: int, message: str, *, kind: str,
                   param: str | None = None) -> web.Response:
    """An error in the shape of the API the caller speaks."""
    if api == "messages":
        body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": message}}
    else:
        body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return web.json_response(body, status=status, headers={"X-Cache": "BYPASS"})


async def read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"request body of {request.content_length} bytes is over the "
                           f"limit of {limit} bytes", param="body")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise BodyTooLarge(f"request body is over the limit of {limit} bytes",
                           param="body") from exc


def parse_call(request: web.Request, body_bytes: bytes, sc: Sidecar) -> Call:
    api = ENDPOINTS[request.path]
    try:
        body = loads_normalised(body_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}", param="body") from exc
    validate_body(api, body)
    namespace = check_namespace(request.headers.get("X-Cache-Namespace", ""))
    control = CacheControl.parse(request.headers.getall("Cache-Control", []))
    tenant = sc.tenant(credential(request.headers))
    key = request_key(request.path, body, tenant=tenant, namespace=namespace, normalised=True)
    streaming = api in STREAMABLE and body.get("stream") is True
    call = Call(request, api, body_bytes, body, key, control, streaming)
    if sc.semantic is not None:
        policy = sc.semantic.policy
        mode = request.headers.get("X-Cache-Mode", "semantic").strip().lower()
        if mode not in ("exact", "semantic"):
            raise RequestError("X-Cache-Mode must be 'exact' or 'semantic'", param="X-Cache-Mode")
        call.semantic_lookup = mode == "semantic"
        call.threshold = max(policy.threshold, _threshold(request))
        if temperature(body) <= policy.max_temperature:
            call.view = semantic_view(api, request.path, body, tenant=tenant,
                                      namespace=namespace, normalised=True)
    return call


def _threshold(request: web.Request) -> float:
    raw = request.headers.get("X-Cache-Threshold")
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


async def cached_route(request: web.Request) -> web.StreamResponse:
    sc = request.app[SIDECAR]
    route = request.path
    api = ENDPOINTS[route]
    try:
        call = parse_call(request, await read_body(request, sc.settings.max_body_bytes), sc)
    except RequestError as exc:
        sc.metrics.requests.labels(route, "ERROR").inc()
        kind = ("request_too_large" if exc.status == 413 else "invalid_request_error")
        return error_response(api, exc.status, exc.message, kind=kind, param=exc.param)

    cc = call.control
    if cc.bypass:
        sc.metrics.requests.labels(route, "BYPASS").inc()
        resp, _ = await forward(sc, call, status="BYPASS", store=False)
        return resp

    found, cache_ok = (None, True) if cc.no_cache else await lookup(sc, call)
    if found is not None:
        sc.metrics.requests.labels(route, found.status).inc()
        return await serve(call, found.answer, status=found.status, age=found.age,
                           key=found.key, similarity=found.similarity)
    status = "MISS" if cache_ok else "BYPASS"
    if not cache_ok:
        sc.metrics.bypasses.inc()
    sc.metrics.requests.labels(route, status).inc()
    if cc.no_cache:  # a refresh wants its own upstream answer, not a shared one
        resp, _ = await forward(sc, call, status=status, store=cache_ok and not cc.no_store)
        return resp

    store_it = cache_ok and not cc.no_store
    flight, leader = sc.flights.join(call.key.digest)
    if not leader:
        shared = await flight.wait()
        if shared is not None:
            sc.metrics.coalesced.inc()
            return await serve(call, shared, status=status, coalesced=True)
        resp, _ = await forward(sc, call, status=status, store=store_it)
        return resp
    answer: Answer | None = None
    try:
        if sc.remote is not None and store_it:
            resp, answer = await _lead_across_nodes(sc, call, sc.remote, status)
            return resp
        resp, answer = await forward(sc, call, status=status, store=store_it)
        return resp
    finally:
        sc.flights.land(call.key.digest, flight, answer)


async def _lead_across_nodes(sc: Sidecar, call: Call, remote: RemoteFlight,
                             status: str) -> Forwarded:
    """This node's leader of a miss: call upstream if it gets the Redis lease (or Redis
    fails); otherwise wait for the node holding it to store the answer, and serve that
    (to local followers too)."""
    ns, digest = call.key.namespace, call.key.digest
    lease = await remote.acquire(ns, digest)
    if lease is None:
        entry = await remote.wait(ns, digest, lambda: sc.cache.lookup(call.key))
        if entry is not None:
            sc.metrics.coalesced.inc()
            answer = Answer(entry.status, entry.body, entry.content_type)
            return await serve(call, answer, status=status, coalesced=True), answer
    try:
        return await forward(sc, call, status=status, store=True)
    finally:
        if lease is not None:
            await lease.release()


@dataclass(frozen=True, slots=True)
class Found:
    """An answer from the cache, and how it was found."""

    answer: Answer
    status: str  # HIT or SEMANTIC-HIT
    age: int
    key: str | None = None  # the matched entry, when it is not the request's own
    similarity: float | None = None


async def lookup(sc: Sidecar, call: Call) -> tuple[Found | None, bool]:
    """Exact tier, then semantic tier; and False if the cache failed (pass through)."""
    started = time.perf_counter()
    try:
        entry = await sc.cache.lookup(call.key)
    except CacheUnavailable:
        return None, False
    finally:
        sc.metrics.lookup_seconds.observe(time.perf_counter() - started)
    if entry is not None and call.control.accepts_age(age := sc.cache.age(entry)):
        return Found(Answer(entry.status, entry.body, entry.content_type), "HIT", age), True
    if not (call.semantic_lookup and call.view is not None):
        return None, True
    try:
        hit = await semantic_lookup(sc, call)
    except CacheUnavailable:
        return None, False
    if hit is None or not call.control.accepts_age(age := sc.cache.age(hit.entry)):
        return None, True
    e = hit.entry
    return Found(Answer(e.status, e.body, e.content_type), "SEMANTIC-HIT", age, hit.digest,
                 hit.similarity), True


async def semantic_lookup(sc: Sidecar, call: Call) -> SemanticHit | None:
    """The semantic tier's answer; a failure of the model is a miss, never an error."""
    assert sc.semantic is not None and call.view is not None
    started = time.perf_counter()
    try:
        return await sc.semantic.lookup(call.view, threshold=call.threshold)
    except CacheUnavailable:
        raise
    except Exception:
        log.exception("semantic lookup failed; answering as a miss")
        return None
    finally:
        sc.metrics.semantic_seconds.observe(time.perf_counter() - started)


def _headers(call: Call, status: str, *, age: int | None = None, key: str | None = None,
             similarity: float | None = None) -> dict[str, str]:
    h = {"X-Cache": status, "X-Cache-Key": key or call.key.digest}
    if age is not None:
        h["Age"] = str(age)
    if similarity is not None:
        h["X-Cache-Similarity"] = f"{similarity:.4f}"
    return h


async def serve(call: Call, answer: Answer, *, status: str, age: int | None = None,
                coalesced: bool = False, key: str | None = None,
                similarity: float | None = None) -> web.StreamResponse:
    """Answer from a stored or shared answer; replayed as SSE if the request streams."""
    headers = _headers(call, status, age=age, key=key, similarity=similarity)
    if coalesced:
        headers["X-Cache-Coalesced"] = "1"
    if not (call.streaming and 200 <= answer.status < 300):
        headers["Content-Type"] = answer.content_type
        return web.Response(body=answer.body, status=answer.status, headers=headers)
    headers.update({"Content-Type": "text/event-stream; charset=utf-8",
                    "Cache-Control": "no-cache"})
    resp = web.StreamResponse(status=answer.status, headers=headers)
    await resp.prepare(call.request)
    for frame in replay(call.api, json.loads(answer.body), include_usage=call.include_usage):
        await resp.write(frame)
    await resp.write_eof()
    return resp


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


async def store_answer(sc: Sidecar, call: Call, answer: Answer) -> bool:
    """Write a complete answer; a cache failure is logged and counted, never raised."""
    why = cacheable(answer.status, answer.body, sc.settings.max_entry_bytes)
    if why is not None:
        sc.metrics.not_stored.labels(why).inc()
        return False
    entry = sc.cache.entry_for(answer.status, answer.body, answer.content_type, call.api)
    try:
        written = await _put(sc, call, entry)
    except CacheUnavailable as exc:
        sc.metrics.not_stored.labels("cache_unavailable").inc()
        log.warning("could not store %s: %s", call.key.digest, exc)
        return False
    if not written:
        sc.metrics.not_stored.labels("too_large").inc()
        return False
    sc.metrics.stores.inc()
    sc.metrics.stored_bytes.inc(written)
    return True


async def _put(sc: Sidecar, call: Call, entry: Entry) -> int:
    ttl = call.control.max_age
    if sc.semantic is not None and call.view is not None:
        try:
            return await sc.semantic.put(call.key, entry, call.view, ttl=ttl)
        except CacheUnavailable:
            raise
        except Exception:
            log.exception("semantic store failed; storing the exact entry only")
    return await sc.cache.put(call.key, entry, ttl=ttl)


Forwarded = tuple[web.StreamResponse, Answer | None]


async def forward(sc: Sidecar, call: Call, *, status: str, store: bool) -> Forwarded:
    """Call upstream; return the response sent and the answer it can share (or None)."""
    request = call.request
    started = time.perf_counter()
    try:
        async with sc.upstream.session.post(
            sc.upstream.url_for(request.path_qs),
            data=call.body_bytes,
            headers=sc.upstream.request_headers(request),
            timeout=sc.upstream.timeout(),
            allow_redirects=False,
        ) as up:
            ctype = up.headers.get("Content-Type", "application/json")
            if call.streaming and up.status < 300 and ctype.startswith("text/event-stream"):
                return await relay_stream(sc, call, up, status=status, store=store)
            body = await up.read()
            headers = sc.upstream.response_headers(up, decoded=True)
    except (aiohttp.ClientError, TimeoutError) as exc:
        resp = upstream_unavailable(exc, anthropic=call.api == "messages")
        resp.headers.update(_headers(call, status))
        return resp, None
    finally:
        sc.metrics.upstream_seconds.labels(request.path).observe(time.perf_counter() - started)
    answer = Answer(up.status, body, ctype)
    if store:
        await store_answer(sc, call, answer)
    headers.update(_headers(call, status))
    resp = web.Response(body=body, status=up.status, headers=headers)
    return resp, answer if len(body) <= sc.settings.max_entry_bytes else None


async def relay_stream(sc: Sidecar, call: Call, up: aiohttp.ClientResponse, *, status: str,
                       store: bool) -> Forwarded:
    """Pass an SSE answer through as it arrives while assembling it for the cache.

    The answer is stored as soon as its terminal event is parsed, before that last chunk
    is written, so a caller that has read the whole stream finds the entry in place.
    """
    headers = sc.upstream.response_headers(up, decoded=True)
    headers.update(_headers(call, status))
    resp = web.StreamResponse(status=up.status, reason=up.reason, headers=headers)
    await resp.prepare(call.request)
    parser, assembler = SSEParser(), assembler_for(call.api)
    budget, seen = sc.settings.max_entry_bytes * SSE_OVERHEAD, 0
    answer: Answer | None = None
    collecting = True
    try:
        async for chunk in up.content.iter_any():
            if collecting:
                seen += len(chunk)
                collecting = seen <= budget
                for event in parser.feed(chunk) if collecting else ():
                    assembler.add(event)
                if collecting and answer is None and assembler.complete and not assembler.failed:
                    doc = assembler.result()
                    answer = Answer(up.status, json.dumps(doc, separators=(",", ":"),
                                                          ensure_ascii=False).encode(),
                                    "application/json")
                    if store:
                        await store_answer(sc, call, answer)
            await resp.write(chunk)
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.info("upstream stream for %s broke: %r", call.key.digest, exc)
        sc.metrics.not_stored.labels("stream_broken").inc()
        abort(call.request)
        return resp, None
    if answer is None:
        sc.metrics.not_stored.labels("stream_incomplete").inc()
    await resp.write_eof()
    return resp, answer
