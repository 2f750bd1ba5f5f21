"""``POST /v1/responses`` through the sidecar: cached plain and streamed (the typed event
stream replayed with its structure), keyed on what changes the answer, passed through when
the answer depends on state the upstream keeps, and matched by meaning on the final input."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from promptcache.cache.sse import SSEEvent
from promptcache.testing import FakeUpstream
from tests.sidecar.test_semantic import vectors_attached
from tests.sidecar.test_sidecar_exact import assembled, post, stream
from tests.support.sidecars import RunningSidecar

RESPONSES = "/v1/responses"
Q = "How do I reset my password?"
PARAPHRASE = "How can I reset my password?"
TOOL = {"type": "function", "name": "lookup", "parameters": {"type": "object"}}


def req(prompt: Any = Q, **params: Any) -> dict[str, Any]:
    return {"model": "gpt-test", "input": prompt, **params}


async def ask(http: aiohttp.ClientSession, sc: RunningSidecar, body: dict[str, Any],
              **headers: str) -> tuple[dict[str, str], dict[str, Any]]:
    status, h, raw = await post(http, sc, body, RESPONSES, headers)
    assert status == 200, raw
    return h, json.loads(raw)


def kinds(events: list[SSEEvent]) -> list[str | None]:
    return [e.event for e in events]


def text_of(events: list[SSEEvent]) -> str:
    return "".join(json.loads(e.data)["delta"] for e in events
                   if e.event == "response.output_text.delta")


def check_stream(events: list[SSEEvent]) -> None:
    """Each event names its type in ``event:`` and ``data.type``; sequence numbers count
    from 0; it starts at response.created and ends at response.completed."""
    data = [json.loads(e.data) for e in events]
    assert [d["type"] for d in data] == kinds(events)
    assert [d["sequence_number"] for d in data] == list(range(len(data)))
    assert kinds(events)[:2] == ["response.created", "response.in_progress"]
    assert kinds(events)[-1] == "response.completed"


def shape(events: list[SSEEvent]) -> list[str | None]:
    """The event types with runs of deltas folded into one: the stream's structure."""
    out: list[str | None] = []
    for kind in kinds(events):
        if not (out and kind == out[-1] and kind is not None and kind.endswith(".delta")):
            out.append(kind)
    return out


