"""The node registry and liveness protocol.

A node registers when it starts (`keys.node_info` hash, fields `registration` and `boot`, and its fingerprint
in `keys.nodes_set`) and then refreshes a heartbeat every `heartbeat_interval` seconds: the `heartbeat` field of
the same hash, and the TTL of `keys.node_alive`, whose value is the node's boot id. The alive key is the single
truth for "online": once its TTL lapses the node is offline, whoever looks; a different value means the node
was restarted (a new process, a new boot id).

The registry heals itself: every heartbeat checks, in the same script that refreshes the alive key, that this
boot's registration is still there, and writes it again if it is not (Redis flushed, restarted without
persistence, or failed over to a replica that never saw it). The beat reports that it healed, and the worker
re-announces the node and its models, so the fleet is whole again within one heartbeat of Redis answering.

Besides liveness, a node keeps what `GET /v1/models/status` shows in the same hash, so that the API answers it
without a job: `files` (its catalog's files, written by the heartbeat thread when they change) and `memory`
(written by its event publisher after each change of its models, beside the `models` field of
`broker.events`). A registration clears both: a new process publishes its own.

Only one process may serve a fingerprint: a starting node takes the alive key with SET NX. If another boot id
holds it, the starter watches the key's TTL for a little longer than one heartbeat interval: a TTL that goes
back up means a live owner (refuse to start); a key that lapses belonged to a dead process (take it over).
"""

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
import redis.asyncio as aioredis
from pydantic import TypeAdapter, ValidationError

from broker import keys
from broker.errors import DuplicateNode, LostNodeOwnership, NodeNotFound, NodeUnavailable
from broker.schemas import MemoryInfo, ModelFile, ModelInfo, ModelState, NodeCatalog, NodeInfo, read_lenient

log = logging.getLogger(__name__)

FINGERPRINT_RE = re.compile(r"^[0-9a-f]{16,64}$")
_STATES = {s.value for s in ModelState}  # a newer node's unknown states are skipped, not fatal
_MODEL_LIST: TypeAdapter[list[ModelInfo]] = TypeAdapter(list[ModelInfo])
_FILE_LIST: TypeAdapter[list[ModelFile]] = TypeAdapter(list[ModelFile])

# Refresh the alive key only while it is still ours; re-take it if it lapsed (a long GC pause, say, or Redis
# lost it). Then re-register if this boot's registration is missing. KEYS: alive, node hash, nodes set.
# ARGV: boot id, TTL ms, fingerprint, registration JSON, consuming ('1' while the consumer takes jobs, else '0').
# Returns 0 (another boot holds the key), else 1 (refreshed) or 2 (re-taken), plus 2 if it re-registered.
_REFRESH = """
local current = redis.call('GET', KEYS[1])
local outcome
if current == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  outcome = 2
elseif current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  outcome = 1
else
  return 0
end
if redis.call('HGET', KEYS[2], 'boot') ~= ARGV[1] or redis.call('SISMEMBER', KEYS[3], ARGV[3]) == 0 then
  redis.call('SADD', KEYS[3], ARGV[3])
  redis.call('HSET', KEYS[2], 'registration', ARGV[4], 'boot', ARGV[1])
  outcome = outcome + 2
end
local consuming = redis.call('HGET', KEYS[2], 'consuming')
if ARGV[5] == '1' and consuming ~= ARGV[1] then
  redis.call('HSET', KEYS[2], 'consuming', ARGV[1])
elseif ARGV[5] == '0' and consuming == ARGV[1] then
  redis.call('HDEL', KEYS[2], 'consuming')
end
return outcome
"""


