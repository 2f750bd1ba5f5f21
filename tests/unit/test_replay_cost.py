"""What replaying a large stored answer as SSE costs: bytes, frames, time and memory.

A streaming hit replays the stored body through :func:`promptcache.cache.sse.replay`; these
tests hold it to a few times the answer's size, a bounded number of frames, frames made one at
a time, and a stream that assembles back to exactly the stored body.
"""

from __future__ import annotations

import json
import random
import time
import tracemalloc
from typing import Any

import pytest

from promptcache.cache.api import Api
from promptcache.cache.sse import REPLAY_PIECES, SSEParser, assembler_for, replay

_WORDS = ("the quick brown fox jumps over a lazy dog; naïve café — 東京 🌍 cache stream "
          "replay answer model token \"quoted\" back\\slash").split(" ")  # fmt: skip
_SEPARATORS = (" ", " ", " ", ", ", ".\n", "\n\n")


def prose(chars: int, seed: int = 1) -> str:
    """About ``chars`` chars of text with words, punctuation, newlines, quotes and non-ASCII."""
    rng, out, size = random.Random(seed), [], 0
    while size < chars:
        word = rng.choice(_WORDS) + rng.choice(_SEPARATORS)
        out.append(word)
        size += len(word)
    return "".join(out)


def arguments(chars: int) -> str:
    """A large tool-call arguments JSON string: many small objects."""
    rng, rows, size = random.Random(2), [], 0
    while size < chars:
        row = {"name": rng.choice(_WORDS), "value": rng.random(), "ok": rng.random() > 0.5}
        rows.append(row)
        size += len(json.dumps(row, ensure_ascii=False))
    return json.dumps({"rows": rows}, ensure_ascii=False)


_CHAT: dict[str, Any] = {
    "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
    "object": "chat.completion",
    "created": 1741569952,
    "model": "gpt-4o-2024-08-06",
    "service_tier": "default",
    "system_fingerprint": "fp_eb9dce56a8",
    "usage": {"prompt_tokens": 10, "completion_tokens": 150_000, "total_tokens": 150_010},
}
_MESSAGES: dict[str, Any] = {
    "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-20250514",
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 10, "output_tokens": 150_000},
}


def chat_text(chars: int) -> dict[str, Any]:
    message = {"role": "assistant", "content": prose(chars), "refusal": None, "annotations": []}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
    return {**_CHAT, "choices": [choice]}


def chat_choices(n: int, chars: int) -> dict[str, Any]:
    choices = [{"index": i, "message": {"role": "assistant", "content": prose(chars, seed=i),
                                        "refusal": None},
                "logprobs": None, "finish_reason": "stop"} for i in range(n)]  # fmt: skip
    return {**_CHAT, "choices": choices}


def chat_tool(chars: int) -> dict[str, Any]:
    call = {"id": "call_DdmO9pD3xa9XTPNJ32zg2hcA", "type": "function",
            "function": {"name": "store_rows", "arguments": arguments(chars)}}  # fmt: skip
    message = {"role": "assistant", "content": None, "refusal": None, "tool_calls": [call]}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "tool_calls"}
    return {**_CHAT, "choices": [choice]}


def completions_text(chars: int) -> dict[str, Any]:
    choice = {"text": prose(chars), "index": 0, "logprobs": None, "finish_reason": "stop"}
    return {**_CHAT, "object": "text_completion", "choices": [choice]}


