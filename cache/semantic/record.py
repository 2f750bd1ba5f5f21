"""The vector record stored beside an entry: what a node needs to index it.

A record holds the entry's scope, the text that was embedded, the float16 vector, the
entry's namespace and digest, and the name of the model that made the vector, so a node
rebuilds its index from the store at start-up (and re-embeds records made by another model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import msgpack
import numpy as np

from promptcache.cache.errors import EntryFormatError

_FORMAT: Final = 2  # 2 added the model name; 1 (without it) is still read


@dataclass(frozen=True, slots=True)
class VectorRecord:
    """One entry's vector and the scope and text it was made from (msgpack on the wire)."""

    scope: str
    text: str
    vector: np.ndarray  # float32 (dim,)
    namespace: str
    digest: str
    model: str = ""  # the embedder that made the vector ("" = unknown)

    def encode(self) -> bytes:
        half = np.asarray(self.vector, dtype=np.float16).tobytes()
        return msgpack.packb([_FORMAT, self.scope, self.text, half, self.namespace,
                              self.digest, self.model], use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> VectorRecord:
        try:
            fmt, scope, text, half, namespace, digest, *rest = msgpack.unpackb(data, raw=False)
            if fmt not in (1, _FORMAT) or len(rest) != fmt - 1:
                raise EntryFormatError(f"unknown vector record format {fmt!r}")
            vector = np.frombuffer(half, dtype=np.float16).astype(np.float32)
            return cls(str(scope), str(text), vector, str(namespace), str(digest),
                       str(rest[0]) if rest else "")
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise EntryFormatError(str(exc)) from exc


def vector_id(digest: str) -> int:
    """The FAISS id of an entry: 60 bits of its digest."""
    return int(digest[:15], 16)
