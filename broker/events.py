"""Pool events: what changed on which node, kept in order in a Redis stream and announced on pub/sub.

Every event is appended to the capped stream `keys.events_stream()` (`XADD ... MAXLEN ~ history`) and, in the
same Lua call, published on `keys.events_channel()` as `<stream id>\\n<event JSON>`. The stream entry id is the
event's id everywhere (the SSE `id:` line, `Last-Event-ID`), so a reader that missed pub/sub messages reads the
stream from the last id it saw and gets each event exactly once, in order.

The same call also keeps two fields of the node's hash (`keys.node_info`) in step with the stream:

- `models`: the JSON list of the node's models after this event, so a snapshot read in one MULTI with the
  stream's last id is exactly the state that the events up to that id describe;
- `announced`: `online:<boot id>` or `offline:<boot id>`, the last node event published. Node events are
  published only when they change it, which is what makes `node-offline` exactly-once when several API
  processes notice the same lapsed heartbeat, and `node-online` once per boot;
- `orphans`: the models a node held when it was announced offline (its `models` are then emptied). The node's
  next process announces each of them `model-unloaded` (reason `node-restarted`) and clears the field: a
  watcher's view is right without a refresh, whether the old process stopped, crashed or was replaced.

Usage updates (`UsageEvent`: each model's generations in flight and queued, tokens generated, last use) are
gauges, not history: they change with every prompt, and in the capped stream they would evict the events a
reconnecting client replays. A worker publishes them on `keys.usage_channel()` alone (at most once, which is
enough: the next one supersedes it), at most one a second per node while anything changes and one after the
last change (`workers.usage`), from the same ordered thread as its pool events, and writes the `models` field
with them, only while the node is announced online for that boot: a snapshot reads the hash, so it is never
older than the last update, and an update never overwrites a newer state.

Who publishes: a worker its model events, its own `node-online` (at start and when it re-takes a lapsed
heartbeat) and its `node-offline` on a clean stop; any API process the `node-offline` of a node whose
heartbeat lapsed.
"""

import json
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import redis
import redis.asyncio as aioredis
from pydantic import Field, TypeAdapter

from broker import keys
from broker.schemas import ModelInfo, ModelState, NodeInfo, Schema, UnloadReason

DEFAULT_HISTORY = 10_000
"""Events kept in the stream (approximately: trimming is `MAXLEN ~`): what a reconnecting client can replay."""

SSE_EVENT = "distributed-pool-changed"
SNAPSHOT_EVENT = "snapshot"
USAGE_EVENT = "model-usage"
"""The SSE event name of usage updates: apart from `SSE_EVENT`, whose every event a reference client answers with
a refresh of the node and of the pool (a usage update a second would make it a poller)."""

ModelEventType = Literal[
    "model-loading", "model-loaded", "model-checked", "model-load-failed", "model-unloading", "model-unloaded"
]
"""`model-checked`: a loaded model's health is known or changed (its first check after the load answered, or a
periodic check's answer differs from the last): `model.healthy` says which."""
NodeEventType = Literal["node-online", "node-offline"]
OfflineReason = Literal["heartbeat-lapsed", "stopped", "restarted"]
OnlineReason = Literal["re-registered"]
"""A node-online's reason: absent for a new boot or a stalled one back; `re-registered` when Redis had lost the
registry (flushed, restarted without persistence, failed over) and the node wrote it again: the pool was rebuilt."""

STREAM_ID_RE = re.compile(r"^(\d{1,20})-(\d{1,20})$")


def now() -> datetime:
    return datetime.now(UTC)


class ModelEvent(Schema):
    """A model changed state on a node. `model` is the model's record after the change."""

    type: ModelEventType
    node: str
    model_id: str
    state: ModelState
    at: datetime
    model: ModelInfo
    error: str | None = None
    """Why the load failed (`model-load-failed` only)."""
    reason: UnloadReason | None = None
    """Why it unloads (`model-unloading` and `model-unloaded` only): `node-restarted` on those a new process of
    the node announces for the models its previous process held, which died with it."""


class NodeEvent(Schema):
    """A node came online (a new boot, or a stalled one back) or went offline."""

    type: NodeEventType
    node: str
    name: str
    state: Literal["online", "offline"]
    at: datetime
    reason: OfflineReason | OnlineReason | None = None
    """Why it went offline: its heartbeat lapsed, it stopped cleanly, or a new boot replaced it unnoticed; or why
    it is online again without a new boot: its registration was re-written after Redis lost it."""


