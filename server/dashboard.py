"""The status page (``GET /dashboard``) and the request latencies it shows by ``X-Cache``.

The page is one self-contained file, ``dashboard.html`` beside this module (inline CSS and
script, no fonts, no CDN): it reads ``/stats`` every 2 s and renders it. Who may load it:

- with ``--admin-token``, a request carrying it, as ``Authorization: Bearer <token>`` or
  once as ``?token=<token>`` (a browser cannot set the header on navigation). The page then
  takes the token out of the address bar and sends it to ``/stats`` in the Authorization
  header only; the answer says ``Referrer-Policy: no-referrer`` and ``Cache-Control:
  no-store``, and its Content-Security-Policy lets it reach nothing but this sidecar;
- without one, loopback callers only (the sidecar's own host); anyone else gets a 403.

:class:`LatencyWindows` keeps the latest request latencies of each cache status in a
bounded ring; ``/stats`` reads their p50 and p99 (sorted then, not per request).
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import ipaddress
import math
import re
from importlib import resources
from typing import Any, Final

from aiohttp import web

from promptcache.cache.api import error_body
from promptcache.server.state import SIDECAR

#: The statuses whose latencies are kept (anything else is not recorded: the map stays small).
STATUSES: Final = ("HIT", "SEMANTIC-HIT", "MISS", "BYPASS")
#: Latencies kept per status: the percentiles are over at most this many latest requests.
WINDOW: Final = 2048


class LatencyWindows:
    """The latest ``size`` request latencies of each cache status, and their percentiles."""

    def __init__(self, size: int = WINDOW) -> None:
        self._rings = {s: collections.deque[float](maxlen=size) for s in STATUSES}
        self._counts = dict.fromkeys(STATUSES, 0)

    def record(self, status: str | None, seconds: float) -> None:
        """One request answered with ``X-Cache: status`` took ``seconds``."""
        ring = self._rings.get(status or "")
        if ring is not None:
            ring.append(seconds)
            self._counts[status or ""] += 1

    def summary(self) -> dict[str, dict[str, Any]]:
        """{status: {"count", "window", "p50_ms", "p99_ms"}} for each status seen: ``count``
        requests since start, the percentiles over the latest ``window`` of them."""
        out: dict[str, dict[str, Any]] = {}
        for status, ring in self._rings.items():
            if not ring:
                continue
            ordered = sorted(ring)
            out[status] = {"count": self._counts[status], "window": len(ordered),
                           "p50_ms": _rank(ordered, 0.50), "p99_ms": _rank(ordered, 0.99)}
        return out


def _rank(ordered: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile of ``ordered`` seconds, in milliseconds."""
    return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)] * 1000, 3)


LATENCY = web.AppKey("latency", LatencyWindows)

PAGE: Final = resources.files("promptcache.server").joinpath("dashboard.html").read_text(
    encoding="utf-8")


def _csp(page: str) -> str:
    """A policy that runs the page's own inline script and style and reaches nothing but
    this sidecar (hashes of the inline blocks, so no other script can run)."""
    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.S)
        return " ".join("'sha256-" + base64.b64encode(hashlib.sha256(b.encode()).digest())
                        .decode() + "'" for b in blocks)
    return (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
            "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'")


HEADERS: Final = {
    "Content-Security-Policy": _csp(PAGE),
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}


def _loopback(remote: str | None) -> bool:
    try:
        address = ipaddress.ip_address((remote or "").split("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _refused(request: web.Request) -> web.Response | None:
    """None if the caller may see the page; else the 401 or 403 (OpenAI's error shape)."""
    token = request.app[SIDECAR].settings.admin_token
    if not token:
        if _loopback(request.remote):
            return None
        return web.json_response(
            error_body("chat", "without PROMPTCACHE_ADMIN_TOKEN the status page answers "
                       "loopback callers only", kind="forbidden"), status=403)
    want = token.encode()
    header = request.headers.get("Authorization", "").encode("utf-8", "surrogatepass")
    given = request.query.get("token", "").encode("utf-8", "surrogatepass")
    # Both compared in constant time, always (no early exit tells which one was close).
    ok_header = hmac.compare_digest(header, b"Bearer " + want)
    ok_query = hmac.compare_digest(given, want)
    if ok_header or ok_query:
        return None
    return web.json_response(
        error_body("chat", "admin token missing or wrong (Authorization: Bearer <token>, "
                   "or ?token=<token>)", kind="unauthorized"),
        status=401, headers={"WWW-Authenticate": "Bearer", **HEADERS})


async def dashboard(request: web.Request) -> web.Response:
    """GET /dashboard: the status page."""
    refused = _refused(request)
    if refused is not None:
        return refused
    return web.Response(text=PAGE, content_type="text/html", charset="utf-8",
                        headers=HEADERS)
