"""The model APIs the cache speaks: its routes, which of them stream, and their error shapes.

- ``"chat"``: OpenAI ``POST /v1/chat/completions``;
- ``"completions"``: OpenAI's legacy ``POST /v1/completions``;
- ``"embeddings"``: OpenAI ``POST /v1/embeddings`` (never streams);
- ``"messages"``: Anthropic ``POST /v1/messages``;
- ``"responses"``: OpenAI ``POST /v1/responses`` (a typed event stream when it streams).

:func:`error_body` is the one builder of API-shaped error bodies: the sidecar's 4xx for bad
input, its 502 for an unreachable upstream, and its admin routes' errors all use it.
"""

from __future__ import annotations

from typing import Any, Final, Literal

Api = Literal["chat", "completions", "embeddings", "messages", "responses"]

#: The cached routes and the API shape each one speaks.
ENDPOINTS: Final[dict[str, Api]] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/messages": "messages",
    "/v1/responses": "responses",
}

#: The APIs whose requests may ask for a server-sent event stream (``stream: true``).
STREAMABLE: Final[frozenset[Api]] = frozenset({"chat", "completions", "messages",
                                                "responses"})


def error_body(api: Api, message: str, *, kind: str, param: str | None = None
               ) -> dict[str, Any]:
    """An error in the shape of ``api``: Anthropic's ``{"type": "error", "error": {type,
    message}}`` or OpenAI's ``{"error": {message, type, param, code}}``."""
    if api == "messages":
        return {"type": "error", "error": {"type": kind, "message": message}}
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}
