"""The node's Celery tasks. Each is thin: check the deadline, validate the job, call the service, reply.

Every task answers through the node's `ReplyOutbox` (`broker.replies` underneath), never through a result
backend; whatever happens, exactly one reply is written, so the API never waits for a job that has already
ended, and a reply that Redis cannot take yet is retried until the job's deadline. A job starts only through
`broker.replies.start_job`, which records the boot that ran it (or refuses a job its caller cancelled).

Celery's own record of the task (what Flower shows) follows the reply: a job that answered an error ends as a
FAILURE, raising `JobFailed` once its reply is out. A job that joined a load in flight leaves its task without a
state (Celery's `Ignore`) and announces SUCCESS or FAILURE itself when that load ends.
"""

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from celery import Celery, Task
from celery.exceptions import Ignore
from pydantic import BaseModel, ValidationError

from broker.errors import InternalError, InvalidRequest, JobExpired, ModelfleetError
from broker.operations import CATALOG, LIST, LOAD, OPERATIONS, UNLOAD, UNLOAD_ALL, Op
from broker.replies import AGAIN, CANCELLED, start_job
from broker.schemas import ErrorInfo, Job, Reply
from workers.node import NodeRuntime
from workers.outbox import TRANSIENT
from workers.service import NodeService

log = logging.getLogger(__name__)

_runtime: NodeRuntime | None = None

EVENTS_FLUSH_TIMEOUT = 5.0
"""How long a job that changed the models waits for its events (and the node's memory figures) to be out before
it replies: what makes fleet status read its own writes. Only a failing Redis makes it wait."""


def install(runtime: NodeRuntime) -> None:
    """Give the tasks their node. Called once, before the worker starts consuming."""
    global _runtime
    _runtime = runtime


Handler = Callable[[NodeService, Any], BaseModel]
Joiner = Callable[[NodeService, Any], "Future[BaseModel] | None"]

HANDLERS: dict[Op[Any, Any], tuple[Handler, Joiner | None]] = {
    LOAD: (NodeService.load, NodeService.join_load),
    UNLOAD: (NodeService.unload, None),
    UNLOAD_ALL: (NodeService.unload_all, None),
    LIST: (lambda service, job: service.list(), None),
    CATALOG: (lambda service, job: service.catalog(), None),
}
"""What the node does for each operation of `broker.operations` (and, for a load, how a job joins one in flight)."""


class JobFailed(Exception):
    """The job answered an error (its reply is already out): Celery records the task as FAILURE.

    Carries only the error's code: the reply's text can echo what a caller sent, and Flower shows this.
    """

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


def _run(task: Task, op: Op[Any, Any], payload: Any, handle: Handler, join: Joiner | None = None) -> Any:
    """Run one job and publish its reply. With `join`, a job that can attach to an operation already in
    flight (a load of a model that is loading) is answered when that finishes, without holding a pool thread:
    a burst of retried loads must not starve the node of threads for lists."""
    runtime = _runtime
    assert runtime is not None, "workers.tasks.install() was not called"
    job_id = str(task.request.id)

    def checked() -> Job:
        job = op.job.model_validate(payload)
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
        joined = join(runtime.service, job) if join is not None else None
        return None if joined is not None else handle(runtime.service, job)

    deadline = _deadline(payload)
    try:
        reply = _reply(task, op, job_id, runtime, attempt)
    except _Redelivered:
        # Its first run replied already: a second run would do the work twice and overwrite that reply.
        log.warning("job %s was delivered again (broker redelivery after a failover?); it ran before: skipped", job_id)
        return {"jobId": job_id, "node": runtime.fingerprint, "skipped": "redelivered"}
    if reply is None:
        assert joined is not None
        hostname = str(task.request.hostname)
        joined.add_done_callback(lambda fut: _finish_quietly(task, op, job_id, hostname, runtime, fut, deadline))
        raise Ignore()  # no state yet: _finish_quietly announces it when the joined load ends
    return _finish(task, op, job_id, runtime, reply, deadline)


class _Redelivered(Exception):
    """The broker delivered a job that already started on this node (`broker.replies.start_job`)."""


def _deadline(payload: Any) -> float:
    """The job's deadline as sent (until when its reply is worth retrying); a minute if it is unreadable."""
    value = payload.get("deadline") if isinstance(payload, dict) else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else time.time() + 60


def _finish_quietly(
    task: Task,
    op: Op[Any, Any],
    job_id: str,
    hostname: str,
    runtime: NodeRuntime,
    joined: "Future[BaseModel]",
    deadline: float,
) -> None:
    """Publish a joined job's reply from the loading thread, and tell Celery's event stream how the job ended
    (the worker sent nothing for it). A failure here must be logged, not lost."""
    try:
        outcome = _finish(task, op, job_id, runtime, _reply(task, op, job_id, runtime, joined.result), deadline)
        kind, fields = "task-succeeded", {"result": repr(outcome), "runtime": 0.0}
    except JobFailed as failed:
        kind, fields = "task-failed", {"exception": repr(failed), "traceback": None}
    except Exception:
        log.exception("the reply to joined job %s could not be published; its caller will time out", job_id)
        return
    try:
        with task.app.events.default_dispatcher(hostname=hostname) as dispatcher:
            dispatcher.send(kind, uuid=job_id, **fields)
    except Exception as exc:  # the reply is out; only the monitoring view misses this job's end
        log.warning("the end of joined job %s could not be announced to Flower: %s", job_id, type(exc).__name__)


def _reply(
    task: Task, op: Op[Any, Any], job_id: str, runtime: NodeRuntime, compute: Callable[[], BaseModel | None]
) -> "Reply[Any] | None":
    """The reply for what `compute` returns or raises; None when it returned None (the reply comes later)."""
    try:
        result = compute()
        if result is None:
            return None
        return op.reply(job_id=job_id, node=runtime.fingerprint, result=result)
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
    return op.reply(job_id=job_id, node=runtime.fingerprint, error=info)


def _finish(
    task: Task, op: Op[Any, Any], job_id: str, runtime: NodeRuntime, reply: "Reply[Any] | None", deadline: float
) -> dict[str, Any]:
    assert reply is not None, "only a joined job has no reply yet"
    if op.changes_models and not runtime.events.flush(EVENTS_FLUSH_TIMEOUT):
        log.warning("job %s replies before its model events are out (Redis slow?)", job_id)
    runtime.outbox.send(reply, deadline)
    if reply.error is not None:
        log.info("job %s (%s): %s", job_id, task.name, reply.error.code)
        raise JobFailed(reply.error.code)
    # Celery logs and Flower shows a task's return value: only the outcome, never the reply's text, which can
    # echo what a caller sent (a model id that is really a pasted key, say).
    return {"jobId": job_id, "node": runtime.fingerprint, "ok": True}


def register_tasks(app: Celery) -> None:
    """Register one task per operation of `broker.operations`, under the operation's task name."""
    missing = [op for op in OPERATIONS if op not in HANDLERS]
    if missing:
        raise RuntimeError(f"this worker cannot run the operations {missing}: workers.tasks.HANDLERS lacks them")
    for op in OPERATIONS:
        _register(app, op, *HANDLERS[op])


def _register(app: Celery, op: Op[Any, Any], handle: Handler, join: Joiner | None) -> None:
    @app.task(name=op.task, bind=True, throws=(JobFailed,))  # expected: logged in one line, no traceback
    def run(self: Task, job: dict[str, Any]) -> dict[str, Any]:
        return _run(self, op, job, handle, join)
