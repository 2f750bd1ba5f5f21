"""The one exception tree of promptcache.

::

    PromptCacheError
     +-- ConfigError            bad configuration (flags, environment, TOML file)
     +-- EmbeddedRedisError     the private redis-server could not be started or stopped
     +-- RequestError           a request the cache cannot key (bad JSON, wrong field types)
     |    +-- BodyTooLarge      a body above the configured limit
     +-- CacheUnavailable       the cache backend is down, slow, or its circuit is open
                                (callers degrade to pass-through; never shown to a client)

Backend exceptions (redis-py's ``RedisError``, ``OSError``...) are translated at the
boundary with ``raise X(...) from exc``; nothing here shadows a builtin name.
"""

from __future__ import annotations


class PromptCacheError(Exception):
    """Base class of every error promptcache raises on purpose."""


class ConfigError(PromptCacheError):
    """The configuration is invalid; the message says which option and why."""


class EmbeddedRedisError(PromptCacheError):
    """The embedded redis-server could not be started, locked or stopped."""


class RequestError(PromptCacheError):
    """A request body the cache cannot key; maps to an HTTP 4xx."""

    status = 400

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class BodyTooLarge(RequestError):
    """The request body is larger than ``max_body_bytes``."""

    status = 413


class CacheUnavailable(PromptCacheError):
    """The backend failed, timed out, or the circuit breaker is open."""