async def test_a_plain_request_misses_then_hits(
        sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    h1, first = await ask(http, sidecar, req())
    h2, second = await ask(http, sidecar, req())
    assert (h1["X-Cache"], h2["X-Cache"]) == ("MISS", "HIT")
    assert second == first and first["object"] == "response" and fake.calls[RESPONSES] == 1


async def test_a_stream_is_relayed_stored_and_replayed_with_its_structure(
        sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    h1, live, _ = await stream(http, sidecar, req(), RESPONSES)
    h2, again, _ = await stream(http, sidecar, req(), RESPONSES)
    assert (h1["X-Cache"], h2["X-Cache"]) == ("MISS", "HIT") and fake.calls[RESPONSES] == 1
    check_stream(live)
    check_stream(again)
    assert shape(again) == shape(live)
    assert text_of(again) == text_of(live) and text_of(live)
    assert assembled("responses", again) == assembled("responses", live)


async def test_a_function_call_stream_is_replayed_as_argument_deltas(
        sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    body = req(tools=[TOOL])
    _, live, _ = await stream(http, sidecar, body, RESPONSES)
    h, again, _ = await stream(http, sidecar, body, RESPONSES)
    assert h["X-Cache"] == "HIT" and shape(again) == shape(live)
    assert "response.function_call_arguments.delta" in kinds(again)
    call = assembled("responses", again)["output"][0]
    assert call["type"] == "function_call" and call["name"] == "lookup"
    assert json.loads(call["arguments"])["query"] == Q


async def test_plain_and_streamed_calls_share_one_entry(
        sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    """Stored by a plain call, replayed to a streaming one; and the other way round."""
    _, plain = await ask(http, sidecar, req())
    h, events, _ = await stream(http, sidecar, req(), RESPONSES)
    assert h["X-Cache"] == "HIT" and assembled("responses", events) == plain
    check_stream(events)
    _, live, _ = await stream(http, sidecar, req("Another question"), RESPONSES)
    h, body = await ask(http, sidecar, req("Another question"))
    assert h["X-Cache"] == "HIT" and body == assembled("responses", live)
    assert fake.calls[RESPONSES] == 2


@pytest.mark.parametrize("changed", [
    {"instructions": "Answer as a pirate."},
    {"tools": [TOOL]},
    {"tools": [TOOL], "tool_choice": "none"},
    {"text": {"format": {"type": "json_object"}}},
    {"reasoning": {"effort": "high"}},
    {"temperature": 0.2},
    {"input": [{"role": "user", "content": Q}]},
    {"input": [{"role": "user", "content": [{"type": "input_text", "text": Q}]}]},
    {"store": False},
])
async def test_what_changes_the_answer_changes_the_key(
        sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession,
        changed: dict[str, Any]) -> None:
    h1, _ = await ask(http, sidecar, req(tools=[TOOL]) if "tool_choice" in changed else req())
    h2, _ = await ask(http, sidecar, {**req(), **changed})
    assert (h1["X-Cache"], h2["X-Cache"]) == ("MISS", "MISS")
    assert h1["X-Cache-Key"] != h2["X-Cache-Key"] and fake.calls[RESPONSES] == 2


async def test_stream_flags_are_not_part_of_the_key(
        sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    await ask(http, sidecar, req())
    h, _, _ = await stream(http, sidecar, req(stream_options={"include_obfuscation": False}),
                           RESPONSES)
    assert h["X-Cache"] == "HIT" and fake.calls[RESPONSES] == 1


@pytest.mark.parametrize("stateful", [
    {"previous_response_id": "resp_earlier"},
    {"conversation": "conv_123"},
    {"conversation": {"id": "conv_123"}},
    {"background": True},
])
async def test_requests_on_upstream_state_pass_through_uncached(
        sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession,
        stateful: dict[str, Any]) -> None:
    for _ in range(2):
        h, _ = await ask(http, sidecar, req(**stateful))
        assert h["X-Cache"] == "BYPASS"
    assert fake.calls[RESPONSES] == 2
    assert fake.requests[-1].json == req(**stateful)


async def test_a_stateful_stream_is_relayed_uncached(
        sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    body = req(previous_response_id="resp_earlier")
    runs = [await stream(http, sidecar, body, RESPONSES) for _ in range(2)]
    assert [h["X-Cache"] for h, _, _ in runs] == ["BYPASS", "BYPASS"]
    assert fake.calls[RESPONSES] == 2
    check_stream(runs[1][1])


async def test_store_is_sent_upstream_as_the_caller_sent_it(
        sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession) -> None:
    _, body = await ask(http, sidecar, req(store=True))
    assert fake.requests[-1].json["store"] is True and body["store"] is True
    await ask(http, sidecar, req(store=False))
    assert fake.requests[-1].json["store"] is False


@pytest.mark.parametrize(("body", "param"), [
    ({"input": Q}, "model"),
    ({"model": "gpt-test", "input": 42}, "input"),
    ({"model": "gpt-test", "input": ["hello"]}, "input[0]"),
    ({"model": "gpt-test", "input": [{"role": 1, "content": "x"}]}, "input[0].role"),
    ({"model": "gpt-test", "input": [{"role": "user", "content": 5}]}, "input[0].content"),
    (req(instructions=["x"]), "instructions"),
    (req(tools={"type": "function"}), "tools"),
    (req(tool_choice=3), "tool_choice"),
    (req(text="json"), "text"),
    (req(reasoning="high"), "reasoning"),
    (req(temperature="hot"), "temperature"),
    (req(max_output_tokens=1.5), "max_output_tokens"),
    (req(store="yes"), "store"),
    (req(background=1), "background"),
    (req(previous_response_id=7), "previous_response_id"),
    (req(stream="yes"), "stream"),
])
async def test_bad_input_is_a_400_in_openai_shape(
        sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession,
        body: dict[str, Any], param: str) -> None:
    status, h, raw = await post(http, sidecar, body, RESPONSES)
    error = json.loads(raw)["error"]
    assert status == 400 and h["X-Cache"] == "BYPASS"
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert fake.calls[RESPONSES] == 0


async def ask_semantic(http: aiohttp.ClientSession, sc: RunningSidecar, body: dict[str, Any]
                       ) -> tuple[dict[str, str], dict[str, Any]]:
    h, doc = await ask(http, sc, {**body, "temperature": 0})
    await vectors_attached(sc)
    return h, doc


@pytest.mark.parametrize("form", ["string", "messages", "parts"])
async def test_a_reworded_final_input_gets_a_semantic_hit(
        semantic_sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession,
        form: str) -> None:
    def body(text: str) -> dict[str, Any]:
        if form == "string":
            return req(text, instructions="Be brief.")
        earlier = [{"role": "user", "content": "I use Gmail."},
                   {"type": "message", "role": "assistant",
                    "content": [{"type": "output_text", "text": "OK."}]}]
        content: Any = text if form == "messages" else [{"type": "input_text", "text": text}]
        return req([*earlier, {"role": "user", "content": content}])

    h1, first = await ask_semantic(http, semantic_sidecar, body(Q))
    h2, second = await ask_semantic(http, semantic_sidecar, body(PARAPHRASE))
    assert (h1["X-Cache"], h2["X-Cache"]) == ("MISS", "SEMANTIC-HIT")
    assert second == first and fake.calls[RESPONSES] == 1


@pytest.mark.parametrize("changed", [
    {"instructions": "Answer as a pirate."},
    {"tools": [TOOL]},
    {"reasoning": {"effort": "high"}},
])
async def test_no_semantic_hit_across_instructions_or_settings(
        semantic_sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession,
        changed: dict[str, Any]) -> None:
    await ask_semantic(http, semantic_sidecar, req(Q, instructions="Be brief."))
    h, _ = await ask_semantic(http, semantic_sidecar,
                              {**req(PARAPHRASE, instructions="Be brief."), **changed})
    assert h["X-Cache"] == "MISS" and fake.calls[RESPONSES] == 2


async def test_a_final_item_that_is_not_user_text_is_matched_exactly_only(
        semantic_sidecar: RunningSidecar, fake: FakeUpstream, http: aiohttp.ClientSession
        ) -> None:
    def body(text: str) -> dict[str, Any]:
        return req([{"role": "user", "content": text},
                    {"type": "function_call_output", "call_id": "call_1", "output": "42"}])

    await ask_semantic(http, semantic_sidecar, body(Q))
    h, _ = await ask_semantic(http, semantic_sidecar, body(PARAPHRASE))
    again, _ = await ask_semantic(http, semantic_sidecar, body(Q))
    assert (h["X-Cache"], again["X-Cache"]) == ("MISS", "HIT")
