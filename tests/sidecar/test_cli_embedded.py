"""`promptcache serve` as a user runs it: a real process on the embedded Redis."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from promptcache.testing import FakeUpstream
from tests.redis.test_embedded import process_alive, wait_until_gone
from tests.support.redis_servers import free_port

pytestmark = pytest.mark.slow
CHAT = "/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "persist me"}]}


@asynccontextmanager
async def serve(upstream: str, data_dir: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process,
                                                                       str]]:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "promptcache", "serve", "--upstream", upstream,
        "--port", str(port), "--data-dir", str(data_dir),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PROMPTCACHE_LOG_LEVEL": "warning"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as http:
            while True:
                assert proc.returncode is None, "promptcache serve exited early"
                try:
                    async with http.get(url + "/readyz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                assert time.monotonic() < deadline, "sidecar did not become ready"
                await asyncio.sleep(0.05)
        yield proc, url
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


def redis_pid(data_dir: Path) -> int:
    match = re.search(r"redis=(\d+)", (data_dir / "promptcache.lock").read_text())
    assert match, "the lock file names the redis-server pid"
    return int(match.group(1))


async def ask(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.post(
            url + CHAT, json=BODY, headers={"Authorization": "Bearer sk-test"}) as r:
        assert r.status == 200
        return r.headers["X-Cache"]


async def test_embedded_mode_keeps_entries_across_a_restart_and_leaves_no_redis_behind(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    async with serve(fake.url, data_dir) as (proc, url):
        assert [await ask(url), await ask(url)] == ["MISS", "HIT"]
        pid = redis_pid(data_dir)
        assert process_alive(pid)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        assert wait_until_gone(pid), "SIGTERM must stop the embedded redis-server"

    async with serve(fake.url, data_dir) as (proc, url):
        assert await ask(url) == "HIT", "persistence keeps the entry across a restart"
        pid = redis_pid(data_dir)
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 20)
        assert wait_until_gone(pid), "SIGINT must stop the embedded redis-server"
    assert fake.calls[CHAT] == 1


async def test_a_crashed_sidecar_takes_its_redis_with_it(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    async with serve(fake.url, data_dir) as (proc, url):
        assert await ask(url) == "MISS"
        pid = redis_pid(data_dir)
        proc.kill()
        await proc.wait()
        assert wait_until_gone(pid), "SIGKILL of the sidecar must not orphan redis-server"
    async with serve(fake.url, data_dir) as (_, url):  # restarts at once on the same dir
        assert await ask(url) == "HIT"


async def test_serve_without_upstream_fails_with_a_clear_message(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTCACHE_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "promptcache", "serve", "--data-dir", str(tmp_path),
        stderr=asyncio.subprocess.PIPE, env=env,
    )
    _, err = await proc.communicate()
    assert proc.returncode == 2 and b"--upstream is required" in err


async def test_serve_embeds_on_onnx_runtime_and_never_loads_torch(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    async with serve(fake.url, tmp_path / "data") as (proc, url):
        assert await ask(url) == "MISS"
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 30
            while True:  # the new entry's vector, made by this process's model
                async with http.get(url + "/stats") as r:
                    semantic = (await r.json())["semantic"]
                if semantic["embedded"] >= 1:
                    break
                assert time.monotonic() < deadline, f"no vector was made: {semantic}"
                await asyncio.sleep(0.1)
        maps = await asyncio.to_thread(Path(f"/proc/{proc.pid}/maps").read_text)
        assert "libonnxruntime" in maps
        assert "libtorch" not in maps and "libc10" not in maps
