"""promptcache: a distributed prompt/response cache for LLM traffic.

The engine lives in :mod:`promptcache.cache`, the aiohttp sidecar in
:mod:`promptcache.server`, what applications embed in :mod:`promptcache.clients`
and the benchmark harness in :mod:`promptcache.benchmarks`.
"""

__version__ = "0.1.0"
