"""The memo of prepared requests (cache/request.py): a request repeated byte for byte skips
parsing and keying, and nothing that scopes a key is ever shared between requests that
differ in it."""

from __future__ import annotations

import json
from typing import Any, cast

import pytest
from multidict import CIMultiDict

from promptcache.cache.engine import Engine
from promptcache.cache.errors import RequestError
from promptcache.cache.exact import ExactCache
from promptcache.cache.options import EngineOptions
from promptcache.cache.request import (
    MEMO_BODY_FACTOR,
    MEMO_ENTRY_BYTES,
    MEMO_MAX_BODY,
    PreparedMemo,
    accepts_deflate,
    prepare_http,
)

CHAT = "/v1/chat/completions"


def body(text: str = "hi", **extra: Any) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": text}],
                       **extra}).encode()


@pytest.fixture
def engine() -> Engine:
    """An engine for preparing requests only: nothing here reaches a store."""
    return Engine(EngineOptions(), "redis://unused", ExactCache(cast(Any, None)))


def headers(**values: str) -> CIMultiDict[str]:
    h: CIMultiDict[str] = CIMultiDict({"Authorization": "Bearer sk-alice"})
    for name, value in values.items():
        h[name.replace("_", "-")] = value
    return h


def test_a_repeated_request_is_prepared_once_and_keyed_as_without_the_memo(
        engine: Engine) -> None:
    memo = PreparedMemo()
    first = prepare_http(engine, CHAT, body(), headers(), memo=memo)
    again = prepare_http(engine, CHAT, body(), headers(), memo=memo)

    assert again is first and memo.hits == 1
    assert first.key == prepare_http(engine, CHAT, body(), headers()).key


def test_nothing_that_scopes_a_key_is_shared(engine: Engine) -> None:
    memo = PreparedMemo()
    base = prepare_http(engine, CHAT, body(), headers(), memo=memo)
    variants = [
        prepare_http(engine, CHAT, body(), CIMultiDict({"Authorization": "Bearer sk-bob"}),
                     memo=memo),
        prepare_http(engine, CHAT, body(), CIMultiDict(), memo=memo),  # no credential
        prepare_http(engine, CHAT, body(), headers(x_cache_namespace="docs"), memo=memo),
        prepare_http(engine, CHAT, body(), headers(cache_control="max-age=5"), memo=memo),
        prepare_http(engine, CHAT, body(), headers(openai_project="p2"), memo=memo),
        prepare_http(engine, CHAT, body(), headers(), [("api-version", "2")], memo=memo),
        prepare_http(engine, "/v1/completions", json.dumps({"model": "m", "prompt": "hi"})
                     .encode(), headers(), memo=memo),
        prepare_http(engine, CHAT, body(temperature=0.5), headers(), memo=memo),
    ]

    assert memo.hits == 0 and len(memo) == 1 + len(variants)
    # every one keyed apart but the max-age one: it has the same key, other controls
    assert len({base.key.digest, *(p.key.digest for p in variants)}) == len(variants)
    assert variants[3].key == base.key and variants[3] is not base
    assert variants[1].control.no_store and variants[3].control.max_age == 5
    assert base.control.max_age is None and not base.control.no_store


def test_bad_input_is_refused_every_time_and_never_kept(engine: Engine) -> None:
    memo = PreparedMemo()
    for _ in range(3):
        with pytest.raises(RequestError):
            prepare_http(engine, CHAT, b'{"model": "m", "messages": "no"}', headers(),
                         memo=memo)
        with pytest.raises(RequestError):
            prepare_http(engine, CHAT, body(), headers(x_cache_namespace="a\x00b"), memo=memo)
    assert len(memo) == 0


def test_the_memo_stays_within_its_bytes_least_recently_used_out_first(
        engine: Engine) -> None:
    one = len(body("x" * 100)) * MEMO_BODY_FACTOR + MEMO_ENTRY_BYTES
    memo = PreparedMemo(max_bytes=3 * one)
    for n in range(3):
        prepare_http(engine, CHAT, body(f"{n}" + "x" * 99), headers(), memo=memo)
    prepare_http(engine, CHAT, body("0" + "x" * 99), headers(), memo=memo)  # 0 used again
    prepare_http(engine, CHAT, body("3" + "x" * 99), headers(), memo=memo)  # 1 goes

    assert len(memo) == 3 and memo.nbytes <= memo.max_bytes
    hits = memo.hits
    prepare_http(engine, CHAT, body("0" + "x" * 99), headers(), memo=memo)
    assert memo.hits == hits + 1
    prepare_http(engine, CHAT, body("1" + "x" * 99), headers(), memo=memo)
    assert memo.hits == hits + 1  # it had gone

    big = body("y" * MEMO_MAX_BODY)
    prepare_http(engine, CHAT, big, headers(), memo=PreparedMemo())
    roomy = PreparedMemo()
    prepare_http(engine, CHAT, big, headers(), memo=roomy)
    assert len(roomy) == 0  # a long body is prepared, not kept


@pytest.mark.parametrize(("value", "takes"), [
    (None, False), ("", False), ("gzip, deflate", True), ("DEFLATE", True), ("*", True),
    ("deflate;q=0", False), ("deflate; q=0.5", True), ("deflate;q=nonsense", False),
    ("gzip;q=1, *;q=0", False), ("br,,,;;q=,deflate", True), ("identity", False),
    ("x" * 8000 + ",deflate", True), (";;;;", False),
])
def test_accept_encoding_of_any_shape_is_read_without_error(value: str | None,
                                                             takes: bool) -> None:
    assert accepts_deflate(value) is takes
