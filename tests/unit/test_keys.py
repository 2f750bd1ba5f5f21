"""Canonical request -> cache key (cache/keys.py) and request body checks (cache/validate.py)."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from typing import Any

import pytest

from promptcache.cache.errors import RequestError
from promptcache.cache.keys import (
    MAX_NAMESPACE_LEN,
    SHARED_TENANT,
    CacheKey,
    canonical_json,
    check_namespace,
    request_key,
    tenant_id,
)
from promptcache.cache.redis.layout import KeyLayout, namespace_id
from promptcache.cache.validate import validate_body

CHAT = "/v1/chat/completions"
TENANT = tenant_id("sk-test")


def chat_body() -> dict[str, Any]:
    """A two-turn chat request: the baseline every variation below is compared with."""
    return {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Italy?"},
        ],
    }


def digest(body: dict[str, Any], **scope: str) -> str:
    scope.setdefault("tenant", TENANT)
    endpoint = scope.pop("endpoint", CHAT)
    return request_key(endpoint, body, **scope).digest


# =============================================================================================
# canonical_json
# =============================================================================================


def test_canonical_json_ignores_key_order_at_every_depth() -> None:
    a = {"b": 1, "a": {"y": [1, {"q": 1, "p": 2}], "x": 2}}
    b = {"a": {"x": 2, "y": [1, {"p": 2, "q": 1}]}, "b": 1}
    assert canonical_json(a) == canonical_json(b)


def test_canonical_json_ignores_insignificant_whitespace() -> None:
    compact = json.loads('{"model":"m","messages":[{"role":"user","content":"hi"}]}')
    spaced = json.loads(
        '{\n  "model" : "m",\n  "messages" : [ { "role":"user", "content":"hi" } ]\n}'
    )
    assert canonical_json(compact) == canonical_json(spaced)
    assert b" " not in canonical_json(spaced)


def test_canonical_json_treats_integral_floats_as_ints() -> None:
    assert canonical_json({"temperature": 1.0}) == canonical_json({"temperature": 1})
    assert canonical_json({"t": [2.0, {"u": 0.0}]}) == canonical_json({"t": [2, {"u": 0}]})


def test_canonical_json_keeps_fractional_floats_distinct() -> None:
    assert canonical_json({"temperature": 0.5}) != canonical_json({"temperature": 0})
    assert canonical_json({"temperature": 0.5}) != canonical_json({"temperature": 1})
    assert canonical_json({"temperature": 0.5}) == b'{"temperature":0.5}'


def test_canonical_json_keeps_booleans_distinct_from_numbers() -> None:
    assert canonical_json({"logprobs": True}) != canonical_json({"logprobs": 1})
    assert canonical_json({"logprobs": False}) != canonical_json({"logprobs": 0})


def test_canonical_json_keeps_whitespace_inside_strings() -> None:
    assert canonical_json({"c": "hello world"}) != canonical_json({"c": "hello  world"})
    assert canonical_json({"c": "hi"}) != canonical_json({"c": "hi "})
    assert canonical_json({"c": "a\nb"}) != canonical_json({"c": "a b"})


def test_canonical_json_keeps_unicode_as_utf8() -> None:
    out = canonical_json({"c": "Grüß dich, 世界 🙂"})
    assert out == '{"c":"Grüß dich, 世界 🙂"}'.encode()
    # Differently normalised unicode (NFC vs NFD) is a different prompt: kept apart.
    assert canonical_json({"c": "\u00e9"}) != canonical_json({"c": "e\u0301"})


def test_canonical_json_refuses_nan() -> None:
    with pytest.raises(ValueError):
        canonical_json({"temperature": float("nan")})


# =============================================================================================
# request_key
# =============================================================================================


def test_identical_bodies_have_the_same_digest() -> None:
    assert digest(chat_body()) == digest(chat_body())


def test_body_serialisation_does_not_change_the_digest() -> None:
    """The same request parsed from differently ordered, spaced and typed JSON keys alike."""
    a = json.loads('{"model":"m","temperature":1,"messages":[{"role":"user","content":"x"}]}')
    b = json.loads(
        '{ "messages": [ {"content": "x", "role": "user"} ],\n "temperature": 1.0, "model": "m" }'
    )
    assert digest(a) == digest(b)


def test_digest_is_32_hex_characters_and_key_carries_its_scope() -> None:
    key = request_key(CHAT, chat_body(), tenant=TENANT, namespace="team-a")
    assert isinstance(key, CacheKey)
    assert re.fullmatch(r"[0-9a-f]{32}", key.digest)
    assert (key.tenant, key.namespace, key.endpoint) == (TENANT, "team-a", CHAT)


@pytest.mark.parametrize(
    "transport",
    [
        {"stream": True},
        {"stream": False},
        {"stream": True, "stream_options": {"include_usage": True}},
    ],
    ids=["stream-true", "stream-false", "stream-options"],
)
def test_transport_fields_do_not_change_the_digest(transport: dict[str, Any]) -> None:
    assert digest(chat_body() | transport) == digest(chat_body())


def _set(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        body[field] = value

    return change


def _edit_message(index: int, **fields: Any) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        body["messages"][index].update(fields)

    return change


def _add_system(body: dict[str, Any]) -> None:
    body["messages"].insert(0, {"role": "system", "content": "You are terse."})


def _drop_earlier_turn(body: dict[str, Any]) -> None:
    del body["messages"][:2]


def _change_earlier_turn(body: dict[str, Any]) -> None:
    body["messages"][1]["content"] = "Paris, of course."


def _multipart_content(body: dict[str, Any]) -> None:
    last = body["messages"][-1]
    last["content"] = [{"type": "text", "text": last["content"]}]


def _assistant_tool_calls(body: dict[str, Any]) -> None:
    body["messages"][1]["tool_calls"] = [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "capital", "arguments": '{"country":"France"}'},
        }
    ]


def _tool_result(body: dict[str, Any]) -> None:
    body["messages"].insert(2, {"role": "tool", "tool_call_id": "call_1", "content": "Paris"})


_TOOLS = [
    {
        "type": "function",
        "function": {"name": "capital", "parameters": {"type": "object", "properties": {}}},
    }
]

GENERATION_CHANGES: dict[str, Callable[[dict[str, Any]], None]] = {
    "temperature": _set("temperature", 0.7),
    "top_p": _set("top_p", 0.9),
    "max_tokens": _set("max_tokens", 16),
    "max_completion_tokens": _set("max_completion_tokens", 16),
    "stop": _set("stop", ["\n"]),
    "seed": _set("seed", 42),
    "n": _set("n", 2),
    "tools": _set("tools", _TOOLS),
    "tool_choice": _set("tool_choice", "required"),
    "response_format": _set("response_format", {"type": "json_object"}),
    "presence_penalty": _set("presence_penalty", 0.5),
    "frequency_penalty": _set("frequency_penalty", 0.5),
    "logit_bias": _set("logit_bias", {"50256": -100}),
    "logprobs": _set("logprobs", True),
    "top_logprobs": _set("top_logprobs", 3),
    "model": _set("model", "gpt-4o"),
    "system-message": _add_system,
    "earlier-turn-dropped": _drop_earlier_turn,
    "earlier-turn-changed": _change_earlier_turn,
    "message-name": _edit_message(0, name="alice"),
    "multipart-content": _multipart_content,
    "assistant-tool-calls": _assistant_tool_calls,
    "tool-result-message": _tool_result,
}


@pytest.mark.parametrize("change", GENERATION_CHANGES.values(), ids=GENERATION_CHANGES.keys())
def test_every_generation_parameter_changes_the_digest(
    change: Callable[[dict[str, Any]], None],
) -> None:
    changed = copy.deepcopy(chat_body())
    change(changed)
    assert changed != chat_body()  # the variation really changed the body
    assert digest(changed) != digest(chat_body())


def test_generation_parameter_value_changes_the_digest() -> None:
    """Not only the presence of a parameter: each value keys differently."""
    digests = {digest(chat_body() | {"temperature": t}) for t in (0, 0.2, 0.5, 1, 1.5)}
    assert len(digests) == 5


def test_different_tenant_gives_a_different_digest() -> None:
    assert digest(chat_body(), tenant=tenant_id("sk-a")) != digest(
        chat_body(), tenant=tenant_id("sk-b")
    )


def test_different_namespace_gives_a_different_digest() -> None:
    default = digest(chat_body())
    a = digest(chat_body(), namespace="a")
    b = digest(chat_body(), namespace="b")
    assert len({default, a, b}) == 3


def test_different_endpoint_gives_a_different_digest() -> None:
    body = {"model": "m", "input": "hello"}
    assert digest(body, endpoint="/v1/embeddings") != digest(body, endpoint="/v1/completions")


def test_scope_parts_cannot_be_shifted_between_tenant_and_namespace() -> None:
    """Fields are delimited, so ("ab", "") and ("a", "b") never collide."""
    assert digest(chat_body(), tenant="ab", namespace="") != digest(
        chat_body(), tenant="a", namespace="b"
    )


# =============================================================================================
# tenants and namespaces
# =============================================================================================


def test_tenant_id_differs_for_different_credentials() -> None:
    assert tenant_id("Bearer sk-a") != tenant_id("Bearer sk-b")


def test_tenant_id_is_stable_for_the_same_credential() -> None:
    assert tenant_id("Bearer sk-a") == tenant_id("Bearer sk-a")


def test_tenant_id_does_not_contain_the_credential() -> None:
    assert "sk-secret" not in tenant_id("Bearer sk-secret")


def test_shared_tenant_is_the_same_for_every_credential() -> None:
    shared = {tenant_id(c, shared=True) for c in ("Bearer sk-a", "Bearer sk-b", None, "")}
    assert shared == {SHARED_TENANT}
    assert tenant_id("Bearer sk-a", shared=True) != tenant_id("Bearer sk-a")


@pytest.mark.parametrize("name", ["", "team-a", "a*b?[c]", "ns:with:colons", "世界"])
def test_namespace_id_is_glob_safe_hex(name: str) -> None:
    assert re.fullmatch(r"[0-9a-f]{16}", namespace_id(name))


def test_namespace_id_differs_between_namespaces() -> None:
    assert namespace_id("a") != namespace_id("b")
    assert namespace_id("") != namespace_id("a")


def test_redis_key_pattern_matches_own_namespace_only() -> None:
    key = request_key(CHAT, chat_body(), tenant=TENANT, namespace="a*")
    layout = KeyLayout("pc:")
    redis_key = layout.entry(key.namespace, key.digest)
    assert redis_key == layout.entry("a*", key.digest)
    assert redis_key.startswith("pc:e:")
    assert "*" not in redis_key  # the caller's glob characters never reach SCAN
    pattern, vectors = layout.patterns("a*")
    assert vectors.startswith("pc:v:") and "*" not in vectors.removesuffix("*")
    assert redis_key.startswith(pattern.removesuffix("*"))
    assert not layout.entry("ab", key.digest).startswith(pattern.removesuffix("*"))


@pytest.mark.parametrize("value", ["", "team-a", "Team A/prod v2", "x" * MAX_NAMESPACE_LEN])
def test_check_namespace_accepts_printable_names_up_to_the_limit(value: str) -> None:
    assert check_namespace(value) == value


@pytest.mark.parametrize(
    "value",
    ["x" * (MAX_NAMESPACE_LEN + 1), "a\nb", "tab\there", "nul\0", "\x7f"],
    ids=["too-long", "newline", "tab", "nul", "del"],
)
def test_check_namespace_rejects_long_or_unprintable_names(value: str) -> None:
    with pytest.raises(RequestError) as info:
        check_namespace(value)
    assert info.value.status == 400
    assert info.value.param == "X-Cache-Namespace"


# =============================================================================================
# validate_body
# =============================================================================================


WELL_FORMED: list[tuple[str, dict[str, Any]]] = [
    ("chat", chat_body()),
    (
        "chat",
        chat_body()
        | {
            "temperature": 0,
            "top_p": 1.0,
            "max_tokens": 10,
            "stop": "\n",
            "stream": True,
            "stream_options": {"include_usage": True},
            "tools": _TOOLS,
            "logprobs": True,
            "seed": 1,
        },
    ),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": [{"type": "text"}]}]}),
    ("chat", {"model": "m", "messages": [{"role": "assistant", "content": None}]}),
    ("completions", {"model": "m", "prompt": "Once upon a time", "logprobs": 5}),
    ("completions", {"model": "m", "prompt": ["a", "b"], "stop": ["x", "y"]}),
    ("embeddings", {"model": "text-embedding-3-small", "input": "hello"}),
    ("embeddings", {"input": ["a", "b"]}),
    (
        "messages",
        {
            "model": "claude-3-5-haiku",
            "max_tokens": 100,
            "system": "be brief",
            "messages": [{"role": "user", "content": "hi"}],
            "stop_sequences": ["END"],
            "top_k": 5,
        },
    ),
]


@pytest.mark.parametrize(("api", "body"), WELL_FORMED)
def test_validate_body_accepts_well_formed_bodies(api: Any, body: dict[str, Any]) -> None:
    before = copy.deepcopy(body)
    assert validate_body(api, body) is body
    assert body == before  # checked, never rewritten


BAD: list[tuple[str, str, Any, str]] = [
    # (case id, api, body, the param the error must name)
    ("list-body", "chat", [{"role": "user"}], "body"),
    ("string-body", "chat", "hello", "body"),
    ("null-body", "embeddings", None, "body"),
    ("messages-missing", "chat", {"model": "m"}, "messages"),
    ("messages-not-list", "chat", {"model": "m", "messages": "hi"}, "messages"),
    ("messages-empty", "chat", {"model": "m", "messages": []}, "messages"),
    ("anthropic-messages-empty", "messages", {"model": "m", "messages": []}, "messages"),
    ("message-not-object", "chat", {"model": "m", "messages": ["hi"]}, "messages[0]"),
    (
        "message-without-role",
        "chat",
        {"model": "m", "messages": [{"role": "user", "content": "a"}, {"content": "b"}]},
        "messages[1].role",
    ),
    (
        "content-number",
        "chat",
        {"model": "m", "messages": [{"role": "user", "content": 5}]},
        "messages[0].content",
    ),
    ("model-missing", "chat", {"messages": [{"role": "user", "content": "x"}]}, "model"),
    ("temperature-string", "chat", chat_body() | {"temperature": "0.5"}, "temperature"),
    ("temperature-bool", "chat", chat_body() | {"temperature": True}, "temperature"),
    ("top_p-nan", "chat", chat_body() | {"top_p": float("nan")}, "top_p"),
    ("max_tokens-float", "chat", chat_body() | {"max_tokens": 10.0}, "max_tokens"),
    ("max_tokens-bool", "chat", chat_body() | {"max_tokens": True}, "max_tokens"),
    ("max_tokens-bool-anthropic", "messages", chat_body() | {"max_tokens": False}, "max_tokens"),
    ("n-string", "chat", chat_body() | {"n": "2"}, "n"),
    ("stream-string", "chat", chat_body() | {"stream": "true"}, "stream"),
    ("stream-string-anthropic", "messages", chat_body() | {"stream": "yes"}, "stream"),
    ("stream-int-completions", "completions", {"model": "m", "prompt": "p", "stream": 1},
     "stream"),
    ("stream_options-list", "chat", chat_body() | {"stream_options": []}, "stream_options"),
    ("logprobs-int-chat", "chat", chat_body() | {"logprobs": 1}, "logprobs"),
    ("stop-int", "chat", chat_body() | {"stop": 5}, "stop"),
    ("stop-list-of-ints", "chat", chat_body() | {"stop": [1, 2]}, "stop"),
    ("stop_sequences-string", "messages", chat_body() | {"stop_sequences": "END"},
     "stop_sequences"),
    ("tools-object", "chat", chat_body() | {"tools": {"type": "function"}}, "tools"),
    ("tools-string", "messages", chat_body() | {"tools": "none"}, "tools"),
    ("functions-object", "chat", chat_body() | {"functions": {}}, "functions"),
    ("prompt-missing", "completions", {"model": "m"}, "prompt"),
    ("prompt-number", "completions", {"model": "m", "prompt": 3}, "prompt"),
    ("input-missing", "embeddings", {"model": "m"}, "input"),
    ("input-number", "embeddings", {"model": "m", "input": 3}, "input"),
    ("embeddings-model-not-string", "embeddings", {"model": 1, "input": "x"}, "model"),
]


@pytest.mark.parametrize(
    ("api", "body", "param"), [c[1:] for c in BAD], ids=[c[0] for c in BAD]
)
def test_validate_body_rejects_bad_bodies_with_400_naming_the_field(
    api: Any, body: Any, param: str
) -> None:
    with pytest.raises(RequestError) as info:
        validate_body(api, body)
    assert info.value.status == 400
    assert info.value.param == param
    assert info.value.message  # a human-readable reason for the client
