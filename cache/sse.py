"""Streaming responses: parse SSE, assemble a stream into its non-streaming body, replay it.

A ``stream: true`` miss is forwarded byte for byte while :class:`SSEParser` and an assembler
from :func:`assembler_for` rebuild the body the same request would have got with
``stream: false``; that body is what gets stored. A later streaming hit calls :func:`replay`,
which turns a stored body back into a real event stream. Four APIs stream:

- ``"chat"``: OpenAI ``/v1/chat/completions`` (``chat.completion.chunk``, ``data: [DONE]``);
- ``"completions"``: OpenAI legacy ``/v1/completions`` (``text_completion``, ``data: [DONE]``);
- ``"messages"``: Anthropic ``/v1/messages`` (``event:``-named events, ends at ``message_stop``);
- ``"responses"``: OpenAI ``/v1/responses`` (typed events, ends at ``response.completed``;
  :mod:`promptcache.cache.responses_stream` holds its structure).

Round trip: ``assemble(replay(R, include_usage=True)) == R`` for any body R in the shape the
APIs return. Normalisations a stream forces on an assembled body:

- OpenAI: ``object`` is ``chat.completion`` / ``text_completion``; every choice has ``index``,
  ``logprobs`` and ``finish_reason``; a chat message has ``role`` and ``content`` (None when
  only tool calls came); tool calls lose their stream-only ``index``; the ``obfuscation``
  padding is dropped; ``usage`` is there only if the stream carried it (``include_usage``);
  fields only plain responses have (``message.annotations: []``) are absent, not invented.
- Anthropic: ``stop_reason``/``stop_sequence`` always present; ``usage`` is the
  ``message_start`` usage updated by the (cumulative) ``message_delta`` usage.

:class:`StreamCollector` feeds a relayed stream's chunks through both as they pass and hands
over the complete :class:`~promptcache.cache.entry.Answer` the moment the terminal event
arrives. No I/O and no shared state: each parser, assembler and collector belongs to one
stream.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from promptcache.cache.api import Api
from promptcache.cache.entry import Answer
from promptcache.cache.responses_stream import ResponsesAssembly, response_events, streamed_chars

_LINE_END = re.compile(r"\r\n|\r|\n")
# Delta keys that name or tag a thing rather than stream text: replaced, never concatenated.
_REPLACED = frozenset({"index", "type", "role", "id", "name"})
_BAD_STREAM = (ValueError, TypeError, KeyError, AttributeError)
_MESSAGE_EVENTS = frozenset(
    {"content_block_start", "content_block_delta", "content_block_stop", "message_delta",
     "message_stop"}
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched server-sent event: its data lines joined by ``\\n``, and its type."""

    data: str
    event: str | None = None


class SSEParser:
    """Incremental SSE parser following the WHATWG event-stream rules.

    Feed any byte splits (a chunk may end mid-line, mid-``\\r\\n`` or mid UTF-8 character).
    Lines end at ``\\n``, ``\\r\\n`` or ``\\r``; ``:`` lines are comments; ``data:`` lines
    join with ``\\n``; one space after the colon is dropped; ``id:``/``retry:`` and unknown
    fields are ignored; an event without ``data:`` is not dispatched; bad UTF-8 becomes U+FFFD.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial: list[str] = []
        self._data: list[str] = []
        self._event = ""
        self._skip_lf = False
        self._started = False

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """The events completed by ``chunk``, in order."""
        text = self._decoder.decode(chunk)
        if text and not self._started:
            self._started = True
            text = text.removeprefix("\ufeff")
        if text and self._skip_lf:
            self._skip_lf = False
            text = text.removeprefix("\n")
        lines = _LINE_END.split(text)
        if len(lines) == 1:
            self._partial.append(text)
            return []
        self._skip_lf = text.endswith("\r")  # a "\n" opening the next chunk ends no new line
        lines[0] = "".join(self._partial) + lines[0]
        self._partial = [lines.pop()]
        events = (self._line(line) for line in lines)
        return [event for event in events if event is not None]

    def close(self) -> list[SSEEvent]:
        """End of stream. Always ``[]``: per the spec an event still missing its blank line at
        EOF is discarded, never dispatched. The parser is reset and may be reused."""
        self._reset()
        return []

    def _line(self, line: str) -> SSEEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        return None

    def _dispatch(self) -> SSEEvent | None:
        data, event = self._data, self._event
        self._data, self._event = [], ""
        return SSEEvent("\n".join(data), event or None) if data else None


class StreamAssembler(Protocol):
    """Rebuilds the non-streaming response body from one stream's events."""

    complete: bool  # the terminal event arrived and nothing failed
    failed: bool  # an error event, unparsable data or a malformed event arrived

    def add(self, event: SSEEvent) -> None:
        """Take the next event; never raises (a bad event sets ``failed``)."""

    def result(self) -> dict[str, Any]:
        """The equivalent non-streaming body; ValueError unless ``complete``."""


