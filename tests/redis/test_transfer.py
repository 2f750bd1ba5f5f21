"""Warm starts (cache/redis/transfer.py, ``promptcache export`` / ``import``): entries
carried from one deployment to another, real sidecars and Redis on both sides."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import redis

from promptcache.cache.keys import tenant_id, tenant_tag
from promptcache.cache.redis.budget import BudgetStore
from promptcache.cache.redis.client import close_client, redis_client
from promptcache.cache.redis.layout import KeyLayout
from promptcache.cache.redis.transfer import TransferReport, export_entries, import_entries
from promptcache.cli import main
from promptcache.testing import FakeUpstream
from tests.support.redis_servers import RedisServer
from tests.support.sidecars import RunningSidecar, start_sidecar

CHAT = "/v1/chat/completions"
LAYOUT = KeyLayout("pc:", 1)


def chat(content: str) -> dict[str, Any]:
    return {"model": "gpt-test", "messages": [{"role": "user", "content": content}]}


async def post(http: aiohttp.ClientSession, sc: RunningSidecar, content: str, *,
               key: str = "sk-alice", headers: dict[str, str] | None = None
               ) -> tuple[str, bytes]:
    h = {"Authorization": f"Bearer {key}", **(headers or {})}
    async with http.post(sc.url + CHAT, json=chat(content), headers=h) as r:
        assert r.status == 200, await r.text()
        return r.headers["X-Cache"], await r.read()


async def fill(http: aiohttp.ClientSession, sc: RunningSidecar) -> dict[tuple[str, str], bytes]:
    """Five entries on the source: two tenants, a namespace, one short max-age."""
    answers = {}
    for key, content, headers in (
            ("sk-alice", "warm one", {}), ("sk-alice", "warm two", {}),
            ("sk-bob", "warm one", {}),
            ("sk-alice", "warm three", {"X-Cache-Namespace": "docs"}),
            ("sk-alice", "warm short", {"Cache-Control": "max-age=100"})):
        status, body = await post(http, sc, content, key=key, headers=headers)
        assert status == "MISS"
        answers[key, content] = body
    return answers


async def export_lines(url: str) -> tuple[list[str], TransferReport]:
    client = redis_client(url, timeout=5.0)
    lines: list[str] = []
    try:
        report = await export_entries(client, KeyLayout.for_url(url), lines.append)
    finally:
        await close_client(client)
    return lines, report


async def import_lines(url: str, lines: list[str], max_bytes: int = 0) -> TransferReport:
    client = redis_client(url, timeout=5.0)
    try:
        return await import_entries(client, KeyLayout.for_url(url), lines, max_bytes=max_bytes)
    finally:
        await close_client(client)


async def test_exported_entries_hit_through_a_sidecar_on_the_target_with_their_ttls(
    fake: FakeUpstream, redis_url: str, fresh_redis: RedisServer,
    sidecars: list[RunningSidecar], http: aiohttp.ClientSession
) -> None:
    source = await start_sidecar(fake.url, redis_url)
    sidecars.append(source)
    answers = await fill(http, source)
    lines, out = await export_lines(redis_url)
    assert out.exported == len(lines) == 5
    docs = [json.loads(line) for line in lines]
    assert {d["tenant_tag"] for d in docs} == {tag("sk-alice"), tag("sk-bob")}
    assert {d["namespace"] for d in docs} == {"", None}  # "docs" is only a hash in its key
    assert sorted(d["ttl_ms"] // 1000 for d in docs)[0] <= 100  # the max-age=100 entry
    assert all("warm" not in line for line in lines)  # no prompt in clear, no credential
    assert all("sk-" not in line for line in lines)

    report = await import_lines(fresh_redis.url, lines)
    assert report == TransferReport(imported=5)
    target = await start_sidecar(fake.url, fresh_redis.url)
    sidecars.append(target)
    calls = fake.calls[CHAT]
    for (key, content), body in answers.items():
        headers = ({"X-Cache-Namespace": "docs"} if content == "warm three" else {})
        status, got = await post(http, target, content, key=key, headers=headers)
        assert (status, got) == ("HIT", body), (key, content)
    assert fake.calls[CHAT] == calls  # every answer came from the imported entries
    # A tenant stays a tenant: carol never sees alice's entry.
    assert (await post(http, target, "warm one", key="sk-carol"))[0] == "MISS"

    r = redis.Redis.from_url(fresh_redis.url)
    try:
        ttls = sorted(r.pttl(k) for k in r.scan_iter(match="pc:e:*"))
    finally:
        r.close()
    assert 90_000 < ttls[0] <= 100_000  # max-age=100 carried (less the time since)
    assert all(86_000_000 < t <= 86_400_000 for t in ttls[1:5])


def tag(key: str) -> str:
    return tenant_tag(tenant_id(f"authorization=Bearer {key}"))


def line_for(doc: dict[str, Any], **change: Any) -> str:
    return json.dumps({**doc, **change})


async def test_the_seal_refuses_tampered_lines_and_malformed_lines_are_counted(
    fake: FakeUpstream, redis_url: str, fresh_redis: RedisServer,
    sidecars: list[RunningSidecar], http: aiohttp.ClientSession
) -> None:
    source = await start_sidecar(fake.url, redis_url)
    sidecars.append(source)
    await post(http, source, "sealed")
    (line,), _ = await export_lines(redis_url)
    doc = json.loads(line)
    bob = tag("sk-bob")
    lines = [
        line_for(doc, tenant_tag=bob),  # claims another tenant: its digest says otherwise
        line_for(doc, digest=doc["digest"][:24] + bob),  # re-keyed into bob's keys
        line_for(doc, namespace="docs"),  # a namespace that is not the id's
        "not json", "[1, 2]", "{}", "",
        line_for(doc, entry="***"),  # not base64
        line_for(doc, entry="aGVsbG8="),  # base64, not an entry
        line_for(doc, ttl_ms=-5),
        line_for(doc, ttl_ms=1000, exported_ms=1),  # ran out long ago
    ]
    report = await import_lines(fresh_redis.url, lines)
    assert report == TransferReport(refused=3, malformed=6, expired=1)
    r = redis.Redis.from_url(fresh_redis.url)
    try:
        assert r.dbsize() == 0  # nothing at all was written
    finally:
        r.close()


async def test_an_import_stays_within_the_target_budget(
    fake: FakeUpstream, redis_url: str, fresh_redis: RedisServer,
    sidecars: list[RunningSidecar], http: aiohttp.ClientSession
) -> None:
    fake.answer_words = 300  # entries of a few kB
    source = await start_sidecar(fake.url, redis_url)
    sidecars.append(source)
    for i in range(20):
        await post(http, source, f"budget {i}")
    lines, _ = await export_lines(redis_url)
    budget = 24_000
    client = redis_client(fresh_redis.url, timeout=5.0)
    try:
        report = await import_entries(client, LAYOUT, lines, max_bytes=budget)
        usage = await BudgetStore(client, LAYOUT, max_bytes=budget).usage()
    finally:
        await close_client(client)
    assert report.imported + report.over_budget == 20
    assert report.evicted > 0 and 0 < usage.entries < 20
    assert usage.bytes <= budget


async def test_cli_export_then_import_with_files(
    fake: FakeUpstream, redis_url: str, fresh_redis: RedisServer,
    sidecars: list[RunningSidecar], http: aiohttp.ClientSession, tmp_path: Path,
    capsys: Any
) -> None:
    source = await start_sidecar(fake.url, redis_url)
    sidecars.append(source)
    await post(http, source, "cli one")
    await post(http, source, "cli two")
    path = tmp_path / "entries.jsonl"
    assert await asyncio.to_thread(main, ["export", "--redis-url", redis_url, "--quiet",
                                          str(path)]) == 0
    assert len(path.read_text().splitlines()) == 2
    assert json.loads(capsys.readouterr().out)["exported"] == 2
    with path.open("a") as f:
        f.write("garbage\n")
    assert await asyncio.to_thread(main, ["import", "--redis-url", fresh_redis.url,
                                          "--max-bytes", "1MB", "--quiet", str(path)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["imported"], report["malformed"]) == (2, 1)
    target = await start_sidecar(fake.url, fresh_redis.url)
    sidecars.append(target)
    assert (await post(http, target, "cli two"))[0] == "HIT"
    assert await asyncio.to_thread(main, ["import", "--redis-url", fresh_redis.url,
                                          str(tmp_path / "missing.jsonl")]) == 2


async def test_a_round_trip_through_an_export_on_a_single_redis_or_a_cluster(
    fake: FakeUpstream, deployment_url: str, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession
) -> None:
    """Export SCANs every master of a cluster; import places each entry in its shard."""
    sc = await start_sidecar(fake.url, deployment_url)
    sidecars.append(sc)
    for i in range(6):
        await post(http, sc, f"round trip {i}")
    lines, out = await export_lines(deployment_url)
    assert out.exported == 6
    client = redis_client(deployment_url, timeout=5.0)
    try:
        assert await BudgetStore(client, KeyLayout.for_url(deployment_url)).delete_matching(
            None) == 6
    finally:
        await close_client(client)
    assert await import_lines(deployment_url, lines) == TransferReport(imported=6)
    for i in range(6):
        assert (await post(http, sc, f"round trip {i}"))[0] == "HIT"
    assert fake.calls[CHAT] == 6
