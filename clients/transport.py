"""httpx2 transports that answer model API calls from an in-process cache.

The OpenAI client (openai 3.x) sends every request through an ``httpx2`` client. These
transports sit in such a client: a POST to a cached endpoint (``.../chat/completions``,
``.../completions``, ``.../embeddings``, ``.../messages``) is keyed like the sidecar keys it
and answered from the cache (a streaming request gets the entry replayed as SSE), or sent
on through the *original* client, its answer stored (a streamed answer is assembled as it
passes through). Everything else is sent on unchanged. The OpenAI client parses the
responses itself, so every return type is the real one.

The cache runs on its own loop (:class:`~promptcache.clients.cache.Cache`); the upstream
call runs where the caller is (a thread for the sync client, the caller's event loop for the
async one). A failing cache degrades to calling the upstream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import httpx2

from promptcache.cache.api import ENDPOINTS
from promptcache.cache.entry import Answer
from promptcache.cache.errors import PromptCacheError
from promptcache.cache.flow import Outcome, Store, cache_headers, handle, served
from promptcache.cache.request import CONTROL_HEADERS, Prepared, prepare_http
from promptcache.cache.sse import StreamCollector
from promptcache.clients.cache import Cache
from promptcache.clients.loop import CallerWork

log = logging.getLogger(__name__)

#: The body is handed on decoded, so these no longer describe it.
_RE_FRAMED = frozenset({"content-encoding", "content-length", "transfer-encoding"})
_TAILS = {path.removeprefix("/v1"): path for path in ENDPOINTS}

Send = Callable[[], Awaitable[httpx2.Response]]


def cached_endpoint(request: httpx2.Request) -> str | None:
    """The endpoint (``/v1/chat/completions``...) a request is for, or None if uncached."""
    if request.method != "POST":
        return None
    path = request.url.path.rstrip("/")
    for tail, endpoint in _TAILS.items():
        if path.endswith(tail):
            return endpoint
    return None


class _Headers:
    """An httpx request's headers as the cache flow reads them
    (:class:`~promptcache.cache.request.RequestHeaders`)."""

    def __init__(self, headers: httpx2.Headers) -> None:
        self.get, self._headers = headers.get, headers

    def getall(self, key: str, default: list[str], /) -> list[str]:
        return self._headers.get_list(key) or default

    def __contains__(self, key: object, /) -> bool:
        return key in self._headers

    def __getitem__(self, key: str, /) -> str:
        return self._headers[key]


def prepare(cache: Cache, request: httpx2.Request) -> Prepared | None:
    """The request keyed for the cache, or None to send it on uncached (not a cached
    route, bad input, or the cache is closed). Strips our control headers."""
    endpoint = cached_endpoint(request)
    try:
        if endpoint is None:
            return None
        return prepare_http(cache.aio.engine, endpoint, request.read(),
                            _Headers(request.headers), request.url.params.multi_items())
    except PromptCacheError as exc:  # bad input: the upstream says what is wrong
        log.debug("not cached: %s", exc)
        return None
    finally:
        for name in CONTROL_HEADERS:
            if name in request.headers:
                del request.headers[name]


def upstream_is_stream(req: Prepared, response: httpx2.Response) -> bool:
    return (req.streaming and response.status_code < 300
            and response.headers.get("content-type", "").startswith("text/event-stream"))


@dataclass(slots=True)
class Reply:
    """What the flow decided: a cached answer, or the upstream's response."""

    outcome: Outcome
    answer: Answer | None = None
    upstream: httpx2.Response | None = None
    store: Store | None = None  # where a streamed upstream answer goes once complete


class HttpExchange:
    """The flow's exchange for one HTTP request; ``send`` calls the upstream (in the
    caller's context) and has read the body unless the answer streams."""

    def __init__(self, req: Prepared, send: Send) -> None:
        self.req, self.send = req, send

    async def serve(self, answer: Answer, outcome: Outcome) -> Reply:
        return Reply(outcome, answer=answer)

    async def forward(self, outcome: Outcome, store: Store | None
                      ) -> tuple[Reply, Answer | None]:
        response = await self.send()
        if upstream_is_stream(self.req, response):
            return Reply(outcome, upstream=response, store=store), None
        answer = Answer(response.status_code, response.content,
                        response.headers.get("content-type", "application/json"))
        if store is not None:
            await store(answer)
        return Reply(outcome, upstream=response), answer


def cached_response(req: Prepared, reply: Reply) -> httpx2.Response:
    """The response for an answer from the cache: replayed as SSE if the request streams."""
    assert reply.answer is not None
    out = served(req, reply.answer, reply.outcome)
    body = out.body if out.frames is None else b"".join(out.frames)
    return httpx2.Response(out.status, headers=out.headers, content=body)


