"""The reply path: how a node hands a job's outcome back to the API process waiting for it.

The worker stores the reply under `keys.reply(job_id)` (durable for `reply_ttl`) and publishes it on
`keys.replies_channel()` (fast path). Pub/sub is at-most-once, so the waiting side also reads the stored
replies of its pending jobs on every liveness tick and after every reconnect: a reply is never lost, at worst
it arrives one tick late. A worker that cannot reach Redis keeps the reply and retries until the job's deadline
(`workers.outbox`).

Which jobs ran is known too, so that a caller whose node died or restarted is told what happened to its job.
`start_job` is the worker's atomic "not cancelled? then I start it": it records the boot id that started the
job under `keys.started(job_id)`. `abandon_job` is the API's atomic opposite: it cancels the job and says which
boot (if any) had already started it. Between the two scripts, a job either starts before the cancel (and the
API knows which boot ran it) or never starts at all.
"""

from typing import Any, Protocol

from broker import keys

# KEYS: cancel, started. ARGV: boot id, TTL s. 1 if this boot may start the job (and it is recorded); 0 if its
# caller cancelled it; 2 if it started before (the broker delivered it again, as kombu may after a failover).
_START = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 2 end
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
return 1
"""

# KEYS: cancel, started. ARGV: TTL s, a boot id or ''. Cancels the job unless that boot started it; returns the
# boot id that started it, or false.
_ABANDON = """
local started = redis.call('GET', KEYS[2])
if started and started == ARGV[2] then return started end
redis.call('SET', KEYS[1], '1', 'EX', ARGV[1])
return started
"""


class _SyncRedis(Protocol):
    def pipeline(self, transaction: bool = True): ...

    def register_script(self, script: str) -> Any: ...


def store_reply(redis: _SyncRedis, job_id: str, body: str, *, ttl: int, announce: bool, only_new: bool = False) -> None:
    """Store a reply's JSON (`only_new`: unless it is there already) and optionally announce it."""
    pipe = redis.pipeline(transaction=True)
    pipe.set(keys.reply(job_id), body, ex=ttl, nx=only_new)
    if announce:
        pipe.publish(keys.replies_channel(), body)
    pipe.execute()


START, CANCELLED, AGAIN = 1, 0, 2
"""`start_job`'s answers: run it; its caller gave up on it; it started before (a second delivery: skip it)."""


def start_job(redis: _SyncRedis, job_id: str, boot_id: str, *, ttl: int) -> int:
    """Record that `boot_id` starts the job unless its caller cancelled it or it started before: START,
    CANCELLED or AGAIN."""
    script = redis.register_script(_START)
    return int(script(keys=[keys.cancel(job_id), keys.started(job_id)], args=[boot_id, ttl]))


async def abandon_job(redis: Any, job_id: str, *, ttl: int, keep_for: str | None = None) -> str | None:
    """Cancel the job (API side, redis.asyncio) unless boot `keep_for` started it; the boot id that had started
    it, or None if none had."""
    script = redis.register_script(_ABANDON)
    started = await script(keys=[keys.cancel(job_id), keys.started(job_id)], args=[ttl, keep_for or ""])
    return started.decode() if isinstance(started, bytes) else started
