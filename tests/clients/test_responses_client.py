"""The official openai client's ``responses.create``, plain and streamed, through a sidecar
and through ``wrap()``: typed objects and events out, the second call a hit. Sync clients
run on a thread: the fake upstream serves from this loop."""

from __future__ import annotations

import asyncio
from typing import Any

from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseCreatedEvent,
    ResponseFunctionToolCall,
    ResponseStreamEvent,
    ResponseTextDeltaEvent,
)

from promptcache.clients import wrap
from promptcache.testing import FakeUpstream
from tests.clients.test_clients import async_client, sync_client
from tests.support.sidecars import RunningSidecar

RESPONSES = "/v1/responses"
MODEL = "gpt-4o-mini"
Q = "How do I reset my password?"
ARGS: dict[str, Any] = {"model": MODEL, "input": Q, "instructions": "Be brief."}


def streamed_text(events: list[ResponseStreamEvent]) -> str:
    return "".join(e.delta for e in events if isinstance(e, ResponseTextDeltaEvent))


def shape(events: list[ResponseStreamEvent]) -> list[str]:
    """The event types with runs of deltas folded into one: the stream's structure."""
    out: list[str] = []
    for event in events:
        if not (out and event.type == out[-1] and event.type.endswith(".delta")):
            out.append(event.type)
    return out


def check_events(events: list[ResponseStreamEvent]) -> Response:
    """Typed events from created to completed, numbered in order; the final response."""
    assert isinstance(events[0], ResponseCreatedEvent)
    assert isinstance(events[-1], ResponseCompletedEvent)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert final.output_text == streamed_text(events) != ""
    return final


async def test_responses_create_through_a_sidecar_misses_then_hits(
        sidecar: RunningSidecar, fake: FakeUpstream) -> None:
    client = async_client(sidecar.url)
    try:
        first = await client.responses.with_raw_response.create(**ARGS)
        second = await client.responses.with_raw_response.create(**ARGS)
        assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
        a, b = first.parse(), second.parse()
        assert isinstance(b, Response) and b.output_text
        assert b.model_dump() == a.model_dump() and fake.calls[RESPONSES] == 1
    finally:
        await client.close()


async def test_responses_stream_through_a_sidecar_miss_and_hit(
        sidecar: RunningSidecar, fake: FakeUpstream) -> None:
    client = async_client(sidecar.url)
    try:
        runs = []
        for _ in range(2):
            stream = await client.responses.create(**ARGS, stream=True)
            runs.append([event async for event in stream])
        finals = [check_events(run) for run in runs]
        assert shape(runs[1]) == shape(runs[0])
        assert finals[1].model_dump() == finals[0].model_dump()
        assert fake.calls[RESPONSES] == 1
        plain = await client.responses.create(**ARGS)  # the streamed miss was stored
        assert plain.model_dump() == finals[0].model_dump() and fake.calls[RESPONSES] == 1
    finally:
        await client.close()


async def test_the_stream_helper_accumulates_a_replayed_function_call(
        sidecar: RunningSidecar, fake: FakeUpstream) -> None:
    """``responses.stream()`` checks each event against its running snapshot: a replay must
    keep the live stream's structure for it to accept it."""
    client = async_client(sidecar.url)
    tools: Any = [{"type": "function", "name": "lookup", "parameters": {"type": "object"},
                   "strict": False}]
    try:
        finals = []
        for _ in range(2):
            async with client.responses.stream(**ARGS, tools=tools) as stream:
                finals.append(await stream.get_final_response())
        call = finals[1].output[0]
        assert isinstance(call, ResponseFunctionToolCall) and call.name == "lookup"
        assert finals[1].model_dump() == finals[0].model_dump()
        assert fake.calls[RESPONSES] == 1
    finally:
        await client.close()


async def test_wrapped_async_client_caches_responses_plain_and_streamed(
        fake: FakeUpstream, redis_url: str) -> None:
    client = wrap(async_client(fake.url), redis_url=redis_url, semantic=False)
    try:
        first = await client.responses.with_raw_response.create(**ARGS)
        second = await client.responses.with_raw_response.create(**ARGS)
        assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
        plain = second.parse()
        assert isinstance(plain, Response)
        stream = await client.responses.create(**ARGS, stream=True)
        final = check_events([event async for event in stream])
        assert final.model_dump() == plain.model_dump() and fake.calls[RESPONSES] == 1
    finally:
        await client.close()


async def test_wrapped_sync_client_caches_responses_plain_and_streamed(
        fake: FakeUpstream, redis_url: str) -> None:
    client = wrap(sync_client(fake.url), redis_url=redis_url, semantic=False)

    def run() -> tuple[Response, list[ResponseStreamEvent], list[ResponseStreamEvent]]:
        streams = [list(client.responses.create(**ARGS, stream=True)) for _ in range(2)]
        return client.responses.create(**ARGS), streams[0], streams[1]

    try:
        plain, live, replayed = await asyncio.to_thread(run)
        assert fake.calls[RESPONSES] == 1
        finals = [check_events(live), check_events(replayed)]
        assert finals[0].model_dump() == finals[1].model_dump() == plain.model_dump()
        assert shape(replayed) == shape(live)
    finally:
        await asyncio.to_thread(client.close)
