"""The one exception tree of promptcache: the engine's, the sidecar's and the clients'.

::

    PromptCacheError
     +-- ConfigError                bad configuration (flags, environment, TOML file)
     +-- EmbeddedRedisError         the private redis-server could not be started or stopped
     +-- RequestError               a request the cache cannot key (bad JSON, wrong types)
     |    +-- BodyTooLarge          a body above the configured limit
 |    +-- BodyTimeout           a body not received within the configured time
     +-- CacheUnavailable           the cache backend is down, slow, or its circuit is open
     |                              (callers degrade to pass-through; never shown to a client)
     +-- EmbedTimeout               an embedding not ready within its deadline (``embed_timeout``);
     |    |                         the semantic lookup is a miss, the cache itself is fine
     |    +-- ModelPaused           the model is released while memory is over ``--max-rss``
     +-- EntryFormatError           stored bytes that are not an entry or vector record of a
     |                              known format (also a ValueError; read as a miss)
     +-- ClientError                raised by promptcache.clients
          +-- CacheClosed           the in-process cache is not open (or closed already)
          +-- SidecarError          talking to a sidecar failed
               +-- SidecarUnreachable    no connection, or no answer within the timeout
               +-- SidecarResponseError  the sidecar answered with an error (status, type)
                    +-- AdminRefused     401/403: admin token missing, wrong or not set

Backend exceptions (redis-py's ``RedisError``, ``OSError``...) are translated at the
boundary with ``raise X(...) from exc``; nothing here shadows a builtin name. The in-process
cache and ``wrap`` never raise for a cache failure (a failing cache degrades to calling the
upstream); the client errors are for the calls that ask the cache itself something
(``stats``, ``invalidate``...).
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


class BodyTimeout(RequestError):
    """The client did not send the whole request body within ``body_timeout``."""

    status = 408


class CacheUnavailable(PromptCacheError):
    """The backend failed, timed out, or the circuit breaker is open."""


class EmbedTimeout(PromptCacheError):
    """An embedding was not ready within its deadline; the lookup that wanted it is a miss."""


class ModelPaused(EmbedTimeout):
    """The embedding model is released (memory over ``--max-rss``): no embedding now."""


class EntryFormatError(PromptCacheError, ValueError):
    """Stored bytes that are not an entry (or vector record) of a known format."""


class ClientError(PromptCacheError):
    """Base class of the client library's errors."""


class CacheClosed(ClientError):
    """The in-process cache is not open."""


class SidecarError(ClientError):
    """A call to a sidecar failed."""


class SidecarUnreachable(SidecarError):
    """The sidecar could not be reached, or did not answer in time."""


class SidecarResponseError(SidecarError):
    """The sidecar answered with an error status."""

    def __init__(self, status: int, message: str, kind: str | None = None) -> None:
        super().__init__(f"{status} {kind or 'error'}: {message}")
        self.status = status
        self.message = message
        self.kind = kind


class AdminRefused(SidecarResponseError):
    """An admin route refused: no admin token configured (403) or a wrong one (401)."""
