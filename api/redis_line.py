"""The API's two hottest Redis paths on connections driven by a small protocol of ours, not redis-py's client.

Every job is one guarded send (`api.sender`) and one reply read off a channel (`api.replies`). Through redis-py's
asyncio client each send also takes a connection from the pool and gives it back, under its lock and timeouts,
through its retry and observability wrappers; each message read goes through `PubSub.get_message` and its own
timeout. Measured in one run of two heads over one fleet, those layers were 30% of the API's CPU per list (1.89 ->
1.33 ms with this module) and most of the reply's way back to the caller.

A connection here is still made by redis-py (`attach`): its pool's `make_connection` and `connect` do the
address, TLS, AUTH, SELECT and, with Sentinel, the asking for the current master. Then its transport is handed
to our protocol, which parses with hiredis as redis-py does and turns error replies into redis-py's exception
classes (`NoScriptError`, `ReadOnlyError`, `OutOfMemoryError`...), so callers handle the same errors as before.

- `RedisLine`: commands from any number of coroutines pipelined on one connection, their replies matched in
  order. A lost connection fails every command waiting on it with redis-py's `ConnectionError`; a command not
  answered in time fails with its `TimeoutError` (its reply, if it comes, is skipped), and if nothing at all
  came back meanwhile the connection is dropped as dead; the next command connects again. Through Sentinel, a
  `READONLY` reply (a failover demoted the master) is a `ConnectionError` that drops the connection, as in
  redis-py, so that a retry reaches the new master.
- `api.subscription.follow`: one channel's messages handed to a callback as they are parsed, no task between.
"""

import asyncio
import hashlib
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis._parsers.base import BaseParser
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, NoScriptError, ReadOnlyError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError


class Attached:
    """A connection of redis-py's making whose transport our protocol drives."""

    def __init__(self, transport: asyncio.Transport, pack: Callable[..., list[bytes]], keep: tuple[Any, ...]) -> None:
        self.transport = transport
        self.pack = pack
        self._keep = keep  # redis-py's stream objects: collected, they would close the transport

    def write(self, *args: Any) -> None:
        self.transport.writelines(self.pack(*args))

    def close(self) -> None:
        self.transport.close()


def lost_connection(exc: Exception | None) -> RedisConnectionError:
    """The error of a connection whose transport was lost (`exc`: the OS's reason, if any; never a secret)."""
    return RedisConnectionError(f"Connection to Redis lost{f': {exc}' if exc else ''}")


def _closed() -> RedisConnectionError:
    """The error of a call on a line closed at shutdown (or closed while it connected)."""
    return RedisConnectionError("The connection to Redis was closed")


NOT_ENOUGH_DATA = object()
"""What `reader().gets()` returns while no reply is complete (hiredis' default, False, is also RESP3's false)."""


def reader() -> hiredis.Reader:
    """A RESP parser giving errors as redis-py gives them (`redis._parsers.hiredis` sets hiredis up this way)."""
    return hiredis.Reader(
        protocolError=InvalidResponse, replyError=BaseParser.parse_error, notEnoughData=NOT_ENOUGH_DATA
    )


async def attach(client: aioredis.Redis, protocol: asyncio.Protocol) -> Attached:
    """A new connection of `client`'s pool, past redis-py's handshake, its transport handed to `protocol`."""
    connection = client.connection_pool.make_connection()
    try:
        await connection.connect()
    except BaseException:  # cancelled or failed half-way (during AUTH, say): close what was opened
        if connection._writer is not None:
            connection._writer.close()
        raise
    streams = (connection._reader, connection._writer)
    writer = streams[1]
    if writer is None:
        raise RedisConnectionError("redis-py made no stream for the connection")
    connection._reader = connection._writer = None  # ours now: redis-py must not close it when collected
    transport = writer.transport
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    return Attached(transport, connection.pack_command, (connection, *streams))


class _LineProtocol(asyncio.Protocol):
    def __init__(self, line: "RedisLine") -> None:
        self._line = line
        self._reader = reader()
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.received = 0
        """Reads so far: a command that times out while others were answered leaves a connection that works."""

    def data_received(self, data: bytes) -> None:
        self.received += 1
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not NOT_ENOUGH_DATA:
            if not self.waiting:  # a reply nobody asked for: the connection is out of step
                self._line.drop(self)
                return
            future = self.waiting.popleft()
            if future.done():  # its caller gave up on it (timed out or cancelled): its reply is skipped
                continue
            if isinstance(reply, ReadOnlyError) and self._line.failover:
                # As redis-py's Sentinel connections do: the master we reached was demoted. The sentinels name
                # the new one to the next connection; the caller may retry on it.
                future.set_exception(RedisConnectionError("The previous master is now a replica"))
                self._line.drop(self)
            elif isinstance(reply, RedisError):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._line.lost(self, exc)

    def fail(self, error: RedisError) -> None:
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)


