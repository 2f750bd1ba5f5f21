"""SSE parsing, stream assembly and replay for the chat, completions and messages APIs."""

from __future__ import annotations

import copy
import json
import random
import time
from typing import Any

import pytest

from promptcache.cache.api import Api
from promptcache.cache.sse import (
    SSEEvent,
    SSEParser,
    assembler_for,
    replay,
)

# =============================================================================================
# Helpers
# =============================================================================================


def parse(chunks: list[bytes]) -> list[SSEEvent]:
    parser = SSEParser()
    events = [event for chunk in chunks for event in parser.feed(chunk)]
    return events + parser.close()


def assemble(api: Api, chunks: list[bytes]) -> dict[str, Any]:
    assembler = assembler_for(api)
    for event in parse(chunks):
        assembler.add(event)
    assert assembler.complete and not assembler.failed
    return assembler.result()


def sse(*frames: str) -> bytes:
    """Frames written as the upstream sends them: each ends with a blank line."""
    return "".join(frame + "\n\n" for frame in frames).encode()


def data(obj: dict[str, Any]) -> str:
    return "data: " + json.dumps(obj)


def named(event: str, obj: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(obj)}"


def delta_frames(frames: list[bytes]) -> list[dict[str, Any]]:
    """The JSON objects of replayed frames, minus the [DONE] terminator."""
    out = []
    for frame in frames:
        [event] = parse([frame])
        if event.data != "[DONE]":
            out.append(json.loads(event.data))
    return out


# =============================================================================================
# Realistic upstream streams (shaped like captured OpenAI / Anthropic / vLLM traffic)
# =============================================================================================

_CHAT_BASE: dict[str, Any] = {
    "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
    "object": "chat.completion.chunk",
    "created": 1741569952,
    "model": "gpt-4o-2024-08-06",
    "service_tier": "default",
    "system_fingerprint": "fp_eb9dce56a8",
}


def _chat_chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return data({**_CHAT_BASE, "choices": [choice], "usage": None, **extra})


