"""The sidecar as an attacker or a careless client would use it (issue 11): secrets, the
proxy's paths and credentials, tenants, retention and purge, slow clients, the admin client.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from promptcache.clients import AsyncSidecarClient
from promptcache.testing import FakeUpstream
from tests.sidecar.test_sidecar_exact import CHAT, chat
from tests.support.sidecars import RunningSidecar, start_sidecar

TOKEN = "admin-secret"
ALICE = {"Authorization": "Bearer sk-alice"}


async def send(http: aiohttp.ClientSession, sc: RunningSidecar, body: Any = None, *,
               path: str = CHAT, headers: dict[str, str] | None = None
               ) -> tuple[int, dict[str, str], Any]:
    """POST ``body`` (a chat request by default); status, headers and the JSON answer."""
    async with http.post(sc.url + path, json=chat() if body is None else body,
                         headers=headers if headers is not None else ALICE) as r:
        raw = await r.read()
        return r.status, dict(r.headers), json.loads(raw) if raw else None


async def raw_http(url: str, request: bytes, *, read_for: float = 5.0) -> bytes:
    """Send ``request`` as raw bytes (headers no HTTP client would send) and read the answer
    until the server closes or ``read_for`` seconds pass."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        out = b""
        async with asyncio.timeout(read_for):
            while chunk := await reader.read(65536):
                out += chunk
                if b"\r\n\r\n" in out and b"Content-Length" in out:
                    head, _, body = out.partition(b"\r\n\r\n")
                    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                    if len(body) >= length:
                        break
        return out
    finally:
        writer.close()


# =============================================================================================
# Secrets
# =============================================================================================


