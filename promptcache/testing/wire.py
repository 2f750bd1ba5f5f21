"""What every model route shares: reading the JSON body, framing SSE events, and the
:data:`Reply` a route hands back to the server."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

from aiohttp import web

from promptcache.testing.errors import bad_request

Reply: TypeAlias = web.StreamResponse | list[bytes]
"""A finished response, or the chunks of a stream (the last is its terminator) for the server to
write, with its ``chunk_delay`` and any pending ``break_stream_next``."""

Route: TypeAlias = Callable[[web.Request, int], Awaitable[Reply]]
"""A route: ``(request, answer_words) -> Reply``."""


async def read_payload(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body, or a 400 in the API's shape."""
    try:
        payload = json.loads(await request.read())
    except ValueError:
        raise bad_request(
            request.path, "We could not parse the JSON body of your request."
        ) from None
    if not isinstance(payload, dict):
        raise bad_request(request.path, "The request body must be a JSON object.")
    return payload


def sse(data: dict[str, Any] | str, event: str | None = None) -> bytes:
    """One server-sent event: compact JSON (or a literal string) after an optional name."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {payload}\n\n".encode()
