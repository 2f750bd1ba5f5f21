"""A deterministic fake of the OpenAI and Anthropic HTTP APIs, for tests and benchmarks.

Like ``httpx.MockTransport`` or ``structlog.testing``, this is a test double users may want too:
point a client (or the promptcache sidecar) at ``fake.url`` instead of the real API.

Answers are a pure function of the request body (minus ``stream``/``stream_options``), so an
identical request always gets an identical answer and any change gets a different one. Every
request is recorded, and failures can be injected per request::

    async with running_fake_upstream() as fake:
        fake.fail_next(503, n=2, path="/v1/chat/completions")
        fake.break_stream_next(after_chunks=2)   # next SSE stream dies before its terminator
        fake.hold()                              # park requests until fake.release()
        ...
        assert fake.calls["/v1/chat/completions"] == 1
        assert fake.requests[-1].headers["authorization"] == "Bearer sk-test"

Order of work for each request: record it, take any matching injected failure, wait at the
gate (``hold``/``release``), sleep ``latency``, then answer (the failure, or the route).

``answer_words=N`` pads every answer with N deterministic filler words, for realistic
response sizes; ``GET /_fake/stats`` returns the call counts (for a fake in another process).

Routes: ``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``,
``/v1/responses`` (OpenAI),
``POST /v1/messages`` (Anthropic), ``GET /v1/models``; any other ``/v1/...`` is a 404 in the API's
own error shape (:func:`error_body`), and ``/echo/...`` echoes the request back.

Only aiohttp (and its multidict) is needed, so benchmarks can import it too; it also runs as a
process: ``python -m promptcache.testing --port 8001`` prints its URL and serves until killed.

Modules, one idea each: :mod:`~promptcache.testing.answers` (the deterministic content),
:mod:`~promptcache.testing.openai_routes`, :mod:`~promptcache.testing.responses_routes`,
:mod:`~promptcache.testing.anthropic_routes`,
:mod:`~promptcache.testing.echo`, :mod:`~promptcache.testing.errors` (error shapes),
:mod:`~promptcache.testing.wire` (JSON bodies, SSE framing), :mod:`~promptcache.testing.recording`,
:mod:`~promptcache.testing.faults`, :mod:`~promptcache.testing.server` and
:mod:`~promptcache.testing.cli`.
"""

from promptcache.testing.answers import (
    CREATED,
    DEFAULT_MODEL,
    EMBEDDING_DIM,
    MODELS,
    request_digest,
)
from promptcache.testing.cli import main
from promptcache.testing.errors import error_body
from promptcache.testing.recording import RecordedRequest
from promptcache.testing.server import FakeUpstream, Handler, running_fake_upstream

__all__ = [
    "CREATED",
    "DEFAULT_MODEL",
    "EMBEDDING_DIM",
    "MODELS",
    "FakeUpstream",
    "Handler",
    "RecordedRequest",
    "error_body",
    "main",
    "request_digest",
    "running_fake_upstream",
]