class RedisLine:
    """Commands pipelined on one connection of `client`'s making, replies matched in order; reconnects on use."""

    def __init__(self, client: aioredis.Redis, *, timeout: float) -> None:
        self._client = client
        self._timeout = timeout
        pool = client.connection_pool
        self.failover = isinstance(pool, SentinelConnectionPool) and pool.is_master
        """Whether the line reaches a master through Sentinel (a READONLY reply means it was demoted)."""
        self._attached: Attached | None = None
        self._protocol: _LineProtocol | None = None
        self._opening: asyncio.Future[None] | None = None
        self._closed = False

    async def call(self, *args: Any, timeout: float | None = None) -> Any:
        """The reply to one command, within `timeout` seconds (and the line's own); raises redis-py's errors."""
        if self._attached is None:
            await self._open()
        attached, protocol = self._attached, self._protocol
        if attached is None or protocol is None:
            raise RedisConnectionError("Connection to Redis lost as it opened")
        packed = attached.pack(*args)  # before its place in line: a command that cannot be packed takes none
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        protocol.waiting.append(future)
        try:
            attached.transport.writelines(packed)
        except BaseException:
            protocol.waiting.pop()  # nothing was sent: no reply will come for it
            raise
        limit = self._timeout if timeout is None else max(0.0, min(timeout, self._timeout))
        heard = protocol.received
        try:
            return await asyncio.wait_for(future, limit)
        except TimeoutError:
            if protocol.received == heard:  # nothing at all came back meanwhile: the connection is dead or stuck
                self.drop(protocol)
            raise RedisTimeoutError(f"Redis did not answer within {limit:g} s") from None

    async def _open(self) -> None:
        """Connect, sharing one connect with the callers of the same moment (a cancelled caller leaves it going
        for the others; a finished one, whatever its outcome, is not reused: the line is not attached)."""
        if self._closed:  # the process is stopping: no new connection (a late release, say)
            raise _closed()
        opening = self._opening
        if opening is None or opening.done():
            opening = self._opening = asyncio.ensure_future(self._connect())
            opening.add_done_callback(_retrieved)
        await asyncio.shield(opening)

    async def _connect(self) -> None:
        protocol = _LineProtocol(self)
        try:
            attached = await asyncio.wait_for(attach(self._client, protocol), self._timeout)
        except TimeoutError:
            raise RedisTimeoutError(f"Redis did not take a connection within {self._timeout:g} s") from None
        if self._closed:  # closed while connecting (the process stopping)
            attached.close()
            raise _closed()
        self._attached, self._protocol = attached, protocol

    def drop(self, protocol: _LineProtocol) -> None:
        """Close the connection `protocol` drives (if it is still the line's); its waiting commands fail."""
        if protocol is self._protocol and self._attached is not None:
            self._attached.close()
        self.lost(protocol, None)

    def lost(self, protocol: _LineProtocol, exc: Exception | None) -> None:
        if protocol is self._protocol:
            self._attached = self._protocol = None
        protocol.fail(lost_connection(exc))

    def close(self) -> None:
        self._closed = True
        if self._protocol is not None:
            self.drop(self._protocol)


class Script:
    """A Lua script run on a line by its SHA1 (EVALSHA), and by its text (EVAL) when Redis does not have it cached
    (it restarted, or its scripts were flushed), which caches it again."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()

    async def run(
        self, line: RedisLine, keys: Sequence[Any], args: Sequence[Any], *, timeout: float | None = None
    ) -> Any:
        try:
            return await line.call("EVALSHA", self.sha, len(keys), *keys, *args, timeout=timeout)
        except NoScriptError:
            return await line.call("EVAL", self.text, len(keys), *keys, *args, timeout=timeout)


def _retrieved(future: "asyncio.Future[None]") -> None:
    """Read a finished connect's error, so that asyncio does not log it as never retrieved when every caller
    that awaited it was cancelled (its callers got it, or will retry)."""
    if not future.cancelled():
        future.exception()
