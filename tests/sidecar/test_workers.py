"""``promptcache serve --workers N`` as a user runs it: a supervisor, its workers on one
socket, and one embedded Redis (server/workers.py); and the parts that need no process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from promptcache.benchmarks import plan
from promptcache.cache.errors import ConfigError
from promptcache.cli import main
from promptcache.server.config import Settings, build_settings
from promptcache.server.workers import RestartPolicy, decode_settings, encode_settings
from promptcache.testing import FakeUpstream
from tests.sidecar.test_cli_embedded import redis_pid
from tests.support.clock import FakeClock
from tests.support.redis_servers import free_port

CHAT = "/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "one answer for all workers"}]}
AUTH = {"Authorization": "Bearer sk-test"}
TOKEN = "s3cret-admin-token"


@asynccontextmanager
async def serve(upstream: str, data_dir: Path, *args: str
                ) -> AsyncIterator[tuple[asyncio.subprocess.Process, str, Path]]:
    """``promptcache serve --workers 2`` (exact tier only), ready; its log file."""
    port = free_port()
    log = data_dir.parent / "serve.log"
    err = await asyncio.to_thread(open, log, "wb")
    with err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "promptcache", "serve", "--upstream", upstream,
            "--port", str(port), "--data-dir", str(data_dir), "--workers", "2",
            "--semantic", "false", *args,
            stdout=asyncio.subprocess.DEVNULL, stderr=err,
            env={**os.environ, "PROMPTCACHE_LOG_LEVEL": "info",
                 "PROMPTCACHE_ADMIN_TOKEN": TOKEN},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as http:
            while True:
                assert proc.returncode is None, log.read_text()
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with http.get(url + "/readyz") as r:
                        if r.status == 200:
                            break
                assert time.monotonic() < deadline, "no worker became ready"
                await asyncio.sleep(0.05)
        yield proc, url, log
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def worker_of(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    """Which worker answers on ``http``'s connection (``/stats``'s ``worker``)."""
    async with http.get(url + "/stats", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        assert r.status == 200
        stats = await r.json()
    assert stats["settings"]["admin_token"] == "***"  # the token reached the worker
    worker: dict[str, Any] = stats["worker"]
    return worker


@asynccontextmanager
async def one_connection_per_worker(url: str, workers: int = 2
                                    ) -> AsyncIterator[dict[int, aiohttp.ClientSession]]:
    """A client pinned (one kept-alive connection) to each worker, by pid: new connections
    are opened until every worker has accepted one."""
    pinned: dict[int, aiohttp.ClientSession] = {}
    opened: list[aiohttp.ClientSession] = []
    try:
        deadline = time.monotonic() + 30
        while len(pinned) < workers:
            assert time.monotonic() < deadline, f"only workers {sorted(pinned)} answered"
            http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
            opened.append(http)
            pid = (await worker_of(http, url))["pid"]
            if pid in pinned:  # that worker again (the other may still be starting)
                await asyncio.sleep(0.05)
            else:
                pinned[pid] = http
        yield pinned
    finally:
        for http in opened:
            await http.close()


async def ask(http: aiohttp.ClientSession, url: str) -> str:
    async with http.post(url + CHAT, json=BODY, headers=AUTH) as r:
        assert r.status == 200
        return r.headers["X-Cache"]


def running(pid: int) -> bool:
    """Is ``pid`` a live process (a zombie counts as gone)?"""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


async def gone(pid: int, within: float = 15.0) -> bool:
    deadline = time.monotonic() + within
    while running(pid):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and running(int(entry.name)):
            with contextlib.suppress(OSError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def redis_servers_in(data_dir: Path) -> list[int]:
    """The live redis-server processes running in ``data_dir``."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if (entry.name.isdigit() and b"redis-server" in (entry / "cmdline").read_bytes()
                    and os.readlink(entry / "cwd") == str(data_dir.absolute())
                    and running(int(entry.name))):
                found.append(int(entry.name))
    return found


# =============================================================================================
# real processes
# =============================================================================================


