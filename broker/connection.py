"""Where Redis is: one URL, read once, giving every process kind its clients (sync, asyncio, Celery's broker).

Accepted forms of `MODELFLEET_REDIS_URL`:

- `redis://[[user]:password@]host:port[/db]`, `rediss://...` (TLS), `unix:///path?db=0`: one Redis server;
- `redis+sentinel://[[user]:password@]host:port[,host:port...][/service[/db]][?sentinel_password=...]`:
  Redis Sentinel. The hosts are sentinels; `service` is the monitored master's name (default
  `MODELFLEET_SENTINEL_MASTER`, `mymaster`); the user and password are the data nodes'; the sentinels get
  `sentinel_password` if given (sentinels usually run without one);
- Celery's own `sentinel://[:password@]host:port[/db];sentinel://host:port...`, with the master's name from
  `MODELFLEET_SENTINEL_MASTER`.

With Sentinel, every client asks the sentinels for the current master and asks again when a connection fails or
the server it reaches has become a replica (a failover): redis-py's `SentinelConnectionPool`, and kombu's
`SentinelChannel` for Celery, which `celery_broker()` configures.
"""

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

try:  # redis-py >= 7
    from redis.maint_notifications import MaintNotificationsConfig

    # redis-py's maintenance notifications (for managed Redis services that announce failovers) default to
    # "auto", and while they are on, a pool hands out a pooled connection that the server has closed (Redis
    # restarted) instead of reconnecting it first: the next command on it fails with "Connection closed by
    # server", and the API answered that request 503. modelfleet's servers announce nothing of the kind.
    CONNECTION_DEFAULTS: dict[str, Any] = {"maint_notifications_config": MaintNotificationsConfig(enabled=False)}
except ImportError:  # pragma: no cover - older redis-py checks every connection it hands out
    CONNECTION_DEFAULTS = {}

DEFAULT_MASTER = "mymaster"
SENTINEL_TIMEOUT = 5.0
SENTINEL_SCHEMES = ("redis+sentinel", "sentinel")


@dataclass(frozen=True)
class RedisTarget:
    """A parsed Redis URL: one server (`url`), or sentinels and the master they watch."""

    url: str
    sentinels: list[tuple[str, int]] = field(default_factory=list)
    master: str = DEFAULT_MASTER
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None

    @property
    def is_sentinel(self) -> bool:
        return bool(self.sentinels)

    def secrets(self) -> list[str]:
        """Every secret the URL holds, as written and decoded: for the log mask."""
        found = [self.url]
        for secret in {self.password, self.sentinel_password}:
            if secret:
                found += [secret, quote(secret, safe="")]
        return found

    def safe(self) -> str:
        """The URL with its passwords masked: the only form that may be logged or shown."""
        shown = self.url
        for secret in sorted(set(self.secrets()[1:]), key=len, reverse=True):
            shown = shown.replace(secret, "**")
        return shown

    def client(self, **options: Any) -> redis.Redis:
        options = CONNECTION_DEFAULTS | options
        if not self.is_sentinel:
            return redis.Redis.from_url(self.url, **options)
        sentinel = Sentinel(
            self.sentinels, sentinel_kwargs=self._sentinel_kwargs(Retry(NoBackoff(), 0)), socket_timeout=5
        )
        kwargs: dict[str, Any] = {"db": self.db, **self._auth(), **options}
        return sentinel.master_for(self.master, **kwargs)

    def async_client(self, *, max_connections: int = 100, timeout: float = 20, **options: Any) -> aioredis.Redis:
        """An asyncio client whose pool makes a burst of requests queue for a connection rather than fail."""
        options = CONNECTION_DEFAULTS | options
        if not self.is_sentinel:
            pool = aioredis.BlockingConnectionPool.from_url(
                self.url, max_connections=max_connections, timeout=timeout, **options
            )
            return aioredis.Redis.from_pool(pool)
        sentinel = AsyncSentinel(
            self.sentinels, sentinel_kwargs=self._sentinel_kwargs(AsyncRetry(NoBackoff(), 0)), socket_timeout=5
        )
        # redis-py's Sentinel pool does not block when full: past `max_connections` a request fails (503).
        kwargs: dict[str, Any] = {"db": self.db, "max_connections": max_connections, **self._auth(), **options}
        return sentinel.master_for(self.master, **kwargs)

    def celery_broker(self) -> tuple[str, dict[str, Any]]:
        """Celery's broker URL and the transport options that go with it (kombu's `sentinel://` form)."""
        if not self.is_sentinel:
            return self.url, {}
        auth = ""
        if self.password is not None:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password, safe='')}@"
        url = ";".join(f"sentinel://{auth}{host}:{port}/{self.db}" for host, port in self.sentinels)
        return url, {"master_name": self.master, "sentinel_kwargs": self._sentinel_kwargs(Retry(NoBackoff(), 0))}

    def _auth(self) -> dict[str, str]:
        auth = {"password": self.password} if self.password is not None else {}
        return auth | ({"username": self.username} if self.username else {})

    def _sentinel_kwargs(self, retry: Retry | AsyncRetry) -> dict[str, Any]:
        """How to reach each sentinel. One try each: a sentinel that is down (it ran on the old master's machine)
        is passed over for the next at once instead of retried with redis-py's default backoff (three retries,
        seconds each) by every new connection, which stalled Flower's inspect calls past a failover. The master
        connection's own retry asks the whole list again."""
        kwargs: dict[str, Any] = {
            "socket_timeout": SENTINEL_TIMEOUT,
            "socket_connect_timeout": SENTINEL_TIMEOUT,
            "retry": retry,
        }
        return kwargs | ({"password": self.sentinel_password} if self.sentinel_password else {})


