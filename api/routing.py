"""Which nodes can answer a prompt for a model, read cheaply from Redis, and loading the model on demand.

A replica is a node that is online and lists the model as loaded, healthy and served at an endpoint. The head
learns that from the node hashes' `models` field, which each node's event publisher keeps current with every
model event (`broker/events.py`), never from a job sent to a node. `NodeView` keeps what it read in memory: the
same Lua call that changes a node's hash publishes the pool event, and every event (or a quiet spell on the
channel, in case a message was lost: pub/sub is at-most-once) marks the copy stale, so a request reads Redis
only after something changed, and requests arriving together share one read. A copy is also never older than
`max_age` seconds (a node's liveness key lapsing publishes nothing until an API notices).

A model that an online node is loading, or has loaded and is checking (`ModelInfo.checking`: its first
one-token check runs after the load's answer), has no replica yet but is on its way: requests for it wait for
the replica, within the load timeout, whether load on demand is on or off (`Router._arrival`).

Load on demand (`load_on_demand`): a request for a model with no replica, whose file is on an online node,
loads it through the pool's placement and memory admission (`Pool.load`; with `on_demand_evict`, idle unpinned
models may be evicted to make room). Exactly one load runs however many requests arrive at once:

- within one API process, the requests for a model share one `asyncio.Task` that loads or waits;
- across API processes, that task takes the Redis lock `keys.ondemand_lock(model)` (SET NX with a lease it
  renews while loading, so a crashed process frees it within `LOCK_LEASE` seconds). The holder loads; the others
  wait for a replica to appear. A holder whose load fails leaves the error in `keys.ondemand_failed(model)` for a
  few seconds, so the waiters answer that error rather than each trying the same failing load again.

Everyone waits within the load timeout; the node publishes `model-loading` and `model-loaded` as it goes.
"""

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import redis.asyncio as aioredis

from api.subscription import follow
from broker import keys
from broker.errors import JobTimeout, ModelfleetError, ModelNotLoaded, from_code
from broker.registry import NodeDirectory
from broker.schemas import ModelInfo, ModelState, NodeInfo

log = logging.getLogger(__name__)

LOCK_LEASE = 10.0
"""Seconds the on-demand lock outlives a process that died holding it."""
FAILURE_TTL = 5.0
"""Seconds a failed on-demand load's error is answered to waiters before anyone tries again."""
POLL = 0.05
"""Seconds between looks at the node hashes while waiting for a replica to appear."""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


@dataclass(frozen=True)
class Replica:
    """A node that serves the model now, and the base URL of its inference endpoint."""

    node: NodeInfo
    model: ModelInfo
    endpoint: str


def replicas(nodes: list[tuple[NodeInfo, list[ModelInfo]]], model_id: str) -> list[Replica]:
    """The online nodes where `model_id` is loaded, healthy and has an endpoint."""
    found = []
    for node, models in nodes:
        if not node.online:
            continue
        for model in models:
            if model.id == model_id and model.state is ModelState.LOADED and model.healthy and model.endpoint:
                found.append(Replica(node, model, model.endpoint.rstrip("/")))
    return found


def coming(nodes: list[tuple[NodeInfo, list[ModelInfo]]], model_id: str) -> bool:
    """Whether an online node is loading `model_id`, or has loaded it and is running its first check: a request
    for it waits for the replica rather than being refused (or loading it a second time)."""
    return any(
        m.state is ModelState.LOADING or (m.state is ModelState.LOADED and m.checking) for m in _held(nodes, model_id)
    )


def listed_loaded(nodes: list[tuple[NodeInfo, list[ModelInfo]]], model_id: str) -> bool:
    """Whether an online node lists `model_id` as loaded (healthy or not)."""
    return any(m.state is ModelState.LOADED for m in _held(nodes, model_id))


def _held(nodes: list[tuple[NodeInfo, list[ModelInfo]]], model_id: str) -> Iterator[ModelInfo]:
    """`model_id`'s entries on the online nodes, whatever their state."""
    return (model for node, models in nodes if node.online for model in models if model.id == model_id)


