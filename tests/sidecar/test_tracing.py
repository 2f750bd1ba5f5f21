"""OpenTelemetry tracing (cache/tracing.py, ``--otel``): the span tree of a miss and a hit,
its attributes, the traceparent sent upstream and continued from the caller, recorded with
the SDK's in-memory exporter; and nothing at all with tracing off."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from promptcache.cache import tracing
from promptcache.cache.protocols import Embedder
from promptcache.testing import FakeUpstream
from tests.sidecar.test_semantic import ask
from tests.sidecar.test_semantic import chat as semantic_chat
from tests.support.sidecars import RunningSidecar, start_sidecar

CHAT = "/v1/chat/completions"
PROMPT = "What is the tallest mountain on Mars?"


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    """The process's tracer provider (an SDK one, set once) with an in-memory exporter."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    assert isinstance(trace.get_tracer_provider(), TracerProvider)
    memory = InMemorySpanExporter()
    processor = SimpleSpanProcessor(memory)
    provider.add_span_processor(processor)  # type: ignore[union-attr]
    yield memory
    processor.shutdown()


@pytest.fixture
def spans(exporter: InMemorySpanExporter) -> Iterator[InMemorySpanExporter]:
    exporter.clear()
    yield exporter
    exporter.clear()


async def traced_sidecar(fake: FakeUpstream, redis_url: str, sidecars: list[RunningSidecar],
                         **overrides: Any) -> RunningSidecar:
    sc = await start_sidecar(fake.url, redis_url, otel=True, **overrides)
    sidecars.append(sc)
    assert tracing.TRACER is not None
    return sc


async def post(http: aiohttp.ClientSession, sc: RunningSidecar, content: str = PROMPT,
               **headers: str) -> str:
    async with http.post(sc.url + CHAT, json={"model": "gpt-test", "messages": [
            {"role": "user", "content": content}]},
            headers={"Authorization": "Bearer sk-alice", **headers}) as r:
        assert r.status == 200, await r.text()
        await r.read()
        return r.headers["X-Cache"]


def tree(finished: tuple[ReadableSpan, ...]) -> dict[str, list[str]]:
    """Each request span's children, by name (a request span's id -> sorted child names)."""
    roots = {s.context.span_id: s for s in finished if s.name == "promptcache.request"}
    out: dict[str, list[str]] = {}
    for span_id, root in roots.items():
        kids = sorted(s.name for s in finished
                      if s.parent is not None and s.parent.span_id == span_id)
        out[str(root.attributes["promptcache.cache"])] = kids  # type: ignore[index]
    return out


def by_name(finished: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in finished if s.name == name]


async def test_a_miss_and_a_hit_make_the_expected_spans_and_traceparent_goes_upstream(
    spans: InMemorySpanExporter, fake: FakeUpstream, redis_url: str,
    sidecars: list[RunningSidecar], http: aiohttp.ClientSession
) -> None:
    sc = await traced_sidecar(fake, redis_url, sidecars)
    assert await post(http, sc, **{"X-Cache-Namespace": "geo"}) == "MISS"
    assert await post(http, sc, **{"X-Cache-Namespace": "geo"}) == "HIT"
    finished = spans.get_finished_spans()
    assert tree(finished) == {
        "MISS": ["promptcache.lookup", "promptcache.store", "promptcache.upstream"],
        "HIT": ["promptcache.lookup"],
    }
    miss, hit = by_name(finished, "promptcache.request")
    assert miss.context.trace_id != hit.context.trace_id  # two requests, two traces
    assert miss.parent is None and hit.parent is None
    for root in (miss, hit):
        assert root.attributes is not None
        assert root.attributes["promptcache.endpoint"] == CHAT
        assert root.attributes["promptcache.namespace"] == "geo"
        assert root.kind == trace.SpanKind.SERVER
    # Nothing a caller sent is an attribute: neither the prompt nor the credential.
    for s in finished:
        for value in (s.attributes or {}).values():
            assert "Mars" not in str(value) and "sk-alice" not in str(value)

    (upstream,) = by_name(finished, "promptcache.upstream")
    (sent,) = fake.requests_to(CHAT)
    version, trace_id, parent_id, flags = sent.headers["traceparent"].split("-")
    assert version == "00" and int(flags, 16) & 1  # sampled
    assert int(trace_id, 16) == miss.context.trace_id == upstream.context.trace_id
    assert int(parent_id, 16) == upstream.context.span_id
    assert upstream.kind == trace.SpanKind.CLIENT


