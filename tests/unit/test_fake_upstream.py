"""The fake upstream itself: deterministic answers, API shapes, recording and fault injection."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from promptcache.testing import FakeUpstream, running_fake_upstream

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"


def chat_body(text: str = "hello there, how are you?", **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


def anthropic_body(text: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {
        "model": "claude-3-5-haiku-latest",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


def sse_events(raw: bytes) -> list[tuple[str | None, str]]:
    """(event name, data) for each SSE event in ``raw``."""
    events = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        name, data = None, ""
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = line.removeprefix("data: ")
        events.append((name, data))
    return events


def chat_chunks(raw: bytes) -> list[dict[str, Any]]:
    """The JSON chunks of an OpenAI stream, after checking it ends with exactly one [DONE]."""
    datas = [data for _, data in sse_events(raw)]
    assert datas[-1] == "[DONE]"
    assert "[DONE]" not in datas[:-1]
    return [json.loads(d) for d in datas[:-1]]


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with running_fake_upstream() as upstream:
        yield upstream


@pytest.fixture
async def http(fake: FakeUpstream) -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(base_url=fake.url, timeout=timeout) as session:
        yield session


async def post_json(
    http: aiohttp.ClientSession, path: str, body: dict[str, Any]
) -> tuple[int, Any]:
    async with http.post(path, json=body) as resp:
        return resp.status, await resp.json()


async def post_raw(http: aiohttp.ClientSession, path: str, body: dict[str, Any]) -> bytes:
    async with http.post(path, json=body) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        return await resp.read()


# -- chat completions -------------------------------------------------------------------------


async def test_chat_answer_is_deterministic_and_openai_shaped(http: aiohttp.ClientSession) -> None:
    status, first = await post_json(http, CHAT, chat_body())
    _, second = await post_json(http, CHAT, chat_body())
    assert status == 200
    assert first == second
    assert first["object"] == "chat.completion"
    assert first["id"].startswith("chatcmpl-")
    assert isinstance(first["created"], int)
    assert first["model"] == "gpt-4o-mini"
    [choice] = first["choices"]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].startswith("answer-")
    assert choice["message"]["content"].endswith("to: hello there, how are you?")
    usage = first["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.parametrize(
    "changed",
    [
        chat_body(temperature=0.7),
        chat_body("hello there, how are you!"),
        {**chat_body(), "model": "gpt-4o"},
        chat_body(max_tokens=5),
    ],
)
async def test_any_change_to_the_request_changes_the_answer(
    http: aiohttp.ClientSession, changed: dict[str, Any]
) -> None:
    _, base = await post_json(http, CHAT, chat_body())
    _, other = await post_json(http, CHAT, changed)
    assert other["choices"][0]["message"]["content"] != base["choices"][0]["message"]["content"]
    assert other["id"] != base["id"]


async def test_chat_honours_n_with_distinct_choices(http: aiohttp.ClientSession) -> None:
    _, body = await post_json(http, CHAT, chat_body(n=3))
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert len({c["message"]["content"] for c in body["choices"]}) == 3


async def test_chat_stream_matches_openai_chunk_shape(http: aiohttp.ClientSession) -> None:
    _, plain = await post_json(http, CHAT, chat_body())
    chunks = chat_chunks(await post_raw(http, CHAT, chat_body(stream=True)))

    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(c["id"] == plain["id"] and c["model"] == "gpt-4o-mini" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    content = [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
    assert len(content) >= 3
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert "usage" not in chunks[0]
    # Streaming flags do not change the answer.
    assert "".join(content) == plain["choices"][0]["message"]["content"]


async def test_chat_stream_include_usage_ends_with_usage_chunk(
    http: aiohttp.ClientSession,
) -> None:
    _, plain = await post_json(http, CHAT, chat_body())
    body = chat_body(stream=True, stream_options={"include_usage": True})
    chunks = chat_chunks(await post_raw(http, CHAT, body))
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == plain["usage"]


async def test_chat_with_tools_answers_with_a_tool_call(http: aiohttp.ClientSession) -> None:
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": {}}},
        {"type": "function", "function": {"name": "other", "parameters": {}}},
    ]
    _, body = await post_json(http, CHAT, chat_body(tools=tools))
    [choice] = body["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["id"].startswith("call_")
    assert call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert isinstance(json.loads(call["function"]["arguments"]), dict)

    chunks = chat_chunks(await post_raw(http, CHAT, chat_body(tools=tools, stream=True)))
    head = chunks[0]["choices"][0]["delta"]
    assert head["role"] == "assistant"
    assert head["tool_calls"][0]["id"] == call["id"]
    assert head["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    pieces = [
        c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"] for c in chunks[1:-1]
    ]
    assert len(pieces) >= 3
    assert "".join(pieces) == call["function"]["arguments"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


# -- completions, embeddings, models ----------------------------------------------------------


async def test_text_completion_plain_and_streamed(http: aiohttp.ClientSession) -> None:
    request = {"model": "gpt-3.5-turbo-instruct", "prompt": "Say this is a test"}
    _, body = await post_json(http, "/v1/completions", request)
    assert body["object"] == "text_completion"
    [choice] = body["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["text"].endswith("to: Say this is a test")

    raw = await post_raw(http, "/v1/completions", {**request, "stream": True})
    chunks = chat_chunks(raw)
    texts = [c["choices"][0]["text"] for c in chunks]
    assert len(texts) >= 4  # >= 3 text pieces and the finish chunk
    assert "".join(texts) == choice["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_embeddings_are_deterministic_unit_vectors(http: aiohttp.ClientSession) -> None:
    request = {"model": "text-embedding-3-small", "input": ["alpha", "beta"]}
    _, body = await post_json(http, "/v1/embeddings", request)
    _, single = await post_json(http, "/v1/embeddings", {**request, "input": "alpha"})
    assert body["object"] == "list"
    assert body["model"] == "text-embedding-3-small"
    assert [d["index"] for d in body["data"]] == [0, 1]
    alpha, beta = (d["embedding"] for d in body["data"])
    assert len(alpha) == 8
    assert math.isclose(sum(v * v for v in alpha), 1.0)
    assert alpha != beta
    assert single["data"][0]["embedding"] == alpha
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0

    _, packed = await post_json(http, "/v1/embeddings", {**request, "encoding_format": "base64"})
    decoded = struct.unpack("<8f", base64.b64decode(packed["data"][0]["embedding"]))
    assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(decoded, alpha, strict=True))


async def test_models_lists_models(http: aiohttp.ClientSession) -> None:
    async with http.get("/v1/models") as resp:
        body = await resp.json()
    assert body["object"] == "list"
    assert {"id": "gpt-4o-mini", "object": "model"}.items() <= body["data"][0].items()


# -- Anthropic messages -----------------------------------------------------------------------


async def test_anthropic_message_shape_and_determinism(http: aiohttp.ClientSession) -> None:
    status, body = await post_json(http, MESSAGES, anthropic_body())
    _, again = await post_json(http, MESSAGES, anthropic_body())
    _, other = await post_json(http, MESSAGES, anthropic_body(temperature=0.1))
    assert status == 200
    assert body == again
    assert body["content"] != other["content"]
    assert body["id"].startswith("msg_")
    assert body["type"] == "message"
    assert body["role"] == "assistant"
    assert body["model"] == "claude-3-5-haiku-latest"
    assert body["stop_reason"] == "end_turn"
    assert body["stop_sequence"] is None
    [block] = body["content"]
    assert block["type"] == "text"
    assert block["text"].endswith("to: hello there")
    assert set(body["usage"]) >= {"input_tokens", "output_tokens"}


async def test_anthropic_tools_give_a_tool_use_block(http: aiohttp.ClientSession) -> None:
    tools = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    _, body = await post_json(http, MESSAGES, anthropic_body(tools=tools))
    assert body["stop_reason"] == "tool_use"
    [block] = body["content"]
    assert block["type"] == "tool_use"
    assert block["name"] == "get_weather"
    assert block["id"].startswith("toolu_")
    assert isinstance(block["input"], dict)


async def test_anthropic_stream_event_sequence(http: aiohttp.ClientSession) -> None:
    _, plain = await post_json(http, MESSAGES, anthropic_body())
    events = sse_events(await post_raw(http, MESSAGES, anthropic_body(stream=True)))
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    deltas = [json.loads(data) for name, data in events if name == "content_block_delta"]
    assert len(deltas) >= 3
    assert names[3:-3] == ["content_block_delta"] * len(deltas)
    for name, data in events:
        assert json.loads(data)["type"] == name
    start = json.loads(events[0][1])["message"]
    assert start["id"] == plain["id"]
    assert start["content"] == []
    assert start["stop_reason"] is None
    text = "".join(d["delta"]["text"] for d in deltas)
    assert text == plain["content"][0]["text"]
    message_delta = json.loads(events[-2][1])
    assert message_delta["delta"]["stop_reason"] == "end_turn"
    assert message_delta["usage"]["output_tokens"] == plain["usage"]["output_tokens"]


# -- errors -----------------------------------------------------------------------------------


async def test_invalid_json_is_a_400_in_each_apis_shape(http: aiohttp.ClientSession) -> None:
    headers = {"Content-Type": "application/json"}
    async with http.post(CHAT, data=b"{not json", headers=headers) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
        assert error["type"] == "invalid_request_error"
        assert set(error) >= {"message", "type", "code"}
    async with http.post(MESSAGES, data=b"{not json", headers=headers) as resp:
        assert resp.status == 400
        body = await resp.json()
        assert body["type"] == "error"
        assert body["error"]["type"] == "invalid_request_error"
        assert body["error"]["message"]


async def test_unknown_v1_path_is_an_openai_404(http: aiohttp.ClientSession) -> None:
    async with http.get("/v1/nope") as resp:
        assert resp.status == 404
        assert "message" in (await resp.json())["error"]


async def test_fail_next_applies_to_n_matching_requests_then_expires(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.fail_next(503, n=2, path=CHAT)
    status, _ = await post_json(http, "/v1/embeddings", {"input": "x"})
    assert status == 200  # another path is not affected
    results = [await post_json(http, CHAT, chat_body()) for _ in range(3)]
    assert [status for status, _ in results] == [503, 503, 200]
    assert results[0][1]["error"]["type"] == "server_error"
    assert fake.calls[CHAT] == 3  # failed requests are still counted


async def test_fail_next_uses_the_anthropic_shape_or_a_given_body(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.fail_next(429)
    status, body = await post_json(http, MESSAGES, anthropic_body())
    assert status == 429
    assert body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": body["error"]["message"]},
    }

    fake.fail_next(418, body={"custom": True})
    assert await post_json(http, CHAT, chat_body()) == (418, {"custom": True})
    assert (await post_json(http, MESSAGES, anthropic_body()))[0] == 200


async def test_break_stream_next_cuts_the_stream_before_its_terminator(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.break_stream_next(after_chunks=2)
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(CHAT, json=chat_body(stream=True)) as resp:
            assert resp.status == 200
            async for data in resp.content.iter_any():
                received += data
    datas = [data for _, data in sse_events(received)]
    assert len(datas) == 2
    assert "[DONE]" not in datas

    # The rule expired: the next stream is whole.
    chunks = chat_chunks(await post_raw(http, CHAT, chat_body(stream=True)))
    assert len(chunks) >= 5


async def test_break_stream_next_applies_to_anthropic_streams(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.break_stream_next(after_chunks=3)
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(MESSAGES, json=anthropic_body(stream=True)) as resp:
            await resp.read()


# -- gate, latency, recording -----------------------------------------------------------------


async def test_hold_keeps_concurrent_requests_in_flight_until_release(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.hold()
    tasks = [asyncio.create_task(post_json(http, CHAT, chat_body())) for _ in range(20)]
    await fake.wait_for_requests(20, CHAT)
    assert fake.in_flight == 20
    assert not any(task.done() for task in tasks)
    fake.release()
    results = await asyncio.gather(*tasks)
    assert {status for status, _ in results} == {200}
    assert len({json.dumps(body) for _, body in results}) == 1
    assert fake.in_flight == 0


async def test_wait_for_requests_times_out_with_a_message(fake: FakeUpstream) -> None:
    with pytest.raises(TimeoutError, match="expected 1 requests"):
        await fake.wait_for_requests(1, within=0.05)


async def test_latency_is_applied_and_settable_at_runtime(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    fake.latency = 0.2
    started = time.monotonic()
    await post_json(http, CHAT, chat_body())
    assert time.monotonic() - started >= 0.2


async def test_requests_and_credentials_are_recorded_and_reset_clears_them(
    fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    async with http.post(CHAT, json=chat_body(), headers={"Authorization": "Bearer sk-1"}):
        pass
    async with http.post(MESSAGES, json=anthropic_body(), headers={"x-api-key": "ak-2"}):
        pass
    async with http.get("/v1/models"):
        pass
    assert fake.calls == {CHAT: 1, MESSAGES: 1, "/v1/models": 1}
    chat, messages, models = fake.requests
    assert (chat.method, chat.path) == ("POST", CHAT)
    assert chat.headers["authorization"] == "Bearer sk-1"
    assert chat.json == chat_body()
    assert json.loads(chat.body) == chat_body()
    assert messages.headers["X-Api-Key"] == "ak-2"
    assert models.json is None
    assert fake.requests_to(MESSAGES) == [messages]

    fake.fail_next(500)
    fake.reset()
    assert fake.calls == {}
    assert fake.requests == []
    assert (await post_json(http, CHAT, chat_body()))[0] == 200  # pending failure dropped too


# -- echo -------------------------------------------------------------------------------------


async def test_echo_reflects_any_method(http: aiohttp.ClientSession) -> None:
    async with http.patch("/echo/a/b?x=1", data=b"payload", headers={"X-Test": "t"}) as resp:
        assert resp.status == 200
        assert resp.headers["X-Upstream-Echo"] == "1"
        body = await resp.json()
    assert body["method"] == "PATCH"
    assert body["path"] == "/echo/a/b"
    assert body["query"] == {"x": "1"}
    assert body["headers"]["X-Test"] == "t"
    assert body["body"] == "payload"


async def test_echo_status_returns_that_status(http: aiohttp.ClientSession) -> None:
    async with http.delete("/echo/status/418") as resp:
        assert resp.status == 418
        assert resp.headers["X-Upstream-Echo"] == "1"
    async with http.get("/echo/status/204") as resp:
        assert resp.status == 204


async def test_echo_stream_sends_parts_in_separate_chunks(http: aiohttp.ClientSession) -> None:
    async with running_fake_upstream(chunk_delay=0.02) as slow:
        async with http.get(f"{slow.url}/echo/stream?parts=4") as resp:
            assert resp.headers["X-Upstream-Echo"] == "1"
            assert resp.headers.get("Transfer-Encoding") == "chunked"
            received = [data async for data in resp.content.iter_any()]
    assert b"".join(received) == b"part-0\npart-1\npart-2\npart-3\n"
    assert len(received) >= 2  # the delay keeps parts apart on the wire


async def test_stopped_server_refuses_connections(http: aiohttp.ClientSession) -> None:
    async with running_fake_upstream() as other:
        url = other.url
    with pytest.raises(aiohttp.ClientConnectionError):
        async with http.get(f"{url}/v1/models"):
            pass


async def test_stop_releases_held_requests(http: aiohttp.ClientSession) -> None:
    other = FakeUpstream()
    await other.start()
    other.hold()
    task = asyncio.create_task(post_json(http, f"{other.url}{CHAT}", chat_body()))
    await other.wait_for_requests(1)
    await other.stop()
    assert (await task)[0] == 200  # answered, not left hanging until the shutdown timeout
