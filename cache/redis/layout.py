"""Where everything the cache writes lives in Redis: the one module that spells key names.

An entry is ``member = "{nsid}:{digest}"`` (``nsid`` a short hash of the namespace, so a
caller's glob characters never reach SCAN); its keys and its shard's bookkeeping share the
shard's tag, so one script touches one slot::

    {tag}e:{member}   the entry             {tag}lru    ZSET member -> last hit (ms)
    {tag}v:{member}   its vector record     {tag}exp    ZSET member -> expires at (ms)
    {tag}l:{member}   the single-flight     {tag}sizes  HASH member -> bytes counted
                      lease                 {tag}meta   HASH bytes, entries, seq
                                            {tag}log    STREAM of inserts and removals

``tag`` is the prefix (``pc:``) on a single Redis, ``pc:{3}:`` on a Redis Cluster, where
the byte budget and the LRU are split evenly over :data:`CLUSTER_SHARDS` hash tags
(``{0}`` .. ``{15}``), each one slot on one master. A single Redis uses one shard with no
tag, so every entry competes in one global LRU.

The Lua scripts (:mod:`.scripts`) take the entry and vector key prefixes from here as
arguments (:meth:`KeyLayout.script_prefixes`) rather than spelling them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final, NamedTuple

from promptcache.cache.redis.client import is_cluster_url

#: Hash-tag shards of a Redis Cluster deployment (see the module docstring).
CLUSTER_SHARDS: Final = 16


def namespace_id(namespace: str) -> str:
    """A short, glob-safe id of a namespace name (names are caller-chosen strings)."""
    return hashlib.sha256(b"ns\0" + namespace.encode()).hexdigest()[:16]


class ShardKeys(NamedTuple):
    """The bookkeeping keys of one shard: KEYS[1..5] of every bookkeeping script."""

    lru: str
    exp: str
    sizes: str
    meta: str
    log: str


@dataclass(frozen=True, slots=True)
class KeyLayout:
    """The key names of one deployment: ``prefix`` (``--key-prefix``) and its shard count."""

    prefix: str = "pc:"
    shards: int = 1

    @classmethod
    def for_url(cls, url: str, prefix: str = "pc:") -> KeyLayout:
        """The layout of the deployment at ``url``: sharded on a Redis Cluster."""
        return cls(prefix, CLUSTER_SHARDS if is_cluster_url(url) else 1)

    def shard(self, digest: str) -> int:
        return int(digest[:8], 16) % self.shards if self.shards > 1 else 0

    def tag(self, shard: int) -> str:
        return self.prefix if self.shards == 1 else f"{self.prefix}{{{shard}}}:"

    def member(self, namespace: str, digest: str) -> str:
        return f"{namespace_id(namespace)}:{digest}"

    def entry(self, namespace: str, digest: str) -> str:
        return self.entry_of(self.shard(digest), self.member(namespace, digest))

    def vector(self, namespace: str, digest: str) -> str:
        return self.vector_of(self.shard(digest), self.member(namespace, digest))

    def lease(self, namespace: str, digest: str) -> str:
        return f"{self.tag(self.shard(digest))}l:{self.member(namespace, digest)}"

    def entry_of(self, shard: int, member: str) -> str:
        return f"{self.tag(shard)}e:{member}"

    def vector_of(self, shard: int, member: str) -> str:
        return f"{self.tag(shard)}v:{member}"

    def script_prefixes(self, shard: int) -> list[str]:
        """ARGV[1..2] of every bookkeeping script: the entry and the vector key prefix
        (``prefix .. member`` is the key)."""
        return [self.entry_of(shard, ""), self.vector_of(shard, "")]

    def shard_keys(self, shard: int) -> ShardKeys:
        tag = self.tag(shard)
        return ShardKeys(f"{tag}lru", f"{tag}exp", f"{tag}sizes", f"{tag}meta", f"{tag}log")

    def _any_tag(self) -> str:
        return self.prefix if self.shards == 1 else f"{self.prefix}{{*}}:"

    def patterns(self, namespace: str | None = None, tenant_tag: str | None = None
                 ) -> tuple[str, str]:
        """SCAN patterns of the entries and vector records (of one namespace, or all; of one
        tenant, by the tag its digests end with (:func:`~promptcache.cache.keys.tenant_tag`),
        or all)."""
        rest = "*" if namespace is None else f"{namespace_id(namespace)}:*"
        if tenant_tag is not None:
            if not (tenant_tag.isascii() and tenant_tag.isalnum()):
                raise ValueError(f"not a tenant tag: {tenant_tag!r}")
            rest += tenant_tag
        return f"{self._any_tag()}e:{rest}", f"{self._any_tag()}v:{rest}"

    def shard_patterns(self, shard: int) -> tuple[str, str]:
        """SCAN patterns of one shard's entries and vector records."""
        return self.entry_of(shard, "*"), self.vector_of(shard, "*")

    def split(self, key: str) -> tuple[int, str]:
        """(shard, member) of an entry or vector key found by SCAN."""
        rest = key[len(self.prefix):]
        shard = 0
        if self.shards > 1:
            tag, _, rest = rest.partition(":")
            shard = int(tag.strip("{}"))
        return shard, rest[2:]  # drop "e:" / "v:"

    def digest_of(self, member: str) -> str:
        return member.rpartition(":")[2]
