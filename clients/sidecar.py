"""Driving a running sidecar from code: health, readiness, stats and invalidation.

::

    async with AsyncSidecarClient("http://127.0.0.1:8080", admin_token="...") as sidecar:
        if (await sidecar.readyz()).ready:
            print((await sidecar.stats()).hit_ratio)
        await sidecar.invalidate_namespace("docs-v1")

:class:`SidecarClient` is the same API, sync: it runs an :class:`AsyncSidecarClient` on a
private event-loop thread. Every call has a timeout; failures raise the
:mod:`promptcache.clients.errors` tree (``SidecarUnreachable``, ``SidecarResponseError``,
``AdminRefused``).

The admin token goes only to the sidecar's own token-checked routes (``/stats``, whose
settings it unlocks, and ``DELETE /cache``), never to health checks; and the URL must be
the sidecar's root (``http://host:port``): under a path such as ``/v1`` the calls would
fall through to the pass-through and carry the token to the upstream provider.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from promptcache.cache.errors import AdminRefused, SidecarResponseError, SidecarUnreachable
from promptcache.clients.loop import LoopThread


@dataclass(frozen=True, slots=True)
class Health:
    """GET /healthz."""

    ok: bool  # the process answers (GET /healthz)


@dataclass(frozen=True, slots=True)
class Readiness:
    """GET /readyz."""

    ready: bool  # GET /readyz: False (503) while its Redis is unreachable
    cache: str  # "ok" or "unreachable"
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class CacheStats:
    """The cache part of GET /stats."""

    reachable: bool
    circuit: str  # closed, open or half-open
    circuit_trips: int
    keys: int | None = None
    used_memory_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class Stats:
    """GET /stats."""

    uptime_seconds: float
    requests: dict[str, dict[str, int]]  # route -> cache status -> count
    hit_ratio: float | None  # (HIT + SEMANTIC-HIT) / lookups, None before any lookup
    cache: CacheStats
    semantic: dict[str, Any] | None
    flights_in_progress: int
    settings: dict[str, Any] | None  # secrets shown as ***; None without the admin token

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Stats:
        c = doc["cache"]
        return cls(
            uptime_seconds=float(doc["uptime_seconds"]), requests=doc["requests"],
            hit_ratio=doc["hit_ratio"],
            cache=CacheStats(bool(c["reachable"]), str(c["circuit"]), int(c["circuit_trips"]),
                             c.get("keys"), c.get("used_memory_bytes")),
            semantic=doc.get("semantic"), flights_in_progress=int(doc["flights_in_progress"]),
            settings=doc.get("settings"),
        )


class AsyncSidecarClient:
    """The operations API of the sidecar at ``url`` (its root: ``http://host:port``);
    ``admin_token`` for invalidation and the settings in ``stats()``."""

    def __init__(self, url: str, *, admin_token: str | None = None, timeout: float = 10.0
                 ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"not an http(s) URL: {url!r}")
        if parts.path.strip("/") or parts.query or parts.fragment:
            raise ValueError(
                f"{url!r}: give the sidecar's root URL (scheme://host:port). Its operations "
                "routes live at the root; under a path they would reach the pass-through, "
                "and the admin token the upstream provider.")
        self.url = url.rstrip("/")
        self.admin_token = admin_token
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncSidecarClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _call(self, method: str, path: str, *, json: Any = None,
                    ok: tuple[int, ...] = (200,), admin: bool = False) -> dict[str, Any]:
        """One call; ``admin`` ones (the token-checked routes only) carry the token."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        headers = ({"Authorization": f"Bearer {self.admin_token}"}
                   if admin and self.admin_token else {})
        try:
            async with self._session.request(method, self.url + path, json=json,
                                             headers=headers) as resp:
                try:
                    doc = await resp.json(content_type=None)
                except ValueError:
                    doc = None
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SidecarUnreachable(f"{method} {self.url}{path}: {exc!r}") from exc
        if status in ok and isinstance(doc, dict):
            return doc
        error = doc.get("error") if isinstance(doc, dict) else None
        message = error.get("message", "") if isinstance(error, dict) else str(doc)[:200]
        kind = error.get("type") if isinstance(error, dict) else None
        if status in (401, 403):
            raise AdminRefused(status, message, kind)
        raise SidecarResponseError(status, message, kind)

    async def healthz(self) -> Health:
        doc = await self._call("GET", "/healthz")
        return Health(doc.get("status") == "ok")

    async def readyz(self) -> Readiness:
        doc = await self._call("GET", "/readyz", ok=(200, 503))
        return Readiness(doc.get("status") == "ready", str(doc.get("cache")), doc.get("detail"))

    async def stats(self) -> Stats:
        return Stats.from_json(await self._call("GET", "/stats", admin=True))

    async def invalidate_namespace(self, namespace: str) -> int:
        """Delete every entry of ``namespace`` (``""`` is the default one); the count."""
        return int((await self._call("DELETE", "/cache", json={"namespace": namespace},
                                     admin=True))["deleted"])

    async def invalidate_key(self, key: str, namespace: str = "") -> int:
        """Delete the entry ``key`` (an ``X-Cache-Key``) of ``namespace``; 1 or 0."""
        doc = await self._call("DELETE", "/cache", json={"key": key, "namespace": namespace},
                               admin=True)
        return int(doc["deleted"])

    async def invalidate_tenant(self, credential: dict[str, str],
                                namespace: str | None = None) -> int:
        """Delete one tenant's entries (in ``namespace``, or in all): ``credential`` is its
        credential headers as it sends them, e.g. ``{"Authorization": "Bearer sk-..."}``
        (``"?key"`` for a query parameter). The sidecar hashes it; it is not stored."""
        body: dict[str, Any] = {"credential": credential}
        if namespace is not None:
            body["namespace"] = namespace
        return int((await self._call("DELETE", "/cache", json=body, admin=True))["deleted"])

    async def invalidate_all(self) -> int:
        return int((await self._call("DELETE", "/cache", json={"all": True}, admin=True))
                   ["deleted"])


class SidecarClient:
    """:class:`AsyncSidecarClient`, sync: its calls run on a private event-loop thread."""

    def __init__(self, url: str, *, admin_token: str | None = None, timeout: float = 10.0
                 ) -> None:
        self.aio = AsyncSidecarClient(url, admin_token=admin_token, timeout=timeout)
        self._loop = LoopThread("promptcache-sidecar-client")
        self._loop.start()

    def __enter__(self) -> SidecarClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.running:
            try:
                self._loop.run(self.aio.close())
            finally:
                self._loop.stop()

    def healthz(self) -> Health:
        return self._loop.run(self.aio.healthz())

    def readyz(self) -> Readiness:
        return self._loop.run(self.aio.readyz())

    def stats(self) -> Stats:
        return self._loop.run(self.aio.stats())

    def invalidate_namespace(self, namespace: str) -> int:
        return self._loop.run(self.aio.invalidate_namespace(namespace))

    def invalidate_key(self, key: str, namespace: str = "") -> int:
        return self._loop.run(self.aio.invalidate_key(key, namespace))

    def invalidate_tenant(self, credential: dict[str, str], namespace: str | None = None
                          ) -> int:
        return self._loop.run(self.aio.invalidate_tenant(credential, namespace))

    def invalidate_all(self) -> int:
        return self._loop.run(self.aio.invalidate_all())