PoolEvent = Annotated[ModelEvent | NodeEvent, Field(discriminator="type")]
"""The union on the wire, discriminated by `type`."""

_POOL_EVENT: TypeAdapter[ModelEvent | NodeEvent] = TypeAdapter(PoolEvent)


def parse_event(raw: bytes | str) -> ModelEvent | NodeEvent:
    """Validate an event another process wrote; raises pydantic.ValidationError (a ValueError) if malformed.

    Lenient like `read_lenient` (fields a newer writer added are ignored, at any depth), strict about everything
    this version knows, and never anything but ValidationError, whatever the bytes."""
    return _POOL_EVENT.validate_json(raw, extra="ignore")


class ModelUsage(Schema):
    """One model's usage on a node: `ModelInfo`'s figures that change with every prompt."""

    model_id: str
    in_flight: int
    queued: int
    tokens_generated: int
    last_used: datetime | None = None

    @classmethod
    def of(cls, model: ModelInfo) -> "ModelUsage":
        return cls(
            model_id=model.id,
            in_flight=model.in_flight,
            queued=model.queued,
            tokens_generated=model.tokens_generated,
            last_used=model.last_used,
        )


class UsageEvent(Schema):
    """The usage of every model on a node, as of `at` (not a pool event: never in the stream, no event id)."""

    type: Literal["model-usage"] = "model-usage"
    node: str
    at: datetime
    models: list[ModelUsage]


def usage_event(node: str, models: list[ModelInfo]) -> UsageEvent:
    return UsageEvent(node=node, at=now(), models=[ModelUsage.of(m) for m in models])


def parse_usage(raw: bytes | str) -> UsageEvent:
    """Validate a usage update another process wrote, leniently like `parse_event`; raises ValidationError."""
    return UsageEvent.model_validate_json(raw, extra="ignore")


class NodeState(NodeInfo):
    """A node as the snapshot shows it: its registration, liveness and models."""

    models: list[ModelInfo] = Field(default_factory=list)


class Snapshot(Schema):
    """The whole pool (or one node of it) as of stream id `id`: what a client starts from."""

    type: Literal["snapshot"] = "snapshot"
    at: datetime
    nodes: list[NodeState]


def model_event(kind: str, node: str, info: ModelInfo) -> ModelEvent:
    return ModelEvent.model_validate(
        {"type": kind, "node": node, "model_id": info.id, "state": info.state, "at": now(), "model": info}
        | ({"error": info.error} if kind == "model-load-failed" else {})
        | ({"reason": info.unload_reason} if kind in ("model-unloading", "model-unloaded") else {})
    )


def stream_id(value: str | None) -> tuple[int, int] | None:
    """`"<ms>-<seq>"` as a comparable pair, or None if it is not a stream id (both parts fit in 64 bits)."""
    match = STREAM_ID_RE.fullmatch(value or "")
    if not match:
        return None
    ms, seq = int(match[1]), int(match[2])
    return (ms, seq) if ms < 1 << 64 and seq < 1 << 64 else None


def models_json(models: list[ModelInfo]) -> str:
    return json.dumps([m.wire() for m in models])


# KEYS: stream, node hash, alive key. ARGV: history, channel, event JSON, models JSON ('' leaves it), mode, boot.
# Modes: 'always' (model events); 'online' (unless already announced online for this boot); 'lapsed' (if the
# alive key is gone and the node was announced online); 'stopped' (if announced online for this boot);
# 'replaced' (if announced online for another boot). Returns the new entry id, or false if nothing was published.
_PUBLISH = """
local announced = redis.call('HGET', KEYS[2], 'announced') or ''
local mode, boot = ARGV[5], ARGV[6]
local mark = nil
if mode == 'online' then
  if announced == 'online:' .. boot then return false end
  mark = 'online:' .. boot
elseif mode == 'lapsed' then
  if redis.call('EXISTS', KEYS[3]) == 1 or string.sub(announced, 1, 7) ~= 'online:' then return false end
  mark = 'offline:' .. string.sub(announced, 8)
elseif mode == 'stopped' then
  if announced ~= 'online:' .. boot then return false end
  mark = 'offline:' .. boot
elseif mode == 'replaced' then
  if string.sub(announced, 1, 7) ~= 'online:' or announced == 'online:' .. boot then return false end
  mark = 'offline:' .. string.sub(announced, 8)
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'event', ARGV[3])
if mark then redis.call('HSET', KEYS[2], 'announced', mark) end
if ARGV[4] ~= '' then
  if mark and string.sub(mark, 1, 8) == 'offline:' then
    local held = redis.call('HGET', KEYS[2], 'models')
    if held and held ~= '[]' then redis.call('HSET', KEYS[2], 'orphans', held) end
  end
  redis.call('HSET', KEYS[2], 'models', ARGV[4])
end
redis.call('PUBLISH', ARGV[2], id .. '\\n' .. ARGV[3])
return id
"""