OPENAI_TEXT_STREAM = sse(
    _chat_chunk({"role": "assistant", "content": "", "refusal": None}, obfuscation="x1"),
    _chat_chunk({"content": "Hello"}, obfuscation="Zq"),
    _chat_chunk({"content": "! How can I"}, obfuscation="pp8"),
    _chat_chunk({"content": " help ü 🌍?"}, obfuscation="a"),
    _chat_chunk({}, "stop", obfuscation="Kw"),
    data({**_CHAT_BASE, "choices": [], "usage": {
        "prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    }, "obfuscation": "Ajx"}),
    "data: [DONE]",
)  # fmt: skip
OPENAI_TEXT_BODY: dict[str, Any] = {
    "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
    "object": "chat.completion",
    "created": 1741569952,
    "model": "gpt-4o-2024-08-06",
    "service_tier": "default",
    "system_fingerprint": "fp_eb9dce56a8",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Hello! How can I help ü 🌍?",
                "refusal": None,
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 19,
        "completion_tokens": 10,
        "total_tokens": 29,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    },
}

_CALL_A = {"index": 0, "id": "call_DdmO9pD3xa9XTPNJ32zg2hcA", "type": "function"}
_CALL_B = {"index": 1, "id": "call_ABqzTnp9gLT04EXrwTwLVzPe", "type": "function"}
OPENAI_TOOL_STREAM = sse(
    _chat_chunk({"role": "assistant", "content": None, "tool_calls": [
        {**_CALL_A, "function": {"name": "get_weather", "arguments": ""}}], "refusal": None}),
    _chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"lo'}}]}),
    _chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'cation": "Paris"}'}}]}),
    _chat_chunk({"tool_calls": [{**_CALL_B, "function": {"name": "get_time", "arguments": ""}}]}),
    _chat_chunk({"tool_calls": [{"index": 1, "function": {"arguments": '{"tz": "CET"}'}}]}),
    _chat_chunk({}, "tool_calls"),
    "data: [DONE]",
)  # fmt: skip
OPENAI_TOOL_BODY: dict[str, Any] = {
    **{k: v for k, v in OPENAI_TEXT_BODY.items() if k not in ("choices", "usage")},
    "choices": [{
        "index": 0,
        "message": {"role": "assistant", "content": None, "refusal": None, "tool_calls": [
            {"id": _CALL_A["id"], "type": "function",
             "function": {"name": "get_weather", "arguments": '{"location": "Paris"}'}},
            {"id": _CALL_B["id"], "type": "function",
             "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}},
        ]},
        "logprobs": None,
        "finish_reason": "tool_calls",
    }],
}  # fmt: skip

# vLLM serving a reasoning model: reasoning_content deltas, n=2 interleaved, usage on its own.
_VLLM: dict[str, Any] = {
    "id": "chatcmpl-9f2",
    "object": "chat.completion.chunk",
    "created": 1,
    "model": "qwen3",
}
VLLM_STREAM = sse(
    data({**_VLLM, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                "logprobs": None, "finish_reason": None}]}),
    data({**_VLLM, "choices": [{"index": 1, "delta": {"role": "assistant", "content": ""},
                                "logprobs": None, "finish_reason": None}]}),
    data({**_VLLM, "choices": [{"index": 0, "delta": {"reasoning_content": "Think"}}]}),
    data({**_VLLM, "choices": [{"index": 1, "delta": {"content": "B"}}]}),
    data({**_VLLM, "choices": [{"index": 0, "delta": {"reasoning_content": "ing."}}]}),
    data({**_VLLM, "choices": [{"index": 0, "delta": {"content": "A"}}]}),
    data({**_VLLM, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop",
                                "stop_reason": None}]}),
    data({**_VLLM, "choices": [{"index": 1, "delta": {}, "finish_reason": "length",
                                "stop_reason": None}]}),
    data({**_VLLM, "choices": [], "usage": {"prompt_tokens": 3, "total_tokens": 9,
                                            "completion_tokens": 6}}),
    "data: [DONE]",
)  # fmt: skip
VLLM_BODY: dict[str, Any] = {
    "id": "chatcmpl-9f2", "object": "chat.completion", "created": 1, "model": "qwen3",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "A",
                                 "reasoning_content": "Thinking."},
         "logprobs": None, "finish_reason": "stop", "stop_reason": None},
        {"index": 1, "message": {"role": "assistant", "content": "B"},
         "logprobs": None, "finish_reason": "length", "stop_reason": None},
    ],
    "usage": {"prompt_tokens": 3, "total_tokens": 9, "completion_tokens": 6},
}  # fmt: skip

_CMPL: dict[str, Any] = {"id": "cmpl-8Kx", "object": "text_completion", "created": 1700000000,
         "model": "gpt-3.5-turbo-instruct"}  # fmt: skip
COMPLETIONS_STREAM = sse(
    data({**_CMPL, "choices": [{"text": "\n\nThis", "index": 0, "logprobs": None,
                                "finish_reason": None}]}),
    data({**_CMPL, "choices": [{"text": " is a test", "index": 0, "logprobs": None,
                                "finish_reason": None}]}),
    data({**_CMPL, "choices": [{"text": "", "index": 0, "logprobs": None,
                                "finish_reason": "length"}]}),
    "data: [DONE]",
)  # fmt: skip
COMPLETIONS_BODY: dict[str, Any] = {
    **_CMPL,
    "choices": [{"text": "\n\nThis is a test", "index": 0, "logprobs": None,
                 "finish_reason": "length"}],
}  # fmt: skip

_MSG_START: dict[str, Any] = {
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant",
    "model": "claude-sonnet-4-20250514", "content": [], "stop_reason": None,
    "stop_sequence": None,
    "usage": {"input_tokens": 472, "cache_creation_input_tokens": 0,
              "cache_read_input_tokens": 0, "output_tokens": 2, "service_tier": "standard"},
}  # fmt: skip


def _block_delta(index: int, delta: dict[str, Any]) -> str:
    return named("content_block_delta", {"type": "content_block_delta", "index": index,
                                         "delta": delta})  # fmt: skip


