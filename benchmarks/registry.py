"""The benchmarks of ``promptcache bench``: name -> (module, help line).

Each module has ``add_arguments(parser)``, ``main(args)`` and a docstring (its ``--help``).
None is imported here, so ``promptcache bench --help`` lists them all without loading one.
"""

from __future__ import annotations

BENCHMARKS: dict[str, tuple[str, str]] = {
    "exact": ("promptcache.benchmarks.exact",
              "exact hits through the sidecar beside a one-GET aiohttp floor"),
    "semantic": ("promptcache.benchmarks.semantic_speed",
                 "semantic lookup throughput and latency against the model; index search"),
    "budget": ("promptcache.benchmarks.budget",
               "byte budget under a write flood (overshoot, evictions/s); bytes per entry"),
    "hitrate": ("promptcache.benchmarks.hitrate",
                "hit rate against false hits on labelled pairs: the semantic tier's tuner"),
    "load": ("promptcache.benchmarks.load",
             "replay real prompts against a sidecar, closed or open loop; latency by X-Cache"),
    "memory": ("promptcache.benchmarks.memory",
               "bytes per entry by tier and per vector by index kind, against the raw size"),
    "cascade": ("promptcache.benchmarks.cascade",
                "the first stage against MiniLM: hits kept, lookups that skip it, its index"),
    "index": ("promptcache.benchmarks.index_upkeep",
              "index upkeep at scale: insert, re-add, remove, search, the kind switch"),
    "hostile": ("promptcache.benchmarks.hostile",
                "3.5 MB and look-alike long prompts beside exact hits: p99 A/B, wrong shares"),
    "warmup": ("promptcache.benchmarks.warmup",
               "a restarted node loading its semantic index from Redis: time to serve"),
    "soak": ("promptcache.benchmarks.soak",
             "mixed traffic for minutes against its own sidecar: RSS and its parts over time"),
    "conversations": ("promptcache.benchmarks.conversations",
                      "multi-turn pairs through a sidecar: served and false hits by kind"),
    "audit": ("promptcache.benchmarks.audit",
              "the false-hit audit on labelled pairs: estimate vs truth, the bound, its cost"),
    "report": ("promptcache.benchmarks.report",
               "gather the latest results into docs/benchmarks.md with tables and plots"),
}
