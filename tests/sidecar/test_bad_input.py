"""Malformed bodies to the cached routes: a 400 in the API's own error shape, never a 500,
never a call upstream, and the sidecar keeps serving."""

from __future__ import annotations

import io
import json
import time
from typing import Any

import aiohttp
import pytest

from promptcache.testing import FakeUpstream
from tests.support.sidecars import RunningSidecar

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
HEADERS = {"Authorization": "Bearer sk-alice", "Content-Type": "application/json"}

CHAT_HEAD = b'{"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], '
MESSAGES_HEAD = (b'{"model": "claude-test", "max_tokens": 16, '
                 b'"messages": [{"role": "user", "content": "hi"}], ')

#: name -> (the tail of a request body after a valid head, a phrase the message must hold)
VARIANTS: dict[str, tuple[bytes, str]] = {
    "NaN": (b'"metadata": {"score": NaN}}', "NaN"),
    "Infinity": (b'"metadata": {"score": [-Infinity]}}', "Infinity"),
    "1e999": (b'"metadata": {"score": 1e999}}', "too large for a double"),
    "5000-digit integer": (b'"metadata": {"n": ' + b"9" * 5000 + b"}}", "5000 digits"),
    "deep nesting": (b'"metadata": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "64 deep"),
    "lone surrogate": (b'"metadata": {"s": "\\ud800"}}', "lone surrogate"),
    "surrogate in a key": (b'"metadata": {"\\udc80": 1}}', "lone surrogate"),
    "duplicate key": (b'"messages": [{"role": "user", "content": "other"}]}', "twice"),
    "not utf-8": (b'"metadata": {"s": "\xc3\x28"}}', "not UTF-8"),
    "not json": (b'"metadata": }', "not valid JSON"),
}


async def post(http: aiohttp.ClientSession, sc: RunningSidecar, path: str, data: bytes
               ) -> tuple[int, Any]:
    payload = io.BytesIO(data)  # aiohttp warns about large raw bytes bodies
    async with http.post(sc.url + path, data=payload, headers=HEADERS) as r:
        return r.status, await r.json(content_type=None)


@pytest.mark.parametrize("tail, phrase", VARIANTS.values(), ids=VARIANTS.keys())
async def test_a_malformed_body_gets_a_400_in_the_api_shape_and_never_reaches_upstream(
        sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession,
        tail: bytes, phrase: str) -> None:
    status, body = await post(http, sidecar, CHAT, CHAT_HEAD + tail)
    assert status == 400, body
    assert body == {"error": {"message": body["error"]["message"],
                              "type": "invalid_request_error", "param": "body", "code": None}}
    assert phrase in body["error"]["message"]

    status, body = await post(http, sidecar, MESSAGES, MESSAGES_HEAD + tail)
    assert status == 400, body
    assert body == {"type": "error", "error": {"type": "invalid_request_error",
                                               "message": body["error"]["message"]}}
    assert phrase in body["error"]["message"]

    assert sum(fake.calls.values()) == 0
    status, body = await post(http, sidecar, CHAT, CHAT_HEAD + b'"temperature": 0}')
    assert status == 200, body
    assert fake.calls[CHAT] == 1


async def test_a_body_with_a_duplicate_key_cannot_poison_the_entry_of_either_reading(
        sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    """The body that a last-value parser keys as "other" and a first-value upstream answers
    as "hi" is refused, so the entry for "other" holds only an answer to "other"."""
    poisoned = CHAT_HEAD + VARIANTS["duplicate key"][0]
    assert (await post(http, sidecar, CHAT, poisoned))[0] == 400
    honest = {"model": "gpt-test", "messages": [{"role": "user", "content": "other"}]}
    status, _ = await post(http, sidecar, CHAT, json.dumps(honest).encode())
    assert status == 200
    sent = [json.loads(r.body)["messages"][0]["content"] for r in fake.requests_to(CHAT)]
    assert sent == ["other"]  # answered by upstream, not from an entry the other body made


async def test_ten_megabytes_of_brackets_are_refused_quickly(
        sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    started = time.perf_counter()
    status, body = await post(http, sidecar, CHAT, b"[" * 10_000_000)
    assert status == 400, body
    assert "64 deep" in body["error"]["message"]
    assert time.perf_counter() - started < 2.0  # the parse itself: ~0.1 s; the upload the rest
    assert sum(fake.calls.values()) == 0
