"""Pass-through routes under ``/echo/``, for testing a proxy rather than a model API.

``/echo/stream?parts=N`` streams ``part-0\\n`` ... as plain text; ``/echo/status/<code>`` answers
with that status; anything else echoes the request (method, path, query, headers, body) as JSON.
Every answer carries ``X-Upstream-Echo: 1``.
"""

from __future__ import annotations

from aiohttp import web

from promptcache.testing.errors import error_response
from promptcache.testing.wire import Reply


async def echo(request: web.Request, answer_words: int) -> Reply:
    """Any method on ``/echo/{tail}``: see the module docstring."""
    tail = request.match_info["tail"]
    if tail == "stream":
        parts = max(1, int(request.query.get("parts", "5")))
        return [f"part-{i}\n".encode() for i in range(parts)]
    status = 200
    if tail.startswith("status/"):
        try:
            status = int(tail.removeprefix("status/"))
        except ValueError:
            status = 0
        if not 200 <= status <= 599:
            return error_response(request.path, 400, f"bad status {tail!r}")
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
