"""Type checks on request bodies, so bad input is a clear 400 rather than a bad key.

Only the fields the cache relies on, and the generation parameters whose type is
unambiguous, are checked; everything else is left for the upstream API to judge.
"""

from __future__ import annotations

import math
from typing import Any

from promptcache.cache.api import Api
from promptcache.cache.errors import RequestError

_NUMBER_FIELDS = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "top_k")
_INT_FIELDS = ("max_tokens", "max_completion_tokens", "n", "seed", "top_logprobs")
_BOOL_FIELDS = ("stream", "logprobs")


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _check(cond: bool, message: str, param: str) -> None:
    if not cond:
        raise RequestError(message, param=param)


def validate_body(api: Api, body: Any) -> dict[str, Any]:
    """Return ``body`` if it is a well-typed request of ``api``; raise RequestError if not."""
    _check(isinstance(body, dict), "the request body must be a JSON object", "body")
    assert isinstance(body, dict)
    if "model" in body or api not in ("embeddings", "responses"):
        _check(isinstance(body.get("model"), str), "'model' must be a string", "model")
    for f in _NUMBER_FIELDS:
        if body.get(f) is not None:
            _check(_is_number(body[f]), f"'{f}' must be a number", f)
    for f in _INT_FIELDS:
        if body.get(f) is not None:
            v = body[f]
            _check(isinstance(v, int) and not isinstance(v, bool), f"'{f}' must be an integer", f)
    if api != "messages":
        # Anthropic's `logprobs` does not exist; OpenAI completions takes an int there.
        for f in _BOOL_FIELDS:
            if body.get(f) is not None and not (api == "completions" and f == "logprobs"):
                _check(isinstance(body[f], bool), f"'{f}' must be a boolean", f)
    elif body.get("stream") is not None:
        _check(isinstance(body["stream"], bool), "'stream' must be a boolean", "stream")
    if body.get("stream_options") is not None:
        _check(isinstance(body["stream_options"], dict), "'stream_options' must be an object",
               "stream_options")
    if api in ("chat", "messages"):
        _check_messages(body.get("messages"))
    elif api == "completions":
        p = body.get("prompt")
        _check(isinstance(p, str | list), "'prompt' must be a string or an array", "prompt")
    elif api == "embeddings":
        i = body.get("input")
        _check(isinstance(i, str | list), "'input' must be a string or an array", "input")
    elif api == "responses":
        _check_responses(body)
    if body.get("stop") is not None:
        s = body["stop"]
        ok = isinstance(s, str) or (isinstance(s, list) and all(isinstance(x, str) for x in s))
        _check(ok, "'stop' must be a string or an array of strings", "stop")
    if api == "messages" and body.get("stop_sequences") is not None:
        s = body["stop_sequences"]
        ok = isinstance(s, list) and all(isinstance(x, str) for x in s)
        _check(ok, "'stop_sequences' must be an array of strings", "stop_sequences")
    for f in ("tools", "functions"):
        if body.get(f) is not None:
            _check(isinstance(body[f], list), f"'{f}' must be an array", f)
    return body


#: Responses API fields and the JSON types they take (null is always allowed).
_RESPONSES_FIELDS: dict[str, tuple[type, ...]] = {
    "instructions": (str,), "previous_response_id": (str,), "conversation": (str, dict),
    "text": (dict,), "reasoning": (dict,), "tool_choice": (str, dict), "include": (list,),
    "metadata": (dict,), "prompt": (dict,), "background": (bool,), "store": (bool,),
    "parallel_tool_calls": (bool,), "max_output_tokens": (int,), "max_tool_calls": (int,),
    "truncation": (str,),
}
_TYPE_NAMES = {str: "a string", list: "an array", dict: "an object", bool: "a boolean",
               int: "an integer"}


def _check_responses(body: dict[str, Any]) -> None:
    """``POST /v1/responses``: ``model`` (unless a stored ``prompt`` names it), ``input``
    as a string or an array of items (objects), and the types of the fields the key
    and the pass-through rules read."""
    if body.get("prompt") is None or "model" in body:
        _check(isinstance(body.get("model"), str), "'model' must be a string", "model")
    for f, types in _RESPONSES_FIELDS.items():
        v = body.get(f)
        if v is not None:
            ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in types)
            _check(ok, f"'{f}' must be {' or '.join(_TYPE_NAMES[t] for t in types)}", f)
    items = body.get("input")
    if items is None:
        return
    _check(isinstance(items, str | list), "'input' must be a string or an array", "input")
    for i, item in enumerate(items if isinstance(items, list) else []):
        _check(isinstance(item, dict), f"'input[{i}]' must be an object", f"input[{i}]")
        if item.get("role") is not None:
            _check(isinstance(item["role"], str), f"'input[{i}].role' must be a string",
                   f"input[{i}].role")
            c = item.get("content")
            _check(isinstance(c, str | list),
                   f"'input[{i}].content' must be a string or an array", f"input[{i}].content")


def _check_messages(messages: Any) -> None:
    _check(
        isinstance(messages, list) and len(messages) > 0,
        "'messages' must be a non-empty array",
        "messages",
    )
    for i, m in enumerate(messages):
        _check(isinstance(m, dict), f"'messages[{i}]' must be an object", f"messages[{i}]")
        _check(
            isinstance(m.get("role"), str),
            f"'messages[{i}].role' must be a string",
            f"messages[{i}].role",
        )
        c = m.get("content")
        _check(
            c is None or isinstance(c, str | list),
            f"'messages[{i}].content' must be a string, an array or null",
            f"messages[{i}].content",
        )
