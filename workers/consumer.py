"""The worker's Celery consumer, logging a rejected message by its size and a hash, never by its bytes.

Celery's own consumer logs the body (up to 1 KiB) and headers of a message it cannot decode, does not know or
finds invalid. Whatever reaches a node's queue is untrusted: its bytes can hold a pasted secret, terminal
escape sequences, or line separators that forge log lines. This consumer logs what an operator needs to find
the message again (its length, a SHA-256 prefix, its content type, the task name if it is one of ours) and
nothing the sender chose freely. Selected with `worker_consumer` (`broker.celery_app` leaves it to the worker).
"""

import hashlib
import logging
from typing import Any, Protocol

from celery import bootsteps, signals
from celery.worker.consumer import Consumer
from kombu.message import Message

from broker.operations import OPERATIONS

log = logging.getLogger("modelfleet.worker.consumer")

_OUR_TASKS = {op.task for op in OPERATIONS}


def fingerprint(raw: bytes | str | None) -> str:
    """`<size> bytes, sha256 <first 16 hex digits>`: enough to match a message, nothing of its content."""
    data = raw.encode(errors="surrogateescape") if isinstance(raw, str) else (raw or b"")
    return f"{len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}"


def _describe(message: Message) -> str:
    content_type = message.content_type if message.content_type in ("application/json", None) else "other"
    task = (message.headers or {}).get("task")
    named = task if task in _OUR_TASKS else ("another task" if task else "no task")
    return f"{fingerprint(message.body)}, content type {content_type or 'none'}, {named}"


class QuietConsumer(Consumer):
    """Celery's consumer, with its four "bad message" reports replaced by size-and-hash ones."""

    def on_decode_error(self, message: Message, exc: Exception) -> None:
        log.error("refused a message that cannot be decoded (%s): %s", type(exc).__name__, _describe(message))
        message.ack()

    def on_unknown_message(self, body: Any, message: Message) -> None:
        log.warning("refused a message that is not a task: %s", _describe(message))
        message.reject_log_error(log, self.connection_errors)
        signals.task_rejected.send(sender=self, message=message, exc=None)

    def on_unknown_task(self, body: Any, message: Message, exc: Exception) -> None:
        log.error("refused a message for a task this node does not run: %s", _describe(message))
        message.reject_log_error(log, self.connection_errors)
        signals.task_rejected.send(sender=self, message=message, exc=exc)

    def on_invalid_task(self, body: Any, message: Message, exc: Exception) -> None:
        log.error("refused an invalid task message (%s): %s", type(exc).__name__, _describe(message))
        message.reject_log_error(log, self.connection_errors)
        signals.task_rejected.send(sender=self, message=message, exc=exc)


class _Marks(Protocol):
    def mark_consuming(self, consuming: bool = True) -> None: ...


def consuming_step(registrar: _Marks) -> type[bootsteps.StartStopStep]:
    """A step of the consumer's blueprint that tells the registry whether this process takes jobs.

    Celery starts the consumer's steps once its broker connection is up and stops them all when that
    connection fails, then starts them again after it reconnects (with a backoff that grows to 30 s). Marked
    once at `worker_ready`, a node showed `consuming` through that whole gap after a Redis outage, while a job
    sent to it waited for the reconnect."""

    class Consuming(bootsteps.StartStopStep):
        requires = ("celery.worker.consumer.tasks:Tasks",)

        def start(self, parent: Any) -> None:
            registrar.mark_consuming(True)

        def stop(self, parent: Any) -> None:
            registrar.mark_consuming(False)

        def shutdown(self, parent: Any) -> None:
            registrar.mark_consuming(False)

    return Consuming