ANTHROPIC_STREAM = sse(
    named("message_start", {"type": "message_start", "message": _MSG_START}),
    named("content_block_start", {"type": "content_block_start", "index": 0,
          "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
    named("ping", {"type": "ping"}),
    _block_delta(0, {"type": "thinking_delta", "thinking": "The user wants"}),
    _block_delta(0, {"type": "thinking_delta", "thinking": " the weather."}),
    _block_delta(0, {"type": "signature_delta", "signature": "EqQBCgIYAhIM1gbcDa9GJwZA"}),
    named("content_block_stop", {"type": "content_block_stop", "index": 0}),
    named("content_block_start", {"type": "content_block_start", "index": 1,
          "content_block": {"type": "text", "text": ""}}),
    _block_delta(1, {"type": "text_delta", "text": "Okay, let's check"}),
    _block_delta(1, {"type": "text_delta", "text": " the weather for San Francisco:"}),
    named("content_block_stop", {"type": "content_block_stop", "index": 1}),
    named("content_block_start", {"type": "content_block_start", "index": 2,
          "content_block": {"type": "tool_use", "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
                            "name": "get_weather", "input": {}}}),
    _block_delta(2, {"type": "input_json_delta", "partial_json": ""}),
    _block_delta(2, {"type": "input_json_delta", "partial_json": '{"location":'}),
    _block_delta(2, {"type": "input_json_delta", "partial_json": ' "San Francisco, CA"}'}),
    named("content_block_stop", {"type": "content_block_stop", "index": 2}),
    named("message_delta", {"type": "message_delta", "delta": {
        "stop_reason": "tool_use", "stop_sequence": None}, "usage": {"output_tokens": 89}}),
    named("message_stop", {"type": "message_stop"}),
)  # fmt: skip
ANTHROPIC_BODY: dict[str, Any] = {
    **_MSG_START,
    "content": [
        {"type": "thinking", "thinking": "The user wants the weather.",
         "signature": "EqQBCgIYAhIM1gbcDa9GJwZA"},
        {"type": "text", "text": "Okay, let's check the weather for San Francisco:"},
        {"type": "tool_use", "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "name": "get_weather",
         "input": {"location": "San Francisco, CA"}},
    ],
    "stop_reason": "tool_use",
    "usage": {**_MSG_START["usage"], "output_tokens": 89},
}  # fmt: skip

UPSTREAMS: list[tuple[Api, bytes, dict[str, Any]]] = [
    ("chat", OPENAI_TEXT_STREAM, OPENAI_TEXT_BODY),
    ("chat", OPENAI_TOOL_STREAM, OPENAI_TOOL_BODY),
    ("chat", VLLM_STREAM, VLLM_BODY),
    ("completions", COMPLETIONS_STREAM, COMPLETIONS_BODY),
    ("messages", ANTHROPIC_STREAM, ANTHROPIC_BODY),
]
UPSTREAM_IDS = ["openai-text", "openai-tools", "vllm-n2-reasoning", "completions", "anthropic"]


@pytest.mark.parametrize(("api", "stream", "body"), UPSTREAMS, ids=UPSTREAM_IDS)
def test_upstream_stream_assembles_to_the_non_streaming_body(
    api: Api, stream: bytes, body: dict[str, Any]
) -> None:
    assert assemble(api, [stream]) == body


def test_anthropic_cumulative_message_delta_usage_overrides_start_usage() -> None:
    """Newer message_delta events repeat input/cache counts; non-null values win, nulls don't."""
    usage = {"input_tokens": 500, "cache_read_input_tokens": None, "output_tokens": 90}
    stream = ANTHROPIC_STREAM.replace(b'"usage": {"output_tokens": 89}',
                                      json.dumps({"usage": usage})[1:-1].encode())  # fmt: skip
    result = assemble("messages", [stream])
    assert result["usage"] == {**_MSG_START["usage"], "input_tokens": 500, "output_tokens": 90}


def test_tags_repeated_in_every_delta_are_not_concatenated() -> None:
    """Some OpenAI-compatible servers resend role, tool-call id/type/name in every delta."""
    head = {**_CALL_A, "function": {"name": "get_weather", "arguments": ""}}
    frames = [
        _chat_chunk({"role": "assistant", "content": None, "tool_calls": [head]}),
        _chat_chunk({"role": "assistant", "tool_calls": [
            {**_CALL_A, "function": {"name": "get_weather", "arguments": '{"location": '}}]}),
        _chat_chunk({"role": "assistant", "tool_calls": [
            {**_CALL_A, "function": {"name": "get_weather", "arguments": '"Paris"}'}}]}),
        _chat_chunk({}, "tool_calls"),
        "data: [DONE]",
    ]  # fmt: skip
    message = assemble("chat", [sse(*frames)])["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert message["tool_calls"] == OPENAI_TOOL_BODY["choices"][0]["message"]["tool_calls"][:1]


def test_assembly_is_linear_in_the_number_of_deltas() -> None:
    """40k deltas of 100 chars: joining once copies 4 MB; ``str + str`` per delta would copy
    ~80 GB and take several seconds."""
    assembler = assembler_for("chat")
    assembler.add(SSEEvent(_chat_chunk({"role": "assistant", "content": ""})[6:]))
    piece = SSEEvent(json.dumps({"choices": [{"index": 0, "delta": {"content": "x" * 100}}]}))
    started = time.perf_counter()
    for _ in range(40_000):
        assembler.add(piece)
    assembler.add(SSEEvent("[DONE]"))
    content = assembler.result()["choices"][0]["message"]["content"]
    assert content == "x" * 4_000_000
    assert time.perf_counter() - started < 2


def test_openai_logprobs_content_lists_are_concatenated() -> None:
    token = {"token": "Hi", "logprob": -0.1, "bytes": [72, 105], "top_logprobs": []}
    frames = [
        data({**_CHAT_BASE, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
              "logprobs": {"content": [], "refusal": None}, "finish_reason": None}]}),
        data({**_CHAT_BASE, "choices": [{"index": 0, "delta": {"content": "Hi"},
              "logprobs": {"content": [token], "refusal": None}, "finish_reason": None}]}),
        data({**_CHAT_BASE, "choices": [{"index": 0, "delta": {"content": "Hi"},
              "logprobs": {"content": [token], "refusal": None}, "finish_reason": "stop"}]}),
        "data: [DONE]",
    ]  # fmt: skip
    choice = assemble("chat", [sse(*frames)])["choices"][0]
    assert choice["message"]["content"] == "HiHi"
    assert choice["logprobs"] == {"content": [token, token], "refusal": None}


# =============================================================================================
# Byte splitting
# =============================================================================================

_TRICKY = (
    ": keep-alive comment\r\n"
    "event: custom\r\n"
    "data: first line ü\r\n"
    "data:second line 🌍\r\n"
    "id: 7\r\n"
    "\r\n"
    "data: cr only\r\r"
    "data\n\n"
    "retry: 100\nfoo: bar\ndata:  two spaces\n\n"
).encode()


@pytest.mark.parametrize(
    "stream",
    [OPENAI_TEXT_STREAM, ANTHROPIC_STREAM, _TRICKY, ANTHROPIC_STREAM.replace(b"\n", b"\r\n")],
    ids=["openai", "anthropic", "tricky", "anthropic-crlf"],
)
def test_every_byte_split_gives_the_same_events(stream: bytes) -> None:
    whole = parse([stream])
    assert whole
    for cut in range(len(stream) + 1):
        assert parse([stream[:cut], stream[cut:]]) == whole, cut
    assert parse([stream[i : i + 1] for i in range(len(stream))]) == whole
    rng = random.Random(7)
    for _ in range(50):
        cuts = sorted(rng.sample(range(len(stream)), 6))
        parts = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        assert parse(parts) == whole


def test_parser_follows_the_event_stream_field_rules() -> None:
    assert parse([_TRICKY]) == [
        SSEEvent("first line ü\nsecond line 🌍", "custom"),
        SSEEvent("cr only"),
        SSEEvent(""),
        SSEEvent(" two spaces"),
    ]


def test_empty_chunks_between_cr_and_lf_do_not_add_a_line() -> None:
    stream = "data: a\r\ndata: ü\r\n\r\n".encode()
    chunks = [part for i in range(len(stream)) for part in (stream[i : i + 1], b"")]
    assert parse(chunks) == [SSEEvent("a\nü")]


def test_parser_strips_a_leading_bom_and_skips_events_without_data() -> None:
    assert parse([b"\xef\xbb", b"\xbfdata: x\n\nevent: ping\n\n"]) == [SSEEvent("x")]


def test_parser_discards_an_event_unterminated_at_eof() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: done\n\ndata: [DONE]\n") == [SSEEvent("done")]
    assert parser.close() == []
    assert parser.feed(b"data: again\n\n") == [SSEEvent("again")]


# =============================================================================================
# Incomplete and failed streams
# =============================================================================================


@pytest.mark.parametrize(("api", "stream", "body"), UPSTREAMS, ids=UPSTREAM_IDS)
def test_stream_without_its_terminator_is_not_complete(
    api: Api, stream: bytes, body: dict[str, Any]
) -> None:
    assembler = assembler_for(api)
    for event in parse([stream])[:-1]:
        assembler.add(event)
    assert not assembler.complete and not assembler.failed
    with pytest.raises(ValueError, match="not complete"):
        assembler.result()


@pytest.mark.parametrize(
    ("api", "bad"),
    [
        ("chat", SSEEvent('{"error": {"message": "overloaded", "type": "server_error"}}')),
        ("chat", SSEEvent('{"id": "x", "choices": [')),
        ("chat", SSEEvent("[1, 2]")),
        ("chat", SSEEvent('{"choices": [{"index": 0, "delta": "oops"}]}')),
        ("chat", SSEEvent('{"message": "upstream down"}', "error")),
        ("completions", SSEEvent("not json")),
        ("messages", SSEEvent('{"type": "error", "error": {"type": "overloaded_error"}}', "error")),
        ("messages", SSEEvent("{bad json", "content_block_delta")),
        ("messages", SSEEvent('{"type": "content_block_delta", "index": 9, "delta": {}}')),
        ("messages", SSEEvent(json.dumps({"type": "content_block_delta", "index": 2,
                                          "delta": {"type": "input_json_delta",
                                                    "partial_json": "{oops"}}))),
    ],
)  # fmt: skip
def test_error_or_malformed_event_marks_the_stream_failed(api: Api, bad: SSEEvent) -> None:
    stream = dict((a, s) for a, s, _ in reversed(UPSTREAMS))[api]
    events = parse([stream])
    assembler = assembler_for(api)
    for event in [*events[:-3], bad, *events[-3:]]:
        assembler.add(event)  # never raises
    assert assembler.failed and not assembler.complete
    with pytest.raises(ValueError):
        assembler.result()


def test_events_before_message_start_or_a_bare_done_fail() -> None:
    messages = assembler_for("messages")
    messages.add(SSEEvent('{"type": "message_stop"}', "message_stop"))
    chat = assembler_for("chat")
    chat.add(SSEEvent("[DONE]"))
    assert messages.failed and chat.failed


def test_ping_and_unknown_events_are_ignored() -> None:
    events = parse([ANTHROPIC_STREAM])
    assembler = assembler_for("messages")
    for event in events[:3]:
        assembler.add(event)
    assembler.add(SSEEvent('{"type": "brand_new_event", "x": 1}', "brand_new_event"))
    for event in events[3:]:
        assembler.add(event)
    assert assembler.result() == ANTHROPIC_BODY


def test_result_is_a_copy() -> None:
    assembler = assembler_for("completions")
    for event in parse([COMPLETIONS_STREAM]):
        assembler.add(event)
    assembler.result()["choices"].clear()
    assert assembler.result() == COMPLETIONS_BODY


# =============================================================================================
# Replay
# =============================================================================================

_LONG = "The quick brown fox jumps over the lazy dog; naïve café — 東京 🌍 " * 3
CHAT_REFUSAL = copy.deepcopy(OPENAI_TEXT_BODY)
CHAT_REFUSAL["choices"][0]["message"] = {
    "role": "assistant", "content": None, "refusal": "I'm sorry, I can't help with that request.",
    "annotations": [],
}  # fmt: skip
CHAT_N2 = copy.deepcopy(OPENAI_TEXT_BODY)
CHAT_N2["choices"] = [
    {"index": i, "message": {"role": "assistant", "content": f"{_LONG} #{i}", "refusal": None},
     "logprobs": None, "finish_reason": "stop"}
    for i in range(2)
]  # fmt: skip
CHAT_LOGPROBS = copy.deepcopy(OPENAI_TEXT_BODY)
CHAT_LOGPROBS["choices"][0]["logprobs"] = {
    "content": [{"token": "Hello", "logprob": -0.01, "bytes": [72], "top_logprobs": []}],
    "refusal": None,
}
CHAT_EMPTY = copy.deepcopy(OPENAI_TEXT_BODY)
CHAT_EMPTY["choices"][0]["message"]["content"] = ""
CHAT_EMPTY["choices"][0]["finish_reason"] = "length"
COMPLETIONS_N2: dict[str, Any] = {
    **COMPLETIONS_BODY,
    "system_fingerprint": None,
    "choices": [
        {"text": _LONG, "index": 0, "logprobs": {"tokens": ["The"], "token_logprobs": [-0.5],
                                                 "top_logprobs": None, "text_offset": [0]},
         "finish_reason": "stop"},
        {"text": "", "index": 1, "logprobs": {"tokens": ["a"], "token_logprobs": [-1.0],
                                              "top_logprobs": None, "text_offset": [0]},
         "finish_reason": "length"},
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
}  # fmt: skip
MESSAGES_RICH: dict[str, Any] = {
    **ANTHROPIC_BODY,
    "content": [
        *ANTHROPIC_BODY["content"],
        {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4a"},
        {"type": "text", "text": _LONG, "citations": [
            {"type": "char_location", "cited_text": "fox", "document_index": 0,
             "document_title": None, "start_char_index": 16, "end_char_index": 19}]},
        {"type": "tool_use", "id": "toolu_2", "name": "no_args", "input": {}},
        {"type": "tool_use", "id": "toolu_3", "name": "nested",
         "input": {"a": [1, 2.5, {"b": None}], "t": "日本 " * 20}},
    ],
    "stop_sequence": None,
}  # fmt: skip

ROUND_TRIPS: list[tuple[Api, dict[str, Any]]] = [
    ("chat", OPENAI_TEXT_BODY),
    ("chat", OPENAI_TOOL_BODY | {"usage": OPENAI_TEXT_BODY["usage"]}),
    ("chat", VLLM_BODY),
    ("chat", CHAT_REFUSAL),
    ("chat", CHAT_N2),
    ("chat", CHAT_LOGPROBS),
    ("chat", CHAT_EMPTY),
    ("completions", COMPLETIONS_BODY | {"usage": VLLM_BODY["usage"]}),
    ("completions", COMPLETIONS_N2),
    ("messages", ANTHROPIC_BODY),
    ("messages", MESSAGES_RICH),
]
ROUND_TRIP_IDS = ["text", "tools", "reasoning-n2", "refusal", "n2-long", "logprobs", "empty",
                  "completions", "completions-n2", "messages", "messages-rich"]  # fmt: skip


@pytest.mark.parametrize("chunk_chars", [1, 5, 16, 10_000])
@pytest.mark.parametrize(("api", "body"), ROUND_TRIPS, ids=ROUND_TRIP_IDS)
def test_replay_then_assemble_round_trips(api: Api, body: dict[str, Any], chunk_chars: int) -> None:
    frames = list(replay(api, body, include_usage=True, chunk_chars=chunk_chars))
    assert assemble(api, frames) == body
    assert assemble(api, [b"".join(frames)]) == body


@pytest.mark.parametrize(("api", "body"), ROUND_TRIPS[:-2], ids=ROUND_TRIP_IDS[:-2])
def test_replay_without_include_usage_drops_only_usage(api: Api, body: dict[str, Any]) -> None:
    frames = list(replay(api, body))
    assert assemble(api, frames) == {k: v for k, v in body.items() if k != "usage"}
    assert all(b'"usage"' not in frame for frame in frames)


@pytest.mark.parametrize(("api", "body"), ROUND_TRIPS, ids=ROUND_TRIP_IDS)
def test_replay_sends_several_frames_each_one_event(api: Api, body: dict[str, Any]) -> None:
    frames = list(replay(api, body))
    assert len(frames) >= 3
    for frame in frames:
        assert frame.endswith(b"\n\n") and len(parse([frame])) == 1


def test_replayed_chat_stream_has_the_real_api_structure() -> None:
    body = OPENAI_TOOL_BODY | {"usage": {"prompt_tokens": 1}}
    chunks = delta_frames(list(replay("chat", body, include_usage=True, chunk_chars=4)))
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == body["id"] for c in chunks)
    assert all(c["system_fingerprint"] == "fp_eb9dce56a8" and c["created"] for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks[:-1]]
    assert deltas[0] == {"role": "assistant", "content": None, "refusal": None}
    assert deltas[1]["tool_calls"] == [
        {"index": 0, "id": _CALL_A["id"], "type": "function",
         "function": {"name": "get_weather", "arguments": ""}}
    ]  # fmt: skip
    assert deltas[2]["tool_calls"][0].keys() == {"index", "function"}
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls" and deltas[-1] == {}
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-2]] == [None] * (len(chunks) - 2)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": 1}
    assert all(c["usage"] is None for c in chunks[:-1])