# KEYS: node hash. ARGV: channel, usage JSON, models JSON, boot. Writes `models` and publishes only while the node
# is announced online for this boot (not after an API process declared it offline, nor before it is back online).
_PUBLISH_USAGE = """
if redis.call('HGET', KEYS[1], 'announced') ~= 'online:' .. ARGV[4] then return 0 end
redis.call('HSET', KEYS[1], 'models', ARGV[3])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
"""


def _decoded(result: Any) -> str | None:
    return result.decode() if isinstance(result, bytes) else result


class _Publisher:
    """What both buses share: the publish script, registered on their client, and its arguments."""

    def __init__(self, client: redis.Redis | aioredis.Redis, *, history: int = DEFAULT_HISTORY) -> None:
        self._history = history
        self._script = client.register_script(_PUBLISH)

    def _run(self, event: ModelEvent | NodeEvent, models: list[ModelInfo] | None, mode: str, boot: str) -> Any:
        """The script's result: the entry id (or nil), or on an asyncio client an awaitable of it."""
        node_keys = [keys.events_stream(), keys.node_info(event.node), keys.node_alive(event.node)]
        args: list[str | int] = [
            self._history,
            keys.events_channel(),
            event.model_dump_json(by_alias=True),
            "" if models is None else models_json(models),
            mode,
            boot,
        ]
        return self._script(keys=node_keys, args=args)


class EventBus(_Publisher):
    """Publishes pool events from a synchronous process (a worker)."""

    def __init__(self, client: redis.Redis, *, history: int = DEFAULT_HISTORY) -> None:
        super().__init__(client, history=history)
        self._client = client
        self._usage_script = client.register_script(_PUBLISH_USAGE)

    def publish(
        self,
        event: ModelEvent | NodeEvent,
        *,
        models: list[ModelInfo] | None = None,
        mode: str = "always",
        boot: str = "",
    ) -> str | None:
        """Append and announce `event`; returns its id, or None if `mode`'s condition did not hold.

        `models`, when given, becomes the node's `models` field in the same step."""
        return _decoded(self._run(event, models, mode, boot))

    def publish_usage(self, event: UsageEvent, *, models: list[ModelInfo], boot: str) -> bool:
        """Write `models` to the node's hash and announce `event` on the usage channel, if the node is announced
        online for `boot`; returns whether it was."""
        args = [keys.usage_channel(), event.model_dump_json(by_alias=True), models_json(models), boot]
        return bool(self._usage_script(keys=[keys.node_info(event.node)], args=args))

    def announce_orphans(self, node: str, boot: str) -> list[str]:
        """Announce `model-unloaded` (reason `node-restarted`) for each model a previous process of `node` held;
        returns their ids. Called by a new process before its `node-online`, from its one publishing thread."""
        fields = self._client.hmget(keys.node_info(node), ["models", "orphans"])
        held: list[ModelInfo] = []
        for raw in fields:
            if raw:
                try:
                    held = [ModelInfo.model_validate(m, extra="ignore") for m in json.loads(raw)]
                except ValueError:
                    held = []
                if held:
                    break
        gone = []
        for model in held:
            if model.state == ModelState.UNLOADED:
                continue
            gone_info = {"state": ModelState.UNLOADED, "healthy": False, "unload_reason": UnloadReason.NODE_RESTARTED}
            info = model.model_copy(update=gone_info | {"endpoint": None})
            self.publish(model_event("model-unloaded", node, info), models=[], boot=boot)
            gone.append(model.id)
        self._client.hdel(keys.node_info(node), "orphans")
        return gone


class AsyncEventBus(_Publisher):
    """Publishes pool events from the API's event loop (the node-offline of a lapsed heartbeat)."""

    async def publish(
        self,
        event: ModelEvent | NodeEvent,
        *,
        models: list[ModelInfo] | None = None,
        mode: str = "always",
        boot: str = "",
    ) -> str | None:
        """As `EventBus.publish`."""
        return _decoded(await self._run(event, models, mode, boot))
