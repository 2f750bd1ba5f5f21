"""promptcache inside your program: an in-process cache (:class:`Cache`, :class:`AsyncCache`),
``wrap(openai_client)``, a decorator (``AsyncCache.cached``), and a client for a running
sidecar (:class:`SidecarClient`, :class:`AsyncSidecarClient`). ``wrap`` needs the
``openai`` extra (``pip install 'promptcache[openai]'``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from promptcache.cache.errors import (
    AdminRefused,
    CacheClosed,
    ClientError,
    SidecarError,
    SidecarResponseError,
    SidecarUnreachable,
)
from promptcache.cache.options import EngineOptions
from promptcache.clients.cache import AsyncCache, Cache, Result
from promptcache.clients.sidecar import AsyncSidecarClient, Health, Readiness, SidecarClient, Stats

if TYPE_CHECKING:
    from promptcache.clients.wrapper import wrap

__all__ = [
    "AdminRefused", "AsyncCache", "AsyncSidecarClient", "Cache", "CacheClosed", "ClientError",
    "EngineOptions", "Health", "Readiness", "Result", "SidecarClient", "SidecarError",
    "SidecarResponseError", "SidecarUnreachable", "Stats", "wrap",
]


def __getattr__(name: str) -> Any:
    if name == "wrap":  # imported on use: it needs the optional openai extra (httpx2)
        from promptcache.clients.wrapper import wrap

        return wrap
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
