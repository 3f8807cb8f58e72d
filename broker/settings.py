"""Settings shared by every process kind. Read when a process starts (never at import) and passed down."""

from pathlib import Path
from typing import Annotated

from kombu.utils.url import maybe_sanitize_url
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from broker.connection import DEFAULT_MASTER, RedisTarget, parse_redis_url

STATE_DIR = Path(".modelfleet")
"""`modelfleet up`'s state directory, relative to where a process runs (modelfleet/state.py maps it)."""
STATE_FILE = STATE_DIR / "keys"
"""What `up` writes for the commands run beside it: read as a dotenv file, below the environment."""


MIN_SECRET_LENGTH = 16
"""Below this, a key is warned about at start-up: guessable by whoever can reach the API."""


class BrokerSettings(BaseSettings):
    """How to reach Redis, and the timing of the liveness protocol.

    Read from `MODELFLEET_*` variables, then from `./.modelfleet/keys` if `modelfleet up` wrote one there: a
    worker, an API or Flower started in that directory joins that fleet without flags.
    """

    # hide_input_in_errors: a refused Redis URL (or key) must not appear in the error that refuses it.
    model_config = SettingsConfigDict(
        env_prefix="MODELFLEET_", extra="ignore", env_file=STATE_FILE, hide_input_in_errors=True
    )

    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    """One Redis (`redis://`, `rediss://`, `unix://`) or Redis Sentinel (`redis+sentinel://`, Celery's
    `sentinel://`): see `broker.connection`."""
    sentinel_master: str = Field(default=DEFAULT_MASTER, min_length=1, max_length=200)
    """The master's name in Sentinel, when the URL does not give it."""
    heartbeat_interval: float = Field(default=2.0, gt=0)
    heartbeat_ttl: float = Field(default=6.0, gt=0)
    reply_ttl: int = Field(default=900, gt=0)
    events_history: int = Field(default=10_000, ge=100)
    """Pool events kept in the Redis stream: how far back a reconnecting SSE client can replay."""
    node_token: SecretStr | None = None
    """The bearer the head sends to the nodes' inference endpoints (they accept it beside the fleet's API keys);
    set the same value on the head and every node. Never stored in Redis."""

    def short_secrets(self) -> list[str]:
        """A warning for each of the process's keys (and its node token) shorter than MIN_SECRET_LENGTH: where
        it is set and how long it is, never the key itself."""
        found: list[tuple[str, SecretStr]] = [("MODELFLEET_NODE_TOKEN", self.node_token)] if self.node_token else []
        for name in ("operator_keys", "api_keys"):
            found += [(f"MODELFLEET_{name.upper()}", key) for key in getattr(self, name, [])]
        return [
            f"{where} holds a key of {len(key.get_secret_value())} characters: a key that short can be guessed; use "
            f"at least {MIN_SECRET_LENGTH} random ones (python -c 'import secrets; print(secrets.token_urlsafe(24))')"
            for where, key in found
            if len(key.get_secret_value()) < MIN_SECRET_LENGTH
        ]

    @field_validator("redis_url")
    @classmethod
    def _parseable(cls, value: SecretStr) -> SecretStr:
        parse_redis_url(value.get_secret_value())  # a ValueError names the part that is wrong, not the URL
        return value

    @property
    def redis_target(self) -> RedisTarget:
        return parse_redis_url(self.redis_url.get_secret_value(), master=self.sentinel_master)

    @property
    def safe_redis_url(self) -> str:
        """The Redis URL with its password masked: the only form that may be logged or shown."""
        target = self.redis_target
        return target.safe() if target.is_sentinel else str(maybe_sanitize_url(target.url))


SecretList = Annotated[list[SecretStr], NoDecode]


def split_secrets(value: object) -> object:
    """Accept `a,b,c` from the environment as well as a list."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


MAX_BODY_BYTES = 16 * 2**20
"""The default of `KeyedSettings.max_body_bytes`."""


class KeyedSettings(BrokerSettings):
    """A process that checks the fleet's keys: the head, and each node's inference endpoint (which takes a key of
    either scope, or the node token)."""

    operator_keys: SecretList = Field(default_factory=list)
    """Keys that may load and unload (`MODELFLEET_OPERATOR_KEYS=a,b`)."""
    api_keys: SecretList = Field(default_factory=list)
    """Read-only keys (`MODELFLEET_API_KEYS=a,b`)."""

    wrong_key_limit: int = Field(default=20, ge=0, le=1_000_000)
    """Wrong keys an address may send (bearer headers, dashboard sign-ins) before keys new to it are refused for
    a while: then one more every `wrong_key_window / wrong_key_limit` s (`broker.wrong_keys`). 0 turns this off."""
    wrong_key_window: float = Field(default=60.0, gt=0, le=86_400)
    """Seconds over which `wrong_key_limit` wrong keys are forgiven."""
    max_body_bytes: int = Field(default=MAX_BODY_BYTES, ge=1024)
    """The largest request body the server reads (16 MiB: a prompt of a million characters, escaped, and more).
    A larger one is refused with 413 as it arrives (or at once, by its Content-Length), before anything is
    buffered beyond the limit or any route runs: a client cannot make a server hold unbounded memory."""

    _split_keys = field_validator("operator_keys", "api_keys", mode="before")(split_secrets)


__all__ = ["MAX_BODY_BYTES", "BrokerSettings", "KeyedSettings", "SecretList", "split_secrets"]