# Take the alive key from a holder known to be dead, only if it still holds it. KEYS: alive. ARGV: old, new, ms.
_TAKE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
"""


def is_fingerprint(value: str) -> bool:
    return bool(FINGERPRINT_RE.fullmatch(value))


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Beat:
    """What one heartbeat found: whether it had to re-take the alive key, and whether it re-registered."""

    retaken: bool
    reregistered: bool


class NodeRegistrar:
    """The worker's side: claim the fingerprint, register, beat, and release on a clean stop."""

    def __init__(self, client: redis.Redis, info: NodeInfo, *, interval: float, ttl: float) -> None:
        self._redis = client
        self.info = info
        self._interval = interval
        self._ttl_ms = int(ttl * 1000)
        self._refresh = client.register_script(_REFRESH)
        self._take = client.register_script(_TAKE)
        self._consuming = False

    @property
    def fingerprint(self) -> str:
        return self.info.fingerprint

    def claim(self, *, wait: float | None = None, holder_gone: Callable[[NodeInfo], bool] | None = None) -> None:
        """Take the alive key, or raise DuplicateNode if a live process holds it. `holder_gone` tells whether
        the registered holder is certainly dead (a crashed process on this machine): then take over at once."""
        alive = keys.node_alive(self.fingerprint)
        deadline = time.monotonic() + (wait if wait is not None else self._ttl_ms / 1000 + self._interval)
        seen: tuple[int, float] | None = None  # (TTL in ms, when it was read)
        while True:
            if self._redis.set(alive, self.info.boot_id, nx=True, px=self._ttl_ms):
                break
            if holder_gone is not None and self._take_from_dead(holder_gone):
                break
            ttl, now = int(self._redis.pttl(alive)), time.monotonic()
            # A TTL above what the last reading decays to means the owner refreshed it: it is alive.
            if seen is not None and ttl >= 0 and ttl > seen[0] - (now - seen[1]) * 1000 + 50:
                raise DuplicateNode(
                    f"Node {self.fingerprint} ({self.info.name}) is already served by a live worker; "
                    "two workers on one node queue would split its models. Stop the other worker, "
                    "or give this one another --state-dir."
                )
            if ttl >= 0:
                seen = (ttl, now)
            if now > deadline:
                raise DuplicateNode(f"Node {self.fingerprint} is still held by another worker; try again later.")
            time.sleep(0.1)
        self._register()

    def _take_from_dead(self, holder_gone: Callable[[NodeInfo], bool]) -> bool:
        alive = keys.node_alive(self.fingerprint)
        holder, raw = self._redis.get(alive), self._redis.hget(keys.node_info(self.fingerprint), "registration")
        if holder is None or raw is None:
            return False
        try:
            registered = read_lenient(NodeInfo, raw)
        except ValueError:
            return False
        if registered.boot_id.encode() != holder or not holder_gone(registered):
            return False
        taken = bool(self._take(keys=[alive], args=[holder, self.info.boot_id, self._ttl_ms]))
        if taken:
            log.warning(
                "node %s: its previous process (pid %d) is gone; taking over at once", self.fingerprint, registered.pid
            )
        return taken

    def _register(self) -> None:
        pipe = self._redis.pipeline()
        pipe.sadd(keys.nodes_set(), self.fingerprint)
        pipe.hset(
            keys.node_info(self.fingerprint),
            mapping={"registration": self.info.model_dump_json(by_alias=True), "boot": self.info.boot_id},
        )
        # A previous process's files and memory may describe another models directory or budget.
        pipe.hdel(keys.node_info(self.fingerprint), "files", "memory")
        pipe.execute()

    def publish_files(self, files: list[ModelFile]) -> None:
        """Write the node's catalog files where `GET /v1/models/status` reads them."""
        raw = json.dumps([f.wire() for f in files])
        self._redis.hset(keys.node_info(self.fingerprint), "files", raw)

    def publish_memory(self, memory: MemoryInfo) -> None:
        """Write the node's memory figures where `GET /v1/models/status` reads them."""
        self._redis.hset(keys.node_info(self.fingerprint), "memory", memory.model_dump_json(by_alias=True))

    def beat(self, stats: dict[str, Any]) -> Beat:
        """Refresh liveness (re-registering if the records are gone) and publish stats."""
        beat = {"at": _now().isoformat(), **stats}
        args: list[str | int] = [
            self.info.boot_id,
            self._ttl_ms,
            self.fingerprint,
            self.info.model_dump_json(by_alias=True),
            "1" if self._consuming else "0",
        ]
        node_keys = [keys.node_alive(self.fingerprint), keys.node_info(self.fingerprint), keys.nodes_set()]
        outcome = int(self._refresh(keys=node_keys, args=args))
        if outcome == 0:
            raise LostNodeOwnership(f"Another worker took over node {self.fingerprint}; this one must stop.")
        self._redis.hset(keys.node_info(self.fingerprint), "heartbeat", json.dumps(beat))
        return Beat(retaken=outcome in (2, 4), reregistered=outcome >= 3)

    def mark_consuming(self, consuming: bool = True) -> None:
        """Say whether this boot's Celery consumer is taking jobs (online alone means registered and beating):
        at once if Redis answers, else at the next beat that reaches it. Only this boot's mark is cleared."""
        self._consuming = consuming
        node = keys.node_info(self.fingerprint)
        try:
            if consuming:
                self._redis.hset(node, "consuming", self.info.boot_id)
            elif self._redis.hget(node, "consuming") == self.info.boot_id.encode():
                self._redis.hdel(node, "consuming")
        except redis.RedisError:  # the consumer stops because Redis went away: the next beat says it
            pass

    def release(self) -> None:
        """Mark the node offline at once on a clean stop (only if the alive key is still ours)."""
        alive = keys.node_alive(self.fingerprint)
        with self._redis.pipeline() as pipe:
            try:
                pipe.watch(alive)
                if pipe.get(alive) == self.info.boot_id.encode():
                    pipe.multi()
                    pipe.delete(alive)
                    pipe.execute()
            except redis.WatchError:
                pass


