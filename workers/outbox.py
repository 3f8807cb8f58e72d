"""A node's finished replies, kept until Redis has taken them, and for a while after.

A job that finishes while Redis is unreachable (restarting, failing over) must not lose its reply: the caller
is still waiting, and its API process reads stored replies on every tick. `ReplyOutbox.send` tries once from
the task's thread; if Redis does not answer, the reply goes to the outbox thread, which retries with the shared
jittered backoff until the job's deadline (after it, nobody waits any more) and logs what it gave up on.

Replies are also remembered until their job's deadline, so that after Redis lost data (a flush, a restart
without persistence, a failover to a replica that had not yet received them) `restore` writes back those it no
longer holds: a caller still waiting then gets the job's real outcome instead of a timeout.
"""

import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

import redis

from broker.backoff import Backoff
from broker.replies import store_reply
from broker.schemas import Reply

log = logging.getLogger(__name__)

TRANSIENT = (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError, redis.BusyLoadingError)
"""What passes: Redis down, restarting, loading its data, or a demoted master during a failover."""


@dataclass(frozen=True)
class _Entry:
    job_id: str
    body: str
    deadline: float


class ReplyOutbox:
    """Delivers replies to Redis, retrying through outages until each job's deadline; remembers recent ones."""

    def __init__(self, client: redis.Redis, *, ttl: int, remember: int = 1024) -> None:
        self._redis = client
        self._ttl = ttl
        self._remember = remember
        self._recent: OrderedDict[str, _Entry] = OrderedDict()
        self._pending: deque[_Entry] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._deliver_pending, name="modelfleet-replies", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Replies not yet taken by Redis."""
        with self._cond:
            return len(self._pending)

    def send(self, reply: Reply, deadline: float) -> bool:
        """Store and announce `reply`; True if Redis took it now, False if it is queued for retries."""
        entry = _Entry(reply.job_id, reply.model_dump_json(by_alias=True), deadline)
        with self._cond:
            self._recent[entry.job_id] = entry
            while len(self._recent) > self._remember:
                self._recent.popitem(last=False)
            queued = bool(self._pending)
        if not queued:  # replies leave in order: once one waits, the later ones wait behind it
            try:
                store_reply(self._redis, entry.job_id, entry.body, ttl=self._ttl, announce=True)
                return True
            except TRANSIENT as exc:
                log.warning("reply to job %s not delivered (%s); retrying until its deadline", entry.job_id, _name(exc))
        with self._cond:
            self._pending.append(entry)
            self._cond.notify()
        return False

    def restore(self) -> int:
        """Write back the remembered replies Redis no longer holds (whose callers may still wait)."""
        now = time.time()
        with self._cond:
            entries = [e for e in self._recent.values() if e.deadline > now]
        for entry in entries:
            store_reply(self._redis, entry.job_id, entry.body, ttl=self._ttl, announce=True, only_new=True)
        if entries:
            log.info("re-stored %d recent replies after Redis lost data", len(entries))
        return len(entries)

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what waits (giving up after `timeout`), then stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    def _deliver_pending(self) -> None:
        backoff = Backoff(0.1, 2.0)
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                entry = self._pending[0]
            try:
                store_reply(self._redis, entry.job_id, entry.body, ttl=self._ttl, announce=True)
            except TRANSIENT as exc:
                if backoff.sleep(entry.deadline) is None:
                    log.error("gave up on the reply to job %s: Redis did not answer before its deadline", entry.job_id)
                    self._pop(entry)
                    backoff.reset()
                elif backoff.attempts % 10 == 1:
                    log.warning("reply to job %s still waiting for Redis (%s)", entry.job_id, _name(exc))
                continue
            except redis.RedisError:
                log.exception("reply to job %s refused by Redis; dropped", entry.job_id)
            else:
                log.info("reply to job %s delivered after %d attempts", entry.job_id, backoff.attempts + 1)
            self._pop(entry)
            backoff.reset()

    def _pop(self, entry: _Entry) -> None:
        with self._cond:
            if self._pending and self._pending[0] is entry:
                self._pending.popleft()


def _name(exc: BaseException) -> str:
    return type(exc).__name__
