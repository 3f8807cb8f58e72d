"""Sending a job to a node's queue and awaiting its reply under the operation's deadline."""

import asyncio
import contextlib
import time
import uuid
from datetime import UTC, datetime
from functools import partial
from typing import Any

import anyio
import redis.asyncio as aioredis
from celery import Celery
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from api.metrics import Metrics
from api.replies import ReplyWaiter
from broker import keys
from broker.errors import BrokerUnavailable, JobTimeout, NodeOffline, NodeWentOffline, from_code
from broker.schemas import CatalogJob, Job, ListJob, LoadJob, NodeInfo, Operation, UnloadAllJob, UnloadJob

OPERATION_NAMES = {
    keys.TASK_LOAD: "load",
    keys.TASK_UNLOAD: "unload",
    keys.TASK_UNLOAD_ALL: "unload-all",
    keys.TASK_LIST: "model list",
    keys.TASK_CATALOG: "catalog",
}

OPERATIONS = {
    keys.TASK_LOAD: Operation.LOAD,
    keys.TASK_UNLOAD: Operation.UNLOAD,
    keys.TASK_UNLOAD_ALL: Operation.UNLOAD_ALL,
    keys.TASK_LIST: Operation.LIST,
    keys.TASK_CATALOG: Operation.CATALOG,
}


class JobClient:
    """Runs one job on one node: liveness check, send, await reply or deadline, cancel on give-up."""

    def __init__(
        self, celery: Celery, client: aioredis.Redis, waiter: ReplyWaiter, *, send_threads: int, metrics: Metrics
    ) -> None:
        self._celery = celery
        self._redis = client
        self._waiter = waiter
        self._metrics = metrics
        # Publishing is a short blocking call; a small dedicated limiter keeps it off Starlette's shared pool.
        self._limiter = anyio.CapacityLimiter(send_threads)

    async def run(self, node: NodeInfo, task: str, job_fields: dict[str, Any], timeout: float) -> dict[str, Any]:
        """The node's result, or raise the node's error (or NodeOffline / NodeWentOffline / JobTimeout)."""
        with self._metrics.job(OPERATIONS[task]):
            return await self._run(node, task, job_fields, timeout)

    async def _run(self, node: NodeInfo, task: str, job_fields: dict[str, Any], timeout: float) -> dict[str, Any]:
        if not node.online:
            since = node.seconds_since_heartbeat
            when = f"{since:.0f} seconds ago" if since is not None else "never"
            raise NodeOffline(
                f"Node {node.name} ({node.fingerprint}) is offline: its last heartbeat was {when}.",
                node=node.fingerprint,
                seconds_since_heartbeat=since,
            )
        deadline = time.time() + timeout
        job: Job = _JOB_TYPES[task](deadline=deadline, **job_fields)
        job_id = uuid.uuid4().hex
        future = self._waiter.expect(job_id, node.fingerprint, node.name)
        try:
            await self._send(task, job, job_id, node.fingerprint, deadline)
            reply = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            await self._abandon(job_id, deadline)
            raise JobTimeout(
                f"Node {node.name} did not finish the {OPERATION_NAMES[task]} within {timeout:g} seconds.",
                timeout_seconds=timeout,
            ) from None
        except NodeWentOffline:
            await self._abandon(job_id, deadline)
            raise
        finally:
            self._waiter.forget(job_id)
        if reply.error is not None:
            raise from_code(reply.error.code, reply.error.error, reply.error.details)
        return reply.result or {}

    async def _send(self, task: str, job: Job, job_id: str, fingerprint: str, deadline: float) -> None:
        send = partial(
            self._celery.send_task,
            task,
            kwargs={"job": job.wire()},
            queue=keys.node_queue(fingerprint),
            task_id=job_id,
            expires=datetime.fromtimestamp(deadline, UTC),
            ignore_result=True,
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2},
        )
        try:
            await anyio.to_thread.run_sync(send, limiter=self._limiter)
        except OperationalError as exc:
            raise BrokerUnavailable("The job could not be queued: Redis is unreachable.") from exc

    async def _abandon(self, job_id: str, deadline: float) -> None:
        """Mark the job cancelled so a node that gets it late skips it (on top of its `expires`)."""
        with contextlib.suppress(RedisError):  # if Redis is down, expiry still stops it at the deadline
            await self._redis.set(keys.cancel(job_id), b"1", ex=max(1, int(deadline - time.time()) + 60))


_JOB_TYPES: dict[str, type[Job]] = {
    keys.TASK_LOAD: LoadJob,
    keys.TASK_UNLOAD: UnloadJob,
    keys.TASK_UNLOAD_ALL: UnloadAllJob,
    keys.TASK_LIST: ListJob,
    keys.TASK_CATALOG: CatalogJob,
}
