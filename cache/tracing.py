"""Optional OpenTelemetry tracing: spans for a cached request and each step it takes.

With ``--otel true`` and the ``otel`` extra installed (``opentelemetry-api``, and the SDK to
record anything), every request to a cached route is a span ``promptcache.request`` (a child
of the caller's span when it sends a W3C ``traceparent``), with children::

    promptcache.request          promptcache.cache (HIT, SEMANTIC-HIT, MISS, BYPASS),
    |                            promptcache.endpoint, promptcache.namespace,
    |                            promptcache.similarity (a semantic hit)
    +- promptcache.lookup        the exact tier
    +- promptcache.semantic_search   promptcache.similarity (when it found one)
    +- promptcache.upstream      the upstream call; its context goes upstream as
    |                            traceparent / tracestate
    +- promptcache.store         writing the answer

Attributes never hold the prompt, the answer or the credential. The exporter is the
operator's, configured the standard way (``OTEL_*`` environment variables): if the SDK and
the OTLP exporter are installed and nothing set a tracer provider yet, :func:`enable` sets
one up with the OTLP exporter; otherwise the global provider is left as it is (one that an
``opentelemetry-instrument`` launcher, or the embedding application, configured).

If no provider would record a span (none set, and no OTLP exporter to set one up with),
tracing stays off, with a warning: spans nobody records would only cost requests time.

Tracing is per process: :data:`TRACER` is the tracer while it is on, and None otherwise
(the default, and always without ``opentelemetry``). The request path checks that one
attribute at each step and does nothing more when it is None: no import, no context
manager, no call.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Mapping, MutableMapping
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger(__name__)
T = TypeVar("T")

#: The tracer while tracing is on; None while it is off (see the module doc).
TRACER: Tracer | None = None


def enable() -> bool:
    """Turn tracing on for this process; False (and a warning) without ``opentelemetry``."""
    global TRACER
    try:
        from opentelemetry import trace
    except ImportError:
        log.warning("--otel is on but opentelemetry is not installed "
                    "(pip install 'promptcache[otel]'): no spans are recorded")
        return False
    _configure_sdk(trace)
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        # Nothing would record a span: tracing would cost every request and give nothing.
        log.warning("--otel is on but no tracer provider records spans (install an OTLP "
                    "exporter, or run under opentelemetry-instrument): tracing stays off")
        return False
    _bind()
    TRACER = provider.get_tracer("promptcache")
    return True


#: What the request path calls, bound once by :func:`enable` (an import statement or a
#: module attribute per call costs more than the call, on a path of ~100 us).
_extract: Any = None
_attach: Any = None
_detach: Any = None
_in_context: Any = None
_current_span: Any = None
_SERVER: Any = None
_CLIENT: Any = None


def _bind() -> None:
    global _extract, _attach, _detach, _in_context, _current_span, _SERVER, _CLIENT
    from opentelemetry.context import attach, detach
    from opentelemetry.propagate import extract
    from opentelemetry.trace import SpanKind, get_current_span, set_span_in_context

    _extract, _attach, _detach, _in_context = extract, attach, detach, set_span_in_context
    _current_span = get_current_span
    _SERVER, _CLIENT = SpanKind.SERVER, SpanKind.CLIENT


def disable() -> None:
    """Turn tracing off for this process (the sidecar's shutdown)."""
    global TRACER
    TRACER = None


def _configure_sdk(trace: Any) -> None:
    """Give the process an SDK tracer provider exporting over OTLP (configured by the
    ``OTEL_*`` environment variables), if the SDK and the exporter are installed and no
    provider was set; otherwise leave the global provider as it is."""
    try:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        return
    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return  # configured already (by the application, or opentelemetry-instrument)
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore
            OTLPSpanExporter,
        )
    except ImportError:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore
                OTLPSpanExporter,
            )
        except ImportError:
            log.info("opentelemetry has no OTLP exporter installed; spans go to the "
                     "tracer provider already set, if any")
            return
    provider = TracerProvider()  # its resource comes from OTEL_SERVICE_NAME and the like
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)


#: Whether the current request's span records (it was sampled): its steps get spans only
#: then; an unsampled request still hands its trace context upstream.
_RECORDING: ContextVar[bool] = ContextVar("promptcache_trace_recording", default=False)


def active() -> bool:
    """Whether the steps of the current request are traced (on, and sampled)."""
    return TRACER is not None and _RECORDING.get()


def start_request(headers: Mapping[str, str], endpoint: str, namespace: str
                  ) -> tuple[Span, tuple[object, Token[bool]]]:
    """Start (and make current) the root span of one cached request, continuing the
    caller's ``traceparent``; :func:`end_request` ends it."""
    assert TRACER is not None
    parent = _extract(headers) if "traceparent" in headers else None
    span = TRACER.start_span("promptcache.request", context=parent, kind=_SERVER,
                             attributes={"promptcache.endpoint": endpoint,
                                         "promptcache.namespace": namespace})
    return span, (_attach(_in_context(span)), _RECORDING.set(span.is_recording()))


def end_request(span: Span, tokens: tuple[object, Token[bool]], status: str | None,
                similarity: str | None) -> None:
    """Record how the request was answered (the X-Cache headers' values), and end its
    span."""
    outcome(span, status, similarity)
    _RECORDING.reset(tokens[1])
    _detach(tokens[0])
    span.end()


def outcome(span: Span, status: str | None, similarity: str | None) -> None:
    """Record on the request's span how it was answered (the X-Cache headers' values)."""
    if status is not None:
        span.set_attribute("promptcache.cache", status)
    if similarity is not None:
        try:
            span.set_attribute("promptcache.similarity", float(similarity))
        except ValueError:
            pass


async def traced(name: str, step: Awaitable[T]) -> T:
    """Await ``step`` inside a span ``name`` (a child of the current span; a leaf, so it is
    not made current)."""
    assert TRACER is not None
    span = TRACER.start_span(name)
    try:
        return await step
    finally:
        span.end()


async def traced_search(step: Awaitable[T]) -> T:
    """Await a semantic search inside ``promptcache.semantic_search``, with the similarity
    of what it found."""
    assert TRACER is not None
    span = TRACER.start_span("promptcache.semantic_search")
    try:
        hit = await step
        similarity = getattr(hit, "similarity", None)
        if similarity is not None:
            span.set_attribute("promptcache.similarity", float(similarity))
        return hit
    finally:
        span.end()


def upstream_span() -> Span:
    """A started span for the upstream call (a child of the current span); the caller ends
    it. It is not made current: :func:`inject` hands its context upstream."""
    assert TRACER is not None
    if not _RECORDING.get():  # unsampled: the request's context goes upstream as it is
        return _current_span()  # (a non-recording span: ending it does nothing)
    return TRACER.start_span("promptcache.upstream", kind=_CLIENT)


def inject(headers: MutableMapping[str, str], span: Span) -> None:
    """Set ``traceparent`` (and ``tracestate``) in ``headers`` for ``span``, replacing any
    the caller sent."""
    from opentelemetry.propagate import inject as w3c_inject

    for name in ("traceparent", "tracestate"):
        if name in headers:
            del headers[name]  # every copy of it, in a multidict
    w3c_inject(headers, context=_in_context(span))
