"""Scope: everything but the wording of the final user message must match."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from promptcache.cache.semantic.record import VectorRecord, vector_id
from promptcache.cache.semantic.scope import semantic_view, temperature

T, NS = "tenant", ""


def view(body: dict[str, Any], api: Any = "chat", tenant: str = T, ns: str = NS) -> Any:
    return semantic_view(api, "/v1/chat/completions", body, tenant=tenant, namespace=ns)


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}], **extra}


def test_only_the_final_user_text_is_outside_the_scope() -> None:
    a, b = view(chat("How do I reset my password?")), view(chat("Reset my password how?"))
    assert a.scope == b.scope and a.text != b.text
    assert view(chat("x", stream=True)).scope == view(chat("y")).scope


@pytest.mark.parametrize("change", [
    {"model": "other"}, {"temperature": 0.5}, {"top_p": 0.9}, {"seed": 1},
    {"tools": [{"type": "function", "function": {"name": "f"}}]}, {"n": 2},
    {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "x"}]},
    {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                  {"role": "user", "content": "x"}]},
    {"messages": [{"role": "user", "name": "bob", "content": "x"}]},
])
def test_anything_else_changes_the_scope(change: dict[str, Any]) -> None:
    assert view({**chat("x"), **change}).scope != view(chat("x")).scope


def test_tenant_namespace_and_endpoint_change_the_scope() -> None:
    base = view(chat("x")).scope
    assert view(chat("x"), tenant="other").scope != base
    assert view(chat("x"), ns="n").scope != base
    other = semantic_view("chat", "/v1/messages", chat("x"), tenant=T, namespace=NS)
    assert other is not None and other.scope != base


@pytest.mark.parametrize("body", [
    {"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:x"}}]}]},
    {"model": "m", "messages": [{"role": "assistant", "content": "x"}]},
    {"model": "m", "messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]},
    {"model": "m", "messages": [{"role": "user", "content": "   "}]},
])
def test_non_text_final_turns_get_no_view(body: dict[str, Any]) -> None:
    assert view(body) is None


def test_text_parts_are_joined_and_completions_use_the_prompt() -> None:
    parts = chat("")
    parts["messages"][0]["content"] = [{"type": "text", "text": "a"},
                                       {"type": "text", "text": "b"}]
    assert view(parts).text == "a\nb"
    v = semantic_view("completions", "/v1/completions", {"model": "m", "prompt": "hi"},
                      tenant=T, namespace=NS)
    assert v is not None and v.text == "hi"
    assert semantic_view("completions", "/v1/completions", {"model": "m", "prompt": ["a"]},
                         tenant=T, namespace=NS) is None
    assert semantic_view("embeddings", "/v1/embeddings", {"model": "m", "input": "a"},
                         tenant=T, namespace=NS) is None


def test_temperature_defaults_to_one() -> None:
    assert temperature({}) == 1.0 and temperature({"temperature": 0}) == 0.0


def test_vector_records_round_trip_in_half_precision() -> None:
    v = np.random.default_rng(0).normal(size=384).astype(np.float32)
    v /= np.linalg.norm(v)
    rec = VectorRecord("s" * 32, "text", v, "ns", "d" * 32, "model-a")
    data = rec.encode()
    back = VectorRecord.decode(data)
    assert len(data) < 384 * 2 + 200
    assert (back.scope, back.text, back.namespace, back.digest, back.model) == (
        "s" * 32, "text", "ns", "d" * 32, "model-a")
    assert float(np.dot(back.vector, v)) > 0.9999
    assert vector_id("f" * 32) == int("f" * 15, 16) < 2**63
