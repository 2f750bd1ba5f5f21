"""The vector record stored beside an entry: what a node needs to index it.

A record holds the entry's scope, the text that was embedded, the float16 vector, the
entry's namespace and digest, the name of the model that made the vector and, when the
cascade's first stage is on, the text's 32-byte first-stage code and the name of the static
model that made it. So a node rebuilds its indexes from the store at start-up without
embedding anything (and re-embeds records made by another model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import msgpack
import numpy as np

from promptcache.cache.errors import EntryFormatError

_FORMAT: Final = 3  # 3 added the first-stage code, 2 the model name; 1 and 2 are still read


@dataclass(frozen=True, slots=True)
class VectorRecord:
    """One entry's vector and the scope and text it was made from (msgpack on the wire)."""

    scope: str
    text: str
    vector: np.ndarray  # float32 (dim,)
    namespace: str
    digest: str
    model: str = ""  # the embedder that made the vector ("" = unknown)
    code: bytes = b""  # the first stage's code of ``text`` (b"" = none)
    code_model: str = ""  # the static model that made ``code``

    def encode(self) -> bytes:
        half = np.asarray(self.vector, dtype=np.float16).tobytes()
        return msgpack.packb([_FORMAT, self.scope, self.text, half, self.namespace,
                              self.digest, self.model, self.code, self.code_model],
                             use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> VectorRecord:
        try:
            fields: list[Any] = msgpack.unpackb(data, raw=False)
            fmt, scope, text, half, namespace, digest, *rest = fields
            if fmt not in (1, 2, _FORMAT) or len(rest) != {1: 0, 2: 1, 3: 3}[fmt]:
                raise EntryFormatError(f"unknown vector record format {fmt!r}")
            vector = np.frombuffer(half, dtype=np.float16).astype(np.float32)
            defaults: list[Any] = ["", b"", ""]
            model, code, code_model = [*rest, *defaults[len(rest):]]
            return cls(str(scope), str(text), vector, str(namespace), str(digest),
                       str(model), bytes(code), str(code_model))
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise EntryFormatError(str(exc)) from exc


def vector_id(digest: str) -> int:
    """The FAISS id of an entry: 60 bits of its digest."""
    return int(digest[:15], 16)
