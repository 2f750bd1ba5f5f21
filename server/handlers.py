"""The cached routes: an aiohttp request through the cache flow (:mod:`promptcache.cache.flow`).

Flow of one request to a cached route::

    read + validate body (4xx on bad input) -> key (tenant, namespace, endpoint, body)
    -> lookup (skipped on no-cache; BYPASS if the cache fails)
    -> HIT: answer from the entry, replayed as SSE if the request streams
    -> MISS: join the single flight for the key; the leader calls upstream (streaming
       the answer through as it arrives), stores a complete 2xx answer, and shares it.

The decisions, the cache headers and the replay of a streaming hit live in
:mod:`promptcache.cache.flow`; this module is the sidecar's
:class:`~promptcache.cache.flow.Exchange`: reading the aiohttp request, writing answers and
forwarding to the upstream with aiohttp.

An upstream answer is read apart from the caller, so no caller holds up the store or the
requests waiting on its flight: a plain answer is read whole (up to ``max_response_bytes``;
a larger one is a 502) before anything is written; a stream is read by a task of its own
into a :class:`_Pipe` that the caller drains at its own pace, and read to its end even if
the caller leaves. A stream longer than ``max_response_bytes`` is relayed but not stored.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from promptcache.cache import tracing
from promptcache.cache.api import ENDPOINTS, Api, error_body
from promptcache.cache.entry import Answer
from promptcache.cache.errors import BodyTimeout, BodyTooLarge, RequestError
from promptcache.cache.flow import Outcome, Store, cache_headers, handle, served
from promptcache.cache.request import Prepared, prepare_http
from promptcache.cache.semantic.audit import Ask
from promptcache.cache.sse import StreamCollector
from promptcache.server.dashboard import LATENCY
from promptcache.server.proxy import abort, upstream_unavailable
from promptcache.server.state import SIDECAR, Sidecar

if TYPE_CHECKING:
    from opentelemetry.trace import Span

log = logging.getLogger(__name__)


def error_response(api: Api, status: int, message: str, *, kind: str,
                   param: str | None = None) -> web.Response:
    """An error in the shape of the API the caller speaks."""
    return web.json_response(error_body(api, message, kind=kind, param=param), status=status,
                             headers={"X-Cache": "BYPASS"})


async def read_body(request: web.Request, limit: int, seconds: float) -> bytes:
    """The whole body: BodyTooLarge over ``limit`` bytes, BodyTimeout after ``seconds``."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"request body of {request.content_length} bytes is over the "
                           f"limit of {limit} bytes", param="body")
    try:
        if request.content.is_eof():  # all of it arrived with the headers: nothing to wait for
            return await request.read()
        async with asyncio.timeout(seconds):
            return await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise BodyTooLarge(f"request body is over the limit of {limit} bytes",
                           param="body") from exc
    except TimeoutError as exc:
        raise BodyTimeout(f"request body not received within {seconds:g} s",
                          param="body") from exc


#: Bytes of a replayed stream written between two yields to the event loop.
YIELD_EVERY = 64 * 1024

_ERROR_KINDS = {408: "request_timeout", 413: "request_too_large"}


async def cached_route(request: web.Request) -> web.StreamResponse:
    sc = request.app[SIDECAR]
    route = request.path
    started = time.perf_counter()
    try:
        body = await read_body(request, sc.settings.max_body_bytes, sc.settings.body_timeout)
        req = prepare_http(sc.engine, route, body, request.headers, request.query.items(),
                           memo=sc.prepared)
    except RequestError as exc:
        sc.metrics.request_counter(route, "ERROR").inc()
        kind = _ERROR_KINDS.get(exc.status, "invalid_request_error")
        resp = error_response(ENDPOINTS[route], exc.status, exc.message, kind=kind,
                              param=exc.param)
        if exc.status in _ERROR_KINDS:  # the rest of the body may still be coming
            resp.force_close()
        return resp
    if tracing.TRACER is None:
        resp = await handle(sc.engine, req, SidecarExchange(sc, request, req, body),
                            sc.metrics, sc.metrics.savings)
    else:
        span, tokens = tracing.start_request(request.headers, route, req.key.namespace)
        status = similarity = None
        try:
            resp = await handle(sc.engine, req, SidecarExchange(sc, request, req, body),
                                sc.metrics, sc.metrics.savings)
            status, similarity = (resp.headers.get("X-Cache"),
                                  resp.headers.get("X-Cache-Similarity"))
        finally:
            tracing.end_request(span, tokens, status, similarity)
    # From arrival to the last byte written (a stream's too), by how it was answered.
    request.app[LATENCY].record(resp.headers.get("X-Cache"), time.perf_counter() - started)
    return resp


