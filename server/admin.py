"""Operations routes: health, readiness, metrics, stats, and cache invalidation.

What is open and what needs the admin token (``Authorization: Bearer <--admin-token>``):
``/healthz``, ``/readyz`` and ``/metrics`` are open and carry no secret and no prompt text;
``/stats`` is open but shows the settings only with the token; ``DELETE /cache`` always
needs it. Their errors take OpenAI's error shape (:func:`promptcache.cache.api.error_body`).
"""

from __future__ import annotations

import hmac
import json
import os
import time
from typing import Any

from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from promptcache.cache.api import error_body
from promptcache.cache.errors import CacheUnavailable, RequestError
from promptcache.cache.keys import check_namespace, tenant_tag
from promptcache.cache.request import credential
from promptcache.cache.resident import memory_split
from promptcache.cache.semantic.tier import SKIP_REASONS
from promptcache.cache.strict_json import parse_json_object
from promptcache.server.dashboard import LATENCY
from promptcache.server.state import SIDECAR, Sidecar

#: Which process of ``--workers N`` this app runs in (``index``, ``pid``, ``workers``), set by
#: the worker; a single-process sidecar is worker 0 of 1.
WORKER = web.AppKey("worker", dict)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    sc = request.app[SIDECAR]
    if await sc.cache.ping():
        body = {"status": "ready", "cache": "ok"}
        if sc.semantic is not None:  # exact hits are served while the index loads
            body["semantic"] = "warming" if sc.sync is not None and sc.sync.warming else "ok"
        return web.json_response(body)
    return web.json_response(
        {"status": "degraded", "cache": "unreachable",
         "detail": "requests are passed upstream uncached until the cache is back"},
        status=503,
    )


async def _refresh_gauges(sc: Sidecar) -> dict[str, Any] | None:
    m = sc.metrics
    m.set_gauges(breaker_open=1 if sc.cache.breaker.state != "closed" else 0,
                 evicted=sc.cache.counts["evicted"])
    if sc.semantic is not None:
        m.set_gauges(index_vectors=len(sc.semantic), index_bytes=sc.semantic.nbytes,
                     vector_backlog=sc.semantic.stats()["vector_backlog"])
        for reason in SKIP_REASONS:
            m.semantic_skipped.labels(reason).set(sc.semantic.counts[reason])
    m.set_near(sc.engine.near.stats())
    if sc.engine.audit is not None:
        m.set_audit(sc.engine.audit.stats())
    memory = _memory(sc)
    m.set_gauges(rss=memory["rss_bytes"], memory_shed=int(memory.get("shedding", False)),
                 memory_sheds=memory.get("sheds", 0))
    for key, value in memory.items():
        if key.endswith("_bytes") and key not in ("rss_bytes", "max_rss_bytes",
                                                  "peak_rss_bytes"):
            m.memory.labels(key.removesuffix("_bytes")).set(value)
    try:
        info = await sc.cache.info()
    except CacheUnavailable:
        return None
    m.set_gauges(entries=info.get("entries", info["keys"]),
                 bytes_stored=info["used_memory_bytes"], budget_bytes=info.get("bytes", 0),
                 max_bytes=info.get("max_bytes", 0))
    return info


def _memory(sc: Sidecar) -> dict[str, Any]:
    guard = sc.engine.guard
    return {**memory_split(**sc.engine.memory()), **(guard.stats() if guard is not None else {})}


async def metrics(request: web.Request) -> web.Response:
    sc = request.app[SIDECAR]
    await _refresh_gauges(sc)
    resp = web.Response(body=generate_latest(sc.metrics.registry))
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


def _counts(sc: Sidecar) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for metric in sc.metrics.requests.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                route, status = sample.labels["route"], sample.labels["cache"]
                out.setdefault(route, {})[status] = int(sample.value)
    return out


def _upstream_calls(sc: Sidecar) -> int:
    """Upstream calls the cached routes made (pass-through requests not counted)."""
    return int(sum(s.value for m in sc.metrics.upstream_seconds.collect()
                   for s in m.samples if s.name.endswith("_count")))


async def stats(request: web.Request) -> web.Response:
    sc = request.app[SIDECAR]
    info = await _refresh_gauges(sc)
    counts = _counts(sc)
    hits = sum(c.get("HIT", 0) + c.get("SEMANTIC-HIT", 0) for c in counts.values())
    lookups = hits + sum(c.get("MISS", 0) for c in counts.values())
    return web.json_response(
        {
            "uptime_seconds": round(time.time() - sc.started, 3),
            # Each worker answers for its own engine: this says which one did.
            "worker": request.app.get(WORKER) or {"index": 0, "pid": os.getpid(),
                                                  "workers": 1},
            "requests": counts,
            "hit_ratio": round(hits / lookups, 4) if lookups else None,
            "upstream_calls": _upstream_calls(sc),
            # p50/p99 over the latest requests of each X-Cache status (the status page's).
            "latency": request.app[LATENCY].summary(),
            "cache": {
                "reachable": info is not None,
                "circuit": sc.cache.breaker.state,
                "circuit_trips": sc.cache.breaker.trips,
                **(info or {}),
            },
            "semantic": sc.semantic.stats() if sc.semantic is not None else None,
            "index_sync": sc.sync.stats() if sc.sync is not None else None,
            "memory": _memory(sc),
            "near_cache": sc.engine.near.stats(),
            # Tokens and cost hits saved, less followers' fallbacks (README: Savings).
            "savings": sc.metrics.savings.stats(),
            # The false-hit audit's estimate and bound (README: False-hit audit).
            "audit": sc.engine.audit.stats() if sc.engine.audit is not None else None,
            "flights_in_progress": len(sc.flights),
            "remote_flights": sc.remote.stats() if sc.remote is not None else None,
            "embedded_redis": (sc.engine.embedded.stats() if sc.engine.embedded is not None
                               else None),
            # The settings (URLs with passwords masked, secrets as ***) only for the operator.
            **({"settings": sc.settings.public()} if _is_admin(request, sc) else {}),
        },
        dumps=lambda o: json.dumps(o, default=str),
    )


