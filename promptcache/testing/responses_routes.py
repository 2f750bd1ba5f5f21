"""The OpenAI Responses route, ``POST /v1/responses``: a ``response`` object, or with
``"stream": true`` its typed event stream (``event: response.created`` ... ``event:
response.completed``, each ``data`` with its ``type`` and a ``sequence_number``).

The answer is a message with one ``output_text`` part, or a ``function_call`` when function
``tools`` are given (and ``tool_choice`` is not ``"none"``). The response echoes the
request's settings (``instructions``, ``store``, ``previous_response_id``...) as the real
API does."""

from __future__ import annotations

import itertools
from typing import Any

from aiohttp import web

from promptcache.testing.answers import (
    CREATED,
    DEFAULT_MODEL,
    answer,
    arguments,
    call_id,
    last_user_text,
    pieces,
    request_digest,
    text_of,
    words,
)
from promptcache.testing.errors import bad_request
from promptcache.testing.wire import Reply, read_payload, sse


async def responses(request: web.Request, answer_words: int) -> Reply:
    """``POST /v1/responses``: one answer to the final user input."""
    payload = await read_payload(request)
    raw = payload.get("input")
    if raw is None and payload.get("previous_response_id") is None and \
            payload.get("conversation") is None:
        raise bad_request(request.path, "'input' is a required property")
    if raw is not None and not isinstance(raw, str | list):
        raise bad_request(request.path, "Invalid type for 'input'.")
    digest = request_digest(payload)
    items = [raw] if isinstance(raw, str) else raw or []
    prompt = raw if isinstance(raw, str) else last_user_text(items)
    text = answer(digest, prompt, 0, answer_words)
    tool = _tool_name(payload)
    if tool:
        item: dict[str, Any] = {
            "id": call_id("fc_", digest, "item"), "type": "function_call",
            "status": "completed", "arguments": arguments(text, prompt),
            "call_id": call_id("call_", digest, "call:0"), "name": tool,
        }
    else:
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        item = {"id": call_id("msg_", digest, "item"), "type": "message",
                "status": "completed", "role": "assistant", "content": [part]}
    prompt_tokens = words(payload.get("instructions") or "",
                          *(i if isinstance(i, str) else text_of(i.get("content"))
                            for i in items if isinstance(i, str | dict)))
    body = _response(payload, f"resp_{digest[:32]}", [item], prompt_tokens, words(text))
    if not payload.get("stream"):
        return web.json_response(body)
    return _events(body, item)


def _tool_name(payload: dict[str, Any]) -> str | None:
    """The function to call, or None for a plain answer."""
    tools = [t for t in payload.get("tools") or []
             if isinstance(t, dict) and t.get("type") == "function"]
    choice = payload.get("tool_choice")
    if not tools or choice == "none":
        return None
    if isinstance(choice, dict) and isinstance(choice.get("name"), str):
        return str(choice["name"])
    return str(tools[0].get("name"))


def _response(payload: dict[str, Any], rid: str, output: list[dict[str, Any]],
              prompt_tokens: int, output_tokens: int) -> dict[str, Any]:
    usage = {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
             "output_tokens": output_tokens,
             "output_tokens_details": {"reasoning_tokens": 0},
             "total_tokens": prompt_tokens + output_tokens}
    return {
        "id": rid, "object": "response", "created_at": CREATED, "status": "completed",
        "background": bool(payload.get("background")), "completed_at": CREATED + 1,
        "error": None, "incomplete_details": None,
        "instructions": payload.get("instructions"),
        "max_output_tokens": payload.get("max_output_tokens"),
        "model": payload.get("model", DEFAULT_MODEL), "output": output,
        "parallel_tool_calls": payload.get("parallel_tool_calls", True),
        "previous_response_id": payload.get("previous_response_id"),
        "reasoning": payload.get("reasoning") or {"effort": None, "summary": None},
        "store": payload.get("store", True),
        "temperature": payload.get("temperature", 1.0),
        "text": payload.get("text") or {"format": {"type": "text"}},
        "tool_choice": payload.get("tool_choice", "auto"),
        "tools": payload.get("tools") or [], "top_p": payload.get("top_p", 1.0),
        "truncation": payload.get("truncation", "disabled"), "usage": usage,
        "user": payload.get("user"), "metadata": payload.get("metadata") or {},
    }


def _events(body: dict[str, Any], item: dict[str, Any]) -> list[bytes]:
    """The stream of ``body``, whose one output item is ``item``, as the real API sends it
    (deltas carry ``obfuscation`` padding)."""
    numbers = itertools.count()

    def event(kind: str, **fields: Any) -> bytes:
        return sse({"type": kind, "sequence_number": next(numbers), **fields}, kind)

    start = {**body, "status": "in_progress", "output": [], "usage": None,
             "completed_at": None}
    at = {"item_id": item["id"], "output_index": 0}
    chunks = [event("response.created", response=start),
              event("response.in_progress", response=start)]
    if item["type"] == "function_call":
        chunks.append(event("response.output_item.added", output_index=0,
                            item={**item, "status": "in_progress", "arguments": ""}))
        chunks += [event("response.function_call_arguments.delta", **at, delta=piece,
                         obfuscation="xx") for piece in pieces(item["arguments"])]
        chunks.append(event("response.function_call_arguments.done", **at,
                            arguments=item["arguments"]))
    else:
        part = item["content"][0]
        chunks.append(event("response.output_item.added", output_index=0,
                            item={**item, "status": "in_progress", "content": []}))
        at["content_index"] = 0
        chunks.append(event("response.content_part.added", **at, part={**part, "text": ""}))
        chunks += [event("response.output_text.delta", **at, delta=piece, logprobs=[],
                         obfuscation="xx") for piece in pieces(part["text"])]
        chunks.append(event("response.output_text.done", **at, text=part["text"],
                            logprobs=[]))
        chunks.append(event("response.content_part.done", **at, part=part))
    chunks.append(event("response.output_item.done", output_index=0, item=item))
    chunks.append(event("response.completed", response=body))
    return chunks
