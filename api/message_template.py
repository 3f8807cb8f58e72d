"""Celery's task message and `task-sent` event, filled in from a template taken off one real `send_task`.

`Celery.send_task` builds every message from scratch: routing, option merging, two `saferepr`s, the event, two
kombu envelopes. Measured in the API, 174 us of its 1.1 ms of CPU per job (16%), for messages that differ only
in a few fields. Here one real `send_task` per task name (its commands kept by `api.sender`'s collecting channel)
gives the shape of that task's message; each later send copies it and sets what belongs to that send: the task
id (with its root and correlation ids), the keyword arguments and their repr, `expires` (with kombu's
`expiration`), the queue (with the routing key), kombu's delivery tags, and the event's Lamport clock,
timestamp and UTC offset. Every other field (origin, reply-to, the event's hostname and pid, ...) is Celery's
own value, taken from the template.

A template is used only once it has proven itself: it fills in a second, different send, which is compared with
what `send_task` writes for the same send, field by field, bodies decoded (`check`). A Celery or kombu whose
message it does not reproduce fails that check, and the task is sent by `send_task` as before (a warning says
so). So is every send while a receiver is connected to Celery's publish signals, which `send_task` would call,
and a send whose `expires` has passed, which Celery handles on its own.
"""

import base64
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Celery, signals
from celery.utils.saferepr import saferepr
from celery.utils.time import utcoffset
from kombu.utils.json import JSONEncoder

log = logging.getLogger(__name__)

Command = tuple[str, tuple[Any, ...]]
Send = Callable[..., list[Command]]
"""`send_task(task, kwargs=, queue=, task_id=, expires=)` through the collecting channel: the commands it ran."""

SIGNALS = (signals.before_task_publish, signals.after_task_publish, signals.task_sent)
"""Celery's signals that `send_task` sends; a receiver on any of them needs the real `send_task`."""


_JSON = JSONEncoder()
"""What kombu's `dumps` builds for every call (`json.dumps(s, cls=JSONEncoder)`), built once."""


def dumps(payload: Any) -> str:
    return _JSON.encode(payload)


def _encode(payload: Any) -> str:
    return base64.b64encode(dumps(payload).encode()).decode()


def _decode(body: str) -> Any:
    return json.loads(base64.b64decode(body))


@dataclass(frozen=True)
class MessageTemplate:
    """One task's message (and event, if Celery sends task events) with every per-send field still to set."""

    celery: Celery
    message: dict[str, Any]
    embed: Any
    """The body's third item (callbacks, errbacks, chain, chord): all None for a job the API sends."""
    event_topic: str | None
    event_envelope: dict[str, Any] | None
    event: dict[str, Any] | None
    repr_limits: tuple[int, int]
    """The kwargs repr's size and depth as this Celery writes them (`task_repr_maxlevels` came with 5.5),
    read once: a Celery configuration read costs microseconds a send."""

    @classmethod
    def take(cls, celery: Celery, send: Send, task: str) -> "MessageTemplate | None":
        """The template of `task` made from one `send`, and checked against another; None if it does not
        reproduce what `send_task` writes (then the caller keeps sending through `send_task`)."""
        probe = _probe()
        try:
            template = cls._parse(celery, send(task, **probe), probe["queue"])
            problem = template.check(send, task) if template is not None else "its commands are not LPUSH+PUBLISH"
        except Exception as exc:  # whatever this Celery does differently: it keeps sending through send_task
            template, problem = None, f"failed ({type(exc).__name__}: {exc})"
        if problem is not None:
            log.warning("sending %s through Celery's send_task: its message template %s", task, problem)
            return None
        return template

    @classmethod
    def _parse(cls, celery: Celery, commands: list[Command], queue: str) -> "MessageTemplate | None":
        pushes = [args for name, args in commands if name == "lpush"]
        events = [args for name, args in commands if name == "publish"]
        if len(pushes) != 1 or len(events) > 1 or len(commands) != len(pushes) + len(events) or pushes[0][0] != queue:
            return None
        message = json.loads(pushes[0][1])
        args, _, embed = _decode(message["body"])
        if args != []:
            return None
        topic, envelope, event = None, None, None
        if events:
            topic, raw = events[0]
            envelope = json.loads(raw)
            event = _decode(envelope["body"])
        levels = getattr(celery.conf, "task_repr_maxlevels", None)
        limits = (celery.amqp.kwargsrepr_maxsize, SAFEREPR_LEVELS if levels is None else levels)
        return cls(celery, message, embed, topic, envelope, event, limits)

    def fill(self, *, kwargs: dict[str, Any], queue: str, task_id: str, expires: datetime) -> list[Command] | None:
        """The commands that send this task with these values, as `send_task` would; None if `send_task` must
        send it (a publish signal has a receiver, or `expires` has passed)."""
        if any(signal.receivers for signal in SIGNALS):
            return None
        # What send_task computes from `self.celery.now()`, which costs 14 us (dateutil's ambiguity check).
        left = (
            expires.timestamp() - time.time()
            if expires.tzinfo is not None
            else (expires - self.celery.now()).total_seconds()
        )
        if left < 0:
            return None
        kwargsrepr = self._kwargsrepr(kwargs)
        at = expires.isoformat()
        template = self.message
        headers = template["headers"] | {"id": task_id, "root_id": task_id, "expires": at, "kwargsrepr": kwargsrepr}
        properties = template["properties"] | {
            "correlation_id": task_id,
            "expiration": str(int(left * 1000)),
            "delivery_info": template["properties"]["delivery_info"] | {"routing_key": queue},
            "delivery_tag": str(uuid.uuid4()),
        }
        body = _encode([[], kwargs, self.embed])
        commands: list[Command] = [
            ("lpush", (queue, dumps(template | {"body": body, "headers": headers, "properties": properties})))
        ]
        if self.event is not None and self.event_envelope is not None and self.event_topic is not None:
            event = self.event | {
                "utcoffset": utcoffset(),
                "clock": self.celery.clock.forward(),
                "uuid": task_id,
                "root_id": task_id,
                "kwargs": kwargsrepr,
                "expires": at,
                "queue": queue,
                "routing_key": queue,
                "timestamp": time.time(),
            }
            envelope = self.event_envelope | {
                "body": _encode(event),
                "properties": self.event_envelope["properties"] | {"delivery_tag": str(uuid.uuid4())},
            }
            commands.append(("publish", (self.event_topic, dumps(envelope))))
        return commands

    def _kwargsrepr(self, kwargs: dict[str, Any]) -> str:
        """The kwargs' repr as this Celery's `as_task_v2` writes it."""
        maxsize, levels = self.repr_limits
        fast = plain_saferepr(kwargs, maxsize, levels)
        return fast if fast is not None else saferepr(kwargs, maxsize, maxlevels=levels)

    def check(self, send: Send, task: str) -> str | None:
        """What differs between this template's commands for a new send and `send_task`'s, or None if nothing
        does but the fields that differ between any two sends (delivery tags, expiration, event timestamp).
        The Lamport clock must have moved on by exactly one."""
        probe = _probe()
        theirs = send(task, **probe)
        mine = self.fill(**probe)
        if mine is None:
            return "could not fill in a send"
        if [(name, args[0]) for name, args in mine] != [(name, args[0]) for name, args in theirs]:
            return f"writes {[(n, a[0]) for n, a in mine]} where send_task writes {[(n, a[0]) for n, a in theirs]}"
        for (name, (_, my_raw)), (_, (_, their_raw)) in zip(mine, theirs, strict=True):
            my_payload, their_payload = _comparable(my_raw), _comparable(their_raw)
            if name == "publish":
                their_clock = their_payload["body"].pop("clock")
                if my_payload["body"].pop("clock") != their_clock + 1:
                    return "does not move the event's Lamport clock as Celery does"
            if my_payload != their_payload:
                return f"writes a {name} payload unlike send_task's:\n{my_payload}\n{their_payload}"
        return None


