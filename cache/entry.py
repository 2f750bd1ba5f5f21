"""One cached answer and its compact wire form (msgpack, zlib for larger bodies).

The stored body is always the *non-streaming* response JSON: a streamed miss is
assembled into it (see :mod:`promptcache.cache.sse`) and a streaming hit is replayed
from it, so one entry serves both kinds of request.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Final

import msgpack

from promptcache.cache.errors import EntryFormatError

_FORMAT: Final = 1
#: Bodies at least this large are stored deflated when that makes them smaller.
COMPRESS_MIN_BYTES: Final = 1024


@dataclass(frozen=True, slots=True)
class Entry:
    """One cached answer: status, body, content type, when it was stored, for which API."""

    status: int
    body: bytes
    content_type: str
    created: float  # unix seconds, for the Age header
    api: str
    deflated: bool = False  # ``body`` is zlib-deflated (``decode(..., inflate=False)``)

    def encode(self) -> bytes:
        body, deflated = self.body, self.deflated
        if not deflated and len(body) >= COMPRESS_MIN_BYTES:
            packed = zlib.compress(body, 1)
            if len(packed) < len(body):
                body, deflated = packed, True
        return msgpack.packb(
            [_FORMAT, self.status, self.content_type, self.created, self.api, deflated, body],
            use_bin_type=True,
        )

    @classmethod
    def decode(cls, data: bytes, *, inflate: bool = True) -> Entry:
        """The entry in ``data``; with ``inflate=False`` a deflated body stays deflated (for
        a caller that accepts ``Content-Encoding: deflate``: zlib's format is HTTP's)."""
        try:
            fmt, status, ctype, created, api, deflated, body = msgpack.unpackb(data, raw=False)
            if fmt != _FORMAT:
                raise EntryFormatError(f"unknown entry format {fmt!r}")
            if deflated and inflate:
                body, deflated = zlib.decompress(body), False
            return cls(int(status), bytes(body), str(ctype), float(created), str(api),
                       bool(deflated))
        except (ValueError, TypeError, zlib.error, msgpack.UnpackException) as exc:
            raise EntryFormatError(str(exc)) from exc


@dataclass(slots=True)
class Answer:
    """A complete upstream answer in non-streaming form: what is stored and shared."""

    status: int
    body: bytes
    content_type: str
    deflated: bool = False  # ``body`` is zlib-deflated (only an exact hit's, see flow.served)

    def inflated(self) -> bytes:
        """The body as the upstream sent it."""
        return zlib.decompress(self.body) if self.deflated else self.body