def messages_text(chars: int) -> dict[str, Any]:
    content = [
        {"type": "thinking", "thinking": prose(chars // 4, seed=3), "signature": "EqQBCgIYAhIM"},
        {"type": "text", "text": prose(chars - chars // 4)},
    ]
    return {**_MESSAGES, "content": content}


def messages_tool(chars: int) -> dict[str, Any]:
    block = {"type": "tool_use", "id": "toolu_01", "name": "store_rows",
             "input": json.loads(arguments(chars))}  # fmt: skip
    return {**_MESSAGES, "stop_reason": "tool_use", "content": [block]}


LARGE = 600_000
CASES: list[tuple[str, Api, Any]] = [
    ("chat-text", "chat", chat_text),
    ("chat-4-choices", "chat", lambda chars: chat_choices(4, chars // 4)),
    ("chat-tool-arguments", "chat", chat_tool),
    ("completions-text", "completions", completions_text),
    ("messages-text-and-thinking", "messages", messages_text),
    ("messages-tool-input", "messages", messages_tool),
]
IDS = [case[0] for case in CASES]


def body_bytes(body: dict[str, Any]) -> int:
    """The stored answer's size: its body as the cache keeps it."""
    return len(json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode())


def assemble(api: Api, frames: list[bytes]) -> dict[str, Any]:
    parser, assembler = SSEParser(), assembler_for(api)
    for frame in frames:
        for event in parser.feed(frame):
            assembler.add(event)
    assert assembler.complete and not assembler.failed
    return assembler.result()


@pytest.mark.parametrize(("name", "api", "make"), CASES, ids=IDS)
def test_large_answer_replays_within_three_times_its_bytes_and_bounded_frames(
    name: str, api: Api, make: Any
) -> None:
    body = make(LARGE)
    frames = list(replay(api, body, include_usage=True))
    sse_bytes = sum(map(len, frames))
    assert sse_bytes <= 3 * body_bytes(body), f"{name}: {sse_bytes / body_bytes(body):.2f}x"
    assert len(frames) <= REPLAY_PIECES + 16
    assert assemble(api, frames) == body


@pytest.mark.parametrize("chars", [64_000, 6_000_000])
def test_chat_replay_stays_within_three_times_from_medium_to_very_large(chars: int) -> None:
    body = chat_text(chars)
    frames = list(replay("chat", body, include_usage=True))
    assert sum(map(len, frames)) <= 3 * body_bytes(body)
    assert len(frames) <= REPLAY_PIECES + 16


@pytest.mark.parametrize("chars", [2_000, 4_000, 8_000, 16_000, 32_000])
def test_smaller_answers_add_at_most_a_bounded_envelope(chars: int) -> None:
    """Below the size where pieces grow there are at most ``2 * REPLAY_PIECES`` text frames
    (pieces are cut after whitespace), so the SSE is at most 3x the answer plus that many frame
    envelopes, whatever the size."""
    envelope = max(map(len, replay("chat", chat_text(0), include_usage=True)))
    body = chat_text(chars)
    frames = list(replay("chat", body, include_usage=True))
    assert len(frames) <= 2 * REPLAY_PIECES + 16
    assert sum(map(len, frames)) <= 3 * body_bytes(body) + len(frames) * envelope


def test_pieces_grow_only_past_chunk_chars_times_replay_pieces() -> None:
    def pieces(text: str) -> list[str]:
        body = {**_CHAT, "choices": [{"text": text, "index": 0, "finish_reason": "stop"}]}
        frames = list(replay("completions", body))
        return [json.loads(frame[6:])["choices"][0]["text"] for frame in frames[:-2]]

    small = pieces(prose(16 * REPLAY_PIECES - 100))
    assert max(map(len, small)) <= 16 and len(small) > REPLAY_PIECES / 2
    text = prose(64 * REPLAY_PIECES)
    large, size = pieces(text), -(-len(text) // REPLAY_PIECES)
    assert "".join(large) == text
    assert size > 16 and REPLAY_PIECES / 2 < len(large) <= 2 * REPLAY_PIECES
    # cut after whitespace: a piece is short of ``size`` by less than one word (<= 12 chars)
    assert all(size - 12 < len(piece) <= size and piece[-1].isspace() for piece in large[:-1])


@pytest.mark.parametrize("text", ["x" * 3_000_000, ("y" * 9_000 + " ") * 300],
                         ids=["one-huge-word", "words-longer-than-a-piece"])  # fmt: skip
def test_text_without_usable_breaks_is_cut_by_index_into_bounded_pieces(text: str) -> None:
    body = {**_CHAT, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                  "logprobs": None, "finish_reason": "length"}]}  # fmt: skip
    started = time.perf_counter()
    frames = list(replay("chat", body))
    took = time.perf_counter() - started
    assert len(frames) <= 2 * REPLAY_PIECES + 4
    assert sum(map(len, frames)) <= 3 * body_bytes(body)
    assert took < 2.0, f"{took:.2f} s: cutting is not linear"
    assert assemble("chat", frames)["choices"][0]["message"]["content"] == text


def test_frames_are_made_one_at_a_time() -> None:
    """Taking the first frames of a 6 MB replay allocates a small part of the whole stream."""
    body = chat_text(6_000_000)
    tracemalloc.start()
    try:
        frames = replay("chat", body)
        first = [next(frames) for _ in range(3)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(first) == 3 and peak < 600_000, f"peak {peak} bytes for 3 frames"


def test_replaying_a_600kb_answer_takes_milliseconds() -> None:
    """Measured about 5 ms on 2 shared cores (it was 0.27 s of 42,829 frames, 21x the bytes)."""
    body = chat_text(LARGE)
    started = time.perf_counter()
    frames = list(replay("chat", body, include_usage=True))
    took = time.perf_counter() - started
    ratio = sum(map(len, frames)) / body_bytes(body)
    print(f"600 KB chat replay: {len(frames)} frames, {ratio:.2f}x bytes, {took * 1e3:.1f} ms")
    assert took < 0.25
