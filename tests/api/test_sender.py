"""TaskSender against a real Redis: what it writes is what `Celery.send_task` writes through kombu, the queued
message and its `task-sent` event alike (a worker consuming it is tested end to end in tests/e2e)."""

import asyncio
import base64
import json
import random
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from celery import signals
from celery.utils.saferepr import saferepr

from api.message_template import SAFEREPR_LEVELS, MessageTemplate, plain_saferepr
from api.redis_line import RedisLine
from api.sender import TaskSender
from broker.celery_app import make_celery
from broker.operations import OPERATIONS
from broker.settings import BrokerSettings
from tests.conftest import RedisServer

# What differs between two sends of the same task by design: kombu's delivery tag, the expiration left (in ms,
# counted down from `expires`), the Lamport clock and the time of the event.
VARIES = {"delivery_tag", "expiration", "clock", "timestamp"}


def comparable(raw: bytes) -> dict[str, Any]:
    """A kombu message with its body decoded, without the fields that vary between sends."""
    message = json.loads(raw)
    properties = {k: v for k, v in message["properties"].items() if k not in VARIES}
    body = json.loads(base64.b64decode(message["body"]))
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k not in VARIES}
    return message | {"properties": properties, "body": body}


def sent(client: redis.Redis, queue: str, pubsub: Any) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """The message queued on `queue` and the event published with it (its topic too)."""
    queued = client.rpop(queue)
    assert queued is not None and client.llen(queue) == 0
    event = None
    deadline = time.monotonic() + 5
    while event is None and time.monotonic() < deadline:
        event = pubsub.get_message(timeout=1)
    assert event is not None, "no task-sent event"
    return comparable(queued), event["channel"].decode(), comparable(event["data"])


@pytest.fixture
def server(redis_server: RedisServer) -> RedisServer:
    redis_server.client().flushall()
    return redis_server


def test_sends_what_celery_sends(server: RedisServer) -> None:
    celery = make_celery(BrokerSettings(redis_url=server.url))
    client = server.client()
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe("*celeryev*")
    task_id, queue = uuid.uuid4().hex, "modelfleet.node." + "ab" * 16
    options: dict[str, Any] = {
        "kwargs": {"job": {"deadline": time.time() + 30, "modelId": "m"}},
        "queue": queue,
        "task_id": task_id,
        "expires": datetime.fromtimestamp(time.time() + 30, UTC),
    }
    celery.send_task("modelfleet.list", ignore_result=True, **options)
    theirs = sent(client, queue, pubsub)

    async def ours() -> None:
        async_client = aioredis.Redis.from_url(server.url)
        sender = TaskSender(celery, async_client)
        try:
            await sender.send("modelfleet.list", **options)
        finally:
            sender.close()
            await async_client.aclose()

    asyncio.run(ours())
    mine = sent(client, queue, pubsub)
    assert mine == theirs
    assert mine[1].endswith("celeryev/task.sent") and mine[2]["body"]["uuid"] == task_id
    celery.close()


def test_a_guarded_send_queues_only_while_the_guard_key_holds_its_value(server: RedisServer) -> None:
    celery = make_celery(BrokerSettings(redis_url=server.url))
    client = server.client()
    queue = "modelfleet.node." + "cd" * 16
    options: dict[str, Any] = {
        "kwargs": {"job": {"deadline": time.time() + 30}},
        "queue": queue,
        "expires": datetime.fromtimestamp(time.time() + 30, UTC),
    }

    async def send(guard: tuple[str, str]) -> bool:
        async_client = aioredis.Redis.from_url(server.url)
        sender = TaskSender(celery, async_client)
        try:
            return await sender.send("modelfleet.list", task_id=uuid.uuid4().hex, guard=guard, **options)
        finally:
            sender.close()
            await async_client.aclose()

    assert asyncio.run(send(("alive", "boot-1"))) is False, "no key: not sent"
    client.set("alive", "boot-2")
    assert asyncio.run(send(("alive", "boot-1"))) is False, "another value: not sent"
    assert client.llen(queue) == 0
    assert asyncio.run(send(("alive", "boot-2"))) is True
    assert client.llen(queue) == 1
    celery.close()