SAFEREPR_LEVELS = 3
"""`saferepr`'s default depth, which `as_task_v2` uses where Celery has no `task_repr_maxlevels` (before 5.5)."""


def plain_saferepr(value: object, maxlen: int | None, maxlevels: int) -> str | None:
    """What Celery's `saferepr(value, maxlen, maxlevels)` returns, for a value made of dicts and lists of strings,
    numbers, booleans and None that it would not truncate; None for anything else (let `saferepr` do it).

    `saferepr` walks its value through generators, a token at a time: 23 us for a list job's kwargs, 69 us for a
    load job's, where this takes 4-6 us. The rules followed are its own: a string in single quotes with only
    its single quotes escaped, a number as `str` gives it, None as `repr` does, and a container at depth
    `maxlevels` (the outermost at 0) as `{...}` or `[...]`. An answer as long as `maxlen` or longer is left to it,
    for its truncation. A test holds the two equal over generated values."""
    parts: list[str] = []

    def walk(item: Any, level: int) -> bool:
        kind = type(item)
        if kind is str:
            parts.append("'" + item.replace("'", "\\'") + "'")
        elif kind is int or kind is float or kind is bool or item is None:
            parts.append(str(item))
        elif kind is dict or kind is list:
            if maxlevels and level >= maxlevels:
                parts.append("{...}" if kind is dict else "[...]")
                return True
            if kind is dict:
                parts.append("{")
                for i, (key, child) in enumerate(item.items()):
                    if i:
                        parts.append(", ")
                    if type(key) is not str:
                        return False
                    parts.append("'" + key.replace("'", "\\'") + "': ")
                    if not walk(child, level + 1):
                        return False
                parts.append("}")
            else:
                parts.append("[")
                for i, child in enumerate(item):
                    if i:
                        parts.append(", ")
                    if not walk(child, level + 1):
                        return False
                parts.append("]")
        else:
            return False
        return True

    if not walk(value, 0):
        return None
    text = "".join(parts)
    return text if maxlen is None or len(text) < maxlen else None


_VARIES = {"delivery_tag", "expiration", "timestamp"}


def _comparable(raw: str) -> dict[str, Any]:
    payload = json.loads(raw)
    body = _decode(payload["body"])
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k not in _VARIES}
    properties = {k: v for k, v in payload["properties"].items() if k not in _VARIES}
    return payload | {"body": body, "properties": properties}


def _probe() -> dict[str, Any]:
    """A send of made-up values, with the kinds of value a job holds (nested objects, text, numbers, null)."""
    return {
        "kwargs": {"job": {"deadline": time.time() + 60, "modelId": f"probe-{uuid.uuid4().hex[:6]} é", "n": [1, None]}},
        "queue": f"modelfleet.template-probe.{uuid.uuid4().hex}",
        "task_id": uuid.uuid4().hex,
        "expires": datetime.now(UTC) + timedelta(seconds=60),
    }
