"""What one running sidecar owns, hung off its aiohttp app under :data:`SIDECAR`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiohttp import web

from promptcache.cache.engine import Engine
from promptcache.cache.entry import Answer
from promptcache.cache.exact import ExactCache
from promptcache.cache.redis.index_sync import IndexSync
from promptcache.cache.redis.remote_flight import RemoteFlight
from promptcache.cache.request import PreparedMemo
from promptcache.cache.semantic.tier import SemanticCache
from promptcache.cache.singleflight import SingleFlight
from promptcache.server.config import Settings
from promptcache.server.metrics import Metrics
from promptcache.server.proxy import Upstream


@dataclass(slots=True)
class Sidecar:
    """What one running sidecar owns: settings, engine, upstream and metrics."""

    settings: Settings
    engine: Engine
    upstream: Upstream
    metrics: Metrics
    started: float = field(default_factory=time.time)
    #: Requests prepared lately: a repeated request skips parsing and keying.
    prepared: PreparedMemo = field(default_factory=PreparedMemo)

    @property
    def remote(self) -> RemoteFlight | None:
        return self.engine.remote

    @property
    def sync(self) -> IndexSync | None:
        return self.engine.sync

    @property
    def model_bytes(self) -> int:
        return self.engine.model_bytes

    @property
    def cache(self) -> ExactCache:
        return self.engine.cache

    @property
    def semantic(self) -> SemanticCache | None:
        return self.engine.semantic

    @property
    def flights(self) -> SingleFlight[str, Answer]:
        return self.engine.flights


SIDECAR = web.AppKey("sidecar", Sidecar)
