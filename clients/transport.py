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
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import httpx2

from promptcache.cache import flow
from promptcache.cache.engine import Answer, Engine
from promptcache.cache.errors import PromptCacheError
from promptcache.cache.keys import ENDPOINTS, credential
from promptcache.cache.sse import replay
from promptcache.clients.cache import Cache
from promptcache.clients.loop import CallerWork

log = logging.getLogger(__name__)

#: Our per-request controls, as headers (``extra_headers=`` in the OpenAI client); the
#: upstream never sees them.
CONTROL_HEADERS = ("x-cache-namespace", "x-cache-mode", "x-cache-threshold")
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


def prepare(cache: Cache, request: httpx2.Request) -> flow.Prepared | None:
    """The request keyed for the cache, or None to send it on uncached (not a cached
    route, bad input, or the cache is closed). Strips our control headers."""
    endpoint = cached_endpoint(request)
    h = request.headers
    controls = {name: h.get(name) for name in CONTROL_HEADERS}
    for name in CONTROL_HEADERS:
        if name in h:
            del h[name]
    if endpoint is None:
        return None
    try:
        return flow.prepare(
            cache.aio.engine, ENDPOINTS[endpoint], endpoint, request.read(),
            credential=credential(h), namespace=controls["x-cache-namespace"] or "",
            cache_control=h.get_list("cache-control"), mode=controls["x-cache-mode"],
            threshold=controls["x-cache-threshold"])
    except PromptCacheError as exc:  # bad input: the upstream says what is wrong
        log.debug("not cached: %s", exc)
        return None


def upstream_is_stream(req: flow.Prepared, response: httpx2.Response) -> bool:
    return (req.streaming and response.status_code < 300
            and response.headers.get("content-type", "").startswith("text/event-stream"))


@dataclass(slots=True)
class Reply:
    """What the flow decided: a cached answer, or the upstream's response."""

    outcome: flow.Outcome
    answer: Answer | None = None
    upstream: httpx2.Response | None = None
    store: bool = False  # a streamed upstream answer is to be stored once complete


class HttpExchange:
    """The flow's exchange for one HTTP request; ``send`` calls the upstream (in the
    caller's context) and has read the body unless the answer streams."""

    def __init__(self, engine: Engine, req: flow.Prepared, send: Send) -> None:
        self.engine, self.req, self.send = engine, req, send

    async def serve(self, answer: Answer, outcome: flow.Outcome) -> Reply:
        return Reply(outcome, answer=answer)

    async def forward(self, outcome: flow.Outcome, store: bool) -> tuple[Reply, Answer | None]:
        response = await self.send()
        if upstream_is_stream(self.req, response):
            return Reply(outcome, upstream=response, store=store), None
        answer = Answer(response.status_code, response.content,
                        response.headers.get("content-type", "application/json"))
        if store:
            await flow.store(self.engine, self.req, answer)
        small = len(answer.body) <= self.engine.options.max_entry_bytes
        return Reply(outcome, upstream=response), answer if small else None


def cache_headers(req: flow.Prepared, outcome: flow.Outcome) -> dict[str, str]:
    h = {"x-cache": outcome.status, "x-cache-key": outcome.key or req.key.digest}
    if outcome.age is not None:
        h["age"] = str(outcome.age)
    if outcome.similarity is not None:
        h["x-cache-similarity"] = f"{outcome.similarity:.4f}"
    return h


def cached_response(req: flow.Prepared, reply: Reply) -> httpx2.Response:
    """The response for an answer from the cache: replayed as SSE if the request streams."""
    answer = reply.answer
    assert answer is not None
    headers = cache_headers(req, reply.outcome)
    if req.streaming and 200 <= answer.status < 300:
        frames = replay(req.api, json.loads(answer.body),  # type: ignore[arg-type]
                        include_usage=req.include_usage)
        headers["content-type"] = "text/event-stream; charset=utf-8"
        return httpx2.Response(answer.status, headers=headers, content=b"".join(frames))
    headers["content-type"] = answer.content_type
    return httpx2.Response(answer.status, headers=headers, content=answer.body)


def response_for(cache: Cache, req: flow.Prepared, reply: Reply,
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

    def __init__(self, cache: Cache, req: flow.Prepared, reply: Reply) -> None:
        assert reply.upstream is not None
        self.cache, self.req, self.store = cache, req, reply.store
        self.collector = flow.StreamCollector(req.api, reply.upstream.status_code,
                                              cache.options.max_entry_bytes)

    def completed(self, chunk: bytes) -> Answer | None:
        answer = self.collector.feed(chunk)
        return answer if answer is not None and self.store else None

    def store_soon(self, answer: Answer) -> Awaitable[bool]:
        return asyncio.wrap_future(self.cache.submit(self._store(answer)))

    def store_now(self, answer: Answer) -> None:
        try:
            self.cache.run(self._store(answer))
        except PromptCacheError as exc:
            log.warning("streamed answer not stored: %s", exc)

    async def _store(self, answer: Answer) -> bool:
        return await flow.store(self.cache.aio.engine, self.req, answer)


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
            exchange = HttpExchange(engine, req, lambda: work.call(send))
            reply = work.serve_until(self.cache.submit(flow.handle(engine, req, exchange)))
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
                flow.handle(engine, req, HttpExchange(engine, req, send_on_caller))))
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
