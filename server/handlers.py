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
"""

from __future__ import annotations

import logging
import time

import aiohttp
from aiohttp import web

from promptcache.cache.api import ENDPOINTS, Api, error_body
from promptcache.cache.entry import Answer
from promptcache.cache.errors import BodyTooLarge, RequestError
from promptcache.cache.flow import Outcome, Store, cache_headers, handle, served
from promptcache.cache.request import Prepared, prepare_http
from promptcache.cache.sse import StreamCollector
from promptcache.server.proxy import abort, upstream_unavailable
from promptcache.server.state import SIDECAR, Sidecar

log = logging.getLogger(__name__)


def error_response(api: Api, status: int, message: str, *, kind: str,
                   param: str | None = None) -> web.Response:
    """An error in the shape of the API the caller speaks."""
    return web.json_response(error_body(api, message, kind=kind, param=param), status=status,
                             headers={"X-Cache": "BYPASS"})


async def read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"request body of {request.content_length} bytes is over the "
                           f"limit of {limit} bytes", param="body")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise BodyTooLarge(f"request body is over the limit of {limit} bytes",
                           param="body") from exc


async def cached_route(request: web.Request) -> web.StreamResponse:
    sc = request.app[SIDECAR]
    route = request.path
    try:
        body = await read_body(request, sc.settings.max_body_bytes)
        req = prepare_http(sc.engine, route, body, request.headers)
    except RequestError as exc:
        sc.metrics.requests.labels(route, "ERROR").inc()
        kind = ("request_too_large" if exc.status == 413 else "invalid_request_error")
        return error_response(ENDPOINTS[route], exc.status, exc.message, kind=kind,
                              param=exc.param)
    return await handle(sc.engine, req, SidecarExchange(sc, request, req, body),
                        sc.metrics)


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
        for frame in out.frames:
            await resp.write(frame)
        await resp.write_eof()
        return resp

    async def forward(self, outcome: Outcome, store: Store | None
                      ) -> tuple[web.StreamResponse, Answer | None]:
        """Call upstream; return the response sent and the complete answer (or None)."""
        sc, req, request = self.sc, self.req, self.request
        started = time.perf_counter()
        try:
            async with sc.upstream.session.post(
                sc.upstream.url_for(request.path_qs),
                data=self.body,
                headers=sc.upstream.request_headers(request),
                timeout=sc.upstream.timeout(),
                allow_redirects=False,
            ) as up:
                ctype = up.headers.get("Content-Type", "application/json")
                if req.streaming and up.status < 300 and ctype.startswith("text/event-stream"):
                    return await self.relay_stream(up, outcome, store)
                body = await up.read()
                headers = sc.upstream.response_headers(up, decoded=True)
        except (aiohttp.ClientError, TimeoutError) as exc:
            resp = upstream_unavailable(exc, req.api)
            resp.headers.update(cache_headers(req, outcome))
            return resp, None
        finally:
            sc.metrics.upstream_seconds.labels(request.path).observe(
                time.perf_counter() - started)
        answer = Answer(up.status, body, ctype)
        if store is not None:
            await store(answer)
        headers.update(cache_headers(req, outcome))
        return web.Response(body=body, status=up.status, headers=headers), answer

    async def relay_stream(self, up: aiohttp.ClientResponse, outcome: Outcome,
                           store: Store | None) -> tuple[web.StreamResponse, Answer | None]:
        """Pass an SSE answer through as it arrives while assembling it for the cache.

        The answer is stored as soon as its terminal event is parsed, before that last chunk
        is written, so a caller that has read the whole stream finds the entry in place.
        """
        sc, req = self.sc, self.req
        headers = sc.upstream.response_headers(up, decoded=True)
        headers.update(cache_headers(req, outcome))
        resp = web.StreamResponse(status=up.status, reason=up.reason, headers=headers)
        await resp.prepare(self.request)
        collector = StreamCollector(req.api, up.status, sc.settings.max_entry_bytes)
        try:
            async for chunk in up.content.iter_any():
                answer = collector.feed(chunk)
                if answer is not None and store is not None:
                    await store(answer)
                await resp.write(chunk)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.info("upstream stream for %s broke: %r", req.key.digest, exc)
            sc.metrics.on_not_stored("stream_broken")
            abort(self.request)
            return resp, None
        if collector.answer is None:
            sc.metrics.on_not_stored("stream_incomplete")
        await resp.write_eof()
        return resp, collector.answer
