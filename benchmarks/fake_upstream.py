"""A deterministic fake of the OpenAI and Anthropic HTTP APIs, for tests and benchmarks.

Answers are a pure function of the request body (minus ``stream``/``stream_options``), so an
identical request always gets an identical answer and any change gets a different one. Every
request is recorded, and failures can be injected per request::

    async with running_fake_upstream() as fake:
        fake.fail_next(503, n=2, path="/v1/chat/completions")
        fake.break_stream_next(after_chunks=2)   # next SSE stream dies before its terminator
        fake.hold()                              # park requests until fake.release()
        ...
        assert fake.calls["/v1/chat/completions"] == 1
        assert fake.requests[-1].headers["authorization"] == "Bearer sk-test"

Order of work for each request: record it, take any matching injected failure, wait at the
gate (``hold``/``release``), sleep ``latency``, then answer (the failure, or the route).

``answer_words=N`` pads every answer with N deterministic filler words, for realistic
response sizes; ``GET /_fake/stats`` returns the call counts (for a fake in another process).

Only aiohttp (and its multidict) is needed, so benchmarks can import it too; it also runs as a
process: ``python -m promptcache.benchmarks.fake_upstream --port 8001`` prints its URL and serves
until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import hashlib
import json
import math
import re
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

CREATED = 1_700_000_000
EMBEDDING_DIM = 8
DEFAULT_MODEL = "fake-model"
MODELS = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "claude-3-5-haiku-latest")

_OPENAI_ERRORS = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("invalid_request_error", "not_found"),
    429: ("requests", "rate_limit_exceeded"),
}
_ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fake received it. ``headers`` is case-insensitive."""

    method: str
    path: str
    query_string: str
    headers: CIMultiDictProxy[str]
    body: bytes
    json: Any | None  # None when the body is empty or not JSON


@dataclass
class _Failure:
    status: int
    remaining: int
    path: str | None
    body: dict[str, Any] | None
    headers: dict[str, str] | None


@dataclass
class _StreamBreak:
    after_chunks: int
    remaining: int


# ---------------------------------------------------------------------------------------------
# Errors


