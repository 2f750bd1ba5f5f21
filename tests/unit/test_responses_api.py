"""The Responses API in the engine, without servers: its event stream assembled and replayed
(every item kind), its semantic text and scope, its validation, and what passes through."""

from __future__ import annotations

import json
from typing import Any

import pytest

from promptcache.cache.errors import RequestError
from promptcache.cache.request import stateful
from promptcache.cache.semantic.scope import semantic_view
from promptcache.cache.sse import SSEEvent, SSEParser, assembler_for, replay
from promptcache.cache.validate import validate_body

RICH: dict[str, Any] = {
    "id": "resp_1", "object": "response", "created_at": 1, "status": "completed",
    "completed_at": 2, "error": None, "incomplete_details": None, "model": "m",
    "output": [
        {"id": "rs_1", "type": "reasoning", "summary": [
            {"type": "summary_text", "text": "First I think about it. " * 3},
            {"type": "summary_text", "text": "Then I answer."}]},
        {"id": "ws_1", "type": "web_search_call", "status": "completed",
         "action": {"type": "search", "query": "q"}},
        {"id": "msg_1", "type": "message", "status": "completed", "role": "assistant",
         "content": [
             {"type": "output_text", "text": "Paris is the capital of France, see the link.",
              "annotations": [{"type": "url_citation", "start_index": 0, "end_index": 5,
                               "title": "Paris", "url": "https://example.com"}],
              "logprobs": []},
             {"type": "refusal", "refusal": "I will not say more."}]},
        {"id": "fc_1", "type": "function_call", "status": "completed", "call_id": "call_1",
         "name": "lookup", "arguments": json.dumps({"city": "Paris", "days": 3})},
    ],
    "usage": {"input_tokens": 5, "output_tokens": 20, "total_tokens": 25},
}  # fmt: skip


def events_of(frames: list[bytes]) -> list[SSEEvent]:
    parser = SSEParser()
    return [e for frame in frames for e in parser.feed(frame)]


def assemble(frames: list[bytes]) -> tuple[bool, bool, dict[str, Any] | None]:
    asm = assembler_for("responses")
    for event in events_of(frames):
        asm.add(event)
    return asm.complete, asm.failed, asm.result() if asm.complete else None


def test_a_replay_assembles_back_to_the_response() -> None:
    assert assemble(list(replay("responses", RICH, chunk_chars=4))) == (True, False, RICH)


def test_a_replay_has_the_apis_structure() -> None:
    events = events_of(list(replay("responses", RICH, chunk_chars=8)))
    data = [json.loads(e.data) for e in events]
    assert [d["type"] for d in data] == [e.event for e in events]
    assert [d["sequence_number"] for d in data] == list(range(len(data)))
    assert data[0]["response"]["output"] == [] and data[0]["response"]["usage"] is None
    assert data[0]["response"]["status"] == "in_progress"
    folded: list[str] = []
    for d in data:
        if not (folded and d["type"] == folded[-1] and d["type"].endswith(".delta")):
            folded.append(d["type"])
    assert folded == [
        "response.created", "response.in_progress",
        "response.output_item.added",
        "response.reasoning_summary_part.added", "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.done", "response.reasoning_summary_part.done",
        "response.reasoning_summary_part.added", "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.done", "response.reasoning_summary_part.done",
        "response.output_item.done",
        "response.output_item.added", "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added", "response.output_text.delta",
        "response.output_text.annotation.added", "response.output_text.done",
        "response.content_part.done",
        "response.content_part.added", "response.refusal.delta", "response.refusal.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed",
    ]  # fmt: skip
    deltas = [d for d in data if d["type"] == "response.output_text.delta"]
    assert len(deltas) > 3 and {d["item_id"] for d in deltas} == {"msg_1"}
    text = RICH["output"][2]["content"][0]["text"]
    assert "".join(d["delta"] for d in deltas) == text
    args = "".join(d["delta"] for d in data
                   if d["type"] == "response.function_call_arguments.delta")
    assert args == RICH["output"][3]["arguments"]
    added = [d["item"] for d in data if d["type"] == "response.output_item.added"]
    assert added[2]["content"] == [] and added[3]["arguments"] == ""
    assert {a["status"] for a in added if "status" in a} == {"in_progress"}


