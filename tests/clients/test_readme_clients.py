"""The README's "Using it from Python" examples run as written: pointed at the fake upstream
(through OPENAI_BASE_URL, as a user would point them at a real API), the test Redis, and a
test sidecar. Each block runs on a thread (the fake upstream serves from this loop)."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from promptcache.testing import FakeUpstream
from tests.project.test_readme import section
from tests.support.sidecars import RunningSidecar, start_sidecar

CHAT = "/v1/chat/completions"


def python_blocks() -> list[str]:
    return [b for b in re.findall(r"```python\n(.*?)```", section("Using it from Python"), re.S)]


def run_block(code: str, **replace: str) -> list[str]:
    """Exec one README block; what it printed, one entry per print() call."""
    for old, new in replace.items():
        code = code.replace(old, new)
    printed: list[str] = []

    def capture(*args: Any, end: str = "\n", **_: Any) -> None:
        printed.append(" ".join(str(a) for a in args) + end)

    exec(compile(code, "<README>", "exec"), {"__name__": "__readme__", "print": capture})
    return printed


@pytest.fixture
def openai_env(fake: FakeUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", fake.url + "/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-readme")


def test_the_section_has_the_five_examples() -> None:
    blocks = python_blocks()
    assert len(blocks) == 5
    assert "wrap(OpenAI())" in blocks[0] and "AsyncOpenAI" in blocks[1]
    assert "@cache.cached" in blocks[2] and "Cache(" in blocks[3]
    assert "SidecarClient(" in blocks[4]


async def test_wrap_example_answers_twice_and_streams_from_one_model_call(
        fake: FakeUpstream, openai_env: None) -> None:
    printed = await asyncio.to_thread(run_block, python_blocks()[0])
    assert fake.calls[CHAT] == 1
    streamed = "".join(printed)
    assert streamed and fake.requests[0].headers["Authorization"] == "Bearer sk-readme"


async def test_async_wrap_example_prints_miss_then_hit(fake: FakeUpstream, openai_env: None,
                                                       redis_url: str) -> None:
    printed = await asyncio.to_thread(run_block, python_blocks()[1],
                                      **{"redis://localhost:6379": redis_url})
    assert [line.split()[0] for line in printed] == ["MISS", "HIT"]
    assert fake.calls[CHAT] == 1
    assert "x-cache-namespace" not in fake.requests[0].headers


async def test_decorator_example_calls_the_function_once() -> None:
    printed = await asyncio.to_thread(run_block, python_blocks()[2])
    assert len(printed) == 2 and printed[0] == printed[1]


async def test_sync_cache_example_prints_miss_then_hit() -> None:
    printed = await asyncio.to_thread(run_block, python_blocks()[3])
    assert [p.strip() for p in printed] == ["MISS", "HIT"]


async def test_sidecar_client_example(fake: FakeUpstream, redis_url: str,
                                      sidecars: list[RunningSidecar]) -> None:
    sc = await start_sidecar(fake.url, redis_url, admin_token="s3cret")
    sidecars.append(sc)
    printed = await asyncio.to_thread(run_block, python_blocks()[4],
                                      **{"http://127.0.0.1:8080": sc.url})
    assert printed == ["True None\n", "0 entries deleted\n"]
