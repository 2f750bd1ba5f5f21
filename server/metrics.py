"""Prometheus metrics of one sidecar, on a registry of its own (no process globals).

What hits saved (:class:`~promptcache.cache.savings.Savings`) is read at scrape time into
``promptcache_tokens_saved_total{model,namespace,kind}`` and
``promptcache_cost_saved_total{model,namespace}``, and what followers' fallbacks spent into
``promptcache_tokens_spent_total`` and ``promptcache_cost_spent_total`` (the same labels;
tenants only in ``/stats``, never in a label).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from promptcache.cache.savings import Savings

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
)


#: The gauges read at scrape time: key -> (metric name, help).
GAUGES: Final = {
    "entries": ("promptcache_entries",
                "Entries in the cache, all nodes (read at scrape time)"),
    "budget_bytes": ("promptcache_budget_used_bytes",
                     "Bytes counted against --max-bytes, all nodes (payload, vector record, "
                     "keys, bookkeeping; read at scrape time)"),
    "max_bytes": ("promptcache_budget_max_bytes",
                  "The byte budget (--max-bytes; 0 = unbounded)"),
    "evicted": ("promptcache_evicted_entries",
                "Entries this node evicted to make room"),
    "rss": ("promptcache_resident_bytes",
            "Resident memory (RSS) of this sidecar process"),
    "memory_shed": ("promptcache_memory_shed",
                    "1 while RSS is over --max-rss and the semantic tier is shed"),
    "memory_sheds": ("promptcache_memory_sheds",
                     "Times RSS passed --max-rss since start (the tier was shed each time)"),
    "bytes_stored": ("promptcache_redis_used_memory_bytes",
                     "Redis used_memory (read at scrape time)"),
    "index_vectors": ("promptcache_index_vectors",
                      "Vectors in this node's semantic index"),
    "index_bytes": ("promptcache_index_bytes",
                    "Estimated bytes of this node's semantic index"),
    "vector_backlog": ("promptcache_vector_backlog",
                       "Entries stored by this node still waiting for their vector (they "
                       "answer exact matches meanwhile)"),
    "breaker_open": ("promptcache_cache_circuit_open",
                     "1 while the cache circuit breaker is open"),
    "near_bytes": ("promptcache_near_cache_bytes",
                   "Bytes held by this node's near cache (keys, values and a fixed overhead "
                   "an entry)"),
    "near_max_bytes": ("promptcache_near_cache_max_bytes",
                       "Bound of this node's near cache (--near-cache-bytes; 0 = off)"),
    "near_entries": ("promptcache_near_cache_entries", "Entries in this node's near cache"),
    "near_enabled": ("promptcache_near_cache_enabled",
                     "1 while the near cache serves (client tracking is on)"),
}

#: The near cache's counters (read from its stats at scrape time): key -> (name, help).
NEAR_COUNTERS: Final = {
    "hits": ("promptcache_near_cache_hits", "Exact lookups served from this node's near "
             "cache, without a Redis round trip"),
    "misses": ("promptcache_near_cache_misses", "Exact lookups the near cache did not have "
               "while on (read from Redis)"),
    "fills": ("promptcache_near_cache_fills", "Entries read from Redis into the near cache"),
    "invalidations": ("promptcache_near_cache_invalidations", "Keys invalidated by Redis "
                      "client tracking (or by this node's own writes)"),
    "flushes": ("promptcache_near_cache_flushes", "Times the near cache was emptied (a "
                "FLUSHALL, or a tracking connection lost or restored)"),
}


class SavingsCollector(Collector):
    """The counters of a :class:`Savings`, by model and namespace, made at scrape time."""

    def __init__(self, savings: Savings) -> None:
        self.savings = savings

    def collect(self) -> Iterator[Metric]:
        currency = self.savings.prices.currency
        tokens = CounterMetricFamily(
            "promptcache_tokens_saved", "Tokens of the stored answers served by hits (their "
            "usage), by model, namespace and kind (input, output)",
            labels=["model", "namespace", "kind"])
        cost = CounterMetricFamily(
            "promptcache_cost_saved", f"What the tokens hits saved would have cost upstream "
            f"({currency}, from the --prices table; 0 for unpriced models)",
            labels=["model", "namespace"])
        spent_tokens = CounterMetricFamily(
            "promptcache_tokens_spent", "Tokens of upstream calls counted against the "
            "savings (single-flight followers that called upstream after waiting)",
            labels=["model", "namespace", "kind"])
        spent_cost = CounterMetricFamily(
            "promptcache_cost_spent", f"What those calls cost ({currency})",
            labels=["model", "namespace"])
        for model, namespace, t in self.savings.series():
            tokens.add_metric([model, namespace, "input"], t.input)
            tokens.add_metric([model, namespace, "output"], t.output)
            cost.add_metric([model, namespace], t.cost)
            if t.calls:
                spent_tokens.add_metric([model, namespace, "input"], t.spent_input)
                spent_tokens.add_metric([model, namespace, "output"], t.spent_output)
                spent_cost.add_metric([model, namespace], t.spent_cost)
        yield from (tokens, cost, spent_tokens, spent_cost)


class Metrics:
    """The sidecar's Prometheus metrics, and the cache flow's reports into them."""

    def __init__(self, savings: Savings | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        #: What hits saved (priced by the --prices table, if any).
        self.savings = savings or Savings()
        r.register(SavingsCollector(self.savings))
        self.requests = Counter(
            "promptcache_requests", "Requests by route and cache status "
            "(HIT, SEMANTIC-HIT, MISS, BYPASS, ERROR for refused input, PASS for uncached "
            "routes)",
            ["route", "cache"], registry=r,
        )
        self.upstream_seconds = Histogram(
            "promptcache_upstream_seconds", "Upstream call latency (to the end of the body)",
            ["route"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.lookup_seconds = Histogram(
            "promptcache_lookup_seconds", "Cache lookup latency", buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.semantic_seconds = Histogram(
            "promptcache_semantic_lookup_seconds", "Semantic lookup latency (embed, search, "
            "fetch, verify)", buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.bypasses = Counter(
            "promptcache_bypasses", "Requests that went upstream because the cache failed",
            registry=r,
        )
        self.stores = Counter("promptcache_stores", "Entries written", registry=r)
        self.stored_bytes = Counter(
            "promptcache_stored_bytes", "Bytes of entries written", registry=r
        )
        self.not_stored = Counter(
            "promptcache_not_stored", "Answers not cached, by reason", ["reason"], registry=r
        )
        self.coalesced = Counter(
            "promptcache_coalesced", "Misses answered by another request's upstream call "
            "(single flight)", registry=r,
        )
        self.gauges = {key: Gauge(name, doc, registry=r) for key, (name, doc) in GAUGES.items()}
        self.near = {key: Counter(name, doc, registry=r)
                     for key, (name, doc) in NEAR_COUNTERS.items()}
        self._near_seen: dict[str, int] = {}
        self._requests: dict[tuple[str, str], Any] = {}
        self.semantic_skipped = Gauge(
            "promptcache_semantic_skipped", "Semantic work this node skipped, by reason "
            "(read at scrape time): shed (a lookup that would have waited past "
            "--semantic-wait-budget for the model), deadline (an embed or verify past "
            "--embed-timeout), too_long (a text past the model's window: exact-only), "
            "exact_only (an entry left without a vector: the backlog was full)",
            ["reason"], registry=r,
        )
        self.audit_audited = Counter(
            "promptcache_audit_audited", "Semantic hits re-asked upstream and judged by the "
            "false-hit audit (--audit-rate)", registry=r)
        self.audit_disagreed = Counter(
            "promptcache_audit_disagreed", "Audited semantic hits whose fresh answer the "
            "judge found different from the one served", registry=r)
        self.audit_rate = Gauge(
            "promptcache_audit_false_hit_rate", "The audit's false-hit estimate (corrected "
            "by the exact-hit control), by namespace (read at scrape time)", ["namespace"],
            registry=r)
        self.audit_exceeded = Gauge(
            "promptcache_audit_bound_exceeded", "1 while --max-false-hit-rate holds a "
            "namespace's similarity floor raised (or its semantic tier off)", ["namespace"],
            registry=r)
        self._audit_seen = (0, 0)
        self.memory = Gauge(
            "promptcache_memory_bytes", "This sidecar's memory by part: anon and file (RSS's "
            "anonymous and file-backed pages), model (weights), near (the near cache), "
            "static_model, index (vector index and first-stage codes), memo (embedding "
            "memos), other (RSS minus the "
            "named parts)", ["part"], registry=r,
        )

    def set_near(self, stats: dict[str, Any]) -> None:
        """The near cache's figures from its :meth:`stats` (counters advance by what they
        grew since the last scrape)."""
        self.set_gauges(near_bytes=stats["bytes"], near_max_bytes=stats["max_bytes"],
                        near_entries=stats["entries"], near_enabled=int(stats["enabled"]))
        for key, counter in self.near.items():
            grew = stats[key] - self._near_seen.get(key, 0)
            if grew > 0:
                counter.inc(grew)
            self._near_seen[key] = stats[key]

    def set_audit(self, stats: dict[str, Any]) -> None:
        """The audit's figures from its :meth:`stats` (counters advance by what they grew)."""
        audited, disagreed = self._audit_seen
        if stats["audited"] > audited:
            self.audit_audited.inc(stats["audited"] - audited)
        if stats["disagreed"] > disagreed:
            self.audit_disagreed.inc(stats["disagreed"] - disagreed)
        self._audit_seen = (stats["audited"], stats["disagreed"])
        for name, ns in stats["namespaces"].items():
            if ns["false_hit_rate"] is not None:
                self.audit_rate.labels(name).set(ns["false_hit_rate"])
            self.audit_exceeded.labels(name).set(int(ns["bound_exceeded"]))

    def set_gauges(self, **values: float) -> None:
        """Set gauges of :data:`GAUGES` by key (read at scrape time)."""
        for key, value in values.items():
            self.gauges[key].set(value)

    # -- the cache flow's reports (promptcache.cache.flow.FlowMetrics) ----------------------

    def on_lookup(self, seconds: float) -> None:
        self.lookup_seconds.observe(seconds)

    def on_semantic(self, seconds: float) -> None:
        self.semantic_seconds.observe(seconds)

    def on_store(self, nbytes: int) -> None:
        self.stores.inc()
        self.stored_bytes.inc(nbytes)

    def on_not_stored(self, reason: str) -> None:
        self.not_stored.labels(reason).inc()

    def on_outcome(self, endpoint: str, status: str) -> None:
        self.request_counter(endpoint, status).inc()

    def request_counter(self, route: str, status: str) -> Any:
        """The requests counter's child for (route, status), looked up once: a label lookup
        costs more than the increment, and every request makes one."""
        child = self._requests.get((route, status))
        if child is None:
            child = self._requests[(route, status)] = self.requests.labels(route, status)
        return child

    def on_bypass(self) -> None:
        self.bypasses.inc()

    def on_coalesced(self) -> None:
        self.coalesced.inc()
