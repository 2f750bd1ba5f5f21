"""Injected faults: error answers (``fail_next``) and streams cut short (``break_stream_next``).

Rules are kept in the order they were added; a request takes the first that matches it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from promptcache.testing.errors import error_body


@dataclass
class Failure:
    """Answer the next ``remaining`` requests (on ``path``, or any) with ``status``."""

    status: int
    remaining: int
    path: str | None
    body: dict[str, Any] | None
    headers: dict[str, str] | None

    def response(self, path: str) -> web.Response:
        """The injected answer to a request on ``path``: ``body``, or the API's error shape."""
        message = f"Injected failure (status {self.status})"
        body = self.body
        if body is None:
            body = error_body(path, self.status, message)
        return web.json_response(body, status=self.status, headers=self.headers)


@dataclass
class StreamBreak:
    """Cut the next ``remaining`` streams after ``after_chunks`` chunks."""

    after_chunks: int
    remaining: int


class Faults:
    """The pending fault rules of one fake."""

    def __init__(self) -> None:
        self.failures: list[Failure] = []
        self.breaks: list[StreamBreak] = []

    def clear(self) -> None:
        """Drop every pending rule."""
        self.failures.clear()
        self.breaks.clear()

    def take_failure(self, path: str) -> Failure | None:
        """The failure a request on ``path`` gets, if any, counting it against its rule."""
        for failure in self.failures:
            if failure.path is None or failure.path == path:
                failure.remaining -= 1
                if failure.remaining <= 0:
                    self.failures.remove(failure)
                return failure
        return None

    def take_break(self) -> int | None:
        """After how many chunks the stream being sent must be cut, if at all."""
        if not self.breaks:
            return None
        rule = self.breaks[0]
        rule.remaining -= 1
        if rule.remaining <= 0:
            self.breaks.pop(0)
        return rule.after_chunks
