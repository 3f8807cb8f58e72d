"""Following one pub/sub channel for the life of the API process, resubscribing by itself.

Pub/sub is at-most-once: what is published while the connection is down is gone. `follow` resubscribes with a
capped backoff and calls its owner's `catch_up` after every (re)subscription and after every quiet stretch, so
the owner reads what it may have missed from where that is also stored (stored replies, the event stream).

The subscription runs on a connection of `api.redis_line`'s: each message is handed to `deliver` as it is
parsed, with no task, timeout or dict in between (redis-py's asyncio PubSub spent more CPU on each reply of a
job than the rest of its way to the caller). A quiet stretch also sends a PING down the connection: if the next
stretch hears nothing either, not even its answer, the connection died without an error (its FIN lost behind a
proxy) and is replaced.
"""

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from api.redis_line import NOT_ENOUGH_DATA, Attached, attach, lost_connection, reader
from broker.backoff import Backoff

log = logging.getLogger(__name__)

QUIET = 5.0
"""Seconds without a message after which the owner catches up anyway (and the connection is pinged)."""


class _Subscription(asyncio.Protocol):
    """One subscribed connection's protocol: messages to `deliver`, the rest noted for `follow`."""

    def __init__(self, deliver: Callable[[bytes | str], None], what: str) -> None:
        self._deliver = deliver
        self._what = what
        self._reader = reader()
        loop = asyncio.get_running_loop()
        self.confirmed: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.messages = 0
        self.pinged = False
        """A PING is unanswered (nothing at all came back since it was sent)."""

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        self.pinged = False
        while (reply := self._reader.gets()) is not NOT_ENOUGH_DATA:
            if isinstance(reply, RedisError):  # NOAUTH, NOPERM...: this subscription cannot go on
                self._end(reply)
                return
            kind = reply[0] if isinstance(reply, list) and reply else None
            if kind == b"message":
                self.messages += 1
                try:
                    self._deliver(reply[2])
                except Exception:  # one bad message must not end the subscription for the process's life
                    log.exception("a message on the %s channel could not be handled; dropped", self._what)
            elif kind == b"subscribe" and not self.confirmed.done():
                self.confirmed.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(lost_connection(exc))

    def _end(self, error: Exception) -> None:
        for future in (self.confirmed, self.closed):
            if not future.done():
                future.set_exception(error)


async def follow(
    client: aioredis.Redis,
    channel: str,
    *,
    deliver: Callable[[bytes | str], None],
    catch_up: Callable[[], Awaitable[None]],
    subscribed: asyncio.Event,
    what: str,
    quiet: float = QUIET,
) -> None:
    """Deliver every message published on `channel` until cancelled; `subscribed` is set while subscribed."""
    backoff = Backoff(0.1, 2.0)
    while True:
        subscription = _Subscription(deliver, what)
        attached: Attached | None = None
        try:
            attached = await asyncio.wait_for(attach(client, subscription), max(quiet, 10.0))
            attached.write("SUBSCRIBE", channel)
            await asyncio.wait_for(asyncio.shield(subscription.confirmed), max(quiet, 10.0))
            subscribed.set()
            backoff.reset()
            await catch_up()
            while True:
                heard = subscription.messages
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(subscription.closed), quiet)
                if subscription.closed.done():
                    subscription.closed.result()  # raises what ended it
                if subscription.messages != heard:
                    continue
                if subscription.pinged:
                    raise RedisConnectionError(f"no answer from Redis for {quiet:g} s, not even to a PING")
                subscription.pinged = True
                attached.write("PING")
                await catch_up()
        except Exception as exc:  # Redis and socket errors, or anything else: resubscribe, never give up
            subscribed.clear()
            delay = backoff.next_delay() or 0.0
            log.warning("%s subscription lost (%s); resubscribing in %.1fs", what, type(exc).__name__, delay)
            await asyncio.sleep(delay)
        finally:
            for future in (subscription.confirmed, subscription.closed):
                if not future.done():
                    future.cancel()  # before the close below, whose connection_lost would fail it unread
                elif not future.cancelled():
                    future.exception()  # retrieved: asyncio must not log it as forgotten
            if attached is not None:
                attached.close()