def assembler_for(api: Api) -> StreamAssembler:
    """A fresh assembler for one stream of ``api``."""
    if api == "chat":
        return _OpenAIAssembler("chat.completion")
    if api == "completions":
        return _OpenAIAssembler("text_completion")
    if api == "messages":
        return _AnthropicAssembler()
    if api == "responses":
        return _ResponsesAssembler()
    raise ValueError(f"unknown streaming api {api!r}")


class _Text(list[str]):
    """A streamed string's pieces, joined once by ``_finish``: ``str + str`` per delta would make
    assembly quadratic in the number of deltas."""


def _merge(acc: dict[str, Any], delta: dict[str, Any]) -> None:
    """Fold a stream delta into ``acc``: strings and lists concatenate, dicts merge, None never
    overwrites, tags in ``_REPLACED`` and other scalars are replaced."""
    for key, value in delta.items():
        old = acc.get(key)
        if value is None:
            acc.setdefault(key, None)
        elif isinstance(value, str) and key not in _REPLACED:
            if isinstance(old, _Text):
                old.append(value)
            else:
                acc[key] = _Text([old, value] if isinstance(old, str) else [value])
        elif old is None or key in _REPLACED:
            acc[key] = value
        elif type(old) is list and isinstance(value, list):
            old.extend(value)
        elif isinstance(old, dict) and isinstance(value, dict):
            _merge(old, value)
        else:
            acc[key] = value


