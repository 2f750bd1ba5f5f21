"""Per-request cache directives from the Cache-Control request header.

- ``no-cache``: skip the lookup, call upstream, and refresh the entry.
- ``no-store``: do not store this answer (a lookup may still hit).
- ``max-age=N``: store the answer with a TTL of N seconds, and accept only an entry
  at most N seconds old. ``max-age=0`` means neither lookup nor store.
Both ``no-cache`` and ``no-store`` (or ``max-age=0``) bypass the cache entirely.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from promptcache.cache.errors import RequestError

#: RFC 9111 section 1.2.2: delta-seconds too large to hold are taken as 2**31.
MAX_AGE_CAP = 2**31


@dataclass(frozen=True, slots=True)
class CacheControl:
    """The cache directives of one request's Cache-Control header."""

    no_cache: bool = False
    no_store: bool = False
    max_age: int | None = None

    @classmethod
    def parse(cls, values: Iterable[str]) -> CacheControl:
        no_cache = no_store = False
        max_age: int | None = None
        for value in values:
            for directive in value.split(","):
                name, _, arg = directive.strip().partition("=")
                name = name.strip().lower()
                if name == "no-cache":
                    no_cache = True
                elif name == "no-store":
                    no_store = True
                elif name == "max-age":
                    arg = arg.strip().strip('"')
                    if not (arg.isascii() and arg.isdigit()):
                        raise RequestError(
                            "Cache-Control max-age must be a non-negative integer of seconds",
                            param="Cache-Control",
                        )
                    # Past the cap's own length the digits need not be read (int() refuses
                    # strings of more than 4,300 digits, which would be a 500).
                    digits = arg.lstrip("0") or "0"
                    long = len(digits) > len(str(MAX_AGE_CAP))
                    max_age = MAX_AGE_CAP if long else min(int(digits), MAX_AGE_CAP)
        if max_age == 0:
            no_cache = no_store = True
        return cls(no_cache, no_store, max_age)

    @property
    def bypass(self) -> bool:
        return self.no_cache and self.no_store

    def accepts_age(self, age: int) -> bool:
        return self.max_age is None or age <= self.max_age
