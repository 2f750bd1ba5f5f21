"""A sidecar on its own embedded Redis survives that Redis being killed: callers keep getting
answers, and caching resumes by itself, without a restart of the sidecar."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from promptcache.testing import FakeUpstream
from tests.sidecar.test_sidecar_exact import chat, post
from tests.support.sidecars import RunningSidecar, eventually, start_sidecar

pytestmark = pytest.mark.slow


async def test_a_sigkilled_embedded_redis_is_restarted_and_hits_resume_under_traffic(
    fake: FakeUpstream, tmp_path: Path, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession,
) -> None:
    sc = await start_sidecar(fake.url, None,  # type: ignore[arg-type]  # embedded Redis
                             data_dir=str(tmp_path / "data"), breaker_reset=0.2)
    sidecars.append(sc)
    keeper = sc.state.engine.embedded
    assert keeper is not None and keeper.pid is not None
    await post(http, sc, chat("kept"))
    seen: list[tuple[float, int, str]] = []
    stop = asyncio.Event()

    async def traffic() -> None:
        while not stop.is_set():
            status, headers, _ = await post(http, sc, chat("kept"))
            seen.append((time.monotonic(), status, headers["X-Cache"]))

    task = asyncio.create_task(traffic())
    try:
        await eventually(lambda: any(x == "HIT" for _, _, x in seen))
        killed_pid, killed_at = keeper.pid, time.monotonic()
        os.kill(killed_pid, signal.SIGKILL)
        await eventually(lambda: any(t > killed_at and x == "BYPASS" for t, _, x in seen),
                         within=5)
        bypassed_at = min(t for t, _, x in seen if t > killed_at and x == "BYPASS")
        await eventually(lambda: any(t > bypassed_at and x == "HIT" for t, _, x in seen),
                         within=15)
    finally:
        stop.set()
        await task
    assert {status for _, status, _ in seen} == {200}
    # The keeper counts a restart once it has seen the new server ready, which may be a
    # moment after the first request it answers.
    await eventually(lambda: keeper.restarts == 1, within=5)
    assert keeper.pid not in (None, killed_pid)
    # With a data dir the restarted Redis reloaded its AOF: no second upstream call was
    # needed to cache the answer again (the BYPASSed requests did call upstream).
    after = [x for t, _, x in seen if t > bypassed_at]
    assert after[-1] == "HIT" and "MISS" not in after
    async with http.get(sc.url + "/readyz") as r:
        assert r.status == 200