def _finish(obj: Any) -> Any:
    """A fresh copy of assembled JSON, with every ``_Text`` joined into its string."""
    if isinstance(obj, _Text):
        return "".join(obj)
    if isinstance(obj, dict):
        return {key: _finish(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_finish(value) for value in obj]
    return obj


def _parse(data: str) -> dict[str, Any]:
    obj = json.loads(data)
    if not isinstance(obj, dict):
        raise TypeError(f"event data is not a JSON object: {data[:80]!r}")
    if obj.get("error") is not None or obj.get("type") == "error":
        raise ValueError(f"error in stream: {data[:200]}")
    return obj


class _Assembler:
    """The shared ``add``/``result`` contract; subclasses implement ``_add``/``_result``."""

    def __init__(self) -> None:
        self.complete = False
        self.failed = False

    def add(self, event: SSEEvent) -> None:
        if self.complete or self.failed:
            return
        try:
            if event.event == "error":
                raise ValueError(f"error event: {event.data[:200]}")
            self._add(event)
        except _BAD_STREAM:
            self.failed, self.complete = True, False

    def result(self) -> dict[str, Any]:
        if not self.complete:
            raise ValueError("the stream is not complete")
        return dict(_finish(self._result()))

    def _add(self, event: SSEEvent) -> None:
        raise NotImplementedError

    def _result(self) -> dict[str, Any]:
        raise NotImplementedError


class _OpenAIAssembler(_Assembler):
    """``chat.completion`` (choices carry ``delta``) or ``text_completion`` (choices carry
    ``text``). Chunks of all choices may interleave; tool calls merge by choice and ``index``."""

    def __init__(self, object_name: str) -> None:
        super().__init__()
        self._object = object_name
        self._meta: dict[str, Any] = {}
        self._choices: dict[int, dict[str, Any]] = {}
        self._calls: dict[int, dict[int, dict[str, Any]]] = {}
        self._usage: Any = None
        self._seen = False

    def _add(self, event: SSEEvent) -> None:
        if event.data.strip() == "[DONE]":
            if not self._seen:
                raise ValueError("[DONE] before any chunk")
            self.complete = True
            return
        chunk = _parse(event.data)
        self._seen = True
        for key, value in chunk.items():
            if key == "choices":
                for choice in value or []:
                    self._add_choice(choice)
            elif key == "usage":
                self._usage = value if value is not None else self._usage
            elif key != "obfuscation" and (value is not None or key not in self._meta):
                self._meta[key] = value

    def _add_choice(self, choice: dict[str, Any]) -> None:
        index = int(choice.get("index", 0))
        acc = self._choices.setdefault(index, self._new_choice(index))
        for key, value in choice.items():
            if key == "delta":
                self._add_delta(index, acc["message"], value)
            elif key in ("text", "logprobs"):
                _merge(acc, {key: value})
            elif value is not None or key not in acc:
                acc[key] = value

    def _new_choice(self, index: int) -> dict[str, Any]:
        if self._object == "text_completion":
            return {"text": "", "index": index, "logprobs": None, "finish_reason": None}
        return {"index": index, "message": {}, "logprobs": None, "finish_reason": None}

    def _add_delta(self, index: int, message: dict[str, Any], delta: dict[str, Any]) -> None:
        calls = delta.get("tool_calls")
        if calls is not None:
            slots = self._calls.setdefault(index, {})
            for position, call in enumerate(calls):
                slot = slots.setdefault(int(call.get("index", position)), {})
                _merge(slot, {k: v for k, v in call.items() if k != "index"})
        _merge(message, {k: v for k, v in delta.items() if k != "tool_calls"})

    def _result(self) -> dict[str, Any]:
        choices = [self._finished_choice(self._choices[i]) for i in sorted(self._choices)]
        body = {**self._meta, "object": self._object, "choices": choices}
        return body if self._usage is None else {**body, "usage": self._usage}

    def _finished_choice(self, choice: dict[str, Any]) -> dict[str, Any]:
        if "message" not in choice:
            return choice
        message = {"role": "assistant", "content": None, **choice["message"]}
        calls = self._calls.get(choice["index"])
        if calls is not None:
            message["tool_calls"] = [calls[i] for i in sorted(calls)]
        return {**choice, "message": message}


class _AnthropicAssembler(_Assembler):
    """Anthropic message events; ``ping`` and unknown event types are ignored."""

    def __init__(self) -> None:
        super().__init__()
        self._message: dict[str, Any] | None = None
        self._blocks: dict[int, dict[str, Any]] = {}
        self._json: dict[int, list[str]] = {}  # tool input JSON still arriving, by block index

    def _add(self, event: SSEEvent) -> None:
        obj = _parse(event.data)
        kind = obj.get("type")
        if kind == "message_start":
            self._message = dict(obj["message"])
            self._blocks = dict(enumerate(self._message.get("content") or []))
        elif kind not in _MESSAGE_EVENTS:
            return  # ping, and event types newer than this code
        elif self._message is None:
            raise ValueError(f"{kind} before message_start")
        elif kind == "content_block_start":
            self._blocks[int(obj["index"])] = dict(obj["content_block"])
        elif kind == "content_block_delta":
            self._add_block_delta(int(obj["index"]), obj["delta"])
        elif kind == "content_block_stop":
            self._finish_block(int(obj["index"]))
        elif kind == "message_delta":
            self._message.update(obj.get("delta") or {})
            usage = {k: v for k, v in (obj.get("usage") or {}).items() if v is not None}
            if usage:  # cumulative counts: the latest non-null values win
                self._message["usage"] = {**(self._message.get("usage") or {}), **usage}
        else:
            for index in list(self._json):
                self._finish_block(index)
            self.complete = True

    def _add_block_delta(self, index: int, delta: dict[str, Any]) -> None:
        block, kind = self._blocks[index], delta.get("type")
        if kind == "input_json_delta":
            self._json.setdefault(index, []).append(delta.get("partial_json") or "")
        elif kind == "citations_delta":
            if block.get("citations") is None:
                block["citations"] = []
            block["citations"].append(delta["citation"])
        else:  # text_delta, thinking_delta, signature_delta and future string deltas
            _merge(block, {k: v for k, v in delta.items() if k != "type"})

    def _finish_block(self, index: int) -> None:
        text = "".join(self._json.pop(index, []))
        if text:
            self._blocks[index]["input"] = json.loads(text)

    def _result(self) -> dict[str, Any]:
        content = [self._blocks[i] for i in sorted(self._blocks)]
        return {**(self._message or {}), "content": content}


class _ResponsesAssembler(_Assembler):
    """Responses API events: the terminal event's response object is the result."""

    def __init__(self) -> None:
        super().__init__()
        self._assembly = ResponsesAssembly()

    def _add(self, event: SSEEvent) -> None:
        if self._assembly.add(_parse(event.data)):
            self.complete = True

    def _result(self) -> dict[str, Any]:
        assert self._assembly.response is not None
        return self._assembly.response


#: A replay cuts its text into about this many pieces at most, whatever the answer's size:
#: past ``chunk_chars * REPLAY_PIECES`` streamed chars the pieces grow with the text, so the
#: frame count stays bounded and each frame's JSON envelope is small next to its text.
REPLAY_PIECES = 256
# The end of the last whitespace run followed by a word: where a piece may end.
_LAST_BREAK = re.compile(r".*\s(?=\S)", re.DOTALL)


def replay(
    api: Api, response: dict[str, Any], *, include_usage: bool = False, chunk_chars: int = 16
) -> Iterator[bytes]:
    """SSE frames, one event each, re-creating ``response`` the way the API streams it.

    Text, reasoning and tool arguments go in pieces of about ``chunk_chars`` chars, cut after
    whitespace where possible; when the answer streams more than ``chunk_chars *
    REPLAY_PIECES`` chars in all, the pieces grow to ``1/REPLAY_PIECES`` of that total, so a
    large answer is at most about ``2 * REPLAY_PIECES`` text frames and its SSE stays within a
    small multiple of its size. Per chat choice: a role chunk (``content: ""``), content deltas,
    tool-call deltas (id/type/name with ``""`` arguments, then argument pieces), a
    ``finish_reason`` chunk; per completions choice: text chunks, a ``finish_reason`` chunk;
    then, if ``include_usage``, a ``choices: []`` usage chunk (earlier chunks carry
    ``usage: null``); then ``data: [DONE]``. Messages: ``message_start`` (empty content,
    ``output_tokens`` <= 1), per block start / deltas / stop, ``message_delta`` (stop reason,
    final ``output_tokens``), ``message_stop``. Responses: the typed events of
    :func:`~promptcache.cache.responses_stream.response_events`. Arguments are checked
    eagerly; frames are made lazily, one per ``next``, so a writer can yield to its event
    loop between them."""
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be >= 1, not {chunk_chars}")
    if api == "messages":
        return _replay_messages(response, chunk_chars)
    if api in ("chat", "completions"):
        return _replay_openai(api, response, include_usage, chunk_chars)
    if api == "responses":
        return _replay_responses(response, chunk_chars)
    raise ValueError(f"unknown streaming api {api!r}")


def _piece_size(total_chars: int, chunk_chars: int) -> int:
    """The piece size for an answer streaming ``total_chars`` chars in all."""
    return max(chunk_chars, -(-total_chars // REPLAY_PIECES))


def _pieces(text: str, size: int) -> Iterator[str]:
    """``text`` cut into pieces of at most ``size`` chars, each ending after whitespace unless
    a word is longer than ``size``. Cut by index, so linear in ``len(text)``; at most about
    ``2 * len(text) / size`` pieces (each piece and the next hold more than ``size`` chars)."""
    start, end = 0, len(text)
    while end - start > size:
        cut = _LAST_BREAK.match(text, start, start + size + 1)
        stop = cut.end() if cut else start + size
        yield text[start:stop]
        start = stop
    if start < end:
        yield text[start:]


def _frame(obj: dict[str, Any] | str, event: str | None = None) -> bytes:
    if not isinstance(obj, str):
        obj = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {obj}\n\n".encode()


def _replay_openai(
    api: Api, response: dict[str, Any], include_usage: bool, chunk_chars: int
) -> Iterator[bytes]:
    base = {k: v for k, v in response.items() if k not in ("choices", "usage")}
    base["object"] = "chat.completion.chunk" if api == "chat" else "text_completion"
    if include_usage:
        base["usage"] = None
    choices = response.get("choices") or []
    split = _chat_choice if api == "chat" else _completion_choice
    size = _piece_size(sum(_openai_chars(api, choice) for choice in choices), chunk_chars)
    for choice in choices:
        for part in split(choice, size):
            yield _frame({**base, "choices": [part]})
    if include_usage:
        yield _frame({**base, "choices": [], "usage": response.get("usage")})
    yield _frame("[DONE]")


def _openai_chars(api: Api, choice: dict[str, Any]) -> int:
    """The chars one choice streams in pieces: its text, or its message's strings and tool
    arguments."""
    if api == "completions":
        text = choice.get("text")
        return len(text) if isinstance(text, str) else 0
    message = choice.get("message") or {}
    total = sum(len(v) for k, v in message.items() if k != "role" and isinstance(v, str))
    for call in message.get("tool_calls") or []:
        function = call.get("function")
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            total += len(function["arguments"])
    return total


def _chat_choice(choice: dict[str, Any], size: int) -> Iterator[dict[str, Any]]:
    index, message = choice.get("index", 0), choice.get("message") or {}

    def part(delta: dict[str, Any], logprobs: Any = None, finish: Any = None) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    first = {"role": message.get("role", "assistant")}
    for key, value in message.items():
        if key != "role" and (key != "tool_calls" or value == []):
            first[key] = "" if isinstance(value, str) else value
    yield part(first, choice.get("logprobs"))
    for key, value in message.items():
        if key != "role" and isinstance(value, str):
            yield from (part({key: piece}) for piece in _pieces(value, size))
    for position, call in enumerate(message.get("tool_calls") or []):
        yield from (part({"tool_calls": [d]}) for d in _call_deltas(position, call, size))
    skip = ("index", "message", "logprobs", "finish_reason")
    yield {**part({}, None, choice.get("finish_reason")),
           **{k: v for k, v in choice.items() if k not in skip}}  # fmt: skip


def _call_deltas(position: int, call: dict[str, Any], size: int) -> Iterator[dict[str, Any]]:
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        yield {"index": position, **call}
        return
    yield {"index": position, **call, "function": {**function, "arguments": ""}}
    for piece in _pieces(function["arguments"], size):
        yield {"index": position, "function": {"arguments": piece}}


def _completion_choice(choice: dict[str, Any], size: int) -> Iterator[dict[str, Any]]:
    index, logprobs = choice.get("index", 0), choice.get("logprobs")
    for piece in _pieces(choice.get("text") or "", size):
        yield {"text": piece, "index": index, "logprobs": logprobs, "finish_reason": None}
        logprobs = None
    extra = {k: v for k, v in choice.items() if k not in ("text", "index", "logprobs")}
    yield {"text": "", "index": index, "logprobs": logprobs, **extra}  # extra: finish_reason...


def _replay_messages(response: dict[str, Any], chunk_chars: int) -> Iterator[bytes]:
    start = {**response, "content": [], "stop_reason": None, "stop_sequence": None}
    final_usage: dict[str, Any] = {}
    usage = response.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("output_tokens"), int):
        start["usage"] = {**usage, "output_tokens": min(usage["output_tokens"], 1)}
        final_usage = {"output_tokens": usage["output_tokens"]}
    yield _frame({"type": "message_start", "message": start}, "message_start")
    blocks = [_block_parts(block) for block in response.get("content") or []]
    size = _piece_size(sum(len(block.text) for block in blocks), chunk_chars)
    for index, block in enumerate(blocks):
        head = {"type": "content_block_start", "index": index, "content_block": block.skeleton}
        yield _frame(head, "content_block_start")
        for delta in _block_deltas(block, size):
            body = {"type": "content_block_delta", "index": index, "delta": delta}
            yield _frame(body, "content_block_delta")
        yield _frame({"type": "content_block_stop", "index": index}, "content_block_stop")
    stop = {k: response.get(k) for k in ("stop_reason", "stop_sequence")}
    tail: dict[str, Any] = {"type": "message_delta", "delta": stop}
    yield _frame({**tail, "usage": final_usage} if final_usage else tail, "message_delta")
    yield _frame({"type": "message_stop"}, "message_stop")


def _replay_responses(response: dict[str, Any], chunk_chars: int) -> Iterator[bytes]:
    size = _piece_size(streamed_chars(response), chunk_chars)
    for kind, data in response_events(response, lambda text: _pieces(text, size)):
        yield _frame(data, kind)


class _BlockParts(NamedTuple):
    """A content block as its ``content_block_start`` skeleton plus what fills it: ``before``
    deltas, then ``text`` in pieces as ``{"type": kind, field: piece}``, then ``after``."""

    skeleton: dict[str, Any]
    kind: str = ""
    field: str = ""
    text: str = ""
    before: tuple[dict[str, Any], ...] = ()
    after: tuple[dict[str, Any], ...] = ()


_NO_DELTAS: tuple[dict[str, Any], ...] = ()


def _block_parts(block: dict[str, Any]) -> _BlockParts:
    kind = block.get("type")
    if kind == "text" and isinstance(block.get("text"), str):
        skeleton, before = {**block, "text": ""}, _NO_DELTAS
        if isinstance(block.get("citations"), list):
            skeleton["citations"] = []
            before = tuple({"type": "citations_delta", "citation": c} for c in block["citations"])
        return _BlockParts(skeleton, "text_delta", "text", block["text"], before)
    if kind == "thinking" and isinstance(block.get("thinking"), str):
        skeleton, after = {**block, "thinking": ""}, _NO_DELTAS
        if isinstance(block.get("signature"), str):
            skeleton["signature"] = ""
            after = ({"type": "signature_delta", "signature": block["signature"]},)
        return _BlockParts(skeleton, "thinking_delta", "thinking", block["thinking"], (), after)
    if isinstance(block.get("input"), dict):  # tool_use, server_tool_use, mcp_tool_use
        args = block["input"]
        text = json.dumps(args, ensure_ascii=False, separators=(",", ":")) if args else ""
        return _BlockParts({**block, "input": {}}, "input_json_delta", "partial_json", text)
    return _BlockParts(block)  # redacted_thinking, *_tool_result...: whole in the start event


def _block_deltas(block: _BlockParts, size: int) -> Iterator[dict[str, Any]]:
    yield from block.before
    for piece in _pieces(block.text, size):
        yield {"type": block.kind, block.field: piece}
    yield from block.after


#: Raw SSE is several times larger than the answer it carries; past this we stop assembling.
SSE_OVERHEAD = 8


class StreamCollector:
    """Assembles a streamed (SSE) answer into its non-streaming form as chunks pass by.

    ``feed`` returns the :class:`Answer` once, when the chunk that completes the stream
    arrives (so the caller can store it before passing that chunk on), else None. Past
    ``SSE_OVERHEAD`` times the entry size limit it stops assembling.
    """

    def __init__(self, api: Api, status: int, max_entry_bytes: int) -> None:
        self._parser, self._assembler = SSEParser(), assembler_for(api)
        self._status = status
        self._budget, self._seen = max_entry_bytes * SSE_OVERHEAD, 0
        self.answer: Answer | None = None

    def feed(self, chunk: bytes) -> Answer | None:
        if self.answer is not None or self._seen > self._budget:
            return None
        self._seen += len(chunk)
        if self._seen > self._budget:
            return None
        for event in self._parser.feed(chunk):
            self._assembler.add(event)
        if self._assembler.complete and not self._assembler.failed:
            doc = self._assembler.result()
            self.answer = Answer(self._status, json.dumps(doc, separators=(",", ":"),
                                                          ensure_ascii=False).encode(),
                                 "application/json")
            return self.answer
        return None
