"""The OpenAI routes: chat completions, legacy completions, embeddings and the model list, each
as a JSON body or, with ``"stream": true``, as ``data:`` chunks ending in ``data: [DONE]``."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

from aiohttp import web

from promptcache.testing.answers import (
    CREATED,
    DEFAULT_MODEL,
    EMBEDDING_DIM,
    MODELS,
    answer,
    arguments,
    call_id,
    last_user_text,
    pieces,
    request_digest,
    text_of,
    tool_name,
    vector,
    words,
)
from promptcache.testing.errors import bad_request
from promptcache.testing.wire import Reply, read_payload, sse


async def chat(request: web.Request, answer_words: int) -> Reply:
    """``POST /v1/chat/completions``: ``n`` answers, or tool calls when ``tools`` are given."""
    payload = await read_payload(request)
    messages = payload.get("messages")
    if not isinstance(messages, list):
        raise bad_request(request.path, "'messages' is a required property")
    digest = request_digest(payload)
    model = payload.get("model", DEFAULT_MODEL)
    prompt = last_user_text(messages)
    tool = tool_name(payload, anthropic=False)
    n = int(payload.get("n") or 1)
    answers = [answer(digest, prompt, i, answer_words) for i in range(n)]
    prompt_tokens = words(*(text_of(m.get("content")) for m in messages if isinstance(m, dict)))
    usage = _usage(prompt_tokens, answers)
    base = {
        "id": f"chatcmpl-{digest[:24]}",
        "created": CREATED,
        "model": model,
        "system_fingerprint": "fp_fake",
    }
    call_ids = [call_id("call_", digest, f"call:{i}") for i in range(n)]
    if not payload.get("stream"):
        choices = []
        for i, text in enumerate(answers):
            message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
            if tool:
                function = {"name": tool, "arguments": arguments(text, prompt)}
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
        return sse({**base, "object": "chat.completion.chunk", "choices": [choice], **extra})

    chunks: list[bytes] = []
    for i, text in enumerate(answers):
        if tool:
            head = {
                "index": 0,
                "id": call_ids[i],
                "type": "function",
                "function": {"name": tool, "arguments": ""},
            }
            delta = {"role": "assistant", "content": None, "tool_calls": [head], "refusal": None}
            chunks.append(chunk(i, delta))
            for piece in pieces(arguments(text, prompt)):
                part = {"index": 0, "function": {"arguments": piece}}
                chunks.append(chunk(i, {"tool_calls": [part]}))
        else:
            chunks.append(chunk(i, {"role": "assistant", "content": "", "refusal": None}))
            chunks.extend(chunk(i, {"content": piece}) for piece in pieces(text))
        chunks.append(chunk(i, {}, "tool_calls" if tool else "stop"))
    if include_usage:
        body = {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}
        chunks.append(sse(body))
    chunks.append(sse("[DONE]"))
    return chunks


async def completions(request: web.Request, answer_words: int) -> Reply:
    """``POST /v1/completions``: ``n`` answers for each prompt of ``prompt``."""
    payload = await read_payload(request)
    raw = payload.get("prompt", "")
    prompts = [raw] if not isinstance(raw, list) else raw
    prompts = [p if isinstance(p, str) else json.dumps(p) for p in prompts] or [""]
    digest = request_digest(payload)
    n = int(payload.get("n") or 1)
    answers = [
        answer(digest, prompt, p * n + i, answer_words)
        for p, prompt in enumerate(prompts) for i in range(n)
    ]
    prompt_tokens = words(*prompts)
    usage = _usage(prompt_tokens, answers)
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
        return sse({**base, "choices": [choice], **extra})

    chunks: list[bytes] = []
    for i, text in enumerate(answers):
        chunks.extend(chunk(i, piece) for piece in pieces(text))
        chunks.append(chunk(i, "", "stop"))
    if include_usage:
        chunks.append(sse({**base, "choices": [], "usage": usage}))
    chunks.append(sse("[DONE]"))
    return chunks


async def embeddings(request: web.Request, answer_words: int) -> Reply:
    """``POST /v1/embeddings``: a unit vector per input, as floats or ``base64``."""
    payload = await read_payload(request)
    raw = payload.get("input")
    inputs = raw if isinstance(raw, list) else [raw]
    if raw is None or not inputs:
        raise bad_request(request.path, "'input' is a required property")
    dim = int(payload.get("dimensions") or EMBEDDING_DIM)
    data = []
    for i, item in enumerate(inputs):
        values = vector(item if isinstance(item, str) else json.dumps(item), dim)
        encoded: Any = values
        if payload.get("encoding_format") == "base64":
            encoded = base64.b64encode(struct.pack(f"<{dim}f", *values)).decode()
        data.append({"object": "embedding", "index": i, "embedding": encoded})
    tokens = words(*(i if isinstance(i, str) else json.dumps(i) for i in inputs))
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    model = payload.get("model", DEFAULT_MODEL)
    return web.json_response({"object": "list", "data": data, "model": model, "usage": usage})


async def models(request: web.Request, answer_words: int) -> Reply:
    """``GET /v1/models``: the fixed :data:`MODELS` list."""
    data = [{"id": m, "object": "model", "created": CREATED, "owned_by": "system"} for m in MODELS]
    return web.json_response({"object": "list", "data": data})


def _usage(prompt_tokens: int, answers: list[str]) -> dict[str, int]:
    """OpenAI's ``usage`` of a prompt of ``prompt_tokens`` words answered by ``answers``."""
    completion = words(*answers)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}
