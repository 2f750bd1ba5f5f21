"""The exact-match sidecar end to end: real aiohttp server, real Redis, fake upstream."""

from __future__ import annotations

import asyncio
import json
import zlib
from typing import Any

import aiohttp
import pytest
import redis

from promptcache.cache.sse import SSEEvent, SSEParser, assembler_for
from promptcache.testing import FakeUpstream
from tests.support.sidecars import RunningSidecar, eventually, start_sidecar

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"


def chat(content: str = "What is the capital of France?", **params: Any) -> dict[str, Any]:
    return {"model": "gpt-test", "messages": [{"role": "user", "content": content}], **params}


def anthropic(content: str = "Name three primes.", **params: Any) -> dict[str, Any]:
    return {"model": "claude-test", "max_tokens": 64,
            "messages": [{"role": "user", "content": content}], **params}


async def post(http: aiohttp.ClientSession, sc: RunningSidecar, body: Any, path: str = CHAT,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    h = {"Authorization": "Bearer sk-alice", "Content-Type": "application/json"}
    h.update(headers or {})
    async with http.post(sc.url + path, data=data, headers=h) as r:
        return r.status, dict(r.headers), await r.read()


async def stream(http: aiohttp.ClientSession, sc: RunningSidecar, body: dict[str, Any],
                 path: str = CHAT, headers: dict[str, str] | None = None
                 ) -> tuple[dict[str, str], list[SSEEvent], list[bytes]]:
    """POST a streaming request; return headers, the SSE events and the raw network chunks."""
    h = {"Authorization": "Bearer sk-alice"}
    h.update(headers or {})
    parser, events, chunks = SSEParser(), [], []
    async with http.post(sc.url + path, json={**body, "stream": True}, headers=h) as r:
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"].startswith("text/event-stream")
        async for chunk in r.content.iter_any():
            chunks.append(chunk)
            events.extend(parser.feed(chunk))
        return dict(r.headers), events, chunks


def assembled(api: Any, events: list[SSEEvent]) -> dict[str, Any]:
    asm = assembler_for(api)
    for e in events:
        asm.add(e)
    assert asm.complete and not asm.failed
    return asm.result()


# --- hits and misses ------------------------------------------------------------------------


async def test_miss_then_hit_serves_the_same_answer_without_calling_upstream(
    sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    s1, h1, b1 = await post(http, sidecar, chat())
    s2, h2, b2 = await post(http, sidecar, chat())
    assert (s1, s2) == (200, 200)
    assert h1["X-Cache"] == "MISS" and h2["X-Cache"] == "HIT"
    assert json.loads(b1) == json.loads(b2)
    assert h1["X-Cache-Key"] == h2["X-Cache-Key"] and len(h2["X-Cache-Key"]) == 32
    assert int(h2["Age"]) >= 0 and "Age" not in h1
    assert h2["Content-Type"].startswith("application/json")
    assert fake.calls[CHAT] == 1


@pytest.mark.parametrize("path,body", [
    (COMPLETIONS, {"model": "m", "prompt": "Say hi"}),
    (EMBEDDINGS, {"model": "e", "input": ["a", "b"]}),
    (MESSAGES, anthropic()),
])
async def test_every_cached_route_hits_on_a_repeat(
    sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession,
    path: str, body: dict[str, Any],
) -> None:
    _, h1, b1 = await post(http, sidecar, body, path)
    _, h2, b2 = await post(http, sidecar, body, path)
    assert (h1["X-Cache"], h2["X-Cache"]) == ("MISS", "HIT")
    assert b1 == b2 and fake.calls[path] == 1


@pytest.mark.parametrize("change", [
    {"temperature": 0.2}, {"top_p": 0.5}, {"max_tokens": 7}, {"max_completion_tokens": 7},
    {"stop": ["\n"]}, {"seed": 42}, {"n": 2}, {"presence_penalty": 0.1},
    {"frequency_penalty": 0.1}, {"logit_bias": {"50256": -100}}, {"logprobs": True},
    {"response_format": {"type": "json_object"}}, {"model": "gpt-other"},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
    {"tool_choice": "none"}, {"user": "someone-else"},
    {"messages": [{"role": "system", "content": "Be terse."},
                  {"role": "user", "content": "What is the capital of France?"}]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                  {"role": "user", "content": "What is the capital of France?"}]},
    {"messages": [{"role": "user", "name": "bob", "content": "What is the capital of France?"}]},
    {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is the capital of France?"}]}]},
    {"messages": [{"role": "user", "content": "What is the capital of france?"}]},
])
async def test_any_change_that_can_change_the_answer_misses(
    sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession,
    change: dict[str, Any],
) -> None:
    await post(http, sidecar, chat(temperature=0))
    _, h, _ = await post(http, sidecar, {**chat(temperature=0), **change})
    assert h["X-Cache"] == "MISS"
    assert fake.calls[CHAT] == 2


async def test_key_order_whitespace_and_integral_floats_do_not_matter(
    sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    compact = b'{"model":"gpt-test","temperature":1,"messages":[{"role":"user","content":"hi"}]}'
    spaced = (b'{\n  "messages" : [ { "content": "hi",  "role": "user" } ],\n'
              b'  "temperature": 1.0, "model":"gpt-test"\n}')
    _, h1, _ = await post(http, sidecar, compact)
    _, h2, _ = await post(http, sidecar, spaced)
    assert (h1["X-Cache"], h2["X-Cache"]) == ("MISS", "HIT")
    assert fake.calls[CHAT] == 1


async def test_two_credentials_never_share_an_entry(
    sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    await post(http, sidecar, chat())
    _, h_bob, _ = await post(http, sidecar, chat(), headers={"Authorization": "Bearer sk-bob"})
    _, h_key, _ = await post(http, sidecar, chat(), headers={"Authorization": "",
                                                              "x-api-key": "sk-alice"})
    _, h_alice, _ = await post(http, sidecar, chat())
    assert [h_bob["X-Cache"], h_key["X-Cache"], h_alice["X-Cache"]] == ["MISS", "MISS", "HIT"]
    assert fake.calls[CHAT] == 3


async def test_shared_cache_opt_in_shares_across_credentials(
    fake: FakeUpstream, redis_url: str, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession,
) -> None:
    sc = await start_sidecar(fake.url, redis_url, shared_cache=True)
    sidecars.append(sc)
    await post(http, sc, chat())
    _, h, _ = await post(http, sc, chat(), headers={"Authorization": "Bearer sk-bob"})
    assert h["X-Cache"] == "HIT" and fake.calls[CHAT] == 1


async def test_namespace_narrows_inside_a_tenant(
    sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    await post(http, sidecar, chat(), headers={"X-Cache-Namespace": "team-a"})
    _, h_b, _ = await post(http, sidecar, chat(), headers={"X-Cache-Namespace": "team-b"})
    _, h_none, _ = await post(http, sidecar, chat())
    _, h_a, _ = await post(http, sidecar, chat(), headers={"X-Cache-Namespace": "team-a"})
    assert [h_b["X-Cache"], h_none["X-Cache"], h_a["X-Cache"]] == ["MISS", "MISS", "HIT"]
    assert "x-cache-namespace" not in fake.requests[-1].headers


# --- streaming ------------------------------------------------------------------------------


@pytest.mark.parametrize("path,api,body", [
    (CHAT, "chat", chat(stream_options={"include_usage": True})),
    (CHAT, "chat", chat(tools=[{"type": "function", "function": {"name": "lookup",
                                                                  "parameters": {}}}])),
    (COMPLETIONS, "completions", {"model": "m", "prompt": "Once upon a time"}),
    (MESSAGES, "messages", anthropic()),
])
async def test_streaming_miss_is_stored_and_replayed_as_several_chunks(
    sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession,
    path: str, api: str, body: dict[str, Any],
) -> None:
    h1, ev1, _ = await stream(http, sidecar, body, path)
    h2, ev2, _ = await stream(http, sidecar, body, path)
    assert (h1["X-Cache"], h2["X-Cache"]) == ("MISS", "HIT")
    assert fake.calls[path] == 1
    assert len(ev2) >= 4, "a replay must be several events, not one lump"
    assert assembled(api, ev2) == assembled(api, ev1)
    if api == "chat":
        first = json.loads(ev2[0].data)
        assert first["choices"][0]["delta"]["role"] == "assistant"
        assert ev2[-1].data == "[DONE]"
        finishes = [c["finish_reason"] for e in ev2[:-1]
                    for c in json.loads(e.data)["choices"] if c.get("finish_reason")]
        assert len(finishes) == 1
    if body.get("stream_options"):
        assert json.loads(ev2[-2].data)["usage"]["total_tokens"] > 0
    if api == "messages":
        kinds = [e.event for e in ev2]
        assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
        assert kinds.count("content_block_delta") >= 2


async def test_streamed_entry_answers_a_non_streaming_request_and_vice_versa(
    sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    _, ev, _ = await stream(http, sidecar, chat("streamed first"))
    _, h, b = await post(http, sidecar, chat("streamed first"))
    assert h["X-Cache"] == "HIT"
    assert json.loads(b)["choices"][0]["message"] == assembled("chat", ev)["choices"][0]["message"]

    _, _, b2 = await post(http, sidecar, chat("plain first"))
    h3, ev3, _ = await stream(http, sidecar, chat("plain first"))
    assert h3["X-Cache"] == "HIT"
    assert (assembled("chat", ev3)["choices"][0]["message"]["content"]
            == json.loads(b2)["choices"][0]["message"]["content"])
    assert fake.calls[CHAT] == 2


async def test_anthropic_stream_and_plain_share_entries(
    sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    await post(http, sidecar, anthropic(), MESSAGES)
    h, ev, _ = await stream(http, sidecar, anthropic(), MESSAGES)
    assert h["X-Cache"] == "HIT" and fake.calls[MESSAGES] == 1
    assert assembled("messages", ev)["content"][0]["type"] == "text"


async def test_streaming_miss_reaches_the_caller_before_the_upstream_finishes(
    sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """No added buffering: the first event arrives while the upstream is still sending."""
    fake.chunk_delay = 0.2
    loop = asyncio.get_running_loop()
    async with http.post(sidecar.url + CHAT, json=chat("slow", stream=True),
                         headers={"Authorization": "Bearer sk-alice"}) as r:
        start = loop.time()
        await r.content.readuntil(b"\n\n")
        first = loop.time() - start
        await r.read()
        total = loop.time() - start
    assert first < total / 2, (first, total)


# --- never cached ---------------------------------------------------------------------------


async def test_upstream_errors_are_relayed_and_not_cached(
    sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.fail_next(500, path=CHAT)
    s1, h1, b1 = await post(http, sidecar, chat())
    assert s1 == 500 and "error" in json.loads(b1) and h1["X-Cache"] == "MISS"
    s2, h2, _ = await post(http, sidecar, chat())
    assert s2 == 200 and h2["X-Cache"] == "MISS"
    s3, h3, _ = await post(http, sidecar, chat())
    assert h3["X-Cache"] == "HIT" and fake.calls[CHAT] == 2


async def test_broken_stream_is_visible_to_the_caller_and_not_cached(
    sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.break_stream_next(after_chunks=2)
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(sidecar.url + CHAT, json=chat(stream=True),
                             headers={"Authorization": "Bearer sk-alice"}) as r:
            await r.read()
    h, ev, _ = await stream(http, sidecar, chat())
    assert h["X-Cache"] == "MISS" and ev[-1].data == "[DONE]"
    assert fake.calls[CHAT] == 2


async def test_responses_over_max_entry_bytes_are_not_cached(
    fake: FakeUpstream, redis_url: str, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession,
) -> None:
    sc = await start_sidecar(fake.url, redis_url, max_entry_bytes=64)
    sidecars.append(sc)
    _, h1, _ = await post(http, sc, chat())
    _, h2, _ = await post(http, sc, chat())
    assert (h1["X-Cache"], h2["X-Cache"]) == ("MISS", "MISS") and fake.calls[CHAT] == 2


# --- per-request control --------------------------------------------------------------------


async def test_no_store_answers_but_does_not_store(
    sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    _, h1, _ = await post(http, sidecar, chat(), headers={"Cache-Control": "no-store"})
    _, h2, _ = await post(http, sidecar, chat())
    assert (h1["X-Cache"], h2["X-Cache"]) == ("MISS", "MISS") and fake.calls[CHAT] == 2


async def test_no_cache_skips_the_lookup_and_refreshes_the_entry(
    sidecar: RunningSidecar, fake: FakeUpstream, redis_url: str, http: aiohttp.ClientSession
) -> None:
    _, h1, _ = await post(http, sidecar, chat())
    _, h2, _ = await post(http, sidecar, chat(), headers={"Cache-Control": "no-cache"})
    _, h3, _ = await post(http, sidecar, chat())
    assert [h1["X-Cache"], h2["X-Cache"], h3["X-Cache"]] == ["MISS", "MISS", "HIT"]
    assert fake.calls[CHAT] == 2


async def test_no_cache_and_no_store_together_bypass(
    sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    await post(http, sidecar, chat())
    _, h, _ = await post(http, sidecar, chat(), headers={"Cache-Control": "no-cache, no-store"})
    assert h["X-Cache"] == "BYPASS" and fake.calls[CHAT] == 2


async def test_max_age_sets_the_entry_ttl(
    sidecar: RunningSidecar, fake: FakeUpstream, redis_url: str, http: aiohttp.ClientSession
) -> None:
    await post(http, sidecar, chat("short"), headers={"Cache-Control": "max-age=30"})
    await post(http, sidecar, chat("default"))
    r = redis.Redis.from_url(redis_url)
    try:
        ttls = sorted(r.pttl(k) for k in r.scan_iter("pc:e:*"))
    finally:
        r.close()
    assert len(ttls) == 2
    assert 25_000 < ttls[0] <= 30_000
    assert 86_000_000 < ttls[1] <= 86_400_000


async def test_default_ttl_is_configurable(
    fake: FakeUpstream, redis_url: str, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession,
) -> None:
    sc = await start_sidecar(fake.url, redis_url, default_ttl=120.0)
    sidecars.append(sc)
    await post(http, sc, chat())
    r = redis.Redis.from_url(redis_url)
    try:
        (key,) = list(r.scan_iter("pc:e:*"))
        assert 110_000 < r.pttl(key) <= 120_000
    finally:
        r.close()


async def test_max_age_rejects_an_older_entry(
    sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """An entry older than the request's max-age is not served (ages are whole seconds)."""
    await post(http, sidecar, chat())
    clock = sidecar.state.cache._clock
    sidecar.state.cache._clock = lambda: clock() + 100
    _, h, _ = await post(http, sidecar, chat(), headers={"Cache-Control": "max-age=50"})
    _, h2, _ = await post(http, sidecar, chat())
    assert h["X-Cache"] == "MISS" and h2["X-Cache"] == "HIT" and fake.calls[CHAT] == 2


# --- single flight --------------------------------------------------------------------------


@pytest.mark.parametrize("streaming_share", [0.0, 0.5])
async def test_concurrent_identical_misses_make_one_upstream_call(
    sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession,
    streaming_share: float,
) -> None:
    fake.hold()

    async def one(i: int) -> dict[str, Any]:
        if i < 20 * streaming_share:
            _, ev, _ = await stream(http, sidecar, chat("same question"))
            return assembled("chat", ev)["choices"][0]["message"]
        status, _, body = await post(http, sidecar, chat("same question"))
        assert status == 200
        return json.loads(body)["choices"][0]["message"]

    tasks = [asyncio.create_task(one(i)) for i in range(20)]
    await fake.wait_for_requests(1, CHAT)
    flights = sidecar.state.flights
    await eventually(lambda: [flights.followers(k) for k in flights] == [19])
    fake.release()
    answers = await asyncio.gather(*tasks)
    assert fake.calls[CHAT] == 1
    assert all(a == answers[0] for a in answers)


# --- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("path,body,param", [
    (CHAT, b"{not json", "body"),
    (CHAT, b"[1, 2]", "body"),
    (CHAT, b'{"model": "m"}', "messages"),
    (CHAT, b'{"model": "m", "messages": "hi"}', "messages"),
    (CHAT, b'{"model": "m", "messages": [{"role": "user", "content": "x"}], '
           b'"temperature": "hot"}', "temperature"),
    (CHAT, b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}',
     "stream"),
    (CHAT, b'{"model": 5, "messages": [{"role": "user", "content": "x"}]}', "model"),
    (EMBEDDINGS, b'{"model": "e"}', "input"),
    (CHAT, "\udcff".encode("utf-8", "surrogatepass"), "body"),
])
async def test_malformed_bodies_get_a_clear_400_and_the_server_keeps_serving(
    sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession,
    path: str, body: bytes, param: str,
) -> None:
    status, _, raw = await post(http, sidecar, body, path)
    assert status == 400
    err = json.loads(raw)["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]
    assert fake.calls[path] == 0
    ok, _, _ = await post(http, sidecar, chat())
    assert ok == 200


async def test_anthropic_errors_come_in_anthropic_shape(
    sidecar: RunningSidecar, http: aiohttp.ClientSession
) -> None:
    status, _, raw = await post(http, sidecar, b'{"model": "c", "messages": 1}', MESSAGES)
    doc = json.loads(raw)
    assert status == 400 and doc["type"] == "error"
    assert doc["error"]["type"] == "invalid_request_error"


async def test_oversized_body_gets_413_and_the_server_keeps_serving(
    fake: FakeUpstream, redis_url: str, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession,
) -> None:
    sc = await start_sidecar(fake.url, redis_url, max_body_bytes=1000)
    sidecars.append(sc)
    status, _, raw = await post(http, sc, chat("x" * 5000))
    assert status == 413 and "limit" in json.loads(raw)["error"]["message"]

    async def chunked() -> Any:  # no Content-Length: the limit must hold while reading
        yield json.dumps(chat("y" * 5000)).encode()

    async with http.post(sc.url + CHAT, data=chunked(),
                         headers={"Content-Type": "application/json"}) as r:
        assert r.status == 413
    ok, _, _ = await post(http, sc, chat())
    assert ok == 200 and fake.calls[CHAT] == 1


async def test_bad_cache_control_and_namespace_are_400(
    sidecar: RunningSidecar, http: aiohttp.ClientSession
) -> None:
    s1, _, _ = await post(http, sidecar, chat(), headers={"Cache-Control": "max-age=soon"})
    s2, _, _ = await post(http, sidecar, chat(), headers={"X-Cache-Namespace": "n" * 300})
    assert (s1, s2) == (400, 400)
    huge = {"Cache-Control": "max-age=" + "9" * 5000}
    s3, h3, _ = await post(http, sidecar, chat(), headers=huge)
    assert (s3, h3["X-Cache"]) == (200, "MISS")  # capped like any huge max-age, not a 500


async def test_unreachable_upstream_is_a_502_in_api_shape_that_names_no_host(
    redis_url: str, sidecars: list[RunningSidecar], http: aiohttp.ClientSession
) -> None:
    from tests.support.redis_servers import free_port

    port = free_port()
    sc = await start_sidecar(f"http://127.0.0.1:{port}", redis_url)
    sidecars.append(sc)
    status, _, raw = await post(http, sc, chat())
    message = json.loads(raw)["error"]["message"]
    assert status == 502 and message == "the upstream could not be reached"
    assert "127.0.0.1" not in raw.decode() and str(port) not in raw.decode()


async def test_a_hit_on_a_deflated_entry_is_sent_as_stored_to_a_caller_that_takes_deflate(
    fake: FakeUpstream, sidecar: RunningSidecar,
) -> None:
    """A long answer is stored deflated; a caller whose Accept-Encoding takes deflate gets
    those bytes with ``Content-Encoding: deflate``, any other caller (and a streaming one)
    gets the answer as the upstream sent it."""
    fake.answer_words = 400  # about 2.5 KB: stored deflated
    body = chat("Tell me a long story.")
    async with aiohttp.ClientSession(auto_decompress=False) as raw:
        status, h, sent = await post(raw, sidecar, body, headers={"Accept-Encoding": "identity"})
        assert status == 200 and h["X-Cache"] == "MISS" and "Content-Encoding" not in h
        status, h, deflated = await post(raw, sidecar, body,
                                         headers={"Accept-Encoding": "gzip, deflate"})
        assert h["X-Cache"] == "HIT" and h["Content-Encoding"] == "deflate"
        assert len(deflated) < len(sent) and zlib.decompress(deflated) == sent
        for refuses in ("identity", "gzip", "deflate;q=0", "br, *;q=0"):
            _, h, plain = await post(raw, sidecar, body, headers={"Accept-Encoding": refuses})
            assert h["X-Cache"] == "HIT" and "Content-Encoding" not in h and plain == sent
    async with aiohttp.ClientSession() as http:  # decodes deflate, as SDKs do
        _, h, decoded = await post(http, sidecar, body)
        assert h["X-Cache"] == "HIT" and decoded == sent
        headers, events, _ = await stream(http, sidecar, body,
                                          headers={"Accept-Encoding": "deflate"})
        assert headers["X-Cache"] == "HIT" and "Content-Encoding" not in headers
        text = json.loads(sent)["choices"][0]["message"]["content"]
        assert assembled("chat", events)["choices"][0]["message"]["content"] == text
