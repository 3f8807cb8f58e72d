"""Sending a Celery task from the event loop: the message built by Celery and kombu, written by our asyncio client.

`Celery.send_task` is blocking, and through kombu's Redis transport each send builds a new `redis.Redis` client
object for the task's LPUSH and another for its `task-sent` event's PUBLISH, two round trips (about 1.5 ms on a
loaded machine, plus a hop to a thread so as not to block the loop). Here `send_task` runs as usual, with every
option the API gives it, but through a producer on a kombu channel that keeps the Redis commands kombu would run
(`_put`: the LPUSH onto the queue's list, `_put_fanout`: the PUBLISH of the event on its topic) instead of
running them. What crosses Redis is therefore kombu's message and Celery's event (a test compares them with a
plain `send_task`'s); the API then runs both commands in one round trip on one connection that the sends of
every request share, pipelined (`api.redis_line.RedisLine`): no thread, no client object per send. After a
task's first send, its messages are filled in from a template of that send, checked against `send_task` first
(`api.message_template`), instead of built by `send_task` anew.

A send may be guarded: its commands run in one Lua call that first checks that a key holds a value (the node's
alive key, its boot id), and run nothing if it does not. A job is then never queued for a node that went
offline or was replaced since the API last looked, and the check costs no round trip of its own.

The channel is a real kombu channel of the broker's transport (Redis or Sentinel); creating it pings Redis
once, so it is made on the first send, in a thread. It never writes anything itself afterwards. No queue is
declared (`declare=[]`): a node declares its own queue when its consumer starts, and a job's list is its
queue's name whether or not a binding exists.
"""

import asyncio
import threading
import time
from datetime import datetime
from typing import Any

import anyio
import redis
import redis.asyncio as aioredis
from celery import Celery
from kombu import Connection, Producer
from kombu.utils.json import dumps

from api.message_template import Command, MessageTemplate
from api.redis_line import RedisLine, Script
from broker.backoff import Backoff

# KEYS[1]: the guard key; KEYS[2..]: the lists the commands push to (declared, not read). ARGV[1]: the value the
# guard key must hold; ARGV[2..]: the commands, three items each: 'lpush' or 'publish', its key or channel, payload.
# Returns 1 if the commands ran, 0 if the guard key held something else (or nothing).
_GUARDED = Script("""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
for i = 2, #ARGV, 3 do redis.call(ARGV[i], ARGV[i + 1], ARGV[i + 2]) end
return 1
""")

MIN_SEND_TIMEOUT = 1.0
"""Seconds a send may wait for Redis's answer when its job's deadline is nearer (or past: it is sent all the same,
and a node skips it as expired)."""

SEND_ATTEMPTS = 3
"""Tries of one send when Redis drops the connection (what the API's old `send_task` retry policy allowed)."""


class _Collecting:
    """Mixed into the broker transport's channel class: `_put` and `_put_fanout` keep their commands."""

    commands: list[Command]

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))  # type: ignore[attr-defined]
        self.commands.append(("lpush", (key, dumps(message))))

    def _put_fanout(self, exchange: str, message: dict[str, Any], routing_key: str, **kwargs: Any) -> None:
        payload = dumps(message)
        for topic in self._get_publish_topics(exchange, routing_key):  # type: ignore[attr-defined]
            self.commands.append(("publish", (topic, payload)))


def _collecting_transport(celery: Celery) -> type:
    """The broker's kombu transport class, with channels that collect their writes (see `_Collecting`)."""
    template = celery.connection_for_write()
    try:
        base = type(template.transport)
    finally:
        template.release()
    channel = type("CollectingChannel", (_Collecting, base.Channel), {})
    return type("CollectingTransport", (base,), {"Channel": channel})


