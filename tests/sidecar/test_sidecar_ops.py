"""Operations routes, admin invalidation, and pass-through of everything uncached."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from promptcache.testing import FakeUpstream
from tests.sidecar.test_sidecar_exact import CHAT, chat, post
from tests.support.redis_servers import RedisServer
from tests.support.sidecars import RunningSidecar, start_sidecar

TOKEN = "admin-secret"


@pytest.fixture
async def admin_sidecar(fake: FakeUpstream, redis_url: str,
                        sidecars: list[RunningSidecar]) -> RunningSidecar:
    sc = await start_sidecar(fake.url, redis_url, admin_token=TOKEN)
    sidecars.append(sc)
    return sc


async def test_healthz_and_readyz(sidecar: RunningSidecar, http: aiohttp.ClientSession) -> None:
    async with http.get(sidecar.url + "/healthz") as r:
        assert r.status == 200 and (await r.json())["status"] == "ok"
    async with http.get(sidecar.url + "/readyz") as r:
        assert r.status == 200 and (await r.json())["cache"] == "ok"


async def test_metrics_count_requests_by_route_and_status(
    sidecar: RunningSidecar, http: aiohttp.ClientSession
) -> None:
    await post(http, sidecar, chat())
    await post(http, sidecar, chat())
    await post(http, sidecar, b"nope")
    async with http.get(sidecar.url + "/metrics") as r:
        text = await r.text()
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
    assert 'promptcache_requests_total{cache="MISS",route="/v1/chat/completions"} 1.0' in text
    assert 'promptcache_requests_total{cache="HIT",route="/v1/chat/completions"} 1.0' in text
    assert 'promptcache_requests_total{cache="ERROR",route="/v1/chat/completions"} 1.0' in text
    assert "promptcache_upstream_seconds_bucket" in text
    assert "promptcache_lookup_seconds_count 2.0" in text
    assert "promptcache_entries 1.0" in text
    assert "promptcache_stored_bytes_total" in text and "promptcache_bypasses_total 0.0" in text


async def test_stats_reports_counts_hit_ratio_and_hides_secrets(
    admin_sidecar: RunningSidecar, http: aiohttp.ClientSession
) -> None:
    await post(http, admin_sidecar, chat())
    await post(http, admin_sidecar, chat())
    async with http.get(admin_sidecar.url + "/stats",
                        headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        stats = await r.json()
    assert stats["requests"][CHAT] == {"MISS": 1, "HIT": 1}
    assert stats["hit_ratio"] == 0.5
    assert stats["cache"]["reachable"] is True and stats["cache"]["entries"] == 1
    assert stats["settings"]["admin_token"] == "***"
    assert TOKEN not in json.dumps(stats)


async def test_admin_routes_refuse_without_a_configured_token(
    sidecar: RunningSidecar, http: aiohttp.ClientSession
) -> None:
    async with http.delete(sidecar.url + "/cache", json={"namespace": ""},
                           headers={"Authorization": "Bearer anything"}) as r:
        assert r.status == 403


async def test_admin_routes_need_the_right_token(
    admin_sidecar: RunningSidecar, http: aiohttp.ClientSession
) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        async with http.delete(admin_sidecar.url + "/cache", json={"namespace": ""},
                               headers=headers) as r:
            assert r.status == 401


async def test_delete_one_key(admin_sidecar: RunningSidecar, fake: FakeUpstream,
                              http: aiohttp.ClientSession) -> None:
    _, h, _ = await post(http, admin_sidecar, chat("one"))
    await post(http, admin_sidecar, chat("two"))
    async with http.delete(admin_sidecar.url + "/cache", json={"key": h["X-Cache-Key"]},
                           headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        assert r.status == 200 and (await r.json()) == {"deleted": 1}
    _, h1, _ = await post(http, admin_sidecar, chat("one"))
    _, h2, _ = await post(http, admin_sidecar, chat("two"))
    assert (h1["X-Cache"], h2["X-Cache"]) == ("MISS", "HIT")


async def test_delete_a_namespace_leaves_others(
    admin_sidecar: RunningSidecar, http: aiohttp.ClientSession
) -> None:
    for ns in ("a", "b"):
        for q in ("x", "y"):
            await post(http, admin_sidecar, chat(q), headers={"X-Cache-Namespace": ns})
    async with http.delete(admin_sidecar.url + "/cache?namespace=a",
                           headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        assert (await r.json()) == {"deleted": 2}
    _, ha, _ = await post(http, admin_sidecar, chat("x"), headers={"X-Cache-Namespace": "a"})
    _, hb, _ = await post(http, admin_sidecar, chat("x"), headers={"X-Cache-Namespace": "b"})
    assert (ha["X-Cache"], hb["X-Cache"]) == ("MISS", "HIT")


async def test_delete_with_no_target_or_a_bad_key_is_400(
    admin_sidecar: RunningSidecar, http: aiohttp.ClientSession
) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for body in ({}, {"key": "not-a-key"}, [1]):
        async with http.delete(admin_sidecar.url + "/cache", json=body, headers=auth) as r:
            assert r.status == 400 and "error" in await r.json()


# --- pass-through ---------------------------------------------------------------------------


async def test_other_paths_are_proxied_unchanged_and_uncached(
    sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    for _ in range(2):
        async with http.put(sidecar.url + "/echo/thing?x=1&y=2", data=b"raw body",
                            headers={"Authorization": "Bearer sk-alice", "X-Custom": "v",
                                     "Connection": "keep-alive, X-Drop-Me",
                                     "X-Drop-Me": "hop"}) as r:
            assert r.status == 200 and r.headers["X-Upstream-Echo"] == "1"
            assert "X-Cache" not in r.headers
            echo = await r.json()
    assert echo["method"] == "PUT" and echo["path"] == "/echo/thing"
    assert echo["query"] == {"x": "1", "y": "2"} and echo["body"] == "raw body"
    seen = {k.lower(): v for k, v in echo["headers"].items()}
    assert seen["authorization"] == "Bearer sk-alice" and seen["x-custom"] == "v"
    assert "x-drop-me" not in seen, "headers named in Connection are hop-by-hop"
    assert fake.calls["/echo/thing"] == 2


async def test_get_on_a_cached_path_and_model_listing_pass_through(
    sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    async with http.get(sidecar.url + "/v1/models") as r:
        assert r.status == 200 and (await r.json())["data"]
    async with http.get(sidecar.url + CHAT) as r:
        assert r.status == 404  # the fake has no GET there; the proxy relays its answer
    assert fake.calls["/v1/models"] == 1 and fake.calls[CHAT] == 1


async def test_pass_through_relays_status_and_streams(
    sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    async with http.get(sidecar.url + "/echo/status/418") as r:
        assert r.status == 418
    fake.chunk_delay = 0.05
    async with http.get(sidecar.url + "/echo/stream?parts=4") as r:
        chunks = [c async for c in r.content.iter_any()]
    assert len(chunks) >= 2 and b"".join(chunks).count(b"part") == 4


async def test_upstream_base_with_v1_is_not_doubled(
    fake: FakeUpstream, redis_url: str, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession,
) -> None:
    sc = await start_sidecar(fake.url + "/v1", redis_url)
    sidecars.append(sc)
    status, _, _ = await post(http, sc, chat())
    assert status == 200 and fake.requests[-1].path == CHAT


async def test_credentials_pass_through_or_are_replaced_by_the_configured_key(
    fake: FakeUpstream, redis_url: str, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession,
) -> None:
    sc = await start_sidecar(fake.url, redis_url)
    sidecars.append(sc)
    await post(http, sc, chat("a"))
    assert fake.requests[-1].headers["Authorization"] == "Bearer sk-alice"

    sc2 = await start_sidecar(fake.url, redis_url, pass_credentials=False,
                              upstream_api_key="sk-upstream")
    sidecars.append(sc2)
    await post(http, sc2, chat("b"))
    assert fake.requests[-1].headers["Authorization"] == "Bearer sk-upstream"
    await post(http, sc2, {"model": "c", "max_tokens": 5,
                           "messages": [{"role": "user", "content": "hi"}]}, "/v1/messages")
    assert fake.requests[-1].headers["x-api-key"] == "sk-upstream"
    assert "Authorization" not in fake.requests[-1].headers


async def test_redis_url_with_a_password_is_used(
    fake: FakeUpstream, tmp_path: Path, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession,
) -> None:
    with RedisServer(tmp_path / "r", extra_args=["--requirepass", "s3cret"]) as server:
        sc = await start_sidecar(fake.url, f"redis://:s3cret@127.0.0.1:{server.port}/2")
        sidecars.append(sc)
        await post(http, sc, chat())
        _, h, _ = await post(http, sc, chat())
        assert h["X-Cache"] == "HIT"
        async with http.get(sc.url + "/stats") as r:
            assert "s3cret" not in await r.text()
        await sc.stop()
        sidecars.remove(sc)
