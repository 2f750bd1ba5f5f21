"""The deterministic content of the fake's answers: a pure function of the request body.

An identical request (ignoring ``stream``/``stream_options``) always gets an identical answer, and
any change gets a different one. Nothing here speaks HTTP.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

CREATED = 1_700_000_000
EMBEDDING_DIM = 8
DEFAULT_MODEL = "fake-model"
MODELS = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "claude-3-5-haiku-latest")

_FILLER = ("the", "cache", "answer", "model", "request", "token", "value", "result", "data",
           "service", "latency", "prompt", "system", "user", "simple", "example", "and", "of",
           "to", "is", "with", "for", "a", "that", "this", "each", "when", "then", "more",
           "first", "second", "step")


def request_digest(payload: dict[str, Any]) -> str:
    """sha256 of the canonical request body, ignoring the streaming flags."""
    canonical = {k: v for k, v in payload.items() if k not in ("stream", "stream_options")}
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def text_of(content: Any) -> str:
    """Text of an OpenAI/Anthropic message content: a string or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        return " ".join(p for p in parts if isinstance(p, str))
    return ""


def last_user_text(messages: list[Any]) -> str:
    """Text of the last ``user`` message, or ``""``."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return text_of(message.get("content"))
    return ""


def words(*texts: str) -> int:
    """The token count the fake reports: whitespace-separated words, at least 1."""
    return max(1, sum(len(t.split()) for t in texts))


def answer(digest: str, prompt: str, index: int = 0, words: int = 0) -> str:
    """Answer number ``index`` to the request with ``digest``, padded with ``words`` fillers."""
    tag = digest if index == 0 else hashlib.sha256(f"{digest}:{index}".encode()).hexdigest()
    text = f"answer-{tag[:8]} to: {prompt[:40]}"
    if words > 0:
        raw = b"".join(hashlib.sha256(f"{tag}:{block}".encode()).digest()
                       for block in range(words // 32 + 1))
        text += " " + " ".join(_FILLER[b % len(_FILLER)] for b in raw[:words])
    return text


def pieces(text: str, minimum: int = 3) -> list[str]:
    """Split ``text`` into stream deltas that join back exactly: words, else equal slices."""
    parts = [p for p in re.split(r"(?<=\s)(?=\S)", text) if p]
    if len(parts) >= minimum or len(text) < minimum:
        return parts or [text]
    step = math.ceil(len(text) / minimum)
    return [text[i : i + step] for i in range(0, len(text), step)]


def arguments(text: str, prompt: str) -> str:
    """The JSON arguments of a tool call whose plain answer would be ``text``."""
    return json.dumps({"answer": text.split(" ", 1)[0], "query": prompt[:40]})


def tool_name(payload: dict[str, Any], *, anthropic: bool) -> str | None:
    """Name of the tool to call, or None for a plain answer."""
    tools = payload.get("tools")
    if not isinstance(tools, list) or not tools:
        return None
    choice = payload.get("tool_choice")
    if anthropic:
        if isinstance(choice, dict):
            if choice.get("type") == "none":
                return None
            if choice.get("type") == "tool":
                return str(choice.get("name"))
        return str(tools[0].get("name"))
    if choice == "none":
        return None
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        return str(choice["function"].get("name"))
    return str(tools[0].get("function", {}).get("name"))


def call_id(prefix: str, digest: str, salt: str) -> str:
    """A tool-call id derived from the request: ``prefix`` + 24 hex digits."""
    return f"{prefix}{hashlib.sha256(f'{digest}:{salt}'.encode()).hexdigest()[:24]}"


def vector(text: str, dim: int) -> list[float]:
    """A unit vector of ``dim`` floats derived from ``text``."""
    raw = b"".join(
        hashlib.sha256(f"{block}:{text}".encode()).digest() for block in range(dim // 16 + 1)
    )
    values = [int.from_bytes(raw[2 * i : 2 * i + 2], "big") / 32767.5 - 1.0 for i in range(dim)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]