def test_a_send_gives_up_at_its_jobs_deadline_and_is_not_retried(
    server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis that takes every command and answers none (CLIENT PAUSE): the send fails with TimeoutError once its
    job's deadline has passed, and is not sent again (if it was queued meanwhile, it has expired by then)."""
    celery = make_celery(BrokerSettings(redis_url=server.url))
    client = server.client()
    client.set("alive", "boot-1")
    calls: list[tuple[Any, ...]] = []
    call = RedisLine.call

    async def counted(self: RedisLine, *args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return await call(self, *args, **kwargs)

    monkeypatch.setattr(RedisLine, "call", counted)

    async def send(sender: TaskSender) -> bool:
        expires = time.time() + 1
        return await sender.send(
            "modelfleet.list",
            kwargs={"job": {"deadline": expires}},
            queue="modelfleet.node." + "ef" * 16,
            task_id=uuid.uuid4().hex,
            expires=datetime.fromtimestamp(expires, UTC),
            guard=("alive", "boot-1"),
        )

    async def main() -> None:
        async_client = aioredis.Redis.from_url(server.url)
        sender = TaskSender(celery, async_client)
        try:
            assert await send(sender) is True  # opens the line, takes the template
            calls.clear()
            client.execute_command("CLIENT", "PAUSE", 3000, "ALL")
            with pytest.raises(redis.TimeoutError):
                await send(sender)
            assert len(calls) == 1, calls
        finally:
            sender.close()
            await async_client.aclose()

    asyncio.run(main())
    celery.close()


def send_both(celery: Any, server: RedisServer, **options: Any) -> tuple[Any, Any]:
    """What `send_task` writes for `options`, then what a TaskSender writes for them, each as `sent` reads it."""
    client = server.client()
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe("*celeryev*")
    pubsub.get_message(timeout=1)
    celery.send_task("modelfleet.list", ignore_result=True, **options)
    theirs = sent(client, options["queue"], pubsub)

    async def ours() -> list[Any]:
        async_client = aioredis.Redis.from_url(server.url)
        sender = TaskSender(celery, async_client)
        seen = []
        try:
            for _ in range(2):  # the first send takes the task's template, the second uses it
                await sender.send("modelfleet.list", **options)
                seen.append(sent(client, options["queue"], pubsub))
        finally:
            sender.close()
            await async_client.aclose()
        return seen

    first, second = asyncio.run(ours())
    assert first == second
    return theirs, second


def options(**changes: Any) -> dict[str, Any]:
    return {
        "kwargs": {"job": {"deadline": time.time() + 30, "modelPath": "/m/é.gguf", "contextLength": None}},
        "queue": "modelfleet.node." + uuid.uuid4().hex,
        "task_id": uuid.uuid4().hex,
        "expires": datetime.fromtimestamp(time.time() + 30, UTC),
    } | changes


def test_a_template_fills_in_what_send_task_writes(server: RedisServer) -> None:
    celery = make_celery(BrokerSettings(redis_url=server.url))
    sends: list[str] = []

    def send(task: str, **options: Any) -> list[Any]:
        sends.append(task)
        sender = TaskSender(celery, aioredis.Redis.from_url(server.url))
        return sender._send_task(task, **options)

    template = MessageTemplate.take(celery, send, "modelfleet.list")
    assert template is not None and sends == ["modelfleet.list"] * 2, "one send to take it, one to check it"
    probe = options()
    filled = template.fill(**probe)
    assert filled is not None
    theirs = send("modelfleet.list", **probe)
    assert [comparable(args[1].encode()) for _, args in filled] == [comparable(args[1].encode()) for _, args in theirs]
    theirs_sent, ours_sent = send_both(celery, server, **options())
    assert ours_sent == theirs_sent
    celery.close()


def test_send_task_sends_while_a_publish_signal_has_a_receiver(server: RedisServer) -> None:
    celery = make_celery(BrokerSettings(redis_url=server.url))
    heard: list[str] = []

    def receiver(headers: dict[str, Any], **_: Any) -> None:
        heard.append(headers["id"])

    signals.before_task_publish.connect(receiver)
    try:
        probe = options()
        theirs, ours = send_both(celery, server, **probe)
    finally:
        signals.before_task_publish.disconnect(receiver)
    assert ours == theirs
    assert heard.count(probe["task_id"]) == 3, "Celery's own send, then both of the sender's"
    celery.close()


def test_an_expired_send_goes_through_send_task(server: RedisServer) -> None:
    """Celery sets an expired send's expiration to 0 (and warns); a template filled in with it would say -5000."""
    celery = make_celery(BrokerSettings(redis_url=server.url))
    theirs, ours = send_both(celery, server, **options(expires=datetime.fromtimestamp(time.time() - 5, UTC)))
    assert ours == theirs

    async def expiration() -> str:
        sender = TaskSender(celery, aioredis.Redis.from_url(server.url))
        try:
            sender.commands("modelfleet.list", **options())  # the template is taken
            assert sender._templates["modelfleet.list"] is not None
            expired = options(expires=datetime.fromtimestamp(time.time() - 5, UTC))
            [(_, (_, payload)), *_] = sender.commands("modelfleet.list", **expired)
            return str(json.loads(payload)["properties"]["expiration"])
        finally:
            sender.close()

    assert asyncio.run(expiration()) == "0"
    celery.close()


def test_a_celery_whose_message_the_template_cannot_reproduce_sends_through_send_task(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    celery = make_celery(BrokerSettings(redis_url=server.url))
    celery.conf.task_protocol = 1  # Celery's old message: its body a dict, not (args, kwargs, embed)
    theirs, ours = send_both(celery, server, **options())
    assert ours == theirs and isinstance(ours[0]["body"], dict)
    assert "sending modelfleet.list through Celery's send_task" in caplog.text
    celery.close()


def test_a_template_that_fails_in_any_way_leaves_sending_to_send_task(
    server: RedisServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Celery 5.4 has no task_repr_maxlevels: reading it raised AttributeError out of the template's check, and
    every job answered 500 until the template learned the older name (found by CI's lowest-versions pass)."""

    def broken(self: MessageTemplate, **_: Any) -> None:
        raise AttributeError("'Settings' object has no attribute 'something_new'")

    monkeypatch.setattr(MessageTemplate, "fill", broken)
    celery = make_celery(BrokerSettings(redis_url=server.url))
    theirs, ours = send_both(celery, server, **options())
    assert ours == theirs
    assert "sending modelfleet.list through Celery's send_task" in caplog.text and "AttributeError" in caplog.text
    celery.close()


def _value(rng: random.Random, depth: int) -> object:
    """A value as jobs' kwargs hold them, nested up to `depth`, with the strings `saferepr` treats apart."""
    roll = rng.random()
    if depth > 0 and roll < 0.3:
        return {rng.choice(WORDS): _value(rng, depth - 1) for _ in range(rng.randrange(4))}
    if depth > 0 and roll < 0.45:
        return [_value(rng, depth - 1) for _ in range(rng.randrange(4))]
    return rng.choice([rng.choice(WORDS), rng.randrange(-(10**12), 10**12), rng.uniform(-1e6, 1e18), True, False, None])


WORDS = ["job", "deadline", "model_id", "it's", "a\\b", "new\nline", "tab\t", "ünïcode", "", "'", '"', "x" * 300]


def test_the_plain_kwargs_repr_is_celerys_saferepr() -> None:
    rng = random.Random(20261207)
    compared = 0
    for _ in range(3000):
        value = {"job": _value(rng, 5)}
        maxlen = rng.choice([None, 1024, 200, 40])
        levels = rng.choice([3, 2, 5, 0])
        fast = plain_saferepr(value, maxlen, levels)
        if fast is not None:
            assert fast == saferepr(value, maxlen, maxlevels=levels), (value, maxlen, levels)
            compared += 1
    assert compared > 1500, "most generated values must take the fast way"
    # What it leaves to saferepr: other types, other keys, and anything saferepr would cut.
    assert plain_saferepr({"job": (1, 2)}, 1024, 3) is None
    assert plain_saferepr({1: "a"}, 1024, 3) is None
    assert plain_saferepr({"job": "x" * 2000}, 1024, 3) is None


def test_every_operations_job_takes_the_plain_repr() -> None:
    celery = make_celery(BrokerSettings())
    maxsize = celery.amqp.kwargsrepr_maxsize
    for op in OPERATIONS:
        fields = {"model_id": "org/tiny-a", "model_path": "org/tiny-a.gguf", "context_length": 2048, "pin": True}
        job = op.job(deadline=time.time() + 30, **{k: v for k, v in fields.items() if k in op.job.model_fields})
        kwargs = {"job": job.wire()}
        assert plain_saferepr(kwargs, maxsize, SAFEREPR_LEVELS) == saferepr(kwargs, maxsize), op.name
