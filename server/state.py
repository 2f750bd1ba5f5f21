"""What one running sidecar owns, hung off its aiohttp app under :data:`SIDECAR`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiohttp import web

from promptcache.cache.engine import ExactCache
from promptcache.cache.keys import tenant_id
from promptcache.cache.lease import RemoteFlight
from promptcache.cache.semantic import SemanticCache
from promptcache.cache.singleflight import SingleFlight
from promptcache.cache.sync import IndexSync
from promptcache.server.config import Settings
from promptcache.server.metrics import Metrics
from promptcache.server.proxy import Upstream


@dataclass(frozen=True, slots=True)
class Answer:
    """A complete upstream answer in non-streaming form, as shared with followers."""

    status: int
    body: bytes
    content_type: str


@dataclass(slots=True)
class Sidecar:
    settings: Settings
    cache: ExactCache
    upstream: Upstream
    metrics: Metrics
    semantic: SemanticCache | None = None
    flights: SingleFlight[str, Answer] = field(default_factory=SingleFlight)
    started: float = field(default_factory=time.time)
    remote: RemoteFlight | None = None  # cross-node single flight (a lease in Redis)
    sync: IndexSync | None = None  # keeps the semantic index in step with other nodes
    model_bytes: int = 0

    def tenant(self, credential: str | None) -> str:
        return tenant_id(credential, shared=self.settings.shared_cache)


SIDECAR = web.AppKey("sidecar", Sidecar)
