"""docs/grafana-dashboard.json and docs/alerts.yml name only metrics a sidecar exports."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from promptcache.testing import FakeUpstream
from tests.sidecar.test_sidecar_exact import chat, post, stream
from tests.support.sidecars import RunningSidecar, start_sidecar

DOCS = Path(__file__).resolve().parents[2] / "docs"
METRIC = re.compile(r"\bpromptcache_[A-Za-z0-9_]*[A-Za-z0-9]")
#: Referenced before the code that exports them lands; each says why. (Remove a name here
#: once a sidecar exports it: the test then checks it like the others.)
PENDING: dict[str, str] = {}


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def _referenced(doc: Any) -> set[str]:
    return {m for s in _strings(doc) for m in METRIC.findall(s)}


def _grafana() -> dict[str, Any]:
    return dict(json.loads((DOCS / "grafana-dashboard.json").read_text()))


def _alerts() -> dict[str, Any]:
    return dict(yaml.safe_load((DOCS / "alerts.yml").read_text()))


def _series_names(exposition: str) -> set[str]:
    """The series names a Prometheus server stores from ``exposition``, as the Python client
    names them: a counter ``x`` as ``x_total``, a histogram's ``_bucket``, ``_sum`` and
    ``_count``; a family is exported even when it has no labelled child yet."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count",
                                                                     "_created"),
                    "summary": ("", "_sum", "_count", "_created")}.get(family.type, ("",))
        names.update(family.name + s for s in suffixes)
        names.update(sample.name for sample in family.samples)
    return names


def test_the_grafana_dashboard_is_a_dashboard_of_prometheus_panels() -> None:
    board = _grafana()
    assert board["title"] == "promptcache" and board["uid"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids repeat"
    charts = [p for p in panels if p["type"] != "row"]
    titles = " ".join(p["title"].lower() for p in charts)
    for subject in ("hit ratio", "upstream", "tokens saved", "cost saved", "latency", "budget",
                    "breaker", "near cache", "semantic", "memory"):
        assert subject in titles, f"no panel about {subject}"
    for p in charts:
        assert p["targets"] and all(t["expr"] and t["refId"] for t in p["targets"]), p["title"]
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        grid = p["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] + grid["w"] <= 24, p["title"]


def test_the_alert_rules_cover_breaker_budget_hit_ratio_and_audit() -> None:
    rules = {r["alert"]: r for g in _alerts()["groups"] for r in g["rules"]}
    assert set(rules) == {"PromptcacheBreakerOpen", "PromptcacheBudgetNearFull",
                          "PromptcacheHitRatioCollapse", "PromptcacheAuditBoundExceeded"}
    for rule in rules.values():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    assert rules["PromptcacheBreakerOpen"]["for"] == "1m"
    budget = rules["PromptcacheBudgetNearFull"]
    assert budget["for"] == "10m" and "0.9 *" in budget["expr"]
    collapse = rules["PromptcacheHitRatioCollapse"]["expr"]
    assert "[10m]" in collapse and "[1d]" in collapse and "(1 / 3)" in collapse
    assert "promptcache_audit_bound_exceeded" in rules["PromptcacheAuditBoundExceeded"]["expr"]


async def test_every_metric_the_dashboard_and_alerts_name_is_exported(
    fake: FakeUpstream, redis_url: str, sidecars: list[RunningSidecar],
    http: aiohttp.ClientSession,
) -> None:
    """A sidecar (semantic tier off) after some traffic exports every promptcache_* series
    the dashboard and the rules query, but the PENDING ones."""
    sc = await start_sidecar(fake.url, redis_url, max_bytes=32 << 20)
    sidecars.append(sc)
    body = chat(f"dashboards {uuid.uuid4().hex}")
    assert (await post(http, sc, body))[1]["X-Cache"] == "MISS"
    assert (await post(http, sc, body))[1]["X-Cache"] == "HIT"
    await stream(http, sc, {**body, "stream": True})
    async with http.get(sc.url + "/metrics") as r:
        assert r.status == 200
        exported = _series_names(await r.text())

    referenced = _referenced(_grafana()) | _referenced(_alerts())
    assert len(referenced) >= 25  # the walk found the queries at all
    assert set(PENDING) <= referenced, "PENDING names a metric nothing references"
    missing = referenced - exported - set(PENDING)
    assert not missing, f"referenced but not exported: {sorted(missing)}"
    # The extraction is strict: a counter without _total, or a histogram's bare name, is not
    # a series Prometheus stores.
    assert "promptcache_requests" not in exported and "promptcache_requests_total" in exported
    assert "promptcache_upstream_seconds_bucket" in exported
    assert "promptcache_upstream_seconds" not in exported
