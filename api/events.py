"""The live pool: one Redis subscription per API process, fanned out to every SSE client.

The Redis stream `keys.events_stream()` is the only source the relay reads events from. The pub/sub messages on
`keys.events_channel()` only wake it (their content is neither needed nor trusted: anything that can reach
Redis can publish there), and so do every (re)subscription and every quiet stretch, since pub/sub is
at-most-once. Woken, the relay reads the stream after the last id it relayed, validates each event with the
schemas in `broker.events` (a malformed one is logged and skipped), encodes its SSE frame once and puts the
same bytes into every matching client's bounded mailbox. Stream ids only grow, so each event is relayed once,
in order. It reads in pages of at most half a mailbox and yields between pages, so a client that keeps up is
never pushed over its limit by a burst. If the relay falls so far behind that the history was trimmed under
it (Redis was unreachable for long), it ends every stream: clients reconnect and start over from a snapshot.

A client first gets a snapshot (every node and its models, read in one MULTI with the stream's last id) or, when
it reconnects with a `Last-Event-ID` still in the stream, the events after it. It is registered before that
read, so an event is either covered by the read or waiting in its mailbox, which skips what the read covered.
A client whose mailbox overflows is too slow to keep up: it is disconnected (it can reconnect with its last id)
rather than allowed to grow memory or hold the others back.

Usage updates (each model's generations in flight and queued, tokens, last use) come on their own channel,
`keys.usage_channel()`, and are relayed as they come, as `model-usage` events without an id: gauges, not history,
so neither stored nor replayed (a reconnecting client's snapshot or replay reads the node's hash, which each update
also wrote). Their frame is built once and goes through the same mailboxes, after the node filter.

`OfflineWatcher` publishes the `node-offline` of a node whose heartbeat lapsed. Every API process runs one; the
publish script's check on the node's `announced` field makes the event exactly-once across them.
"""

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from fastapi.sse import format_sse_event
from pydantic import BaseModel
from redis.exceptions import RedisError

from api.heap import Heap
from api.subscription import follow
from broker import keys
from broker.backoff import Backoff
from broker.errors import ShuttingDown
from broker.events import (
    SNAPSHOT_EVENT,
    SSE_EVENT,
    USAGE_EVENT,
    AsyncEventBus,
    NodeEvent,
    NodeState,
    Snapshot,
    now,
    parse_event,
    parse_usage,
    stream_id,
)
from broker.registry import NodeDirectory, parse_models, parse_node

log = logging.getLogger(__name__)

StreamId = tuple[int, int]
PING = b": ping\n\n"
HISTORY_PAGE = 500
STARTUP_READ = 2.0
"""Seconds the API's start waits for the event stream's end before serving without it (Redis not up yet)."""


@dataclass(eq=False)
class Subscriber:
    """One SSE client: its node filter and its bounded mailbox of SSE frames, each with its stream id, or None for a
    frame outside the stream (a ping, a usage update): those always go out, in the order they came.

    A plain deque and one waiter future rather than an asyncio.Queue read under a timeout: with a thousand
    clients, a Queue's bookkeeping and a timer per wait cost more CPU than the writes themselves.
    """

    node: str | None
    limit: int
    pending: "deque[tuple[StreamId | None, bytes]]" = field(default_factory=deque)
    ended: bool = False
    dropped: asyncio.Event = field(default_factory=asyncio.Event)
    writing_since: float | None = None
    """When the write under way to this client started (`time.monotonic()`), or None between writes."""
    _waiter: "asyncio.Future[None] | None" = None

    def wants(self, node: str) -> bool:
        return self.node is None or self.node == node

    def put(self, sid: StreamId | None, frame: bytes) -> bool:
        """Queue a frame; False (and nothing queued) if the client is already `limit` frames behind."""
        if len(self.pending) >= self.limit:
            return False
        self.pending.append((sid, frame))
        self._wake()
        return True

    def end(self) -> None:
        """End the stream after nothing more: what is still queued, the client replays when it reconnects."""
        self.pending.clear()
        self.ended = True
        self._wake()

    async def take(self) -> "list[tuple[StreamId | None, bytes]] | None":
        """Everything queued, once something is; None once the stream has ended."""
        while not self.pending and not self.ended:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        if self.ended:
            return None
        items = list(self.pending)
        self.pending.clear()
        return items

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _frame(event: str, content: BaseModel, event_id: str | None) -> bytes:
    # ASCII-only JSON: a line separator in a model id (U+2028, U+0085) must not split the data line for a client
    # whose line reader is Unicode-aware.
    return format_sse_event(
        data_str=content.model_dump_json(by_alias=True, ensure_ascii=True), event=event, id=event_id
    )


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


