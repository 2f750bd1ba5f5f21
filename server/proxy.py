"""Talking to the upstream model API: URLs, headers, credentials, pass-through.

Every path the cache does not handle is proxied unchanged here: method, query, headers
(less hop-by-hop ones), body and response are streamed both ways without buffering, and
the response body is relayed still encoded (no decompression), so Content-Length and
Content-Encoding stay true.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from promptcache.cache.api import Api, error_body
from promptcache.cache.request import CONTROL_HEADERS, CREDENTIAL_HEADERS
from promptcache.server.config import Settings

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


def hop_by_hop(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> frozenset[str]:
    """The fixed hop-by-hop set plus every header named in Connection."""
    named = {
        token.strip().lower()
        for value in headers.getall("Connection", [])
        for token in value.split(",")
        if token.strip()
    }
    return HOP_BY_HOP | named


class Upstream:
    """The model API behind the sidecar: URLs, headers, timeouts and pass-through."""

    def __init__(self, settings: Settings, session: aiohttp.ClientSession) -> None:
        self.settings = settings
        self.session = session
        base = urlsplit(settings.upstream)
        self._base = settings.upstream.rstrip("/")
        self._base_has_v1 = base.path.rstrip("/").endswith("/v1")

    def url_for(self, path_qs: str) -> str:
        """Append the request path; a base ending in /v1 absorbs a leading /v1 of the path."""
        if self._base_has_v1 and path_qs.startswith(("/v1/", "/v1?")):
            path_qs = path_qs[3:]
        return self._base + path_qs

    def request_headers(self, request: web.Request) -> CIMultiDict[str]:
        drop = hop_by_hop(request.headers) | set(CONTROL_HEADERS) | {"host", "content-length"}
        if not self.settings.pass_credentials:
            drop |= set(CREDENTIAL_HEADERS)
        out: CIMultiDict[str] = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() not in drop
        )
        key = self.settings.upstream_api_key
        if key and not any(h in out for h in CREDENTIAL_HEADERS):
            if request.path.startswith("/v1/messages"):
                out["x-api-key"] = key
            else:
                out["Authorization"] = f"Bearer {key}"
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
        data = request.content if request.body_exists else None
        try:
            async with self.session.request(
                request.method,
                self.url_for(request.path_qs),
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
    """A 502 in the error shape of ``api``: the upstream could not be reached."""
    message = f"upstream unavailable: {type(exc).__name__}: {exc}"
    kind = "api_error" if api == "messages" else "upstream_error"
    return web.json_response(error_body(api, message, kind=kind), status=502)