def test_replayed_chat_text_is_split_on_whitespace() -> None:
    chunks = delta_frames(list(replay("chat", CHAT_N2, chunk_chars=16)))
    first = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == 0]
    assert first[0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    pieces = [c["delta"]["content"] for c in first[1:-1]]
    assert "".join(pieces) == CHAT_N2["choices"][0]["message"]["content"]
    assert len(pieces) > 5 and all(0 < len(p) <= 16 for p in pieces)
    assert all(p.endswith(" ") for p in pieces[:-1])  # cut after whitespace, no word is > 16


def test_replayed_messages_stream_has_the_real_api_structure() -> None:
    frames = list(replay("messages", ANTHROPIC_BODY, chunk_chars=8))
    events = [parse([frame])[0] for frame in frames]
    names = [e.event for e in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert all(json.loads(e.data)["type"] == e.event for e in events)
    start = json.loads(events[0].data)["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] == 472 and start["usage"]["output_tokens"] == 1
    assert json.loads(events[-2].data)["usage"] == {"output_tokens": 89}
    blocks = [json.loads(e.data)["content_block"] for e in events if e.event.endswith("start")
              and e.event != "message_start"]  # fmt: skip
    assert blocks[0] == {"type": "thinking", "thinking": "", "signature": ""}
    assert blocks[2]["input"] == {}
    kinds = [
        json.loads(e.data)["delta"]["type"] for e in events if e.event == "content_block_delta"
    ]
    assert kinds.count("signature_delta") == 1 and kinds.count("input_json_delta") > 2
    assert names.count("content_block_stop") == 3


def test_replay_checks_its_arguments_eagerly() -> None:
    with pytest.raises(ValueError):
        replay("chat", OPENAI_TEXT_BODY, chunk_chars=0)
    with pytest.raises(ValueError):
        replay("embeddings", OPENAI_TEXT_BODY)
    with pytest.raises(ValueError):
        assembler_for("embeddings")  # type: ignore[arg-type]


# =============================================================================================
# Against the fake upstream: its streamed and plain answers must assemble to the same body
# =============================================================================================

_TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
FAKE_REQUESTS: list[tuple[Api, str, dict[str, Any]]] = [
    ("chat", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi there"}]}),
    ("chat", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "weather?"}], "n": 2, "tools": [_TOOL]}),
    ("completions", "/v1/completions", {"prompt": ["one", "two"], "n": 2}),
    ("messages", "/v1/messages",
     {"max_tokens": 64, "messages": [{"role": "user", "content": "hello"}]}),
    ("messages", "/v1/messages",
     {"max_tokens": 64, "messages": [{"role": "user", "content": "hello"}],
      "tools": [{"name": "lookup", "input_schema": {"type": "object"}}]}),
    ("responses", "/v1/responses", {"input": "hello", "instructions": "Be brief."}),
    ("responses", "/v1/responses",
     {"input": [{"role": "user", "content": "weather?"}],
      "tools": [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}]}),
]  # fmt: skip


@pytest.mark.parametrize(("api", "path", "payload"), FAKE_REQUESTS)
async def test_fake_upstream_stream_assembles_to_its_plain_answer(
    api: Api, path: str, payload: dict[str, Any]
) -> None:
    import aiohttp

    from promptcache.testing import running_fake_upstream

    streamed = {**payload, "stream": True, "stream_options": {"include_usage": True}}
    if api in ("messages", "responses"):
        del streamed["stream_options"]
    async with running_fake_upstream() as fake, aiohttp.ClientSession() as session:
        async with session.post(fake.url + path, json=payload) as resp:
            plain = await resp.json()
        async with session.post(fake.url + path, json=streamed) as resp:
            chunks = [chunk async for chunk in resp.content.iter_any()]
    assert assemble(api, chunks) == plain
    assert assemble(api, list(replay(api, plain, include_usage=True))) == plain