def audit_ask(sc: Sidecar) -> Ask:
    """The false-hit audit's upstream call (:class:`~promptcache.cache.semantic.audit.Ask`):
    the hit's request sent again, not streamed, with the operator's key in place of the
    caller's credentials where one is configured (else with the caller's headers)."""

    async def ask(req: Prepared, origin: Any) -> Answer | None:
        if not isinstance(origin, SidecarExchange):
            return None
        request, body = origin.request, origin.body
        if req.streaming:
            body = json.dumps({k: v for k, v in req.body.items()
                               if k not in ("stream", "stream_options")}).encode()
        headers = sc.upstream.request_headers(request)
        key = sc.settings.upstream_api_key
        if key:
            for name in sc.settings.credential_headers:
                headers.popall(name, None)
            if request.path.startswith("/v1/messages"):
                headers["x-api-key"] = key
            else:
                headers["Authorization"] = f"Bearer {key}"
        try:
            async with sc.upstream.session.post(
                    sc.upstream.url_for(request.raw_path), data=body, headers=headers,
                    timeout=sc.upstream.timeout(), allow_redirects=False) as up:
                data = await read_up_to(up, sc.settings.max_response_bytes)
                ctype = up.headers.get("Content-Type", "application/json")
                return None if data is None else Answer(up.status, data, ctype)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.info("audit call upstream failed: %r", exc)
            return None

    return ask


