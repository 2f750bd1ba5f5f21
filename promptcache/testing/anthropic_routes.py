"""The Anthropic route: ``POST /v1/messages``, as one message or, with ``"stream": true``, as
named SSE events from ``message_start`` to ``message_stop``."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from promptcache.testing.answers import (
    DEFAULT_MODEL,
    answer,
    arguments,
    call_id,
    last_user_text,
    pieces,
    request_digest,
    text_of,
    tool_name,
    words,
)
from promptcache.testing.errors import bad_request
from promptcache.testing.wire import Reply, read_payload, sse


async def messages(request: web.Request, answer_words: int) -> Reply:
    """``POST /v1/messages``: a text block, or a ``tool_use`` block when ``tools`` are given."""
    payload = await read_payload(request)
    history = payload.get("messages")
    if not isinstance(history, list):
        raise bad_request(request.path, "messages: Field required")
    digest = request_digest(payload)
    prompt = last_user_text(history)
    text = answer(digest, prompt, 0, answer_words)
    tool = tool_name(payload, anthropic=True)
    texts = [text_of(payload.get("system"))]
    texts += [text_of(m.get("content")) for m in history if isinstance(m, dict)]
    usage = {"input_tokens": words(*texts), "output_tokens": words(text)}
    tool_id = call_id("toolu_", digest, "tool")
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
        tool_input = json.loads(arguments(text, prompt))
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
            for p in pieces(arguments(text, prompt))
        ]
    else:
        block = {"type": "text", "text": ""}
        deltas = [{"type": "text_delta", "text": p} for p in pieces(text)]
    return [
        sse({"type": "message_start", "message": start}, "message_start"),
        sse({"type": "ping"}, "ping"),
        sse(
            {"type": "content_block_start", "index": 0, "content_block": block},
            "content_block_start",
        ),
        *(
            sse({"type": "content_block_delta", "index": 0, "delta": d}, "content_block_delta")
            for d in deltas
        ),
        sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
        sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": usage["output_tokens"]},
            },
            "message_delta",
        ),
        sse({"type": "message_stop"}, "message_stop"),
    ]
