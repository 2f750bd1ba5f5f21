"""Errors of the client library, in promptcache's one exception tree.

::

    PromptCacheError                    (promptcache.cache.errors; also ConfigError, ...)
     +-- ClientError                    raised by promptcache.clients
          +-- CacheClosed               the in-process cache is not open (or closed already)
          +-- SidecarError              talking to a sidecar failed
               +-- SidecarUnreachable   no connection, or no answer within the timeout
               +-- SidecarResponseError the sidecar answered with an error (status, type)
                    +-- AdminRefused    401/403: admin token missing, wrong or not configured

The in-process cache and ``wrap`` never raise these for a cache failure: a failing cache
degrades to calling the upstream. They are for the management calls that ask the cache
itself something (``stats``, ``invalidate``...).
"""

from __future__ import annotations

from promptcache.cache.errors import PromptCacheError


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
