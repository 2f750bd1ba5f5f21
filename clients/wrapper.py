"""``wrap(client)``: the official OpenAI client, answering from an in-process cache.

::

    from openai import OpenAI
    from promptcache.clients import wrap

    client = wrap(OpenAI())          # a private Redis, started now, stopped at close()
    client.chat.completions.create(model="gpt-4o-mini", messages=[...])   # MISS
    client.chat.completions.create(model="gpt-4o-mini", messages=[...])   # HIT

The wrapped client is a copy of ``client`` (``with_options``) whose HTTP client sends
through a :mod:`caching transport <promptcache.clients.transport>` that forwards misses
through ``client``'s own HTTP client (its proxies, timeouts and limits), so every method,
return type, retry and error is the OpenAI client's own.
"""

from __future__ import annotations

from typing import Any, TypeVar

import httpx2

from promptcache.cache.options import EngineOptions
from promptcache.clients.cache import Cache
from promptcache.clients.transport import AsyncCachingTransport, CachingTransport

C = TypeVar("C")


def wrap(client: C, cache: Cache | None = None, *, options: EngineOptions | None = None,
         **overrides: Any) -> C:
    """A copy of an ``openai.OpenAI`` or ``openai.AsyncOpenAI`` client that answers from
    ``cache``, or from a cache of its own built from ``options`` / the sidecar's option
    names (``redis_url=...``, ``similarity_threshold=...``), closed with the client.

    Responses carry the sidecar's headers (``X-Cache``, ``X-Cache-Key``, ``Age``); per
    request, ``extra_headers={"X-Cache-Namespace": ..., "Cache-Control": "no-cache"}``
    work as they do with the sidecar.
    """
    http = getattr(client, "_client", None)
    if not isinstance(http, httpx2.Client | httpx2.AsyncClient) or not hasattr(
            client, "with_options"):
        raise TypeError(f"wrap() takes an openai.OpenAI or openai.AsyncOpenAI client "
                        f"(openai 3.x, on httpx2), not {type(client).__name__}")
    if cache is not None and not isinstance(cache, Cache):
        raise TypeError("wrap() takes a promptcache.clients.Cache (it serves any thread and "
                        f"event loop), not {type(cache).__name__}")
    owns = cache is None
    if cache is None:
        cache = Cache(options, **overrides).open()
    elif options is not None or overrides:
        raise TypeError("give either a cache or options for a new one, not both")
    caching: httpx2.Client | httpx2.AsyncClient
    if isinstance(http, httpx2.AsyncClient):
        caching = httpx2.AsyncClient(
            transport=AsyncCachingTransport(cache, http, owns_cache=owns),
            timeout=http.timeout, follow_redirects=http.follow_redirects)
    else:
        caching = httpx2.Client(transport=CachingTransport(cache, http, owns_cache=owns),
                                timeout=http.timeout, follow_redirects=http.follow_redirects)
    wrapped: C = client.with_options(http_client=caching)  # type: ignore[attr-defined]
    return wrapped
