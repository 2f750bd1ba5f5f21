"""The fake itself: an aiohttp server on an ephemeral port that records every request, injects
the faults it is told to, and hands the rest to the OpenAI, Anthropic and echo routes."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from promptcache.testing import anthropic_routes, openai_routes, responses_routes
from promptcache.testing.echo import echo
from promptcache.testing.errors import not_found
from promptcache.testing.faults import Failure, Faults, StreamBreak
from promptcache.testing.recording import RecordedRequest, record
from promptcache.testing.wire import Route

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class FakeUpstream:
    """An in-process fake model API on an ephemeral 127.0.0.1 port; see :mod:`promptcache.testing`.

    ``calls`` counts requests per path, ``requests`` keeps them all, ``in_flight`` counts those
    being answered.
    """

    def __init__(self, *, latency: float = 0.0, chunk_delay: float = 0.0,
                 answer_words: int = 0) -> None:
        self.latency = latency
        self.answer_words = answer_words
        self.chunk_delay = chunk_delay
        self.calls: collections.Counter[str] = collections.Counter()
        self.requests: list[RecordedRequest] = []
        self.in_flight = 0
        self._faults = Faults()
        self._held = False
        self._gate = asyncio.Event()
        self._arrived = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._url: str | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:41234``; ``RuntimeError`` before ``start``."""
        if self._url is None:
            raise RuntimeError("FakeUpstream is not started")
        return self._url

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve in the running loop; return the base URL, e.g. ``http://127.0.0.1:41234``."""
        # Fresh primitives: they bind to the loop that first waits on them.
        self._gate = asyncio.Event()
        if not self._held:
            self._gate.set()
        self._arrived = asyncio.Condition()
        self._runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound_port = self._runner.addresses[0][1]
        self._url = f"http://{host}:{bound_port}"
        return self._url

    async def stop(self) -> None:
        """Release held requests and shut the server down."""
        self.release()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeUpstream:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- control ------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget recorded traffic and pending injections (latency and the gate stay)."""
        self.calls.clear()
        self.requests.clear()
        self._faults.clear()

    def fail_next(
        self,
        status: int = 500,
        n: int = 1,
        path: str | None = None,
        body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer the next ``n`` requests (on ``path``, or any) with ``status`` and an error body
        in the API's own shape, or ``body`` if given."""
        self._faults.failures.append(Failure(status, n, path, body, headers))

    def break_stream_next(self, after_chunks: int = 2, n: int = 1) -> None:
        """The next ``n`` streamed responses send ``after_chunks`` chunks, then the connection is
        closed without the terminator (no ``[DONE]``/``message_stop``/final chunk)."""
        self._faults.breaks.append(StreamBreak(after_chunks, n))

    def hold(self) -> None:
        """Make requests wait (after being recorded) until ``release()``."""
        self._held = True
        self._gate.clear()

    def release(self) -> None:
        """Let held requests, and those still to come, through."""
        self._held = False
        self._gate.set()

    async def wait_for_requests(
        self, count: int, path: str | None = None, *, within: float = 5.0
    ) -> None:
        """Wait until ``count`` requests (on ``path``, or in all) have arrived; raise
        ``TimeoutError`` naming what was seen if that takes longer than ``within`` seconds."""

        def seen() -> int:
            return self.calls[path] if path is not None else sum(self.calls.values())

        try:
            async with asyncio.timeout(within), self._arrived:
                await self._arrived.wait_for(lambda: seen() >= count)
        except TimeoutError:
            raise TimeoutError(
                f"expected {count} requests on {path or 'any path'}, saw {seen()}"
            ) from None

    def requests_to(self, path: str) -> list[RecordedRequest]:
        """The recorded requests on ``path``, oldest first."""
        return [r for r in self.requests if r.path == path]

    # -- plumbing -----------------------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_post("/v1/chat/completions", self._handler(openai_routes.chat))
        app.router.add_post("/v1/completions", self._handler(openai_routes.completions))
        app.router.add_post("/v1/embeddings", self._handler(openai_routes.embeddings))
        app.router.add_post("/v1/responses", self._handler(responses_routes.responses))
        app.router.add_post("/v1/messages", self._handler(anthropic_routes.messages))
        app.router.add_get("/v1/models", self._handler(openai_routes.models))
        app.router.add_get("/_fake/stats", self._stats)
        app.router.add_route("*", "/v1/{tail:.*}", self._handler(not_found))
        app.router.add_route("*", "/echo/{tail:.*}", self._handler(echo))
        return app

    def _handler(self, route: Route) -> Handler:
        """Serve ``route``: send its response, or stream the chunks it returns."""

        async def handle(request: web.Request) -> web.StreamResponse:
            reply = await route(request, self.answer_words)
            if isinstance(reply, list):
                return await self._stream(request, reply)
            return reply

        return handle

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.requests.append(await record(request))
        self.calls[request.path] += 1
        async with self._arrived:
            self._arrived.notify_all()
        failure = self._faults.take_failure(request.path)
        self.in_flight += 1
        try:
            await self._gate.wait()
            if self.latency > 0:
                await asyncio.sleep(self.latency)
            if failure is None:
                return await handler(request)
            return failure.response(request.path)
        finally:
            self.in_flight -= 1

    async def _stream(self, request: web.Request, chunks: list[bytes]) -> web.StreamResponse:
        """Write ``chunks`` (the last is the terminator) with ``chunk_delay`` between them, or
        cut the connection early if a ``break_stream_next`` rule is pending."""
        is_sse = chunks[-1].startswith((b"data:", b"event:"))
        resp = web.StreamResponse()
        resp.content_type = "text/event-stream" if is_sse else "text/plain"
        resp.headers["Cache-Control"] = "no-cache"
        if request.path.startswith("/echo/"):
            resp.headers["X-Upstream-Echo"] = "1"
        await resp.prepare(request)
        cut = self._faults.take_break()
        send = chunks if cut is None else chunks[: min(cut, len(chunks) - 1)]
        for i, chunk in enumerate(send):
            if i and self.chunk_delay > 0:
                await asyncio.sleep(self.chunk_delay)
            await resp.write(chunk)
        if cut is not None:
            # Buffered chunks are flushed, then FIN without the chunked-encoding terminator:
            # the client sees a truncated body. aiohttp swallows the failed write_eof.
            request.protocol.force_close()
        return resp

    async def _stats(self, request: web.Request) -> web.StreamResponse:
        calls = {p: n for p, n in self.calls.items() if p != "/_fake/stats"}
        return web.json_response({"calls": calls, "total": sum(calls.values()),
                                  "in_flight": self.in_flight})


@contextlib.asynccontextmanager
async def running_fake_upstream(
    *, host: str = "127.0.0.1", port: int = 0, latency: float = 0.0, chunk_delay: float = 0.0,
    answer_words: int = 0,
) -> AsyncIterator[FakeUpstream]:
    """``async with running_fake_upstream() as fake:`` -- started on a free port, then stopped."""
    fake = FakeUpstream(latency=latency, chunk_delay=chunk_delay, answer_words=answer_words)
    await fake.start(host, port)
    try:
        yield fake
    finally:
        await fake.stop()