async def test_stats_shows_settings_only_with_the_admin_token_and_masks_url_secrets(
    fake: FakeUpstream, redis_url: str, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession
) -> None:
    upstream = fake.url.replace("http://", "http://user:upstream-pw@") + "/v1?key=goog-secret"
    sc = await start_sidecar(upstream, redis_url, admin_token=TOKEN,
                             upstream_api_key="sk-operator")
    sidecars.append(sc)
    async with http.get(sc.url + "/stats") as r:
        anonymous = await r.text()
        assert r.status == 200
    assert "settings" not in json.loads(anonymous)
    async with http.get(sc.url + "/stats", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        admin = await r.json()
    shown = json.dumps(admin)
    for secret in ("upstream-pw", "goog-secret", "sk-operator", TOKEN, "user:"):
        assert secret not in anonymous and secret not in shown, secret
    assert admin["settings"]["upstream"].startswith("http://***@127.0.0.1")
    async with http.get(sc.url + "/metrics") as r:
        metrics = await r.text()
    for secret in ("upstream-pw", "goog-secret", "sk-operator", TOKEN, "Hello"):
        assert secret not in metrics, secret


# =============================================================================================
# The proxy
# =============================================================================================


@pytest.mark.parametrize("target", [
    "/v1/../../admin/secret",
    "/v1/%2e%2e/%2e%2e/admin",
    "/v1/%2E%2E/admin",
    "/v1/%252e%252e/admin",
    "/v1/..%2fadmin",
    "/v1/..%5cadmin",
    "/v1/./models",
    "/v1/models/..",
])
async def test_pass_through_refuses_dot_segments_raw_or_encoded(
    target: str, fake: FakeUpstream, sidecar: RunningSidecar
) -> None:
    answer = await raw_http(sidecar.url, f"GET {target} HTTP/1.1\r\nHost: x\r\n"
                                         f"Connection: close\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b"invalid_request_error" in answer
    assert not fake.requests


async def test_operator_key_is_sent_only_on_cached_routes_and_allowed_paths(
    fake: FakeUpstream, redis_url: str, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(fake.url, redis_url, upstream_api_key="sk-operator",
                             upstream_key_paths=("/v1/models",))
    sidecars.append(sc)
    async with http.get(sc.url + "/v1/files/anything") as r:
        assert r.status == 404  # the fake's answer, relayed
    async with http.get(sc.url + "/echo/x") as r:
        await r.read()
    async with http.get(sc.url + "/v1/models") as r:
        assert r.status == 200
    status, _, _ = await send(http, sc, headers={})
    assert status == 200
    seen = {r.path: r.headers.get("Authorization") for r in fake.requests}
    assert seen["/v1/files/anything"] is None and seen["/echo/x"] is None
    assert seen["/v1/models"] == "Bearer sk-operator"
    assert seen[CHAT] == "Bearer sk-operator"


async def test_connection_header_cannot_strip_the_callers_credential(
    fake: FakeUpstream, redis_url: str, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(fake.url, redis_url, upstream_api_key="sk-operator")
    sidecars.append(sc)
    await send(http, sc, headers={**ALICE, "Connection": "keep-alive, authorization",
                                  "X-Forwarded-For": "10.9.9.9", "Forwarded": "for=10.9.9.9",
                                  "Via": "1.1 evil"})
    got = fake.requests_to(CHAT)[0].headers
    assert got["Authorization"] == "Bearer sk-alice"
    assert "X-Forwarded-For" not in got and "Forwarded" not in got and "Via" not in got


# =============================================================================================
# Tenants, fail closed
# =============================================================================================


@pytest.mark.parametrize("carrier", [
    ("header", "Authorization", "Bearer "),
    ("header", "x-api-key", ""),
    ("header", "api-key", ""),
    ("header", "x-goog-api-key", ""),
    ("query", "key", ""),
])
async def test_every_credential_carrier_is_its_own_tenant(
    carrier: tuple[str, str, str], fake: FakeUpstream, sidecar: RunningSidecar,
    http: aiohttp.ClientSession
) -> None:
    kind, name, prefix = carrier

    async def ask(secret: str | None) -> str:
        headers: dict[str, str] = {}
        path = CHAT
        if secret is not None and kind == "header":
            headers[name] = prefix + secret
        elif secret is not None:
            path = f"{CHAT}?{name}={secret}"
        status, h, _ = await send(http, sidecar, path=path, headers=headers)
        assert status == 200
        return h["X-Cache"]

    assert await ask("one") == "MISS"
    assert await ask("one") == "HIT"
    assert await ask("two") == "MISS"  # another credential: another tenant
    assert await ask(None) == "BYPASS"  # no credential: never served a tenant's entry
    assert await ask(None) == "BYPASS"  # ... and not cached either


async def test_anonymous_tenant_caches_requests_without_credentials_apart(
    fake: FakeUpstream, redis_url: str, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(fake.url, redis_url, anonymous_tenant=True)
    sidecars.append(sc)
    assert (await send(http, sc))[1]["X-Cache"] == "MISS"
    assert (await send(http, sc, headers={}))[1]["X-Cache"] == "MISS"
    assert (await send(http, sc, headers={}))[1]["X-Cache"] == "HIT"


async def test_the_operator_key_implies_the_anonymous_tenant(
    fake: FakeUpstream, redis_url: str, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(fake.url, redis_url, upstream_api_key="sk-operator")
    sidecars.append(sc)
    assert (await send(http, sc, headers={}))[1]["X-Cache"] == "MISS"
    assert (await send(http, sc, headers={}))[1]["X-Cache"] == "HIT"


async def test_shared_cache_still_needs_a_credential(
    fake: FakeUpstream, redis_url: str, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(fake.url, redis_url, shared_cache=True)
    sidecars.append(sc)
    assert (await send(http, sc))[1]["X-Cache"] == "MISS"
    bob = {"Authorization": "Bearer sk-bob"}
    assert (await send(http, sc, headers=bob))[1]["X-Cache"] == "HIT"
    assert (await send(http, sc, headers={}))[1]["X-Cache"] == "BYPASS"


async def test_query_string_and_version_headers_are_part_of_the_key(
    fake: FakeUpstream, sidecar: RunningSidecar, http: aiohttp.ClientSession
) -> None:
    async def status(path: str = CHAT, **headers: str) -> str:
        return (await send(http, sidecar, path=path, headers={**ALICE, **headers}))[1]["X-Cache"]

    assert await status(f"{CHAT}?api-version=A") == "MISS"
    assert await status(f"{CHAT}?api-version=A") == "HIT"
    assert await status(f"{CHAT}?api-version=B") == "MISS"
    assert await status() == "MISS"
    for name in ("anthropic-version", "anthropic-beta", "OpenAI-Organization",
                 "OpenAI-Project"):
        assert await status(**{name: "x"}) == "MISS", name
        assert await status(**{name: "x"}) == "HIT", name
        assert await status(**{name: "y"}) == "MISS", name
    assert fake.requests_to(CHAT)[0].query_string == "api-version=A"


async def test_a_credential_that_is_not_utf8_is_a_400(
    fake: FakeUpstream, sidecar: RunningSidecar
) -> None:
    body = json.dumps(chat()).encode()
    answer = await raw_http(sidecar.url, (
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n").encode()
        + b"Authorization: Bearer sk-\xff\xfe\r\n\r\n" + body)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
    assert b"UTF-8" in answer and not fake.requests


async def test_an_admin_token_that_is_not_utf8_is_a_401(
    fake: FakeUpstream, redis_url: str, sidecars: list[RunningSidecar]
) -> None:
    sc = await start_sidecar(fake.url, redis_url, admin_token=TOKEN)
    sidecars.append(sc)
    answer = await raw_http(sc.url, b"DELETE /cache?all=true HTTP/1.1\r\nHost: x\r\n"
                                    b"Authorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 401"), answer[:300]


# =============================================================================================
# Retention and purge
# =============================================================================================


async def entry_ttls(redis_url: str) -> list[float]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter(match="pc:e:*")]
        return [await client.pttl(k) / 1000 for k in keys]
    finally:
        await client.aclose()


async def test_max_age_can_only_shorten_the_configured_ttl(
    fake: FakeUpstream, redis_url: str, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(fake.url, redis_url, default_ttl=100.0)
    sidecars.append(sc)
    await send(http, sc, headers={**ALICE, "Cache-Control": "max-age=1000000000"})
    (ttl,) = await entry_ttls(redis_url)
    assert 90 < ttl <= 100
    await send(http, sc, chat("shorter"), headers={**ALICE, "Cache-Control": "max-age=10"})
    assert min(await entry_ttls(redis_url)) <= 10


async def test_max_ttl_lets_the_operator_allow_longer(
    fake: FakeUpstream, redis_url: str, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(fake.url, redis_url, default_ttl=100.0, max_ttl=1000.0)
    sidecars.append(sc)
    await send(http, sc, headers={**ALICE, "Cache-Control": "max-age=1000000000"})
    (ttl,) = await entry_ttls(redis_url)
    assert 990 < ttl <= 1000


async def test_one_tenant_can_be_purged_by_its_credential(
    fake: FakeUpstream, redis_url: str, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(fake.url, redis_url, admin_token=TOKEN)
    sidecars.append(sc)
    bob = {"Authorization": "Bearer sk-bob"}
    for headers in (ALICE, bob):
        for ns in ("", "team"):
            for text in ("a", "b"):
                await send(http, sc, chat(text), headers={**headers, "X-Cache-Namespace": ns})
    async with AsyncSidecarClient(sc.url, admin_token=TOKEN) as admin:
        assert await admin.invalidate_tenant({"Authorization": "Bearer sk-alice"}, "team") == 2
        assert await admin.invalidate_tenant({"Authorization": "Bearer sk-alice"}) == 2
        assert await admin.invalidate_tenant({"Authorization": "Bearer sk-nobody"}) == 0
    for ns in ("", "team"):
        h = {"X-Cache-Namespace": ns}
        assert (await send(http, sc, chat("a"), headers={**ALICE, **h}))[1]["X-Cache"] == "MISS"
        assert (await send(http, sc, chat("a"), headers={**bob, **h}))[1]["X-Cache"] == "HIT"


@pytest.mark.parametrize("body", [
    {"namespace": None}, {"namespace": 3}, {"key": 5}, {"credential": "Bearer x"},
    {"credential": {}}, {"credential": {"X-Unknown": "v"}}, [], "x",
])
async def test_admin_bodies_must_be_well_typed(
    body: Any, fake: FakeUpstream, redis_url: str, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(fake.url, redis_url, admin_token=TOKEN)
    sidecars.append(sc)
    await send(http, sc)
    async with http.delete(sc.url + "/cache", json=body,
                           headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        assert r.status == 400, await r.text()
        assert (await r.json())["error"]["type"] == "invalid_request_error"
    assert (await send(http, sc))[1]["X-Cache"] == "HIT"  # nothing was deleted


# =============================================================================================
# Slow clients
# =============================================================================================


async def test_headers_sent_too_slowly_are_cut_off(
    fake: FakeUpstream, redis_url: str, sidecars: list[RunningSidecar]
) -> None:
    sc = await start_sidecar(fake.url, redis_url, header_timeout=0.5)
    sidecars.append(sc)
    host, port = sc.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    started = time.monotonic()
    closed_after = None
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        for _ in range(40):  # one header line every 0.1 s: never complete
            writer.write(b"X-Slow: 1\r\n")
            await writer.drain()
            await asyncio.sleep(0.1)
            if reader.at_eof():
                closed_after = time.monotonic() - started
                break
            try:
                async with asyncio.timeout(0.01):
                    if await reader.read(1) == b"":
                        closed_after = time.monotonic() - started
                        break
            except TimeoutError:
                pass
    except ConnectionError:
        closed_after = time.monotonic() - started
    finally:
        writer.close()
    assert closed_after is not None and closed_after < 2.5, closed_after


async def test_a_body_sent_too_slowly_is_a_408(
    fake: FakeUpstream, redis_url: str, sidecars: list[RunningSidecar]
) -> None:
    sc = await start_sidecar(fake.url, redis_url, body_timeout=0.5)
    sidecars.append(sc)
    started = time.monotonic()
    answer = await raw_http(sc.url, (
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer sk-alice\r\nContent-Length: 1000\r\n\r\n"
        '{"model": "m"').encode())
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert time.monotonic() - started < 3.0 and not fake.requests


# =============================================================================================
# The admin client
# =============================================================================================


def test_sidecar_client_refuses_a_base_url_under_a_path() -> None:
    for url in ("http://127.0.0.1:8080/v1", "http://h:1/prefix/", "http://h:1/?x=1"):
        with pytest.raises(ValueError, match="root URL"):
            AsyncSidecarClient(url, admin_token=TOKEN)
    AsyncSidecarClient("http://127.0.0.1:8080/", admin_token=TOKEN)


async def test_sidecar_client_sends_the_token_only_to_admin_routes(
    fake: FakeUpstream, redis_url: str, sidecars: list[RunningSidecar]
) -> None:
    """Pointed at the fake upstream as if it were a sidecar, the client's health checks show
    what would reach a provider: no token."""
    async with AsyncSidecarClient(fake.url, admin_token=TOKEN) as client:
        for call in (client.healthz, client.readyz):
            try:
                await call()
            except Exception:  # noqa: BLE001 (the fake is no sidecar: only headers matter)
                pass
    assert fake.requests and all("Authorization" not in r.headers for r in fake.requests)