async def test_an_incoming_traceparent_is_continued(
    spans: InMemorySpanExporter, fake: FakeUpstream, redis_url: str,
    sidecars: list[RunningSidecar], http: aiohttp.ClientSession
) -> None:
    sc = await traced_sidecar(fake, redis_url, sidecars)
    caller_trace, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    incoming = f"00-{caller_trace}-{caller_span}-01"
    assert await post(http, sc, "continued?", traceparent=incoming,
                      tracestate="vendor=1") == "MISS"
    (root,) = by_name(spans.get_finished_spans(), "promptcache.request")
    assert root.context.trace_id == int(caller_trace, 16)
    assert root.parent is not None and root.parent.span_id == int(caller_span, 16)
    (sent,) = fake.requests_to(CHAT)
    assert sent.headers.getall("traceparent") == [sent.headers["traceparent"]]
    _, trace_id, parent_id, _ = sent.headers["traceparent"].split("-")
    assert trace_id == caller_trace and parent_id != caller_span  # our upstream span's
    assert sent.headers["tracestate"] == "vendor=1"


async def test_an_unsampled_request_records_nothing_and_passes_its_context_upstream(
    spans: InMemorySpanExporter, fake: FakeUpstream, redis_url: str,
    sidecars: list[RunningSidecar], http: aiohttp.ClientSession
) -> None:
    """A caller's trace that is not sampled (flags 00): no span is recorded for the request
    or its steps, and the upstream gets the caller's trace, still unsampled."""
    sc = await traced_sidecar(fake, redis_url, sidecars)
    caller_trace = "5bf92f3577b34da6a3ce929d0e0e4736"
    incoming = f"00-{caller_trace}-00f067aa0ba902b7-00"
    assert await post(http, sc, "not sampled", traceparent=incoming) == "MISS"
    assert await post(http, sc, "not sampled", traceparent=incoming) == "HIT"
    assert spans.get_finished_spans() == ()
    (sent,) = fake.requests_to(CHAT)
    _, trace_id, _, flags = sent.headers["traceparent"].split("-")
    assert trace_id == caller_trace and flags == "00"


async def test_a_semantic_hit_records_the_search_and_its_similarity(
    spans: InMemorySpanExporter, fake: FakeUpstream, redis_url: str,
    sidecars: list[RunningSidecar], http: aiohttp.ClientSession, embedder: Embedder
) -> None:
    sc = await traced_sidecar(fake, redis_url, sidecars, embedder=embedder)
    h1, _ = await ask(http, sc, semantic_chat("How do I reset my password?"))
    h2, _ = await ask(http, sc, semantic_chat("How can I reset my password?"))
    assert (h1["X-Cache"], h2["X-Cache"]) == ("MISS", "SEMANTIC-HIT")
    finished = spans.get_finished_spans()
    assert tree(finished)["SEMANTIC-HIT"] == ["promptcache.lookup",
                                              "promptcache.semantic_search"]
    root = next(s for s in by_name(finished, "promptcache.request")
                if s.attributes and s.attributes["promptcache.cache"] == "SEMANTIC-HIT")
    similarity = float(h2["X-Cache-Similarity"])
    assert root.attributes is not None
    assert root.attributes["promptcache.similarity"] == pytest.approx(similarity, abs=1e-4)
    searches = by_name(finished, "promptcache.semantic_search")
    assert [s.attributes.get("promptcache.similarity") is not None  # type: ignore[union-attr]
            for s in searches] == [False, True]  # the miss found nothing


async def test_with_tracing_off_nothing_is_recorded_and_traceparent_passes_as_sent(
    spans: InMemorySpanExporter, fake: FakeUpstream, redis_url: str,
    sidecars: list[RunningSidecar], http: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(fake.url, redis_url)
    sidecars.append(sc)
    assert tracing.TRACER is None
    incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert await post(http, sc, "untraced", traceparent=incoming) == "MISS"
    assert await post(http, sc, "untraced") == "HIT"
    assert spans.get_finished_spans() == ()
    assert fake.requests_to(CHAT)[0].headers["traceparent"] == incoming


def test_without_opentelemetry_tracing_stays_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # as if it were not installed
    assert tracing.enable() is False
    assert tracing.TRACER is None


def test_the_sidecar_runs_without_opentelemetry_installed() -> None:
    """With the package made unimportable, the sidecar's modules load and tracing is off."""
    code = ("import sys; sys.modules['opentelemetry'] = None; "
            "import promptcache.server.app, promptcache.cache.flow; "
            "from promptcache.cache import tracing; "
            "assert tracing.enable() is False and tracing.TRACER is None")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_with_nothing_to_record_spans_tracing_stays_off() -> None:
    """opentelemetry installed, but no SDK provider set and no OTLP exporter to set one up
    with: every span would be dropped, so tracing stays off and costs nothing."""
    code = ("from opentelemetry import trace; "
            "from promptcache.cache import tracing; "
            "assert tracing.enable() is False and tracing.TRACER is None; "
            "assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
