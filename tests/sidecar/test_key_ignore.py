"""``--key-ignore`` end to end: a sidecar that ignores ``user`` serves one user's answer to
another's otherwise identical request; by default it does not."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from promptcache.testing import FakeUpstream
from tests.support.sidecars import RunningSidecar, start_sidecar

CHAT = "/v1/chat/completions"


def chat(user: str, content: str) -> dict[str, Any]:
    return {"model": "gpt-test", "user": user,
            "messages": [{"role": "user", "content": content}]}


async def post(http: aiohttp.ClientSession, sc: RunningSidecar, body: dict[str, Any]) -> str:
    async with http.post(sc.url + CHAT, data=json.dumps(body),
                         headers={"Authorization": "Bearer sk-alice",
                                  "Content-Type": "application/json"}) as r:
        assert r.status == 200, await r.text()
        await r.read()
        return r.headers["X-Cache"]


async def test_key_ignore_user_serves_a_hit_across_users_and_the_default_a_miss(
    fake: FakeUpstream, redis_url: str, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession
) -> None:
    ignoring = await start_sidecar(fake.url, redis_url, key_ignore=("user",))
    sidecars.append(ignoring)
    assert await post(http, ignoring, chat("u-1", "key ignore: capital of Peru?")) == "MISS"
    assert await post(http, ignoring, chat("u-2", "key ignore: capital of Peru?")) == "HIT"
    assert fake.calls[CHAT] == 1

    default = await start_sidecar(fake.url, redis_url)
    sidecars.append(default)
    assert await post(http, default, chat("u-1", "key ignore: capital of Chile?")) == "MISS"
    assert await post(http, default, chat("u-2", "key ignore: capital of Chile?")) == "MISS"
    assert await post(http, default, chat("u-2", "key ignore: capital of Chile?")) == "HIT"
    assert fake.calls[CHAT] == 3
