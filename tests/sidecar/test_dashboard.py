"""The status page (GET /dashboard): who may load it, and what it renders, checked in a real
headless Chromium against /stats; plus the latency windows behind its latency table."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import uuid
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from promptcache.server.dashboard import LatencyWindows, _loopback
from promptcache.testing import FakeUpstream
from tests.sidecar.test_sidecar_exact import CHAT, chat, post, stream
from tests.support.sidecars import RunningSidecar, start_sidecar

TOKEN = "dash-secret-7f3a"
STATUSES = ("HIT", "SEMANTIC-HIT", "MISS", "BYPASS")
#: Debian's package (`.ci/run` installs it when missing).
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


# -- the latency windows --------------------------------------------------------------------


def test_latency_windows_give_nearest_rank_percentiles_per_status() -> None:
    w = LatencyWindows()
    for ms in range(1, 101):  # 1..100 ms
        w.record("HIT", ms / 1000)
    w.record("MISS", 0.25)
    w.record("PASS", 1.0)  # not a cache status the page shows: not kept
    w.record(None, 1.0)
    assert w.summary() == {
        "HIT": {"count": 100, "window": 100, "p50_ms": 50.0, "p99_ms": 99.0},
        "MISS": {"count": 1, "window": 1, "p50_ms": 250.0, "p99_ms": 250.0},
    }


def test_latency_windows_are_bounded_to_the_latest_requests() -> None:
    w = LatencyWindows(size=10)
    for _ in range(1000):
        w.record("MISS", 5.0)
    for _ in range(10):
        w.record("MISS", 0.002)
    assert w.summary()["MISS"] == {"count": 1010, "window": 10, "p50_ms": 2.0, "p99_ms": 2.0}


@pytest.mark.parametrize(("remote", "loopback"), [
    ("127.0.0.1", True), ("::1", True), ("::ffff:127.0.0.1", True), ("127.0.0.2", True),
    ("10.1.2.3", False), ("::ffff:10.1.2.3", False), ("fe80::1%eth0", False), (None, False),
    ("", False), ("not-an-address", False),
])
def test_only_loopback_addresses_count_as_loopback(remote: str | None, loopback: bool) -> None:
    assert _loopback(remote) is loopback


# -- who may load the page --------------------------------------------------------------------


async def test_with_a_token_the_page_needs_it_in_the_header_or_the_query(
    fake: FakeUpstream, redis_url: str, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession,
) -> None:
    sc = await start_sidecar(fake.url, redis_url, admin_token=TOKEN)
    sidecars.append(sc)
    for url, headers in ((sc.url + "/dashboard", {}),
                         (sc.url + "/dashboard?token=wrong", {}),
                         (sc.url + "/dashboard", {"Authorization": "Bearer wrong"}),
                         (sc.url + "/dashboard", {"Authorization": TOKEN})):
        async with http.get(url, headers=headers) as r:
            body = await r.json()
            assert r.status == 401, (url, headers)
            assert body["error"]["type"] == "unauthorized" and TOKEN not in json.dumps(body)
    for url, headers in ((sc.url + "/dashboard", {"Authorization": f"Bearer {TOKEN}"}),
                         (sc.url + f"/dashboard?token={TOKEN}", {})):
        async with http.get(url, headers=headers) as r:
            page = await r.text()
            assert r.status == 200 and r.content_type == "text/html"
            assert r.headers["Referrer-Policy"] == "no-referrer"
            assert r.headers["Cache-Control"] == "no-store"
            csp = r.headers["Content-Security-Policy"]
            assert "default-src 'none'" in csp and "connect-src 'self'" in csp
            assert "unsafe-inline" not in csp
    # Self-contained: nothing is loaded from anywhere (no src/href to other places).
    assert "http://" not in page and "https://" not in page and " src=" not in page
    assert TOKEN not in page  # the page is static: the token is never written into it


async def test_without_a_token_only_loopback_callers_get_the_page(
    sidecar: RunningSidecar, http: aiohttp.ClientSession
) -> None:
    async with http.get(sidecar.url + "/dashboard") as r:
        assert r.status == 200 and "data-stat=\"hit_ratio\"" in await r.text()
    address = _outward_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to call from")
    site = web.TCPSite(sidecar.runner, address, 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    async with http.get(f"http://{address}:{port}/dashboard") as r:
        body = await r.json()
        assert r.status == 403 and body["error"]["type"] == "forbidden"
    async with http.get(f"http://{address}:{port}/stats") as r:
        assert r.status == 200  # /stats stays open as before


def _outward_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            address = str(s.getsockname()[0])
        except OSError:
            return None
    return None if address.startswith("127.") else address


# -- what the page renders, in a real browser -------------------------------------------------


class _Stats(HTMLParser):
    """The text of every element with a data-stat attribute (name -> text)."""

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, str] = {}
        self._open: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("meta", "br", "img", "input", "link"):
            return
        name = dict(attrs).get("data-stat")
        self._open.append((tag, name))
        if name is not None:
            self.values[name] = ""

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            if self._open.pop()[0] == tag:
                break

    def handle_data(self, data: str) -> None:
        for _, name in self._open:
            if name is not None:
                self.values[name] += data


async def _chromium(*args: str, profile: Path) -> bytes:
    if CHROMIUM is None:
        pytest.fail("the status page test needs a headless Chromium: apt-get install -y "
                    "chromium (Debian's package; .ci/run installs it when missing)")
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-extensions", "--disable-background-networking", "--disable-sync",
        "--disable-default-apps", "--disable-component-update", "--mute-audio",
        f"--user-data-dir={profile}", "--virtual-time-budget=4000", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out


def _number(text: str) -> float:
    return float(text.replace(",", "").removesuffix("%").strip())


def _expected(stats: dict[str, Any]) -> dict[str, tuple[float | str, float]]:
    """What the page must show for ``stats``: data-stat -> (value, tolerance of display)."""
    totals: dict[str, int] = {}
    for by_status in stats["requests"].values():
        for status, n in by_status.items():
            totals[status] = totals.get(status, 0) + n
    lookups = sum(totals.get(s, 0) for s in STATUSES)
    cache, near = stats["cache"], stats["near_cache"]
    want: dict[str, tuple[float | str, float]] = {
        "hit_ratio": (stats["hit_ratio"] * 100, 0.05),
        "upstream_calls": (stats["upstream_calls"], 0),
        "budget.used_bytes": (cache["bytes"], 0),
        "budget.entries": (cache["entries"], 0),
        "budget.evicted": (cache["evicted"], 0),
        "budget.over_budget": (cache["over_budget"], 0),
        "breaker.state": (cache["circuit"], 0),
        "breaker.trips": (cache["circuit_trips"], 0),
        "cache.reachable": ("yes", 0),
        "near.hits": (near["hits"], 0),
        "near.misses": (near["misses"], 0),
        "near.entries": (near["entries"], 0),
        "near.bytes": (near["bytes"], 0),
        # The process's RSS moves between two reads: the same to within a tenth.
        "memory.rss_bytes": (stats["memory"]["rss_bytes"], stats["memory"]["rss_bytes"] / 10),
        "audit": ("not enabled", 0),
        "index.vectors": ("\u2014", 0),  # the semantic tier is off here
    }
    for s in (*STATUSES, "ERROR", "PASS"):
        want[f"tier.{s}.requests"] = (totals.get(s, 0), 0)
    for s in STATUSES:
        want[f"tier.{s}.share"] = (totals.get(s, 0) / lookups * 100, 0.05)
    for s, lat in stats["latency"].items():
        want[f"latency.{s}.count"] = (lat["count"], 0)
        want[f"latency.{s}.p50_ms"] = (lat["p50_ms"], 0.005)
        want[f"latency.{s}.p99_ms"] = (lat["p99_ms"], 0.005)
    if cache["max_bytes"]:
        want["budget.used_pct"] = (cache["bytes"] / cache["max_bytes"] * 100, 0.05)
        want["budget.max_bytes"] = (cache["max_bytes"], 0)
    savings = stats.get("savings")
    if isinstance(savings, dict):  # the savings report, where this sidecar has one
        want["savings.tokens_input"] = (savings["tokens_saved"]["input"], 0)
        want["savings.tokens_output"] = (savings["tokens_saved"]["output"], 0)
        for name in ("cost_saved", "net_cost_saved"):  # 2, 4 or 6 decimals
            cost = savings[name]
            shown_to = 2 if abs(cost) >= 1 else 4 if abs(cost) >= 0.01 else 6
            want[f"savings.{name}"] = (cost, 0.5 * 10**-shown_to)
        want["savings.currency"] = (savings["currency"], 0)
    else:
        want["savings.tokens_input"] = ("\u2014", 0)
    return want


async def test_the_page_renders_the_numbers_of_stats_in_a_headless_browser(
    fake: FakeUpstream, redis_url: str, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession, tmp_path: Path,
) -> None:
    """Traffic through a live sidecar; Chromium loads /dashboard?token=..; every number the
    page rendered equals /stats read once the traffic stopped; a screenshot is saved."""
    prices = tmp_path / "prices.toml"
    prices.write_text('currency = "EUR"\n[models."gpt-test"]\n'
                      "input_per_million = 2000.0\noutput_per_million = 8000.0\n")
    sc = await start_sidecar(fake.url, redis_url, admin_token=TOKEN, max_bytes=64 << 20,
                             prices=str(prices))
    sidecars.append(sc)
    run = uuid.uuid4().hex[:8]
    for i in range(8):
        body = chat(f"dashboard {run} question {i}")
        statuses = [(await post(http, sc, body))[1]["X-Cache"] for _ in range(1 + i % 3)]
        assert statuses[0] == "MISS" and all(s == "HIT" for s in statuses[1:])
    await stream(http, sc, chat(f"dashboard {run} streamed", stream=True))
    await stream(http, sc, chat(f"dashboard {run} streamed", stream=True))
    await post(http, sc, chat(f"dashboard {run} fresh"), headers={"Cache-Control": "no-store"})
    assert (await post(http, sc, b"{not json"))[0] == 400
    async with http.get(sc.url + "/v1/models", headers={"Authorization": "Bearer sk-a"}) as r:
        assert r.status == 200

    url = f"{sc.url}/dashboard?token={TOKEN}"
    netlog = tmp_path / "net.json"
    shot = tmp_path / "dashboard.png"
    dom, _ = await asyncio.gather(
        _chromium("--dump-dom", f"--log-net-log={netlog}",
                  "--net-log-capture-mode=IncludeSensitive", url, profile=tmp_path / "p1"),
        _chromium(f"--screenshot={shot}", "--window-size=1280,900", "--hide-scrollbars", url,
                  profile=tmp_path / "p2"),
    )
    async with http.get(sc.url + "/stats") as r:
        stats = await r.json()

    parser = _Stats()
    parser.feed(dom.decode())
    shown = parser.values
    assert 'data-loaded="1"' in dom.decode(), "the page never rendered /stats"
    assert stats["requests"][CHAT]["HIT"] == 8 and stats["latency"]["HIT"]["count"] == 8
    assert stats["upstream_calls"] == 10  # 8 misses, 1 streamed, 1 no-store; not /v1/models
    for name, (value, tolerance) in _expected(stats).items():
        assert name in shown, f"the page shows no {name!r}"
        if isinstance(value, str):
            assert shown[name].strip() == value, (name, shown[name], value)
        else:
            assert abs(_number(shown[name]) - value) <= tolerance + 1e-9, (
                name, shown[name], value)
    assert stats["savings"]["tokens_saved"]["output"] > 0 and stats["savings"]["cost_saved"] > 0

    # The token went out in the navigation only: /stats was asked with the header, and no
    # request after the navigation has it in its URL.
    log = netlog.read_text()
    urls = [e["params"]["url"] for e in _events(log) if "url" in e.get("params", {})]
    stats_urls = [u for u in urls if u.split("?")[0].endswith("/stats")]
    assert stats_urls, "the page did not read /stats"
    assert all(TOKEN not in u for u in stats_urls)
    assert f"Bearer {TOKEN}" in log  # the Authorization header of those requests
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _events(netlog: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(netlog)
    except json.JSONDecodeError:  # the browser may stop before closing the array
        data = json.loads(netlog.rstrip().rstrip(",") + "]}")
    return list(data.get("events", []))