class SidecarExchange:
    """One aiohttp request to a cached route, as the cache flow sees it."""

    def __init__(self, sc: Sidecar, request: web.Request, req: Prepared, body: bytes) -> None:
        self.sc, self.request, self.req, self.body = sc, request, req, body

    async def serve(self, answer: Answer, outcome: Outcome) -> web.StreamResponse:
        """Answer from a stored or shared answer; replayed as SSE if the request streams."""
        out = served(self.req, answer, outcome)
        if out.frames is None:
            return web.Response(body=out.body, status=out.status, headers=out.headers)
        resp = web.StreamResponse(status=out.status, headers=out.headers)
        await resp.prepare(self.request)
        sent = 0
        for frame in out.frames:
            await resp.write(frame)
            sent += len(frame)
            if sent >= YIELD_EVERY:  # a long replay lets other requests run between frames
                sent = 0
                await asyncio.sleep(0)
        await resp.write_eof()
        return resp

    async def forward(self, outcome: Outcome, store: Store | None
                      ) -> tuple[web.StreamResponse, Answer | None]:
        """Call upstream; return the response sent and the complete answer (or None)."""
        started = time.perf_counter()
        span = None if tracing.TRACER is None else tracing.upstream_span()
        try:
            return await self._forward(outcome, store, span)
        finally:
            self.sc.metrics.upstream_seconds.labels(self.request.path).observe(
                time.perf_counter() - started)
            if span is not None:
                span.end()

    async def _forward(self, outcome: Outcome, store: Store | None, span: Span | None
                       ) -> tuple[web.StreamResponse, Answer | None]:
        sc, req, request = self.sc, self.req, self.request
        try:
            up = await sc.upstream.session.post(
                sc.upstream.url_for(request.raw_path),
                data=self.body,
                headers=sc.upstream.request_headers(request, span),
                timeout=sc.upstream.timeout(),
                allow_redirects=False,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            return self._unavailable(exc, outcome), None
        ctype = up.headers.get("Content-Type", "application/json")
        if req.streaming and up.status < 300 and ctype.startswith("text/event-stream"):
            return await self.relay_stream(up, outcome, store)
        try:
            body = await read_up_to(up, sc.settings.max_response_bytes)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return self._unavailable(exc, outcome), None
        finally:
            up.release()
        if body is None:
            sc.metrics.on_not_stored("too_large")
            resp = response_too_large(req.api, sc.settings.max_response_bytes)
            resp.headers.update(cache_headers(req, outcome))
            return resp, None
        answer = Answer(up.status, body, ctype)
        if store is not None:
            await store(answer)
        headers = sc.upstream.response_headers(up, decoded=True)
        headers.update(cache_headers(req, outcome))
        return web.Response(body=body, status=up.status, headers=headers), answer

    def _unavailable(self, exc: BaseException, outcome: Outcome) -> web.Response:
        resp = upstream_unavailable(exc, self.req.api)
        resp.headers.update(cache_headers(self.req, outcome))
        return resp

    async def relay_stream(self, up: aiohttp.ClientResponse, outcome: Outcome,
                           store: Store | None) -> tuple[web.StreamResponse, Answer | None]:
        """Pass an SSE answer through as it arrives while assembling it for the cache.

        A task reads the upstream (:meth:`_read_stream`) into a :class:`_Pipe`, which this
        coroutine drains to the caller at the caller's pace; if the caller leaves, the
        reading goes on to the end of the stream, so the answer is stored and shared all
        the same. The answer is handed to ``store`` as soon as its terminal event is
        parsed, before that last chunk is queued, so a caller that has read the whole
        stream finds the entry in place.
        """
        sc, req = self.sc, self.req
        headers = sc.upstream.response_headers(up, decoded=True)
        headers.update(cache_headers(req, outcome))
        resp = web.StreamResponse(status=up.status, reason=up.reason, headers=headers)
        pipe = _Pipe(sc.settings.max_response_bytes)
        reader = asyncio.create_task(self._read_stream(up, store, pipe))
        delivered = False
        try:
            await resp.prepare(self.request)
            async for chunk in pipe.chunks():
                await resp.write(chunk)
            delivered = True
        except (ConnectionError, aiohttp.ClientConnectionError) as exc:
            log.info("the caller of %s left mid-stream: %r", req.key.digest, exc)
        finally:
            if not delivered:
                pipe.abandon()  # the reader goes on alone (and if cancelled, unwatched)
        answer = await asyncio.shield(reader)
        if not delivered:
            return resp, answer
        if pipe.broken:
            abort(self.request)  # the caller must see a broken body, not a short one
            return resp, None
        try:
            await resp.write_eof()
        except (ConnectionError, aiohttp.ClientConnectionError):
            pass  # the caller left after the last chunk
        return resp, answer

    async def _read_stream(self, up: aiohttp.ClientResponse, store: Store | None,
                           pipe: _Pipe) -> Answer | None:
        """Read the upstream stream to its end into ``pipe`` (or, once nobody reads it and
        nothing is left to keep, stop); hand ``store`` the assembled answer, or None as
        soon as there can be none. Returns the complete answer, if any."""
        sc, req = self.sc, self.req
        limit = sc.settings.max_response_bytes
        collector = StreamCollector(req.api, up.status, sc.settings.max_entry_bytes)
        keeping = store is not None  # an answer is still to be handed to store
        if not keeping:
            pipe.hold_back()
        seen, ended = 0, False
        try:
            async for chunk in up.content.iter_any():
                seen += len(chunk)
                if keeping and seen > limit:
                    keeping = False
                    sc.metrics.on_not_stored("too_large")
                    pipe.hold_back()
                    await _take(store, None)
                if keeping and (answer := collector.feed(chunk)) is not None:
                    keeping = False
                    await _take(store, answer)
                if pipe.abandoned and not keeping:
                    return collector.answer
                await pipe.put(chunk)
            ended = True
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.info("upstream stream for %s broke: %r", req.key.digest, exc)
            sc.metrics.on_not_stored("stream_broken")
        finally:
            up.release()
            pipe.end(broken=not ended)
        if keeping:  # the stream ended, or broke, before its terminal event
            if ended:
                sc.metrics.on_not_stored("stream_incomplete")
            await _take(store, None)
        return collector.answer if ended else None


async def _take(store: Store | None, answer: Answer | None) -> None:
    if store is not None:
        await store(answer)


async def read_up_to(up: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The body of ``up``, or None if it is larger than ``limit`` bytes (then no more than
    ``limit`` bytes and one chunk have been read)."""
    if up.content_length is not None and up.content_length > limit:
        return None
    body = bytearray()
    async for chunk in up.content.iter_any():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def response_too_large(api: Api, limit: int) -> web.Response:
    """A 502 in the error shape of ``api``: the upstream's answer is over the limit."""
    kind = "api_error" if api == "messages" else "upstream_error"
    message = (f"the upstream's answer is larger than the sidecar's limit of {limit} bytes "
               "(--max-response-bytes)")
    return web.json_response(error_body(api, message, kind=kind), status=502)


class _Pipe:
    """The chunks of one stream between the task that reads the upstream and the caller.

    Up to ``limit`` bytes wait in it without holding up the reader; beyond that ``put``
    waits for the caller to take some (only a stream longer than ``limit``, which is not
    kept, ever waits). A stream nothing is kept of is read no further ahead of the caller
    than one chunk (:meth:`hold_back`). Once the caller has left (:meth:`abandon`) chunks
    are dropped.
    """

    def __init__(self, limit: int) -> None:
        self._chunks: collections.deque[bytes] = collections.deque()
        self._bytes, self._limit = 0, limit
        self._readable = asyncio.Event()  # a chunk, or the end, is waiting
        self._writable = asyncio.Event()  # at most ``limit`` bytes are waiting
        self._writable.set()
        self.ended = self.broken = self.abandoned = False

    async def put(self, chunk: bytes) -> None:
        await self._writable.wait()
        if self.abandoned:
            return
        self._chunks.append(chunk)
        self._bytes += len(chunk)
        self._readable.set()
        if self._bytes > self._limit:
            self._writable.clear()

    def hold_back(self) -> None:
        """Nothing is kept from here on: let the reader run no more than a chunk ahead."""
        self._limit = 0
        if self._bytes > 0 and not self.abandoned:
            self._writable.clear()

    def end(self, *, broken: bool) -> None:
        """No more chunks: the stream ended (or ``broken``: it did not end properly)."""
        self.ended, self.broken = True, broken
        self._readable.set()

    def abandon(self) -> None:
        """The caller has left: drop what waits, and never hold up the reader again."""
        self.abandoned = True
        self._chunks.clear()
        self._bytes = 0
        self._writable.set()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The chunks, in order, as they come, until the end."""
        while True:
            await self._readable.wait()
            if not self._chunks:
                return
            chunk = self._chunks.popleft()
            self._bytes -= len(chunk)
            if self._bytes <= self._limit:
                self._writable.set()
            if not self._chunks and not self.ended:
                self._readable.clear()
            yield chunk
