"""Awaiting node replies on the event loop: one subscription per API process, no thread per waiting request.

Each waiting request registers a future under its job id, with the boot id of the node process it was sent to.
One task listens on `keys.replies_channel()` and resolves futures as replies arrive. Pub/sub is at-most-once,
so a second task ticks every `liveness_interval` seconds: it reads the stored replies of all pending jobs
(catching anything published while the subscription was down) and reads the alive keys of their nodes, whose
value is the boot id of the process holding the node:

- the same boot: the job is in good hands, keep waiting;
- another boot: the node was restarted under the job; fail it with NodeRestarted at once (the caller's
  `JobClient` then finds out whether the job had started, and keeps waiting if the new process took it);
- no key, the node's registration still there: its heartbeat lapsed; fail it with NodeWentOffline;
- no key and no registration: Redis lost the registry (flushed, restarted without persistence, failed over),
  not the node. Nodes re-register at their next heartbeat, so wait `registry_grace` seconds before calling it
  offline. The same grace follows any Redis error this waiter saw: a key may have lapsed during the outage
  though its node was beating all along.

The same checks guard anything else that depends on one node process: `watch` gives a future that fails with
NodeRestarted or NodeWentOffline when that process is gone (the head's inference proxy ends a stream with it).

Hundreds of concurrent waits cost one connection and one MGET and pipeline a tick.
"""

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from pydantic import BaseModel, ValidationError
from redis.exceptions import RedisError

from api.subscription import follow
from broker import keys
from broker.errors import NodeError, NodeRestarted, NodeWentOffline
from broker.schemas import Reply, ReplyHeader, read_lenient

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    fingerprint: str
    name: str
    boot: str
    future: "asyncio.Future[Reply[Any]]"
    missing_since: float | None = None
    """When the node's alive key and registration were first seen gone together (Redis lost the registry)."""
    job: bool = True
    """A job awaiting its reply; else a `watch` of the node process alone."""
    reply: type[Reply[Any]] = Reply[BaseModel]
    """The model of the job's reply (its operation's `Op.reply`)."""


class ReplyWaiter:
    """Resolves the futures of pending jobs from the reply channel, stored replies and node liveness."""

    def __init__(self, client: aioredis.Redis, *, tick: float = 1.0, registry_grace: float = 6.0) -> None:
        self._redis = client
        self._tick = tick
        self._grace = registry_grace
        self._trouble_at = -float("inf")
        self._pending: dict[str, _Pending] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.subscribed = asyncio.Event()

    def expect(
        self, job_id: str, fingerprint: str, name: str, boot: str, reply: type[Reply[Any]]
    ) -> "asyncio.Future[Reply[Any]]":
        """A future for the job's reply, sent to the node process `boot` (its boot id), read as a `reply` model
        (its operation's `Op.reply`)."""
        future: asyncio.Future[Reply[Any]] = asyncio.get_running_loop().create_future()
        self._pending[job_id] = _Pending(fingerprint, name, boot, future, reply=reply)
        return future

    def forget(self, job_id: str) -> None:
        self._pending.pop(job_id, None)

    def watch(self, fingerprint: str, name: str, boot: str) -> "asyncio.Future[Reply[Any]]":
        """A future that fails (NodeRestarted, NodeWentOffline) once node process `boot` is gone; it never
        succeeds. Pass it to `unwatch` when done."""
        future: asyncio.Future[Reply[Any]] = asyncio.get_running_loop().create_future()
        self._pending[f"watch:{id(future)}"] = _Pending(fingerprint, name, boot, future, job=False)
        return future

    def unwatch(self, future: "asyncio.Future[Reply[Any]]") -> None:
        self._pending.pop(f"watch:{id(future)}", None)
        if not future.done():
            future.cancel()
        elif not future.cancelled():
            future.exception()  # retrieved: asyncio must not log it as forgotten

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._listen(), name="modelfleet-replies"),
            asyncio.create_task(self._watch(), name="modelfleet-liveness"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for item in self._pending.values():
            if not item.future.done():
                item.future.cancel()

    def _deliver(self, raw: bytes | str) -> None:
        try:
            job_id = read_lenient(ReplyHeader, raw).job_id
        except (ValidationError, ValueError):
            log.warning("dropped a malformed reply from the reply channel")
            return
        item = self._pending.get(job_id)
        if item is None or not item.job or item.future.done():
            return
        try:
            reply = read_lenient(item.reply, raw)
        except (ValidationError, ValueError):
            log.warning("node %s sent a reply this API cannot read", item.fingerprint)
            item.future.set_exception(
                NodeError(
                    f"Node {item.name} ({item.fingerprint}) sent a reply this API cannot read (another version?)."
                )
            )
            return
        item.future.set_result(reply)

    async def _listen(self) -> None:
        await follow(
            self._redis,
            keys.replies_channel(),
            deliver=self._deliver,
            catch_up=self._collect_stored,
            subscribed=self.subscribed,
            what="reply",
        )

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._tick)
            if not self._pending:
                continue
            try:
                await self._collect_stored()
                await self._check_nodes()
            except (RedisError, OSError) as exc:
                self._trouble_at = time.monotonic()
                log.warning("liveness check failed: %s", type(exc).__name__)

    async def _collect_stored(self) -> None:
        job_ids = [j for j, item in self._pending.items() if item.job and not item.future.done()]
        if not job_ids:
            return
        for raw in await self._redis.mget([keys.reply(j) for j in job_ids]):
            if raw is not None:
                self._deliver(raw)

    async def _check_nodes(self) -> None:
        waiting = sorted({item.fingerprint for item in self._pending.values() if not item.future.done()})
        if not waiting:
            return
        pipe = self._redis.pipeline(transaction=False)
        for fp in waiting:
            pipe.get(keys.node_alive(fp))
            pipe.hexists(keys.node_info(fp), "registration")
        raw = await pipe.execute()
        holders = {fp: _text(raw[2 * i]) for i, fp in enumerate(waiting)}
        registered = {fp: bool(raw[2 * i + 1]) for i, fp in enumerate(waiting)}
        now = time.monotonic()
        for item in list(self._pending.values()):
            if item.future.done():
                continue
            holder = holders.get(item.fingerprint)
            if holder == item.boot:
                item.missing_since = None
            elif holder is not None:
                item.future.set_exception(
                    NodeRestarted(
                        f"Node {item.name} ({item.fingerprint}) was restarted while the "
                        f"{'job was queued or running' if item.job else 'request was running'}.",
                        node=item.fingerprint,
                        boot_id=holder,
                        previous_boot_id=item.boot,
                    )
                )
            elif registered.get(item.fingerprint) and now - self._trouble_at > self._grace:
                item.future.set_exception(_went_offline(item))
            else:  # the registry is gone (or Redis just came back): the node re-registers within a heartbeat
                item.missing_since = item.missing_since or now
                if now - item.missing_since > self._grace:
                    item.future.set_exception(_went_offline(item))


def _went_offline(item: _Pending) -> NodeWentOffline:
    what = "the job was queued or running" if item.job else "the request was running"
    return NodeWentOffline(
        f"Node {item.name} ({item.fingerprint}) stopped sending heartbeats while {what}.", node=item.fingerprint
    )


def _text(value: bytes | str | None) -> str | None:
    return value.decode(errors="replace") if isinstance(value, bytes) else value