class NodeView:
    """Every node with its models, as routing needs them on each request, from memory while nothing changed."""

    def __init__(
        self, directory: NodeDirectory, *, max_age: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._directory = directory
        self._max_age = max_age
        self._clock = clock
        self._version = 0
        self._copy: tuple[int, float, list[tuple[NodeInfo, list[ModelInfo]]]] | None = None
        self._reading: tuple[int, asyncio.Task[list[tuple[NodeInfo, list[ModelInfo]]]]] | None = None
        self.subscribed = asyncio.Event()
        self.reads = 0
        """Reads of Redis so far (the rest were answered from memory)."""

    def changed(self) -> None:
        """Something in the pool changed: the next request reads Redis again."""
        self._version += 1

    async def nodes(self) -> list[tuple[NodeInfo, list[ModelInfo]]]:
        copy = self._copy
        if copy is not None and copy[0] == self._version and self._clock() - copy[1] < self._max_age:
            return copy[2]
        if self._reading is None or self._reading[0] != self._version:  # a read begun before a change won't do
            version = self._version
            self._reading = (version, asyncio.create_task(self._read(version), name="modelfleet-node-view"))
        # shield: one caller going away must not cancel the read the others wait for
        return await asyncio.shield(self._reading[1])

    async def fresh(self) -> list[tuple[NodeInfo, list[ModelInfo]]]:
        """The nodes as Redis has them now (callers at the same moment share one read), for a miss that the copy
        in memory may not know of yet; the copy is replaced by it."""
        self.changed()
        return await self.nodes()

    async def _read(self, version: int) -> list[tuple[NodeInfo, list[ModelInfo]]]:
        at = self._clock()  # a change during the read makes this copy stale at once
        try:
            nodes = await self._directory.with_models()
        finally:
            if self._reading is not None and self._reading[0] == version:
                self._reading = None
        self.reads += 1
        if self._copy is None or self._copy[0] <= version:
            self._copy = (version, at, nodes)
        return nodes

    async def follow(self, client: aioredis.Redis) -> None:
        """Mark the copy stale on every pool event, until cancelled (run as a task for the process's life)."""

        async def stale() -> None:
            self.changed()

        await follow(
            client,
            keys.events_channel(),
            deliver=lambda _: self.changed(),
            catch_up=stale,
            subscribed=self.subscribed,
            what="routing",
        )


Loader = Callable[[str], Awaitable[object]]
"""Loads a model through the pool's placement; raises the pool's errors (ModelFileNotFound, ...)."""


class Router:
    """Finds a model's replicas, loading it on demand (once, fleet-wide) when it has none."""

    def __init__(
        self,
        client: aioredis.Redis,
        directory: NodeDirectory,
        view: NodeView,
        load: Loader,
        *,
        on_demand: bool,
        load_timeout: float,
    ) -> None:
        self._redis = client
        self._directory = directory
        self._view = view
        self._load = load
        self._on_demand = on_demand
        self._load_timeout = load_timeout
        self._pending: dict[str, asyncio.Task[list[Replica]]] = {}
        self._release = client.register_script(_RELEASE)
        self._renew = client.register_script(_RENEW)
        self.waiting = 0
        """Requests of this process waiting for a model to load (the head's queue)."""

    async def replicas(self, model_id: str) -> list[Replica]:
        """The model's replicas as Redis has them now (never from memory: for waiting on a load)."""
        return replicas(await self._directory.with_models(), model_id)

    async def route(self, model_id: str) -> list[Replica]:
        """The model's replicas, at least one; loads the model first if it has none and load on demand is on.

        Raises ModelNotLoaded (404) when it has none and may not be loaded, or the load's error."""
        nodes = await self._view.nodes()
        found = replicas(nodes, model_id)
        if found:
            return found
        arriving = coming(nodes, model_id)
        if not arriving:  # the view may predate a load that just answered: Redis has the last word on a miss
            nodes = await self._view.fresh()
            found = replicas(nodes, model_id)
            if found:
                return found
            arriving = coming(nodes, model_id)
        if not arriving and not self._on_demand:
            raise ModelNotLoaded(
                f"Model {model_id} is not loaded on any online node (loading on demand is off; an operator can "
                f"load it with POST /v1/models/load).",
                model=model_id,
            )
        task = self._pending.get(model_id)
        if task is None:
            work = self._arrival(model_id) if arriving else self._load_once(model_id)
            task = asyncio.create_task(work, name=f"modelfleet-ondemand-{model_id[:40]}")
            self._pending[model_id] = task
            task.add_done_callback(lambda _: self._pending.pop(model_id, None))
        self.waiting += 1
        try:
            # shield: one caller going away must not cancel the load the others wait for
            return await asyncio.shield(task)
        finally:
            self.waiting -= 1

    async def _arrival(self, model_id: str) -> list[Replica]:
        """Wait for a model that a node is loading or checking (an operator's load, or another head's load on
        demand) within the load timeout. If it arrives loaded but unhealthy, its first check failed: say so. If
        it does not arrive (its load failed, it was unloaded, its node left), load it on demand when that is on."""
        deadline = time.monotonic() + self._load_timeout
        while True:
            nodes = await self._directory.with_models()
            found = replicas(nodes, model_id)
            if found:
                return found
            if not coming(nodes, model_id):
                break
            if time.monotonic() >= deadline:
                raise _timeout(model_id, self._load_timeout)
            await asyncio.sleep(POLL)
        if listed_loaded(nodes, model_id):
            raise _unhealthy(model_id)
        if self._on_demand:
            return await self._load_once(model_id, deadline)
        raise ModelNotLoaded(
            f"Model {model_id} was being loaded, but no online node holds it now (loading on demand is off; the "
            "event stream and the nodes' logs say why).",
            model=model_id,
        )

    async def _load_once(self, model_id: str, deadline: float | None = None) -> list[Replica]:
        deadline = time.monotonic() + self._load_timeout if deadline is None else deadline
        lock, failed = keys.ondemand_lock(model_id), keys.ondemand_failed(model_id)
        token = uuid.uuid4().hex
        while time.monotonic() < deadline:
            found = await self.replicas(model_id)
            if found:
                return found
            raw = await self._redis.get(failed)
            if raw is not None:
                raise _failure(raw)
            if await self._redis.set(lock, token, nx=True, px=int(LOCK_LEASE * 1000)):
                try:
                    await self._load_holding(model_id, token)
                finally:
                    await self._release(keys=[lock], args=[token])
                return await self._wait_for_replica(model_id, deadline)
            await asyncio.sleep(POLL)  # another process loads it: watch for the replica (or its failure)
        raise _timeout(model_id, self._load_timeout)

    async def _load_holding(self, model_id: str, token: str) -> None:
        lock = keys.ondemand_lock(model_id)

        async def renew() -> None:
            while True:
                await asyncio.sleep(LOCK_LEASE / 3)
                await self._renew(keys=[lock], args=[token, int(LOCK_LEASE * 1000)])

        renewer = asyncio.create_task(renew())
        log.info("loading model %s on demand", model_id)
        try:
            await self._load(model_id)
        except ModelfleetError as exc:
            body = json.dumps(exc.to_dict(), default=str)
            await self._redis.set(keys.ondemand_failed(model_id), body, px=int(FAILURE_TTL * 1000))
            raise
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer

    async def _wait_for_replica(self, model_id: str, deadline: float) -> list[Replica]:
        """The load answered (the node hash lists the model once a job that changed it has answered), and the
        model's first check may still run: wait for a healthy replica. A model seen checking that then turns up
        unhealthy failed that check: no use waiting. One unhealthy for another reason (a generation failed) may
        be healthy again at its next periodic check: wait for that, within the deadline. Redis is read at least
        once, however late the load answered."""
        seen_coming = False
        while True:
            nodes = await self._directory.with_models()
            found = replicas(nodes, model_id)
            if found:
                return found
            if coming(nodes, model_id):
                seen_coming = True
            elif seen_coming and listed_loaded(nodes, model_id):
                raise _unhealthy(model_id)
            if time.monotonic() >= deadline:
                raise _timeout(model_id, self._load_timeout)
            await asyncio.sleep(POLL)


def _failure(raw: bytes | str) -> ModelfleetError:
    failure = json.loads(raw)
    return from_code(str(failure["code"]), str(failure["error"]), failure.get("details") or {})


def _unhealthy(model_id: str) -> ModelNotLoaded:
    return ModelNotLoaded(
        f"Model {model_id} is loaded, but no online node serves it healthy: it did not answer its first check "
        "(the nodes' logs say why; an operator can reload it with force_reload).",
        model=model_id,
    )


def _timeout(model_id: str, timeout: float) -> JobTimeout:
    return JobTimeout(
        f"Model {model_id} was not loaded and healthy within the load timeout ({timeout:g} seconds).",
        model=model_id,
        timeout_seconds=timeout,
    )