class TaskSender:
    """Sends Celery tasks as `Celery.send_task` would, in one pipelined round trip on an asyncio client."""

    def __init__(self, celery: Celery, client: aioredis.Redis, *, timeout: float = 20.0) -> None:
        self._celery = celery
        self._line = RedisLine(client, timeout=timeout)
        self._connection: Connection | None = None
        self._producer: Producer | None = None
        self._lock = threading.Lock()
        self._templates: dict[str, MessageTemplate | None] = {}

    async def send(
        self,
        task: str,
        *,
        kwargs: dict[str, Any],
        queue: str,
        task_id: str,
        expires: datetime,
        guard: tuple[str, str] | None = None,
    ) -> bool:
        """Queue the task (and its `task-sent` event, if events are on); with `guard` (key, value), only if the
        key holds the value. Whether it was queued; raises redis' errors, TimeoutError once `expires` has passed
        without an answer (`MIN_SEND_TIMEOUT` at least; the job, if it was queued, expires before a node runs it)."""
        if self._producer is None:
            await anyio.to_thread.run_sync(self._open)
        commands = self.commands(task, kwargs=kwargs, queue=queue, task_id=task_id, expires=expires)
        backoff = Backoff(0.1, 0.5)
        deadline = expires.timestamp()
        for attempt in range(SEND_ATTEMPTS):
            try:
                return await self._run(commands, guard, max(deadline - time.time(), MIN_SEND_TIMEOUT))
            except redis.ConnectionError:
                # A connection Redis dropped (it restarted, failed over) fails once and is discarded; like
                # kombu's publish retry, try again on a fresh one. The job may have been queued before the
                # connection went: a node runs a job id once (`broker.replies.start_job`), so a second copy is
                # skipped.
                if attempt + 1 == SEND_ATTEMPTS:
                    raise
                await backoff.asleep()
        raise AssertionError("unreachable")

    async def _run(self, commands: list[Command], guard: tuple[str, str] | None, timeout: float) -> bool:
        if guard is None:  # pipelined: written in order before any reply is awaited
            await asyncio.gather(*(self._line.call(name, *args, timeout=timeout) for name, args in commands))
            return True
        if any(name not in ("lpush", "publish") for name, _ in commands):
            raise ValueError(f"a guarded send runs only LPUSH and PUBLISH, not {[n for n, _ in commands]}")
        pushed = [args[0] for name, args in commands if name == "lpush"]
        keys = [guard[0], *pushed]
        argv = [guard[1], *(item for name, args in commands for item in (name, *args))]
        return bool(await _GUARDED.run(self._line, keys, argv, timeout=timeout))

    def commands(
        self, task: str, *, kwargs: dict[str, Any], queue: str, task_id: str, expires: datetime
    ) -> list[Command]:
        """The Redis commands that send the task: what `send_task` would run (no I/O once the channel is open),
        filled in from the task's message template where it has one (`api.message_template`)."""
        self._open()
        if task not in self._templates:
            self._templates[task] = MessageTemplate.take(self._celery, self._send_task, task)
        template = self._templates[task]
        filled = None
        if template is not None:
            filled = template.fill(kwargs=kwargs, queue=queue, task_id=task_id, expires=expires)
        if filled is None:
            filled = self._send_task(task, kwargs=kwargs, queue=queue, task_id=task_id, expires=expires)
        return filled

    def _send_task(self, task: str, **options: Any) -> list[Command]:
        """What `send_task(task, **options)` runs, collected."""
        producer = self._open()
        channel = producer.channel
        channel.commands = []
        try:
            self._celery.send_task(task, ignore_result=True, producer=producer, retry=False, declare=[], **options)
            return list(channel.commands)
        finally:
            channel.commands = []

    def _open(self) -> Producer:
        if self._producer is not None:
            return self._producer
        with self._lock:
            if self._producer is None:
                self._connection = self._celery.connection_for_write(transport=_collecting_transport(self._celery))
                self._producer = Producer(self._connection.default_channel, auto_declare=False)
            return self._producer

    def close(self) -> None:
        self._line.close()
        if self._connection is not None:
            self._connection.release()