def response_for(cache: Cache, req: Prepared, reply: Reply,
                 relay: type[_SyncRelayStream | _AsyncRelayStream]) -> httpx2.Response:
    """The caller's response: a cached answer, a read upstream answer, or an upstream stream
    passed on through a ``relay`` stream (which assembles and stores it)."""
    if reply.answer is not None:
        return cached_response(req, reply)
    up = reply.upstream
    assert up is not None
    headers = [(k, v) for k, v in up.headers.multi_items() if k.lower() not in _RE_FRAMED]
    headers += cache_headers(req, reply.outcome).items()
    if up.is_stream_consumed:
        return httpx2.Response(up.status_code, headers=headers, content=up.content)
    return httpx2.Response(up.status_code, headers=headers,
                          stream=relay(_Relay(cache, req, reply), up))


class _Relay:
    """Assembles a streamed upstream answer as the caller reads it; stores it on the
    cache's loop when complete."""

    def __init__(self, cache: Cache, req: Prepared, reply: Reply) -> None:
        assert reply.upstream is not None
        self.cache, self.store = cache, reply.store
        self.collector = StreamCollector(req.api, reply.upstream.status_code,
                                         cache.options.max_entry_bytes)

    def completed(self, chunk: bytes) -> Answer | None:
        answer = self.collector.feed(chunk)
        return answer if answer is not None and self.store is not None else None

    def store_soon(self, answer: Answer) -> Awaitable[bool]:
        assert self.store is not None
        return asyncio.wrap_future(self.cache.submit(self.store(answer)))

    def store_now(self, answer: Answer) -> None:
        assert self.store is not None
        try:
            self.cache.run(self.store(answer))
        except PromptCacheError as exc:
            log.warning("streamed answer not stored: %s", exc)


class _SyncRelayStream(httpx2.SyncByteStream):
    def __init__(self, relay: _Relay, upstream: httpx2.Response) -> None:
        self.relay, self.upstream = relay, upstream

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.upstream.iter_bytes():
            answer = self.relay.completed(chunk)
            if answer is not None:
                self.relay.store_now(answer)
            yield chunk

    def close(self) -> None:
        self.upstream.close()


class _AsyncRelayStream(httpx2.AsyncByteStream):
    def __init__(self, relay: _Relay, upstream: httpx2.Response) -> None:
        self.relay, self.upstream = relay, upstream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.upstream.aiter_bytes():
            answer = self.relay.completed(chunk)
            if answer is not None:
                try:
                    await self.relay.store_soon(answer)
                except PromptCacheError as exc:
                    log.warning("streamed answer not stored: %s", exc)
            yield chunk

    async def aclose(self) -> None:
        await self.upstream.aclose()


class CachingTransport(httpx2.BaseTransport):
    """For a sync ``httpx2.Client``: cached routes through ``cache``, the rest (and every
    miss) through ``upstream``, the client the requests were meant for."""

    def __init__(self, cache: Cache, upstream: httpx2.Client, *, owns_cache: bool = False
                 ) -> None:
        self.cache, self.upstream, self.owns_cache = cache, upstream, owns_cache

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        req = prepare(self.cache, request)
        if req is None:
            return self.upstream.send(request, stream=True)

        def send() -> httpx2.Response:
            response = self.upstream.send(request, stream=True)
            if not upstream_is_stream(req, response):
                response.read()
            return response

        work = CallerWork()  # the upstream call runs on this thread
        try:
            engine = self.cache.aio.engine
            exchange = HttpExchange(req, lambda: work.call(send))
            reply = work.serve_until(self.cache.submit(handle(engine, req, exchange)))
        except PromptCacheError as exc:  # the cache closed under us: call through
            log.warning("calling through uncached: %s", exc)
            return self.upstream.send(request, stream=True)
        return response_for(self.cache, req, reply, _SyncRelayStream)

    def close(self) -> None:
        """Close the upstream client too: the wrapped client shares it, as any copy of an
        OpenAI client made by ``with_options`` does."""
        try:
            self.upstream.close()
        finally:
            if self.owns_cache:
                self.cache.close()


class AsyncCachingTransport(httpx2.AsyncBaseTransport):
    """For an ``httpx2.AsyncClient``: as :class:`CachingTransport`, awaiting the cache's
    loop from the caller's, and calling the upstream on the caller's loop."""

    def __init__(self, cache: Cache, upstream: httpx2.AsyncClient, *,
                 owns_cache: bool = False) -> None:
        self.cache, self.upstream, self.owns_cache = cache, upstream, owns_cache

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        req = prepare(self.cache, request)
        if req is None:
            return await self.upstream.send(request, stream=True)
        caller = asyncio.get_running_loop()

        async def send() -> httpx2.Response:
            response = await self.upstream.send(request, stream=True)
            if not upstream_is_stream(req, response):
                await response.aread()
            return response

        def send_on_caller() -> Awaitable[httpx2.Response]:
            return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(send(), caller))

        try:
            engine = self.cache.aio.engine
            reply = await asyncio.wrap_future(self.cache.submit(
                handle(engine, req, HttpExchange(req, send_on_caller))))
        except PromptCacheError as exc:
            log.warning("calling through uncached: %s", exc)
            return await self.upstream.send(request, stream=True)
        return response_for(self.cache, req, reply, _AsyncRelayStream)

    async def aclose(self) -> None:
        try:
            await self.upstream.aclose()
        finally:
            if self.owns_cache:
                await asyncio.to_thread(self.cache.close)
