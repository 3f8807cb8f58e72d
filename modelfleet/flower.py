"""`modelfleet flower`: the Flower dashboard on the fleet's broker, behind basic auth and read-only.

It runs Flower's own `celery flower` command in this process, against the app `broker.celery_app.make_celery`
builds, so it behaves exactly like the equivalent line (the app is built when Celery asks for it, not at import):

    FLOWER_BASIC_AUTH=user:password celery -A modelfleet.flower flower --read-only --port=5555

Secrets never go on a command line that `ps` shows: the Redis URL and the `user:password` pair come from the
environment (`MODELFLEET_REDIS_URL`, `MODELFLEET_FLOWER_AUTH`). Flower logs the broker URL with its password
masked; the log filter masks both secrets anyway.

Flower 2.2 has a `read_only` option: it answers 403 to every endpoint that would apply, send, revoke or abort a
task or control a worker. Its `/healthcheck` and `/metrics` answer without auth (they carry no secrets).

On Sentinel, Flower's events and inspect calls go through Celery's connection, which asks every sentinel; its own
broker client (queue lengths, the Broker page) is given the same list of sentinels (`use_every_sentinel`).
"""

import logging
from typing import Any

from celery import Celery
from pydantic import Field, SecretStr, field_validator

from broker.celery_app import make_celery
from broker.connection import RedisTarget
from broker.settings import BrokerSettings

log = logging.getLogger("modelfleet.flower")


class FlowerSettings(BrokerSettings):
    """The dashboard: where it listens and the one `user:password` pair it accepts."""

    flower_port: int = Field(default=5555, ge=0, le=65535)
    flower_address: str = "127.0.0.1"
    flower_auth: SecretStr | None = None

    @field_validator("flower_auth")
    @classmethod
    def _auth(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        user, colon, password = value.get_secret_value().partition(":")
        if not (user and colon and password):
            raise ValueError("expected user:password, both non-empty")
        return value


def flower_secrets(settings: FlowerSettings) -> list[str]:
    """The dashboard's own secrets, for the log mask: the `user:password` pair and the password alone."""
    if settings.flower_auth is None:
        return []
    pair = settings.flower_auth.get_secret_value()
    return [pair, pair.partition(":")[2]]


def run_flower(settings: FlowerSettings) -> int:
    """Serve Flower until SIGTERM or Ctrl-C; returns the process exit code. Refuses to run without auth."""
    from flower.options import default_options

    if settings.flower_auth is None:
        log.error("refusing to start Flower without basic auth: set MODELFLEET_FLOWER_AUTH=user:password")
        return 2
    pair = settings.flower_auth.get_secret_value()

    def require_auth() -> None:
        # Runs after Flower has parsed its FLOWER_* variables, a flowerconfig.py and its arguments, so none of
        # them can drop or replace the credentials.
        default_options.basic_auth = [pair]

    default_options.add_parse_callback(require_auth)
    app = make_celery(settings)
    use_every_sentinel(settings.redis_target)
    log.info(
        "Flower on http://%s:%d, read-only, basic auth; broker %s",
        settings.flower_address,
        settings.flower_port,
        settings.safe_redis_url,
    )
    argv = ["flower", f"--port={settings.flower_port}", f"--address={settings.flower_address}", "--read-only=true"]
    code = app.start(argv)
    return int(code or 0)


def use_every_sentinel(target: RedisTarget) -> None:
    """Give Flower's broker client every sentinel of the URL, not only the first.

    Flower builds that client per request from the first URL of Celery's list (`Connection.as_uri()`), so with
    the first sentinel down (it ran on the old master's machine) its queue lengths answered 500 while everything
    else followed the failover. Flower has no hook for it: the name `Broker` its handlers call (bound in
    `flower.views` since 2.2, in `flower.views.broker` and `flower.api.tasks` before) is replaced by a factory
    that answers Sentinel URLs with a client on `target`'s sentinels.
    """
    if not target.is_sentinel:
        return
    import importlib

    from flower.utils.broker import Broker, RedisSentinel

    class EverySentinel(RedisSentinel):
        def _get_redis_client(self, *_: object) -> Any:
            timeouts = {
                "socket_timeout": getattr(self, "socket_timeout", 2.0),
                "socket_connect_timeout": getattr(self, "socket_connect_timeout", 1.0),
            }
            return target.async_client(max_connections=8, **timeouts)

    def broker(url: str, *args: Any, **kwargs: Any) -> Any:
        if url.partition("://")[0] == "sentinel":
            return EverySentinel(url, *args, **kwargs)
        return Broker(url, *args, **kwargs)

    for name in ("flower.views", "flower.views.broker", "flower.api.tasks"):
        module = importlib.import_module(name)
        if getattr(module, "Broker", None) is Broker:
            module.Broker = broker  # type: ignore[attr-defined]


def celery_app() -> Celery:
    """The app for `celery -A modelfleet.flower ...`, built from `MODELFLEET_*` when Celery asks for it."""
    settings = BrokerSettings()
    use_every_sentinel(settings.redis_target)
    return make_celery(settings)


def __getattr__(name: str) -> Any:
    # `celery -A modelfleet.flower` reads the module's `app` attribute: build it then, not at import.
    if name == "app":
        return celery_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
