"""Talking to the upstream model API: URLs, headers, credentials, pass-through.

Every path the cache does not handle is proxied here: method, query, headers (less
hop-by-hop ones and the caller's forwarding headers), body and response are streamed both
ways without buffering, and the response body is relayed still encoded (no decompression),
so Content-Length and Content-Encoding stay true.

What a caller cannot make the sidecar do (the README's Security section):

- reach a path outside the upstream base: a ``.`` or ``..`` segment, raw or
  percent-encoded (any depth of encoding), or a request target that is not a path, is
  refused with 400 (:func:`unsafe_path`);
- spend the operator's ``--upstream-api-key`` on arbitrary paths: it is added only on the
  cached routes and under ``--upstream-key-paths`` (:meth:`Upstream.operator_key_allowed`);
- strip its own credential (or a header the cache keys by) by naming it in ``Connection``;
- pass forwarding headers (``X-Forwarded-For``...) upstream as if the sidecar vouched for them;
- learn the upstream's address from an error: 502 bodies say what failed, not where.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from promptcache.cache import tracing
from promptcache.cache.api import ENDPOINTS, Api, error_body
from promptcache.cache.request import CONTROL_HEADERS, VARY_HEADERS
from promptcache.server.config import Settings

if TYPE_CHECKING:
    from opentelemetry.trace import Span

log = logging.getLogger(__name__)

#: RFC 9110 section 7.6.1, plus the legacy Proxy-Connection.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


#: Headers by which a caller would speak for other hops; the sidecar does not pass them on.
FORWARDING = frozenset({"forwarded", "x-forwarded-for", "x-forwarded-host",
                        "x-forwarded-proto", "x-forwarded-port", "x-real-ip", "via"})


def hop_by_hop(headers: CIMultiDictProxy[str] | CIMultiDict[str],
               keep: frozenset[str] = frozenset()) -> frozenset[str]:
    """The fixed hop-by-hop set plus every header named in Connection, except ``keep``
    (headers a caller must not be able to drop that way)."""
    named = {
        token.strip().lower()
        for value in headers.getall("Connection", [])
        for token in value.split(",")
        if token.strip()
    }
    return HOP_BY_HOP | (named - keep)


def unsafe_path(raw: str) -> bool:
    """Would ``raw`` (a request target as sent) leave the upstream base? True for a target
    that is not an absolute path, and for any ``.`` / ``..`` segment, however many times
    percent-encoded, or behind a backslash."""
    path = raw.partition("?")[0]
    if not path.startswith("/") or path.startswith("//"):
        return True
    for _ in range(4):  # %252e%252e -> %2e%2e -> ..
        decoded = unquote(path)
        if decoded == path:
            break
        path = decoded
    return any(seg in (".", "..") for seg in path.replace("\\", "/").split("/"))


class Upstream:
    """The model API behind the sidecar: URLs, headers, timeouts and pass-through."""

    def __init__(self, settings: Settings, session: aiohttp.ClientSession) -> None:
        self.settings = settings
        self.session = session
        base = urlsplit(settings.upstream)
        self._base = settings.upstream.rstrip("/")
        self._base_has_v1 = base.path.rstrip("/").endswith("/v1")
        self._credentials = frozenset(settings.credential_headers)
        self._keep = self._credentials | frozenset(VARY_HEADERS)

    def url_for(self, raw_path: str) -> URL:
        """The upstream URL of a request target as sent (``request.raw_path``: path and
        query, still percent-encoded, and checked by :func:`unsafe_path`); a base ending in
        /v1 absorbs a leading /v1 of the path. Credential query parameters are left out
        unless credentials are passed on."""
        if self._base_has_v1 and raw_path.startswith(("/v1/", "/v1?")):
            raw_path = raw_path[3:]
        path, sep, query = raw_path.partition("?")
        params = self.settings.credential_params
        if query and params and not self.settings.pass_credentials:
            pairs = parse_qsl(query, keep_blank_values=True)
            if any(k.lower() in params for k, _ in pairs):
                query = urlencode([(k, v) for k, v in pairs if k.lower() not in params])
                sep = "?" if query else ""
        return URL(self._base + path + sep + query, encoded=True)

    def operator_key_allowed(self, path: str) -> bool:
        """May ``--upstream-api-key`` be sent on ``path``? On the cached routes, and on
        ``--upstream-key-paths`` and the paths under them; never anywhere else."""
        if path in ENDPOINTS:
            return True
        return any(path == p or path.startswith(p + "/") for p in self.settings.upstream_key_paths)

    def request_headers(self, request: web.Request, span: Span | None = None
                        ) -> CIMultiDict[str]:
        """The headers to send upstream; with a tracing ``span`` (the upstream call's), its
        W3C ``traceparent`` and ``tracestate`` in place of the caller's."""
        drop = (hop_by_hop(request.headers, self._keep) | FORWARDING | set(CONTROL_HEADERS)
                | {"host", "content-length"})
        if not self.settings.pass_credentials:
            drop |= self._credentials
        out: CIMultiDict[str] = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() not in drop
        )
        key = self.settings.upstream_api_key
        if (key and not any(h in out for h in self._credentials)
                and self.operator_key_allowed(request.path)):
            if request.path.startswith("/v1/messages"):
                out["x-api-key"] = key
            else:
                out["Authorization"] = f"Bearer {key}"
        if span is not None:
            tracing.inject(out, span)
        return out

    @staticmethod
    def response_headers(resp: aiohttp.ClientResponse, *, decoded: bool) -> CIMultiDict[str]:
        """Upstream response headers fit to relay; ``decoded`` if we re-frame the body."""
        drop = hop_by_hop(resp.headers)
        if decoded:
            drop |= {"content-length", "content-encoding"}
        return CIMultiDict((k, v) for k, v in resp.headers.items() if k.lower() not in drop)

    def timeout(self) -> aiohttp.ClientTimeout:
        s = self.settings
        return aiohttp.ClientTimeout(
            total=None, sock_connect=s.upstream_connect_timeout, sock_read=s.upstream_read_timeout
        )

    async def passthrough(self, request: web.Request) -> web.StreamResponse:
        """Relay a request the cache does not handle, streaming both ways."""
        if unsafe_path(request.raw_path):
            return web.json_response(
                error_body("chat", "the request path may not contain '.' or '..' segments "
                           "(encoded or not)", kind="invalid_request_error", param="path"),
                status=400)
        data = request.content if request.body_exists else None
        try:
            async with self.session.request(
                request.method,
                self.url_for(request.raw_path),
                headers=self.request_headers(request),
                data=data,
                allow_redirects=False,
                auto_decompress=False,
                timeout=self.timeout(),
            ) as up:
                resp = web.StreamResponse(status=up.status, reason=up.reason)
                resp.headers.extend(self.response_headers(up, decoded=False))
                await resp.prepare(request)
                try:
                    async for chunk in up.content.iter_any():
                        await resp.write(chunk)
                except (aiohttp.ClientError, TimeoutError):
                    abort(request)  # the caller must see a broken body, not a short one
                    return resp
                await resp.write_eof()
                return resp
        except (aiohttp.ClientError, TimeoutError) as exc:
            return upstream_unavailable(exc)


def abort(request: web.Request) -> None:
    """Drop the client connection mid-body, so a truncated upstream answer stays visible."""
    if request.transport is not None:
        request.transport.abort()


def upstream_unavailable(exc: BaseException, api: Api = "chat") -> web.Response:
    """A 502 in the error shape of ``api``: the upstream could not be reached. The body
    says what failed, never where (the upstream's address is the operator's business: it
    goes to the log)."""
    log.warning("upstream call failed: %s: %s", type(exc).__name__, exc)
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        what = "did not answer in time"
    elif isinstance(exc, aiohttp.ClientConnectorError):
        what = "could not be reached"
    else:
        what = "failed mid-answer"
    kind = "api_error" if api == "messages" else "upstream_error"
    return web.json_response(error_body(api, f"the upstream {what}", kind=kind), status=502)