def parse_node(fingerprint: str, fields: dict[bytes, bytes], alive: bool, now: datetime) -> NodeInfo | None:
    """Build a NodeInfo from the registry hash; None (logged) if it holds no readable registration."""
    raw = fields.get(b"registration")
    if raw is None:
        return None
    try:
        info = read_lenient(NodeInfo, raw)
    except (ValidationError, ValueError) as exc:
        log.warning("node %s has a registration this API cannot read (%s); skipped", fingerprint, exc)
        return None
    consuming = fields.get(b"consuming")
    update: dict[str, Any] = {"online": alive, "consuming": alive and consuming == info.boot_id.encode()}
    try:
        update |= _heartbeat(fields.get(b"heartbeat"), now, live=alive)
    except Exception as exc:  # another process's bytes: whatever is wrong with them, the node is still listed
        log.warning("node %s has a heartbeat this API cannot read (%s); shown without it", fingerprint, exc)
    return info.model_copy(update=update)


def parse_models(fingerprint: str, raw: bytes | None) -> list[ModelInfo]:
    """The node hash's `models` field (kept by the node's event publisher): its models as of its last event."""
    if not raw:
        return []
    try:
        return _MODEL_LIST.validate_json(raw, extra="ignore")  # lenient like every read of another's writing
    except ValueError:
        log.warning("node %s has a model list this API cannot read; shown without models", fingerprint)
        return []


def parse_catalog(node: NodeInfo, fields: dict[bytes, bytes]) -> NodeCatalog | None:
    """The node's catalog as it published it (files, models, memory); None if it has not published its files or
    memory yet (a node still reading its directory, or one older than this field) or they cannot be read."""
    files, memory = fields.get(b"files"), fields.get(b"memory")
    if files is None or memory is None:
        return None
    try:
        return NodeCatalog(
            node=node.fingerprint,
            files=_FILE_LIST.validate_json(files, extra="ignore"),
            models=parse_models(node.fingerprint, fields.get(b"models")),
            memory=read_lenient(MemoryInfo, memory),
        )
    except ValueError:
        log.warning("node %s has published files or memory this API cannot read", node.fingerprint)
        return None


def _heartbeat(beat_raw: bytes | None, now: datetime, *, live: bool) -> dict[str, Any]:
    """When the node last beat; and, only while it is online, the figures that beat carried (an offline node's
    last `loading: 1` describes a process that may be gone: showing it would be a stale live figure)."""
    update: dict[str, Any] = {}
    if beat_raw:
        beat = json.loads(beat_raw)
        at = datetime.fromisoformat(beat["at"])
        update |= {"last_heartbeat": at, "seconds_since_heartbeat": round((now - at).total_seconds(), 3)}
        if not live:
            return update
        update |= {
            "models_loaded": int(beat.get("modelsLoaded", 0)),
            "memory_used_bytes": int(beat.get("memoryUsedBytes", 0)),
            "memory_budget_bytes": int(beat.get("memoryBudgetBytes") or 0) or None,
            "model_states": {ModelState(k): int(v) for k, v in beat.get("modelStates", {}).items() if k in _STATES},
            "rss_bytes": int(beat.get("rssBytes", 0)),
        }
    return update


REGISTRY_GRACE = 10.0
"""Seconds after `NodeDirectory.get` last saw a node online during which its vanished registration means that
Redis lost it (503, retry) rather than that there is no such node (404)."""


