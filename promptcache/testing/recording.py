"""What the fake remembers of each request it receives."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fake received it. ``headers`` is case-insensitive."""

    method: str
    path: str
    query_string: str
    headers: CIMultiDictProxy[str]
    body: bytes
    json: Any | None  # None when the body is empty or not JSON


async def record(request: web.Request) -> RecordedRequest:
    """Read ``request`` (its body stays readable) into a :class:`RecordedRequest`."""
    body = await request.read()
    try:
        parsed = json.loads(body) if body else None
    except ValueError:
        parsed = None
    headers = CIMultiDictProxy(CIMultiDict(request.headers))
    return RecordedRequest(
        request.method, request.path, request.query_string, headers, body, parsed
    )
