"""Warm starts: a deployment's entries out to JSON lines, and back into another deployment.

:func:`export_entries` SCANs the entry keys (every master of a cluster) and writes one JSON
object a line::

    {"namespace": "docs" | null,       # the name, when known (from the vector record)
     "namespace_id": "16 hex",         # what the entry's Redis key holds
     "digest": "32 hex",               # the request key; ends with its tenant's tag
     "tenant_tag": "8 hex",
     "ttl_ms": 81234 | null,           # time left when exported (null: no expiry)
     "exported_ms": 1767000000000,     # when (unix ms), so an import counts the time since
     "entry": "base64",                # the stored bytes, as stored
     "vector": "base64" | null}        # the vector record, if the entry has one

No prompt is written in clear beyond what the entry and its vector record already hold
(an export is as sensitive as the Redis it came from), and never a credential: tenants are
hashes.

:func:`import_entries` checks every line strictly and writes what passes through
:meth:`BudgetStore.put`, so the target's byte budget, its eviction accounting and its change
stream (other nodes' indexes) stay exact. A line is *malformed* (not JSON, a field missing
or of the wrong shape, bytes that are not an entry or a vector record), *refused* (the
seal: its digest does not end with the tenant tag recorded beside it, or its namespace or
vector record names another entry), *expired* (its TTL ran out since the export) or *over
budget* (larger than the target's room for it); each is counted, none stops the import.
As any write, an import evicts the target's least recently used entries to stay within
its budget (counted as ``evicted``): import into a budget smaller than the export and the
lines read last are the ones kept. Tenants
stay sealed: an entry is only ever placed under its own digest, whose tag says which tenant
owns it, so an import cannot move an entry into another tenant's keys.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
from collections.abc import AsyncIterable, Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, Final

from promptcache.cache.entry import Entry
from promptcache.cache.errors import EntryFormatError
from promptcache.cache.keys import TENANT_TAG_LEN
from promptcache.cache.redis.budget import BudgetStore
from promptcache.cache.redis.client import as_text
from promptcache.cache.redis.layout import KeyLayout, namespace_id
from promptcache.cache.semantic.record import VectorRecord

#: Keys read from Redis in one round trip while exporting.
EXPORT_BATCH: Final = 500
_HEX = re.compile(r"^[0-9a-f]+$")


@dataclass(slots=True)
class TransferReport:
    """What an export or an import did, line by line."""

    exported: int = 0
    imported: int = 0
    malformed: int = 0
    refused: int = 0
    expired: int = 0
    over_budget: int = 0
    evicted: int = 0  # entries of the target evicted to make room for imported ones

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class _IdLayout(KeyLayout):
    """A deployment's layout whose ``namespace`` arguments are namespace *ids*: an export
    records the id its keys hold (a namespace's name is not in its keys), and an import
    places the entry back under that id."""

    def member(self, namespace: str, digest: str) -> str:
        return f"{namespace}:{digest}"


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


async def export_entries(client: Any, layout: KeyLayout, write: Callable[[str], object], *,
                         clock: Callable[[], float] = time.time,
                         progress: Callable[[int], object] | None = None) -> TransferReport:
    """Write every entry of the deployment (``client`` and ``layout``) as a JSON line to
    ``write``; ``progress(n)`` is told of each batch of ``n`` entries written."""
    report = TransferReport()
    keys: list[str] = []
    async for key in client.scan_iter(match=layout.patterns()[0], count=1000):
        keys.append(as_text(key))
        if len(keys) >= EXPORT_BATCH:
            await _export_batch(client, layout, keys, write, clock, report, progress)
            keys = []
    if keys:
        await _export_batch(client, layout, keys, write, clock, report, progress)
    return report


async def _export_batch(client: Any, layout: KeyLayout, keys: list[str],
                        write: Callable[[str], object], clock: Callable[[], float],
                        report: TransferReport, progress: Callable[[int], object] | None
                        ) -> None:
    members = [layout.split(k) for k in keys]
    pipe = client.pipeline(transaction=False)
    for key, (shard, member) in zip(keys, members, strict=True):
        pipe.get(key)
        pipe.get(layout.vector_of(shard, member))
        pipe.pttl(key)
    out = await pipe.execute()
    now_ms = int(clock() * 1000)
    written = 0
    for n, (_, member) in enumerate(members):
        entry, vector, pttl = out[3 * n], out[3 * n + 1], int(out[3 * n + 2])
        if entry is None or pttl == -2:  # gone since the scan
            continue
        nsid, _, digest = member.partition(":")
        write(json.dumps({
            "namespace": _namespace_name(nsid, vector),
            "namespace_id": nsid,
            "digest": digest,
            "tenant_tag": digest[-TENANT_TAG_LEN:],
            "ttl_ms": pttl if pttl > 0 else None,
            "exported_ms": now_ms,
            "entry": _b64(entry),
            "vector": _b64(vector),
        }, separators=(",", ":")) + "\n")
        written += 1
    report.exported += written
    if progress is not None:
        progress(written)


def _namespace_name(nsid: str, vector: bytes | None) -> str | None:
    """The namespace's name, when it can be known: the vector record's, or the default."""
    if vector is not None:
        try:
            name = VectorRecord.decode(vector).namespace
        except EntryFormatError:
            name = None
        if name is not None and namespace_id(name) == nsid:
            return name
    return "" if namespace_id("") == nsid else None


class _Malformed(Exception):
    pass


class _Refused(Exception):
    pass


@dataclass(frozen=True, slots=True)
class _Line:
    nsid: str
    digest: str
    ttl_ms: int | None
    entry: bytes
    vector: bytes | None


def _hex(doc: dict[str, Any], name: str, length: int) -> str:
    value = doc.get(name)
    if not (isinstance(value, str) and len(value) == length and _HEX.match(value)):
        raise _Malformed(f"{name} must be {length} lower-case hex digits")
    return value


def _bytes(doc: dict[str, Any], name: str, *, optional: bool = False) -> bytes | None:
    value = doc.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise _Malformed(f"{name} must be base64")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _Malformed(f"{name} must be base64") from exc


def _int_or_none(doc: dict[str, Any], name: str) -> int | None:
    value = doc.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _Malformed(f"{name} must be a positive integer or null")
    return value


def parse_line(text: str, now_ms: int) -> _Line | None:
    """One exported line, checked; None if its TTL ran out since the export. _Malformed or
    _Refused (the seal) otherwise."""
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _Malformed("not JSON") from exc
    if not isinstance(doc, dict):
        raise _Malformed("not a JSON object")
    nsid = _hex(doc, "namespace_id", 16)
    digest = _hex(doc, "digest", 32)
    tag = _hex(doc, "tenant_tag", TENANT_TAG_LEN)
    namespace = doc.get("namespace")
    if namespace is not None and not isinstance(namespace, str):
        raise _Malformed("namespace must be a string or null")
    ttl_ms = _int_or_none(doc, "ttl_ms")
    exported_ms = _int_or_none(doc, "exported_ms")
    entry = _bytes(doc, "entry")
    vector = _bytes(doc, "vector", optional=True)
    assert entry is not None
    try:
        Entry.decode(entry, inflate=False)
        record = VectorRecord.decode(vector) if vector is not None else None
    except EntryFormatError as exc:
        raise _Malformed(f"not an entry or a vector record: {exc}") from exc
    # The seal: the entry goes under its own digest only, which its recorded tenant owns.
    if not digest.endswith(tag):
        raise _Refused("the digest does not end with the recorded tenant tag")
    if namespace is not None and namespace_id(namespace) != nsid:
        raise _Refused("the namespace does not match its id")
    if record is not None and (record.digest != digest or namespace_id(record.namespace) != nsid):
        raise _Refused("the vector record belongs to another entry")
    if ttl_ms is not None and exported_ms is not None:
        ttl_ms -= max(0, now_ms - exported_ms)
        if ttl_ms <= 0:
            return None
    return _Line(nsid, digest, ttl_ms, entry, vector)


async def import_entries(client: Any, layout: KeyLayout, lines: Iterable[str] | AsyncIterable[str],
                         *, max_bytes: int = 0, clock: Callable[[], float] = time.time,
                         progress: Callable[[int], object] | None = None) -> TransferReport:
    """Load exported ``lines`` into the deployment (``client`` and ``layout``) within its byte
    budget ``max_bytes`` (its ``--max-bytes``; 0: unbounded); see the module doc for what is
    counted. ``progress(1)`` is told of each line."""
    store = BudgetStore(client, _IdLayout(layout.prefix, layout.shards), max_bytes=max_bytes,
                        node="import", clock=clock)
    report = TransferReport()
    if isinstance(lines, AsyncIterable):
        async for text in lines:
            await _import_line(store, text, clock, report)
            if progress is not None:
                progress(1)
    else:
        for text in lines:
            await _import_line(store, text, clock, report)
            if progress is not None:
                progress(1)
    return report


async def _import_line(store: BudgetStore, text: str, clock: Callable[[], float],
                       report: TransferReport) -> None:
    if not text.strip():
        return
    try:
        line = parse_line(text, int(clock() * 1000))
    except _Malformed:
        report.malformed += 1
        return
    except _Refused:
        report.refused += 1
        return
    if line is None:
        report.expired += 1
        return
    result = await store.put(line.nsid, line.digest, line.entry, line.vector, line.ttl_ms)
    report.evicted += len(result.evicted)
    if result.stored:
        report.imported += 1
    else:
        report.over_budget += 1