class NodeDirectory:
    """The API's side: read-only, async views of every registered node."""

    def __init__(self, client: aioredis.Redis, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._redis = client
        self._clock = clock
        self._boots: dict[str, NodeInfo] = {}
        """Each node's record as `get` last read it while it was online (for `live`)."""
        self._seen: dict[str, float] = {}
        """When `get` last read each node online (the clock's time)."""

    async def fingerprints(self) -> list[str]:
        members = await self._redis.smembers(keys.nodes_set())
        return sorted(m.decode() if isinstance(m, bytes) else m for m in members)

    async def _read(self, fingerprints: list[str]) -> list[tuple[NodeInfo, dict[bytes, bytes]]]:
        """Each readable node with its raw hash, in one pipelined round trip."""
        pipe = self._redis.pipeline(transaction=False)
        for fp in fingerprints:
            pipe.hgetall(keys.node_info(fp))
            pipe.exists(keys.node_alive(fp))
        raw = await pipe.execute()
        now = _now()
        found = []
        for i, fp in enumerate(fingerprints):
            node = parse_node(fp, raw[2 * i], bool(raw[2 * i + 1]), now)
            if node is not None:
                found.append((node, raw[2 * i]))
        return found

    async def many(self, fingerprints: list[str]) -> list[NodeInfo]:
        return [node for node, _ in await self._read(fingerprints)]

    async def with_models(self) -> list[tuple[NodeInfo, list[ModelInfo]]]:
        """Every registered node with its models as its last pool event left them: two Redis round trips (the
        node set, then the hashes pipelined), no job sent. What routing reads on every inference request."""
        found = await self._read(await self.fingerprints())
        return [(node, parse_models(node.fingerprint, fields.get(b"models"))) for node, fields in found]

    async def with_catalogs(self) -> list[tuple[NodeInfo, NodeCatalog | None]]:
        """Every registered node with its catalog as it last published it (`parse_catalog`): what fleet status
        reads, in two Redis round trips and without a job."""
        found = await self._read(await self.fingerprints())
        return [(node, parse_catalog(node, fields)) for node, fields in found]

    async def all(self) -> list[NodeInfo]:
        return await self.many(await self.fingerprints())

    async def get(self, fingerprint: str) -> NodeInfo:
        """The node, or NodeNotFound; the fingerprint's shape is checked before it goes into a key."""
        nodes = await self.many([fingerprint]) if is_fingerprint(fingerprint) else []
        if not nodes:
            self._boots.pop(fingerprint, None)
            seen = self._seen.get(fingerprint)
            if seen is not None and self._clock() - seen < REGISTRY_GRACE:
                # A registration never goes away by itself: Redis lost it (restarted without persistence,
                # flushed, failed over), and the node registers again at its next heartbeat.
                raise NodeUnavailable(
                    f"Node {fingerprint} was online {self._clock() - seen:.0f} s ago, and its registration is gone "
                    "from Redis (restarted or flushed?); nodes register again within a heartbeat: retry.",
                    node=fingerprint,
                    retry_after=2,
                )
            self._seen.pop(fingerprint, None)
            raise NodeNotFound(f"No node with fingerprint {fingerprint[:64]!r} is registered.")
        node = nodes[0]
        if node.online:
            self._boots[fingerprint] = node
            self._seen[fingerprint] = self._clock()
        else:
            self._boots.pop(fingerprint, None)
        return node

    async def live(self, fingerprint: str) -> NodeInfo:
        """The node as a job needs it (name, boot id, online), without a round trip once its boot was read.

        A boot's registration never changes, so the record read while a boot was online is kept, and a job
        sent with it is guarded by that boot id (`api.sender.TaskSender`): queued only if the node's alive key
        still holds it, else the API reads the node again (`get`, which drops a kept record that is no longer
        online). The heartbeat figures of a kept record are as old as the record: use `get` to show a node.
        """
        kept = self._boots.get(fingerprint)
        return kept if kept is not None else await self.get(fingerprint)

    async def alive(self, fingerprints: list[str]) -> dict[str, bool]:
        pipe = self._redis.pipeline(transaction=False)
        for fp in fingerprints:
            pipe.exists(keys.node_alive(fp))
        return {fp: bool(v) for fp, v in zip(fingerprints, await pipe.execute(), strict=True)}