class EventRelay:
    """Relays pool events from Redis to this process's SSE clients."""

    def __init__(
        self,
        client: aioredis.Redis,
        directory: NodeDirectory,
        *,
        queue_size: int = 512,
        ping_interval: float = 15.0,
        write_timeout: float = 10.0,
    ) -> None:
        self._redis = client
        self.heap = Heap()
        self._directory = directory
        self._queue_size = queue_size
        self.ping_interval = ping_interval
        self.write_timeout = write_timeout
        """Seconds one write to a client may take: a client that stops reading is dropped after it."""
        self._subscribers: set[Subscriber] = set()
        self._cursor: StreamId | None = None
        self._page_size = max(1, min(HISTORY_PAGE, queue_size // 2))
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.subscribed = asyncio.Event()
        self.usage_subscribed = asyncio.Event()
        self.closing = False
        """Set once the process is stopping: streams are ended, and new ones refused."""
        self.dropped_total = 0
        self.stalled_total = 0
        self.relayed_total = 0
        self.usage_relayed_total = 0

    @property
    def clients(self) -> int:
        return len(self._subscribers)

    async def start(self) -> None:
        # The cursor is set before the first request is served, so a client's snapshot is never older than where
        # the relay starts relaying; if Redis is not there yet, the first stream request sets it (`ensure_cursor`).
        try:
            await asyncio.wait_for(self.ensure_cursor(), STARTUP_READ)
        except (RedisError, OSError) as exc:  # TimeoutError is an OSError
            log.warning("the event stream cannot be read yet (%s); relaying from when it can", type(exc).__name__)
        self._tasks = [
            asyncio.create_task(self._listen(), name="modelfleet-events"),
            asyncio.create_task(self._listen_usage(), name="modelfleet-usage"),
            asyncio.create_task(self._read(), name="modelfleet-events-read"),
            asyncio.create_task(self._ping(), name="modelfleet-events-ping"),
            asyncio.create_task(self._watch(), name="modelfleet-events-watch"),
        ]
        self.heap.settle()  # the app is built and its services started: no full collection need walk them again

    async def stop(self) -> None:
        self.heap.release()
        self.close_all()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def close_all(self) -> None:
        """End every stream cleanly and refuse new ones (shutdown): a client replays what it missed on reconnect."""
        self.closing = True
        self._end_all()

    def _end_all(self) -> None:
        for sub in list(self._subscribers):
            sub.end()
        self._subscribers.clear()

    def open(self, node: str | None) -> Subscriber:
        """Register a client; raises ShuttingDown once the process is stopping (its stream would never end)."""
        if self.closing:
            raise ShuttingDown("This API process is shutting down; reconnect (with Last-Event-ID) in a moment.")
        sub = Subscriber(node, self._queue_size)
        self._subscribers.add(sub)
        self.heap.opened()
        return sub

    def close(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)

    # The live path.

    async def _listen(self) -> None:
        await follow(
            self._redis,
            keys.events_channel(),
            deliver=lambda _: self._wake.set(),
            catch_up=self._catch_up,
            subscribed=self.subscribed,
            what="event",
        )

    async def _catch_up(self) -> None:
        self._wake.set()

    async def _listen_usage(self) -> None:
        await follow(
            self._redis,
            keys.usage_channel(),
            deliver=self._relay_usage,
            catch_up=_nothing_to_catch_up,
            subscribed=self.usage_subscribed,
            what="usage",
        )

    def _relay_usage(self, raw: bytes | str) -> None:
        """Relay one usage update as it came: a missed one is superseded by the next (or a snapshot's hash)."""
        try:
            usage = parse_usage(raw)
        except ValueError:  # pydantic's ValidationError, for anything malformed
            log.warning("dropped a malformed usage update")
            return
        frame = _frame(USAGE_EVENT, usage, None)
        self.usage_relayed_total += 1
        for sub in list(self._subscribers):
            if sub.wants(usage.node) and not sub.put(None, frame):
                self._drop(sub)

    async def _read(self) -> None:
        """Relay what the stream holds after the cursor, each time something wakes the relay."""
        backoff = Backoff(0.1, 2.0)
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._relay_new()
                backoff.reset()
            except Exception as exc:  # Redis errors mostly; whatever it is, the relay must outlive it
                delay = backoff.next_delay() or 0.0
                log.warning("reading the event stream failed (%s); retrying in %.1fs", type(exc).__name__, delay)
                await asyncio.sleep(delay)
                self._wake.set()

    async def ensure_cursor(self) -> None:
        """Start relaying from the stream's end, unless already started. Awaited by every stream request before
        its snapshot or replay is read, so nothing between the two is missed even if Redis came late."""
        if self._cursor is None:
            last = await self._redis.xrevrange(keys.events_stream(), count=1)
            if self._cursor is None:
                self._cursor = (stream_id(_text(last[0][0])) or (0, 0)) if last else (0, 0)

    async def _relay_new(self) -> None:
        if self._cursor is None:
            await self.ensure_cursor()
            return
        while True:
            after = "{}-{}".format(*self._cursor)
            pipe = self._redis.pipeline(transaction=False)
            pipe.xrange(keys.events_stream(), min=after, max=after, count=1)
            pipe.xrange(keys.events_stream(), min=f"({after}", count=self._page_size)
            pipe.xrevrange(keys.events_stream(), count=1)
            at_cursor, entries, last = await pipe.execute()
            if not at_cursor and self._cursor != (0, 0):
                # The last event relayed is gone: the history was trimmed or emptied past it (a Redis restart
                # without persistence, a failover), and what came between may be lost. Start everyone over from a
                # snapshot rather than relay a silent gap, and go on from the stream's end as it is now (a new
                # stream's ids may even be below the old cursor).
                log.warning("event history lost past %s; ending %d streams to resync them", after, self.clients)
                self._end_all()
                self._cursor = (stream_id(_text(last[0][0])) or (0, 0)) if last else (0, 0)
                return
            for raw_id, fields in entries:
                self._relay(_text(raw_id), _text((fields or {}).get(b"event", b"")))
            if len(entries) < self._page_size:
                return
            await asyncio.sleep(0)  # let clients write this page before the next one

    async def _page(self, after: str) -> list[tuple[str, str]]:
        """Up to HISTORY_PAGE stream entries after `after`, as (id, event JSON)."""
        entries = await self._redis.xrange(keys.events_stream(), min=f"({after}", count=HISTORY_PAGE) or []
        return [(_text(raw_id), _text((fields or {}).get(b"event", b""))) for raw_id, fields in entries]

    def _relay(self, event_id: str, raw: str) -> None:
        sid = stream_id(event_id)
        if sid is None or (self._cursor is not None and sid <= self._cursor):
            return
        self._cursor = sid
        try:
            event = parse_event(raw)
        except ValueError:  # pydantic's ValidationError, for anything malformed
            log.warning("dropped malformed pool event %s", event_id)
            return
        frame = _frame(SSE_EVENT, event, event_id)
        self.relayed_total += 1
        for sub in list(self._subscribers):
            if sub.wants(event.node) and not sub.put(sid, frame):
                self._drop(sub)

    async def _ping(self) -> None:
        """A comment to every client each interval: proxies keep an idle stream open. A client that closed its
        connection is forgotten at once; one that vanished without closing, once its next ping has gone
        unacknowledged for two intervals and the kernel drops the connection (TCP_USER_TIMEOUT: `api.server`)."""
        while True:
            await asyncio.sleep(self.ping_interval)
            for sub in list(self._subscribers):
                if not sub.put(None, PING):
                    self._drop(sub)

    async def _watch(self) -> None:
        """Every quarter of `write_timeout`, drop the clients whose write under way has waited longer than it.

        One look at every client's `writing_since` per tick rather than a timer per write: arming and cancelling
        a timer (anyio's `move_on_after`) cost more CPU than the write itself, paid on 1,000 streams per event.
        A stalled client is dropped after between one and one and a quarter times the deadline."""
        while True:
            await asyncio.sleep(self.write_timeout / 4)
            now = time.monotonic()
            for sub in list(self._subscribers):
                since = sub.writing_since
                if since is not None and now - since >= self.write_timeout:
                    self.stalled(sub)

    def _drop(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)
        sub.dropped.set()
        self.dropped_total += 1
        log.warning("an SSE client fell %d events behind and was disconnected", self._queue_size)

    def stalled(self, sub: Subscriber) -> None:
        """A write to this client did not complete within `write_timeout`: it stopped reading. Drop it now,
        rather than hold its frames (and the kernel its buffers) until TCP gives up on it."""
        if sub.dropped.is_set():
            return
        self._subscribers.discard(sub)
        sub.dropped.set()
        self.dropped_total += 1
        self.stalled_total += 1
        log.warning("an SSE client stopped reading (a write waited %gs) and was disconnected", self.write_timeout)

    # What a client starts from.

    async def can_replay(self, last_event_id: str | None) -> bool:
        """Whether the stream still holds `last_event_id` (trimming drops the oldest first, so all after it too)."""
        if stream_id(last_event_id) is None:
            return False
        assert last_event_id is not None
        return bool(await self._redis.xrange(keys.events_stream(), min=last_event_id, max=last_event_id, count=1))

    async def snapshot(self, node: str | None) -> tuple[StreamId, bytes]:
        """Every node (or `node`) with its models, and the stream id they are current as of."""
        for _ in range(5):
            fingerprints = [node] if node is not None else await self._directory.fingerprints()
            pipe = self._redis.pipeline(transaction=True)
            pipe.smembers(keys.nodes_set())
            for fp in fingerprints:
                pipe.hgetall(keys.node_info(fp))
                pipe.exists(keys.node_alive(fp))
            pipe.xrevrange(keys.events_stream(), count=1)
            raw = await pipe.execute()
            # A node that registered between the two reads may have events up to our id: read again.
            if node is None and {_text(m) for m in raw[0]} != set(fingerprints):
                continue
            break
        at = now()
        nodes = []
        for i, fp in enumerate(fingerprints):
            fields, alive = raw[1 + 2 * i], bool(raw[2 + 2 * i])
            info = parse_node(fp, fields, alive, at)
            if info is not None:
                nodes.append(NodeState(**dict(info), models=parse_models(fp, fields.get(b"models"))))
        last = raw[-1]
        event_id = _text(last[0][0]) if last else "0-0"
        snapshot = Snapshot(at=at, nodes=nodes)
        return stream_id(event_id) or (0, 0), _frame(SNAPSHOT_EVENT, snapshot, event_id)

    async def history(self, after: str, node: str | None) -> AsyncIterator[tuple[StreamId, bytes]]:
        """The stream's events after `after`, validated and filtered like live ones."""
        start = after
        while True:
            entries = await self._page(start)
            for start, raw in entries:
                try:
                    event = parse_event(raw)
                except ValueError:
                    log.warning("dropped malformed pool event %s", start)
                    continue
                if node is None or event.node == node:
                    yield stream_id(start) or (0, 0), _frame(SSE_EVENT, event, start)
            if len(entries) < HISTORY_PAGE:
                return

    async def frames(
        self, sub: Subscriber, first: tuple[StreamId, bytes] | None, replay_after: str | None
    ) -> AsyncIterator[bytes]:
        """The stream one client reads: its snapshot or replay, then live events and pings, until it ends."""
        try:
            cursor: StreamId = (0, 0)
            if first is not None:
                cursor = first[0]
                yield first[1]
            if replay_after is not None:
                cursor = stream_id(replay_after) or cursor
                try:
                    async for sid, frame in self.history(replay_after, sub.node):
                        cursor = sid
                        yield frame
                except (RedisError, OSError) as exc:
                    # Headers are sent: end the stream cleanly; the client resumes after what it did receive.
                    log.warning("replaying events failed (%s); ending the stream to be resumed", type(exc).__name__)
                    return
            # Everything queued since the last write goes out as one: a client that fell behind catches up in
            # fewer, larger sends, so a burst costs less per event, not more.
            while (items := await sub.take()) is not None:
                batch = []
                for item_id, frame in items:
                    if item_id is None:  # a ping or a usage update
                        batch.append(frame)
                    elif item_id > cursor:  # what the snapshot or replay already covered is skipped
                        cursor = item_id
                        batch.append(frame)
                if batch:
                    yield b"".join(batch)
        finally:
            self.close(sub)


async def _nothing_to_catch_up() -> None:
    """Usage updates are not stored. After a lost subscription, the next update brings the figures up to date:
    within a second while anything runs. The limit: an update lost while the subscription was down that was a
    node's last (the one showing it idle) is not sent again until the next change there, so this API process's
    clients show the node busy until then; a new stream's snapshot reads the hash, which that update did write."""


class OfflineWatcher:
    """Publishes `node-offline` for nodes announced online whose alive key has lapsed."""

    def __init__(self, client: aioredis.Redis, directory: NodeDirectory, bus: AsyncEventBus, *, tick: float) -> None:
        self._redis = client
        self._directory = directory
        self._bus = bus
        self._tick = tick
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="modelfleet-offline-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._tick)
            try:
                await self.check()
            except Exception as exc:  # Redis errors mostly; whatever it is, the next tick must still come
                log.warning("offline check failed: %s", type(exc).__name__)

    async def check(self) -> list[str]:
        """Announce every lapsed node once; returns the fingerprints this call announced."""
        fingerprints = await self._directory.fingerprints()
        pipe = self._redis.pipeline(transaction=False)
        for fp in fingerprints:
            pipe.hget(keys.node_info(fp), "announced")
            pipe.exists(keys.node_alive(fp))
        raw = await pipe.execute()
        lapsed = [
            fp
            for i, fp in enumerate(fingerprints)
            if _text(raw[2 * i] or b"").startswith("online:") and not raw[2 * i + 1]
        ]
        announced = []
        for node in await self._directory.many(lapsed) if lapsed else []:
            event = NodeEvent(
                type="node-offline",
                node=node.fingerprint,
                name=node.name,
                state="offline",
                at=now(),
                reason="heartbeat-lapsed",
            )
            if await self._bus.publish(event, models=[], mode="lapsed") is not None:
                log.warning("node %s (%s) went offline: its heartbeat lapsed", node.name, node.fingerprint)
                announced.append(node.fingerprint)
        return announced
