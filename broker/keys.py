"""Every Redis key, channel, queue and task name modelfleet uses, made here and nowhere else.

| name                                  | Redis type | written by | lifetime                                   |
|---------------------------------------|------------|------------|--------------------------------------------|
| `modelfleet:nodes`                    | set        | worker     | permanent: every fingerprint ever seen     |
| `modelfleet:node:<fp>`                | hash       | worker     | permanent: registration, boot, heartbeat,  |
|                                       |            |            | models, files, memory (`broker.registry`)  |
| `modelfleet:alive:<fp>`               | string     | worker     | TTL `heartbeat_ttl`; absent = node offline |
| `modelfleet:reply:<job-id>`           | string     | worker     | TTL `reply_ttl`: the job's JSON reply      |
| `modelfleet:cancel:<job-id>`          | string     | API        | TTL = the job's remaining lifetime         |
| `modelfleet:inflight:<fp>`            | zset       | API        | inference requests proxied to the node:    |
|                                       |            |            | member `<api>:<request>`, score = lease    |
|                                       |            |            | expiry (ms); expired members are dropped   |
| `modelfleet:ondemand:<model>`         | string     | API        | TTL lock lease: the one process loading    |
|                                       |            |            | the model on demand                        |
| `modelfleet:ondemand-failed:<model>`  | string     | API        | short TTL: why that load failed (JSON)     |
| `modelfleet:session:<digest>`         | string     | API        | TTL `session_ttl`, renewed on use          |
| `modelfleet:started:<job-id>`         | string     | worker     | TTL `reply_ttl`: boot id that started it   |
| `modelfleet:replies`                  | channel    | worker     | pub/sub: fast path for replies             |
| `modelfleet:events`                   | stream     | any        | capped history of pool events              |
| `distributed-pool-changed`            | channel    | any        | pub/sub: live pool events                  |
| `modelfleet:usage`                    | channel    | worker     | pub/sub: models' usage (in flight, queued, |
|                                       |            |            | tokens), at most one a second per node;    |
|                                       |            |            | never in the stream: a gauge, not history  |
| `modelfleet.node.<fp>`                | list       | Celery     | the node's job queue (kombu)               |

Task names are `modelfleet.<operation>` (`task_name`), one per operation in `broker.operations`.

Model ids may hold any printable character; wherever one goes into a key or URL it is percent-encoded.
"""

from urllib.parse import quote

PREFIX = "modelfleet"

EVENTS_CHANNEL = "distributed-pool-changed"


def encode_id(value: str) -> str:
    """Percent-encode a model id (or any user text) so it cannot change a key's or URL's structure."""
    return quote(value, safe="")


def task_name(operation: str) -> str:
    """The Celery task an operation travels under (`broker.operations` declares the operations)."""
    return f"{PREFIX}.{operation}"


def nodes_set() -> str:
    return f"{PREFIX}:nodes"


def node_info(fingerprint: str) -> str:
    return f"{PREFIX}:node:{fingerprint}"


def node_alive(fingerprint: str) -> str:
    return f"{PREFIX}:alive:{fingerprint}"


def node_queue(fingerprint: str) -> str:
    return f"{PREFIX}.node.{fingerprint}"


def inflight(fingerprint: str) -> str:
    return f"{PREFIX}:inflight:{fingerprint}"


def ondemand_lock(model_id: str) -> str:
    return f"{PREFIX}:ondemand:{encode_id(model_id)}"


def ondemand_failed(model_id: str) -> str:
    return f"{PREFIX}:ondemand-failed:{encode_id(model_id)}"


def reply(job_id: str) -> str:
    return f"{PREFIX}:reply:{job_id}"


def cancel(job_id: str) -> str:
    return f"{PREFIX}:cancel:{job_id}"


def session(digest: str) -> str:
    """A dashboard session, keyed by a digest of its id (the id itself, a credential, is never stored)."""
    return f"{PREFIX}:session:{digest}"


def started(job_id: str) -> str:
    return f"{PREFIX}:started:{job_id}"


def replies_channel() -> str:
    return f"{PREFIX}:replies"


def events_stream() -> str:
    return f"{PREFIX}:events"


def events_channel() -> str:
    return EVENTS_CHANNEL


def usage_channel() -> str:
    return f"{PREFIX}:usage"