def parse_redis_url(url: str, *, master: str = DEFAULT_MASTER) -> RedisTarget:
    """Parse any accepted form; raises ValueError (saying which part is wrong, never echoing the URL)."""
    scheme = url.partition("://")[0].lower()
    if scheme not in SENTINEL_SCHEMES:
        return RedisTarget(url=url)
    if scheme == "sentinel":
        return _parse_celery_sentinel(url, master)
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    sentinels = [_host_port(item) for item in netloc.split(",") if item]
    if not sentinels:
        raise ValueError("a redis+sentinel:// URL needs at least one sentinel host:port")
    path = [p for p in parts.path.split("/") if p]
    if len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError("a redis+sentinel:// URL's path is /<master name>[/<db>]")
    query = parse_qs(parts.query, keep_blank_values=True)
    user, password = _credentials(parts.netloc)
    sentinel_password = query["sentinel_password"][0] if query.get("sentinel_password", [""])[0] else None
    return RedisTarget(
        url=url,
        sentinels=sentinels,
        master=unquote(path[0]) if path else master,
        db=int(path[1]) if len(path) == 2 else 0,
        username=user,
        password=password,
        sentinel_password=sentinel_password,
    )


def _parse_celery_sentinel(url: str, master: str) -> RedisTarget:
    sentinels, db, user, password = [], 0, None, None
    for item in url.split(";"):
        parts = urlsplit(item.strip())
        if parts.scheme.lower() != "sentinel":
            raise ValueError("every part of a sentinel:// URL list must start with sentinel://")
        sentinels.append(_host_port(parts.netloc.rpartition("@")[2]))
        if parts.path.strip("/"):
            if not parts.path.strip("/").isdigit():
                raise ValueError("a sentinel:// URL's path is /<db>")
            db = int(parts.path.strip("/"))
        user, password = _credentials(parts.netloc) if "@" in parts.netloc else (user, password)
    return RedisTarget(
        url=url, sentinels=sentinels, master=master, db=db, username=user, password=password, sentinel_password=None
    )


def _credentials(netloc: str) -> tuple[str | None, str | None]:
    userinfo, at, _ = netloc.rpartition("@")
    if not at:
        return None, None
    user, colon, password = userinfo.partition(":")
    return (unquote(user) or None), (unquote(password) if colon else None)


def _host_port(item: str) -> tuple[str, int]:
    host, colon, port = item.strip().rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("each sentinel must be given as host:port")
    return host.strip("[]"), int(port)


def redis_problem(exc: BaseException) -> str:
    """What went wrong with Redis, as a clause for an error message (never the server's own words, which may
    quote a key or a value): refused credentials, out of memory, a read-only replica, no answer in time, or
    unreachable."""
    if isinstance(exc, redis.AuthenticationError):
        return "Redis refused the credentials; the operator must fix MODELFLEET_REDIS_URL"
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        return "Redis is out of memory (maxmemory) and refuses writes; the operator must free memory or raise it"
    if isinstance(exc, redis.ReadOnlyError):
        return "Redis is a read-only replica (a failover under way?)"
    if isinstance(exc, redis.TimeoutError):
        return "Redis did not answer in time (stalled or overloaded?)"
    return "Redis, which carries every job, cannot be reached"
