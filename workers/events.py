"""A node's pool events, published in the order its state changed, by one thread.

The manager calls `NodeEvents.model_changed` with its registry lock held, in the order the changes happen and
before it wakes anyone waiting on them (a load's outcome, an unload waiting for that load), and
`NodeEvents.online` queues through `ModelManager.with_models`, under the same lock. So the queue's order is the
state's order, and each item carries the node's models as they were right after its change: published in
order, the stream's events and the `models` field that a snapshot reads always agree.

Publishing happens on the `modelfleet-events` thread, never under the manager's lock. A Redis error is retried
with a capped backoff, in order, until it goes through or the node stops; `close` waits for what is queued.

After each item that carries the models, the thread also runs `after_models` (the node writes its memory
figures there), so the hash's `models` and `memory` follow the same order. `flush` waits until everything
queued before it is out: a job that changed the models calls it before its reply, so whoever reads the node's
hash after the reply (fleet status) sees the change.

Usage updates (`usage_changed`, throttled by `workers.usage.UsageThrottle`) join the same queue, their models read
under the same lock, so the `models` field they write is never older than a pool event's before it. They go to
the usage channel, never the stream (`EventBus.publish_usage`).
"""

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import redis

from broker.backoff import Backoff
from broker.events import (
    EventBus,
    ModelEvent,
    NodeEvent,
    OfflineReason,
    OnlineReason,
    UsageEvent,
    model_event,
    now,
    usage_event,
)
from broker.schemas import ModelInfo, NodeInfo
from workers.usage import DEFAULT_INTERVAL, UsageThrottle

log = logging.getLogger(__name__)

Mode = Literal["always", "online", "stopped", "replaced", "orphans", "usage"]
WithModels = Callable[[Callable[[list[ModelInfo]], None]], None]


@dataclass(frozen=True)
class _Item:
    event: ModelEvent | NodeEvent | UsageEvent
    models: list[ModelInfo] | None
    mode: Mode
    usage: int = 0
    """A usage update's number (1, 2, ...): one queued behind a newer one is stale and skipped."""


class NodeEvents:
    """Queues this node's events (its models' changes, its own coming and going) and publishes them in order."""

    def __init__(self, bus: EventBus, info: NodeInfo, *, usage_interval: float = DEFAULT_INTERVAL) -> None:
        self._bus = bus
        self._info = info
        self._queue: queue.Queue[_Item | threading.Event | None] = queue.Queue()
        self._online_queued = threading.Event()
        self._closing = threading.Event()
        self._usage_queued = 0
        """How many usage updates were queued so far (only the usage thread adds; the events thread reads)."""
        self._thread = threading.Thread(target=self._publish_all, name="modelfleet-events", daemon=True)
        self._thread.start()
        self._usage = UsageThrottle(self._queue_usage, interval=usage_interval)
        self.with_models: WithModels = lambda action: action([])
        """Runs an action with the node's models under the manager's lock: set to `ModelManager.with_models` once
        the manager (which takes `model_changed` as its hook) exists."""
        self.after_models: Callable[[], None] = lambda: None
        """Run on this thread after each published item that carried the models; a Redis error is retried."""

    def model_changed(self, kind: str, model: ModelInfo, models: list[ModelInfo]) -> None:
        """The manager's change hook (called under its lock): queue, never block."""
        self._queue.put(_Item(model_event(kind, self._info.fingerprint, model), models, "always"))

    def usage_changed(self) -> None:
        """The manager's usage hook (called under its lock when a generation is queued, starts or ends): only
        marks the change; the throttle's thread queues the update."""
        self._usage.changed()

    def _queue_usage(self) -> bool:
        """Queue a usage update with the models as they are now; whether any generation runs or waits."""
        busy = False

        def queue_it(models: list[ModelInfo]) -> None:
            nonlocal busy
            busy = any(m.in_flight or m.queued for m in models)
            self._usage_queued += 1
            self._queue.put(_Item(usage_event(self._info.fingerprint, models), models, "usage", self._usage_queued))

        self.with_models(queue_it)
        return busy

    def started(self) -> None:
        """A new process of this node starts clean, and says so: the offline of a previous boot that nobody
        announced, then `model-unloaded` (reason `node-restarted`) for every model that boot held."""
        self._queue.put(_Item(self._node_event("offline", "restarted"), [], "replaced"))
        self._queue.put(_Item(self._node_event("offline", "restarted"), None, "orphans"))

    def online(self, reason: OnlineReason | None = None) -> None:
        """Announce this boot online unless it already is (cheap to call on every heartbeat: it re-announces a
        node that some API process declared offline while it stalled, or whose records Redis lost); first the
        offline of a previous boot that nobody announced. At most one such check waits in the queue, unless this
        one has a reason to give."""
        if self._online_queued.is_set() and reason is None:
            return
        self._online_queued.set()
        self._queue.put(_Item(self._node_event("offline", "restarted"), [], "replaced"))
        self.with_models(lambda models: self._queue.put(_Item(self._node_event("online", reason), models, "online")))

    def stopped(self) -> None:
        self._queue.put(_Item(self._node_event("offline", "stopped"), [], "stopped"))

    def flush(self, timeout: float) -> bool:
        """Wait until every item queued before this call is published (or dropped); False after `timeout`."""
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Publish what is queued (giving up on Redis after `timeout`), then stop the thread."""
        self._usage.close()
        self._queue.put(None)
        self._thread.join(timeout)
        self._closing.set()
        self._thread.join(1.0)

    def _publish_all(self) -> None:
        while (item := self._queue.get()) is not None:
            if isinstance(item, threading.Event):
                item.set()
                continue
            if item.usage and item.usage != self._usage_queued:
                continue  # a newer usage update is queued (Redis was away meanwhile): it alone is worth sending
            try:
                self._publish(item)
            except Exception:  # one event that cannot go out must not stop every later one
                log.exception("event %s could not be published; dropped", item.event.type)
            finally:
                if item.mode == "online":
                    self._online_queued.clear()  # a later check may queue again once this one is done

    def _publish(self, item: _Item) -> None:
        """Publish `item`, retrying what passes (Redis unreachable, loading, read-only during a failover) with a
        capped backoff; raise what will not (a refused script, a wrong key type) so it is dropped."""
        backoff = Backoff(0.1, 2.0)
        while True:
            try:
                if item.mode == "orphans":
                    gone = self._bus.announce_orphans(self._info.fingerprint, self._info.boot_id)
                    if gone:
                        log.info("announced %d models of the previous process unloaded (node-restarted)", len(gone))
                elif isinstance(item.event, UsageEvent):
                    assert item.models is not None
                    self._bus.publish_usage(item.event, models=item.models, boot=self._info.boot_id)
                else:
                    self._bus.publish(item.event, models=item.models, mode=item.mode, boot=self._info.boot_id)
                    if item.models is not None:
                        self.after_models()
                return
            except (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError) as exc:
                if self._closing.is_set():
                    log.warning("gave up publishing %s on stop: %s", item.event.type, type(exc).__name__)
                    return
                delay = backoff.next_delay() or 0.0
                log.warning("publishing %s failed (%s); retrying in %.1fs", item.event.type, type(exc).__name__, delay)
                time.sleep(delay)

    def _node_event(
        self, state: Literal["online", "offline"], reason: OfflineReason | OnlineReason | None = None
    ) -> NodeEvent:
        return NodeEvent(
            type="node-online" if state == "online" else "node-offline",
            node=self._info.fingerprint,
            name=self._info.name,
            state=state,
            at=now(),
            reason=reason,
        )
