"""The client library: the official openai client against a sidecar, wrap() against the fake
upstream, the in-process cache (async, sync, decorator), sharing entries with a sidecar, and
the sidecar client. Sync clients run on a thread: the fake upstream serves from this loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from promptcache.cache.protocols import Embedder
from promptcache.clients import (
    AdminRefused,
    AsyncCache,
    AsyncSidecarClient,
    Cache,
    CacheClosed,
    SidecarClient,
    SidecarUnreachable,
    wrap,
)
from promptcache.testing import FakeUpstream
from tests.support.sidecars import RunningSidecar, eventually, start_sidecar

CHAT = "/v1/chat/completions"
MODEL = "gpt-4o-mini"
Q = "How do I reset my password?"
PARAPHRASE = "How can I reset my password?"


def messages(text: str = Q) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def sync_client(base: str, **kw: Any) -> OpenAI:
    return OpenAI(base_url=base + "/v1", api_key="sk-test", max_retries=0, **kw)


def async_client(base: str, **kw: Any) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=base + "/v1", api_key="sk-test", max_retries=0, **kw)


def text_of(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


# -- the official client, unchanged, against a sidecar ----------------------------------------


async def test_openai_client_through_a_sidecar_misses_then_hits(
        sidecar: RunningSidecar, fake: FakeUpstream) -> None:
    client = async_client(sidecar.url)
    first = await client.chat.completions.with_raw_response.create(model=MODEL,
                                                                   messages=messages())
    second = await client.chat.completions.with_raw_response.create(model=MODEL,
                                                                    messages=messages())
    a, b = first.parse(), second.parse()
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert isinstance(b, ChatCompletion) and b.choices[0].message.content
    assert b.model_dump() == a.model_dump()
    assert fake.calls[CHAT] == 1
    await client.close()


async def test_openai_client_streams_through_a_sidecar_miss_and_hit(
        sidecar: RunningSidecar, fake: FakeUpstream) -> None:
    client = async_client(sidecar.url)
    runs = []
    for _ in range(2):
        stream = await client.chat.completions.create(model=MODEL, messages=messages(),
                                                      stream=True)
        runs.append([chunk async for chunk in stream])
    assert all(isinstance(c, ChatCompletionChunk) for run in runs for c in run)
    assert text_of(runs[0]) == text_of(runs[1]) != ""
    assert fake.calls[CHAT] == 1
    plain = await client.chat.completions.create(model=MODEL, messages=messages())
    assert plain.choices[0].message.content == text_of(runs[0])  # the streamed miss was stored
    assert fake.calls[CHAT] == 1
    await client.close()


# -- wrap() against the fake upstream ---------------------------------------------------------


async def test_wrapped_sync_client_hits_on_the_second_call(fake: FakeUpstream,
                                                           redis_url: str) -> None:
    client = wrap(sync_client(fake.url), redis_url=redis_url, semantic=False)
    try:
        create = client.chat.completions.with_raw_response.create
        first = await asyncio.to_thread(create, model=MODEL, messages=messages())
        second = await asyncio.to_thread(create, model=MODEL, messages=messages())
        assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
        a, b = first.parse(), second.parse()
        assert isinstance(b, ChatCompletion)
        assert b.choices[0].message.content == a.choices[0].message.content != ""
        assert fake.calls[CHAT] == 1
    finally:
        await asyncio.to_thread(client.close)


async def test_wrapped_sync_client_streams_chunks_and_replays_them(fake: FakeUpstream,
                                                                   redis_url: str) -> None:
    client = wrap(sync_client(fake.url), redis_url=redis_url, semantic=False)

    def run() -> list[ChatCompletionChunk]:
        return list(client.chat.completions.create(model=MODEL, messages=messages(),
                                                   stream=True))
    try:
        first = await asyncio.to_thread(run)
        second = await asyncio.to_thread(run)
        assert all(isinstance(c, ChatCompletionChunk) for c in first + second)
        assert text_of(first) == text_of(second) != ""
        assert fake.calls[CHAT] == 1
    finally:
        await asyncio.to_thread(client.close)


async def test_wrapped_async_client_streams_and_hits(fake: FakeUpstream, redis_url: str
                                                     ) -> None:
    client = wrap(async_client(fake.url), redis_url=redis_url, semantic=False)
    try:
        runs = []
        for _ in range(2):
            stream = await client.chat.completions.create(
                model=MODEL, messages=messages(), stream=True,
                stream_options={"include_usage": True})
            runs.append([chunk async for chunk in stream])
        assert all(isinstance(c, ChatCompletionChunk) for run in runs for c in run)
        assert text_of(runs[0]) == text_of(runs[1]) != ""
        assert runs[1][-1].usage is not None and runs[1][-1].usage.total_tokens > 0
        plain = await client.chat.completions.create(model=MODEL, messages=messages())
        assert isinstance(plain, ChatCompletion)
        assert plain.choices[0].message.content == text_of(runs[0])
        assert fake.calls[CHAT] == 1
    finally:
        await client.close()


async def test_wrapped_client_keeps_namespaces_and_credentials_apart(
        fake: FakeUpstream, redis_url: str) -> None:
    cache = await asyncio.to_thread(Cache(redis_url=redis_url, semantic=False).open)
    a = wrap(async_client(fake.url), cache)
    b = wrap(AsyncOpenAI(base_url=fake.url + "/v1", api_key="sk-other", max_retries=0), cache)
    try:
        await a.chat.completions.create(model=MODEL, messages=messages())
        await a.chat.completions.create(model=MODEL, messages=messages(),
                                        extra_headers={"X-Cache-Namespace": "other"})
        await b.chat.completions.create(model=MODEL, messages=messages())
        assert fake.calls[CHAT] == 3
        assert all("x-cache-namespace" not in r.headers for r in fake.requests)
        await a.chat.completions.create(model=MODEL, messages=messages())
        assert fake.calls[CHAT] == 3
    finally:
        await a.close()
        await b.close()
        await asyncio.to_thread(cache.close)


@pytest.mark.parametrize("headers", [
    {"X-Cache-Threshold": "2"}, {"X-Cache-Threshold": "nan"}, {"X-Cache-Mode": "fuzzy"},
    {"X-Cache-Namespace": "n" * 300}, {"Cache-Control": "max-age=soon"},
    {"Cache-Control": "max-age=" + "9" * 5000},
], ids=["threshold-2", "threshold-nan", "mode", "namespace", "max-age-word", "max-age-huge"])
async def test_wrapped_client_with_hostile_controls_gets_its_answer_never_an_error(
        fake: FakeUpstream, redis_url: str, headers: dict[str, str]) -> None:
    """Bad control headers never raise out of the wrapped client: the request goes upstream
    (uncached when the controls cannot be read), and the controls never reach it."""
    client = wrap(async_client(fake.url), redis_url=redis_url, semantic=False)
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages(), extra_headers=headers)
        assert isinstance(raw.parse(), ChatCompletion)
        assert raw.headers.get("x-cache") in (None, "MISS")  # None: sent on uncached
        assert fake.calls[CHAT] == 1
        sent = fake.requests[-1].headers
        assert not any(h in sent for h in ("x-cache-threshold", "x-cache-mode",
                                           "x-cache-namespace"))
    finally:
        await client.close()


async def test_wrapped_client_with_redis_down_calls_upstream(fake: FakeUpstream,
                                                             fresh_redis: Any) -> None:
    client = wrap(async_client(fake.url), redis_url=fresh_redis.url, semantic=False,
                  redis_timeout=0.2)
    try:
        fresh_redis.close()
        for _ in range(2):
            raw = await client.chat.completions.with_raw_response.create(model=MODEL,
                                                                         messages=messages())
            assert raw.headers["x-cache"] == "BYPASS"
            assert isinstance(raw.parse(), ChatCompletion)
        assert fake.calls[CHAT] == 2
    finally:
        await client.close()


async def test_wrap_refuses_what_is_not_an_openai_client() -> None:
    with pytest.raises(TypeError):
        wrap(object())


async def test_wrap_with_no_options_starts_and_stops_a_private_redis(
        fake: FakeUpstream, embedder: Embedder) -> None:
    # the defaults (semantic tier on), sharing the model; a loaded CI machine may take
    # more than the default second for one embedding
    cache = Cache(embedder=embedder, embed_timeout=30.0)
    await asyncio.to_thread(cache.open)
    client = wrap(async_client(fake.url), cache)
    engine = cache.aio.engine
    try:
        await client.chat.completions.create(model=MODEL, messages=messages())
        assert engine.semantic is not None  # its vector is computed off the request path:
        await asyncio.wrap_future(cache.submit(engine.semantic.drain()))
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages(PARAPHRASE))
        assert raw.headers["x-cache"] == "SEMANTIC-HIT"
        assert fake.calls[CHAT] == 1
        assert await asyncio.wrap_future(cache.submit(engine.cache.ping()))
    finally:
        await client.close()
        await asyncio.to_thread(cache.close)
    with pytest.raises(CacheClosed):
        cache.submit(engine.cache.ping())


# -- the in-process cache, and sharing with a sidecar -----------------------------------------


async def test_in_process_cache_and_sidecar_share_entries(
        sidecar: RunningSidecar, fake: FakeUpstream, redis_url: str) -> None:
    through_sidecar = async_client(sidecar.url)
    wrapped = wrap(async_client(fake.url), redis_url=redis_url, semantic=False)
    try:
        await through_sidecar.chat.completions.create(model=MODEL, messages=messages())
        raw = await wrapped.chat.completions.with_raw_response.create(model=MODEL,
                                                                      messages=messages())
        assert raw.headers["x-cache"] == "HIT"
        await wrapped.chat.completions.create(model=MODEL, messages=messages("other"))
        raw = await through_sidecar.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages("other"))
        assert raw.headers["x-cache"] == "HIT"
        assert fake.calls[CHAT] == 2
    finally:
        await wrapped.close()
        await through_sidecar.close()


async def test_async_cache_fetch_lookup_store_and_invalidate(redis_url: str) -> None:
    calls: list[dict[str, Any]] = []

    async def model(body: dict[str, Any]) -> dict[str, Any]:
        calls.append(body)
        return {"choices": [{"message": {"role": "assistant", "content": "42"}}]}

    body = {"model": MODEL, "messages": messages()}
    async with AsyncCache(redis_url=redis_url, semantic=False) as cache:
        first = await cache.fetch(body, model, namespace="ns", credential="sk-1")
        second = await cache.fetch(body, model, namespace="ns", credential="sk-1")
        assert (first.status, second.status, len(calls)) == ("MISS", "HIT", 1)
        assert second.response == first.response and second.key == first.key
        assert await cache.lookup(body, namespace="ns", credential="sk-2") is None
        assert await cache.store(body, {"answer": 1}, namespace="ns", credential="sk-2")
        hit = await cache.lookup(body, namespace="ns", credential="sk-2")
        assert hit is not None and hit.response == {"answer": 1}
        assert await cache.invalidate(namespace="ns") == 2
        assert await cache.lookup(body, namespace="ns", credential="sk-1") is None
        assert (await cache.stats())["cache"]["reachable"] is True


async def test_async_cache_decorator_calls_the_function_once(redis_url: str) -> None:
    calls: list[str] = []
    async with AsyncCache(redis_url=redis_url, semantic=False) as cache:
        @cache.cached(namespace="faq")
        async def answer(question: str) -> str:
            calls.append(question)
            return f"answer to {question}"

        assert await answer(Q) == await answer(Q) == f"answer to {Q}"
        assert await answer("another") == "answer to another"
        assert calls == [Q, "another"]


async def test_sync_cache_wraps_the_async_one(redis_url: str) -> None:
    def run() -> tuple[str, str, int]:
        calls: list[int] = []

        def model(body: dict[str, Any]) -> dict[str, Any]:
            calls.append(1)
            return {"text": body["messages"][0]["content"].upper()}

        with Cache(redis_url=redis_url, semantic=False) as cache:
            body = {"model": MODEL, "messages": messages()}
            a, b = cache.fetch(body, model), cache.fetch(body, model)
            assert a.response == b.response == {"text": Q.upper()}
            return a.status, b.status, len(calls)

    assert await asyncio.to_thread(run) == ("MISS", "HIT", 1)


async def test_closed_cache_refuses_and_unknown_options_are_config_errors() -> None:
    from promptcache.cache.errors import ConfigError

    with pytest.raises(ConfigError):
        AsyncCache(no_such_option=1)
    with pytest.raises(CacheClosed):
        AsyncCache().prepare({"model": MODEL, "messages": messages()})


# -- the sidecar client -----------------------------------------------------------------------


async def test_async_sidecar_client_reads_health_stats_and_invalidates(
        fake: FakeUpstream, redis_url: str, sidecars: list[RunningSidecar]) -> None:
    sc = await start_sidecar(fake.url, redis_url, admin_token="s3cret")
    sidecars.append(sc)
    client = async_client(sc.url)
    await client.chat.completions.create(model=MODEL, messages=messages())
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages(), extra_headers={"X-Cache-Namespace": "docs"})
    key = raw.headers["x-cache-key"]
    async with AsyncSidecarClient(sc.url, admin_token="s3cret") as admin:
        assert (await admin.healthz()).ok
        assert (await admin.readyz()).ready
        stats = await admin.stats()
        assert stats.requests[CHAT]["MISS"] == 2 and stats.cache.reachable
        assert stats.settings["admin_token"] == "***"
        assert await admin.invalidate_key(key, namespace="docs") == 1
        assert await admin.invalidate_key(key, namespace="docs") == 0
        assert await admin.invalidate_namespace("") == 1
        assert await admin.invalidate_all() == 0
    async with AsyncSidecarClient(sc.url, admin_token="wrong") as intruder:
        with pytest.raises(AdminRefused) as refused:
            await intruder.invalidate_all()
        assert refused.value.status == 401
    await client.close()


async def test_sync_sidecar_client_and_its_errors(sidecar: RunningSidecar) -> None:
    def run() -> None:
        with SidecarClient(sidecar.url) as admin:
            assert admin.healthz().ok and admin.readyz().ready
            assert admin.stats().hit_ratio is None
            with pytest.raises(AdminRefused) as refused:
                admin.invalidate_namespace("x")
            assert refused.value.status == 403
        with SidecarClient("http://127.0.0.1:9", timeout=2) as nowhere:
            with pytest.raises(SidecarUnreachable):
                nowhere.healthz()

    await asyncio.to_thread(run)


async def test_readyz_reports_a_sidecar_whose_redis_is_down(
        fake: FakeUpstream, fresh_redis: Any, sidecars: list[RunningSidecar]) -> None:
    sc = await start_sidecar(fake.url, fresh_redis.url, redis_timeout=0.2)
    sidecars.append(sc)
    fresh_redis.close()
    async with AsyncSidecarClient(sc.url) as admin:
        ready = await admin.readyz()
        assert not ready.ready and ready.cache == "unreachable"


async def test_private_redis_is_stopped_and_removed_at_close(fake: FakeUpstream) -> None:
    client = wrap(async_client(fake.url), semantic=False)
    url = client._client._transport.cache.aio.engine.redis_url  # type: ignore[attr-defined]
    assert url.startswith("unix://")
    socket_path = url.removeprefix("unix://").split("?")[0]
    await client.chat.completions.create(model=MODEL, messages=messages())
    raw = await client.chat.completions.with_raw_response.create(model=MODEL,
                                                                 messages=messages())
    assert raw.headers["x-cache"] == "HIT"
    assert await asyncio.to_thread(os.path.exists, socket_path)
    await client.close()
    assert not await asyncio.to_thread(os.path.exists, os.path.dirname(socket_path))


async def test_concurrent_misses_of_one_key_make_one_call(redis_url: str) -> None:
    gate, calls = asyncio.Event(), []

    async def model(body: dict[str, Any]) -> dict[str, Any]:
        calls.append(1)
        await gate.wait()
        return {"answer": 42}

    body = {"model": MODEL, "messages": messages()}
    async with AsyncCache(redis_url=redis_url, semantic=False) as cache:
        tasks = [asyncio.create_task(cache.fetch(body, model)) for _ in range(5)]
        await eventually(lambda: len(calls) == 1 and len(cache.engine.flights) == 1)
        gate.set()
        results = await asyncio.gather(*tasks)
    assert len(calls) == 1 and all(r.response == {"answer": 42} for r in results)
    assert sorted(r.status for r in results) == ["MISS"] * 5


async def test_decorator_answers_a_paraphrase_from_the_semantic_tier(
        redis_url: str, embedder: Embedder) -> None:
    calls: list[str] = []
    async with AsyncCache(redis_url=redis_url, embedder=embedder,
                          embed_timeout=30.0, semantic_wait_budget=5.0) as cache:
        @cache.cached()
        async def answer(question: str) -> str:
            calls.append(question)
            return f"answer to {question}"

        assert await answer(Q) == f"answer to {Q}"
        assert cache.engine.semantic is not None  # the vector is computed off the path
        await cache.engine.semantic.drain()
        assert await answer(PARAPHRASE) == f"answer to {Q}"
        assert await answer("How do I delete my account?") != f"answer to {Q}"
    assert calls == [Q, "How do I delete my account?"]


async def test_sync_openai_client_through_a_sidecar(sidecar: RunningSidecar,
                                                    fake: FakeUpstream) -> None:
    client = sync_client(sidecar.url)

    def run() -> list[str]:
        create = client.chat.completions.with_raw_response.create
        return [create(model=MODEL, messages=messages()).headers["x-cache"] for _ in range(2)]

    assert await asyncio.to_thread(run) == ["MISS", "HIT"]
    await asyncio.to_thread(client.close)


async def test_sync_wrapped_calls_from_many_threads_reach_the_upstream_together(
        fake: FakeUpstream, redis_url: str) -> None:
    """Each sync caller's upstream call runs on its own thread, not on a small shared pool."""
    client = wrap(sync_client(fake.url), redis_url=redis_url, semantic=False)
    loop = asyncio.get_running_loop()
    fake.hold()
    with concurrent.futures.ThreadPoolExecutor(max_workers=12) as threads:
        calls = [loop.run_in_executor(threads, functools.partial(
            client.chat.completions.create, model=MODEL, messages=messages(f"question {i}")))
            for i in range(12)]
        pending = asyncio.gather(*calls)
        try:
            await fake.wait_for_requests(12, CHAT, within=10)
        finally:
            fake.release()
            answers = await pending
    assert len({a.choices[0].message.content for a in answers}) == 12
    await asyncio.to_thread(client.close)


