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

    def encode(self) -> bytes:
        body, deflated = self.body, False
        if len(body) >= COMPRESS_MIN_BYTES:
            packed = zlib.compress(body, 1)
            if len(packed) < len(body):
                body, deflated = packed, True
        return msgpack.packb(
            [_FORMAT, self.status, self.content_type, self.created, self.api, deflated, body],
            use_bin_type=True,
        )

    @classmethod
    def decode(cls, data: bytes) -> Entry:
        try:
            fmt, status, ctype, created, api, deflated, body = msgpack.unpackb(data, raw=False)
            if fmt != _FORMAT:
                raise EntryFormatError(f"unknown entry format {fmt!r}")
            if deflated:
                body = zlib.decompress(body)
            return cls(int(status), bytes(body), str(ctype), float(created), str(api))
        except (ValueError, TypeError, zlib.error, msgpack.UnpackException) as exc:
            raise EntryFormatError(str(exc)) from exc


@dataclass(slots=True)
class Answer:
    """A complete upstream answer in non-streaming form: what is stored and shared."""

    status: int
    body: bytes
    content_type: str
