"""Awaiting node replies on the event loop: one subscription per API process, no thread per waiting request.

Each waiting request registers a future under its job id. One task listens on `keys.replies_channel()` and
resolves futures as replies arrive. Pub/sub is at-most-once, so a second task ticks every
`liveness_interval` seconds: it reads the stored replies of all pending jobs (catching anything published
while the subscription was down) and checks the alive keys of their nodes, failing the jobs of a node whose
heartbeat lapsed with NodeWentOffline. Hundreds of concurrent waits cost one connection and one MGET a tick.
"""

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.exceptions import RedisError

from api.subscription import follow
from broker import keys
from broker.errors import NodeWentOffline
from broker.registry import NodeDirectory
from broker.schemas import Reply, read_lenient

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    fingerprint: str
    name: str
    future: "asyncio.Future[Reply]"


class ReplyWaiter:
    """Resolves the futures of pending jobs from the reply channel, stored replies and node liveness."""

    def __init__(self, client: aioredis.Redis, directory: NodeDirectory, *, tick: float = 1.0) -> None:
        self._redis = client
        self._directory = directory
        self._tick = tick
        self._pending: dict[str, _Pending] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.subscribed = asyncio.Event()

    def expect(self, job_id: str, fingerprint: str, name: str) -> "asyncio.Future[Reply]":
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._pending[job_id] = _Pending(fingerprint, name, future)
        return future

    def forget(self, job_id: str) -> None:
        self._pending.pop(job_id, None)

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
            reply = read_lenient(Reply, raw)
        except (ValidationError, ValueError):
            log.warning("dropped a malformed reply from the reply channel")
            return
        item = self._pending.get(reply.job_id)
        if item is not None and not item.future.done():
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
                await self._fail_offline()
            except (RedisError, OSError) as exc:
                log.warning("liveness check failed: %s", type(exc).__name__)

    async def _collect_stored(self) -> None:
        job_ids = [j for j, item in self._pending.items() if not item.future.done()]
        if not job_ids:
            return
        for raw in await self._redis.mget([keys.reply(j) for j in job_ids]):
            if raw is not None:
                self._deliver(raw)

    async def _fail_offline(self) -> None:
        waiting = {item.fingerprint for item in self._pending.values() if not item.future.done()}
        if not waiting:
            return
        alive = await self._directory.alive(sorted(waiting))
        for item in list(self._pending.values()):
            if not alive.get(item.fingerprint, True) and not item.future.done():
                item.future.set_exception(
                    NodeWentOffline(
                        f"Node {item.name} ({item.fingerprint}) stopped sending heartbeats while the job was "
                        "queued or running; the outcome is unknown. Check the node and list its models.",
                        node=item.fingerprint,
                    )
                )
