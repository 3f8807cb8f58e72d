"""Inference requests in flight per node, counted across every API process, with leases instead of counters.

A plain counter (INCR on send, DECR when done) leaks forever when an API process dies between the two. Instead,
each request holds a lease: a member `<api id>:<request id>` of the node's sorted set `keys.inflight(fp)`,
scored by the lease's expiry in milliseconds. The count of a node is its members whose lease has not expired.
The process that holds a lease renews every lease it holds every third of the lease time (one pipelined
ZADD XX per lease), and removes it when the request ends. A crashed process stops renewing: its leases lapse
within `lease` seconds and stop counting, and the next pick on that node deletes them.

Picking is one Lua call: it drops the expired members of each candidate's set, counts the rest, and adds the
new lease to the least loaded node in the same atomic step, so two API processes picking at the same moment
see each other's choice instead of both piling onto the same node. Ties go to the first candidate; callers
shuffle the candidates first so that ties spread.
"""

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from api.redis_line import RedisLine, Script
from broker import keys

log = logging.getLogger(__name__)

DEFAULT_LEASE = 30.0
"""Seconds a crashed API process's requests keep counting against their nodes."""

# KEYS: the candidates' in-flight sets. ARGV: now (ms), the new lease's expiry (ms), the new member.
# Returns the 1-based index of the chosen candidate and the counts seen before adding it.
_ACQUIRE = Script("""
local best, best_count = 0, -1
local counts = {}
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', ARGV[1])
  local count = redis.call('ZCARD', key)
  counts[i] = count
  if best_count < 0 or count < best_count then
    best, best_count = i, count
  end
end
redis.call('ZADD', KEYS[best], ARGV[2], ARGV[3])
redis.call('PEXPIRE', KEYS[best], ARGV[4])
return {best, counts}
""")


@dataclass(frozen=True)
class Lease:
    """One request's place in a node's in-flight set."""

    node: str
    member: str


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


class InFlight:
    """This API process's leases on the nodes' in-flight sets, and the task that renews them."""

    def __init__(self, client: aioredis.Redis, *, lease: float = DEFAULT_LEASE, timeout: float = 20.0) -> None:
        self._redis = client
        # A prompt's pick and release, on its way to the node and back: pipelined on one connection, without the
        # pool's checkout and return of redis-py's client (0.1 ms of the API's CPU a prompt less, measured).
        self._line = RedisLine(client, timeout=timeout)
        self._lease = lease
        self._owner = uuid.uuid4().hex[:12]
        self._held: dict[str, str] = {}  # member -> node fingerprint
        self._renewer: asyncio.Task[None] | None = None

    @property
    def held(self) -> int:
        """Leases this process holds now (its requests in flight to nodes)."""
        return len(self._held)

    async def start(self) -> None:
        self._renewer = asyncio.create_task(self._renew_forever(), name="modelfleet-inflight-renew")

    async def stop(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        self._line.close()

    async def acquire(self, candidates: list[str]) -> tuple[Lease, dict[str, int]]:
        """A lease on the candidate with the fewest requests in flight, and the counts each had before."""
        if not candidates:
            raise ValueError("no candidate nodes")
        member = f"{self._owner}:{uuid.uuid4().hex[:16]}"
        now = _ms(time.time())
        expiry = now + _ms(self._lease)
        index, counts = await _ACQUIRE.run(
            self._line, [keys.inflight(fp) for fp in candidates], [now, expiry, member, _ms(self._lease) * 2]
        )
        node = candidates[int(index) - 1]
        self._held[member] = node
        return Lease(node, member), dict(zip(candidates, (int(c) for c in counts), strict=True))

    async def release(self, lease: Lease) -> None:
        """End the lease at once (a failure to reach Redis leaves it to lapse)."""
        self._held.pop(lease.member, None)
        try:
            await self._line.call("ZREM", keys.inflight(lease.node), lease.member)
        except (RedisError, OSError) as exc:
            log.warning("could not release an in-flight lease on node %s (%s); it lapses", lease.node, exc)

    async def counts(self, fingerprints: list[str]) -> dict[str, int]:
        """Requests in flight on each node, from every API process (expired leases excluded)."""
        now = _ms(time.time())
        pipe = self._redis.pipeline(transaction=False)
        for fp in fingerprints:
            pipe.zcount(keys.inflight(fp), f"({now}", "+inf")
        return {fp: int(n) for fp, n in zip(fingerprints, await pipe.execute(), strict=True)}

    async def renew(self) -> None:
        """Push every held lease's expiry forward (only those still present: XX never revives a released one)."""
        if not self._held:
            return
        expiry = _ms(time.time() + self._lease)
        pipe = self._redis.pipeline(transaction=False)
        for member, node in list(self._held.items()):
            pipe.zadd(keys.inflight(node), {member: expiry}, xx=True)
            pipe.pexpire(keys.inflight(node), _ms(self._lease) * 2)
        await pipe.execute()

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._lease / 3)
            try:
                await self.renew()
            except (RedisError, OSError) as exc:
                log.warning("renewing in-flight leases failed (%s); retrying", type(exc).__name__)
