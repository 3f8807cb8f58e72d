"""Settings of an API process."""

from pydantic import Field

from broker.operations import LIST, LOAD, UNLOAD, Op
from broker.settings import KeyedSettings


class ApiSettings(KeyedSettings):
    """The head: where it listens, its keys, and how long each operation may take."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    access_log: bool = False
    """A log line per request (uvicorn's access log). Off by default, as on the nodes: each line costs the head
    about 0.1 ms of CPU, a tenth of a list's; `/metrics` counts jobs and prompts by outcome without it."""
    # Each operation names the setting that overrides its timeout (`Op.timeout_setting`).
    load_timeout: float = Field(default=LOAD.default_timeout, gt=0)
    unload_timeout: float = Field(default=UNLOAD.default_timeout, gt=0)
    list_timeout: float = Field(default=LIST.default_timeout, gt=0)
    liveness_interval: float = Field(default=1.0, gt=0)
    sse_ping_interval: float = Field(default=15.0, gt=0)
    """Seconds between the comment pings that keep an idle event stream open through proxies."""
    sse_write_timeout: float = Field(default=10.0, gt=0)
    """Seconds one write to an SSE client may wait: a client that stopped reading is dropped after it."""
    sse_queue_size: int = Field(default=512, ge=1)
    """Events an SSE client may fall behind before it is disconnected (to reconnect with its last id)."""

    load_on_demand: bool = True
    """A prompt for a model loaded nowhere loads it where placement puts it (else 404)."""
    on_demand_evict: bool = False
    """A load on demand may evict idle, unpinned models to make room."""
    inference_connect_timeout: float = Field(default=5.0, gt=0)
    inference_read_timeout: float = Field(default=300.0, gt=0)
    """Seconds a node may stay silent in the middle of an answer (or before its first byte) before it has failed."""
    inference_failure_cooldown: float = Field(default=5.0, ge=0, le=60)
    """Seconds a replica that could not be reached, broke or went away (before answering, or mid-stream) is left
    out of this API process's routing, doubling with each failure in a row up to a minute; then one request tries
    it. 0 turns this off."""
    inflight_lease: float = Field(default=30.0, ge=1)
    """Seconds the requests in flight of an API process that died keep counting against their nodes."""
    session_ttl: float = Field(default=12 * 3600.0, gt=0)
    """Seconds a dashboard session may sit idle before it ends (each request renews it)."""

    def timeout(self, op: Op) -> float:
        """Seconds the API waits for `op`'s reply."""
        return float(getattr(self, op.timeout_setting))