def _is_admin(request: web.Request, sc: Sidecar) -> bool:
    """Does the request carry the admin token? (Compared in constant time; a header of any
    bytes is compared, never an error.)"""
    token = sc.settings.admin_token
    if not token:
        return False
    given = request.headers.get("Authorization", "")
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"),
                               f"Bearer {token}".encode())


def _authorised(request: web.Request, sc: Sidecar) -> web.Response | None:
    if not sc.settings.admin_token:
        return web.json_response(
            error_body("chat", "admin routes are disabled: set PROMPTCACHE_ADMIN_TOKEN",
                       kind="forbidden"), status=403)
    if not _is_admin(request, sc):
        return web.json_response(
            error_body("chat", "admin token missing or wrong", kind="unauthorized"),
            status=401, headers={"WWW-Authenticate": "Bearer"})
    return None


MAX_ADMIN_BODY = 64 << 10


async def _selector(request: web.Request) -> dict[str, Any]:
    """The target of DELETE /cache, from the query string or a JSON body."""
    if request.can_read_body:
        if (request.content_length or 0) > MAX_ADMIN_BODY:
            raise RequestError(f"the body must be at most {MAX_ADMIN_BODY} bytes")
        data = await request.content.read(MAX_ADMIN_BODY + 1)
        if len(data) > MAX_ADMIN_BODY:
            raise RequestError(f"the body must be at most {MAX_ADMIN_BODY} bytes")
        return parse_json_object(data)
    return dict(request.query)


def _string(target: dict[str, Any], name: str) -> str | None:
    value = target.get(name)
    if value is not None and not isinstance(value, str):
        raise RequestError(f"'{name}' must be a string", param=name)
    return value


def _tenant_tag(sc: Sidecar, given: Any) -> str:
    """The tag of the tenant whose credential is ``given``: {"Authorization": "Bearer sk-..",
    "?key": ".."}, the credential headers (and ``?``-prefixed query parameters) exactly as
    that tenant sends them. Hashed here as the cached routes hash it; never stored."""
    if (not isinstance(given, dict) or not given
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in given.items())):
        raise RequestError("'credential' must be an object of header (or '?param') names to "
                           "the values the tenant sends", param="credential")
    if sc.settings.shared_cache:
        raise RequestError("with --shared-cache entries belong to no tenant: purge a "
                           "namespace or everything instead", param="credential")
    headers = CIMultiDict((k, v) for k, v in given.items() if not k.startswith("?"))
    query = [(k[1:], v) for k, v in given.items() if k.startswith("?")]
    opts = sc.settings
    cred = credential(headers, query, names=opts.credential_headers,
                      params=opts.credential_params)
    if cred is None:
        raise RequestError("'credential' names no credential header or parameter this "
                           "sidecar reads (--credential-headers, --credential-params)",
                           param="credential")
    return tenant_tag(sc.engine.tenant(cred))


async def delete_cache(request: web.Request) -> web.Response:
    """DELETE /cache {"namespace": NS} | {"key": ID, "namespace": NS} | {"all": true}
    | {"credential": {HEADER: VALUE}} (one tenant's entries; with "namespace", in that one).
    """
    sc = request.app[SIDECAR]
    refused = _authorised(request, sc)
    if refused is not None:
        return refused
    try:
        target = await _selector(request)
        raw_ns = _string(target, "namespace")
        namespace = check_namespace(raw_ns or "")
        key = _string(target, "key")
        everything = target.get("all") in (True, "true", "True")
        tag = _tenant_tag(sc, target["credential"]) if "credential" in target else None
        if key is not None and not (len(key) == 32
                                    and all(c in "0123456789abcdef" for c in key)):
            raise RequestError("'key' must be the 32-hex-digit id from X-Cache-Key")
        if key is None and raw_ns is None and tag is None and not everything:
            raise RequestError("name a 'namespace', a 'key' (with its namespace), a "
                               "'credential' or 'all': true")
    except RequestError as exc:
        return web.json_response(
            error_body("chat", exc.message, kind="invalid_request_error", param=exc.param),
            status=400)
    try:
        if key is not None:
            deleted = await sc.cache.invalidate_key(namespace, key)
        elif tag is not None:
            deleted = await sc.cache.invalidate_tenant(tag, None if raw_ns is None
                                                       else namespace)
        elif everything:
            deleted = await sc.cache.invalidate_all()
        else:
            deleted = await sc.cache.invalidate_namespace(namespace)
    except CacheUnavailable as exc:
        return web.json_response(error_body("chat", str(exc), kind="cache_unavailable"),
                                 status=503)
    return web.json_response({"deleted": deleted})
