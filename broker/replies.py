"""The reply path: how a node hands a job's outcome back to the API process waiting for it.

The worker stores the reply under `keys.reply(job_id)` (durable for `reply_ttl`) and publishes it on
`keys.replies_channel()` (fast path). Pub/sub is at-most-once, so the waiting side also reads the stored
replies of its pending jobs on every liveness tick and after every reconnect: a reply is never lost, at worst
it arrives one tick late.
"""

from typing import Protocol

from broker import keys
from broker.schemas import Reply


class _SyncRedis(Protocol):
    def pipeline(self, transaction: bool = True): ...


def publish_reply(redis: _SyncRedis, reply: Reply, *, ttl: int) -> None:
    """Store and announce a reply (worker side, sync redis-py)."""
    body = reply.model_dump_json(by_alias=True)
    pipe = redis.pipeline(transaction=True)
    pipe.set(keys.reply(reply.job_id), body, ex=ttl)
    pipe.publish(keys.replies_channel(), body)
    pipe.execute()
