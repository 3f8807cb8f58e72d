"""Following one pub/sub channel for the life of the API process, resubscribing by itself.

redis-py's asyncio PubSub has not always reconnected by itself (#2089, #2417), and pub/sub is at-most-once:
what is published while the connection is down is gone. `follow` resubscribes with a capped backoff and calls
its owner's `catch_up` after every (re)subscription and after every quiet stretch, so the owner reads what it may
have missed from where that is also stored (stored replies, the event stream). A connection that died without
an error (its FIN lost behind a proxy) costs at most one quiet stretch.
"""

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

from broker.backoff import Backoff

log = logging.getLogger(__name__)

QUIET = 5.0
"""Seconds without a message after which the owner catches up anyway."""


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
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel)
            subscribed.set()
            backoff.reset()
            await catch_up()
            while True:
                message = await pubsub.get_message(timeout=quiet)
                if message is None:
                    await catch_up()
                elif message.get("type") == "message":
                    try:
                        deliver(message["data"])
                    except Exception:  # one bad message must not end the subscription for the process's life
                        log.exception("a message on the %s channel could not be handled; dropped", what)
        except Exception as exc:  # Redis and socket errors, or anything else: resubscribe, never give up
            subscribed.clear()
            delay = backoff.next_delay() or 0.0
            log.warning("%s subscription lost (%s); resubscribing in %.1fs", what, type(exc).__name__, delay)
            await asyncio.sleep(delay)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