def test_an_incomplete_response_ends_with_response_incomplete() -> None:
    cut = {**RICH, "status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"}}
    frames = list(replay("responses", cut))
    assert events_of(frames)[-1].event == "response.incomplete"
    assert assemble(frames) == (True, False, cut)


def test_a_large_answer_replays_in_a_bounded_number_of_frames() -> None:
    big = {**RICH, "output": [{**RICH["output"][2], "content": [
        {"type": "output_text", "text": "word " * 100_000, "annotations": []}]}]}
    frames = list(replay("responses", big))
    assert len(frames) < 600 and assemble(frames)[2] == big


def frame(kind: str, **fields: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n".encode()


def test_a_terminal_event_without_output_takes_the_finished_items() -> None:
    item = RICH["output"][3]
    frames = [frame("response.created", response={**RICH, "output": []}),
              frame("response.output_item.done", output_index=0, item=item),
              frame("response.completed", response={**RICH, "output": []})]
    assert assemble(frames)[2] == {**RICH, "output": [item]}


@pytest.mark.parametrize("end", [
    frame("response.failed", response={**RICH, "status": "failed"}),
    frame("error", code="server_error", message="boom"),
    frame("response.completed", response="not an object"),
    b"event: response.completed\ndata: {not json\n\n",
])
def test_a_failed_or_malformed_stream_is_never_complete(end: bytes) -> None:
    frames = [frame("response.created", response={**RICH, "output": []}), end,
              frame("response.completed", response=RICH)]
    complete, failed, _ = assemble(frames)
    assert not complete and failed


def view(body: dict[str, Any]) -> Any:
    return semantic_view("responses", "/v1/responses", {"model": "m", **body}, tenant="t",
                         namespace="")


def test_the_semantic_text_is_the_final_user_input() -> None:
    assert view({"input": "Hello there"}).text == "Hello there"
    parts = [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]
    assert view({"input": [{"role": "user", "content": parts}]}).text == "a\nb"
    messages = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "ok"},
                {"type": "message", "role": "user", "content": "two"}]
    assert view({"input": messages}).text == "two"


@pytest.mark.parametrize("items", [
    [{"role": "assistant", "content": "hi"}],
    [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}],
    [{"type": "function_call_output", "call_id": "c", "output": "42"}],
    [],
])
def test_a_final_item_that_is_not_user_text_has_no_view(items: list[Any]) -> None:
    assert view({"input": items}) is None


def test_instructions_and_earlier_items_are_in_the_scope() -> None:
    base = view({"input": "How do I reset it?"})
    assert view({"input": "How can I reset it?"}).scope == base.scope
    assert view({"input": "How do I reset it?", "instructions": "Be brief."}).scope != \
        base.scope
    earlier = [{"role": "user", "content": "I use Gmail."}]
    one = view({"input": [*earlier, {"role": "user", "content": "How do I reset it?"}]})
    two = view({"input": [{"role": "user", "content": "How do I reset it?"}]})
    assert one.scope != two.scope


@pytest.mark.parametrize(("body", "expected"), [
    ({"previous_response_id": "resp_1"}, True),
    ({"conversation": "conv_1"}, True),
    ({"conversation": {"id": "conv_1"}}, True),
    ({"background": True}, True),
    ({"background": False, "store": True, "previous_response_id": None}, False),
])
def test_requests_on_upstream_state_are_stateful(body: dict[str, Any], expected: bool) -> None:
    assert stateful("responses", {"model": "m", "input": "x", **body}) is expected
    assert not stateful("chat", body)


def test_a_stored_prompt_may_stand_in_for_the_model() -> None:
    validate_body("responses", {"prompt": {"id": "pmpt_1"}, "input": "x"})
    with pytest.raises(RequestError) as info:
        validate_body("responses", {"input": "x"})
    assert info.value.param == "model"
