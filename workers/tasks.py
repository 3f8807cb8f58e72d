"""The node's Celery tasks. Each is thin: check the deadline, validate the job, call the service, reply.

Every task answers through the node's `ReplyOutbox` (`broker.replies` underneath), never through a result
backend; whatever happens, exactly one reply is written, so the API never waits for a job that has already
ended, and a reply that Redis cannot take yet is retried until the job's deadline. A job starts only through
`broker.replies.start_job`, which records the boot that ran it (or refuses a job its caller cancelled).
"""

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from celery import Celery, Task
from pydantic import BaseModel, ValidationError

from broker import keys
from broker.errors import InternalError, InvalidRequest, JobExpired, ModelfleetError
from broker.replies import AGAIN, CANCELLED, start_job
from broker.schemas import CatalogJob, ErrorInfo, Job, ListJob, LoadJob, Reply, UnloadAllJob, UnloadJob
from workers.node import NodeRuntime
from workers.outbox import TRANSIENT

log = logging.getLogger(__name__)

_runtime: NodeRuntime | None = None


def install(runtime: NodeRuntime) -> None:
    """Give the tasks their node. Called once, before the worker starts consuming."""
    global _runtime
    _runtime = runtime


Operation = Callable[[Any], BaseModel]
Joiner = Callable[[Any], "Future[BaseModel] | None"]


def _run(task: Task, job_type: type[Job], payload: Any, operation: Operation, join: Joiner | None = None) -> Any:
    """Run one job and publish its reply. With `join`, a job that can attach to an operation already in
    flight (a load of a model that is loading) is answered when that finishes, without holding a pool thread:
    a burst of retried loads must not starve the node of threads for lists."""
    runtime = _runtime
    assert runtime is not None, "workers.tasks.install() was not called"
    job_id = str(task.request.id)

    def checked() -> Job:
        job = job_type.model_validate(payload)
        if time.time() > job.deadline:
            raise JobExpired(f"The job reached the node {time.time() - job.deadline:.1f}s after its deadline.")
        try:
            outcome = start_job(runtime.redis, job_id, runtime.boot_id, ttl=runtime.settings.reply_ttl)
        except TRANSIENT as exc:
            # Redis went away after handing the job over: run it anyway (its deadline still holds); the outbox
            # keeps the reply until Redis is back. Only the record of which boot started it is missing.
            log.warning("job %s starts unrecorded: Redis did not answer (%s)", job_id, type(exc).__name__)
            return job
        if outcome == AGAIN:
            raise _Redelivered(job_id)
        if outcome == CANCELLED:
            raise JobExpired("The caller gave up on this job before it started.")
        return job

    joined: Future[BaseModel] | None = None

    def attempt() -> BaseModel | None:
        nonlocal joined
        job = checked()
        joined = join(job) if join is not None else None
        return None if joined is not None else operation(job)

    deadline = _deadline(payload)
    try:
        reply = _reply(task, job_id, runtime, attempt)
    except _Redelivered:
        # Its first run replied already: a second run would do the work twice and overwrite that reply.
        log.warning("job %s was delivered again (broker redelivery after a failover?); it ran before: skipped", job_id)
        return {"jobId": job_id, "node": runtime.fingerprint, "skipped": "redelivered"}
    if reply is None:
        assert joined is not None
        joined.add_done_callback(lambda fut: _finish_quietly(task, job_id, runtime, fut, deadline))
        return {"jobId": job_id, "node": runtime.fingerprint, "joined": True}
    return _finish(task, job_id, runtime, reply, deadline)


class _Redelivered(Exception):
    """The broker delivered a job that already started on this node (`broker.replies.start_job`)."""


def _deadline(payload: Any) -> float:
    """The job's deadline as sent (until when its reply is worth retrying); a minute if it is unreadable."""
    value = payload.get("deadline") if isinstance(payload, dict) else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else time.time() + 60


def _finish_quietly(
    task: Task, job_id: str, runtime: NodeRuntime, joined: "Future[BaseModel]", deadline: float
) -> None:
    """Publish a joined job's reply from the loading thread; a failure here must be logged, not lost."""
    try:
        _finish(task, job_id, runtime, _reply(task, job_id, runtime, joined.result), deadline)
    except Exception:
        log.exception("the reply to joined job %s could not be published; its caller will time out", job_id)


def _reply(task: Task, job_id: str, runtime: NodeRuntime, compute: Callable[[], BaseModel | None]) -> Reply | None:
    """The reply for what `compute` returns or raises; None when it returned None (the reply comes later)."""
    try:
        result = compute()
        if result is None:
            return None
        return Reply(job_id=job_id, node=runtime.fingerprint, result=result.model_dump(mode="json", by_alias=True))
    except _Redelivered:
        raise
    except ValidationError as exc:
        error: ModelfleetError = InvalidRequest(f"Malformed job: {exc.error_count()} invalid field(s).")
    except ModelfleetError as exc:
        error = exc
    except Exception as exc:
        log.exception("job %s (%s) failed unexpectedly", job_id, task.name)
        error = InternalError(f"The node failed: {type(exc).__name__}.")
    info = ErrorInfo(code=error.code, error=error.message, details=error.details)
    return Reply(job_id=job_id, node=runtime.fingerprint, error=info)


def _finish(task: Task, job_id: str, runtime: NodeRuntime, reply: Reply | None, deadline: float) -> dict[str, Any]:
    assert reply is not None, "only a joined job has no reply yet"
    runtime.outbox.send(reply, deadline)
    if reply.error is not None:
        log.info("job %s (%s): %s", job_id, task.name, reply.error.code)
    # Celery logs and Flower shows a task's return value: only the outcome, never the reply's text, which can
    # echo what a caller sent (a model id that is really a pasted key, say).
    return {
        "jobId": job_id,
        "node": runtime.fingerprint,
        "ok": reply.error is None,
        "code": reply.error.code if reply.error else None,
    }


def register_tasks(app: Celery) -> None:
    """Register the node tasks on `app` under their public names."""

    def service():
        assert _runtime is not None
        return _runtime.service

    @app.task(name=keys.TASK_LOAD, bind=True)
    def load(self: Task, job: dict[str, Any]) -> dict[str, Any]:
        return _run(self, LoadJob, job, lambda j: service().load(j), join=lambda j: service().join_load(j))

    @app.task(name=keys.TASK_UNLOAD, bind=True)
    def unload(self: Task, job: dict[str, Any]) -> dict[str, Any]:
        return _run(self, UnloadJob, job, lambda j: service().unload(j))

    @app.task(name=keys.TASK_UNLOAD_ALL, bind=True)
    def unload_all(self: Task, job: dict[str, Any]) -> dict[str, Any]:
        return _run(self, UnloadAllJob, job, lambda j: service().unload_all(j))

    @app.task(name=keys.TASK_LIST, bind=True)
    def list_models(self: Task, job: dict[str, Any]) -> dict[str, Any]:
        return _run(self, ListJob, job, lambda j: service().list())

    @app.task(name=keys.TASK_CATALOG, bind=True)
    def catalog(self: Task, job: dict[str, Any]) -> dict[str, Any]:
        return _run(self, CatalogJob, job, lambda j: service().catalog())
