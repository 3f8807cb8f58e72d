"""Sending a job to a node's queue and awaiting its reply under the operation's deadline."""

import asyncio
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from api.metrics import Metrics
from api.replies import ReplyWaiter
from api.sender import TaskSender
from api.settings import ApiSettings
from broker import keys
from broker.connection import redis_problem
from broker.errors import (
    BrokerUnavailable,
    JobTimeout,
    NodeError,
    NodeOffline,
    NodeRestarted,
    NodeUnavailable,
    from_code,
)
from broker.operations import J, Op, R
from broker.registry import NodeDirectory
from broker.replies import abandon_job
from broker.schemas import Job, NodeInfo, Reply


class JobClient:
    """Runs one job on one node: liveness check, send, await reply or deadline, cancel on give-up."""

    def __init__(
        self,
        sender: TaskSender,
        directory: NodeDirectory,
        client: aioredis.Redis,
        waiter: ReplyWaiter,
        *,
        settings: ApiSettings,
        metrics: Metrics,
    ) -> None:
        self._sender = sender
        self._directory = directory
        self._redis = client
        self._waiter = waiter
        self._settings = settings
        self._metrics = metrics

    async def run(self, node: NodeInfo, op: Op[J, R], **job_fields: Any) -> R:
        """Run `op` on `node` with the job made of `job_fields` (its deadline added here), within the operation's
        timeout: the node's result, or raise the node's error (or NodeOffline / NodeWentOffline / NodeRestarted /
        JobTimeout)."""
        with self._metrics.job(op.name):
            for _ in range(GUARD_ATTEMPTS - 1):
                try:
                    return await self._run(node, op, job_fields, self._settings.timeout(op))
                except _NotHeld:  # the node went offline or was replaced since `node` was read: read it again
                    node = await self._directory.get(node.fingerprint)
            return await self._run(node, op, job_fields, self._settings.timeout(op), last=True)

    async def _run(
        self, node: NodeInfo, op: Op[J, R], job_fields: dict[str, Any], timeout: float, *, last: bool = False
    ) -> R:
        if not node.online:
            since = node.seconds_since_heartbeat
            when = f"{since:.0f} seconds ago" if since is not None else "never"
            raise NodeOffline(
                f"Node {node.name} ({node.fingerprint}) is offline: its last heartbeat was {when}.",
                node=node.fingerprint,
                seconds_since_heartbeat=since,
            )
        deadline = time.time() + timeout
        job = op.job(deadline=deadline, **job_fields)
        job_id = uuid.uuid4().hex
        future = self._waiter.expect(job_id, node.fingerprint, node.name, node.boot_id, op.reply)
        try:
            if not await self._send(op.task, job, job_id, node, deadline):
                if not last:
                    raise _NotHeld()
                raise NodeRestarted(
                    f"Node {node.name} ({node.fingerprint}) changed hands while the {op.title} was being sent; "
                    "it was not sent. Retry it.",
                    node=node.fingerprint,
                )
            reply = await self._await(future, node, op, job_id, deadline, timeout)
        finally:
            self._waiter.forget(job_id)
        if reply.error is not None:
            raise from_code(reply.error.code, reply.error.error, reply.error.details)
        if reply.result is None:
            raise NodeError(f"Node {node.name} answered the {op.title} with neither a result nor an error.")
        return reply.result

    async def _await(
        self,
        future: "asyncio.Future[Reply[Any]]",
        node: NodeInfo,
        op: Op[Any, Any],
        job_id: str,
        deadline: float,
        timeout: float,
    ) -> "Reply[Any]":
        """The reply; or, once the node is gone or replaced, an error saying what became of the job."""
        while True:
            try:
                return await asyncio.wait_for(future, max(0.0, deadline - time.time()))
            except TimeoutError:
                await self._abandon(job_id, deadline)
                raise JobTimeout(
                    f"Node {node.name} did not finish the {op.title} within {timeout:g} seconds.",
                    timeout_seconds=timeout,
                ) from None
            except NodeUnavailable as lost:
                successor = lost.details.get("boot_id") if isinstance(lost, NodeRestarted) else None
                started = await self._abandon(job_id, deadline, unless_started_by=successor)
                if successor is not None and started == successor:
                    # The new process took the job from the node's queue itself: its reply will come.
                    future = self._waiter.expect(job_id, node.fingerprint, node.name, successor, op.reply)
                    continue
                raise _outcome(lost, op.title, started) from None

    async def _send(self, task: str, job: Job, job_id: str, node: NodeInfo, deadline: float) -> bool:
        """Queue the job, only if `node`'s boot still holds its alive key; whether it was queued."""
        try:
            return await self._sender.send(
                task,
                kwargs={"job": job.wire()},
                queue=keys.node_queue(node.fingerprint),
                task_id=job_id,
                expires=datetime.fromtimestamp(deadline, UTC),
                guard=(keys.node_alive(node.fingerprint), node.boot_id),
            )
        except (RedisError, OSError, OperationalError) as exc:
            raise BrokerUnavailable(f"The job could not be queued: {redis_problem(exc)}.") from exc

    async def _abandon(self, job_id: str, deadline: float, *, unless_started_by: str | None = None) -> str | None:
        """Cancel the job so a node that gets it late skips it (on top of its `expires`); returns the boot id that
        had started it, if any (and then leaves a job `unless_started_by` that boot running)."""
        ttl = max(1, int(deadline - time.time()) + 60)
        try:
            return await abandon_job(self._redis, job_id, ttl=ttl, keep_for=unless_started_by)
        except RedisError:  # if Redis is down, expiry still stops it at the deadline
            return _UNKNOWN


class _NotHeld(Exception):
    """The job was not sent: its node's alive key no longer held the boot it was meant for."""


GUARD_ATTEMPTS = 3
"""Reads of a node whose alive key changed under a send before giving up (a node restarting right then)."""

_UNKNOWN = "?"
"""`_abandon`'s answer when Redis could not say whether the job had started."""


def _outcome(lost: NodeUnavailable, operation: str, started: str | None) -> NodeUnavailable:
    """`lost` again, its message and details completed with what is known about the job."""
    previous = lost.details.get("previous_boot_id")
    if started is None:
        known, state = f"The {operation} never started, and it has been cancelled: it will not run.", "not_started"
    elif started == _UNKNOWN:
        known, state = f"Whether the {operation} started is unknown (Redis did not answer).", "unknown"
    elif isinstance(lost, NodeRestarted) and started == previous:
        known = (
            f"The {operation} was running in the process that was replaced; the new process starts with no models, "
            "so nothing it did survives. Retry it."
        )
        state = "interrupted"
    else:
        known = (
            f"The {operation} had started on the node; if the node comes back it may still finish. "
            "List the node's models to see."
        )
        state = "started"
    details = {**lost.details, "job_state": state}
    return type(lost)(f"{lost.message} {known}", **details)