@pytest.mark.slow
async def test_two_workers_share_one_embedded_redis_and_one_port(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """An entry stored through one worker is an exact HIT from the other; there is one
    redis-server, and each worker says in /stats which it is; the admin token reaches the
    workers through their pipe, never their command line or environment."""
    data_dir = tmp_path / "data"
    async with serve(fake.url, data_dir) as (proc, url, _), \
            one_connection_per_worker(url) as pinned:
        (first_pid, first), (second_pid, second) = pinned.items()
        assert await ask(first, url) == "MISS"
        assert await ask(second, url) == "HIT"
        infos = [await worker_of(http, url) for http in (first, second)]
        assert [i["pid"] for i in infos] == [first_pid, second_pid]  # the same connections
        assert sorted(i["index"] for i in infos) == [0, 1]
        assert {i["workers"] for i in infos} == {2}
        assert fake.calls[CHAT] == 1
        assert redis_servers_in(data_dir) == [redis_pid(data_dir)]
        assert sorted(children(proc.pid)) == sorted([redis_pid(data_dir), *pinned])
        for pid in pinned:
            for seen in ("cmdline", "environ"):
                text = await asyncio.to_thread(Path(f"/proc/{pid}/{seen}").read_bytes)
                assert TOKEN.encode() not in text, seen


@pytest.mark.slow
async def test_a_killed_worker_is_restarted_while_the_other_keeps_answering(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    async with serve(fake.url, tmp_path / "data") as (_, url, log):
        async with one_connection_per_worker(url) as pinned:
            victim, http = next(iter(pinned.items()))
            index = (await worker_of(http, url))["index"]
            before = set(pinned)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        seen: set[int] = set()
        answers = []
        while not seen - before:  # every request is answered until the new worker serves
            assert time.monotonic() < deadline, "the killed worker was not replaced"
            async with aiohttp.ClientSession() as fresh:  # a new connection each time
                answers.append(await ask(fresh, url))
                worker = await worker_of(fresh, url)
            seen.add(worker["pid"])
            await asyncio.sleep(0.05)
        assert worker["index"] == index and worker["pid"] != victim
        assert set(answers) <= {"MISS", "HIT"} and answers.count("MISS") <= 1
        assert (f"worker {index} (pid {victim}) exited with status -9 (SIGKILL); "
                "restarting it") in log.read_text()


@pytest.mark.slow
async def test_sigterm_drains_a_request_in_flight_then_stops_workers_and_redis(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    async with serve(fake.url, data_dir) as (proc, url, log), aiohttp.ClientSession() as http:
        async with one_connection_per_worker(url) as pinned:
            workers = list(pinned)
        redis = redis_pid(data_dir)
        fake.hold()
        in_flight = asyncio.create_task(ask(http, url))
        await fake.wait_for_requests(1, CHAT, within=10)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while "stopping the workers" not in log.read_text():
            assert time.monotonic() < deadline, "the supervisor did not start stopping"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # the drain waits for the held request...
        assert proc.returncode is None and not in_flight.done()
        fake.release()
        assert await in_flight == "MISS"  # ...which is answered in full
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        for pid in [*workers, redis]:
            assert await gone(pid), f"pid {pid} outlived the supervisor"


@pytest.mark.slow
async def test_a_killed_supervisor_takes_its_workers_and_redis_with_it(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    async with serve(fake.url, data_dir) as (proc, url, _):
        left = children(proc.pid)
        assert len(left) == 3 and redis_pid(data_dir) in left
        proc.kill()
        await proc.wait()
        for pid in left:
            assert await gone(pid), f"pid {pid} was orphaned"


@pytest.mark.slow
async def test_a_second_supervisor_on_a_taken_port_fails_instead_of_sharing_it(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    async with serve(fake.url, tmp_path / "data") as (_, url, _):
        port = url.rpartition(":")[2]
        second = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "promptcache", "serve", "--upstream", fake.url,
            "--port", port, "--data-dir", str(tmp_path / "other"), "--workers", "2",
            stderr=asyncio.subprocess.PIPE)
        _, err = await asyncio.wait_for(second.communicate(), 30)
        assert second.returncode == 2 and b"cannot listen on" in err, err


@pytest.mark.slow
async def test_workers_crashing_in_a_loop_make_the_supervisor_give_up(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """Workers that cannot start (no such model) are restarted with a backoff, then the
    supervisor gives up: status 1, and its Redis stopped."""
    data_dir = tmp_path / "data"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "promptcache", "serve", "--upstream", fake.url,
        "--port", str(free_port()), "--data-dir", str(data_dir), "--workers", "2",
        "--embedding-model", str(tmp_path / "no-model"),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PROMPTCACHE_LOG_LEVEL": "warning"},
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), 50)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = err.decode()
    assert proc.returncode == 1, text
    assert "restarting it in 0.5 s" in text
    assert "a crash loop; stopping the workers and giving up" in text
    assert redis_servers_in(data_dir) == []


# =============================================================================================
# without processes
# =============================================================================================


def test_workers_auto_is_the_number_of_usable_cores() -> None:
    def workers(value: str) -> int:
        return build_settings({"upstream": "http://up.test", "workers": value}, {}).workers

    assert workers("auto") == len(os.sched_getaffinity(0))
    assert workers("3") == 3
    assert build_settings({"upstream": "http://up.test"}, {}).workers == 1
    with pytest.raises(ConfigError, match="--workers must be >= 1"):
        workers("0")


def test_settings_cross_the_pipe_unchanged_secrets_and_tuples_included() -> None:
    settings = Settings(upstream="http://up.test", upstream_api_key="sk-up", admin_token=TOKEN,
                        credential_headers=("authorization", "x-key"), workers=4)
    assert decode_settings(encode_settings(settings)) == settings


def test_restarts_back_off_while_workers_die_young_and_give_up_on_a_crash_loop() -> None:
    clock = FakeClock()
    policy = RestartPolicy(5, window=60, min_backoff=0.5, max_backoff=4, stable_after=30,
                           clock=clock)
    assert [policy.crashed(0, lived=1) for _ in range(5)] == [0, 0.5, 1, 2, 4]
    assert policy.crashed(1, lived=1) is None  # the 6th exit within the minute
    policy = RestartPolicy(5, window=60, clock=clock)
    waits = []
    for _ in range(8):  # a worker that crashes every 20 s is restarted every time
        clock.advance(20)
        waits.append(policy.crashed(0, lived=1))
    assert None not in waits and waits[-1] == 10  # backed off to the most
    clock.advance(60)
    assert policy.crashed(0, lived=45) == 0  # it had stayed up: restarted at once


def test_plan_with_two_workers_counts_each_worker_but_the_mapped_weights_once(
    capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["plan", "--entries", "10000", "--avg-request-chars", "300",
            "--avg-response-bytes", "1500", "--json"]
    figures = []
    for workers in ("1", "2"):
        assert main([*argv, "--workers", workers]) == 0
        figures.append(json.loads(capsys.readouterr().out))
    one, two = figures
    assert two["process_bytes_per_node"] == 2 * one["process_bytes_per_node"] == (
        2 * plan.PROCESS_BYTES)
    assert two["model_bytes_per_node"] == one["model_bytes_per_node"] == plan.MODEL_BYTES
    assert two["node_bytes"] == 2 * one["node_bytes"] - plan.MODEL_BYTES
    assert two["worker_bytes"] == one["worker_bytes"] == one["node_bytes"]