def _is_anthropic(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def error_body(path: str, status: int, message: str) -> dict[str, Any]:
    """The error JSON the real API behind ``path`` would send for ``status``."""
    if _is_anthropic(path):
        kind = _ANTHROPIC_ERRORS.get(status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": message}}
    kind, code = _OPENAI_ERRORS.get(status, ("server_error", None))
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _error(path: str, status: int, message: str) -> web.Response:
    return web.json_response(error_body(path, status, message), status=status)


def _bad_request(request: web.Request, message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(
        text=json.dumps(error_body(request.path, 400, message)), content_type="application/json"
    )


# ---------------------------------------------------------------------------------------------
# Deterministic answers


def request_digest(payload: dict[str, Any]) -> str:
    """sha256 of the canonical request body, ignoring the streaming flags."""
    canonical = {k: v for k, v in payload.items() if k not in ("stream", "stream_options")}
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _text_of(content: Any) -> str:
    """Text of an OpenAI/Anthropic message content: a string or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        return " ".join(p for p in parts if isinstance(p, str))
    return ""


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _text_of(message.get("content"))
    return ""


def _words(*texts: str) -> int:
    return max(1, sum(len(t.split()) for t in texts))


_FILLER = ("the", "cache", "answer", "model", "request", "token", "value", "result", "data",
           "service", "latency", "prompt", "system", "user", "simple", "example", "and", "of",
           "to", "is", "with", "for", "a", "that", "this", "each", "when", "then", "more",
           "first", "second", "step")


def _answer(digest: str, prompt: str, index: int = 0, words: int = 0) -> str:
    tag = digest if index == 0 else hashlib.sha256(f"{digest}:{index}".encode()).hexdigest()
    text = f"answer-{tag[:8]} to: {prompt[:40]}"
    if words > 0:
        raw = b"".join(hashlib.sha256(f"{tag}:{block}".encode()).digest()
                       for block in range(words // 32 + 1))
        text += " " + " ".join(_FILLER[b % len(_FILLER)] for b in raw[:words])
    return text


def _pieces(text: str, minimum: int = 3) -> list[str]:
    """Split ``text`` into stream deltas that join back exactly: words, else equal slices."""
    pieces = [p for p in re.split(r"(?<=\s)(?=\S)", text) if p]
    if len(pieces) >= minimum or len(text) < minimum:
        return pieces or [text]
    step = math.ceil(len(text) / minimum)
    return [text[i : i + step] for i in range(0, len(text), step)]


def _arguments(text: str, prompt: str) -> str:
    return json.dumps({"answer": text.split(" ", 1)[0], "query": prompt[:40]})


def _tool_name(payload: dict[str, Any], *, anthropic: bool) -> str | None:
    """Name of the tool to call, or None for a plain answer."""
    tools = payload.get("tools")
    if not isinstance(tools, list) or not tools:
        return None
    choice = payload.get("tool_choice")
    if anthropic:
        if isinstance(choice, dict):
            if choice.get("type") == "none":
                return None
            if choice.get("type") == "tool":
                return str(choice.get("name"))
        return str(tools[0].get("name"))
    if choice == "none":
        return None
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        return str(choice["function"].get("name"))
    return str(tools[0].get("function", {}).get("name"))


def _vector(text: str, dim: int) -> list[float]:
    raw = b"".join(
        hashlib.sha256(f"{block}:{text}".encode()).digest() for block in range(dim // 16 + 1)
    )
    values = [int.from_bytes(raw[2 * i : 2 * i + 2], "big") / 32767.5 - 1.0 for i in range(dim)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def _sse(data: dict[str, Any] | str, event: str | None = None) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {payload}\n\n".encode()


# ---------------------------------------------------------------------------------------------
# The server


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class FakeUpstream:
    """An in-process fake model API on an ephemeral 127.0.0.1 port. See the module docstring."""

    def __init__(self, *, latency: float = 0.0, chunk_delay: float = 0.0,
                 answer_words: int = 0) -> None:
        self.latency = latency
        self.answer_words = answer_words
        self.chunk_delay = chunk_delay
        self.calls: collections.Counter[str] = collections.Counter()
        self.requests: list[RecordedRequest] = []
        self.in_flight = 0
        self._failures: list[_Failure] = []
        self._breaks: list[_StreamBreak] = []
        self._held = False
        self._gate = asyncio.Event()
        self._arrived = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._url: str | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
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
        self._failures.clear()
        self._breaks.clear()

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
        self._failures.append(_Failure(status, n, path, body, headers))

    def break_stream_next(self, after_chunks: int = 2, n: int = 1) -> None:
        """The next ``n`` streamed responses send ``after_chunks`` chunks, then the connection is
        closed without the terminator (no ``[DONE]``/``message_stop``/final chunk)."""
        self._breaks.append(_StreamBreak(after_chunks, n))

    def hold(self) -> None:
        """Make requests wait (after being recorded) until ``release()``."""
        self._held = True
        self._gate.clear()

    def release(self) -> None:
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
        return [r for r in self.requests if r.path == path]

    # -- plumbing -----------------------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/_fake/stats", self._stats)
        app.router.add_route("*", "/v1/{tail:.*}", self._not_found)
        app.router.add_route("*", "/echo/{tail:.*}", self._echo)
        return app

    def _take_failure(self, path: str) -> _Failure | None:
        for failure in self._failures:
            if failure.path is None or failure.path == path:
                failure.remaining -= 1
                if failure.remaining <= 0:
                    self._failures.remove(failure)
                return failure
        return None

    def _take_break(self) -> int | None:
        if not self._breaks:
            return None
        rule = self._breaks[0]
        rule.remaining -= 1
        if rule.remaining <= 0:
            self._breaks.pop(0)
        return rule.after_chunks

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        body = await request.read()
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        headers = CIMultiDictProxy(CIMultiDict(request.headers))
        self.requests.append(
            RecordedRequest(
                request.method, request.path, request.query_string, headers, body, parsed
            )
        )
        self.calls[request.path] += 1
        async with self._arrived:
            self._arrived.notify_all()
        failure = self._take_failure(request.path)
        self.in_flight += 1
        try:
            await self._gate.wait()
            if self.latency > 0:
                await asyncio.sleep(self.latency)
            if failure is None:
                return await handler(request)
            message = f"Injected failure (status {failure.status})"
            body_json = failure.body
            if body_json is None:
                body_json = error_body(request.path, failure.status, message)
            return web.json_response(body_json, status=failure.status, headers=failure.headers)
        finally:
            self.in_flight -= 1

    async def _payload(self, request: web.Request) -> dict[str, Any]:
        try:
            payload = json.loads(await request.read())
        except ValueError:
            raise _bad_request(
                request, "We could not parse the JSON body of your request."
            ) from None
        if not isinstance(payload, dict):
            raise _bad_request(request, "The request body must be a JSON object.")
        return payload

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
        cut = self._take_break()
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

    # -- OpenAI -------------------------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        payload = await self._payload(request)
        messages = payload.get("messages")
        if not isinstance(messages, list):
            raise _bad_request(request, "'messages' is a required property")
        digest = request_digest(payload)
        model = payload.get("model", DEFAULT_MODEL)
        prompt = _last_user_text(messages)
        tool = _tool_name(payload, anthropic=False)
        n = int(payload.get("n") or 1)
        answers = [_answer(digest, prompt, i, self.answer_words) for i in range(n)]
        prompt_tokens = _words(
            *(_text_of(m.get("content")) for m in messages if isinstance(m, dict))
        )
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": _words(*answers),
            "total_tokens": prompt_tokens + _words(*answers),
        }
        base = {
            "id": f"chatcmpl-{digest[:24]}",
            "created": CREATED,
            "model": model,
            "system_fingerprint": "fp_fake",
        }
        call_ids = [
            f"call_{hashlib.sha256(f'{digest}:call:{i}'.encode()).hexdigest()[:24]}"
            for i in range(n)
        ]
        if not payload.get("stream"):
            choices = []
            for i, text in enumerate(answers):
                message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
                if tool:
                    function = {"name": tool, "arguments": _arguments(text, prompt)}
                    message["content"] = None
                    message["tool_calls"] = [
                        {"id": call_ids[i], "type": "function", "function": function}
                    ]
                finish = "tool_calls" if tool else "stop"
                choices.append(
                    {"index": i, "message": message, "logprobs": None, "finish_reason": finish}
                )
            body = {**base, "object": "chat.completion", "choices": choices, "usage": usage}
            return web.json_response(body)

        include_usage = bool((payload.get("stream_options") or {}).get("include_usage"))
        extra = {"usage": None} if include_usage else {}

        def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            return _sse({**base, "object": "chat.completion.chunk", "choices": [choice], **extra})

        chunks: list[bytes] = []
        for i, text in enumerate(answers):
            if tool:
                head = {
                    "index": 0,
                    "id": call_ids[i],
                    "type": "function",
                    "function": {"name": tool, "arguments": ""},
                }
                chunks.append(
                    chunk(
                        i,
                        {
                            "role": "assistant",
                            "content": None,
                            "tool_calls": [head],
                            "refusal": None,
                        },
                    )
                )
                for piece in _pieces(_arguments(text, prompt)):
                    part = {"index": 0, "function": {"arguments": piece}}
                    chunks.append(chunk(i, {"tool_calls": [part]}))
            else:
                chunks.append(chunk(i, {"role": "assistant", "content": "", "refusal": None}))
                chunks.extend(chunk(i, {"content": piece}) for piece in _pieces(text))
            chunks.append(chunk(i, {}, "tool_calls" if tool else "stop"))
        if include_usage:
            body = {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}
            chunks.append(_sse(body))
        chunks.append(_sse("[DONE]"))
        return await self._stream(request, chunks)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        payload = await self._payload(request)
        raw = payload.get("prompt", "")
        prompts = [raw] if not isinstance(raw, list) else raw
        prompts = [p if isinstance(p, str) else json.dumps(p) for p in prompts] or [""]
        digest = request_digest(payload)
        n = int(payload.get("n") or 1)
        answers = [
            _answer(digest, prompt, p * n + i, self.answer_words)
            for p, prompt in enumerate(prompts) for i in range(n)
        ]
        prompt_tokens = _words(*prompts)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": _words(*answers),
            "total_tokens": prompt_tokens + _words(*answers),
        }
        base = {
            "id": f"cmpl-{digest[:24]}",
            "object": "text_completion",
            "created": CREATED,
            "model": payload.get("model", DEFAULT_MODEL),
            "system_fingerprint": "fp_fake",
        }
        if not payload.get("stream"):
            choices = [
                {"text": text, "index": i, "logprobs": None, "finish_reason": "stop"}
                for i, text in enumerate(answers)
            ]
            return web.json_response({**base, "choices": choices, "usage": usage})

        include_usage = bool((payload.get("stream_options") or {}).get("include_usage"))
        extra = {"usage": None} if include_usage else {}

        def chunk(index: int, text: str, finish: str | None = None) -> bytes:
            choice = {"text": text, "index": index, "logprobs": None, "finish_reason": finish}
            return _sse({**base, "choices": [choice], **extra})

        chunks: list[bytes] = []
        for i, text in enumerate(answers):
            chunks.extend(chunk(i, piece) for piece in _pieces(text))
            chunks.append(chunk(i, "", "stop"))
        if include_usage:
            chunks.append(_sse({**base, "choices": [], "usage": usage}))
        chunks.append(_sse("[DONE]"))
        return await self._stream(request, chunks)

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        payload = await self._payload(request)
        raw = payload.get("input")
        inputs = raw if isinstance(raw, list) else [raw]
        if raw is None or not inputs:
            raise _bad_request(request, "'input' is a required property")
        dim = int(payload.get("dimensions") or EMBEDDING_DIM)
        data = []
        for i, item in enumerate(inputs):
            vector = _vector(item if isinstance(item, str) else json.dumps(item), dim)
            encoded: Any = vector
            if payload.get("encoding_format") == "base64":
                encoded = base64.b64encode(struct.pack(f"<{dim}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": encoded})
        tokens = _words(*(i if isinstance(i, str) else json.dumps(i) for i in inputs))
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        model = payload.get("model", DEFAULT_MODEL)
        return web.json_response({"object": "list", "data": data, "model": model, "usage": usage})

    async def _models(self, request: web.Request) -> web.StreamResponse:
        data = [
            {"id": m, "object": "model", "created": CREATED, "owned_by": "system"} for m in MODELS
        ]
        return web.json_response({"object": "list", "data": data})

    async def _stats(self, request: web.Request) -> web.StreamResponse:
        calls = {p: n for p, n in self.calls.items() if p != "/_fake/stats"}
        return web.json_response({"calls": calls, "total": sum(calls.values()),
                                  "in_flight": self.in_flight})

    async def _not_found(self, request: web.Request) -> web.StreamResponse:
        return _error(request.path, 404, f"Invalid URL ({request.method} {request.path})")

    # -- Anthropic ----------------------------------------------------------------------------

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        payload = await self._payload(request)
        messages = payload.get("messages")
        if not isinstance(messages, list):
            raise _bad_request(request, "messages: Field required")
        digest = request_digest(payload)
        prompt = _last_user_text(messages)
        text = _answer(digest, prompt, 0, self.answer_words)
        tool = _tool_name(payload, anthropic=True)
        texts = [_text_of(payload.get("system"))]
        texts += [_text_of(m.get("content")) for m in messages if isinstance(m, dict)]
        usage = {"input_tokens": _words(*texts), "output_tokens": _words(text)}
        tool_id = f"toolu_{hashlib.sha256(f'{digest}:tool'.encode()).hexdigest()[:24]}"
        stop_reason = "tool_use" if tool else "end_turn"
        message = {
            "id": f"msg_{digest[:24]}",
            "type": "message",
            "role": "assistant",
            "content": [{"type": "text", "text": text}],
            "model": payload.get("model", DEFAULT_MODEL),
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": usage,
        }
        if tool:
            tool_input = json.loads(_arguments(text, prompt))
            message["content"] = [
                {"type": "tool_use", "id": tool_id, "name": tool, "input": tool_input}
            ]
        if not payload.get("stream"):
            return web.json_response(message)

        start = {
            **message,
            "content": [],
            "stop_reason": None,
            "usage": {"input_tokens": usage["input_tokens"], "output_tokens": 1},
        }
        if tool:
            block: dict[str, Any] = {"type": "tool_use", "id": tool_id, "name": tool, "input": {}}
            deltas = [
                {"type": "input_json_delta", "partial_json": p}
                for p in _pieces(_arguments(text, prompt))
            ]
        else:
            block = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": p} for p in _pieces(text)]
        chunks = [
            _sse({"type": "message_start", "message": start}, "message_start"),
            _sse({"type": "ping"}, "ping"),
            _sse(
                {"type": "content_block_start", "index": 0, "content_block": block},
                "content_block_start",
            ),
            *(
                _sse({"type": "content_block_delta", "index": 0, "delta": d}, "content_block_delta")
                for d in deltas
            ),
            _sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
            _sse(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                    "usage": {"output_tokens": usage["output_tokens"]},
                },
                "message_delta",
            ),
            _sse({"type": "message_stop"}, "message_stop"),
        ]
        return await self._stream(request, chunks)

    # -- pass-through -------------------------------------------------------------------------

    async def _echo(self, request: web.Request) -> web.StreamResponse:
        tail = request.match_info["tail"]
        if tail == "stream":
            parts = max(1, int(request.query.get("parts", "5")))
            return await self._stream(request, [f"part-{i}\n".encode() for i in range(parts)])
        status = 200
        if tail.startswith("status/"):
            try:
                status = int(tail.removeprefix("status/"))
            except ValueError:
                status = 0
            if not 200 <= status <= 599:
                return _error(request.path, 400, f"bad status {tail!r}")
        headers = {"X-Upstream-Echo": "1"}
        if status in (204, 304):
            return web.Response(status=status, headers=headers)
        body = {
            "method": request.method,
            "path": request.path,
            "query": dict(request.query),
            "query_string": request.query_string,
            "headers": dict(request.headers),
            "body": (await request.read()).decode("utf-8", errors="replace"),
        }
        return web.json_response(body, status=status, headers=headers)


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


async def _serve(args: argparse.Namespace) -> None:
    async with running_fake_upstream(
        host=args.host, port=args.port, latency=args.latency, chunk_delay=args.chunk_delay,
        answer_words=args.answer_words,
    ) as fake:
        print(fake.url, flush=True)
        await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the fake OpenAI/Anthropic upstream.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--chunk-delay", type=float, default=0.0)
    parser.add_argument("--answer-words", type=int, default=0,
                        help="pad every answer with this many filler words")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
