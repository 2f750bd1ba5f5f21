"""The OpenAI Responses API's typed event stream: assembled into its response, and replayed.

A ``POST /v1/responses`` stream is a sequence of typed events (an ``event: <type>`` line,
and JSON ``data`` whose ``type`` repeats it and whose ``sequence_number`` counts from 0)::

    response.created, response.in_progress          (the response, output [], in progress)
    per output item:  response.output_item.added    (the item, empty, in progress)
        message:        per content part  response.content_part.added
                          output_text: response.output_text.delta..., annotation.added...,
                                       response.output_text.done
                          refusal:     response.refusal.delta..., response.refusal.done
                        response.content_part.done
        function_call:  response.function_call_arguments.delta..., ...arguments.done
        reasoning:      per summary part  response.reasoning_summary_part.added,
                          reasoning_summary_text.delta..., .done, reasoning_summary_part.done
      response.output_item.done                     (the whole item)
    response.completed or response.incomplete       (the whole response)

The terminal event carries the whole response object, the one a non-streaming call returns,
so :class:`ResponsesAssembly` keeps that (filling in ``output`` from the
``output_item.done`` events should it come without). :func:`response_events` makes the
events back from a stored response, with the same structure; other item types (web search,
file search, MCP...) are replayed whole in their ``added`` and ``done`` events. No I/O: the
SSE framing and the cutting of text into pieces belong to :mod:`promptcache.cache.sse`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final

#: Cuts a streamed string into its deltas.
Cut = Callable[[str], Iterable[str]]
Event = tuple[str, dict[str, Any]]

#: Terminal events that carry a response worth keeping; ``response.failed`` and ``error``
#: end a stream that is not.
TERMINAL: Final = frozenset({"response.completed", "response.incomplete"})
FAILED: Final = frozenset({"response.failed", "response.cancelled", "error"})


class ResponsesAssembly:
    """One Responses stream's events in, its final response object out."""

    def __init__(self) -> None:
        self.response: dict[str, Any] | None = None
        self._items: dict[int, dict[str, Any]] = {}

    def add(self, event: dict[str, Any]) -> bool:
        """Take one event's data; True once the terminal event arrived. ValueError,
        TypeError or KeyError on a failed stream or a malformed event."""
        kind = event.get("type")
        if kind == "response.output_item.done":
            self._items[int(event["output_index"])] = dict(event["item"])
        elif kind in TERMINAL:
            response = event["response"]
            if not isinstance(response, dict) or not isinstance(response.get("id"), str):
                raise TypeError(f"{kind} without a response object")
            if not response.get("output") and self._items:
                response = {**response, "output": [self._items[i] for i in sorted(self._items)]}
            self.response = response
            return True
        elif kind in FAILED:
            raise ValueError(f"the response stream ended with {kind}")
        return False


def streamed_chars(response: dict[str, Any]) -> int:
    """The chars :func:`response_events` streams in pieces: text, refusals, arguments and
    reasoning summaries."""
    total = 0
    for item in _list(response.get("output")):
        if not isinstance(item, dict):
            continue
        total += _len(item.get("arguments"))
        for part in _list(item.get("content")) + _list(item.get("summary")):
            if isinstance(part, dict):
                total += _len(part.get("text")) + _len(part.get("refusal"))
    return total


def response_events(response: dict[str, Any], cut: Cut) -> Iterator[Event]:
    """``(type, data)`` of each event that streams ``response``, ``sequence_number`` from 0;
    strings go in the pieces ``cut`` makes of them."""
    numbers = itertools.count()

    def event(kind: str, **fields: Any) -> Event:
        return kind, {"type": kind, "sequence_number": next(numbers), **fields}

    start = {**response, "status": "in_progress", "output": [], "usage": None}
    for key in ("completed_at", "incomplete_details", "error"):
        if key in response:
            start[key] = None
    yield event("response.created", response=start)
    yield event("response.in_progress", response=start)
    for index, item in enumerate(_list(response.get("output"))):
        if isinstance(item, dict):
            yield from _item_events(event, index, item, cut)
    end = "response.incomplete" if response.get("status") == "incomplete" else \
        "response.completed"
    yield event(end, response=response)


def _item_events(event: Callable[..., Event], index: int, item: dict[str, Any], cut: Cut
                 ) -> Iterator[Event]:
    kind = item.get("type")
    at = {"item_id": item.get("id"), "output_index": index}
    opened = {**item, "status": "in_progress"} if "status" in item else dict(item)
    if kind == "message" and isinstance(item.get("content"), list):
        yield event("response.output_item.added", output_index=index,
                    item={**opened, "content": []})
        for position, part in enumerate(item["content"]):
            if isinstance(part, dict):
                yield from _part_events(event, {**at, "content_index": position}, part, cut)
    elif kind == "function_call" and isinstance(item.get("arguments"), str):
        yield event("response.output_item.added", output_index=index,
                    item={**opened, "arguments": ""})
        for piece in cut(item["arguments"]):
            yield event("response.function_call_arguments.delta", **at, delta=piece)
        yield event("response.function_call_arguments.done", **at,
                    arguments=item["arguments"])
    elif kind == "reasoning" and _summaries(item.get("summary")):
        yield event("response.output_item.added", output_index=index,
                    item={**opened, "summary": []})
        for position, part in enumerate(item["summary"]):
            where = {**at, "summary_index": position}
            yield event("response.reasoning_summary_part.added", **where,
                        part={**part, "text": ""})
            for piece in cut(part["text"]):
                yield event("response.reasoning_summary_text.delta", **where, delta=piece)
            yield event("response.reasoning_summary_text.done", **where, text=part["text"])
            yield event("response.reasoning_summary_part.done", **where, part=part)
    else:
        yield event("response.output_item.added", output_index=index, item=opened)
    yield event("response.output_item.done", output_index=index, item=item)


def _part_events(event: Callable[..., Event], at: dict[str, Any], part: dict[str, Any],
                 cut: Cut) -> Iterator[Event]:
    kind = part.get("type")
    if kind == "output_text" and isinstance(part.get("text"), str):
        notes = part.get("annotations")
        opened = {**part, "text": ""}
        if isinstance(notes, list):
            opened["annotations"] = []
        if "logprobs" in part:
            opened["logprobs"] = []
        yield event("response.content_part.added", **at, part=opened)
        for piece in cut(part["text"]):
            yield event("response.output_text.delta", **at, delta=piece, logprobs=[])
        for position, note in enumerate(notes if isinstance(notes, list) else []):
            yield event("response.output_text.annotation.added", **at,
                        annotation_index=position, annotation=note)
        logprobs = part.get("logprobs")
        yield event("response.output_text.done", **at, text=part["text"],
                    logprobs=logprobs if isinstance(logprobs, list) else [])
    elif kind == "refusal" and isinstance(part.get("refusal"), str):
        yield event("response.content_part.added", **at, part={**part, "refusal": ""})
        for piece in cut(part["refusal"]):
            yield event("response.refusal.delta", **at, delta=piece)
        yield event("response.refusal.done", **at, refusal=part["refusal"])
    else:
        yield event("response.content_part.added", **at, part=part)
    yield event("response.content_part.done", **at, part=part)


def _summaries(summary: Any) -> bool:
    """Whether a reasoning item's ``summary`` is a non-empty list of text parts."""
    return isinstance(summary, list) and bool(summary) and all(
        isinstance(p, dict) and isinstance(p.get("text"), str) for p in summary)


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _len(value: Any) -> int:
    return len(value) if isinstance(value, str) else 0