async def test_wrapped_client_stores_no_error_and_no_broken_stream(
        fake: FakeUpstream, redis_url: str) -> None:
    client = wrap(async_client(fake.url), redis_url=redis_url, semantic=False)
    try:
        fake.fail_next(503, path=CHAT)
        with pytest.raises(openai.APIStatusError) as failed:
            await client.chat.completions.create(model=MODEL, messages=messages())
        assert failed.value.status_code == 503
        fake.break_stream_next(after_chunks=2)
        with pytest.raises(openai.APIError):
            stream = await client.chat.completions.create(model=MODEL, messages=messages(),
                                                          stream=True)
            _ = [chunk async for chunk in stream]
        raw = await client.chat.completions.with_raw_response.create(model=MODEL,
                                                                     messages=messages())
        assert raw.headers["x-cache"] == "MISS" and fake.calls[CHAT] == 3
    finally:
        await client.close()


async def test_wrapped_client_caches_embeddings_and_obeys_cache_control(
        fake: FakeUpstream, redis_url: str) -> None:
    client = wrap(async_client(fake.url), redis_url=redis_url, semantic=False)
    try:
        create = client.embeddings.with_raw_response.create
        first = await create(model="text-embedding-3-small", input=["a", "b"])
        second = await create(model="text-embedding-3-small", input=["a", "b"])
        assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
        assert [e.embedding for e in second.parse().data] == \
            [e.embedding for e in first.parse().data]
        refresh = await create(model="text-embedding-3-small", input=["a", "b"],
                               extra_headers={"Cache-Control": "no-cache"})
        assert refresh.headers["x-cache"] == "MISS"
        assert fake.calls["/v1/embeddings"] == 2
    finally:
        await client.close()
