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
    if "model" in body or api != "embeddings":
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
