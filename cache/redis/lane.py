"""A pipelined lane for the exact-hit GET: one connection, many commands in flight.

Every exact lookup is one ``GET``. Through redis-py each takes a pooled connection, writes
its command, waits for its reply alone and gives the connection back: per command, a pool
round, a write system call, a read system call and the client's bookkeeping (retries,
observability hooks, a read timeout). Under concurrency that is most of the sidecar's CPU
on a hit.

A :class:`GetLane` sends the GETs of all concurrent lookups down one connection of its own,
each as soon as it is asked (Redis answers in order, so replies are matched to callers
first in, first out), and reads the replies as they arrive, several per read, parsed by
hiredis in the transport's callback: no task, no pool, no per-command timeout object.

Failure handling stays the cache's: a lane that loses its connection fails every pending
GET with ``ConnectionError`` (which the exact cache counts against its circuit breaker and
answers as pass-through) and reconnects on the next GET; a lane whose oldest command has
had no reply for ``timeout`` seconds drops the connection the same way, so a hung Redis
never holds callers past their own deadline (they give up at theirs: a reply that comes
later is dropped). At most :data:`MAX_PENDING` GETs wait at once; the next one
raises :class:`LaneBusy` and its caller uses the regular client instead.

The lane serves a single Redis over TCP or a unix socket, with a password, user name and
database as in the URL. TLS (``rediss://``) and Redis Cluster use the regular client
(:func:`lane_for` returns None for them).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any, Final

import hiredis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

#: GETs waiting for a reply at most; one more goes through the regular client.
MAX_PENDING: Final = 4096


class LaneBusy(RedisError):
    """The lane has :data:`MAX_PENDING` GETs in flight: use the regular client."""


def lane_for(client: Any, timeout: float) -> GetLane | None:
    """A lane to the Redis that ``client`` (a ``redis.asyncio.Redis``) talks to, or None
    where lanes do not go (a cluster, TLS)."""
    pool = getattr(client, "connection_pool", None)
    if pool is None or issubclass(pool.connection_class, SSLConnection):
        return None
    kw = pool.connection_kwargs
    if issubclass(pool.connection_class, UnixDomainSocketConnection):
        address: tuple[str, ...] = (kw["path"],)
    else:
        address = (kw.get("host", "localhost"), str(kw.get("port", 6379)))
    return GetLane(address, timeout=timeout, password=kw.get("password"),
                   username=kw.get("username"), db=int(kw.get("db") or 0))


def _pack(*args: bytes | str) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a.encode() if isinstance(a, str) else a
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(parts)


class _Protocol(asyncio.Protocol):
    """One lane connection: writes commands, hands each reply to the oldest waiter."""

    def __init__(self, lane: GetLane) -> None:
        self.lane = lane
        self.reader = hiredis.Reader(replyError=ResponseError)
        self.transport: asyncio.Transport | None = None
        self.pending: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.progress = 0  # replies read so far (the watchdog compares)
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        pending = self.pending
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                self.fail(RedisConnectionError(f"unreadable reply from Redis: {exc}"))
                return
            if reply is False:
                return
            self.progress += 1
            if not pending:  # a reply nobody asked for: the stream is out of step
                self.fail(RedisConnectionError("a reply from Redis that no command asked for"))
                return
            fut = pending.popleft()
            if not fut.done():  # its caller may have given up
                if isinstance(reply, ResponseError):
                    fut.set_exception(reply)
                else:
                    fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError(f"lane connection to Redis lost: {exc!r}"))

    def send(self, command: bytes) -> asyncio.Future[Any]:
        assert self.transport is not None
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending.append(fut)
        self.transport.write(command)
        return fut

    def fail(self, exc: Exception) -> None:
        """Close the connection and fail whatever waits on it."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        while self.pending:
            fut = self.pending.popleft()
            if not fut.done():
                fut.set_exception(exc)
        self.lane.lost(self)


class GetLane:
    """Pipelined GETs to one Redis over one connection (see the module doc)."""

    def __init__(self, address: tuple[str, ...], *, timeout: float,
                 password: str | None = None, username: str | None = None, db: int = 0
                 ) -> None:
        self.address = address
        self.timeout = timeout
        self._auth = ([b"AUTH", *([username.encode()] if username else []), password.encode()]
                      if password else None)
        self._db = db
        self._conn: _Protocol | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None
        self._watch: asyncio.TimerHandle | None = None
        self.connects = 0

    async def get(self, key: str) -> bytes | None:
        conn = self._conn
        if conn is None or conn.closed:
            conn = await self._connect()
        if len(conn.pending) >= MAX_PENDING:
            raise LaneBusy(f"{MAX_PENDING} GETs already wait on the lane")
        fut = conn.send(_pack(b"GET", key))
        if self._watch is None:
            self._arm(conn)
        result: bytes | None = await fut
        return result

    async def connect(self, within: float) -> None:
        """Open the connection now, allowing it ``within`` seconds (start-up: the first
        lookup's budget is for the GET, not for connecting)."""
        await self._connect(within)

    async def _connect(self, within: float | None = None) -> _Protocol:
        """The lane's connection, opened once for all callers that need it at the same
        time; shielded, so a caller that gives up does not leave it half open."""
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open(within or self.timeout))
            self._connecting.add_done_callback(self._opened)
        return await asyncio.shield(self._connecting)

    def _opened(self, task: asyncio.Task[_Protocol]) -> None:
        self._connecting = None
        if not task.cancelled() and task.exception() is None:
            self._conn = task.result()

    async def _open(self, within: float) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(within):
                if len(self.address) == 1:
                    _, conn = await loop.create_unix_connection(lambda: _Protocol(self),
                                                                self.address[0])
                else:
                    _, conn = await loop.create_connection(lambda: _Protocol(self),
                                                           self.address[0],
                                                           int(self.address[1]))
                try:
                    if self._auth:
                        await conn.send(_pack(*self._auth))
                    if self._db:
                        await conn.send(_pack(b"SELECT", str(self._db)))
                except BaseException:
                    conn.fail(RedisConnectionError("lane handshake failed"))
                    raise
        except (OSError, TimeoutError) as exc:
            raise RedisConnectionError(f"lane could not connect to Redis: {exc!r}") from exc
        self.connects += 1
        return conn

    def _arm(self, conn: _Protocol) -> None:
        self._watch = asyncio.get_running_loop().call_later(
            self.timeout, self._check, conn, conn.progress)

    def _check(self, conn: _Protocol, progress: int) -> None:
        """The watchdog: a connection with GETs pending that read no reply for a whole
        ``timeout`` is dropped (its callers fail now rather than at their deadlines)."""
        self._watch = None
        if conn.closed or not conn.pending:
            return
        if conn.progress == progress:
            conn.fail(RedisConnectionError(
                f"no reply from Redis in {self.timeout:g} s on the lane"))
            return
        self._arm(conn)

    def lost(self, conn: _Protocol) -> None:
        if self._conn is conn:
            self._conn = None
            if self._watch is not None:
                self._watch.cancel()
                self._watch = None

    async def aclose(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(BaseException):
                await self._connecting
        if self._conn is not None:
            self._conn.fail(RedisConnectionError("lane closed"))
            self._conn = None
