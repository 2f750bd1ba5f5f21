"""Error bodies in each API's own shape: OpenAI's ``{"error": {...}}`` and Anthropic's
``{"type": "error", "error": {...}}``, chosen by the request path."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

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


def is_anthropic(path: str) -> bool:
    """Whether ``path`` belongs to the Anthropic API (``/v1/messages`` and below)."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def error_body(path: str, status: int, message: str) -> dict[str, Any]:
    """The error JSON the real API behind ``path`` would send for ``status``."""
    if is_anthropic(path):
        kind = _ANTHROPIC_ERRORS.get(status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": message}}
    kind, code = _OPENAI_ERRORS.get(status, ("server_error", None))
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_response(path: str, status: int, message: str) -> web.Response:
    """A JSON response carrying :func:`error_body`."""
    return web.json_response(error_body(path, status, message), status=status)


def bad_request(path: str, message: str) -> web.HTTPBadRequest:
    """A 400 to raise from a route, with the error body of the API behind ``path``."""
    return web.HTTPBadRequest(
        text=json.dumps(error_body(path, 400, message)), content_type="application/json"
    )


async def not_found(request: web.Request, answer_words: int) -> web.Response:
    """Any other ``/v1/...`` route: a 404 in the shape of the API behind the path."""
    return error_response(request.path, 404, f"Invalid URL ({request.method} {request.path})")
